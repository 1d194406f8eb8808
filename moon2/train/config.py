"""Configuration of ``moon2 train`` (one YAML per recipe under ``configs/train/``)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from moon2.config import Config
from moon2.errors import ConfigError

OBJECTIVES: tuple[str, ...] = ("t2mm", "i2mm", "mm2mm", "intra")
"""Training objectives: three inter-product query views and the intra-product alignment."""


class TinyBackboneConfig(Config):
    """Size of the random-init Qwen2-VL built from a config (the CPU default backbone)."""

    hidden_size: int = Field(128, ge=32, description="Decoder hidden size.")
    layers: int = Field(2, ge=1, description="Decoder layers.")
    vision_depth: int = Field(2, ge=1, description="Vision transformer blocks.")
    vision_width: int = Field(
        64,
        ge=16,
        multiple_of=16,
        description="Vision transformer width. 48 made the step ~20% cheaper but lost i2mm "
        "(R@10 59.0 at 9 epochs, 60.7 at 10, seed 0, against 64.3 at 64).",
    )
    vision_heads: int = Field(
        2,
        ge=1,
        description="Vision attention heads; each head's width (vision_width / heads) must be "
        "a multiple of 4. 2 heads of 32 instead of 4 of 16: the same parameters, and CPU "
        "attention kernels run wider heads faster (the step ~6% faster; i2mm R@10 64.3 vs "
        "63.5 on seed 0).",
    )
    vision_patch: int = Field(
        7,
        ge=2,
        description="Pixel side of one vision patch (Qwen2-VL: 14). Smaller patches give the "
        "vision tower a finer grid at the same resolution, at the cost of more vision tokens. "
        "7 with spatial_merge 4 keeps Qwen2-VL's 28-px decoder token (16 per 112-px photo) on "
        "a 4x finer grid: on the synthetic benchmark i2mm R@10 went from 51.6-55.7 (14 / 2, three "
        "seeds) to 57.0-65.2 at 9 epochs (two seeds), at ~1.6x the step's compute.",
    )
    spatial_merge: int = Field(
        4,
        ge=1,
        description="Patches merged per side into one decoder token (Qwen2-VL: 2).",
    )
    init_token_embeddings: Literal["smollm2", "random"] = Field(
        "smollm2",
        description="smollm2: token embeddings start as a PCA of SmolLM2-135M's (same "
        "tokenizer), so related words start close; random: the usual random init.",
    )

    @model_validator(mode="after")
    def _check_vision_heads(self) -> TinyBackboneConfig:
        heads = self.vision_heads
        if self.vision_width % heads or (self.vision_width // heads) % 4:
            raise ValueError(
                f"model.tiny.vision_width {self.vision_width} does not split into {heads} "
                "vision heads whose width is a multiple of 4 (each head's 2-D rotary embedding "
                "needs it)"
            )
        return self


class LoraConfig(Config):
    """LoRA adapters on the backbone (peft), for large models."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of the full backbone.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Adapter scaling numerator.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Adapter dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that get adapters (MoE experts and router train fully).",
    )


class ModelConfig(Config):
    """The backbone and how an embedding is read from it."""

    backbone: str = Field(
        "tiny",
        description="'tiny' (a Qwen2-VL built from tiny_* below, random init, SmolLM2 "
        "tokenizer), or a Hugging Face hub id / local path of a vision-language model "
        "(Qwen2-VL / Qwen2.5-VL family first).",
    )
    tiny: TinyBackboneConfig = Field(default_factory=TinyBackboneConfig)
    pooling: Literal["mean", "modality_mean", "last", "eos"] = Field(
        "mean",
        description="mean of last hidden states (paper); modality_mean: the mean of the image "
        "tokens' mean and the text tokens' mean, so an image weighs as much as a long title; "
        "the last real token; or EOS.",
    )
    pool_prefix: Literal["skip", "include"] = Field(
        "skip",
        description="skip: leave the chat template's fixed opening tokens (identical for "
        "every input; under causal attention their states never depend on the input) out of "
        "the pooling; include: pool over literally all tokens.",
    )
    projection_dim: int | None = Field(
        None, ge=8, description="Optional linear projection of the pooled state."
    )
    center: bool = Field(
        True,
        description="Subtract from each pooled vector the mean of its modality (text, image, "
        "image+text) before normalising: the batch's mean in training, a running mean (kept "
        "with the model) at evaluation. A random-init backbone puts each modality in its own "
        "narrow cone, which collapses the embeddings and stalls training at the start.",
    )
    max_text_tokens: int = Field(48, ge=8, description="Text truncation (tokens).")
    image_min_pixels: int = Field(56 * 56, ge=28 * 28, description="Processor min_pixels.")
    image_max_pixels: int = Field(
        112 * 112,
        ge=28 * 28,
        description="Processor max_pixels: the image is resized to fit; decoder tokens per "
        "image = pixels / (patch * merge)^2.",
    )
    length_buckets: int = Field(
        3,
        ge=1,
        description="Encode a batch's rows in up to this many backbone calls grouped by token "
        "length, so short rows (an image-only query, a short text) are not padded to the "
        "longest product row; same embeddings up to float rounding (1: one call).",
    )
    freeze_token_embeddings: bool = Field(
        False,
        description="Keep the input token embeddings fixed. On the tiny backbone they are most "
        "of the parameters (6.3M of 7.1M) and their dense gradient and AdamW update cost ~12% of "
        "a CPU step, but frozen (SmolLM2-initialised) embeddings halved text retrieval there "
        "(t2mm R@10 27.5 vs 56 at 8 epochs).",
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 is slow on CPUs)."
    )
    trust_remote_code: bool = Field(False, description="Allow hub model code to run.")
    lora: LoraConfig = Field(default_factory=LoraConfig)


class MoEConfig(Config):
    """Modality-driven MoE replacing decoder FFNs."""

    enabled: bool = Field(True, description="false = the dense model (ablation 'w/o MoE').")
    num_experts: int = Field(4, ge=2, description="Experts Z per MoE layer.")
    top_k: int = Field(2, ge=1, description="Experts per token.")
    layers: str = Field(
        "last:1", description="Which decoder layers: 'all', 'last:N', or comma-separated indices."
    )
    upcycle_noise: float = Field(
        0.0, ge=0, description="Std of noise added to the expert copies (0 = exact copies)."
    )
    rho: float = Field(0.01, ge=0, description="Weight of the load-balancing loss L_aux.")
    varsigma: float = Field(0.01, ge=0, description="Weight of the specialisation loss.")
    objective_weighting: Literal["balance", "paper", "off"] = Field(
        "balance",
        description="How omega_m (from W* and routing) weights the objectives. balance "
        "(moon2's choice): the model sees omega as constants and W* ascends the weighted loss, "
        "so harder objectives get more weight; paper: omega with its full gradient, which in "
        "our runs shifts the weight onto the easiest objective; off: every weight 1.",
    )
    normalize_omega: bool = Field(
        True, description="Rescale omega to sum to the number of objectives in the batch."
    )
    omega_floor: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Bounds omega around the uniform weight: each weight is mixed with the "
        "batch's mean weight, so it stays within [floor, M - (M - 1) x floor] times that mean "
        "for M objectives present ([0.5, 2.5] for the four at 0.5), whatever W* learns. "
        "Unbounded (0), 1,500 Adam steps on fixed losses drove omega to 3.24 on one objective "
        "and 0.20-0.34 on the others; 1: every weight 1.",
    )
    loss_scale: Literal["chance", "raw"] = Field(
        "chance",
        description="The losses W* compares: chance: each objective's loss divided by that of "
        "a uniform guess, log(number of candidates) (the tiny recipe: ~32 columns for the "
        "inter-product views, 16 for intra; the GPU one on 8 GPUs: ~128 and 4), so more columns "
        "is not 'harder'; raw: the InfoNCE values. Steers W* only (and the router under paper); "
        "the model's loss is unchanged.",
    )
    wstar_lr: float = Field(
        3e-3,
        gt=0,
        description="Peak learning rate of W* (its own AdamW group, no weight decay, the same "
        "warm-up and cosine schedule as optim.lr). Adam moves W* by about this much per update, "
        "so wstar_lr x updates of ~4 lets a steady preference cross most of omega's band within "
        "the run: on fixed losses the tiny recipe's ~1,500 updates reach 2.26 of the 2.5 "
        "ceiling at 3e-3 (1.39 at its optim.lr, 1e-3); the GPU recipe's ~4,000 updates 2.21 "
        "at 1e-3 (at its optim.lr, 1e-5, W* moved 0.04: omega ~1 in any mode).",
    )

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError("top_k must not exceed num_experts")
        return self


class LossConfig(Config):
    """Contrastive objectives."""

    intra: bool = Field(
        True, description="Intra-product image<->text alignment (false: 'w/o dual-level')."
    )
    intra_products: Literal["positives", "all"] = Field(
        "positives",
        description="Products aligned by the intra loss: the batch's positives, or every "
        "candidate (negatives too; about twice the cost).",
    )
    temperature: float = Field(
        0.1,
        gt=0,
        description="Inter-product InfoNCE temperature (its start when learnable). At 0.1 the "
        "tiny random-init model's first steps are calmer than at 0.05; final scores were alike.",
    )
    intra_temperature: float = Field(0.1, gt=0, description="Intra-product temperature.")
    learnable_temperature: bool = Field(True, description="Learn both temperatures.")
    in_batch_negatives: bool = Field(
        True, description="Every other candidate of the (global) batch is also a negative."
    )
    mask_duplicates: bool = Field(
        True,
        description="Products build-bench counts as the same item (the same normalised title "
        "of at least 3 words, or an image with the same bytes or path; a title or image shared "
        "by more than 50 products is a placeholder and marks nothing) are never each other's "
        "negatives, in the inter and the intra loss (false: only copies of the same product_id "
        "are kept apart).",
    )


class DataConfig(Config):
    """Triplets and what goes into each encoder input."""

    use_augmented: bool = Field(
        True,
        description="Append aug_title / aug_images to candidates when the catalog has them "
        "(false: 'w/o co-augmentation').",
    )
    max_negatives: int = Field(1, ge=0, description="Given negatives per query (of negative_ids).")
    max_images: int = Field(1, ge=1, description="Product images per candidate (main first).")
    max_aug_images: int = Field(1, ge=0, description="Expanded images appended per candidate.")
    intra_image: Literal["main", "any"] = Field(
        "any",
        description="Image the intra-product loss pairs with the title: the main image, or any "
        "of the product's images (drawn per epoch, seeded) so alignment sees every view.",
    )
    view_augmentation: Literal["none", "catalog", "all"] = Field(
        "none",
        description="Train on random views drawn per epoch and seeded (mirror, scale, shift, "
        "rotation, brightness, blur, a new background behind a plain-background photo; never a "
        "colour change): of catalog images (candidates and the intra image), of those and query "
        "photos (all), or none (default: at the tiny-cpu budget it slowed learning).",
    )
    view_background: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Chance that a random view puts a new background behind a plain-background "
        "photo (0: geometry, light and focus change only).",
    )
    catalog_queries: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Chance that a sample also gets an image query made from its positive's "
        "own catalog photos (one of the non-main photos when it has any, else the main one, as "
        "a random view drawn per epoch): image->product pairs for every product, not only those "
        "a shopper photographed. They join the i2mm loss with weight 1 and stay out of the "
        "dynamic filter's scores (they say nothing about the query's reliability). On the "
        "synthetic benchmark i2mm R@10 went from 34-35 (8 epochs without) to 42-48 (7 epochs "
        "with; two and three seeds). 0: the query log only.",
    )
    num_workers: int = Field(
        1,
        ge=0,
        description="DataLoader worker processes; they live for the whole run, so each keeps "
        "its decoded photos (see image_cache_mb) from one epoch to the next.",
    )
    image_cache_mb: int = Field(
        1024,
        ge=0,
        description="Decoded photos (and their mattes) each data worker keeps, in MiB of pixels, "
        "least recently used dropped first (0: decode every time). 1,024 MiB holds ~20,000 "
        "decoded 128-px or ~1,400 decoded 512-px photos.",
    )
    pixel_cache_mb: int = Field(
        2048,
        ge=0,
        description="The processor's output (resized, normalised patches) of each photo "
        "seen twice, kept per data worker in MiB, least recently used dropped first (0: "
        "process every photo every time). A photo costs 4 bytes per pixel per channel at the "
        "processed size: ~150 KiB at the tiny-cpu 112 px, so 2,048 MiB holds ~14,000; random "
        "views are never kept. On the tiny-cpu recipe the data worker was x1.13-1.18 faster "
        "with it (perf/bench_train.py); the worker's time adds to the training step's on 2 "
        "cores.",
    )


class FilterConfig(Config):
    """Dynamic sample filtering (scores every sample every epoch)."""

    enabled: bool = Field(True, description="false: 'w/o dynamic filtering' (scores still kept).")
    policy: Literal["margin_weighting", "loss_prune", "none"] = Field(
        "margin_weighting",
        description="margin_weighting: after the warm-up, phi < tau down-weighted (paper); "
        "loss_prune: after the warm-up, the highest-loss fraction is dropped for the next epoch "
        "and re-scored (in the epoch where the warm-up ends, samples whose loss is above that "
        "fraction of the epoch's warm-up part get weight 0, so a 1-epoch run prunes too); none.",
    )
    kappa: float = Field(10.0, gt=0, description="Sharpness of phi = sigmoid(kappa (m - m_bar)).")
    tau: float = Field(0.6, gt=0, lt=1, description="Reliability threshold.")
    m_bar_start: float = Field(0.05, description="Margin expected of a reliable triplet, early.")
    m_bar_end: float = Field(-0.05, description="... and at the end (m_bar decays linearly).")
    low_weight: Literal["phi", "zero"] = Field(
        "phi", description="Weight of an unreliable triplet: its phi, or zero."
    )
    prune_fraction: float = Field(0.1, ge=0, lt=1, description="loss_prune: share dropped.")
    warmup: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Share of the run's optimizer updates (0-1, of min(epochs x updates per "
        "epoch, max_steps)) before the filter acts: 0.2 = from the first update after 20% of "
        "the run, whatever its length (1: never acts). Replaces warmup_epochs.",
    )

    def first_update(self, total_updates: int) -> int:
        """The first update (0-based) at which the filter acts in a run of ``total_updates``
        (``total_updates`` or more: never)."""
        return math.ceil((self.warmup - WARMUP_EPS) * total_updates)

    def active(self, progress: float) -> bool:
        """Whether the warm-up is over at training progress ``update / total_updates``."""
        return progress >= self.warmup - WARMUP_EPS


WARMUP_EPS = 1e-9
"""Slack so that 0.3 x 10 updates is 3 (not 4) in float arithmetic."""


class OptimConfig(Config):
    """Optimisation."""

    epochs: int = Field(9, ge=1, description="Passes over the training queries.")
    batch_size: int = Field(16, ge=2, description="Queries per step per process.")
    grad_accum: int = Field(1, ge=1, description="Steps accumulated per optimizer update.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of updates spent warming up.")
    clip_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clipping.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many updates.")

    def planned_updates(self, queries: int, world: int = 1) -> int:
        """Optimizer updates of a run on ``queries`` usable training queries and ``world``
        processes: whole global batches per epoch, times epochs, capped by max_steps."""
        steps_per_epoch = queries // (self.batch_size * world)
        total = max(1, steps_per_epoch // self.grad_accum) * self.epochs
        return min(total, self.max_steps) if self.max_steps else total


class CheckpointConfig(Config):
    """Checkpoints for resuming."""

    every_steps: int = Field(200, ge=1, description="Save a checkpoint every N updates.")
    keep: int = Field(2, ge=1, description="Checkpoints kept (older ones are deleted).")


class TrainConfig(Config):
    """``moon2 train``: the MOON2.0 trainer. The defaults are the ``tiny-cpu`` recipe."""

    seed: int = Field(0, ge=0, description="Seed of initialisation, data order and dropout.")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log_every: int = Field(10, ge=1, description="Write metrics.jsonl every N updates.")

    @model_validator(mode="before")
    @classmethod
    def _refuse_warmup_epochs(cls, data: Any) -> Any:
        """filter.warmup_epochs (before issue #22) meant a count of epochs, which a shorter
        run (--epochs, --max-steps) silently never reached: refused with its replacement."""
        section = data.get("filter") if isinstance(data, dict) else None
        if not isinstance(section, dict) or "warmup_epochs" not in section:
            return data
        value = section["warmup_epochs"]
        optim = data.get("optim")
        epochs = optim.get("epochs") if isinstance(optim, dict) else None
        epochs = OptimConfig().epochs if epochs is None else epochs
        hint = "e.g. 'warmup: 0.2'"
        if isinstance(value, (int, float)) and isinstance(epochs, int) and epochs > 0:
            hint = f"'warmup: {min(1.0, value / epochs):.2f}' for {value} of {epochs} epochs"
        raise ConfigError(
            "filter.warmup_epochs is replaced by filter.warmup, the share of the run's updates "
            f"before the filter acts (0-1): write {hint}"
        )
