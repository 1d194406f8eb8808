"""Hugging Face baselines: ``hf:<model id or local path>``, mean-pooled last hidden states.

A text model (BERT, MiniLM, a causal LM) embeds the text of an item and cannot read images; a
vision-language model (Qwen2-VL, LLaVA, ... anything whose config has a ``vision_config`` and
whose processor has a chat template) reads text, images or both in one prompt. The embedding
is the mean of the last hidden states over the attention mask, as in MOON2.0.

Model code from the hub runs only with ``trust_remote_code=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from moon2.errors import InputError
from moon2.models.base import EncodeItem, Encoder, l2_normalise


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [B, T, H] over positions where ``mask`` [B, T] is 1."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class HFEncoder(Encoder):
    def __init__(
        self,
        model_id: str,
        device: torch.device,
        trust_remote_code: bool = False,
        max_length: int = 256,
    ) -> None:
        from transformers import AutoConfig

        self.name = f"hf:{model_id}"
        self.device = device
        self.max_length = max_length
        try:
            config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise InputError(
                f"cannot load a Hugging Face model from {model_id!r}: {exc}. Offline, give a "
                "local directory holding config.json and the weights."
            ) from None
        self.is_vlm = getattr(config, "vision_config", None) is not None
        self.supports_images = self.is_vlm
        try:
            self._load(model_id, config, trust_remote_code)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"cannot load {model_id!r} as an encoder: {exc}") from None
        self.model.to(device).eval()
        self._dim = int(getattr(config, "hidden_size", 0) or config.get_text_config().hidden_size)

    def _load(self, model_id: str, config: Any, trust_remote_code: bool) -> None:
        from transformers import AutoModel, AutoProcessor, AutoTokenizer

        if self.is_vlm:
            self.processor = AutoProcessor.from_pretrained(
                model_id, trust_remote_code=trust_remote_code
            )
            if getattr(self.processor, "chat_template", None) is None:
                raise InputError(f"{model_id}: the processor has no chat template")
            self.tokenizer = self.processor.tokenizer
        else:
            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(
                model_id, trust_remote_code=trust_remote_code
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # mean pooling is order-independent, but left padding keeps causal models' outputs
        # for the real tokens identical to an unpadded run
        self.tokenizer.padding_side = "right"
        self.model = AutoModel.from_pretrained(
            model_id, trust_remote_code=trust_remote_code, torch_dtype=torch.float32
        )

    @property
    def dim(self) -> int:
        return self._dim

    def _text_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def _vlm_inputs(self, items: Sequence[EncodeItem]) -> dict[str, torch.Tensor]:
        prompts, images = [], []
        for item in items:
            content: list[dict[str, Any]] = [{"type": "image"} for _ in item.images]
            if item.text:
                content.append({"type": "text", "text": item.text})
            messages = [{"role": "user", "content": content}]
            prompts.append(self.processor.apply_chat_template(messages, tokenize=False))
            images.extend(item.images)
        return self.processor(
            text=prompts, images=images or None, padding=True, return_tensors="pt"
        )

    @torch.inference_mode()
    def encode(self, items: Sequence[EncodeItem]) -> np.ndarray:
        out = torch.zeros(len(items), self.dim)
        if self.is_vlm:
            rows = [i for i, item in enumerate(items) if item.text or item.images]
            if rows:
                inputs = self._vlm_inputs([items[i] for i in rows])
        else:
            rows = [i for i, item in enumerate(items) if item.text]
            if rows:
                inputs = self._text_inputs([items[i].text or "" for i in rows])
        if not rows:
            return out.numpy()
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        outputs = self.model(**inputs)
        hidden = getattr(outputs, "last_hidden_state", None)
        if hidden is None:
            hidden = outputs[0]
        pooled = l2_normalise(mean_pool(hidden, inputs["attention_mask"])).cpu()
        out[rows] = pooled
        return out.numpy().astype(np.float32)
