"""Seller titles, descriptions and shopper queries, written the way real ones are: noisy.

Titles mix synonyms, word order, casing, keyword stuffing, marketing words in several
languages and the odd typo; descriptions mention some attributes; queries are short keyword
strings that sometimes name an attribute.
"""

from __future__ import annotations

import random
import re

from moon2.data.synth.taxonomy import (
    COLORS,
    MARKETING,
    MATERIALS,
    PATTERNS,
    QUERY_FILLERS,
    STYLES,
    Leaf,
)

_SYNONYMS = {"color": COLORS, "pattern": PATTERNS, "material": MATERIALS, "style": STYLES}


def attribute_word(rng: random.Random, key: str, value: str) -> str:
    """A word a seller might write for ``key=value`` (a synonym when the vocabulary has one)."""
    table = _SYNONYMS.get(key)
    if table is None:
        return value
    entry = table[value]
    words = entry[1] if key == "color" else entry
    return rng.choice(words)  # type: ignore[arg-type]


def _typo(rng: random.Random, words: list[str]) -> list[str]:
    candidates = [i for i, w in enumerate(words) if len(w) > 4 and w.isalpha()]
    if not candidates:
        return words
    i = rng.choice(candidates)
    word = words[i]
    j = rng.randrange(1, len(word) - 2)
    words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return words


def _case(rng: random.Random, text: str) -> str:
    roll = rng.random()
    if roll < 0.4:
        return " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
    if roll < 0.5:
        return text.upper()
    return text


def make_title(
    rng: random.Random,
    leaf: Leaf,
    attributes: dict[str, str],
    brand: str | None,
    audience: str | None,
) -> str:
    """A seller-style title for a product."""
    descriptors: list[str] = []
    if rng.random() < 0.85:
        descriptors.append(attribute_word(rng, "color", attributes["color"]))
    if rng.random() < 0.6:
        descriptors.append(attribute_word(rng, "material", attributes["material"]))
    if (attributes["pattern"] != "solid" and rng.random() < 0.6) or rng.random() < 0.1:
        descriptors.append(attribute_word(rng, "pattern", attributes["pattern"]))
    if rng.random() < 0.4:
        descriptors.append(attribute_word(rng, "style", attributes["style"]))
    nouns = [rng.choice(leaf.nouns)]
    if rng.random() < 0.25:  # keyword stuffing
        nouns += [n for n in rng.sample(leaf.nouns, k=min(2, len(leaf.nouns))) if n not in nouns]
    tail: list[str] = []
    extras = [
        k for k in attributes if k not in ("color", "pattern", "material", "style", "size", "brand")
    ]
    if extras and rng.random() < 0.35:
        tail.append(attributes[rng.choice(extras)])
    if rng.random() < 0.3:
        tail.append(rng.choice(("", "Size ", "size: ")) + attributes["size"])
    if rng.random() < 0.35:
        rng.shuffle(descriptors)
        cut = rng.randrange(len(descriptors) + 1)
        body = descriptors[:cut] + nouns + descriptors[cut:]
    else:
        body = descriptors + nouns
    if audience and rng.random() < 0.5:
        body.insert(0 if rng.random() < 0.7 else len(body), audience)
    words = [w for w in body + tail if w]
    if rng.random() < 0.05:
        words = _typo(rng, words)
    text = _case(rng, " ".join(words))
    parts = [text]
    if brand and rng.random() < 0.85:
        parts.insert(0, brand)
    if rng.random() < 0.35:
        parts.insert(0, rng.choice(MARKETING))
    if rng.random() < 0.45:
        parts.append(" ".join(rng.sample(MARKETING, k=rng.choice((1, 1, 2)))))
    separator = rng.choice((" ", " ", " ", " | ", " - ", ", "))
    return separator.join(parts)


def _with_article(phrase: str) -> str:
    return ("An " if phrase[:1].lower() in "aeiou" else "A ") + phrase


def make_description(rng: random.Random, leaf: Leaf, attributes: dict[str, str]) -> str:
    """A few sentences that mention some of the product's attributes."""
    noun = rng.choice(leaf.nouns)
    templates = [
        lambda: f"Made of {attribute_word(rng, 'material', attributes['material'])}.",
        lambda: (
            f"{attribute_word(rng, 'pattern', attributes['pattern']).capitalize()} design in "
            f"{attribute_word(rng, 'color', attributes['color'])}."
        ),
        lambda: _with_article(
            f"{attribute_word(rng, 'style', attributes['style'])} {noun} for every day."
        ),
        lambda: f"Size: {attributes['size']}.",
        lambda: rng.choice(
            (
                "Ships within 24 hours.",
                "Satisfaction guaranteed.",
                "Please allow 1-2 cm difference due to manual measurement.",
                "Colors may vary slightly due to screen settings.",
                "Perfect gift for friends and family.",
            )
        ),
    ]
    chosen = rng.sample(range(len(templates)), k=rng.randint(1, 4))
    sentences = [templates[i]() for i in sorted(chosen)]
    extras = [
        k for k in attributes if k not in ("color", "pattern", "material", "style", "size", "brand")
    ]
    if extras and rng.random() < 0.4:
        key = rng.choice(extras)
        sentences.append(f"{key.capitalize()}: {attributes[key]}.")
    return " ".join(sentences)


def make_query_text(
    rng: random.Random, leaf: Leaf, attributes: dict[str, str], audience: str | None
) -> str:
    """A short keyword query a shopper would type for this product."""
    words: list[str] = []
    if rng.random() < 0.65:
        words.append(attribute_word(rng, "color", attributes["color"]))
    if rng.random() < 0.3:
        words.append(attribute_word(rng, "material", attributes["material"]))
    if attributes["pattern"] != "solid" and rng.random() < 0.35:
        words.append(attribute_word(rng, "pattern", attributes["pattern"]))
    if rng.random() < 0.2:
        words.append(attribute_word(rng, "style", attributes["style"]))
    rng.shuffle(words)
    if audience and rng.random() < 0.2:
        words.insert(0, audience)
    words.append(rng.choice(leaf.nouns))
    if rng.random() < 0.1:
        words.append(attributes["size"])
    if rng.random() < 0.12:
        words.insert(0 if rng.random() < 0.5 else len(words), rng.choice(QUERY_FILLERS))
    if rng.random() < 0.05:
        words = _typo(rng, words)
    return " ".join(words).lower()


_MARKETING_SET = {m.lower() for m in MARKETING}


def perturb_title(rng: random.Random, title: str) -> str:
    """A near-duplicate listing's title: same product words, re-cased, reordered or re-marketed.

    About half keep the same normalised form (only case and punctuation change).
    """
    words = [w for w in re.split(r"[\s|,]+", title) if w and w != "-"]
    if rng.random() < 0.45:
        words = [w.upper() if rng.random() < 0.3 else w.lower() for w in words]
        return " ".join(words) if words else title
    kept = [w for w in words if w.lower() not in _MARKETING_SET]
    if len(kept) > 2 and rng.random() < 0.6:
        i = rng.randrange(len(kept))
        kept.insert(rng.randrange(len(kept)), kept.pop(i))
    kept = [*kept, rng.choice(MARKETING)] if rng.random() < 0.6 else [rng.choice(MARKETING), *kept]
    candidate = " ".join(kept)
    return candidate if candidate != title else candidate + " " + rng.choice(MARKETING)
