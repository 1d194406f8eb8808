"""The MOON2.0 encoder: a vision-language backbone, MoE FFNs, pooling, optional projection.

One model embeds text-only, image-only and image+text inputs into one L2-normalised space.
A finished model is a directory (``moon2_model.json``, the backbone ``config.json``, the
processor files and ``model.safetensors``) that :func:`load_model` restores without running
any pickled code.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moon2.errors import InputError
from moon2.models.base import EncodeItem, Encoder, quiet_loading, resolve_device
from moon2.train import buckets as length_buckets
from moon2.train.buckets import (
    POSITION_KEY,
    images_of_rows,
    images_per_row,
    mrope_positions,
    splittable,
    take_rows,
)
from moon2.train.config import ModelConfig, MoEConfig
from moon2.train.inputs import MODALITY_KEY, build_inputs, configure_processor
from moon2.train.moe import MoEMLP, Routing, sample_gates

FORMAT_VERSION = 1
MARKER = "moon2_model.json"


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face (vision-)language model."""
    for path in ("language_model.layers", "model.language_model.layers", "model.layers", "layers"):
        module: Any = backbone
        try:
            for part in path.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList) and len(module) and hasattr(module[0], "mlp"):
            return module
    raise InputError(
        f"cannot find decoder layers with an .mlp in {type(backbone).__name__}; moon2 supports "
        "Qwen2-VL-style backbones (language_model.layers[i].mlp)"
    )


def select_layers(spec: str, count: int) -> list[int]:
    """'all', 'last:N' or '0,3,5' -> sorted layer indices."""
    spec = spec.strip()
    if spec == "all":
        return list(range(count))
    if spec.startswith("last:"):
        n = int(spec.split(":", 1)[1])
        if not 1 <= n <= count:
            raise InputError(f"moe.layers {spec!r}: the backbone has {count} decoder layers")
        return list(range(count - n, count))
    try:
        indices = sorted({int(part) for part in spec.split(",")})
    except ValueError:
        raise InputError(f"moe.layers must be 'all', 'last:N' or indices, got {spec!r}") from None
    if not indices or indices[0] < 0 or indices[-1] >= count:
        raise InputError(f"moe.layers {spec!r} is out of range for {count} decoder layers")
    return indices


class PatchwiseConv3d(nn.Conv3d):
    """A Conv3d computed as one matrix product when each input is a single kernel window
    (a ViT patch embedding such as Qwen2-VL's ``PatchEmbed``: kernel = stride = input size).
    On CPU the 3-D convolution kernel takes ~3x longer for the same result."""

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if tuple(patches.shape[2:]) != tuple(self.kernel_size):
            return super().forward(patches)
        out = nn.functional.linear(patches.flatten(1), self.weight.flatten(1), self.bias)
        return out.view(len(patches), self.out_channels, 1, 1, 1)


def use_patchwise_matmul(backbone: nn.Module) -> int:
    """Turn the backbone's patch-embedding convolutions into :class:`PatchwiseConv3d` (same
    weights, same state-dict keys). Returns how many were turned."""
    turned = 0
    for module in backbone.modules():
        if (
            type(module) is nn.Conv3d
            and tuple(module.kernel_size) == tuple(module.stride)
            and not isinstance(module.padding, str)
            and all(p == 0 for p in module.padding)
            and all(d == 1 for d in module.dilation)
            and module.groups == 1
            and module.padding_mode == "zeros"
        ):
            module.__class__ = PatchwiseConv3d
            turned += 1
    return turned


def _grouped_vision_attention(
    self: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Qwen2-VL's vision attention (each image attends within itself) with each run of
    consecutive images of one length attended in one batched call on a view of the states,
    where transformers' SDPA path makes one call per image (a training batch holds ~60 distinct
    photos; per-call overhead dominated the vision tower on CPU). Queries and keys get their
    rotary embedding in one pass (transformers' ``apply_rotary_pos_emb_vision``, same result).
    :meth:`Moon2Model._image_features` orders photos by size, so a run is every photo of a size.
    """
    from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

    seq_length = hidden_states.shape[0]
    qkv = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1)
    cos, sin = position_embeddings
    query_key = qkv[:, :2].float()
    cos, sin = cos[:, None, None].float(), sin[:, None, None].float()
    query_key = (query_key * cos + rotate_half(query_key) * sin).to(qkv.dtype)
    query, key, value = query_key[:, 0], query_key[:, 1], qkv[:, 2]
    heads, head_dim = query.shape[1], query.shape[2]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    runs: list[tuple[int, int, int]] = []  # (first token, images, length)
    start = 0
    for length in lengths:
        if runs and runs[-1][2] == length:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, length)
        elif length:
            runs.append((start, 1, length))
        start += length
    outputs = []
    for first, images, length in runs:

        def group(
            states: torch.Tensor, first: int = first, images: int = images, length: int = length
        ) -> Any:
            return (
                states[first : first + images * length]
                .reshape(images, length, heads, head_dim)
                .transpose(1, 2)
            )

        attended = nn.functional.scaled_dot_product_attention(
            group(query), group(key), group(value), scale=self.scaling
        )
        outputs.append(attended.transpose(1, 2).reshape(images * length, heads * head_dim))
    if not outputs:
        return self.proj(hidden_states.new_zeros(0, heads * head_dim))
    return self.proj(torch.cat(outputs) if len(outputs) > 1 else outputs[0])


def use_grouped_vision_attention(backbone: nn.Module) -> int:
    """Give the backbone's Qwen2-VL vision attention modules :func:`_grouped_vision_attention`
    (same weights, same results) unless a flash-attention kernel (already one call) serves
    them or they drop attention weights out. Returns how many were changed."""
    try:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention
    except ImportError:  # pragma: no cover - transformers without Qwen2-VL
        return 0
    import types

    changed = 0
    for module in backbone.modules():
        if (
            type(module) is VisionAttention
            and "flash" not in str(module.config._attn_implementation)
            and not module.attention_dropout
        ):
            module.forward = types.MethodType(_grouped_vision_attention, module)
            changed += 1
    return changed


QUICK_GELU_SCALE = 1.702


class SiLUQuickGELU(nn.Module):
    """transformers' ``QuickGELUActivation``, x * sigmoid(1.702 x), computed as
    silu(1.702 x) / 1.702 (the same function): one fused kernel forward and one backward
    instead of three elementwise passes and their gradients over the vision MLP's hidden
    states."""

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(states * QUICK_GELU_SCALE) * (1.0 / QUICK_GELU_SCALE)


def use_silu_quick_gelu(backbone: nn.Module) -> int:
    """Swap the backbone's ``QuickGELUActivation`` modules (Qwen2-VL's vision MLP) for
    :class:`SiLUQuickGELU`; returns how many were swapped."""
    try:
        from transformers.activations import QuickGELUActivation
    except ImportError:  # pragma: no cover - transformers without it
        return 0
    swapped = 0
    for module in backbone.modules():
        for name, child in module.named_children():
            if type(child) is QuickGELUActivation:
                setattr(module, name, SiLUQuickGELU())
                swapped += 1
    return swapped


def apply_moe(backbone: nn.Module, config: MoEConfig, hidden_size: int) -> list[MoEMLP]:
    """Replace the chosen layers' FFN by upcycled MoE FFNs; returns the MoE modules."""
    layers = decoder_layers(backbone)
    moe_layers = []
    for index in select_layers(config.layers, len(layers)):
        layer = layers[index]
        if isinstance(layer.mlp, MoEMLP):
            moe_layers.append(layer.mlp)
            continue
        layer.mlp = MoEMLP(
            layer.mlp, hidden_size, config.num_experts, config.top_k, config.upcycle_noise
        )
        moe_layers.append(layer.mlp)
    return moe_layers


def pool(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    input_ids: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    image_token_id: int | None = None,
) -> torch.Tensor:
    """mean: over real tokens; modality_mean: the mean of the image tokens' mean and the other
    tokens' mean (each modality weighs the same whatever its token count); last: the last
    real token; eos: the last EOS (else last)."""
    mask = mask.to(hidden.dtype)
    if mode == "modality_mean" and input_ids is not None and image_token_id is not None:
        is_image = (input_ids == image_token_id).to(hidden.dtype) * mask
        parts = [is_image, mask - is_image]
        pooled = torch.zeros(
            hidden.shape[0], hidden.shape[-1], dtype=hidden.dtype, device=hidden.device
        )
        present = torch.zeros(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
        for part in parts:
            count = part.sum(1, keepdim=True)
            pooled = pooled + (hidden * part.unsqueeze(-1)).sum(1) / count.clamp_min(1.0)
            present = present + (count > 0).to(hidden.dtype)
        return pooled / present.clamp_min(1.0)
    if mode in ("mean", "modality_mean"):
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    lengths = mask.sum(1).long().clamp_min(1)
    positions = lengths - 1
    if mode == "eos" and input_ids is not None and eos_token_id is not None:
        is_eos = (input_ids == eos_token_id) & mask.bool()
        index = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        last_eos = torch.where(is_eos, index, torch.full_like(index, -1)).max(1).values
        positions = torch.where(last_eos >= 0, last_eos, positions)
    elif mode not in ("last", "eos"):
        raise ValueError(f"unknown pooling {mode!r}")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]


class EmbeddingCenter(nn.Module):
    """Subtracts from each pooled vector the mean of its input modality (text, image,
    image+text): in training the batch's mean (gradients flow through it, as in batch norm;
    a modality with one row in the batch uses the running mean), at evaluation the running
    mean kept during training.

    A randomly initialised backbone puts each modality in its own narrow cone (pairwise cosine
    ~0.85 within a modality, ~0.5 across): at step 0 every text query is nearest to the few
    text-only products, the contrastive loss is far above chance (8-20 for 32 candidates),
    and the fastest way down is to collapse every embedding onto one direction, where training
    then sits at chance for hundreds of steps (measured: cosine 0.99 between any two inputs by
    step 30). A lagging running mean cannot undo a collapse that moves every vector at once;
    the batch mean can, so the embeddings stay spread from the first step.
    """

    def __init__(self, dim: int, modalities: int = 3, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(modalities, dim))
        self.register_buffer("updates", torch.zeros(modalities, dtype=torch.long))

    def forward(self, pooled: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return pooled - self.mean[modality].to(pooled.dtype)
        centred = pooled
        for kind in modality.unique().tolist():
            rows = modality == kind
            if int(rows.sum()) < 2:  # one row's mean is the row itself
                centred = torch.where(rows.unsqueeze(1), pooled - self.mean[kind], centred)
                continue
            batch_mean = pooled[rows].mean(0)
            centred = torch.where(rows.unsqueeze(1), pooled - batch_mean, centred)
            with torch.no_grad():
                if int(self.updates[kind]) == 0:
                    self.mean[kind] = batch_mean.detach().float()
                else:
                    self.mean[kind].mul_(self.momentum).add_(
                        batch_mean.detach().float(), alpha=1 - self.momentum
                    )
                self.updates[kind] += 1
        return centred


def distinct_images(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[int]:
    """For each image of a Qwen2-VL batch (its ``image_grid_thw`` row and its patches in
    ``pixel_values``), the index of the first image with the same grid and the same patches:
    a batch often holds one photo several times (a shopper photo as an image query and in the
    image+text query, a product photo as candidate and as intra-product image), and the vision
    tower need run once per distinct photo."""
    patches = image_grid_thw.prod(-1)
    owner = torch.repeat_interleave(torch.arange(len(patches), device=patches.device), patches)
    sums = torch.zeros(len(patches), dtype=torch.float64, device=pixel_values.device)
    sums.index_add_(0, owner.to(pixel_values.device), pixel_values.sum(-1, dtype=torch.float64))
    chunks = pixel_values.split(patches.tolist())
    grids = [tuple(row) for row in image_grid_thw.tolist()]
    seen: dict[tuple[Any, ...], list[int]] = {}
    first = []
    for index, key in enumerate(zip(grids, sums.tolist(), strict=True)):
        same = next((j for j in seen.get(key, []) if torch.equal(chunks[j], chunks[index])), None)
        if same is None:
            seen.setdefault(key, []).append(index)
            same = index
        first.append(same)
    return first


def vision_order(first: list[int], patches: list[int]) -> list[int]:
    """The distinct photos of :func:`distinct_images`' ``first`` in the order the vision tower
    takes them: by size (``patches`` per photo), so :func:`_grouped_vision_attention` attends
    all photos of one size in one call on a view of the states."""
    return sorted(set(first), key=lambda image: (patches[image], image))


def takes_encoder_outputs(backbone: nn.Module) -> bool:
    """True when ``backbone`` (or the model a PEFT wrapper holds) computes image features with
    ``get_image_features`` and accepts them precomputed (``mm_encoder_outputs``), as the
    transformers Qwen2-VL / Qwen2.5-VL models do."""
    import inspect

    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    if not hasattr(base, "get_image_features"):
        return False
    return "mm_encoder_outputs" in inspect.signature(base.forward).parameters


@contextlib.contextmanager
def one_token_lookup(embedding: nn.Module, input_ids: torch.Tensor) -> Iterator[None]:
    """While active, ``embedding`` looks its rows up in one table gathered for ``input_ids``
    (the whole batch), so several backbone calls on parts of the batch (length buckets) cost
    one lookup: its gradient is one dense vocabulary x hidden matrix, not one per call (three
    zero-filled 49k x 128 matrices and their sums; x1.045 tiny-cpu step speed). Only for a
    plain ``nn.Embedding`` (no ``max_norm``) that is being trained, while gradients are taken;
    anything else is left alone."""
    applies = (
        type(embedding) is nn.Embedding
        and embedding.max_norm is None
        and embedding.weight.requires_grad
        and torch.is_grad_enabled()
        and "forward" not in vars(embedding)
    )
    if not applies:
        yield
        return
    tokens = torch.unique(input_ids)
    table = embedding(tokens)

    def lookup(ids: torch.Tensor) -> torch.Tensor:
        return table[torch.searchsorted(tokens, ids.contiguous())]

    embedding.forward = lookup
    try:
        yield
    finally:
        del embedding.forward


@dataclass
class _LengthGroups:
    rows: list[list[int]]
    image_counts: list[int] | None


def merge_routings(parts: list[Routing], width: int, inverse: torch.Tensor) -> Routing:
    """One layer's routings of several row groups as one [B, width] routing in the batch's row
    order (``inverse``); positions past a group's own width count as padding (mask 0)."""

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(tensor, (0, 0, 0, width - tensor.shape[1]))

    masks = [
        torch.ones(p.probs.shape[:2], device=p.probs.device) if p.mask is None else p.mask
        for p in parts
    ]
    return Routing(
        probs=torch.cat([padded(p.probs) for p in parts]).index_select(0, inverse),
        gates=torch.cat([padded(p.gates) for p in parts]).index_select(0, inverse),
        chosen=torch.cat([padded(p.chosen) for p in parts]).index_select(0, inverse),
        mask=torch.cat([nn.functional.pad(m, (0, width - m.shape[1])) for m in masks]).index_select(
            0, inverse
        ),
    )


@dataclass
class Encoded:
    embeddings: torch.Tensor
    """[B, D] L2-normalised"""
    gates: torch.Tensor | None
    """[B, Z] per-sample mean routing weights (None without MoE)"""
    routings: list[Routing]

    def rows(self, start: int, end: int) -> Encoded:
        """The part of a batch encoding that belongs to rows [start, end)."""
        return Encoded(
            embeddings=self.embeddings[start:end],
            gates=None if self.gates is None else self.gates[start:end],
            routings=[
                Routing(
                    probs=r.probs[start:end],
                    gates=r.gates[start:end],
                    chosen=r.chosen[start:end],
                    mask=None if r.mask is None else r.mask[start:end],
                )
                for r in self.routings
            ],
        )


def template_prefix_tokens(processor: Any) -> int:
    """How many tokens every chat-formatted input starts with, whatever its content."""

    def ids(text: str) -> list[int]:
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": text}]}], tokenize=False
        )
        return processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    first, second = ids("alpha"), ids("zebra 9")
    common = 0
    while common < min(len(first), len(second)) and first[common] == second[common]:
        common += 1
    return common


def hidden_size_of(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


class Moon2Model(nn.Module):
    """Backbone (+ MoE) + pooling (+ projection) -> L2-normalised embeddings."""

    def __init__(
        self,
        backbone: nn.Module,
        model_config: ModelConfig,
        moe_config: MoEConfig,
        eos_token_id: int | None = None,
        prefix_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.prefix_tokens = prefix_tokens if model_config.pool_prefix == "skip" else 0
        self.model_config = model_config
        self.moe_config = moe_config
        self.eos_token_id = eos_token_id
        self.image_token_id = getattr(backbone.config, "image_token_id", None)
        vision = getattr(backbone.config, "vision_config", None)
        self.spatial_merge = getattr(vision, "spatial_merge_size", None)
        # Qwen2-VL's multimodal RoPE computed by mrope_positions (same positions, vectorised)
        self.mrope = (
            getattr(backbone.config, "model_type", None) == "qwen2_vl"
            and self.image_token_id is not None
            and self.spatial_merge is not None
        )
        # decided at the first encode: a LoRA wrapper is put around the backbone after this
        self._takes_features: bool | None = None
        hidden = hidden_size_of(backbone.config)
        use_patchwise_matmul(backbone)
        use_grouped_vision_attention(backbone)
        use_silu_quick_gelu(backbone)
        self.moe_layers = apply_moe(backbone, moe_config, hidden) if moe_config.enabled else []
        self.projection = (
            nn.Linear(hidden, model_config.projection_dim, bias=False)
            if model_config.projection_dim
            else None
        )
        self.embedding_dim = model_config.projection_dim or hidden
        self.center = EmbeddingCenter(self.embedding_dim) if model_config.center else None

    @classmethod
    def with_processor(
        cls, backbone: nn.Module, processor: Any, model_config: ModelConfig, moe_config: MoEConfig
    ) -> Moon2Model:
        """The model for ``backbone``, with EOS id and template prefix read off ``processor``."""
        return cls(
            backbone,
            model_config,
            moe_config,
            processor.tokenizer.eos_token_id,
            template_prefix_tokens(processor),
        )

    def encode(self, inputs: dict[str, torch.Tensor]) -> Encoded:
        inputs = dict(inputs)
        modality = inputs.pop(MODALITY_KEY, None)
        if self.mrope and "image_grid_thw" in inputs and POSITION_KEY not in inputs:
            inputs[POSITION_KEY] = mrope_positions(
                inputs["input_ids"],
                inputs["attention_mask"],
                inputs["image_grid_thw"],
                self.image_token_id,
                self.spatial_merge,
            )
        groups = self._length_groups(inputs)
        features = self._image_features(inputs)
        if groups is None:
            pooled, routings = self._pool_rows(inputs, features)
        else:
            with one_token_lookup(self.backbone.get_input_embeddings(), inputs["input_ids"]):
                parts = [
                    self._pool_rows(
                        take_rows(inputs, rows, groups.image_counts),
                        None
                        if features is None
                        else [features[i] for i in images_of_rows(groups.image_counts, rows)],
                    )
                    for rows in groups.rows
                ]
            order = torch.tensor(
                [r for rows in groups.rows for r in rows], device=inputs["attention_mask"].device
            )
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order), device=order.device)
            pooled = torch.cat([part[0] for part in parts]).index_select(0, inverse)
            width = inputs["attention_mask"].shape[1]
            routings = [
                merge_routings([part[1][layer] for part in parts], width, inverse)
                for layer in range(len(parts[0][1]))
            ]
        if self.projection is not None:
            pooled = self.projection(pooled)
        if self.center is not None:
            if modality is None:
                raise ValueError(f"centring needs the inputs' {MODALITY_KEY} (see build_inputs)")
            pooled = self.center(pooled, modality.to(pooled.device))
        embeddings = torch.nn.functional.normalize(pooled, dim=-1)
        gates = sample_gates(routings) if routings else None
        return Encoded(embeddings, gates, routings)

    def _image_features(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
        """Each image's vision-tower output (its decoder-token features), computed in one call
        for the whole batch and once per distinct photo (see :func:`distinct_images`); takes
        ``pixel_values`` out of ``inputs``. None (and ``inputs`` untouched) when the backbone
        cannot take precomputed image features."""
        if "pixel_values" not in inputs or "image_grid_thw" not in inputs:
            return None
        if self._takes_features is None:
            self._takes_features = takes_encoder_outputs(self.backbone)
        if not self._takes_features:
            return None
        pixel_values, grid = inputs.pop("pixel_values"), inputs["image_grid_thw"]
        first = distinct_images(pixel_values, grid)
        patches = grid.prod(-1).tolist()
        distinct = vision_order(first, patches)
        chunks = pixel_values.split(patches)
        outputs = self.backbone.get_image_features(
            torch.cat([chunks[i] for i in distinct]), grid[distinct], return_dict=True
        )
        computed = dict(zip(distinct, outputs.pooler_output, strict=True))
        return [computed[i] for i in first]

    def _pool_rows(
        self, inputs: dict[str, torch.Tensor], image_features: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[Routing]]:
        """One backbone call: pooled hidden states [B, H] (float32) and the MoE routings;
        ``image_features`` are the rows' images' vision-tower outputs when computed already."""
        mask = inputs["attention_mask"]
        for layer in self.moe_layers:
            layer.token_mask = mask
            layer.last_routing = None
        if image_features:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            vision = BaseModelOutputWithPooling(pooler_output=tuple(image_features))
            inputs = {**inputs, "mm_encoder_outputs": {"image": vision}}
        outputs = self.backbone(**inputs)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        pool_mask = mask
        if self.prefix_tokens:
            pool_mask = mask.clone()
            pool_mask[:, : self.prefix_tokens] = 0
        pooled = pool(
            hidden.float(),
            pool_mask,
            self.model_config.pooling,
            inputs.get("input_ids"),
            self.eos_token_id,
            self.image_token_id,
        )
        routings = [layer.last_routing for layer in self.moe_layers if layer.last_routing]
        for layer in self.moe_layers:
            layer.token_mask = None
            layer.last_routing = None
        return pooled, routings

    def _length_groups(self, inputs: dict[str, torch.Tensor]) -> _LengthGroups | None:
        """How to split ``inputs`` into calls by row length (None: one call)."""
        if self.model_config.length_buckets < 2 or not splittable(inputs):
            return None
        mask = inputs["attention_mask"]
        lengths = mask.sum(-1)
        positions = torch.arange(mask.shape[1], device=mask.device)
        if not torch.equal(mask.bool(), positions < lengths.unsqueeze(1)):
            return None  # not right-padded: trimming columns would cut real tokens
        image_counts = None
        if "image_grid_thw" in inputs:
            if (
                self.image_token_id is None
                or self.spatial_merge is None
                or "input_ids" not in inputs
            ):
                return None
            image_counts = images_per_row(
                inputs["input_ids"],
                inputs["image_grid_thw"],
                self.image_token_id,
                self.spatial_merge,
            )
        rows = length_buckets.plan_buckets(
            lengths.tolist(),
            self.model_config.length_buckets,
            length_buckets.CALL_COST_TOKENS,
        )
        if len(rows) < 2:
            return None
        return _LengthGroups(rows, image_counts)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encode(inputs).embeddings


# --- building the backbone ---------------------------------------------------------------


def build_backbone(config: ModelConfig, seed: int) -> tuple[nn.Module, Any]:
    """(backbone, processor) for ``config.backbone``: 'tiny', a hub id or a local path."""
    with quiet_loading():
        if config.backbone == "tiny":
            from transformers import Qwen2VLModel

            from moon2.models.offline import (
                VISION_TOKENS,
                tiny_qwen2vl_config,
                tiny_qwen2vl_processor,
            )

            processor = tiny_qwen2vl_processor(
                patch_size=config.tiny.vision_patch, merge_size=config.tiny.spatial_merge
            )
            tokenizer = processor.tokenizer
            special = dict(
                zip(
                    VISION_TOKENS, tokenizer.convert_tokens_to_ids(list(VISION_TOKENS)), strict=True
                )
            )
            special.update(
                bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id
            )
            backbone_config = tiny_qwen2vl_config(
                len(tokenizer),
                special,
                config.tiny.hidden_size,
                config.tiny.layers,
                config.tiny.vision_depth,
                config.tiny.vision_width,
                config.tiny.vision_patch,
                config.tiny.spatial_merge,
                config.tiny.vision_heads,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                backbone = Qwen2VLModel(backbone_config)
            if config.tiny.init_token_embeddings == "smollm2":
                _init_from_smollm2(backbone, config.tiny.hidden_size)
        else:
            from transformers import AutoModel, AutoProcessor

            try:
                processor = AutoProcessor.from_pretrained(
                    config.backbone, trust_remote_code=config.trust_remote_code
                )
                backbone = AutoModel.from_pretrained(
                    config.backbone,
                    trust_remote_code=config.trust_remote_code,
                    torch_dtype=torch.float32,
                )
            except OSError as exc:
                raise InputError(
                    f"cannot load the backbone {config.backbone!r}: {exc}. Offline, give a "
                    "local directory (config.json, weights, processor files)."
                ) from None
    configure_processor(processor, config.image_min_pixels, config.image_max_pixels)
    return backbone, processor


def _init_from_smollm2(backbone: nn.Module, hidden_size: int) -> None:
    from moon2.models.offline import smollm2_token_embeddings

    pretrained = smollm2_token_embeddings(hidden_size)
    embedding = backbone.get_input_embeddings()
    with torch.no_grad():
        scale = embedding.weight.std() / pretrained.std()  # keep the init's overall scale
        embedding.weight[: len(pretrained)] = pretrained * scale


# --- saving and loading -------------------------------------------------------------------


def save_model(
    model: Moon2Model,
    processor: Any,
    out_dir: str | os.PathLike[str],
    max_images: int | None = None,
) -> Path:
    """Write a self-contained, pickle-free model directory.

    ``max_images``: product images per input the model was trained with; encoders built from
    the directory feed it no more than that (more images than it ever saw shift its inputs).
    """
    from safetensors.torch import save_model as save_safetensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.backbone.config.save_pretrained(out)
    processor.save_pretrained(out)
    save_safetensors(model, str(out / "model.safetensors"))
    meta = {
        "format_version": FORMAT_VERSION,
        "model": model.model_config.model_dump(mode="json"),
        "moe": model.moe_config.model_dump(mode="json"),
        "embedding_dim": model.embedding_dim,
        "eos_token_id": model.eos_token_id,
        "prefix_tokens": model.prefix_tokens,
        "max_images": max_images,
        "backbone_class": type(model.backbone).__name__,
    }
    (out / MARKER).write_text(json.dumps(meta, indent=2))
    return out


def _lenient(cls: Any, data: dict[str, Any], root: Path) -> Any:
    """Validate a saved config section, ignoring training-only keys of other moon2 versions."""
    from pydantic import ValidationError

    known = {k: v for k, v in data.items() if k in cls.model_fields}
    try:
        return cls.model_validate(known)
    except ValidationError as exc:
        raise InputError(f"{root}/{MARKER} has an invalid {cls.__name__}: {exc}") from None


def load_moon2_model(
    path: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[Moon2Model, Any, dict[str, Any]]:
    """(model, processor, metadata) from a directory written by :func:`save_model`."""
    from safetensors.torch import load_model as load_safetensors
    from transformers import AutoConfig, AutoModel, AutoProcessor

    root = Path(path)
    meta_path = root / MARKER
    if not meta_path.exists():
        raise InputError(f"{root} is not a moon2 model directory (no {MARKER})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{root}: unsupported moon2 model format {meta.get('format_version')}")
    model_config = _lenient(ModelConfig, meta["model"], root)
    moe_config = _lenient(MoEConfig, meta["moe"], root)
    with quiet_loading():
        config = AutoConfig.from_pretrained(root, trust_remote_code=model_config.trust_remote_code)
        backbone = AutoModel.from_config(config, trust_remote_code=model_config.trust_remote_code)
        processor = AutoProcessor.from_pretrained(
            root, trust_remote_code=model_config.trust_remote_code
        )
    configure_processor(processor, model_config.image_min_pixels, model_config.image_max_pixels)
    model = Moon2Model(
        backbone, model_config, moe_config, meta.get("eos_token_id"), meta.get("prefix_tokens", 0)
    )
    missing, unexpected = load_safetensors(model, str(root / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise InputError(
            f"{root}/model.safetensors does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device).eval(), processor, meta


class Moon2Encoder(Encoder):
    """A trained moon2 model behind the evaluation :class:`Encoder` interface."""

    def __init__(
        self,
        model: Moon2Model,
        processor: Any,
        device: torch.device,
        name: str = "moon2",
        max_images: int | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.name = name
        self.max_images = max_images

    @property
    def dim(self) -> int:
        return self.model.embedding_dim

    @torch.inference_mode()
    def encode(self, items: Sequence[EncodeItem]) -> np.ndarray:
        out = np.zeros((len(items), self.dim), np.float32)
        rows = [i for i, item in enumerate(items) if item.text or item.images]
        if not rows:
            return out
        chosen = [items[i] for i in rows]
        if self.max_images:
            chosen = [
                EncodeItem(text=item.text, images=list(item.images[: self.max_images]))
                for item in chosen
            ]
        inputs = build_inputs(self.processor, chosen, self.model.model_config.max_text_tokens)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        out[rows] = self.model.encode(inputs).embeddings.float().cpu().numpy()
        return out


def load_model(path: str | os.PathLike[str], device: torch.device | str = "auto") -> Moon2Encoder:
    """Load a finished moon2 model (``OUT/final``) as an encoder: ``.encode(items)``."""
    torch_device = resolve_device(device) if isinstance(device, str) else device
    model, processor, meta = load_moon2_model(path, torch_device)
    return Moon2Encoder(
        model,
        processor,
        torch_device,
        name=f"moon2:{Path(path)}",
        max_images=meta.get("max_images"),
    )
