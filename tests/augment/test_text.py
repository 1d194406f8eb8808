"""Entities, the title quality gate, the fallback rewrite, prompts and the text stage."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from moon2.augment.config import AugmentConfig, EntityConfig, GateConfig, TextConfig
from moon2.augment.entities import Entity, Lexicon, extract_entities, format_entities
from moon2.augment.gate import check_title, fallback_title, repeated_ngram, singular
from moon2.augment.text import (
    TextEngine,
    TextRequest,
    build_messages,
    clean_completion,
    row_seed,
)

ROW = {
    "product_id": "P1",
    "title": "Nordvik ceramic mug blue striped 350ml HOT SALE",
    "description": "Dishwasher safe.",
    "category": ["Home", "Kitchen", "Mugs"],
    "attributes": [{"key": "Colour", "value": "blue"}, {"key": "brand", "value": "Nordvik"}],
    "images": None,
}


def entities_of(row: dict, **config: object) -> list[Entity]:
    return extract_entities(row, EntityConfig(**config))


def test_entities_follow_the_rule_order() -> None:
    found = {e.key: (e.value, e.source) for e in entities_of(ROW)}
    assert found["color"] == ("blue", "attribute")  # "Colour" key normalised
    assert found["brand"] == ("Nordvik", "attribute")
    assert found["category"] == ("Mugs", "category")
    assert found["material"] == ("ceramic", "title")
    assert found["pattern"] == ("striped", "title")


def test_entities_longest_phrase_description_and_extra_lexicon() -> None:
    row = {"title": "Jacket", "description": "Soft faux leather in navy blue.", "category": None}
    found = {e.key: e.value for e in entities_of(row)}
    assert found == {"material": "faux leather", "color": "navy blue"}
    chinese = {"title": "红色 连衣裙", "category": ["服装"]}
    found = {e.key: e.value for e in entities_of(chinese, extra_lexicon={"颜色": ["红色"]})}
    assert found == {"category": "服装", "color": "红色"}


def test_long_attribute_values_are_not_entities() -> None:
    row = {
        "title": "x",
        "attributes": [{"key": "note", "value": "one two three four five six seven"}],
    }
    assert entities_of(row) == []
    assert format_entities([Entity("color", "red", ""), Entity("size", "L", "")]) == (
        "color: red; size: L"
    )


@pytest.fixture()
def gate_parts() -> tuple[list[Entity], GateConfig, Lexicon]:
    return entities_of(ROW), GateConfig(), Lexicon()


def test_gate_passes_a_faithful_title(gate_parts) -> None:
    entities, config, lexicon = gate_parts
    assert (
        check_title("Nordvik blue striped ceramic mug, 350 ml", ROW, entities, config, lexicon)
        == []
    )
    # a family word keeps the colour, the plural/singular keeps the noun
    assert check_title("Nordvik azure striped ceramic mugs", ROW, entities, config, lexicon) == []


@pytest.mark.parametrize(
    ("title", "reason"),
    [
        ("", "empty"),
        ("Nordvik striped ceramic mug", "drops_color"),
        ("Nordvik blue striped ceramic cup", "drops_category"),
        ("Nordvik blue striped ceramic mug mug", "repeats"),
        ("Nordvik blue striped ceramic mug, blue striped", "repeats"),
        ("Nordvik blue striped ceramic mug in red", "contradicts_color"),
        ("Nordvik blue striped ceramic mug with glass lid", "contradicts_material"),
        ("mug", "too_short"),
        ("Nordvik blue striped ceramic mug " + " ".join(f"w{i}" for i in range(60)), "too_long"),
    ],
)
def test_gate_failures(gate_parts, title: str, reason: str) -> None:
    entities, config, lexicon = gate_parts
    reasons = check_title(title, ROW, entities, config, lexicon)
    assert any(r.startswith(reason) for r in reasons), reasons


def test_gate_catches_words_copied_from_the_examples(gate_parts) -> None:
    from moon2.augment.gate import example_words

    entities, config, lexicon = gate_parts
    examples = example_words(TextConfig().few_shot)
    assert "nordvik" in examples and "for" not in examples
    other = {
        **ROW,
        "title": "Lumica blue striped ceramic mug",
        "attributes": [{"key": "brand", "value": "Lumica"}, {"key": "color", "value": "blue"}],
    }
    found = entities_of(other)
    copied = "Nordvik blue striped ceramic mug, 350 ml"
    reasons = check_title(copied, other, found, config, lexicon, examples)
    assert any(r.startswith("copies_example: 'nordvik, 350, ml'") for r in reasons), reasons
    # the example's own product may say its own words
    assert check_title(copied, ROW, entities, config, lexicon, examples) == []


def test_repeated_ngram_and_singular() -> None:
    assert repeated_ngram("a b c a b", 2) == "a b"
    assert repeated_ngram("a b c d", 2) is None
    assert singular("Table Lamps") == "Table Lamp"
    assert singular("Dresses") == "Dress"
    assert singular("Glass") == "Glass"
    assert singular("连衣裙") == "连衣裙"


def test_fallback_keeps_every_entity_and_passes_the_gate(gate_parts) -> None:
    entities, config, lexicon = gate_parts
    row = {**ROW, "attributes": [*ROW["attributes"], {"key": "size", "value": "size 350ml"}]}
    entities = entities_of(row)
    title = fallback_title(row, entities)
    assert title == "Nordvik blue striped ceramic Mug, size 350ml"
    assert check_title(title, row, entities, config, lexicon) == []
    # without a category the original title carries the noun
    bare = {"title": "red thing", "attributes": [{"key": "color", "value": "red"}]}
    assert fallback_title(bare, entities_of(bare)) == "red red thing"


def test_prompt_and_completion_cleanup() -> None:
    config = TextConfig()
    messages = build_messages(
        config, ROW["title"], entities_of(ROW), "d" * 999, ROW["category"], with_image=True
    )
    assert messages[0]["role"] == "system"
    assert len(messages) == 2 + 2 * len(config.few_shot)
    last = messages[-1]["content"]
    assert last[0] == {"type": "image"}
    assert "color: blue" in last[1]["text"] and ROW["title"] in last[1]["text"]
    assert clean_completion('Title: "Blue mug"<|im_end|>\nmore') == "Blue mug"
    assert clean_completion("\n\nRewritten title: Blue mug\n") == "Blue mug"
    assert row_seed(0, "P1") == row_seed(0, "P1") != row_seed(0, "P1", attempt=1)


class ScriptedEngine(TextEngine):
    """Answers from a script keyed by (product key, attempt); 'raise' raises."""

    def __init__(self, script: dict[tuple[str, bool], str]) -> None:
        super().__init__(config=TextConfig(), model_id="scripted")
        self.script = script
        self.calls: list[int] = []

    def generate(self, requests: Sequence[TextRequest]) -> list[str]:
        self.calls.append(len(requests))
        out = []
        for r in requests:
            answer = self.script[(r.key, bool(r.sample))]
            if answer == "raise":
                raise RuntimeError("engine exploded")
            out.append(answer)
        return out


def run_text_stage(rows: list[dict], engine: TextEngine, tmp_path) -> list[dict]:
    import pyarrow.parquet as pq

    from moon2.augment.stages import TextStage, from_ipc, prepare_part
    from moon2.data.parts import PartSpec
    from tests.factories import products_table

    path = tmp_path / "products.parquet"
    pq.write_table(products_table(rows), path)
    config = AugmentConfig()
    config.text.engine = "none"
    stage = TextStage(config)
    stage.engine = engine
    record = prepare_part(PartSpec("k", str(path), 0, 0, len(rows)), config)
    out = stage(record)
    return from_ipc(out["table"]).to_pylist()


def test_text_stage_gate_retry_fallback_and_isolation(tmp_path) -> None:
    from tests.factories import product_row

    rows = [product_row(f"P{i}") for i in range(4)]
    good = "red cotton T-shirt for everyday wear"
    engine = ScriptedEngine(
        {
            ("P0", False): good,
            ("P1", False): "blue cotton t-shirt",  # contradicts the colour -> retried
            ("P1", True): good,
            ("P2", False): "shirt shirt",
            ("P2", True): "still bad bad",  # -> fallback
            ("P3", False): "raise",  # generation error -> only this row is rejected
        }
    )
    out = run_text_stage(rows, engine, tmp_path)
    by_id = {r["product_id"]: r for r in out}
    assert by_id["P0"]["aug_title"] == good and by_id["P0"]["aug_title_source"] == "llm"
    assert by_id["P0"]["aug_title_gate"] is None
    assert by_id["P1"]["aug_title_source"] == "llm"
    assert "contradicts_color: 'blue'" in by_id["P1"]["aug_title_gate"]
    assert by_id["P2"]["aug_title_source"] == "fallback"
    assert by_id["P2"]["aug_title"] == "red cotton T-Shirt"
    assert "text generation failed" in by_id["P3"]["_moon2_reject"]
    assert "column title" in by_id["P3"]["_moon2_reject"]
    assert all(by_id[p]["_moon2_reject"] is None for p in ("P0", "P1", "P2"))
    # one batch, then the row-by-row isolation pass, then one retry batch
    assert engine.calls == [4, 1, 1, 1, 1, 2]
