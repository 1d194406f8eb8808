"""``moon2 eval``: run any encoder on a ``moon2 build-bench`` benchmark, zero-shot.

Embeddings are computed once per (table, modality) and shared between tasks: the test
products' multimodal embeddings serve t2mm, i2mm, mm2mm, cls and attr, their main-image
embeddings t2i and title2image, their title embeddings i2t and image2title. Retrieval is exact
top-``depth`` by chunked matrix products (``moon2.bench.retrieval``), never a full
queries x candidates matrix; ties go to the earlier position in the task's (shuffled)
candidate list. Classification and attribute prediction pick the nearest label-text
embedding.

Writes ``OUT/results.json`` (task -> metric -> value, plus model, bench manifest hash, time),
``OUT/results.md``, ``OUT/runs/<task>.trec`` and ``OUT/per_query/<task>.parquet``: the rows
each mean in results.json averages (:func:`per_query_ids` names their id columns):

- retrieval: ``query_id``, ``rank`` (1-based rank of the first relevant candidate, null
  beyond the searched depth) and one float column per metric (``R@1`` ... ``mAP``);
- cls and attr: the item's id (``product_id``; attr adds the attribute ``key``), ``gold``,
  ``predicted`` and ``correct`` (bool; its mean is ``acc``; the macro metrics are not means
  over items and have no column).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from moon2 import progress
from moon2.bench.config import ALL_TASKS, RETRIEVAL_TASKS, TASK_NOTE, EvalConfig
from moon2.bench.metrics import (
    classification_metrics,
    first_relevant_rank,
    retrieval_metrics,
    trec_id,
    write_trec_run,
)
from moon2.bench.retrieval import topk_search
from moon2.data.images import decode_image
from moon2.data.io import iter_batches, read_json_object, write_table
from moon2.data.outdir import claim_output
from moon2.data.schema import PRODUCTS
from moon2.errors import ImageDecodeError, InputError
from moon2.models.base import EncodeItem, Encoder, settle_max_images

RETRIEVAL_METRICS = ("R@1", "R@5", "R@10", "MRR@10", "nDCG@10", "mAP")
CLASSIFICATION_METRICS = ("acc", "macro_p", "macro_r", "macro_f1")
HEADLINE = {
    "t2mm": "R@10",
    "i2mm": "R@10",
    "mm2mm": "R@10",
    "t2i": "R@10",
    "i2t": "R@10",
    "cls": "acc",
    "attr": "acc",
    "title2image": "R@10",
    "image2title": "R@10",
}
OWN_PAIR_NOTE = (
    "this benchmark was built before t2i / i2t used the query log: here a product's own title "
    "finds its main image and back (what title2image / image2title measure now); rebuild it "
    "with moon2 build-bench for the paper's task"
)
# OUT/per_query/<task>.parquet: the columns naming a row (a query, or a labelled item) ...
LABEL_ID_COLUMNS = {"cls": ("product_id",), "attr": ("product_id", "key")}
# ... and the column whose mean is a results.json metric, where it is not named after it
PER_QUERY_COLUMN = {"acc": "correct"}


def per_query_ids(task: str) -> tuple[str, ...]:
    """The id columns of ``OUT/per_query/<task>.parquet`` (``query_id`` for retrieval)."""
    return LABEL_ID_COLUMNS.get(task, ("query_id",))


@dataclass
class EvalResult:
    out_dir: Path
    results: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)


class _Images:
    """Decodes image cells, counting the ones that cannot be read instead of failing."""

    def __init__(self) -> None:
        self.unreadable = 0
        self.reasons: dict[str, int] = {}

    def decode(self, cell: dict[str, Any] | None, base: Path) -> Any | None:
        if cell is None:
            return None
        try:
            return decode_image(cell, base_dir=base)
        except ImageDecodeError as exc:
            self.unreadable += 1
            key = str(exc).split(" (")[0][:80]
            self.reasons[key] = self.reasons.get(key, 0) + 1
            return None


def _embed(
    encoder: Encoder,
    items: Iterator[EncodeItem],
    total: int,
    batch_size: int,
    label: str,
) -> np.ndarray:
    out = np.zeros((total, encoder.dim), np.float32)
    batch: list[EncodeItem] = []
    row = 0
    with progress.task(label, total) as bar:
        for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                out[row : row + len(batch)] = encoder.encode(batch)
                row += len(batch)
                bar.advance(len(batch))
                batch = []
        if batch:
            out[row : row + len(batch)] = encoder.encode(batch)
            row += len(batch)
            bar.advance(len(batch))
    if row != total:
        raise InputError(f"{label}: expected {total} items, read {row}")
    return out


class _ProductEmbeddings:
    """Test-product embeddings per modality, computed on first use."""

    def __init__(self, bench: Path, encoder: Encoder, config: EvalConfig, images: _Images) -> None:
        self.path = bench / "test" / "products"
        self.encoder = encoder
        self.config = config
        self.images = images
        ids = []
        for batch in iter_batches(self.path, columns=["product_id"], batch_rows=65_536):
            ids += batch.table.column(0).cast("string").to_pylist()
        self.ids = ids
        self.row = {pid: i for i, pid in enumerate(ids)}
        self._cache: dict[str, np.ndarray] = {}

    def _items(self, modality: str) -> Iterator[EncodeItem]:
        limit = 1 if modality == "image" else self.config.max_images
        for batch in iter_batches(self.path, PRODUCTS, batch_rows=256):
            titles = batch.table.column("title").to_pylist()
            cells = batch.table.column("images").to_pylist()
            base = batch.file.parent
            for title, images in zip(titles, cells, strict=True):
                text = title if title and title.strip() and modality != "image" else None
                pictures = []
                if modality != "text":
                    for cell in (images or [])[:limit]:
                        picture = self.images.decode(cell, base)
                        if picture is not None:
                            pictures.append(picture)
                yield EncodeItem(text=text, images=pictures)

    def get(self, modality: str) -> np.ndarray:
        if modality not in self._cache:
            self._cache[modality] = _embed(
                self.encoder,
                self._items(modality),
                len(self.ids),
                self.config.batch_size,
                f"embedding test products ({modality})",
            )
        return self._cache[modality]


def _query_items(task_dir: Path, images: _Images) -> tuple[list[str], Iterator[EncodeItem], int]:
    path = task_dir / "queries"
    ids: list[str] = []
    for batch in iter_batches(path, columns=["query_id"], batch_rows=65_536):
        ids += batch.table.column(0).to_pylist()

    def items() -> Iterator[EncodeItem]:
        for batch in iter_batches(path, batch_rows=256):
            texts = batch.table.column("query_text").to_pylist()
            cells = batch.table.column("query_image").to_pylist()
            for text, cell in zip(texts, cells, strict=True):
                picture = images.decode(cell, batch.file.parent)
                yield EncodeItem(text=text or None, images=[picture] if picture else [])

    return ids, items(), len(ids)


def _chance_recall(relevant_counts: np.ndarray, pool: int, k: int) -> float:
    """Expected R@k of a random ranking: 1 - C(pool - r, k) / C(pool, k), averaged."""
    values = []
    for r in relevant_counts:
        miss = 1.0
        for j in range(min(k, pool)):
            miss *= max(0.0, (pool - r - j) / (pool - j))
        values.append(1.0 - miss)
    return float(np.mean(values)) if values else 0.0


def _retrieval_task(
    task: str,
    task_dir: Path,
    spec: dict[str, Any],
    encoder: Encoder,
    products: _ProductEmbeddings,
    config: EvalConfig,
    images: _Images,
    out: Path,
    run_name: str,
) -> tuple[dict[str, float], dict[str, Any], pa.Table]:
    candidates = pq.read_table(task_dir / "candidates.parquet").sort_by("position")
    candidate_ids = candidates.column("candidate_id").to_pylist()
    product_rows = np.array(
        [products.row[p] for p in candidates.column("product_id").to_pylist()], np.int64
    )
    candidate_emb = products.get(spec["candidate_modality"])[product_rows]
    query_ids, items, total = _query_items(task_dir, images)
    query_emb = _embed(encoder, items, total, config.batch_size, f"{task}: embedding queries")
    qrels = pl.read_parquet(task_dir / "qrels.parquet")
    position = {cid: i for i, cid in enumerate(candidate_ids)}
    relevant: dict[str, dict[int, int]] = {}
    for query_id, candidate_id, grade in qrels.iter_rows():
        if candidate_id in position and grade >= 1:
            relevant.setdefault(query_id, {})[position[candidate_id]] = int(grade)
    keep = np.array([q in relevant for q in query_ids])
    if not keep.any():
        raise InputError(f"{task_dir}: no query has a relevant candidate in the pool")
    depth = min(config.depth, len(candidate_ids))
    with progress.task(f"{task}: top-{depth} search", int(keep.sum())) as bar:
        done = [0]

        def advance(finished: int) -> None:  # topk_search reports a running total
            bar.advance(finished - done[0])
            done[0] = finished

        scores, ranked = topk_search(
            query_emb[keep],
            candidate_emb,
            depth,
            device=getattr(encoder, "device", "cpu"),
            on_progress=advance,
        )
    kept_ids = [q for q, k in zip(query_ids, keep, strict=True) if k]
    kept_relevant = [relevant[q] for q in kept_ids]
    per_query = retrieval_metrics(ranked, kept_relevant, per_query=True)
    metrics = {name: float(values.mean()) for name, values in per_query.items()}
    write_trec_run(
        out / "runs" / f"{task}.trec",
        [trec_id(q) for q in kept_ids],
        [trec_id(c) for c in candidate_ids],
        ranked,
        scores,
        trec_id(run_name),
    )
    counts = np.array([len(relevant[q]) for q in kept_ids])
    details = {
        "queries": int(keep.sum()),
        "queries_without_relevant_candidate": int((~keep).sum()),
        "candidates": len(candidate_ids),
        "query_modality": spec["query_modality"],
        "candidate_modality": spec["candidate_modality"],
        "chance_R@10": round(_chance_recall(counts, len(candidate_ids), 10), 6),
    }
    if task in ("t2i", "i2t") and "query_source" not in spec:  # built before the paper's t2i
        details["note"] = OWN_PAIR_NOTE
        progress.warn(f"{task}: {OWN_PAIR_NOTE}")
    ranks = first_relevant_rank(ranked, kept_relevant)
    return metrics, details, _retrieval_rows(kept_ids, ranks, per_query)


def _retrieval_rows(
    query_ids: list[str], ranks: np.ndarray, per_query: dict[str, np.ndarray]
) -> pa.Table:
    """One row per query: its id, the rank of its first relevant candidate (null beyond the
    searched depth) and every results.json metric of the query alone (they average to it)."""
    columns = {
        "query_id": pa.array(query_ids, pa.string()),
        "rank": pa.array(ranks, pa.int64(), mask=ranks == 0),
    }
    columns.update({name: pa.array(values, pa.float64()) for name, values in per_query.items()})
    return pa.table(columns)


def _nearest(embeddings: np.ndarray, label_emb: np.ndarray) -> np.ndarray:
    # argmax keeps the first maximum: ties go to the earlier label
    return np.argmax(embeddings @ label_emb.T, axis=1)


def _text_embeddings(encoder: Encoder, texts: list[str], config: EvalConfig) -> np.ndarray:
    return _embed(
        encoder, (EncodeItem(text=t) for t in texts), len(texts), config.batch_size, "labels"
    )


def _label_rows(ids: pl.DataFrame, gold: list[str], predicted: list[str]) -> pa.Table:
    """One row per labelled item: its id columns, the gold and predicted label, and whether
    they agree (``correct``: its mean is the task's ``acc``)."""
    correct = [g == p for g, p in zip(gold, predicted, strict=True)]
    return pa.table(
        {
            **{name: pa.array(ids[name].to_list(), pa.string()) for name in ids.columns},
            "gold": pa.array(gold, pa.string()),
            "predicted": pa.array(predicted, pa.string()),
            "correct": pa.array(correct, pa.bool_()),
        }
    )


def _cls_task(
    task_dir: Path,
    spec: dict[str, Any],
    encoder: Encoder,
    products: _ProductEmbeddings,
    config: EvalConfig,
) -> tuple[dict[str, float], dict[str, Any], pa.Table]:
    labels = pl.read_parquet(task_dir / "labels.parquet")
    label_names: list[str] = spec["labels"]
    texts = [config.label_template.format(label=spec["label_text"][n]) for n in label_names]
    label_emb = _text_embeddings(encoder, texts, config)
    rows = np.array([products.row[p] for p in labels["product_id"].to_list()], np.int64)
    predicted = _nearest(products.get("mm")[rows], label_emb)
    y_pred = [label_names[i] for i in predicted]
    metrics = classification_metrics(labels["label"].to_list(), y_pred, labels=label_names)
    details = {
        "products": labels.height,
        "labels": len(label_names),
        "chance_acc": round(1 / len(label_names), 6),
        "label_template": config.label_template,
    }
    ids = labels.select(per_query_ids("cls"))
    return metrics, details, _label_rows(ids, labels["label"].to_list(), y_pred)


def _attr_task(
    task_dir: Path,
    spec: dict[str, Any],
    encoder: Encoder,
    products: _ProductEmbeddings,
    config: EvalConfig,
) -> tuple[dict[str, float], dict[str, Any], pa.Table]:
    labels = pl.read_parquet(task_dir / "labels.parquet")
    mm = products.get("mm")
    correct = 0
    per_key: dict[str, dict[str, float]] = {}
    items: list[pa.Table] = []  # per (product, attribute key) pair
    chance = []
    for key, values in spec["keys"].items():
        subset = labels.filter(pl.col("key") == key)
        if subset.is_empty():
            continue
        texts = [config.attr_template.format(key=key, value=v) for v in values]
        value_emb = _text_embeddings(encoder, texts, config)
        rows = np.array([products.row[p] for p in subset["product_id"].to_list()], np.int64)
        y_pred = [values[i] for i in _nearest(mm[rows], value_emb)]
        y_true = subset["value"].to_list()
        per_key[key] = classification_metrics(y_true, y_pred, labels=values)
        correct += sum(t == p for t, p in zip(y_true, y_pred, strict=True))
        items.append(_label_rows(subset.select(per_query_ids("attr")), y_true, y_pred))
        chance.append((subset.height, 1 / len(values)))
    if not per_key:
        raise InputError(f"{task_dir}: no attribute labels")
    total = sum(n for n, _ in chance)
    metrics = {
        "acc": correct / total,
        "macro_p": float(np.mean([m["macro_p"] for m in per_key.values()])),
        "macro_r": float(np.mean([m["macro_r"] for m in per_key.values()])),
        "macro_f1": float(np.mean([m["macro_f1"] for m in per_key.values()])),
    }
    details = {
        "pairs": total,
        "per_key": {k: {m: round(v, 6) for m, v in d.items()} for k, d in per_key.items()},
        "chance_acc": round(sum(n * c for n, c in chance) / total, 6),
        "attr_template": config.attr_template,
    }
    return metrics, details, pa.concat_tables(items)


TASK_FILES = {
    **{
        task: ("task.json", "queries", "candidates.parquet", "qrels.parquet")
        for task in RETRIEVAL_TASKS
    },
    "cls": ("task.json", "labels.parquet"),
    "attr": ("task.json", "labels.parquet"),
}
"""What build-bench writes in ``test/tasks/<task>/`` and the evaluation reads."""


def _read_manifest(bench: Path) -> dict[str, Any]:
    """``BENCH/manifest.json``, once BENCH is known to be a benchmark with a task built."""
    path = bench / "manifest.json"
    if not path.is_file():
        raise InputError(
            f"{bench} is not a moon2 benchmark (no manifest.json); build one with moon2 build-bench"
        )
    manifest = read_json_object(path)
    if manifest is None:
        raise InputError(f"{path} is not a build-bench manifest; rebuild the benchmark")
    if not manifest.get("tasks"):
        raise InputError(
            f"the benchmark {bench} has no task built (too few products?); the reasons are "
            f"in the skipped_tasks of {path}"
        )
    if not (bench / "test" / "products").exists():
        raise InputError(f"{bench / 'test' / 'products'} is missing; rebuild the benchmark")
    return manifest


def _task_spec(bench: Path, task: str) -> dict[str, Any]:
    """The task.json of a task the manifest lists, once every file the task needs is there."""
    task_dir = bench / "test" / "tasks" / task
    if not task_dir.is_dir():
        raise InputError(
            f"task {task} is listed in {bench / 'manifest.json'} but its folder {task_dir} is "
            "missing; rebuild the benchmark"
        )
    for name in TASK_FILES[task]:
        if not (task_dir / name).exists():
            raise InputError(f"{task_dir / name} is missing; rebuild the benchmark")
    spec = read_json_object(task_dir / "task.json")
    if spec is None:
        raise InputError(f"{task_dir / 'task.json'} is not a build-bench task description")
    return spec


def _plan_tasks(
    bench: Path, manifest: dict[str, Any], tasks: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tasks to evaluate (task -> task.json) and the ones the benchmark does not have."""
    planned: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for task in tasks:
        if task in manifest["tasks"]:
            planned[task] = _task_spec(bench, task)
        else:
            reason = manifest.get("skipped_tasks", {}).get(task, "not built in this benchmark")
            skipped[task] = f"not in the benchmark: {reason}"
    if not planned:
        raise InputError(
            f"none of the tasks asked for can be evaluated on {bench} ("
            + "; ".join(f"{task}: {reason}" for task, reason in skipped.items())
            + f"); it has {', '.join(manifest['tasks'])}"
        )
    return planned, skipped


def _readable_tasks(
    planned: dict[str, dict[str, Any]], encoder: Encoder, skipped: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """The planned tasks whose inputs ``encoder`` can read; the others go to ``skipped``."""
    readable: dict[str, dict[str, Any]] = {}
    for task, spec in planned.items():
        needed = {spec.get("query_modality", "text"), spec.get("candidate_modality", "mm")}
        if task in ("cls", "attr"):
            needed = {"mm", "text"}
        unreadable = [m for m in sorted(needed) if not encoder.supports(m)]
        if unreadable:
            skipped[task] = f"{encoder.name} cannot read {', '.join(unreadable)} inputs"
        else:
            readable[task] = spec
    if not readable:
        raise InputError(
            f"{encoder.name} cannot read the inputs of any task asked for ("
            + "; ".join(f"{task}: {reason}" for task, reason in skipped.items())
            + ")"
        )
    return readable


def manifest_hash(bench: Path) -> str:
    """sha256 of the benchmark's manifest.json: which benchmark a result (or a plan) is on."""
    return hashlib.sha256((bench / "manifest.json").read_bytes()).hexdigest()


# what eval writes directly in OUT (a re-run deletes these, and only in its own folder)
OUTPUTS = ("runs", "per_query", "eval_config.yaml", "results.json", "results.md")


def evaluate(
    model: str | Encoder,
    bench_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: EvalConfig,
    load: Callable[..., Encoder] | None = None,
) -> EvalResult:
    """Evaluate ``model`` (a MODEL spec or an Encoder) on the benchmark at ``bench_dir``; a
    re-run into its own OUT replaces the earlier results whole."""
    started = time.perf_counter()
    bench = Path(bench_dir)
    # the benchmark is checked before the model is loaded: a broken one fails at once
    manifest = _read_manifest(bench)
    planned, skipped = _plan_tasks(bench, manifest, list(config.tasks))
    if isinstance(model, Encoder):
        encoder = model
    else:
        from moon2.models.registry import load_encoder

        encoder = (load or load_encoder)(
            model, device=config.device, trust_remote_code=config.trust_remote_code
        )
    # eval_config.yaml records the number used
    config = config.model_copy(update={"max_images": settle_max_images(encoder, config.max_images)})
    runnable = _readable_tasks(planned, encoder, skipped)
    # all checked before OUT is claimed: a bad model or task never costs the earlier results
    inputs = [bench, None if isinstance(model, Encoder) else model]
    with claim_output(out_dir, "eval", inputs=inputs, outputs=OUTPUTS, resume=False) as claim:
        return _evaluate(encoder, bench, claim.path, config, runnable, skipped, started)


def _evaluate(
    encoder: Encoder,
    bench: Path,
    out: Path,
    config: EvalConfig,
    runnable: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    started: float,
) -> EvalResult:
    """Every runnable task, then results.json and results.md."""
    out.mkdir(parents=True, exist_ok=True)
    config.to_yaml(out / "eval_config.yaml")
    images = _Images()
    products = _ProductEmbeddings(bench, encoder, config, images)
    results: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for task, spec in runnable.items():  # spec: the task.json read when the task was planned
        task_dir = bench / "test" / "tasks" / task
        if task in RETRIEVAL_TASKS:
            metrics, info, rows = _retrieval_task(
                task, task_dir, spec, encoder, products, config, images, out, encoder.name
            )
        elif task == "cls":
            metrics, info, rows = _cls_task(task_dir, spec, encoder, products, config)
        else:
            metrics, info, rows = _attr_task(task_dir, spec, encoder, products, config)
        write_table(rows, out / "per_query" / f"{task}.parquet")
        results[task] = {k: round(float(v), 6) for k, v in metrics.items()}
        details[task] = info
    for task, reason in skipped.items():
        progress.warn(f"{task} skipped: {reason}")
    seconds = time.perf_counter() - started
    payload: dict[str, Any] = {
        **{task: results[task] for task in ALL_TASKS if task in results},
        "model": encoder.name,
        "bench": str(bench),
        "bench_manifest_sha256": manifest_hash(bench),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
        "skipped": skipped,
        "details": details,
        "images_unreadable": images.unreadable,
        "images_unreadable_reasons": images.reasons,
    }
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(render_markdown(payload), encoding="utf-8")
    return EvalResult(out, payload, skipped)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def render_markdown(results: dict[str, Any]) -> str:
    """The paper-style table (R@10 / Acc, in %) and every metric per task."""
    tasks = [t for t in ALL_TASKS if t in results]
    header = ["model", *[f"{t} {HEADLINE[t]}" for t in ALL_TASKS]]
    lines = [
        f"# moon2 eval: {results['model']}",
        "",
        f"benchmark `{results['bench']}` (manifest sha256 {results['bench_manifest_sha256'][:12]}),"
        f" {results['time']}, {results['seconds']} s",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        "| "
        + " | ".join(
            [results["model"]]
            + [
                _pct(results.get(t, {}).get(HEADLINE[t])) if t in results else "-"
                for t in ALL_TASKS
            ]
        )
        + " |",
        "",
        "Values in %. Chance level of the same tables: "
        + ", ".join(f"{t} {_pct(_chance(results['details'][t]))}" for t in tasks)
        + ". "
        + TASK_NOTE,
        "",
    ]
    for t in tasks:
        if note := results["details"][t].get("note"):
            lines += [f"Note on {t}: {note}.", ""]
    retrieval = [t for t in tasks if t in RETRIEVAL_TASKS]
    if retrieval:
        lines += [
            "## Retrieval",
            "",
            "| task | " + " | ".join(RETRIEVAL_METRICS) + " | queries |",
            "|" + "---|" * (len(RETRIEVAL_METRICS) + 2),
        ]
        for t in retrieval:
            values = " | ".join(_pct(results[t].get(m)) for m in RETRIEVAL_METRICS)
            lines.append(f"| {t} | {values} | {results['details'][t]['queries']} |")
        lines.append("")
    labelled = [t for t in tasks if t in ("cls", "attr")]
    if labelled:
        lines += [
            "## Classification and attributes",
            "",
            "| task | " + " | ".join(CLASSIFICATION_METRICS) + " |",
            "|" + "---|" * (len(CLASSIFICATION_METRICS) + 1),
        ]
        for t in labelled:
            values = " | ".join(_pct(results[t].get(m)) for m in CLASSIFICATION_METRICS)
            lines.append(f"| {t} | {values} |")
        lines.append("")
    if results.get("skipped"):
        lines += ["## Skipped", ""]
        lines += [f"- {t}: {reason}" for t, reason in results["skipped"].items()]
        lines.append("")
    return "\n".join(lines)


def _chance(details: dict[str, Any]) -> float | None:
    return details.get("chance_R@10", details.get("chance_acc"))
