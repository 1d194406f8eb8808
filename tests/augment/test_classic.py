"""The classic image engine, the background model and the histogram consistency score."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from moon2.augment.config import ConsistencyConfig
from moon2.augment.consistency import HistogramScorer, histogram_similarity, load_scorer
from moon2.augment.images import ClassicImageEngine, EditedImage, ImageRequest
from moon2.data.images import background_model, product_matte
from moon2.errors import ConfigError


def product_photo(
    background: str = "plain", colour: tuple[int, int, int] = (200, 40, 40), size: int = 96
) -> Image.Image:
    if background == "plain":
        image = Image.new("RGB", (size, size), (246, 246, 246))
    elif background == "gradient":
        top = Image.new("RGB", (size, size), (236, 236, 238))
        mask = Image.linear_gradient("L").resize((size, size))
        image = Image.composite(Image.new("RGB", (size, size), (190, 192, 200)), top, mask)
    else:  # a lifestyle scene: coloured blocks across the frame
        image = Image.new("RGB", (size, size), (90, 140, 60))
        draw = ImageDraw.Draw(image)
        rng = random.Random(3)
        for _ in range(8):
            x, y = rng.randrange(size), rng.randrange(size)
            colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            draw.rectangle((x - 20, y - 20, x + 20, y + 20), fill=colour)
    draw = ImageDraw.Draw(image)
    # an L-shaped product off centre, two tones
    draw.rectangle((30, 20, 50, 70), fill=colour)
    draw.rectangle((30, 60, 72, 75), fill=tuple(c // 2 for c in colour))
    return image


REQUEST = ImageRequest(key="P1", title="red boot", seed=11)


@pytest.mark.parametrize("background", ["plain", "gradient"])
def test_background_model_fits_plain_and_graded_frames(background: str) -> None:
    pixels = np.asarray(product_photo(background), np.float32)
    modelled, spread = background_model(pixels)
    assert spread < 3
    assert np.abs(modelled[5, 5] - pixels[5, 5]).max() < 4
    matte = product_matte(product_photo(background))
    assert matte is not None
    alpha = np.asarray(matte)
    assert alpha[40, 40] > 200 and alpha[5, 5] < 30 and alpha[90, 90] < 30


def test_cluttered_photo_has_no_matte() -> None:
    _, spread = background_model(np.asarray(product_photo("clutter"), np.float32))
    assert spread > 12
    assert product_matte(product_photo("clutter")) is None


def test_clean_centres_the_product_on_white() -> None:
    engine = ClassicImageEngine()
    clean = engine.clean(product_photo(), REQUEST)
    assert clean.ops == ["matte", "white_background", "product_crop"]
    assert clean.image.size == (96, 96) and clean.alpha is not None
    pixels = np.asarray(clean.image)
    assert tuple(pixels[1, 1]) == (255, 255, 255)
    box = clean.alpha.point(lambda v: 255 if v > 128 else 0).getbbox()
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    assert abs(centre[0] - 48) < 4 and abs(centre[1] - 48) < 4
    # the product now fills the frame up to the margin
    assert max(box[2] - box[0], box[3] - box[1]) > 0.7 * 96


def test_clean_crops_the_centre_of_a_busy_photo() -> None:
    photo = product_photo("clutter").crop((0, 0, 96, 80))
    clean = ClassicImageEngine().clean(photo, REQUEST)
    assert clean.ops == ["center_crop"] and clean.image.size == (80, 80)


def test_variants_are_seeded_varied_and_keep_the_product() -> None:
    engine = ClassicImageEngine()
    clean = engine.clean(product_photo(), REQUEST)
    first = engine.variants(clean, REQUEST, 3)
    again = engine.variants(clean, REQUEST, 3)
    retry = engine.variants(clean, REQUEST, 3, attempt=1)
    assert len(first) == 3
    assert [v.ops[0] for v in first] == ["background", "viewpoint", "lighting"]
    assert all(
        np.array_equal(np.asarray(a.image), np.asarray(b.image))
        for a, b in zip(first, again, strict=True)
    )
    assert not np.array_equal(np.asarray(first[0].image), np.asarray(retry[0].image))
    for variant in first:
        assert variant.image.size == clean.image.size
        assert histogram_similarity(variant.image, clean.image, variant.alpha, clean.alpha) > 0.6


def test_histogram_score_separates_recolours_from_views() -> None:
    original = product_photo()
    engine = ClassicImageEngine()
    clean = engine.clean(original, REQUEST)
    views = engine.variants(clean, REQUEST, 3)
    recoloured = EditedImage(product_photo(colour=(40, 60, 210)))
    scorer = HistogramScorer()
    scores = scorer.score([clean, *views, recoloured], original, "red boot")
    assert scores[0] > 0.85
    assert min(scores[1:4]) > 0.55
    assert scores[4] < 0.4
    assert histogram_similarity(original, original) == pytest.approx(1.0, abs=1e-6)


def test_scorer_selection() -> None:
    assert isinstance(load_scorer(ConsistencyConfig()), HistogramScorer)
    with pytest.raises(ConfigError, match="needs an open_clip model"):
        load_scorer(ConsistencyConfig(scorer="histogram", reference="title"))


def test_openclip_scorer_loads_a_local_checkpoint(tmp_path) -> None:
    import open_clip
    import torch

    torch.manual_seed(0)
    from moon2.models.openclip import _register_moon2_configs

    _register_moon2_configs()
    model = open_clip.create_model("moon2-tiny-clip", pretrained=None)
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    config = ConsistencyConfig(openclip_model="moon2-tiny-clip", openclip_pretrained=str(path))
    scorer = load_scorer(config)
    assert scorer.name.startswith("openclip:moon2-tiny-clip:")
    original = product_photo()
    scores = scorer.score(
        [EditedImage(original), EditedImage(product_photo("clutter"))], original, "red boot"
    )
    assert scores[0] == pytest.approx(1.0, abs=1e-4) and scores[1] < scores[0]
    title_scorer = load_scorer(config.model_copy(update={"reference": "title"}))
    assert -1 <= title_scorer.score([EditedImage(original)], original, "red boot")[0] <= 1
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_scorer(
            ConsistencyConfig(
                openclip_model="moon2-tiny-clip", openclip_pretrained=str(tmp_path / "no.pt")
            )
        )
