"""The work on one part (a slice of ``rows_per_part`` input rows), stage by stage.

A part travels between stages as a record ``{"key", "table", "stats"}``: the table as Arrow IPC
bytes (input columns unchanged, the ``aug_*`` columns added so far, and an internal column with
each row's reject reason), the counters as JSON. The same functions run inside Ray Data
(tasks / actor pools, :mod:`moon2.augment.pipeline`) and in the plain loop, so both give the
same rows. A stage never lets one row's failure stop the part: the row gets a reject reason and
later stages skip it.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from moon2.augment.config import AugmentConfig
from moon2.augment.consistency import ConsistencyScorer, load_scorer
from moon2.augment.entities import Entity, Lexicon, extract_entities
from moon2.augment.gate import check_title, example_words, fallback_title
from moon2.augment.images import EditedImage, ImageEngine, ImageRequest, load_image_engine
from moon2.augment.text import (
    TextEngine,
    TextRequest,
    build_messages,
    clean_completion,
    load_text_engine,
    row_seed,
)
from moon2.data.images import decode_image, encode_image
from moon2.data.parts import PartSpec, from_ipc, read_slice, to_ipc
from moon2.data.schema import ATTRIBUTE_TYPE, IMAGE_TYPE, PRODUCTS, conform
from moon2.errors import ImageDecodeError

REJECT = "_moon2_reject"
STAGE = "augment"

AUG_FIELDS = [
    pa.field("aug_title", pa.string()),
    pa.field("aug_title_source", pa.string()),
    pa.field("aug_title_gate", pa.string()),
    pa.field("aug_entities", pa.list_(ATTRIBUTE_TYPE)),
    pa.field("aug_images", pa.list_(IMAGE_TYPE)),
    pa.field("aug_image_scores", pa.list_(pa.float32())),
    pa.field("aug_image_ops", pa.list_(pa.string())),
    pa.field("aug_engine", pa.string()),
]
AUG_NAMES = [f.name for f in AUG_FIELDS]


@dataclass
class PartStats:
    rows_in: int = 0
    rejected: Counter = field(default_factory=Counter)
    title_sources: Counter = field(default_factory=Counter)
    gate_failures: Counter = field(default_factory=Counter)
    images_kept: int = 0
    images_dropped: int = 0
    image_retries: int = 0
    clean_dropped: int = 0
    seconds: Counter = field(default_factory=Counter)

    def to_json(self) -> str:
        return json.dumps(
            {
                "rows_in": self.rows_in,
                "rejected": dict(self.rejected),
                "title_sources": dict(self.title_sources),
                "gate_failures": dict(self.gate_failures),
                "images_kept": self.images_kept,
                "images_dropped": self.images_dropped,
                "image_retries": self.image_retries,
                "clean_dropped": self.clean_dropped,
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> PartStats:
        data = json.loads(text)
        return cls(
            rows_in=data["rows_in"],
            rejected=Counter(data["rejected"]),
            title_sources=Counter(data["title_sources"]),
            gate_failures=Counter(data["gate_failures"]),
            images_kept=data["images_kept"],
            images_dropped=data["images_dropped"],
            image_retries=data["image_retries"],
            clean_dropped=data["clean_dropped"],
            seconds=Counter(data["seconds"]),
        )


# --- record helpers ------------------------------------------------------------------------


def _set_column(table: pa.Table, name: str, values: list[Any], type_: pa.DataType) -> pa.Table:
    array = pa.array(values, type=type_)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(pa.field(name, type_), array)


def _reasons(table: pa.Table) -> list[str | None]:
    return table.column(REJECT).to_pylist()


def _main_cell(images: list[Any] | None) -> tuple[int, Any] | None:
    for position, cell in enumerate(images or []):
        if cell is not None:
            return position, cell
    return None


def _where(spec_file: str, row: int, column: str) -> str:
    return f"{spec_file} row {row} column {column}"


# --- stage 1: read, validate, extract entities (a task) -------------------------------------


def prepare_part(spec: PartSpec, config: AugmentConfig) -> dict[str, Any]:
    started = time.perf_counter()
    raw = read_slice(spec.file, spec.offset, spec.length)
    rows = conform(raw, PRODUCTS, spec.file).to_pylist()
    stats = PartStats(rows_in=len(rows))
    lexicon = Lexicon(config.entities.extra_lexicon)
    reasons: list[str | None] = []
    entities: list[list[dict[str, str]] | None] = []
    for index, row in enumerate(rows):
        line = spec.offset + index
        reason = None
        if not (row.get("product_id") or "").strip():
            reason = f"{_where(spec.file, line, 'product_id')}: null or empty"
        elif not (row.get("title") or "").strip() and _main_cell(row.get("images")) is None:
            reason = f"{_where(spec.file, line, 'title')}: no title and no image"
        else:
            main = _main_cell(row.get("images"))
            if main is not None:
                try:
                    decode_image(main[1], mode=None, draft_size=64)
                except ImageDecodeError as exc:
                    reason = f"{_where(spec.file, line, f'images[{main[0]}]')}: {exc}"
        reasons.append(reason)
        if reason is None:
            found = extract_entities(row, config.entities, lexicon)
            entities.append([e.as_dict() for e in found])
        else:
            stats.rejected[_reason_kind(reason)] += 1
            entities.append(None)
    table = _set_column(raw, REJECT, reasons, pa.string())
    table = _set_column(table, "aug_entities", entities, pa.list_(ATTRIBUTE_TYPE))
    stats.seconds["prepare"] += time.perf_counter() - started
    return {
        "key": spec.key,
        "file": spec.file,
        "offset": spec.offset,
        "table": to_ipc(table),
        "stats": stats.to_json(),
    }


def _reason_kind(reason: str) -> str:
    """A short label for counting: the text after the location, up to the first colon."""
    tail = reason.split(": ", 1)[-1]
    return tail.split(":", 1)[0].split(" (", 1)[0][:60]


# --- stage 2: titles (an actor holding the text model) --------------------------------------


class TextStage:
    """Enrich every valid row's title: generate, gate, retry (sampled, new seed), fallback."""

    def __init__(self, config: AugmentConfig | dict[str, Any]) -> None:
        self.config = AugmentConfig.model_validate(config)
        self.engine: TextEngine | None = load_text_engine(self.config.text)
        self.lexicon = Lexicon(self.config.entities.extra_lexicon)
        self.examples = (
            example_words(self.config.text.few_shot)
            if self.config.gate.check_example_copies
            else frozenset()
        )

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        table = from_ipc(record["table"])
        stats = PartStats.from_json(record["stats"])
        rows = conform(table, PRODUCTS, record["file"]).to_pylist()
        reasons = _reasons(table)
        titles: list[str | None] = [None] * len(rows)
        sources: list[str | None] = [None] * len(rows)
        gates: list[str | None] = [None] * len(rows)
        todo: dict[int, list[Entity]] = {}
        for i, row in enumerate(rows):
            if reasons[i] is not None:
                continue
            entities = [Entity(e["key"], e["value"], "") for e in row["aug_entities"] or []]
            if not (row.get("title") or "").strip() and not entities:
                sources[i] = "none"  # nothing to say about an untitled product without facts
                continue
            todo[i] = entities
        if self.engine is None:
            for i, entities in todo.items():
                titles[i], sources[i] = fallback_title(rows[i], entities), "rule"
        else:
            self._enrich(rows, todo, record, reasons, titles, sources, gates, stats)
        for i, source in enumerate(sources):
            if source is not None and reasons[i] is None:
                stats.title_sources[source] += 1
        table = _set_column(table, REJECT, reasons, pa.string())
        table = _set_column(table, "aug_title", titles, pa.string())
        table = _set_column(table, "aug_title_source", sources, pa.string())
        table = _set_column(table, "aug_title_gate", gates, pa.string())
        stats.seconds["text"] += time.perf_counter() - started
        return {**record, "table": to_ipc(table), "stats": stats.to_json()}

    def _request(
        self, row: dict[str, Any], entities: list[Entity], attempt: int, image: Any
    ) -> TextRequest:
        messages = build_messages(
            self.config.text,
            (row.get("title") or "").strip(),
            entities,
            row.get("description"),
            row.get("category"),
            with_image=image is not None,
        )
        return TextRequest(
            messages=messages,
            image=image,
            seed=row_seed(self.config.seed, row["product_id"], attempt),
            key=row["product_id"],
            sample=None if attempt == 0 else True,
        )

    def _image(self, row: dict[str, Any]) -> Any:
        assert self.engine is not None
        main = _main_cell(row.get("images"))
        if not self.engine.takes_images or main is None:
            return None
        return decode_image(main[1])

    def _generate(
        self, requests: dict[int, TextRequest], reasons: list[str | None], record: dict[str, Any]
    ) -> dict[int, str]:
        """Completions per row; a failing batch is retried row by row so one bad row only
        rejects itself."""
        assert self.engine is not None
        order = list(requests)
        try:
            texts = self.engine.generate([requests[i] for i in order])
            return dict(zip(order, texts, strict=True))
        except Exception:
            pass
        out = {}
        for i in order:
            try:
                out[i] = self.engine.generate([requests[i]])[0]
            except Exception as exc:
                line = record["offset"] + i
                reasons[i] = (
                    f"{_where(record['file'], line, 'title')}: text generation failed "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                )
        return out

    def _enrich(
        self,
        rows: list[dict[str, Any]],
        todo: dict[int, list[Entity]],
        record: dict[str, Any],
        reasons: list[str | None],
        titles: list[str | None],
        sources: list[str | None],
        gates: list[str | None],
        stats: PartStats,
    ) -> None:
        images = {i: self._image(rows[i]) for i in todo}
        pending = dict(todo)
        first_failure: dict[int, list[str]] = {}
        for attempt in range(self.config.text.retries + 1):
            if not pending:
                break
            requests = {
                i: self._request(rows[i], e, attempt, images[i]) for i, e in pending.items()
            }
            completions = self._generate(requests, reasons, record)
            for i in list(pending):
                if i not in completions:  # generation failed: the row is rejected
                    stats.rejected[_reason_kind(reasons[i] or "")] += 1
                    del pending[i]
                    continue
                title = clean_completion(completions[i])
                failures = check_title(
                    title, rows[i], pending[i], self.config.gate, self.lexicon, self.examples
                )
                if not failures:
                    titles[i], sources[i] = title, "llm"
                    del pending[i]
                    continue
                first_failure.setdefault(i, failures)
                if attempt == 0:
                    for failure in failures:
                        stats.gate_failures[failure.split(":", 1)[0]] += 1
        for i, entities in pending.items():
            titles[i], sources[i] = fallback_title(rows[i], entities), "fallback"
        for i, failures in first_failure.items():
            gates[i] = "; ".join(failures)


# --- stage 3: images (tasks for classic, actors for model engines) --------------------------


class ImageStage:
    """Clean the main image, make ``variants`` views, keep those the scorer accepts."""

    def __init__(self, config: AugmentConfig | dict[str, Any]) -> None:
        self.config = AugmentConfig.model_validate(config)
        self.engine: ImageEngine | None = load_image_engine(self.config.images)
        self.scorer: ConsistencyScorer | None = (
            load_scorer(self.config.images.consistency) if self.engine is not None else None
        )

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        table = from_ipc(record["table"])
        stats = PartStats.from_json(record["stats"])
        rows = conform(table, PRODUCTS, record["file"]).to_pylist()
        reasons = _reasons(table)
        images: list[list[dict[str, Any]] | None] = [None] * len(rows)
        scores: list[list[float] | None] = [None] * len(rows)
        ops: list[list[str] | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            if reasons[i] is not None:
                continue
            images[i], scores[i], ops[i] = [], [], []
            main = _main_cell(row.get("images"))
            if self.engine is None or main is None:
                continue
            try:
                expanded = self._expand(row, main[1], stats)
            except Exception as exc:
                line = record["offset"] + i
                reasons[i] = (
                    f"{_where(record['file'], line, f'images[{main[0]}]')}: image expansion "
                    f"failed ({type(exc).__name__}: {exc})"
                )
                stats.rejected[_reason_kind(reasons[i])] += 1
                continue
            fmt, quality = self.config.images.format, self.config.images.quality
            images[i] = [encode_image(self._fit(e.image), fmt, quality) for e, _ in expanded]
            scores[i] = [round(s, 4) for _, s in expanded]
            ops[i] = [e.op for e, _ in expanded]
            stats.images_kept += len(expanded)
        table = _set_column(table, REJECT, reasons, pa.string())
        table = _set_column(table, "aug_images", images, pa.list_(IMAGE_TYPE))
        table = _set_column(table, "aug_image_scores", scores, pa.list_(pa.float32()))
        table = _set_column(table, "aug_image_ops", ops, pa.list_(pa.string()))
        stats.seconds["images"] += time.perf_counter() - started
        return {**record, "table": to_ipc(table), "stats": stats.to_json()}

    def _fit(self, image: Any) -> Any:
        side = self.config.images.max_side
        if side is None or max(image.size) <= side:
            return image
        image = image.copy()
        image.thumbnail((side, side))
        return image

    def _expand(
        self, row: dict[str, Any], cell: Any, stats: PartStats
    ) -> list[tuple[EditedImage, float]]:
        assert self.engine is not None and self.scorer is not None
        images_config = self.config.images
        consistency = images_config.consistency
        original = decode_image(cell)
        title = (row.get("title") or "").strip()
        request = ImageRequest(
            key=row["product_id"],
            title=title,
            seed=row_seed(self.config.seed, row["product_id"], stage="image"),
        )
        clean = self.engine.clean(original, request)
        if clean.image.width < 1 or clean.image.height < 1:
            raise ValueError("the clean stage returned an empty image")
        clean_score = self.scorer.score([clean], original, title)[0]
        kept: list[tuple[EditedImage, float]] = []
        base = clean
        if clean_score >= consistency.threshold:
            if images_config.keep_clean:
                kept.append((clean, clean_score))
        else:
            stats.clean_dropped += 1
            stats.images_dropped += 1
            base = EditedImage(original, ["original"])
        variants: list[tuple[EditedImage, float]] = []
        wanted = images_config.variants
        for attempt in range(consistency.max_retries + 1):
            missing = wanted - len(variants)
            if missing <= 0:
                break
            if attempt:
                stats.image_retries += 1
            made = self.engine.variants(base, request, missing, attempt)
            for edited, score in zip(made, self.scorer.score(made, original, title), strict=True):
                if score >= consistency.threshold:
                    variants.append((edited, score))
                else:
                    stats.images_dropped += 1
        return kept + variants[:wanted]


def provenance(config: AugmentConfig) -> str:
    """What made a row's aug columns (engines and model ids), as JSON."""
    text, images = config.text, config.images
    scorer = images.consistency.scorer_kind()
    if scorer == "openclip":
        scorer = (
            f"openclip:{images.consistency.openclip_model}:{images.consistency.openclip_pretrained}"
        )
    image = images.engine
    if image == "diffusers":
        image = f"diffusers:{images.diffusers.model}"
    return json.dumps(
        {
            "text": None if text.engine == "none" else f"{text.engine}:{text.model}",
            "image": None if images.engine == "none" else image,
            "consistency": None if images.engine == "none" else scorer,
        },
        sort_keys=True,
    )


def finish_part(record: dict[str, Any], provenance: str) -> dict[str, Any]:
    """Attach ``aug_engine`` and make sure every aug column exists (stages may be off)."""
    table = from_ipc(record["table"])
    n = table.num_rows
    for f in AUG_FIELDS:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(n, f.type))
    reasons = _reasons(table)
    engine_values = [provenance if r is None else None for r in reasons]
    table = _set_column(table, "aug_engine", engine_values, pa.string())
    inputs = [n for n in table.column_names if n not in AUG_NAMES and n != REJECT]
    return {**record, "table": to_ipc(table.select([*inputs, *AUG_NAMES, REJECT]))}
