"""The quality gate on generated titles, and the deterministic entity-based fallback rewrite.

Small models ramble: SmolLM2-135M invents brands, repeats words and drops the colour. A
generated title passes only when it keeps every required entity, stays within the length
bounds, repeats no word n-gram, and names no colour / material / pattern the product lacks.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

from moon2.augment.config import GateConfig
from moon2.augment.entities import TEXT_KEYS, Entity, Lexicon, normalise_text, phrase_pattern

WORD = re.compile(r"\w+(?:[-']\w+)*")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _noun_forms(noun: str) -> list[str]:
    """The category noun as written, and its head word singular / plural."""
    noun = noun.lower().strip()
    forms = {noun}
    head = noun.split()[-1] if noun.split() else noun
    forms.add(head)
    if head.isascii():
        for suffix in ("es", "s"):
            if head.endswith(suffix) and len(head) > len(suffix) + 2:
                forms.add(head[: -len(suffix)])
        forms.add(head + "s")
    return sorted(forms, key=len, reverse=True)


def singular(noun: str) -> str:
    """``Table Lamps`` -> ``Table Lamp``, ``Dresses`` -> ``Dress``: the head word's plural
    ``s`` / ``es`` dropped (English only; other words stay as written)."""
    parts = noun.split()
    if not parts or not parts[-1].isascii():
        return noun
    head = parts[-1]
    lower = head.lower()
    if lower.endswith(("sses", "shes", "ches", "xes")) and len(head) > 4:
        head = head[:-2]
    elif lower.endswith("s") and not lower.endswith(("ss", "us", "is")) and len(head) > 3:
        head = head[:-1]
    return " ".join([*parts[:-1], head])


def keeps(title: str, entity: Entity, lexicon: Lexicon) -> bool:
    """Whether ``title`` still states ``entity`` (itself, a family word, or the noun's
    singular / plural for the category)."""
    text = normalise_text(title)
    if entity.key == "category":
        candidates = _noun_forms(entity.value)
    elif entity.key in TEXT_KEYS:
        candidates = lexicon.family_words(entity.key, entity.value)
    else:
        candidates = [entity.value.lower()]
    return any(phrase_pattern(c).search(text) for c in candidates if c)


def repeated_ngram(title: str, n: int) -> str | None:
    """The first word n-gram (or back-to-back word) that occurs twice, else None."""
    tokens = words(title)
    for a, b in itertools.pairwise(tokens):
        if a == b:
            return a
    seen: set[tuple[str, ...]] = set()
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            return " ".join(gram)
        seen.add(gram)
    return None


def source_text(row: dict[str, Any]) -> str:
    """Everything the product itself says: title, description, category, attribute values."""
    parts = [row.get("title") or "", row.get("description") or ""]
    parts.extend(row.get("category") or [])
    parts.extend(
        str(pair.get("value") or "") for pair in row.get("attributes") or [] if pair is not None
    )
    return " \n ".join(parts)


COMMON_WORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "the",
        "of",
        "for",
        "with",
        "in",
        "on",
        "to",
        "by",
        "from",
        "at",
        "as",
        "or",
        "new",
        "size",
        "style",
        "color",
        "colour",
        "material",
        "pattern",
        "brand",
        "category",
        "men",
        "mens",
        "men's",
        "women",
        "womens",
        "women's",
        "kids",
        "unisex",
    ]
)
"""Words a title may share with the few-shot examples without having copied them."""


def split_words(text: str) -> list[str]:
    """Words with numbers and units apart (``350ml`` -> ``350``, ``ml``)."""
    return words(re.sub(r"(?<=\d)(?=[^\W\d])|(?<=[^\W\d])(?=\d)", " ", text))


def example_words(examples: Sequence[Any]) -> frozenset[str]:
    """Words of the few-shot examples (titles, facts, answers) a real title rarely needs."""
    found: set[str] = set()
    for example in examples:
        for text in (example.title, example.entities, example.answer):
            found.update(split_words(text))
    return frozenset(found - COMMON_WORDS)


def check_title(
    title: str,
    row: dict[str, Any],
    entities: Sequence[Entity],
    config: GateConfig,
    lexicon: Lexicon,
    examples: frozenset[str] = frozenset(),
) -> list[str]:
    """Reasons ``title`` fails the gate (empty when it passes). ``examples`` are the few-shot
    examples' words (:func:`example_words`): one in the title that the product's own text and
    facts lack was copied from an example (small models copy brands and sizes)."""
    if not title.strip():
        return ["empty"]
    reasons: list[str] = []
    count = len(words(title))
    if count < config.min_words:
        reasons.append(f"too_short: {count} words < {config.min_words}")
    if count > config.max_words:
        reasons.append(f"too_long: {count} words > {config.max_words}")
    limit = config.max_length_ratio * len(row.get("title") or "") + 40
    if len(title) > limit:
        reasons.append(f"too_long: {len(title)} chars > {limit:.0f}")
    repeat = repeated_ngram(title, config.max_repeated_ngram)
    if repeat is not None:
        reasons.append(f"repeats: {repeat!r}")
    required = set(config.required_keys)
    for entity in entities:
        if entity.key in required and not keeps(title, entity, lexicon):
            reasons.append(f"drops_{entity.key}: {entity.value!r}")
    own = source_text(row)
    if examples:
        known = set(split_words(own)) | {w for e in entities for w in split_words(e.value)}
        copied = [w for w in dict.fromkeys(split_words(title)) if w in examples and w not in known]
        if copied:
            reasons.append(f"copies_example: {', '.join(copied[:3])!r}")
    if config.check_contradictions:
        for key in TEXT_KEYS:
            extra = lexicon.families_of(key, title) - lexicon.families_of(key, own)
            for family in sorted(extra):
                word = next(p for p, f in lexicon.find(key, title) if f == family)
                reasons.append(f"contradicts_{key}: {word!r}")
    return reasons


FALLBACK_ORDER = ("brand", "color", "pattern", "material", "category")


def fallback_title(row: dict[str, Any], entities: Sequence[Entity]) -> str | None:
    """A deterministic rewrite from the entities: ``brand colour pattern material noun``, then
    the other facts (``key value``), comma separated. Keeps every entity by construction.
    Without a category noun the original title follows the core words."""
    by_key = {e.key: e.value for e in entities}
    if by_key.get("category"):
        by_key["category"] = singular(by_key["category"])
    core = [by_key[k] for k in FALLBACK_ORDER if by_key.get(k)]
    used = {normalise_text(v) for v in core}
    head = " ".join(core)
    original = " ".join((row.get("title") or "").split())
    if "category" not in by_key and original:
        head = f"{head} {original}".strip() if head else original
    extras = [
        e.value if normalise_text(e.value).startswith(e.key) else f"{e.key} {e.value}"
        for e in entities
        if e.key not in FALLBACK_ORDER and normalise_text(e.value) not in used
    ]
    title = ", ".join([head, *extras]) if head else ", ".join(extras)
    return title or None
