"""Length buckets: the grouping is optimal, rows keep their images, and a bucketed forward gives
the same embeddings, routings, losses and gradients as one padded call; a batch's repeated
photos go through the vision tower once, with the same results."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from PIL import Image

from moon2.models.base import EncodeItem
from moon2.train.buckets import images_per_row, mrope_positions, plan_buckets, take_rows
from moon2.train.inputs import build_inputs
from moon2.train.model import Moon2Model, build_backbone, distinct_images
from moon2.train.moe import load_balancing_loss, routing_usage
from tests.test_train import tiny_config


def _padded_cost(lengths: list[int], groups: list[list[int]], call_cost: int) -> int:
    return sum(len(g) * max(lengths[r] for r in g) + call_cost for g in groups)


def test_plan_buckets_by_hand() -> None:
    lengths = [10, 50, 10, 50, 10]
    assert plan_buckets(lengths, 1) == [[0, 1, 2, 3, 4]]
    assert plan_buckets(lengths, 3, call_cost=0) == [[0, 2, 4], [1, 3]]
    # a call costs more than the padding it saves: one call
    assert plan_buckets(lengths, 3, call_cost=200) == [[0, 1, 2, 3, 4]]
    assert plan_buckets([], 3) == []
    assert plan_buckets([7], 3) == [[0]]
    with pytest.raises(ValueError):
        plan_buckets(lengths, 0)


def test_plan_buckets_is_the_cheapest_split_of_the_sorted_lengths() -> None:
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(3, 40) for _ in range(rng.randint(2, 12))]
        max_buckets, call_cost = rng.randint(1, 4), rng.choice([0, 5, 30])
        groups = plan_buckets(lengths, max_buckets, call_cost)
        assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
        assert 1 <= len(groups) <= max_buckets
        distinct = sorted(set(lengths))
        best = None
        for k in range(1, min(max_buckets, len(distinct)) + 1):
            for cuts in itertools.combinations(range(1, len(distinct)), k - 1):
                edges = [0, *cuts, len(distinct)]
                split = [
                    [r for r in range(len(lengths)) if distinct[a] <= lengths[r] <= distinct[b - 1]]
                    for a, b in itertools.pairwise(edges)
                ]
                cost = _padded_cost(lengths, split, call_cost)
                best = cost if best is None else min(best, cost)
        assert _padded_cost(lengths, groups, call_cost) == best


def _mixed_items() -> list[EncodeItem]:
    """Rows of very different lengths, images of different sizes, rows with two images."""
    red = Image.new("RGB", (40, 40), (220, 20, 20))
    blue = Image.new("RGB", (56, 28), (20, 20, 220))
    green = Image.new("RGB", (28, 56), (20, 200, 20))
    long_text = "a blue ceramic mug with a long curved handle and a glossy glaze for coffee"
    return [
        EncodeItem(text="red tee"),
        EncodeItem(images=[red]),
        EncodeItem(text=long_text, images=[blue]),
        EncodeItem(images=[green, red]),
        EncodeItem(text=long_text),
        EncodeItem(text="mug", images=[green]),
        EncodeItem(images=[blue]),
        EncodeItem(text="shoes"),
    ]


def test_rows_take_their_own_images() -> None:
    config = tiny_config()
    backbone, processor = build_backbone(config.model, seed=0)
    inputs = build_inputs(processor, _mixed_items(), 24)
    merge = backbone.config.vision_config.spatial_merge_size
    counts = images_per_row(
        inputs["input_ids"], inputs["image_grid_thw"], backbone.config.image_token_id, merge
    )
    assert counts == [0, 1, 1, 2, 0, 1, 1, 0]
    rows = [3, 0, 6]
    part = take_rows(inputs, rows, counts)
    alone = build_inputs(processor, [_mixed_items()[r] for r in rows], 24)
    width = part["attention_mask"].shape[1]
    assert width == int(alone["attention_mask"].sum(-1).max())
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        torch.testing.assert_close(
            part[key],
            alone[key][:, :width] if key in ("input_ids", "attention_mask") else alone[key],
        )
    with pytest.raises(ValueError, match="image tokens"):
        images_per_row(
            inputs["input_ids"],
            inputs["image_grid_thw"][:-1],
            backbone.config.image_token_id,
            merge,
        )


def test_bucketed_forward_equals_one_padded_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moon2.train.buckets.CALL_COST_TOKENS", 0)  # split even 8 short rows
    config = tiny_config()
    backbone, processor = build_backbone(config.model, seed=1)
    model = Moon2Model.with_processor(backbone, processor, config.model, config.moe)
    inputs = build_inputs(processor, _mixed_items(), 24)
    results = {}
    for buckets in (1, 3):
        model.model_config.length_buckets = buckets
        model.zero_grad()
        encoded = model.encode(inputs)
        aux = load_balancing_loss(encoded.routings, config.moe.top_k)
        (encoded.embeddings.sum() + aux).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[buckets] = (encoded, aux, grads)
    one, many = results[1], results[3]
    assert model._length_groups(dict(inputs)) is not None  # this batch really is split
    torch.testing.assert_close(many[0].embeddings, one[0].embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(many[0].gates, one[0].gates, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(many[1], one[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        routing_usage(many[0].routings), routing_usage(one[0].routings), atol=1e-6, rtol=0
    )
    assert one[2].keys() == many[2].keys()
    for name, grad in one[2].items():
        torch.testing.assert_close(many[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_one_token_lookup_serves_every_call_from_one_table() -> None:
    from moon2.train.model import one_token_lookup

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 4)
    ids = torch.tensor([[3, 7, 7, 0], [9, 3, 1, 0], [49, 2, 3, 0]])
    parts = (ids[:2, :3], ids[2:, :2], ids[:, 1:])  # slices, as length buckets take them
    expected = [embedding(part) for part in parts]
    sum((e * torch.arange(4.0)).sum() for e in expected).backward()
    dense_grad, embedding.weight.grad = embedding.weight.grad.clone(), None
    original_calls = []
    embedding.register_forward_hook(lambda module, args, output: original_calls.append(args))
    with one_token_lookup(embedding, ids):
        assert len(original_calls) == 1  # the table: the batch's distinct tokens, once
        got = [embedding(part) for part in parts]
    assert "forward" not in vars(embedding)  # restored
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    sum((g * torch.arange(4.0)).sum() for g in got).backward()
    torch.testing.assert_close(embedding.weight.grad, dense_grad)

    class Scaled(torch.nn.Embedding):  # a subclass may change forward: left alone
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return super().forward(input_ids) * 2

    scaled = Scaled(50, 4)
    with one_token_lookup(scaled, ids):
        torch.testing.assert_close(scaled(ids), torch.nn.Embedding.forward(scaled, ids) * 2)
    assert "forward" not in vars(scaled)


def test_left_padded_inputs_are_not_split() -> None:
    config = tiny_config()
    backbone, processor = build_backbone(config.model, seed=1)
    model = Moon2Model.with_processor(backbone, processor, config.model, config.moe)
    model.model_config.length_buckets = 3
    processor.tokenizer.padding_side = "left"
    inputs = build_inputs(processor, _mixed_items(), 24)
    inputs.pop("moon2_modality")
    assert model._length_groups(inputs) is None


def test_distinct_images_finds_repeated_photos_only() -> None:
    grid = torch.tensor([[1, 2, 2], [1, 2, 2], [1, 2, 2], [1, 4, 1], [1, 2, 2]])
    base = torch.arange(12, dtype=torch.float32).view(4, 3)
    shuffled = base.flip(0)  # same patches, same sum, another photo
    tall = base.clone()  # same patches, another grid
    pixel_values = torch.cat([base, shuffled, base, tall, base + 1])
    assert distinct_images(pixel_values, grid) == [0, 1, 0, 3, 4]


def test_repeated_photos_are_encoded_once_with_the_same_results() -> None:
    config = tiny_config()
    backbone, processor = build_backbone(config.model, seed=2)
    model = Moon2Model.with_processor(backbone, processor, config.model, config.moe)
    model.model_config.length_buckets = 3
    inputs = build_inputs(processor, _mixed_items(), 24)  # 3 photos in 6 image slots
    assert len(set(distinct_images(inputs["pixel_values"], inputs["image_grid_thw"]))) == 3
    calls = []

    def record_grid(module: object, args: tuple, kwargs: dict, output: object) -> None:
        calls.append(kwargs["grid_thw"] if "grid_thw" in kwargs else args[1])

    model.backbone.visual.register_forward_hook(record_grid, with_kwargs=True)
    results = {}
    for shared in (False, True):
        model._takes_features = shared
        model.zero_grad()
        encoded = model.encode(inputs)
        encoded.embeddings.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[shared] = (encoded.embeddings, grads)
    assert len(calls[-1]) == 3  # one vision call over the 3 distinct photos
    assert sum(len(grid) for grid in calls[:-1]) == 6  # the backbone's own calls: every slot
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-5)
    assert results[True][1].keys() == results[False][1].keys()
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("side", ["right", "left"])
def test_mrope_positions_equal_transformers_rope_index(side: str) -> None:
    config = tiny_config()
    backbone, processor = build_backbone(config.model, seed=0)
    processor.tokenizer.padding_side = side
    inputs = build_inputs(processor, _mixed_items(), 24)
    expected, _ = backbone.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    positions = mrope_positions(
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["image_grid_thw"],
        backbone.config.image_token_id,
        backbone.config.vision_config.spatial_merge_size,
    )
    torch.testing.assert_close(positions, expected)
    assert not torch.equal(positions[1], positions[2])  # image tokens: rows differ from columns
