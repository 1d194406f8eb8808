"""moon2 train: pooling, MoE on the real backbone, filter policies, data, the loop end to end,
resume after a real kill, DDP on two CPU processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from moon2.curate.dynamic import FilterPolicy
from moon2.models.base import EncodeItem
from moon2.train.config import FilterConfig
from moon2.train.inputs import build_inputs
from moon2.train.model import (
    EmbeddingCenter,
    Moon2Model,
    build_backbone,
    load_model,
    pool,
    template_prefix_tokens,
)
from moon2.train.trainer import train
from tests.factories import (
    TINY,
    TRAINED_EPOCHS,
    duplicate_pair_batch,
    png_bytes,
    product_row,
    products_table,
    queries_table,
    query_row,
    tiny_config,
)

ROOT = Path(__file__).resolve().parents[1]


def _items() -> list[EncodeItem]:
    from PIL import Image

    red = Image.new("RGB", (40, 40), (220, 20, 20))
    blue = Image.new("RGB", (56, 28), (20, 20, 220))
    return [
        EncodeItem(text="red cotton tee"),
        EncodeItem(images=[red]),
        EncodeItem(text="blue ceramic mug with a long handle", images=[blue]),
    ]


# --- pieces -------------------------------------------------------------------------------


def test_pool_by_hand() -> None:
    hidden = torch.tensor([[[1.0, 0], [3, 2], [9, 9]], [[2.0, 2], [4, 0], [6, 4]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ids = torch.tensor([[5, 7, 0], [7, 5, 5]])
    assert torch.allclose(pool(hidden, mask, "mean"), torch.tensor([[2.0, 1], [4, 2]]))
    assert torch.allclose(pool(hidden, mask, "last"), torch.tensor([[3.0, 2], [6, 4]]))
    # eos: the last EOS (id 7) among real tokens, else the last real token
    eos = pool(hidden, mask, "eos", ids, eos_token_id=7)
    assert torch.allclose(eos, torch.tensor([[3.0, 2], [2, 2]]))
    with pytest.raises(ValueError):
        pool(hidden, mask, "max")
    # modality_mean: image tokens (id 9) and the rest weigh the same
    ids = torch.tensor([[9, 5, 5], [5, 5, 5]])
    both = pool(hidden, torch.ones(2, 3), "modality_mean", ids, image_token_id=9)
    assert torch.allclose(both[0], (torch.tensor([1.0, 0]) + torch.tensor([6.0, 5.5])) / 2)
    assert torch.allclose(both[1], torch.tensor([4.0, 2]))  # no image: the plain mean


def test_embedding_center_removes_each_modality_mean() -> None:
    center = EmbeddingCenter(2, momentum=0.5)
    pooled = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 5.0], [7.0, 9.0], [4.0, 4.0]])
    modality = torch.tensor([0, 0, 2, 2, 1])  # text, text, image+text, image+text, image
    centred = center(pooled, modality)
    # training: each modality's batch mean (a lone image row: the running mean, still zero)
    expected = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [-1.0, -2.0], [1.0, 2.0], [4.0, 4.0]])
    assert torch.allclose(centred, expected)
    assert torch.allclose(center.mean, torch.tensor([[2.0, 2.0], [0.0, 0.0], [6.0, 7.0]]))
    center(torch.zeros(2, 2), torch.tensor([0, 0]))  # text mean <- 0.5 * 2 + 0.5 * 0
    assert torch.allclose(center.mean[0], torch.ones(2))
    center.eval()  # evaluation: the frozen running means, whatever the batch
    assert torch.allclose(center(pooled[:1], modality[:1]), torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(center.mean[0], torch.ones(2))
    # training passes gradients through the batch mean, as batch norm does
    center.train()
    x = torch.randn(3, 2, requires_grad=True)
    weights = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 3.0]])
    (center(x, torch.zeros(3, dtype=torch.long)) * weights).sum().backward()
    assert torch.allclose(x.grad, weights - weights.mean(0))


def test_prefix_tokens_are_the_constant_template_opening() -> None:
    _, processor = build_backbone(tiny_config().model, seed=0)
    prefix = template_prefix_tokens(processor)
    opening = processor.tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert prefix == len(opening) > 0


def test_texts_are_cut_on_their_own_tokens_and_stay_with_their_items() -> None:
    from PIL import Image

    from moon2.train.inputs import truncate_texts

    _, processor = build_backbone(tiny_config().model, seed=0)
    tokenizer = processor.tokenizer
    long = "wireless noise cancelling over-ear headphones with a carrying case " * 4
    short = "red tee"
    cut = truncate_texts(tokenizer, [long, short], 8)
    assert cut[1] == short
    assert len(tokenizer(cut[0], add_special_tokens=False)["input_ids"]) == 8
    assert long.startswith(cut[0])
    image = Image.new("RGB", (56, 56), (0, 0, 200))
    items = [EncodeItem(text=long), EncodeItem(images=[image]), EncodeItem(text=short)]
    inputs = build_inputs(processor, items, 8)
    rows = [
        tokenizer.decode(ids[mask.bool()])
        for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
    ]
    assert cut[0] in rows[0] and "headphones" not in rows[0].split(cut[0])[1]
    assert short in rows[2] and short not in rows[1]


def test_truncation_cache_gives_the_same_texts_and_skips_the_tokenizer() -> None:
    from moon2.train.inputs import truncate_texts

    _, processor = build_backbone(tiny_config().model, seed=0)
    texts = ["wireless over-ear headphones with a carrying case " * 3, "red tee", "red tee"]
    expected = truncate_texts(processor.tokenizer, texts, 8)
    calls: list[list[str]] = []

    class Counting:
        def __call__(self, batch: list[str], **kwargs):
            calls.append(list(batch))
            return processor.tokenizer(batch, **kwargs)

        def decode(self, tokens):
            return processor.tokenizer.decode(tokens)

    counting = Counting()
    cache: dict[str, str] = {}
    assert truncate_texts(counting, texts, 8, cache) == expected
    assert calls == [texts[:2]]  # each distinct text tokenised once
    assert truncate_texts(counting, [texts[1], texts[0]], 8, cache) == expected[1::-1]
    assert len(calls) == 1


def test_token_types_are_the_processors_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from moon2.train import inputs as inputs_module

    _, processor = build_backbone(tiny_config().model, seed=0)
    assert inputs_module._returns_token_types(processor)  # transformers >= 5
    ours = build_inputs(processor, _items(), 24)
    monkeypatch.setattr(inputs_module, "_returns_token_types", lambda processor: False)
    theirs = build_inputs(processor, _items(), 24)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert set(ours["mm_token_type_ids"].unique().tolist()) == {0, 1}


def _photos(seed: int, count: int) -> list:
    from PIL import Image

    generator = np.random.default_rng(seed)
    return [
        Image.fromarray(generator.integers(0, 255, (40 + 8 * (i % 2), 44, 3), dtype=np.uint8))
        for i in range(count)
    ]


def test_pixel_cache_serves_the_processors_output_and_keeps_photos_seen_twice() -> None:
    import pickle

    from PIL import Image

    from moon2.train.inputs import CachedImageProcessor, with_pixel_cache

    _, processor = build_backbone(tiny_config().model, seed=0)
    cached = with_pixel_cache(processor, 64 << 20)
    assert isinstance(cached.image_processor, CachedImageProcessor)
    assert not isinstance(processor.image_processor, CachedImageProcessor)  # saved as before
    catalog = _photos(0, 4)
    array = np.asarray(_photos(1, 1)[0])
    store = cached.image_processor.cache
    for round_ in range(3):
        fresh = _photos(100 + round_, 2)  # a random view: new every round
        items = [
            EncodeItem(text="red tee", images=[catalog[0]]),
            EncodeItem(images=[fresh[0]]),
            EncodeItem(text="mug", images=[catalog[1], catalog[0]]),  # catalog[0] twice
            EncodeItem(images=[catalog[2 + round_ % 2]]),
            EncodeItem(images=[array]),
            EncodeItem(text="only text"),
            EncodeItem(images=[fresh[1]]),
        ]
        got = build_inputs(cached, items, 24)
        expected = build_inputs(processor, items, 24)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), (round_, key)
        # kept: photos seen twice (in two batches or twice in one); never the fresh views
        assert len(store) == [1, 3, 4][round_]
    assert store.hits > 0
    copy = pickle.loads(pickle.dumps(cached))  # DataLoader workers get a pickled collator
    again = build_inputs(copy, [EncodeItem(images=[catalog[0]])], 24)
    assert torch.equal(
        again["pixel_values"],
        build_inputs(processor, [EncodeItem(images=[catalog[0]])], 24)["pixel_values"],
    )
    assert with_pixel_cache(processor, 0) is processor
    # palette photos with the same indices but other colours are different photos
    red, blue = (Image.new("P", (40, 40), 0) for _ in range(2))
    red.putpalette([220, 20, 20] * 256)
    blue.putpalette([20, 20, 220] * 256)
    for photo in (red, blue, red, blue):
        got = build_inputs(cached, [EncodeItem(images=[photo])], 24)["pixel_values"]
        expected = build_inputs(processor, [EncodeItem(images=[photo])], 24)["pixel_values"]
        assert torch.equal(got, expected)


def test_pixel_cache_neither_hashes_nor_keeps_one_off_photos(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moon2.train import inputs as inputs_module
    from moon2.train.inputs import one_off, with_pixel_cache

    _, processor = build_backbone(tiny_config().model, seed=0)
    cached = with_pixel_cache(processor, 64 << 20)
    hashed: list[object] = []
    digest = inputs_module._photo_digest
    monkeypatch.setattr(
        inputs_module,
        "_photo_digest",
        lambda image, context: hashed.append(image) or digest(image, context),
    )
    view, photo = one_off(_photos(3, 1)[0]), _photos(4, 1)[0]
    for _ in range(3):  # a one-off photo seen again is still processed, never kept
        items = [EncodeItem(images=[view]), EncodeItem(text="tee", images=[photo])]
        got = build_inputs(cached, items, 24)
        expected = build_inputs(processor, items, 24)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
    assert len(cached.image_processor.cache) == 1  # the plain photo, seen twice
    assert hashed.count(photo) == 3 and hashed.count(view) == 3
    assert digest(view, b"") is None and digest(photo, b"") is not None


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_cache_gives_the_tokenizers_ids(side: str) -> None:
    import copy
    import pickle

    from moon2.train.inputs import CachedTokenizer, with_token_cache

    _, processor = build_backbone(tiny_config().model, seed=0)
    processor = copy.copy(processor)
    processor.tokenizer = copy.deepcopy(processor.tokenizer)
    processor.tokenizer.padding_side = side
    cached = with_token_cache(processor)
    assert isinstance(cached.tokenizer, CachedTokenizer)
    assert not isinstance(processor.tokenizer, CachedTokenizer)
    photos = _photos(5, 2)
    rounds = [
        [EncodeItem(text="red tee"), EncodeItem(text="mug", images=[photos[0]])],
        [
            EncodeItem(text="mug", images=[photos[0]]),  # seen before
            EncodeItem(text="une tasse à café, très longue " * 3, images=[photos[1]]),
            EncodeItem(images=[photos[1]]),
            EncodeItem(text="red tee"),
            EncodeItem(text="red tee"),  # twice in one batch
        ],
    ]
    for items in rounds + rounds:
        got = build_inputs(cached, items, 24)
        expected = build_inputs(processor, items, 24)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
    assert len(cached.tokenizer._ids) == 4  # distinct prompts
    copy_ = pickle.loads(pickle.dumps(cached))  # DataLoader workers get a pickled collator
    got = build_inputs(copy_, rounds[1], 24)
    assert torch.equal(got["input_ids"], build_inputs(processor, rounds[1], 24)["input_ids"])
    # other calls go to the tokenizer itself
    assert (
        cached.tokenizer(["red tee"], add_special_tokens=False)["input_ids"]
        == (processor.tokenizer(["red tee"], add_special_tokens=False)["input_ids"])
    )
    small = CachedTokenizer(processor.tokenizer, max_entries=2)
    for prompt in ("a", "b", "c", "a"):
        out = small([prompt, "b"], padding=True, return_tensors="pt")
        assert torch.equal(
            out["input_ids"],
            processor.tokenizer([prompt, "b"], padding=True, return_tensors="pt")["input_ids"],
        )
        assert len(small._ids) <= 2


def test_pixel_cache_passes_through_outputs_it_cannot_split() -> None:
    from transformers import BatchFeature

    from moon2.train.inputs import CachedImageProcessor

    calls: list[int] = []

    def inner(images, **kwargs):
        calls.append(len(images))
        return BatchFeature({"pixel_values": torch.ones(len(images), 3), "image_sizes": [1]})

    cached = CachedImageProcessor(inner, 1 << 20)
    photos = _photos(0, 2)
    for _ in range(3):
        output = cached(photos)
        assert set(output.keys()) == {"pixel_values", "image_sizes"}
    assert calls == [2, 2, 2] and len(cached.cache) == 0


def test_cached_chat_template_renders_like_the_template() -> None:
    from moon2.train.inputs import _prompt, _render

    _, processor = build_backbone(tiny_config().model, seed=0)
    cases = [
        (0, "red tee"),
        (1, None),
        (2, "tasse à café {{ bleue }} 蓝色"),  # template syntax and non-ASCII stay literal
        (1, "  padded text "),
        (0, "red tee"),
        (1, "mug"),
        (1, "mug"),
    ]
    for images, text in cases:
        assert _prompt(processor, images, text) == _render(processor, images, text)
    # a template that rewrites the text is rendered in full every time
    processor.chat_template = (
        "{% for m in messages %}{% for c in m['content'] %}"
        "{% if c['type'] == 'text' %}{{ c['text'] | upper }}{% else %}<img>{% endif %}"
        "{% endfor %}{% endfor %}"
    )
    for _ in range(2):
        assert _prompt(processor, 1, "blue mug") == "<img>BLUE MUG"


def test_processor_pixel_budget_is_applied() -> None:
    from PIL import Image

    from moon2.models.offline import tiny_qwen2vl_processor
    from moon2.train.inputs import configure_processor

    processor = tiny_qwen2vl_processor()
    image = Image.new("RGB", (128, 128), (10, 200, 10))
    grids = []
    for budget in (56 * 56, 112 * 112):
        configure_processor(processor, 28 * 28, budget)
        inputs = build_inputs(processor, [EncodeItem(images=[image])], 24)
        grids.append(inputs["image_grid_thw"].tolist())
    assert grids == [[[1, 4, 4]], [[1, 8, 8]]]  # 14-pixel patches


def test_vision_patch_and_merge_knobs_shape_the_image_tokens() -> None:
    from PIL import Image

    config = tiny_config(
        model={
            **TINY["model"],
            "tiny": {**TINY["model"]["tiny"], "vision_patch": 7, "spatial_merge": 4},
            "image_max_pixels": 112 * 112,
        }
    ).model
    backbone, processor = build_backbone(config, seed=0)
    assert backbone.config.vision_config.patch_size == 7
    image = Image.new("RGB", (112, 112), (10, 200, 10))
    inputs = build_inputs(processor, [EncodeItem(images=[image])], 24)
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]  # 7-pixel patches
    image_token = backbone.config.image_token_id
    assert int((inputs["input_ids"] == image_token).sum()) == 16  # 4 x 4 merged per token
    model = Moon2Model(backbone, config, tiny_config().moe)
    assert model.encode(inputs).embeddings.shape == (1, 32)


def test_inputs_carry_each_rows_modality_and_centring_uses_it() -> None:
    from moon2.train.inputs import MODALITY_KEY

    config = tiny_config(model={**TINY["model"], "center": True})
    backbone, processor = build_backbone(config.model, seed=0)
    model = Moon2Model.with_processor(backbone, processor, config.model, config.moe)
    inputs = build_inputs(processor, _items(), 24)
    assert inputs[MODALITY_KEY].tolist() == [0, 1, 2]  # text, image, image + text
    model.eval()
    with torch.no_grad():
        plain = model(inputs)
        model.center.mean.fill_(0.1)  # a different mean changes what is subtracted
        assert not torch.allclose(model(inputs), plain)
    del inputs[MODALITY_KEY]
    with pytest.raises(ValueError, match=MODALITY_KEY):
        model(inputs)


def test_upcycled_moe_backbone_equals_dense_at_init() -> None:
    config = tiny_config()
    backbone, processor = build_backbone(config.model, seed=3)
    dense = Moon2Model(backbone, config.model, config.moe.model_copy(update={"enabled": False}))
    inputs = build_inputs(processor, _items(), 24)
    with torch.no_grad():
        expected = dense(inputs)
    moe_backbone, _ = build_backbone(config.model, seed=3)
    moe = Moon2Model(moe_backbone, config.model, config.moe)
    assert len(moe.moe_layers) == 1
    with torch.no_grad():
        encoded = moe.encode(inputs)
    torch.testing.assert_close(encoded.embeddings, expected, atol=1e-5, rtol=1e-5)
    assert encoded.gates is not None and encoded.gates.shape == (3, 4)
    assert torch.allclose(encoded.embeddings.norm(dim=-1), torch.ones(3))


def test_filter_policies() -> None:
    margins = torch.tensor([0.5, 0.05, -0.3, 0.2])
    weighting = FilterPolicy(
        FilterConfig(kappa=10, tau=0.6, m_bar_start=0.2, m_bar_end=0.0, warmup=0.3)
    )
    phi, weight = weighting.weights(margins, progress=0.0)
    assert torch.allclose(phi, torch.sigmoid(10 * (margins - 0.2)))
    assert torch.equal(weight, torch.ones(4))  # warm-up: nothing down-weighted
    assert torch.equal(weighting.weights(margins, progress=0.29)[1], torch.ones(4))
    phi, weight = weighting.weights(margins, progress=1.0)  # m_bar has decayed to 0
    expected_phi = torch.sigmoid(10 * margins)
    assert torch.allclose(phi, expected_phi)
    assert torch.allclose(weight, torch.where(expected_phi < 0.6, expected_phi, 1.0))
    zero = FilterPolicy(FilterConfig(low_weight="zero", warmup=0, m_bar_start=0.2))
    _, weight = zero.weights(margins, 0.0)  # m_bar 0.2: phi(0.2) = 0.5 < tau
    assert weight.tolist() == [1.0, 0.0, 0.0, 0.0]

    scores = pl.DataFrame({"position": list(range(10)), "loss": [float(i % 5) for i in range(10)]})
    prune = FilterPolicy(FilterConfig(policy="loss_prune", prune_fraction=0.2, warmup=0.5))
    assert prune.end_epoch(scores, progress=0.4) == set()  # the next epoch is still warm-up
    assert prune.end_epoch(scores, progress=0.5) == {4, 9}  # the two highest losses
    assert torch.equal(prune.weights(margins, 0.5)[1], torch.ones(4))
    restored = FilterPolicy(prune.config)
    restored.load_state_dict(prune.state_dict())
    assert restored.dropped == {4, 9} and restored.pruning
    assert prune.end_epoch(scores.with_columns(pl.lit(0.0).alias("loss")), 1.0) == {0, 1}
    off = FilterPolicy(FilterConfig(enabled=False, policy="loss_prune"))
    assert off.end_epoch(scores, 1.0) == set() and off.name == "none"


def test_a_batch_whose_rows_are_all_below_tau_trains_at_less_than_full_strength() -> None:
    """The filter's weights scale the view loss over the batch's rows (the objective's
    weighted_mean): a batch of unreliable rows no longer renormalises itself back to 1."""
    from moon2.train.losses import weighted_mean

    policy = FilterPolicy(FilterConfig(kappa=10, tau=0.6, m_bar_start=0.0, warmup=0.0))
    losses = torch.tensor([2.0, 2.0, 2.0, 2.0])
    _, noisy = policy.weights(torch.tensor([-0.3, -0.2, -0.1, 0.0]), progress=0.0)
    _, clean = policy.weights(torch.tensor([0.3, 0.2, 0.4, 0.5]), progress=0.0)
    assert (noisy < 0.6).all() and torch.equal(clean, torch.ones(4))
    assert weighted_mean(losses, noisy) == pytest.approx(2.0 * float(noisy.mean()))
    assert weighted_mean(losses, noisy) < 0.6 * weighted_mean(losses, clean)
    mixed = torch.tensor([1.0, 1.0, 0.0, 0.0])  # two rows dropped: the others keep their share
    assert weighted_mean(torch.tensor([2.0, 2.0, 9.0, 9.0]), mixed) == pytest.approx(1.0)


def test_loss_prune_cuts_inside_the_epoch_where_the_warm_up_ends() -> None:
    """No earlier epoch to decide from (a 1-epoch run): the warm-up part's losses set a cut."""
    prune = FilterPolicy(FilterConfig(policy="loss_prune", prune_fraction=0.25, warmup=0.5))
    losses = torch.tensor([0.5, 3.5, 2.0, 9.0])
    assert not prune.wants_cut(0.4)
    assert prune.wants_cut(0.5)
    prune.set_cut([])  # nothing seen yet this epoch: no cut, asked again next step
    assert prune.wants_cut(0.5)
    prune.set_cut([0.0, 1.0, 2.0, 3.0, 4.0])  # 75th percentile: 3.0
    assert prune.loss_cut == pytest.approx(3.0) and not prune.wants_cut(0.6)
    assert prune.weights(losses, 0.4, losses)[1].tolist() == [1.0, 1.0, 1.0, 1.0]  # warm-up
    assert prune.weights(losses, 0.6, losses)[1].tolist() == [1.0, 0.0, 1.0, 0.0]
    restored = FilterPolicy(prune.config)
    restored.load_state_dict(prune.state_dict())  # a checkpoint inside that epoch
    assert restored.loss_cut == prune.loss_cut
    prune.end_epoch(pl.DataFrame({"position": [0, 1], "loss": [1.0, 2.0]}), 0.7)
    assert prune.loss_cut is None and prune.pruning and not prune.wants_cut(0.8)


def test_warm_up_is_a_share_of_the_run_and_warmup_epochs_is_refused(tmp_path: Path) -> None:
    from moon2.errors import ConfigError
    from moon2.train.config import OptimConfig, TrainConfig

    assert FilterConfig(warmup=0.3).first_update(10) == 3
    assert FilterConfig(warmup=0.3).active(3 / 10) and not FilterConfig(warmup=0.3).active(0.2)
    assert FilterConfig(warmup=1.0).first_update(7) == 7  # never
    assert OptimConfig(epochs=2, batch_size=8).planned_updates(100) == 24
    assert OptimConfig(epochs=2, batch_size=8, max_steps=5).planned_updates(100) == 5
    assert OptimConfig(epochs=1, batch_size=8, grad_accum=4).planned_updates(100, 2) == 1
    old = tmp_path / "old.yaml"
    old.write_text("filter:\n  warmup_epochs: 2\noptim:\n  epochs: 8\n")
    with pytest.raises(ConfigError, match=r"replaced by filter.warmup.*'warmup: 0.25'"):
        TrainConfig.from_yaml(old)


# --- the loop -----------------------------------------------------------------------------


def _recall_at(encoder, catalog: Path, k: int = 10) -> float:
    import io

    from PIL import Image

    products = pq.read_table(catalog / "products").to_pylist()
    queries = [q for q in pq.read_table(catalog / "queries").to_pylist() if q["query_text"]]
    product_items = [
        EncodeItem(
            text=p["title"],
            images=[Image.open(io.BytesIO(p["images"][0]["bytes"]))] if p["images"] else [],
        )
        for p in products
    ]
    ids = [p["product_id"] for p in products]
    candidates = np.concatenate(
        [encoder.encode(product_items[i : i + 64]) for i in range(0, len(product_items), 64)]
    )
    query_emb = encoder.encode([EncodeItem(text=q["query_text"]) for q in queries])
    top = np.argsort(-(query_emb @ candidates.T), axis=1)[:, :k]
    hits = [q["positive_id"] in {ids[j] for j in row} for q, row in zip(queries, top, strict=True)]
    return float(np.mean(hits))


def test_view_augmentation_is_seeded_per_epoch_and_off_by_default(
    small_catalog: Path, tmp_path: Path
) -> None:
    from moon2.train.config import DataConfig
    from moon2.train.data import TripletDataset, build_index, prepare_stores

    products, queries = prepare_stores(small_catalog, tmp_path / "cache")
    index = build_index(products, queries)
    position = next(
        i
        for i in range(len(index.query_rows))
        if queries.row(int(index.query_rows[i]))["query_image"]
    )

    def pixels(mode: str, epoch: int) -> list[bytes]:
        config = DataConfig(view_augmentation=mode, intra_image="main")
        dataset = TripletDataset(products, queries, index, config, 0)
        dataset.epoch = epoch
        sample = dataset[position]
        images = [sample["positive"]["intra_image"], *sample["positive"]["images"]]
        images += sample["views"]["i2mm"].images
        return [image.tobytes() for image in images]

    plain = pixels("none", 0)
    assert pixels("none", 1) == plain  # no augmentation: the stored photos, every epoch
    catalog = pixels("catalog", 0)
    assert catalog == pixels("catalog", 0)  # seeded: the same views on a re-run (resume)
    assert catalog[:-1] != plain[:-1] and catalog[-1] == plain[-1]  # query photo untouched
    assert pixels("catalog", 1)[:-1] != catalog[:-1]  # new views each epoch
    assert pixels("all", 0)[-1] != plain[-1]


def test_end_to_end_outputs(trained: Path, small_catalog: Path) -> None:
    summary = json.loads((trained / "train_summary.json").read_text())
    queries = pq.read_table(small_catalog / "queries").num_rows
    assert summary["queries_used"] + summary["queries_rejected"] == queries
    assert (trained / "train_config.yaml").exists()
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == summary["updates"]
    for key in (
        "loss",
        "loss_t2mm",
        "loss_i2mm",
        "loss_mm2mm",
        "loss_intra",
        "loss_aux",
        "loss_sparsity",
        "omega_t2mm",
        "omega_intra",
        "lr",
        "samples_per_s",
    ):
        assert key in records[-1], key
    assert len(records[-1]["usage_text"]) == 4
    for epoch in range(TRAINED_EPOCHS):
        table = pl.read_parquet(trained / "scores" / f"epoch-{epoch:03d}.parquet")
        assert set(table.columns) >= {
            "sample_id",
            "epoch",
            "loss",
            "margin",
            "phi",
            "weight",
            "kept",
        }
        assert table["sample_id"].n_unique() == table.height
        assert (table["epoch"] == epoch).all()
    report = json.loads((trained / "filter_report.json").read_text())
    assert report["policy"] == "margin_weighting" and len(report["epochs"]) == TRAINED_EPOCHS


def test_training_improves_retrieval(trained: Path, small_catalog: Path) -> None:
    from moon2.train.model import Moon2Encoder

    config = tiny_config()
    backbone, processor = build_backbone(config.model, config.seed)
    untrained = Moon2Encoder(
        Moon2Model(
            backbone, config.model, config.moe, prefix_tokens=template_prefix_tokens(processor)
        ),
        processor,
        torch.device("cpu"),
    )
    before = _recall_at(untrained, small_catalog)
    after = _recall_at(load_model(trained / "final", device="cpu"), small_catalog)
    assert after > before + 0.1, (before, after)


def test_final_model_loads_in_one_call_and_embeds(
    trained: Path, small_catalog: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    import moon2
    from moon2.cli import app

    encoder = moon2.load_model(trained / "final", device="cpu")
    vectors = encoder.encode(_items())
    assert vectors.shape == (3, encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    result = CliRunner().invoke(
        app,
        [
            "embed",
            str(trained / "final"),
            str(small_catalog),
            str(tmp_path / "emb"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    products = pq.read_table(tmp_path / "emb" / "products")
    assert products.num_rows == pq.read_table(small_catalog / "products").num_rows
    assert products.schema.field("embedding").type.list_size == encoder.dim


def test_rejects_bad_rows_and_keeps_training(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    (catalog / "products").mkdir(parents=True)
    (catalog / "queries").mkdir()
    colours = [(i * 20 % 256, 255 - i * 20 % 256, i * 7 % 256) for i in range(12)]
    products = [
        product_row(
            f"p{i}",
            title=f"product number {i} in colour {c}",
            images=[{"bytes": png_bytes(c, 32), "path": None}],
        )
        for i, c in enumerate(colours)
    ]
    pq.write_table(products_table(products), catalog / "products" / "p.parquet")
    queries = [query_row(f"q{i}", f"p{i % 12}", query_text=f"number {i % 12}") for i in range(24)]
    queries.append(query_row("ghost", "no-such-product"))
    queries.append(query_row("empty", "p1", query_text=None))
    queries.append(
        query_row(
            "broken", "p2", query_text=None, query_image={"bytes": b"not an image", "path": None}
        )
    )
    pq.write_table(queries_table(queries), catalog / "queries" / "q.parquet")
    out = tmp_path / "run"
    train(catalog, out, tiny_config(optim={"epochs": 1, "batch_size": 4}))
    rejects = pq.read_table(out / "_rejects" / "queries").to_pylist()
    reasons = {r["query_id"]: r["reject_reason"] for r in rejects}
    assert set(reasons) == {"ghost", "empty", "broken"}
    assert "no-such-product" in reasons["ghost"]
    assert (out / "final" / "model.safetensors").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["queries_used"] + summary["queries_rejected"] == len(queries)


@pytest.mark.parametrize(
    "policy", [{"warmup": 0.3}, {"policy": "loss_prune", "warmup": 0.5, "prune_fraction": 0.3}]
)
def test_a_short_run_filters_and_says_what_each_mechanism_did(
    small_catalog: Path, tmp_path: Path, policy: dict
) -> None:
    """1 epoch cut to 4 updates: the warm-up is a share of them, so the filter acts."""
    config = tiny_config(optim={"epochs": 1, "max_steps": 4}, filter=policy)
    summary = train(small_catalog, tmp_path / "run", config).summary
    mechanisms = summary["mechanisms"]
    scores = pl.read_parquet(tmp_path / "run" / "scores" / "epoch-000.parquet")
    acted = scores.filter(pl.col("weight") < 1)
    assert mechanisms["steps"] == 4
    filtered = mechanisms["dynamic_filter"]
    assert filtered["acted"] and filtered["epochs"] == 1
    assert filtered["samples"] == acted.height > 0
    assert filtered["first_update"] == {0.3: 2, 0.5: 2}[policy["warmup"]]  # ceil(share x 4)
    # only samples of the updates after the warm-up were touched (8 samples per update)
    assert scores.height == 32 and acted.height <= 8 * (4 - filtered["first_update"])
    assert mechanisms["intra_loss"] == {"ran": True, "steps": 4}
    assert mechanisms["moe"] == {"ran": True, "steps": 4}
    augmented = mechanisms["co_augmentation"]  # the synthetic catalog has no aug_* columns
    assert not augmented["ran"] and augmented["with_aug_title"] == 0
    assert augmented["candidates"] > 0


def test_switched_off_mechanisms_show_zero(small_catalog: Path, tmp_path: Path) -> None:
    config = tiny_config(
        optim={"epochs": 1, "max_steps": 3},
        filter={"enabled": False, "warmup": 0.0},
        moe={"enabled": False},
        loss={"intra": False},
    )
    mechanisms = train(small_catalog, tmp_path / "run", config).summary["mechanisms"]
    assert mechanisms["dynamic_filter"]["acted"] is False
    assert mechanisms["dynamic_filter"]["samples"] == mechanisms["dynamic_filter"]["epochs"] == 0
    assert mechanisms["intra_loss"] == {"ran": False, "steps": 0}
    assert mechanisms["moe"] == {"ran": False, "steps": 0}


def test_a_filter_whose_warm_up_covers_the_run_is_warned_about(
    small_catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moon2.train import trainer

    warnings: list[str] = []
    monkeypatch.setattr(trainer.progress, "warn", warnings.append)
    config = tiny_config(optim={"epochs": 1, "max_steps": 2}, filter={"warmup": 1.0})
    mechanisms = train(small_catalog, tmp_path / "run", config).summary["mechanisms"]
    assert any("will not act" in w and "covers all 2 updates" in w for w in warnings)
    assert not mechanisms["dynamic_filter"]["acted"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def _train_command(data: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "moon2.cli",
        "train",
        str(data),
        str(out),
        "--config",
        str(config),
        *extra,
    ]


def test_killed_run_resumes_to_the_same_weights(small_catalog: Path, tmp_path: Path) -> None:
    config = tiny_config(optim={"epochs": 2, "batch_size": 8}, checkpoint={"every_steps": 4})
    config_path = tmp_path / "tiny.yaml"
    config.to_yaml(config_path)
    reference = tmp_path / "reference"
    train(small_catalog, reference, config)

    killed = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen(
        _train_command(small_catalog, killed, config_path), stdout=log, stderr=log
    )
    deadline = time.monotonic() + 300
    # kill mid-run: once the second checkpoint (step 8, inside epoch 0) is complete
    while not (killed / "checkpoints" / "step-0000008").exists():
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists()

    with pytest.raises(Exception, match="--resume"):
        train(small_catalog, killed, config)
    train(small_catalog, killed, config, resume=True)
    expected, got = _weights(reference), _weights(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)
    for epoch in (0, 1):
        a = pl.read_parquet(reference / "scores" / f"epoch-{epoch:03d}.parquet")
        b = pl.read_parquet(killed / "scores" / f"epoch-{epoch:03d}.parquet")
        assert a["sample_id"].to_list() == b["sample_id"].to_list()
        np.testing.assert_allclose(a["loss"].to_numpy(), b["loss"].to_numpy(), atol=1e-4)


def test_ddp_two_cpu_processes(small_catalog: Path, tmp_path: Path) -> None:
    # loss_prune: its in-epoch cut gathers both ranks' losses at the same step
    config = tiny_config(
        optim={"epochs": 1, "batch_size": 4, "max_steps": 6},
        filter={"policy": "loss_prune", "prune_fraction": 0.25},
    )
    config_path = tmp_path / "tiny.yaml"
    config.to_yaml(config_path)
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "moon2.cli",
        "train",
        str(small_catalog),
        str(out),
        "--config",
        str(config_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["updates"] == 6
    scores = pl.read_parquet(out / "scores" / "epoch-000.parquet")
    assert scores.height == 6 * 4 * 2  # both ranks' samples, gathered
    mechanisms = summary["mechanisms"]  # both ranks' counts, summed
    assert mechanisms["steps"] == mechanisms["intra_loss"]["steps"] == 6 * 2
    assert mechanisms["dynamic_filter"]["samples"] == scores.filter(pl.col("weight") < 1).height
    assert mechanisms["dynamic_filter"]["acted"]
    assert load_model(out / "final", device="cpu").encode(_items()).shape[0] == 3


def test_every_rank_makes_the_same_rescoring_calls_on_at_least_two_samples() -> None:
    from moon2.train.trainer import _rescore_calls, _rescore_samples

    dropped, batch_size = list(range(0, 22, 2)), 4  # 11 dropped samples on 2 ranks: 6 + 5
    counts = [len(dropped[rank::2]) for rank in range(2)]
    assert _rescore_calls(counts, batch_size) == 2  # was 2 calls on rank 0, 1 on rank 1
    assert _rescore_calls([0, 1], batch_size) == 1 and _rescore_calls([0, 0], batch_size) == 0
    dataset = {p: {"position": p} for p in range(22)}
    dataset[4] = {"position": 4, "rejected": "query_image: truncated"}  # unreadable
    last = dropped[1::2][batch_size:]  # rank 1's second chunk: 1 sample
    samples, real = _rescore_samples(dataset, last, dropped)
    assert real == 1 and [s["position"] for s in samples] == [18, 0]  # padded, not a copy
    samples, real = _rescore_samples(dataset, [], dropped)  # a rank with nothing left
    assert real == 0 and [s["position"] for s in samples] == [0, 2]
    samples, real = _rescore_samples(dataset, [2, 4], dropped)  # 4 cannot be read
    assert real == 1 and [s["position"] for s in samples] == [2, 0]
    samples, real = _rescore_samples(dataset, [8], [8])  # no other sample: a copy
    assert real == 1 and [s["position"] for s in samples] == [8, 8]


def _uneven_catalog(catalog: Path, queries: int, broken: set[int]) -> None:
    """12 products and ``queries`` text queries; those at ``broken`` carry a query image whose
    header reads but whose pixels do not decode (rejected when the sample is read)."""
    (catalog / "products").mkdir(parents=True)
    (catalog / "queries").mkdir()
    products = [product_row(f"p{i}", title=f"product number {i}") for i in range(12)]
    pq.write_table(products_table(products), catalog / "products" / "p.parquet")
    truncated = {"bytes": png_bytes((9, 9, 9), 32)[:60], "path": None}
    rows = [
        query_row(f"q{i}", f"p{i % 12}", query_text=f"number {i % 12}")
        | ({"query_image": truncated} if i in broken else {})
        for i in range(queries)
    ]
    pq.write_table(queries_table(rows), catalog / "queries" / "q.parquet")


def _run_torchrun(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run torchrun ``command``; on timeout fail, after SIGTERM has made torchrun stop its
    workers (each in a session of its own, blocked in a collective when ranks hang)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    process = subprocess.Popen(command, env=env, **pipes)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # torchrun: SIGTERM to its workers, SIGKILL after 30 s
        process.communicate(timeout=90)
        pytest.fail(f"torchrun still running after {timeout} s: its ranks are out of step")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_ddp_ranks_stay_in_step_with_uneven_batches_and_odd_drops(tmp_path: Path) -> None:
    """Every rank makes the same forward calls (each has collectives) when rank 1's first
    batch is all unreadable samples, 3 dropped samples are re-scored on 2 ranks (2 + 1,
    batch 4) and epoch 1's 25 kept samples leave a remainder of 1 (one global batch is 8)."""
    from moon2.train.trainer import _epoch_batches

    size, batch_size = 28, 4
    broken = set(_epoch_batches(size, 0, 0, set(), batch_size, rank=1, world=2)[0])
    catalog = tmp_path / "catalog"
    _uneven_catalog(catalog, size, broken)
    config = tiny_config(
        optim={"epochs": 2, "batch_size": batch_size},
        filter={"policy": "loss_prune", "prune_fraction": 0.2, "warmup": 0.0},
    )
    config_path = tmp_path / "tiny.yaml"
    config.to_yaml(config_path)
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", *_train_command(catalog, out, config_path)[1:]]
    result = _run_torchrun(command, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first = pl.read_parquet(out / "scores" / "epoch-000.parquet")
    # step 0 ran on neither rank (rank 1 had nothing to train on): 2 steps x 8 samples
    assert first.height == 16 and not set(first["position"]) & broken
    second = pl.read_parquet(out / "scores" / "epoch-001.parquet")
    dropped = second.filter(~pl.col("kept"))
    assert dropped.height == round(0.2 * first.height) == 3  # odd: split 2 + 1 over ranks
    assert dropped["position"].is_unique().all()  # the padding's results were discarded
    assert len(pq.read_table(out / "_rejects" / "queries")) == len(broken)


@pytest.mark.slow
def test_ray_train_local_two_workers(small_catalog: Path, tmp_path: Path) -> None:
    from moon2.train.launch import train_on_ray

    config = tiny_config(optim={"epochs": 1, "batch_size": 4, "max_steps": 4})
    result = train_on_ray(
        small_catalog, tmp_path / "ray", config, resume=False, address="local", num_workers=2
    )
    assert result.summary["world_size"] == 2 and result.steps == 4
    assert (tmp_path / "ray" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "sections",
    [
        {"model": {"gradient_checkpointing": True}},
        {"model": {"lora": {"enabled": True, "r": 4, "alpha": 8}}},
    ],
    ids=["gradient_checkpointing", "lora"],
)
def test_gradient_checkpointing_and_lora_train_and_save_plain_models(
    small_catalog: Path, tmp_path: Path, sections: dict
) -> None:
    model_section = {**TINY["model"], **sections["model"]}
    config = tiny_config(model=model_section, optim={"epochs": 1, "max_steps": 3})
    out = tmp_path / "run"
    train(small_catalog, out, config)
    weights = _weights(out)
    assert not any("lora_" in name for name in weights)  # LoRA merged into the base weights
    encoder = load_model(out / "final", device="cpu")
    assert np.isfinite(encoder.encode(_items())).all()


def test_frozen_token_embeddings_stay_as_built(small_catalog: Path, tmp_path: Path) -> None:
    from moon2.train.model import load_moon2_model

    results = {}
    for frozen in (True, False):
        config = tiny_config(
            model={**TINY["model"], "freeze_token_embeddings": frozen},
            optim={"epochs": 1, "max_steps": 3},
        )
        out = tmp_path / f"run-{frozen}"
        train(small_catalog, out, config)
        model, _, _ = load_moon2_model(out / "final", torch.device("cpu"))
        results[frozen] = model.backbone.get_input_embeddings().weight.detach()
    backbone, _ = build_backbone(tiny_config().model, seed=0)
    built = backbone.get_input_embeddings().weight.detach()
    torch.testing.assert_close(results[True], built, rtol=0, atol=0)
    assert not torch.equal(results[False], built)  # trained otherwise


def test_backbone_from_a_local_directory(small_catalog: Path, tmp_path: Path) -> None:
    """The hub-id / local-path loading code, on a tiny Qwen2-VL saved like a hub model."""
    from moon2.models.offline import build_tiny_qwen2vl

    local = build_tiny_qwen2vl(tmp_path / "qwen2vl-tiny", hidden_size=32, layers=2, vision_depth=1)
    model_section = {**TINY["model"], "backbone": str(local)}
    config = tiny_config(model=model_section, optim={"epochs": 1, "max_steps": 2})
    train(small_catalog, tmp_path / "run", config)
    encoder = load_model(tmp_path / "run" / "final", device="cpu")
    assert encoder.encode(_items()).shape == (3, 32)


def test_view_background_reaches_every_random_view(
    small_catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moon2.train.data as data_module
    from moon2.train.config import DataConfig

    products, queries = data_module.prepare_stores(small_catalog, tmp_path / "cache")
    index = data_module.build_index(products, queries)
    seen: list[float] = []

    def recording_view(image, rng, **kwargs):
        seen.append(kwargs["background_probability"])
        return image

    monkeypatch.setattr(data_module, "random_view", recording_view)
    config = DataConfig(view_augmentation="all", view_background=0.0)
    dataset = data_module.TripletDataset(products, queries, index, config, 0)
    for position in range(len(index.query_rows)):
        dataset[position]
    assert seen and set(seen) == {0.0}
    assert DataConfig().view_background == 0.5


def test_catalog_queries_are_the_positives_own_photos_seeded_per_epoch(
    small_catalog: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moon2.train.data as data_module
    from moon2.data.images import decode_image
    from moon2.train.config import DataConfig

    products, queries = data_module.prepare_stores(small_catalog, tmp_path / "cache")
    index = data_module.build_index(products, queries)
    monkeypatch.setattr(data_module, "random_view", lambda image, rng, **kwargs: image)

    def photos(row: int) -> list[bytes]:
        cells = [c for c in products.row(row)["images"] or [] if c is not None]
        return [decode_image(c).tobytes() for c in (cells[1:] or cells)]

    off = data_module.TripletDataset(products, queries, index, DataConfig(catalog_queries=0.0), 0)
    assert DataConfig().catalog_queries == 1.0
    assert all("catalog_query" not in off[p] for p in range(len(off)))
    dataset = data_module.TripletDataset(
        products, queries, index, DataConfig(catalog_queries=1.0), 0
    )
    drawn: dict[int, list[bytes]] = {}
    for epoch in (0, 1):
        dataset.epoch = epoch
        for position in range(len(dataset)):
            sample = dataset[position]
            choices = photos(int(index.positive_rows[position]))
            if not choices:
                assert "catalog_query" not in sample
                continue
            (image,) = sample["catalog_query"].images
            assert image.tobytes() in choices  # a non-main photo whenever there is one
            assert dataset[position]["catalog_query"].images[0].tobytes() == image.tobytes()
            drawn.setdefault(position, []).append(image.tobytes())
    assert any(len(set(pair)) == 2 for pair in drawn.values())  # a new draw each epoch
    half = data_module.TripletDataset(products, queries, index, DataConfig(catalog_queries=0.5), 0)
    share = np.mean(["catalog_query" in half[p] for p in range(len(half))])
    assert 0.25 < share < 0.75


def test_cached_photos_give_the_same_samples_and_persistent_workers_see_each_epoch(
    small_catalog: Path, tmp_path: Path
) -> None:
    from moon2.train.config import DataConfig
    from moon2.train.data import TripletDataset, build_index, prepare_stores
    from moon2.train.trainer import _EpochBatches

    products, queries = prepare_stores(small_catalog, tmp_path / "cache")
    index = build_index(products, queries)
    # random views of every photo with new backgrounds: decodes and mattes both cached
    settings = {"catalog_queries": 1.0, "view_augmentation": "all", "view_background": 1.0}
    cached = TripletDataset(products, queries, index, DataConfig(**settings), 0)
    plain = TripletDataset(products, queries, index, DataConfig(**settings, image_cache_mb=0), 0)

    def pictures(sample: dict) -> list[bytes]:
        items = [*sample["views"].values(), sample.get("catalog_query")]
        images = [im for item in items if item is not None for im in item.images]
        for product in [sample["positive"], *sample["negatives"]]:
            images += [*product["images"], product["intra_image"]]
        return [im.tobytes() for im in images if im is not None]

    positions = list(range(0, len(cached), 3))
    by_epoch = {}
    for epoch in (0, 1):
        plain.epoch = epoch
        by_epoch[epoch] = [pictures(plain[p]) for p in positions]
        assert [pictures(cached[(epoch, p)]) for p in positions] == by_epoch[epoch]
    assert by_epoch[0] != by_epoch[1]
    assert cached.images.hits > 0 and plain.images.hits == 0
    assert any(key[0] == "matte" for key in cached.images._items)

    # one DataLoader for all epochs, as the trainer builds it: its worker persists and is told
    # each epoch through the keys
    sampler = _EpochBatches()
    loader = torch.utils.data.DataLoader(
        cached,
        batch_sampler=sampler,
        collate_fn=lambda samples: [pictures(s) for s in samples],
        num_workers=1,
        persistent_workers=True,
    )
    for epoch in (0, 1, 0):
        sampler.batches = [
            [(epoch, p) for p in positions[:4]],
            [(epoch, p) for p in positions[4:8]],
        ]
        seen = [pics for batch in loader for pics in batch]
        assert seen == by_epoch[epoch][:8]


def test_catalog_queries_join_the_i2mm_loss_but_not_the_filter_scores(
    small_catalog: Path, tmp_path: Path
) -> None:
    from moon2.train.data import (
        CATALOG_QUERIES,
        Collator,
        TripletDataset,
        build_index,
        prepare_stores,
    )
    from moon2.train.objective import Objective

    config = tiny_config(data={"catalog_queries": 1.0})
    products, queries = prepare_stores(small_catalog, tmp_path / "cache")
    index = build_index(products, queries)
    dataset = TripletDataset(products, queries, index, config.data, 0)
    backbone, processor = build_backbone(config.model, seed=0)
    model = Moon2Model.with_processor(backbone, processor, config.model, config.moe)
    objective = Objective(model, config).eval()  # running centring: rows do not mix
    collate = Collator(processor, config.model, intra=True)
    samples = [dataset[p] for p in range(8)]
    with_catalog = collate(samples)
    assert CATALOG_QUERIES in with_catalog.groups and with_catalog.catalog_rows
    without = collate([{k: v for k, v in s.items() if k != "catalog_query"} for s in samples])
    assert CATALOG_QUERIES not in without.groups
    policy = FilterPolicy(config.filter)
    with torch.no_grad():
        a = objective(with_catalog, 0.5, 0, policy)
        b = objective(without, 0.5, 0, policy)
    torch.testing.assert_close(a.sample_loss, b.sample_loss)
    torch.testing.assert_close(a.margin, b.margin)
    assert a.parts["loss_i2mm"] != pytest.approx(b.parts["loss_i2mm"])
    assert a.parts["loss_t2mm"] == pytest.approx(b.parts["loss_t2mm"])


def _products_store(path: Path, rows: list[dict]):
    """An ArrowStore (memory-mapped IPC file) of contract product rows."""
    import pyarrow.ipc as ipc

    from moon2.train.data import ArrowStore

    table = products_table(rows)
    with ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    return ArrowStore(path)


def test_duplicate_groups_follow_build_benchs_rule(tmp_path: Path) -> None:
    from moon2.train.data import prepare_duplicate_groups, product_duplicate_groups

    shared = {"bytes": png_bytes((1, 2, 3)), "path": None}
    placeholder = {"bytes": png_bytes((250, 250, 250)), "path": None}
    rows = [
        product_row("a", title="Red Cotton T-Shirt, large"),
        product_row("a-copy", title="large red cotton t shirt"),  # same normalised title
        product_row("b", title="blue denim jacket", images=[shared]),
        product_row("b-copy", title="a jacket listed again", images=[shared]),  # same bytes
        product_row("c", title="shoe"),  # 1 word: too generic to mark a duplicate
        product_row("c-other", title="Shoe"),
        *[product_row(f"n{i}", title=f"item number {i}", images=[placeholder]) for i in range(4)],
    ]
    store = _products_store(tmp_path / "products.arrow", rows)
    groups = product_duplicate_groups(store, min_title_tokens=3, max_group=3)
    assert groups[0] == groups[1] and groups[2] == groups[3]
    assert len(set(groups.tolist())) == len(rows) - 2  # only those two pairs join
    # a placeholder image shared by more products than max_group joins none of them
    assert len(set(groups[6:].tolist())) == 4
    # cached only beside the record of which products they are (what prepare_stores writes)
    assert not (tmp_path / "products.source").exists()
    np.testing.assert_array_equal(prepare_duplicate_groups(store, tmp_path, 3, 3), groups)
    assert not (tmp_path / "duplicate_groups.npy").exists()
    (tmp_path / "products.source").write_text("the products' files, sizes and times")
    cached = prepare_duplicate_groups(store, tmp_path, 3, 3)
    np.testing.assert_array_equal(cached, groups)
    np.testing.assert_array_equal(np.load(tmp_path / "duplicate_groups.npy"), groups)


class _FixedEmbeddings(torch.nn.Module):
    """Stands in for Moon2Model: its encoding of a batch is given, row for row."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.embeddings = torch.nn.functional.normalize(embeddings, dim=-1)

    def encode(self, inputs: object):
        from moon2.train.model import Encoded

        return Encoded(embeddings=self.embeddings, gates=None, routings=[])


def _nce(logits: list[list[float]], row: int, positive: int, columns: list[int]) -> float:
    """-log softmax of logits[row][positive] among ``columns`` (by hand)."""
    return -logits[row][positive] + float(np.log(sum(np.exp(logits[row][c]) for c in columns)))


def _dot_products(left: list[list[float]], right: list[list[float]]) -> list[list[float]]:
    return [[sum(a * b for a, b in zip(u, v, strict=True)) for v in right] for u in left]


def test_duplicates_are_never_each_others_negatives_in_either_loss() -> None:
    import dataclasses

    from moon2.train.objective import Objective

    # candidates a, a2 (a duplicate listing of a) and b; query 0 buys a and is given a2 as a
    # negative (a false negative), query 1 buys b; the intra loss aligns a, a2 and b
    candidates = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]
    queries = [[0.6, 0.8], [0.8, 0.6]]
    intra_images = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]
    intra_texts = [[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]]
    rows = torch.tensor(candidates + queries + intra_images + intra_texts)
    batch = duplicate_pair_batch()
    config = tiny_config(
        moe={"enabled": False},
        filter={"enabled": False},
        loss={"temperature": 0.5, "intra_temperature": 0.5, "learnable_temperature": False},
    )
    objective = Objective(_FixedEmbeddings(rows), config)
    policy = FilterPolicy(config.filter)
    with torch.no_grad():
        masked = objective(batch, 0.5, 0, policy)
        unmasked = objective(
            dataclasses.replace(batch, candidate_dup_groups=[], intra_dup_groups=[]),
            0.5,
            0,
            policy,
        )
    scores = _dot_products(queries, candidates)  # every vector has unit length
    logits = [[s / 0.5 for s in row] for row in scores]
    # query 0 without the duplicate's column; query 1 (b) keeps both listings of a
    inter = (_nce(logits, 0, 0, [0, 2]) + _nce(logits, 1, 2, [0, 1, 2])) / 2
    assert masked.parts["loss_t2mm"] == pytest.approx(inter, rel=1e-5)
    assert unmasked.parts["loss_t2mm"] != pytest.approx(inter, rel=1e-3)
    # the given duplicate is no negative for the filter's margin either: b is the hardest left
    assert masked.margin[0].item() == pytest.approx(scores[0][0] - scores[0][2], abs=1e-5)
    intra_logits = [[s / 0.5 for s in row] for row in _dot_products(intra_images, intra_texts)]
    transposed = [list(column) for column in zip(*intra_logits, strict=True)]
    keep = [[0, 2], [1, 2], [0, 1, 2]]  # a and a2 without each other's column
    per_product = [
        (_nce(intra_logits, i, i, keep[i]) + _nce(transposed, i, i, keep[i])) / 2 for i in range(3)
    ]
    intra = sum(per_product) / 3
    assert masked.parts["loss_intra"] == pytest.approx(intra, rel=1e-5)
    assert unmasked.parts["loss_intra"] != pytest.approx(intra, rel=1e-3)


def test_samples_and_batches_carry_each_products_duplicate_group(
    small_catalog: Path, tmp_path: Path
) -> None:
    from moon2.train.data import Collator, TripletDataset, build_index, prepare_stores

    config = tiny_config()
    products, queries = prepare_stores(small_catalog, tmp_path / "cache")
    index = build_index(products, queries)
    groups = np.arange(len(products)) + 1000
    first, second = (int(index.positive_rows[p]) for p in (0, 1))
    groups[second] = groups[first]  # the two positives are one item
    dataset = TripletDataset(products, queries, index, config.data, 0, duplicate_groups=groups)
    samples = [dataset[p] for p in range(4)]
    assert samples[0]["positive"]["duplicate_group"] == samples[1]["positive"]["duplicate_group"]
    _, processor = build_backbone(config.model, seed=0)
    batch = Collator(processor, config.model, intra=True)(samples)
    row_of = {pid: i for i, pid in enumerate(products.column("product_id"))}
    assert batch.candidate_dup_groups == [groups[row_of[c]] for c in batch.candidate_ids]
    assert batch.intra_dup_groups == [groups[row_of[c]] for c in batch.intra_ids]


def test_images_per_product_a_checkpoint_trained_with_unless_the_user_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moon2.train.model as model_module
    from moon2.bench.embed import embed_catalog
    from moon2.models.base import DEFAULT_MAX_IMAGES, settle_max_images
    from moon2.train.model import save_model

    config = tiny_config()
    backbone, processor = build_backbone(config.model, seed=0)
    model = Moon2Model.with_processor(backbone, processor, config.model, config.moe)
    final = save_model(model, processor, tmp_path / "final", max_images=2)
    catalog = tmp_path / "catalog"
    (catalog / "products").mkdir(parents=True)
    photos = [{"bytes": png_bytes((40 * k, 90, 200), 32), "path": None} for k in range(4)]
    rows = [product_row(f"p{i}", images=photos) for i in range(2)]
    pq.write_table(products_table(rows), catalog / "products" / "p.parquet")
    given: list[int] = []  # the most images of an item the model was given, per call
    original = model_module.build_inputs

    def counting(processor, items, *args, **kwargs):
        given.append(max(len(item.images) for item in items))
        return original(processor, items, *args, **kwargs)

    monkeypatch.setattr(model_module, "build_inputs", counting)
    for requested, expected in ((None, 2), (3, 3)):  # the checkpoint's 2 beats the default 4
        given.clear()
        out = tmp_path / f"emb-{requested}"
        embed_catalog(str(final), catalog, out, device="cpu", max_images=requested)
        assert given == [expected]
        assert json.loads((out / "manifest.json").read_text())["max_images"] == expected
    no_number = type("NoNumber", (), {"max_images": None})()
    assert settle_max_images(no_number, None) == DEFAULT_MAX_IMAGES


def test_patchwise_conv_equals_the_patch_embedding_convolution() -> None:
    from moon2.train.model import PatchwiseConv3d, use_patchwise_matmul

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 16, kernel_size=(2, 14, 14), stride=(2, 14, 14), bias=False)
    holder = torch.nn.Sequential(conv, torch.nn.Conv3d(3, 4, kernel_size=3))
    patches = torch.randn(37, 3, 2, 14, 14)
    expected = conv(patches)
    assert use_patchwise_matmul(holder) == 1  # the overlapping 3x3x3 convolution is left alone
    assert isinstance(holder[0], PatchwiseConv3d) and type(holder[1]) is torch.nn.Conv3d
    torch.testing.assert_close(holder[0](patches), expected, rtol=1e-5, atol=1e-5)
    video = torch.randn(2, 3, 4, 28, 28)  # more than one window: the convolution itself
    torch.testing.assert_close(
        holder[0](video), torch.nn.functional.conv3d(video, conv.weight, stride=(2, 14, 14))
    )
    backbone, _ = build_backbone(tiny_config().model, seed=0)
    assert use_patchwise_matmul(backbone) == 1  # Qwen2-VL's PatchEmbed


@pytest.mark.parametrize(
    "sizes",
    [
        [(4, 4), (4, 8), (4, 4), (8, 8), (8, 4), (4, 4)],  # every image its own run
        [(4, 4), (4, 4), (4, 4), (4, 8), (8, 4), (8, 8), (8, 8)],  # runs of one size
    ],
)
def test_grouped_vision_attention_equals_one_call_per_image(sizes: list[tuple[int, int]]) -> None:
    from moon2.train.model import use_grouped_vision_attention

    backbone, _ = build_backbone(tiny_config().model, seed=0)
    visual = backbone.visual
    grid = torch.tensor([[1, height, width] for height, width in sizes])
    patch_dim = visual.patch_embed.proj.weight[0].numel()
    torch.manual_seed(0)
    pixels = torch.randn(int(grid.prod(-1).sum()), patch_dim)
    expected = visual(pixels, grid_thw=grid).last_hidden_state
    (expected**2).sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in visual.named_parameters() if p.grad is not None}
    assert "blocks.0.attn.qkv.weight" in expected_grads
    visual.zero_grad()
    assert use_grouped_vision_attention(backbone) == len(visual.blocks)
    grouped = visual(pixels, grid_thw=grid).last_hidden_state
    (grouped**2).sum().backward()
    torch.testing.assert_close(grouped, expected, atol=1e-5, rtol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(
            visual.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4, msg=name
        )


def test_silu_quick_gelu_equals_transformers_quick_gelu() -> None:
    from transformers.activations import QuickGELUActivation

    from moon2.train.model import SiLUQuickGELU, use_silu_quick_gelu

    torch.manual_seed(0)
    states = (torch.randn(64, 32) * 4).requires_grad_()
    reference = QuickGELUActivation()(states)
    (reference * torch.arange(32.0)).sum().backward()
    reference_grad, states.grad = states.grad.clone(), None
    swapped = SiLUQuickGELU()(states)
    (swapped * torch.arange(32.0)).sum().backward()
    torch.testing.assert_close(swapped, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(states.grad, reference_grad, atol=1e-5, rtol=1e-5)

    backbone, _ = build_backbone(tiny_config().model, seed=0)
    visual = backbone.visual
    grid = torch.tensor([[1, 4, 4], [1, 8, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), visual.patch_embed.proj.weight[0].numel())
    expected = visual(pixels, grid_thw=grid).pooler_output
    assert use_silu_quick_gelu(backbone) == len(visual.blocks)  # one per vision MLP
    assert use_silu_quick_gelu(backbone) == 0
    torch.testing.assert_close(
        visual(pixels, grid_thw=grid).pooler_output, expected, atol=1e-5, rtol=1e-5
    )


def test_vision_heads_must_split_the_width_into_rotary_widths() -> None:
    from pydantic import ValidationError

    from moon2.train.config import TinyBackboneConfig

    assert TinyBackboneConfig(vision_width=48, vision_heads=2).vision_heads == 2
    for width, heads in ((64, 3), (48, 8)):  # 64 / 3 is no whole width, 48 / 8 = 6
        with pytest.raises(ValidationError, match="vision heads"):
            TinyBackboneConfig(vision_width=width, vision_heads=heads)
    backbone, _ = build_backbone(tiny_config().model, seed=0)
    assert backbone.config.vision_config.num_heads == 2
