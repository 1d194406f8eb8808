"""Rule-based entity extraction: the facts an enriched title must keep.

The rule set, in order (a key found by an earlier rule is not looked for again):

1. every product attribute (``key: value``), keys normalised (``colour`` -> ``color``,
   ``fabric`` -> ``material``, ``print`` -> ``pattern``, ...); values longer than
   ``max_value_words`` words are free text, not entities;
2. the leaf category as ``category`` (the product noun);
3. colour, material and pattern words of the lexicons below (plus the config's
   ``extra_lexicon``) found in the title, else in the description: longest phrase first, whole
   words only (substring match for scripts without spaces).

The lexicons group words into families (``grey``/``gray``/``charcoal``); a title keeps an
entity when it contains the value or a word of the value's family, and contradicts the
product when it names a family the product's own text and attributes never mention.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from moon2.augment.config import EntityConfig

KEY_ALIASES = {
    "colour": "color",
    "colors": "color",
    "colours": "color",
    "main color": "color",
    "颜色": "color",
    "fabric": "material",
    "materials": "material",
    "main material": "material",
    "材质": "material",
    "print": "pattern",
    "pattern type": "pattern",
    "图案": "pattern",
    "brand name": "brand",
    "品牌": "brand",
}

LEXICON: dict[str, list[list[str]]] = {
    "color": [
        ["red", "scarlet", "crimson", "cherry"],
        ["burgundy", "maroon", "wine red", "wine"],
        ["orange", "tangerine", "coral"],
        ["yellow", "mustard", "lemon"],
        ["green", "emerald", "kelly green", "mint", "lime"],
        ["olive", "army green", "khaki green"],
        ["teal", "turquoise", "aqua", "cyan"],
        ["blue", "royal blue", "cobalt", "azure"],
        ["navy", "navy blue", "dark blue"],
        ["light blue", "sky blue", "baby blue"],
        ["purple", "violet", "lavender", "lilac", "plum"],
        ["pink", "rose", "blush", "fuchsia", "magenta"],
        ["white", "off-white", "snow white"],
        ["cream", "ivory", "beige", "off white"],
        ["grey", "gray", "charcoal", "heather grey"],
        ["black", "jet black", "midnight black"],
        ["brown", "chocolate", "coffee", "espresso"],
        ["tan", "camel", "khaki"],
        ["silver", "metallic silver"],
        ["gold", "golden", "champagne"],
        ["multicolor", "multicolour", "rainbow", "multi-color"],
        ["transparent", "clear"],
    ],
    "material": [
        ["cotton", "organic cotton"],
        ["linen", "flax"],
        ["polyester", "poly"],
        ["denim", "jean"],
        ["wool", "merino", "cashmere"],
        ["silk", "satin"],
        ["fleece"],
        ["leather", "genuine leather", "real leather", "cowhide"],
        ["pu leather", "faux leather", "vegan leather", "pu"],
        ["suede"],
        ["canvas"],
        ["mesh"],
        ["rubber", "latex"],
        ["nylon"],
        ["aluminum", "aluminium"],
        ["plastic", "abs", "polypropylene"],
        ["glass", "tempered glass"],
        ["stainless steel", "steel"],
        ["silicone"],
        ["ceramic", "stoneware", "earthenware"],
        ["porcelain", "fine china", "bone china"],
        ["wood", "wooden", "solid wood", "oak", "walnut", "pine"],
        ["bamboo"],
        ["velvet"],
        ["iron", "cast iron"],
        ["copper"],
        ["brass"],
        ["acrylic"],
        ["spandex", "elastane", "lycra"],
        ["rayon", "viscose"],
        ["marble stone", "granite"],
    ],
    "pattern": [
        ["solid", "plain", "solid color", "solid colour"],
        ["striped", "stripe", "stripes", "pinstripe"],
        ["plaid", "tartan"],
        ["checkered", "checked", "gingham", "check"],
        ["polka dot", "dotted", "spotted", "polka dots"],
        ["floral", "flower print", "flowers", "flower"],
        ["camouflage", "camo"],
        ["zigzag", "chevron", "geometric"],
        ["gradient", "ombre"],
        ["color block", "colorblock", "colour block", "two-tone"],
        ["quilted"],
        ["snakeskin", "python print", "leopard", "animal print", "zebra"],
        ["marble", "marbled"],
        ["carbon fiber", "carbon fibre"],
        ["paisley"],
        ["houndstooth"],
        ["embroidered", "embroidery"],
    ],
}

TEXT_KEYS = tuple(LEXICON)


@dataclass(frozen=True)
class Entity:
    key: str
    value: str
    source: str  # attribute | category | title | description

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "value": self.value}


def normalise_key(key: str) -> str:
    key = " ".join(key.strip().lower().replace("_", " ").split())
    return KEY_ALIASES.get(key, key)


def normalise_text(text: str) -> str:
    return " ".join(text.lower().split())


def phrase_pattern(phrase: str) -> re.Pattern[str]:
    escaped = re.escape(phrase.lower())
    if phrase.isascii():
        return re.compile(rf"(?<![\w-]){escaped}(?![\w-])")
    return re.compile(escaped)  # scripts without spaces: substring


class Lexicon:
    """Word families per key, with fast phrase lookup (longest phrase first)."""

    def __init__(self, extra: dict[str, list[str]] | None = None) -> None:
        self.families: dict[str, list[list[str]]] = {
            k: [list(f) for f in v] for k, v in LEXICON.items()
        }
        for key, words in (extra or {}).items():
            self.families.setdefault(normalise_key(key), []).extend([w] for w in words)
        self._phrases: dict[str, list[tuple[str, int, re.Pattern[str]]]] = {}
        for key, families in self.families.items():
            phrases = [
                (word.lower(), index, phrase_pattern(word))
                for index, family in enumerate(families)
                for word in family
            ]
            phrases.sort(key=lambda item: -len(item[0]))
            self._phrases[key] = phrases

    def find(self, key: str, text: str) -> list[tuple[str, int]]:
        """(phrase, family) of ``key`` in ``text``, longest first, non-overlapping."""
        found: list[tuple[str, int]] = []
        taken: list[tuple[int, int]] = []
        lowered = normalise_text(text)
        for phrase, family, pattern in self._phrases.get(key, []):
            for match in pattern.finditer(lowered):
                span = match.span()
                if any(span[0] < end and start < span[1] for start, end in taken):
                    continue
                taken.append(span)
                found.append((phrase, family))
        return found

    def families_of(self, key: str, text: str) -> set[int]:
        return {family for _, family in self.find(key, text)}

    def family_words(self, key: str, value: str) -> list[str]:
        """``value`` and the other words of the families it names."""
        words = [value.lower()]
        for _, family in self.find(key, value):
            words.extend(self.families[key][family])
        return words


def _category_noun(leaf: str) -> str:
    return " ".join(leaf.split())


def extract_entities(
    row: dict[str, Any], config: EntityConfig, lexicon: Lexicon | None = None
) -> list[Entity]:
    """The product's entities by the rule set in this module's docstring."""
    lexicon = lexicon or Lexicon(config.extra_lexicon)
    entities: list[Entity] = []
    seen: set[str] = set()

    def add(key: str, value: str, source: str) -> None:
        value = " ".join(str(value).split())
        if not value or key in seen or len(value.split()) > config.max_value_words:
            return
        seen.add(key)
        entities.append(Entity(key, value, source))

    if config.from_attributes:
        for pair in row.get("attributes") or []:
            if pair and pair.get("key") and pair.get("value") is not None:
                add(normalise_key(pair["key"]), pair["value"], "attribute")
    category = [c for c in row.get("category") or [] if c and c.strip()]
    if config.from_category and category:
        add("category", _category_noun(category[-1]), "category")
    if config.from_text:
        for source in ("title", "description"):
            text = row.get(source) or ""
            if not text.strip():
                continue
            for key in lexicon.families:
                if key in seen:
                    continue
                found = lexicon.find(key, text)
                if found:
                    add(key, found[0][0], source)
    return entities


def format_entities(entities: Iterable[Entity]) -> str:
    """``key: value; key: value`` (the prompt's facts line)."""
    return "; ".join(f"{e.key}: {e.value}" for e in entities)


def entity_text(entities: Sequence[Entity]) -> str:
    return " ".join(e.value for e in entities)
