"""The transformers text engine on tiny random models built offline (and SmolLM2, slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moon2.augment.config import EntityConfig, TextConfig
from moon2.augment.entities import extract_entities
from moon2.augment.text import TextRequest, TransformersTextEngine, build_messages, load_text_engine
from moon2.errors import ConfigError
from tests.factories import product_row


def requests_for(config: TextConfig, count: int, with_image: bool = False) -> list[TextRequest]:
    from PIL import Image

    rows = [
        product_row(f"P{i}", title=f"{'big ' * i}red cotton t-shirt number {i}")
        for i in range(count)
    ]
    return [
        TextRequest(
            build_messages(
                config, r["title"], extract_entities(r, EntityConfig()), with_image=with_image
            ),
            image=Image.new("RGB", (40 + 8 * i, 56), (200, 30, 30)) if with_image else None,
            seed=100 + i,
            key=r["product_id"],
        )
        for i, r in enumerate(rows)
    ]


def test_batched_greedy_equals_one_by_one(tiny_llama: Path) -> None:
    config = TextConfig(model=str(tiny_llama), batch_size=3, max_new_tokens=8)
    engine = load_text_engine(config)
    assert isinstance(engine, TransformersTextEngine) and not engine.takes_images
    assert engine.name == f"transformers:{tiny_llama}"
    requests = requests_for(config, 5)  # prompts of different lengths: left padding at work
    batched = engine.generate(requests)
    single = [engine.generate([r])[0] for r in requests]
    assert batched == single
    assert len(batched) == 5 and all(isinstance(t, str) for t in batched)


def test_sampling_is_seeded_per_row(tiny_llama: Path) -> None:
    config = TextConfig(
        model=str(tiny_llama),
        do_sample=True,
        temperature=1.5,
        top_p=1.0,
        max_new_tokens=8,
        batch_size=4,
    )
    engine = TransformersTextEngine(config)
    requests = requests_for(config, 4)
    together = engine.generate(requests)
    alone = engine.generate([requests[2]])[0]
    assert together[2] == alone  # a row's sample does not depend on its batch mates
    assert engine.generate(requests) == together
    reseeded = [TextRequest(r.messages, seed=r.seed + 1, key=r.key) for r in requests]
    assert engine.generate(reseeded) != together
    # a request can ask for sampling under a greedy config (what the gate's retry does)
    greedy = TransformersTextEngine(config.model_copy(update={"do_sample": False}))
    forced = [TextRequest(r.messages, seed=r.seed, key=r.key, sample=True) for r in requests]
    assert greedy.generate(forced) == together


def test_vision_language_model_sees_the_image(tmp_path: Path) -> None:
    from moon2.models.offline import build_tiny_qwen2vl

    model_dir = build_tiny_qwen2vl(tmp_path / "qwen2vl", hidden_size=32, layers=1, vision_depth=1)
    config = TextConfig(model=str(model_dir), max_new_tokens=6, batch_size=2)
    engine = TransformersTextEngine(config)
    assert engine.takes_images
    requests = requests_for(config, 3, with_image=True)
    batched = engine.generate(requests)
    assert batched == [engine.generate([r])[0] for r in requests]
    no_image = TransformersTextEngine(config.model_copy(update={"use_image": False}))
    assert not no_image.takes_images


def test_unloadable_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="could not be loaded"):
        TransformersTextEngine(TextConfig(model=str(tmp_path / "missing")))


@pytest.mark.slow
def test_smollm2_enriches_titles_through_the_gate(small_catalog: Path, tmp_path: Path) -> None:
    """The offline default end to end on a few rows (SmolLM2-135M, ~1 min)."""
    import json

    from moon2.augment.config import AugmentConfig
    from moon2.augment.pipeline import augment

    config = AugmentConfig(rows_per_part=8)
    config.images.engine = "none"
    result = augment(small_catalog / "products", tmp_path / "out", config, limit=8, use_ray=False)
    assert result.rows_out + result.rows_rejected == 8
    sources = result.manifest["title_sources"]
    assert sum(sources.values()) == result.rows_out and set(sources) <= {"llm", "fallback"}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["engines"]["text"] == (
        "transformers:smollm2-135m-instruct"
    )


def test_frequency_penalty_counts_only_generated_tokens() -> None:
    import torch

    from moon2.augment.text import GeneratedFrequencyPenalty

    penalty = GeneratedFrequencyPenalty(prompt_length=3, penalty=0.5)
    input_ids = torch.tensor([[7, 7, 2, 7, 4, 4], [1, 2, 3, 0, 0, 0]])
    scores = torch.zeros(2, 8)
    out = penalty(input_ids, scores)
    # row 0 generated 7 once and 4 twice; the prompt's two 7s do not count
    assert out[0].tolist() == [0, 0, 0, 0, -1.0, 0, 0, -0.5]
    assert out[1].tolist() == [-1.5, 0, 0, 0, 0, 0, 0, 0]
    assert torch.equal(GeneratedFrequencyPenalty(6, 0.5)(input_ids, scores), scores)


@pytest.mark.parametrize("do_sample", [False, True])
def test_shared_prefix_cache_changes_nothing(tiny_llama: Path, do_sample: bool) -> None:
    config = TextConfig(
        model=str(tiny_llama), batch_size=4, max_new_tokens=8, do_sample=do_sample, temperature=1.5
    )
    cached = TransformersTextEngine(config)
    plain = TransformersTextEngine(config.model_copy(update={"prefix_cache": False}))
    requests = requests_for(config, 4)
    assert cached.generate(requests) == plain.generate(requests)
    assert len(cached._prefix_ids) >= 16  # the system and few-shot turns were cached
    # a later single row starting with the same prefix reuses it
    assert cached.generate(requests[1:2]) == plain.generate(requests[1:2])
