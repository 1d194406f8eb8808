"""`moon2 eval`: plumbing checked with an oracle encoder, chance level for untrained models."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from moon2.bench.build import build_bench
from moon2.bench.config import ALL_TASKS, RETRIEVAL_TASKS, BenchConfig, EvalConfig
from moon2.bench.evaluate import evaluate
from moon2.cli import app
from moon2.data.images import decode_image
from moon2.models.base import EncodeItem, Encoder

RETRIEVAL_KEYS = {"R@1", "R@5", "R@10", "MRR@10", "nDCG@10", "mAP"}
LABEL_KEYS = {"acc", "macro_p", "macro_r", "macro_f1"}


@pytest.fixture(scope="module")
def bench(small_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evalbench")
    build_bench(small_catalog, out, BenchConfig.model_validate({"tasks": {"min_items": 3}}))
    return out


def _pixels_key(image) -> str:
    return hashlib.sha1(image.convert("RGB").tobytes(), usedforsecurity=False).hexdigest()


class OracleEncoder(Encoder):
    """Knows every test product: its title and its main image map to the product's own
    random vector. title2image / image2title must then be perfect, which checks the whole
    evaluation path."""

    name = "oracle"

    def __init__(self, bench: Path) -> None:
        rng = np.random.default_rng(0)
        self.vectors: dict[str, np.ndarray] = {}
        owners: dict[str, set[str]] = {}
        for row in pq.read_table(bench / "test" / "products").to_pylist():
            vector = rng.normal(size=32).astype(np.float32)
            keys = [row["title"]] if row["title"] else []
            if row["images"]:
                keys.append(_pixels_key(decode_image(row["images"][0])))
            for key in keys:
                self.vectors.setdefault(key, vector)
                owners.setdefault(key, set()).add(row["product_id"])
        # a title or photo that several products share cannot identify one of them
        self.ambiguous = {pid for ids in owners.values() if len(ids) > 1 for pid in ids}

    @property
    def dim(self) -> int:
        return 32

    def encode(self, items: Sequence[EncodeItem]) -> np.ndarray:
        out = np.zeros((len(items), 32), np.float32)
        for i, item in enumerate(items):
            parts = []
            if item.text and item.text in self.vectors:
                parts.append(self.vectors[item.text])
            if item.images:
                key = _pixels_key(item.images[0])
                if key in self.vectors:
                    parts.append(self.vectors[key])
            if parts:
                vector = np.sum(parts, axis=0)
                out[i] = vector / np.linalg.norm(vector)
        return out


def test_oracle_is_perfect_on_cross_modal_tasks(bench: Path, tmp_path: Path) -> None:
    tasks = ["title2image", "image2title"]
    config = EvalConfig(tasks=tasks, device="cpu", batch_size=16, max_images=1)
    oracle = OracleEncoder(bench)
    result = evaluate(oracle, bench, tmp_path, config)
    for task in tasks:
        metrics = result.results[task]
        assert metrics["R@1"] > 0.9, (task, metrics)
        qrels = pq.read_table(bench / "test" / "tasks" / task / "qrels.parquet").to_pylist()
        relevant: dict[str, set[str]] = {}
        for row in qrels:
            relevant.setdefault(row["query_id"], set()).add(row["candidate_id"])
        top1 = {}
        for line in (tmp_path / "runs" / f"{task}.trec").read_text().splitlines():
            query, _, candidate, rank, _, _ = line.split()
            if rank == "1":
                top1[query] = candidate
        assert set(top1) == set(relevant)
        for query, candidate in top1.items():  # queries here are product ids
            assert candidate in relevant[query] or query in oracle.ambiguous, (task, query)
    run = (tmp_path / "runs" / "title2image.trec").read_text().splitlines()
    first = run[0].split()
    assert first[1] == "Q0" and first[3] == "1" and first[5] == "oracle"
    queries = pq.read_table(bench / "test" / "tasks" / "title2image" / "queries").num_rows
    assert len({line.split()[0] for line in run}) == queries


def test_results_files_have_the_documented_shape(bench: Path, tmp_path: Path) -> None:
    config = EvalConfig(device="cpu", batch_size=32)
    result = evaluate("open_clip:moon2-tiny-clip", bench, tmp_path, config)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == json.loads(json.dumps(result.results))
    assert data["model"] == "open_clip:moon2-tiny-clip"
    manifest = (bench / "manifest.json").read_bytes()
    assert data["bench_manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert "time" in data and data["skipped"] == {}
    for task in ALL_TASKS:
        expected = RETRIEVAL_KEYS if task not in ("cls", "attr") else LABEL_KEYS
        assert set(data[task]) == expected
        assert all(0.0 <= v <= 1.0 for v in data[task].values())
    markdown = (tmp_path / "results.md").read_text()
    assert "| model | t2mm R@10 | i2mm R@10 | mm2mm R@10 | t2i R@10 | i2t R@10 | cls acc |" in (
        markdown
    )
    for task in RETRIEVAL_TASKS:
        assert (tmp_path / "runs" / f"{task}.trec").exists()


def test_untrained_model_is_near_chance(tmp_path: Path) -> None:
    """Random weights still map equal words and equal colours to equal features, so text and
    multimodal tasks sit a little above the exact chance level; all stay far below what a
    trained model reaches (>= 0.6 R@10 on i2mm)."""
    from moon2.data.synth.generator import SynthConfig, synth

    synth(
        SynthConfig(
            products=500, queries_per_product=1.0, noise=0.0, seed=2, image_size=32, workers=1
        ),
        tmp_path / "catalog",
    )
    build_bench(
        tmp_path / "catalog",
        tmp_path / "bench",
        BenchConfig.model_validate({"split": {"test_fraction": 0.3}}),
    )
    result = evaluate(
        "open_clip:moon2-tiny-clip",
        tmp_path / "bench",
        tmp_path / "eval",
        EvalConfig(device="cpu", batch_size=64),
    )
    data, details = result.results, result.results["details"]
    margins = {"t2mm": 0.2, "mm2mm": 0.2, "i2mm": 0.1, "t2i": 0.1, "i2t": 0.1}
    margins |= {"title2image": 0.1, "image2title": 0.1}
    for task, margin in margins.items():
        chance = details[task]["chance_R@10"]
        assert chance < 0.1
        assert data[task]["R@10"] <= chance + margin, (task, data[task], chance)
    assert data["cls"]["acc"] <= details["cls"]["chance_acc"] + 0.1
    assert data["attr"]["acc"] <= details["attr"]["chance_acc"] + 0.1


def test_text_only_model_skips_image_tasks(bench: Path, tmp_path: Path) -> None:
    from moon2.models.offline import minilm_dir

    config = EvalConfig(device="cpu", tasks=["t2mm", "i2mm", "t2i", "cls"])
    result = evaluate(f"hf:{minilm_dir()}", bench, tmp_path, config)
    assert set(result.skipped) == {"i2mm", "t2i"}
    assert "cannot read image inputs" in result.skipped["i2mm"]
    assert set(result.results["t2mm"]) == RETRIEVAL_KEYS
    # real sentence embeddings match shopper keywords to seller titles well above chance
    assert result.results["t2mm"]["R@10"] > result.results["details"]["t2mm"]["chance_R@10"] + 0.2


def test_vision_language_model_from_a_local_directory(bench: Path, tmp_path: Path) -> None:
    from moon2.models.offline import build_tiny_qwen2vl

    model_dir = build_tiny_qwen2vl(tmp_path / "tiny-qwen2vl")
    config = EvalConfig(device="cpu", tasks=["i2mm", "t2i"], max_images=1, batch_size=8)
    result = evaluate(f"hf:{model_dir}", bench, tmp_path / "eval", config)
    assert result.skipped == {}
    assert set(result.results["i2mm"]) == RETRIEVAL_KEYS


class _CappedEncoder(Encoder):
    """Reads at most ``max_images`` images of an item, as a moon2 checkpoint does (the number
    it trained with); remembers the most it was given."""

    name = "capped"

    def __init__(self, max_images: int) -> None:
        self.max_images = max_images
        self.most = 0

    @property
    def dim(self) -> int:
        return 4

    def encode(self, items: Sequence[EncodeItem]) -> np.ndarray:
        self.most = max(self.most, *(len(item.images) for item in items))
        return np.tile(np.eye(4, dtype=np.float32)[0], (len(items), 1))


def test_eval_gives_a_checkpoint_its_own_image_count_unless_the_user_chooses(
    bench: Path, tmp_path: Path
) -> None:
    for requested, expected in ((None, 2), (3, 3)):  # the encoder's 2 beats the default 4
        encoder = _CappedEncoder(max_images=2)
        config = EvalConfig(device="cpu", tasks=["mm2mm"], max_images=requested)
        evaluate(encoder, bench, tmp_path / f"eval-{requested}", config)
        assert encoder.most == expected and encoder.max_images == expected
        used = EvalConfig.from_yaml(tmp_path / f"eval-{requested}" / "eval_config.yaml")
        assert used.max_images == expected


def test_unbuilt_tasks_are_skipped_with_the_reason(tmp_path: Path, small_catalog: Path) -> None:
    build_bench(
        small_catalog,
        tmp_path / "bench",
        BenchConfig.model_validate({"tasks": {"tasks": ["t2mm"], "min_items": 3}}),
    )
    config = EvalConfig(device="cpu", tasks=["t2mm", "cls"])
    result = evaluate("open_clip:moon2-tiny-clip", tmp_path / "bench", tmp_path / "e", config)
    assert set(result.results) >= {"t2mm"} and "cls" not in result.results
    assert result.skipped["cls"].startswith("not in the benchmark")


def test_cli_eval_and_errors(bench: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "eval",
            "open_clip:moon2-tiny-clip",
            str(bench),
            str(tmp_path / "out"),
            "--tasks",
            "t2mm,cls",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| open_clip:moon2-tiny-clip |" in result.stdout
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(data) & set(ALL_TASKS) == {"t2mm", "cls"}
    other = str(tmp_path / "o")
    bad = runner.invoke(app, ["eval", "open_clip:nonexistent-arch", str(bench), other])
    assert bad.exit_code == 2 and "unknown open_clip architecture" in bad.stderr
    bad = runner.invoke(app, ["eval", "open_clip:moon2-tiny-clip", str(tmp_path), other])
    assert bad.exit_code == 2 and "is not a moon2 benchmark" in bad.stderr
    bad = runner.invoke(app, ["eval", str(tmp_path / "out"), str(bench), str(tmp_path / "o")])
    assert bad.exit_code == 2 and "is not a moon2 checkpoint" in bad.stderr
    offline = runner.invoke(
        app,
        ["eval", "open_clip:moon2-tiny-clip:laion2b_s34b_b79k", str(bench), str(tmp_path / "o")],
    )
    assert offline.exit_code == 2
    assert "pass a local checkpoint path" in offline.stderr


def test_open_clip_checkpoint_path_loads_safely(bench: Path, tmp_path: Path) -> None:
    import open_clip
    import torch

    from moon2.models.openclip import _register_moon2_configs

    _register_moon2_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("moon2-tiny-clip")
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    from moon2.models import load_encoder

    encoder = load_encoder(f"open_clip:moon2-tiny-clip:{tmp_path / 'ckpt.pt'}", device="cpu")
    first = encoder.encode([EncodeItem(text="red shirt")])
    again = load_encoder(f"open_clip:moon2-tiny-clip:{tmp_path / 'ckpt.pt'}", device="cpu")
    assert np.allclose(first, again.encode([EncodeItem(text="red shirt")]))
    # a pickle that would run code is refused
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": Evil()}))
    from moon2.errors import InputError

    with pytest.raises(InputError, match="cannot load checkpoint"):
        load_encoder(f"open_clip:moon2-tiny-clip:{tmp_path / 'evil.pt'}", device="cpu")
