"""Turn items (text, images, both) into the token and pixel tensors of a Qwen2-VL-style model.

Every item becomes one user turn of the model's chat template: one image placeholder per
image, then the text. Texts are truncated on their own tokens first, so truncation never cuts
image tokens. Padding is on the right (mean pooling ignores pads through the attention mask).
"""

from __future__ import annotations

import copy
import hashlib
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from moon2.data.images import MISSING, ImageCache
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


def truncate_texts(
    tokenizer: Any, texts: list[str], max_tokens: int, cache: dict[str, str] | None = None
) -> list[str]:
    """Each text cut to its first ``max_tokens`` tokens (one batched tokenizer call for the
    texts not in ``cache``, which then holds them: a training run sees the same titles and
    queries every epoch)."""
    if not texts:
        return []
    cache = {} if cache is None else cache
    new = [text for text in dict.fromkeys(texts) if text not in cache]
    if new:
        if len(cache) + len(new) > TEXT_CACHE_ENTRIES:
            cache.clear()
        ids = tokenizer(new, add_special_tokens=False)["input_ids"]
        for text, tokens in zip(new, ids, strict=True):
            fits = len(tokens) <= max_tokens
            cache[text] = text if fits else tokenizer.decode(tokens[:max_tokens])
    return [cache[text] for text in texts]


TEXT_CACHE_ENTRIES = 500_000
"""Truncated texts a cache holds before it starts over (a few hundred MB at most)."""


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
    processor: Any,
    items: Sequence[EncodeItem],
    max_text_tokens: int,
    text_cache: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Processor tensors for ``items`` (an item without text and images gets an empty turn),
    plus each row's modality under :data:`MODALITY_KEY`. ``text_cache``: see
    :func:`truncate_texts`."""
    prompts: list[str] = []
    images: list[Any] = []
    texts = iter(
        truncate_texts(
            processor.tokenizer,
            [item.text for item in items if item.text],
            max_text_tokens,
            text_cache,
        )
    )
    for item in items:
        prompts.append(_prompt(processor, len(item.images), next(texts) if item.text else None))
        images.extend(item.images)
    # the processor's per-row Python loop for token types cost ~6 ms of a 64-row training batch
    own_token_types = _returns_token_types(processor)
    options = {"return_mm_token_type_ids": False} if own_token_types else {}
    encoded = dict(
        processor(text=prompts, images=images or None, padding=True, return_tensors="pt", **options)
    )
    if own_token_types:
        encoded["mm_token_type_ids"] = token_types(processor, encoded["input_ids"])
    encoded[MODALITY_KEY] = torch.tensor([item_modality(item) for item in items])
    return encoded


def _returns_token_types(processor: Any) -> bool:
    """Whether ``processor`` returns ``mm_token_type_ids`` by default (transformers >= 5) and
    names its multimodal token ids, so :func:`token_types` can make them instead."""
    return getattr(processor, "return_mm_token_type_ids", False) is True and all(
        hasattr(processor, name) for name in _TOKEN_TYPE_IDS
    )


_TOKEN_TYPE_IDS = {"image_token_ids": 1, "video_token_ids": 2, "audio_token_ids": 3}
"""processor attribute naming a modality's token ids -> that modality's token type"""


def token_types(processor: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token modality (0 text, 1 image, 2 video, 3 audio), as transformers'
    ``create_mm_token_type_ids`` makes them, for a padded batch at once."""
    types = torch.zeros_like(input_ids)
    for name, value in _TOKEN_TYPE_IDS.items():
        ids = [i for i in getattr(processor, name) or [] if i is not None]
        if ids:
            types[torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype))] = value
    return types


class CachedImageProcessor:
    """An image processor that remembers its output per photo.

    A training run shows the worker the same catalog and query photos every epoch; resizing,
    normalising and cutting each into patches again cost ~20 ms of a 64-photo batch. Photos
    are known by their pixels (a hash), so a photo that changes is never served stale, and
    one is kept only the second time it is seen: the random views made afresh every epoch
    never fill the cache. Works for processors whose output is one ``pixel_values`` row per
    patch and one ``image_grid_thw`` row per photo (Qwen2-VL and Qwen2.5-VL); any other output
    passes through uncached.
    """

    def __init__(self, inner: Any, max_bytes: int) -> None:
        self.inner = inner
        self.cache = ImageCache(max_bytes)
        self._seen: set[bytes] = set()
        self._cacheable: bool | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "inner" or name.startswith("__"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, images: Any, **kwargs: Any) -> Any:
        if self._cacheable is False or not isinstance(images, list | tuple):
            return self.inner(images, **kwargs)
        context = repr(sorted(kwargs.items())).encode()
        keys = [_photo_digest(image, context) for image in images]
        found = [MISSING if key is None else self.cache.find(key) for key in keys]
        todo: dict[Any, list[int]] = {}  # a photo twice in one batch is processed once
        for i, value in enumerate(found):
            if value is MISSING:
                todo.setdefault(("uncacheable", i) if keys[i] is None else keys[i], []).append(i)
        if todo:
            firsts = [positions[0] for positions in todo.values()]
            output = self.inner([images[i] for i in firsts], **kwargs)
            if self._cacheable is None:
                self._cacheable = set(output.keys()) == {"pixel_values", "image_grid_thw"}
            if not self._cacheable:
                return output if len(firsts) == len(images) else self.inner(images, **kwargs)
            parts = _per_photo(output)
            for positions, part in zip(todo.values(), parts, strict=True):
                for i in positions:
                    found[i] = part
                self._admit(keys[positions[0]], part, seen_twice=len(positions) > 1)
            if len(firsts) == len(images):
                return output
        from transformers import BatchFeature

        return BatchFeature(
            {
                "pixel_values": torch.cat([rows for rows, _ in found]),
                "image_grid_thw": torch.stack([grid for _, grid in found]),
            }
        )

    def _admit(
        self, key: bytes | None, part: tuple[torch.Tensor, torch.Tensor], seen_twice: bool
    ) -> None:
        if key is None:
            return
        if seen_twice or key in self._seen:
            self.cache.put(key, part)
            return
        if len(self._seen) > SEEN_PHOTOS:
            self._seen.clear()
        self._seen.add(key)


SEEN_PHOTOS = 2_000_000
"""Photo hashes remembered as seen once before they start over (~100 MB)."""


def _per_photo(output: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pixel rows, grid) of each photo of an image processor's output; the rows are copies,
    so a cached photo does not keep its whole batch alive."""
    pixels = torch.as_tensor(output["pixel_values"])
    grids = torch.as_tensor(output["image_grid_thw"])
    rows = pixels.split(grids.prod(dim=-1).tolist())
    return [(part.clone(), grid.clone()) for part, grid in zip(rows, grids, strict=True)]


ONE_OFF = "moon2_one_off"
"""``PIL.Image.info`` key of a photo made for one use (a random view drawn afresh each epoch):
:class:`CachedImageProcessor` processes it without hashing it, as it will not be seen again."""


def one_off(image: Any) -> Any:
    """``image`` (a PIL image) marked as made for one use (see :data:`ONE_OFF`)."""
    if isinstance(image, Image.Image):
        image.info[ONE_OFF] = True
    return image


def _photo_digest(image: Any, context: bytes) -> bytes | None:
    """A hash of a photo's pixels (PIL image or array) and the call's options; None for
    anything else and for a :func:`one_off` photo (processed, never cached)."""
    if isinstance(image, Image.Image):
        if image.info.get(ONE_OFF):
            return None
        header = f"{image.mode}:{image.size}".encode()
        data = image.tobytes()
        if image.palette is not None:  # palette images: the same indices, other colours
            transparency = image.info.get("transparency")
            header += bytes(image.palette.tobytes()) + repr(transparency).encode()
    elif isinstance(image, np.ndarray):
        header = f"{image.dtype}:{image.shape}".encode()
        data = np.ascontiguousarray(image).tobytes()
    else:
        return None
    digest = hashlib.sha256(header)  # 2x blake2b's speed here (CPUs hash SHA-256 in hardware)
    digest.update(context)
    digest.update(data)
    return digest.digest()[:16]


class CachedTokenizer:
    """A tokenizer that remembers each prompt's token ids.

    A training run tokenizes the same query texts and titles (with the same image
    placeholders) every epoch; the tokenizer and its per-row conversion to Python lists cost
    ~8 ms of a 16-sample batch in the data worker. Serves the call a processor makes,
    ``tokenizer(prompts, padding=True, return_tensors="pt")``, from the ids of each prompt
    tokenized once, padded as the tokenizer pads; any other call goes to the tokenizer.
    """

    _SERVED = (
        {"padding": True, "return_tensors": "pt"},
        {"padding": "longest", "return_tensors": "pt"},
    )

    def __init__(self, inner: Any, max_entries: int = TEXT_CACHE_ENTRIES) -> None:
        self.inner = inner
        self.max_entries = max_entries
        self._ids: dict[str, list[int]] = {}
        self._servable: bool | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "inner" or name.startswith("__"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        servable = (
            self._servable is not False
            and not args
            and kwargs in self._SERVED
            and isinstance(text, list)
            and text
            and all(isinstance(prompt, str) for prompt in text)
            and getattr(self.inner, "pad_token_id", None) is not None
        )
        if not servable:
            return self.inner(text, *args, **kwargs)
        missing = list(dict.fromkeys(prompt for prompt in text if prompt not in self._ids))
        if missing and len(self._ids) + len(missing) > self.max_entries:
            self._ids.clear()
            missing = list(dict.fromkeys(text))
        if missing:
            encoded = self.inner(missing)
            if self._servable is None:
                self._servable = set(encoded.keys()) == {"input_ids", "attention_mask"} and all(
                    all(mask) for mask in encoded["attention_mask"]
                )
                if not self._servable:
                    return self.inner(text, *args, **kwargs)
            self._ids.update(zip(missing, encoded["input_ids"], strict=True))
        rows = [self._ids[prompt] for prompt in text]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.inner.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        left = getattr(self.inner, "padding_side", "right") == "left"
        for index, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            input_ids[index, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, span] = 1
        from transformers import BatchEncoding

        return BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask})


def with_token_cache(processor: Any) -> Any:
    """A copy of ``processor`` whose tokenizer is a :class:`CachedTokenizer` (``processor``
    itself is unchanged); ``processor`` when it has no tokenizer."""
    if getattr(processor, "tokenizer", None) is None:
        return processor
    cached = copy.copy(processor)
    cached.tokenizer = CachedTokenizer(processor.tokenizer)
    return cached


def with_pixel_cache(processor: Any, max_bytes: int) -> Any:
    """A copy of ``processor`` whose image processor is a :class:`CachedImageProcessor`
    (``processor`` itself is unchanged, so it saves as before); ``processor`` when
    ``max_bytes`` is 0 or it has no image processor."""
    if max_bytes <= 0 or getattr(processor, "image_processor", None) is None:
        return processor
    cached = copy.copy(processor)
    cached.image_processor = CachedImageProcessor(processor.image_processor, max_bytes)
    return cached
