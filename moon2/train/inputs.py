"""Turn items (text, images, both) into the token and pixel tensors of a Qwen2-VL-style model.

Every item becomes one user turn of the model's chat template: one image placeholder per
image, then the text. Texts are truncated on their own tokens first, so truncation never cuts
image tokens. Padding is on the right (mean pooling ignores pads through the attention mask).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from moon2.models.base import EncodeItem


def configure_processor(processor: Any, min_pixels: int, max_pixels: int) -> Any:
    """Bound the image resolution (token count) the processor produces."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if getattr(image_processor, name, None) is not None:  # transformers 4.x
                setattr(image_processor, name, value)
        # transformers >= 4.5x reads the pixel budget from size (a dict or a SizeDict)
        size = getattr(image_processor, "size", None)
        if size is not None and all(_size_key(size, k) for k in ("shortest_edge", "longest_edge")):
            image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return processor


def _size_key(size: Any, key: str) -> bool:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return value is not None


def truncate_texts(tokenizer: Any, texts: list[str], max_tokens: int) -> list[str]:
    """Each text cut to its first ``max_tokens`` tokens (one batched tokenizer call)."""
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [
        text if len(tokens) <= max_tokens else tokenizer.decode(tokens[:max_tokens])
        for text, tokens in zip(texts, ids, strict=True)
    ]


_TEXT_SLOT = "\x00moon2-text\x00"
_TEMPLATES: weakref.WeakKeyDictionary[Any, dict[tuple[Any, int, bool], str | None]] = (
    weakref.WeakKeyDictionary()
)
"""processor -> (chat template, images, has text) -> the rendered turn with :data:`_TEXT_SLOT`
for the text, or None where the template does not place the text verbatim"""


def _render(processor: Any, images: int, text: str | None) -> str:
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(images)]
    if text is not None:
        content.append({"type": "text", "text": text})
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)


def _prompt(processor: Any, images: int, text: str | None) -> str:
    """The chat-formatted turn of an item. The template is rendered once per (images, has text)
    and the text put in its slot (a Jinja render per row cost ~0.1 ms, ~10 ms per training
    batch); a template that changes the text (its first use is checked against a real render)
    or a text with surrounding whitespace (a template may trim it) is rendered in full."""
    if text is not None and text != text.strip():
        return _render(processor, images, text)
    try:
        cache = _TEMPLATES.setdefault(processor, {})
    except TypeError:  # not weak-referenceable
        return _render(processor, images, text)
    key = (getattr(processor, "chat_template", None), images, text is not None)
    if key not in cache:
        rendered = _render(processor, images, text)
        slotted = _render(processor, images, _TEXT_SLOT) if text is not None else rendered
        usable = text is None or (
            slotted.count(_TEXT_SLOT) == 1 and slotted.replace(_TEXT_SLOT, text) == rendered
        )
        cache[key] = slotted if usable else None
        return rendered
    template = cache[key]
    if template is None:
        return _render(processor, images, text)
    return template if text is None else template.replace(_TEXT_SLOT, text)


MODALITY_KEY = "moon2_modality"
"""Key of the per-row input modality in :func:`build_inputs`' output (not a backbone input)."""
TEXT, IMAGE, MULTIMODAL = 0, 1, 2


def item_modality(item: EncodeItem) -> int:
    """TEXT, IMAGE or MULTIMODAL (an empty item counts as text)."""
    if item.images:
        return MULTIMODAL if item.text else IMAGE
    return TEXT


def build_inputs(
    processor: Any, items: Sequence[EncodeItem], max_text_tokens: int
) -> dict[str, torch.Tensor]:
    """Processor tensors for ``items`` (an item without text and images gets an empty turn),
    plus each row's modality under :data:`MODALITY_KEY`."""
    prompts: list[str] = []
    images: list[Any] = []
    texts = iter(
        truncate_texts(
            processor.tokenizer, [item.text for item in items if item.text], max_text_tokens
        )
    )
    for item in items:
        prompts.append(_prompt(processor, len(item.images), next(texts) if item.text else None))
        images.extend(item.images)
    encoded = dict(
        processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
    )
    encoded[MODALITY_KEY] = torch.tensor([item_modality(item) for item in items])
    return encoded
