"""The diffusers image engine on tiny random-weight pipelines built offline from configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageChops

pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from moon2.augment.config import DiffusersConfig, ImageConfig  # noqa: E402
from moon2.augment.diffusion import (  # noqa: E402
    DiffusersImageEngine,
    background_mask,
    derive_seed,
    kind_of_class,
    ring_mask,
)
from moon2.augment.images import EditedImage, ImageRequest, load_image_engine  # noqa: E402
from moon2.errors import ConfigError  # noqa: E402

SIDE = 32  # model resolution of every test


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet (256 printable stand-ins for the bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _tiny_tokenizer(directory: Path) -> object:
    """A CLIP tokenizer with a byte-level vocabulary and no merges (one token per character)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True)
    vocab = {token: i for i, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=32)


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny pipelines: img2img, instruct-pix2pix (8-channel UNet), inpaint (9-channel)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("tiny_diffusers")
    tokenizer = _tiny_tokenizer(root / "tokenizer_src")
    vocab = tokenizer.get_vocab()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            projection_dim=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIDE,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )

    def unet(in_channels: int) -> UNet2DConditionModel:
        return UNet2DConditionModel(
            sample_size=SIDE // 2,
            in_channels=in_channels,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=2,
            norm_num_groups=8,
        )

    shared = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    kinds = {
        "img2img": (StableDiffusionImg2ImgPipeline, 4),
        "instruct_pix2pix": (StableDiffusionInstructPix2PixPipeline, 8),
        "inpaint": (StableDiffusionInpaintPipeline, 9),
    }
    paths = {}
    for kind, (pipeline_class, channels) in kinds.items():
        paths[kind] = root / kind
        pipeline_class(unet=unet(channels), **shared).save_pretrained(str(paths[kind]))
    return paths


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine they only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(path: Path, **changes: object) -> DiffusersConfig:
    values = {
        "model": str(path),
        "steps": 2,
        "size": SIDE,
        "device": "cpu",
        "variant_prompts": ["{title} on a table", "{title} outdoors", "{title} close up"],
    }
    values.update(changes)
    return DiffusersConfig(**values)


@pytest.fixture(scope="module")
def img2img(tiny_pipelines: dict[str, Path]) -> DiffusersImageEngine:
    return DiffusersImageEngine(_config(tiny_pipelines["img2img"]))


def _product_photo(size: tuple[int, int] = (40, 24)) -> Image.Image:
    """A red box on a white background (a plain-background product photo)."""
    image = Image.new("RGB", size, (255, 255, 255))
    width, height = size
    image.paste((200, 30, 30), (width // 3, height // 4, 2 * width // 3, 3 * height // 4))
    return image


def _noisy_photo(size: tuple[int, int] = (36, 36)) -> Image.Image:
    """A photo whose frame is not plain (no matte can be found)."""
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and ImageChops.difference(a, b).getbbox() is None


REQUEST = ImageRequest(key="p1", title="red mug", seed=11)


def test_loads_local_directory_and_detects_kind(
    img2img: DiffusersImageEngine, tiny_pipelines: dict[str, Path]
) -> None:
    assert img2img.kind == "img2img"
    assert img2img.name == f"diffusers:{tiny_pipelines['img2img']}"
    assert img2img.device == "cpu"
    assert next(img2img.pipe.unet.parameters()).dtype == torch.float32
    assert kind_of_class("StableDiffusionXLInstructPix2PixPipeline") == "instruct_pix2pix"
    assert kind_of_class("StableDiffusionInpaintPipeline") == "inpaint"
    assert kind_of_class("StableDiffusionPipeline") == "img2img"


def test_load_image_engine_builds_the_diffusers_engine(tiny_pipelines: dict[str, Path]) -> None:
    config = ImageConfig(engine="diffusers", diffusers=_config(tiny_pipelines["img2img"]))
    engine = load_image_engine(config)
    assert isinstance(engine, DiffusersImageEngine)


def test_clean_is_seeded_and_keeps_the_input_size(img2img: DiffusersImageEngine) -> None:
    photo = _product_photo()
    first = img2img.clean(photo, REQUEST)
    again = img2img.clean(photo, REQUEST)
    other = img2img.clean(photo, ImageRequest("p1", "red mug", seed=12))
    assert first.ops == ["diffusers_clean"]
    assert first.alpha is None
    assert first.image.size == photo.size and first.image.mode == "RGB"
    assert _same(first.image, again.image)
    assert not _same(first.image, other.image)


def test_variants_are_seeded_distinct_and_counted(img2img: DiffusersImageEngine) -> None:
    clean = EditedImage(_product_photo((30, 44)), ["diffusers_clean"])
    views = img2img.variants(clean, REQUEST, count=3)
    assert len(views) == 3
    assert [v.ops for v in views] == [
        ["diffusers_variant", "prompt0"],
        ["diffusers_variant", "prompt1"],
        ["diffusers_variant", "prompt2"],
    ]
    assert all(v.image.size == (30, 44) for v in views)
    assert not _same(views[0].image, views[1].image)
    repeat = img2img.variants(clean, REQUEST, count=3)
    assert all(_same(a.image, b.image) for a, b in zip(views, repeat, strict=True))
    retry = img2img.variants(clean, REQUEST, count=4, attempt=1)
    assert [v.ops[1] for v in retry] == ["prompt1", "prompt2", "prompt0", "prompt1"]
    assert not any(_same(a.image, b.image) for a, b in zip(views, retry, strict=False))
    assert img2img.variants(clean, REQUEST, count=0) == []


def test_variants_split_into_calls_of_max_batch(tiny_pipelines: dict[str, Path]) -> None:
    engine = DiffusersImageEngine(_config(tiny_pipelines["img2img"]))
    engine.max_batch = 2
    views = engine.variants(EditedImage(_product_photo(), []), REQUEST, count=3)
    assert len(views) == 3
    assert [v.ops[1] for v in views] == ["prompt0", "prompt1", "prompt2"]


def test_low_strength_still_runs_a_step(img2img: DiffusersImageEngine) -> None:
    assert img2img._steps(0.3) == 4  # 2 configured steps x 0.3 would run none
    assert img2img._steps(0.5) == 2


def test_seeds_depend_on_every_part() -> None:
    seeds = {
        derive_seed(REQUEST, "clean"),
        derive_seed(REQUEST, "variant", 0, 0),
        derive_seed(REQUEST, "variant", 1, 0),
        derive_seed(REQUEST, "variant", 0, 1),
        derive_seed(ImageRequest("p2", "red mug", 11), "clean"),
    }
    assert len(seeds) == 5
    assert all(0 <= s < 2**63 for s in seeds)


def test_instruct_pix2pix(tiny_pipelines: dict[str, Path]) -> None:
    engine = DiffusersImageEngine(_config(tiny_pipelines["instruct_pix2pix"]))
    assert engine.kind == "instruct_pix2pix"
    photo = _product_photo()
    clean = engine.clean(photo, REQUEST)
    assert clean.image.size == photo.size
    assert _same(clean.image, engine.clean(photo, REQUEST).image)
    views = engine.variants(clean, REQUEST, count=2)
    assert [v.image.size for v in views] == [photo.size] * 2
    assert not _same(views[0].image, views[1].image)


def test_inpaint_repaints_the_background_only(tiny_pipelines: dict[str, Path]) -> None:
    engine = DiffusersImageEngine(_config(tiny_pipelines["inpaint"]))
    assert engine.kind == "inpaint"
    photo = _product_photo()
    clean = engine.clean(photo, REQUEST)
    assert clean.ops == ["diffusers_clean", "inpaint_background"]
    assert clean.alpha is not None and clean.alpha.size == photo.size
    # the product's core pixels are the original ones
    assert clean.image.getpixel((20, 12)) == photo.getpixel((20, 12))
    assert not _same(clean.image, photo)
    views = engine.variants(clean, REQUEST, count=2)
    assert [v.ops[-1] for v in views] == ["inpaint_background"] * 2
    noisy = engine.clean(_noisy_photo(), REQUEST)
    assert noisy.ops == ["diffusers_clean", "inpaint_border"] and noisy.alpha is None


def test_inpaint_with_a_plain_unet(tiny_pipelines: dict[str, Path]) -> None:
    """pipeline: inpaint on an img2img checkpoint (4-channel UNet, legacy latent blending)."""
    engine = DiffusersImageEngine(_config(tiny_pipelines["img2img"], pipeline="inpaint"))
    assert engine.kind == "inpaint"
    views = engine.variants(EditedImage(_product_photo(), []), REQUEST, count=2)
    assert [v.image.size for v in views] == [(40, 24)] * 2


def test_masks() -> None:
    mask, matte = background_mask(_product_photo())
    assert matte is not None
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((20, 12)) == 0
    mask, matte = background_mask(_noisy_photo())
    assert matte is None and _same(mask, ring_mask((36, 36)))
    ring = ring_mask((32, 16))
    assert ring.getpixel((0, 0)) == 255 and ring.getpixel((16, 8)) == 0


def test_safety_checker_requirement_is_dropped(
    tiny_pipelines: dict[str, Path], tmp_path: Path
) -> None:
    """A pipeline that lists a safety checker it does not ship still loads."""
    path = tmp_path / "with_checker"
    shutil.copytree(tiny_pipelines["img2img"], path)
    index = json.loads((path / "model_index.json").read_text())
    index.update(
        requires_safety_checker=True,
        safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
    )
    (path / "model_index.json").write_text(json.dumps(index))
    engine = DiffusersImageEngine(_config(path))
    assert getattr(engine.pipe, "safety_checker", None) is None


def test_errors_name_the_model(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match="missing"):
        DiffusersImageEngine(_config(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no model_index\.json"):
        DiffusersImageEngine(_config(empty))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipelines["img2img"], broken)
    (broken / "unet" / "config.json").unlink()
    with pytest.raises(ConfigError, match="broken"):
        DiffusersImageEngine(_config(broken))
    with pytest.raises(ConfigError, match="not an instruct-pix2pix model"):
        DiffusersImageEngine(_config(tiny_pipelines["img2img"], pipeline="instruct_pix2pix"))
    with pytest.raises(ConfigError, match="not set"):
        DiffusersImageEngine(DiffusersConfig())
