"""The synthetic catalog's world: category tree, attribute vocabularies, words sellers use.

Pure data. Every leaf has its own drawn shape (``shapes.py``), nouns sellers and shoppers use
for it, and attribute vocabularies inherited from its top-level department unless the leaf
overrides them. Colours carry the RGB used for drawing; patterns name the texture drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# --- colours: name -> (RGB, words sellers write for it) ------------------------------------
COLORS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((206, 32, 41), ("red", "scarlet", "cherry red")),
    "burgundy": ((122, 24, 48), ("burgundy", "wine red", "maroon")),
    "orange": ((240, 128, 24), ("orange", "tangerine")),
    "yellow": ((246, 206, 40), ("yellow", "mustard", "lemon yellow")),
    "green": ((46, 150, 70), ("green", "kelly green")),
    "olive": ((112, 118, 52), ("olive", "army green", "olive green")),
    "teal": ((20, 136, 140), ("teal", "turquoise", "peacock blue")),
    "blue": ((40, 96, 214), ("blue", "royal blue", "cobalt")),
    "navy": ((26, 38, 92), ("navy", "navy blue", "dark blue")),
    "light blue": ((140, 190, 236), ("light blue", "sky blue", "baby blue")),
    "purple": ((118, 60, 168), ("purple", "violet", "lavender purple")),
    "pink": ((240, 140, 180), ("pink", "rose", "blush pink")),
    "white": ((244, 244, 240), ("white", "off-white", "snow white")),
    "cream": ((236, 224, 196), ("cream", "ivory", "beige")),
    "grey": ((132, 134, 138), ("grey", "gray", "heather grey")),
    "black": ((28, 28, 30), ("black", "jet black", "midnight black")),
    "brown": ((110, 70, 40), ("brown", "chocolate", "coffee")),
    "tan": ((196, 150, 100), ("tan", "camel", "khaki")),
    "silver": ((192, 196, 202), ("silver", "metallic silver")),
    "gold": ((212, 172, 60), ("gold", "champagne gold")),
}

# --- patterns: name -> words; the texture drawn is chosen by name in render.py --------------
PATTERNS: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain", "solid color"),
    "striped": ("striped", "stripe", "stripes"),
    "plaid": ("plaid", "tartan"),
    "checkered": ("checkered", "checked", "gingham"),
    "polka dot": ("polka dot", "dotted", "spotted"),
    "floral": ("floral", "flower print", "flowers"),
    "camouflage": ("camouflage", "camo"),
    "zigzag": ("zigzag", "chevron", "geometric"),
    "gradient": ("gradient", "ombre"),
    "color block": ("color block", "two-tone", "colorblock"),
    "quilted": ("quilted", "diamond quilted"),
    "snakeskin": ("snakeskin", "python print"),
    "marble": ("marble", "marbled"),
    "carbon fiber": ("carbon fiber", "carbon texture"),
}

MATERIALS: dict[str, tuple[str, ...]] = {
    "cotton": ("cotton", "100% cotton", "pure cotton"),
    "linen": ("linen", "cotton linen"),
    "polyester": ("polyester", "poly"),
    "denim": ("denim", "jean"),
    "wool": ("wool", "merino wool", "wool blend"),
    "silk": ("silk", "satin silk"),
    "fleece": ("fleece", "polar fleece"),
    "leather": ("leather", "genuine leather", "real leather"),
    "pu leather": ("PU leather", "faux leather", "vegan leather"),
    "suede": ("suede",),
    "canvas": ("canvas",),
    "mesh": ("mesh", "breathable mesh"),
    "rubber": ("rubber",),
    "nylon": ("nylon", "waterproof nylon"),
    "aluminum": ("aluminum", "aluminium", "metal"),
    "plastic": ("plastic", "ABS"),
    "glass": ("glass", "tempered glass"),
    "stainless steel": ("stainless steel", "steel"),
    "silicone": ("silicone",),
    "ceramic": ("ceramic", "stoneware"),
    "porcelain": ("porcelain", "fine china"),
    "wood": ("wood", "solid wood", "wooden"),
    "bamboo": ("bamboo",),
    "velvet": ("velvet",),
    "iron": ("iron", "cast iron"),
}

GLOSSY_MATERIALS = frozenset(
    {
        "leather",
        "pu leather",
        "aluminum",
        "glass",
        "stainless steel",
        "ceramic",
        "porcelain",
        "silk",
        "plastic",
        "iron",
    }
)
ROUGH_MATERIALS = frozenset(
    {"denim", "wool", "fleece", "canvas", "linen", "suede", "mesh", "velvet", "wood", "bamboo"}
)

STYLES: dict[str, tuple[str, ...]] = {
    "casual": ("casual", "everyday"),
    "formal": ("formal", "elegant", "office"),
    "sporty": ("sporty", "athletic", "sport"),
    "vintage": ("vintage", "retro", "classic"),
    "streetwear": ("streetwear", "street style", "hip hop"),
    "minimalist": ("minimalist", "minimal", "simple"),
    "bohemian": ("bohemian", "boho"),
    "business": ("business", "professional"),
    "outdoor": ("outdoor", "hiking", "travel"),
    "modern": ("modern", "contemporary"),
    "rustic": ("rustic", "farmhouse"),
    "scandinavian": ("scandinavian", "nordic"),
    "gaming": ("gaming", "gamer", "RGB"),
    "luxury": ("luxury", "premium", "designer"),
    "cute": ("cute", "kawaii", "lovely"),
}


@dataclass(frozen=True)
class Department:
    """A top-level category: vocabularies its leaves use unless they override them."""

    name: str
    colors: tuple[str, ...]
    patterns: tuple[str, ...]
    materials: tuple[str, ...]
    styles: tuple[str, ...]
    sizes: tuple[str, ...]
    audiences: tuple[str, ...] = ()
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Department-specific attribute keys (present on about half of the products)."""


@dataclass(frozen=True)
class Leaf:
    """A leaf category: path root first, its drawn shape and the nouns used for it."""

    path: tuple[str, ...]
    shape: str
    nouns: tuple[str, ...]
    sizes: tuple[str, ...] | None = None
    materials: tuple[str, ...] | None = None
    patterns: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def department(self) -> str:
        return self.path[0]


_APPAREL_COLORS = (
    "red",
    "burgundy",
    "orange",
    "yellow",
    "green",
    "olive",
    "teal",
    "blue",
    "navy",
    "light blue",
    "purple",
    "pink",
    "white",
    "cream",
    "grey",
    "black",
    "brown",
    "tan",
)
_NEUTRALS = ("black", "white", "grey", "brown", "tan", "cream", "navy", "burgundy")

DEPARTMENTS: dict[str, Department] = {
    d.name: d
    for d in (
        Department(
            "Apparel",
            colors=_APPAREL_COLORS,
            patterns=(
                "solid",
                "striped",
                "plaid",
                "checkered",
                "polka dot",
                "floral",
                "camouflage",
                "color block",
            ),
            materials=("cotton", "linen", "polyester", "denim", "wool", "silk", "fleece"),
            styles=(
                "casual",
                "formal",
                "sporty",
                "vintage",
                "streetwear",
                "minimalist",
                "bohemian",
            ),
            sizes=("XS", "S", "M", "L", "XL", "XXL"),
            audiences=("women's", "men's", "unisex", "kids"),
            extra={"fit": ("slim fit", "regular fit", "oversized", "loose")},
        ),
        Department(
            "Shoes",
            colors=(
                "black",
                "white",
                "grey",
                "brown",
                "tan",
                "red",
                "blue",
                "navy",
                "pink",
                "green",
                "cream",
                "burgundy",
            ),
            patterns=("solid", "color block", "striped", "snakeskin", "polka dot", "camouflage"),
            materials=("leather", "pu leather", "suede", "canvas", "mesh", "rubber"),
            styles=("casual", "sporty", "formal", "outdoor", "vintage", "minimalist", "streetwear"),
            sizes=tuple(f"EU {n}" for n in range(35, 47)),
            audiences=("women's", "men's", "unisex", "kids"),
            extra={"closure": ("lace-up", "slip-on", "hook and loop", "zip")},
        ),
        Department(
            "Bags & Luggage",
            colors=(*_NEUTRALS, "red", "pink", "green", "blue", "olive"),
            patterns=(
                "solid",
                "quilted",
                "checkered",
                "striped",
                "snakeskin",
                "color block",
                "camouflage",
            ),
            materials=("leather", "pu leather", "canvas", "nylon", "polyester", "suede"),
            styles=("casual", "business", "outdoor", "vintage", "minimalist", "luxury"),
            sizes=("mini", "small", "medium", "large"),
            audiences=("women's", "men's", "unisex"),
            extra={"closure": ("zipper", "magnetic snap", "drawstring", "buckle")},
        ),
        Department(
            "Electronics",
            colors=(
                "black",
                "white",
                "silver",
                "grey",
                "gold",
                "blue",
                "red",
                "green",
                "pink",
                "purple",
            ),
            patterns=("solid", "gradient", "carbon fiber", "color block", "marble"),
            materials=("aluminum", "plastic", "glass", "stainless steel", "silicone"),
            styles=("modern", "gaming", "business", "sporty", "minimalist", "luxury"),
            sizes=("compact", "standard", "large"),
            extra={"connectivity": ("bluetooth 5.3", "wifi", "USB-C", "wireless", "5G")},
        ),
        Department(
            "Home & Kitchen",
            colors=(
                "white",
                "cream",
                "black",
                "grey",
                "blue",
                "navy",
                "green",
                "teal",
                "yellow",
                "pink",
                "brown",
                "tan",
                "orange",
            ),
            patterns=(
                "solid",
                "striped",
                "floral",
                "zigzag",
                "polka dot",
                "marble",
                "checkered",
                "gradient",
            ),
            materials=(
                "ceramic",
                "porcelain",
                "glass",
                "wood",
                "bamboo",
                "stainless steel",
                "velvet",
                "linen",
                "iron",
            ),
            styles=(
                "modern",
                "rustic",
                "scandinavian",
                "vintage",
                "minimalist",
                "bohemian",
                "luxury",
            ),
            sizes=("small", "medium", "large"),
            extra={"room": ("living room", "bedroom", "kitchen", "office")},
        ),
        Department(
            "Accessories",
            colors=(*_NEUTRALS, "red", "pink", "blue", "green", "yellow", "gold", "silver"),
            patterns=(
                "solid",
                "striped",
                "floral",
                "checkered",
                "polka dot",
                "camouflage",
                "gradient",
            ),
            materials=("cotton", "polyester", "nylon", "plastic", "aluminum", "leather"),
            styles=("casual", "sporty", "vintage", "luxury", "streetwear", "cute"),
            sizes=("one size", "adjustable", "S/M", "L/XL"),
            audiences=("women's", "men's", "unisex", "kids"),
        ),
        Department(
            "Beauty",
            colors=("pink", "gold", "purple", "light blue", "black", "white", "red", "teal"),
            patterns=("solid", "gradient", "marble"),
            materials=("glass", "plastic", "aluminum"),
            styles=("luxury", "modern", "vintage", "cute", "minimalist"),
            sizes=("30ml", "50ml", "100ml"),
            audiences=("women's", "men's", "unisex"),
            extra={"scent": ("floral", "woody", "citrus", "oriental", "fresh")},
        ),
        Department(
            "Sports & Outdoors",
            colors=(
                "black",
                "red",
                "blue",
                "orange",
                "green",
                "yellow",
                "white",
                "grey",
                "purple",
                "pink",
            ),
            patterns=("solid", "striped", "color block", "camouflage", "gradient", "zigzag"),
            materials=("rubber", "aluminum", "stainless steel", "plastic", "nylon", "iron"),
            styles=("sporty", "outdoor", "minimalist", "modern"),
            sizes=("size 5", "size 6", "size 7", "one size"),
            audiences=("men's", "women's", "unisex", "kids"),
        ),
    )
}

LEAVES: tuple[Leaf, ...] = (
    # Apparel
    Leaf(("Apparel", "Tops", "T-Shirts"), "tshirt", ("t-shirt", "tee", "tshirt", "T shirt")),
    Leaf(("Apparel", "Tops", "Shirts"), "shirt", ("shirt", "button-down shirt", "blouse")),
    Leaf(
        ("Apparel", "Tops", "Hoodies & Sweatshirts"),
        "hoodie",
        ("hoodie", "hooded sweatshirt", "pullover hoodie"),
    ),
    Leaf(("Apparel", "Tops", "Sweaters"), "sweater", ("sweater", "jumper", "knit pullover")),
    Leaf(
        ("Apparel", "Bottoms", "Jeans"),
        "jeans",
        ("jeans", "denim pants", "trousers"),
        sizes=("W26", "W28", "W30", "W32", "W34", "W36"),
        materials=("denim", "cotton", "polyester"),
    ),
    Leaf(("Apparel", "Bottoms", "Shorts"), "shorts", ("shorts", "short pants", "bermuda shorts")),
    Leaf(("Apparel", "Bottoms", "Skirts"), "skirt", ("skirt", "a-line skirt", "midi skirt")),
    Leaf(("Apparel", "Dresses", "Casual Dresses"), "dress", ("dress", "sundress", "midi dress")),
    Leaf(("Apparel", "Outerwear", "Jackets"), "jacket", ("jacket", "bomber jacket", "windbreaker")),
    Leaf(("Apparel", "Outerwear", "Coats"), "coat", ("coat", "overcoat", "trench coat")),
    # Shoes
    Leaf(
        ("Shoes", "Athletic Shoes", "Sneakers"),
        "sneaker",
        ("sneakers", "trainers", "running shoes"),
    ),
    Leaf(("Shoes", "Boots", "Ankle Boots"), "boot", ("ankle boots", "boots", "chelsea boots")),
    Leaf(("Shoes", "Sandals & Slippers", "Sandals"), "sandal", ("sandals", "slides", "flip flops")),
    Leaf(
        ("Shoes", "Sandals & Slippers", "Slippers"),
        "slipper",
        ("slippers", "house slippers", "indoor slippers"),
    ),
    Leaf(("Shoes", "Heels", "Pumps"), "high_heel", ("high heels", "pumps", "stilettos")),
    # Bags & Luggage
    Leaf(
        ("Bags & Luggage", "Backpacks", "Daypacks"),
        "backpack",
        ("backpack", "rucksack", "school bag"),
    ),
    Leaf(
        ("Bags & Luggage", "Handbags", "Shoulder Bags"),
        "handbag",
        ("handbag", "shoulder bag", "purse"),
    ),
    Leaf(("Bags & Luggage", "Handbags", "Tote Bags"), "tote", ("tote bag", "tote", "shopper bag")),
    Leaf(
        ("Bags & Luggage", "Small Leather Goods", "Wallets"),
        "wallet",
        ("wallet", "card holder", "bifold wallet"),
        sizes=("slim", "standard", "long"),
    ),
    Leaf(
        ("Bags & Luggage", "Luggage", "Suitcases"),
        "suitcase",
        ("suitcase", "luggage", "carry-on"),
        sizes=("20 inch", "24 inch", "28 inch"),
        materials=("plastic", "aluminum", "polyester", "nylon"),
    ),
    # Electronics
    Leaf(
        ("Electronics", "Phones", "Smartphones"),
        "smartphone",
        ("smartphone", "mobile phone", "cell phone"),
        sizes=("6.1 inch", "6.5 inch", "6.7 inch", "128GB", "256GB"),
    ),
    Leaf(
        ("Electronics", "Computers", "Laptops"),
        "laptop",
        ("laptop", "notebook", "ultrabook"),
        sizes=("13 inch", "14 inch", "15.6 inch", "16 inch"),
    ),
    Leaf(
        ("Electronics", "Computers", "Tablets"),
        "tablet",
        ("tablet", "pad", "android tablet"),
        sizes=("8 inch", "10.1 inch", "11 inch", "12.9 inch"),
    ),
    Leaf(
        ("Electronics", "Audio", "Headphones"),
        "headphones",
        ("headphones", "headset", "over-ear headphones"),
    ),
    Leaf(
        ("Electronics", "Audio", "Bluetooth Speakers"),
        "speaker",
        ("bluetooth speaker", "portable speaker", "wireless speaker"),
    ),
    Leaf(
        ("Electronics", "Wearables", "Smartwatches"),
        "smartwatch",
        ("smartwatch", "smart watch", "fitness watch"),
        sizes=("40mm", "42mm", "44mm", "46mm"),
    ),
    Leaf(
        ("Electronics", "Cameras", "Digital Cameras"),
        "camera",
        ("digital camera", "camera", "compact camera"),
    ),
    # Home & Kitchen (some leaves one level deeper)
    Leaf(
        ("Home & Kitchen", "Kitchen", "Drinkware", "Mugs"),
        "mug",
        ("mug", "coffee mug", "tea cup"),
        sizes=("250ml", "350ml", "450ml"),
    ),
    Leaf(
        ("Home & Kitchen", "Kitchen", "Teapots & Kettles"),
        "teapot",
        ("teapot", "tea kettle", "tea pot"),
        sizes=("0.6L", "1L", "1.5L"),
    ),
    Leaf(
        ("Home & Kitchen", "Kitchen", "Dinnerware", "Plates"),
        "plate",
        ("plate", "dinner plate", "dish"),
        sizes=("8 inch", "10 inch", "12 inch"),
    ),
    Leaf(
        ("Home & Kitchen", "Kitchen", "Dinnerware", "Bowls"),
        "bowl",
        ("bowl", "salad bowl", "soup bowl"),
    ),
    Leaf(
        ("Home & Kitchen", "Furniture", "Chairs"),
        "chair",
        ("chair", "dining chair", "accent chair"),
        materials=("wood", "velvet", "linen", "iron", "bamboo"),
    ),
    Leaf(
        ("Home & Kitchen", "Furniture", "Sofas"),
        "sofa",
        ("sofa", "couch", "loveseat"),
        materials=("velvet", "linen", "wood"),
        sizes=("2-seater", "3-seater", "corner"),
    ),
    Leaf(
        ("Home & Kitchen", "Furniture", "Tables"),
        "table",
        ("table", "coffee table", "side table"),
        materials=("wood", "glass", "iron", "bamboo"),
    ),
    Leaf(
        ("Home & Kitchen", "Lighting", "Table Lamps"),
        "lamp",
        ("table lamp", "desk lamp", "bedside lamp"),
    ),
    Leaf(("Home & Kitchen", "Decor", "Vases"), "vase", ("vase", "flower vase", "ceramic vase")),
    Leaf(
        ("Home & Kitchen", "Decor", "Cushions"),
        "cushion",
        ("cushion", "throw pillow", "pillow cover"),
        materials=("velvet", "linen", "cotton"),
        sizes=("40x40cm", "45x45cm", "50x50cm"),
    ),
    Leaf(
        ("Home & Kitchen", "Decor", "Wall Clocks"), "clock", ("wall clock", "clock", "silent clock")
    ),
    # Accessories
    Leaf(("Accessories", "Hats", "Baseball Caps"), "cap", ("baseball cap", "cap", "snapback")),
    Leaf(
        ("Accessories", "Eyewear", "Sunglasses"),
        "sunglasses",
        ("sunglasses", "shades", "polarized sunglasses"),
    ),
    Leaf(
        ("Accessories", "Rain Gear", "Umbrellas"),
        "umbrella",
        ("umbrella", "folding umbrella", "windproof umbrella"),
    ),
    # Beauty
    Leaf(("Beauty", "Fragrance", "Perfume"), "perfume", ("perfume", "eau de parfum", "fragrance")),
    # Sports & Outdoors
    Leaf(
        ("Sports & Outdoors", "Ball Sports", "Basketballs"),
        "ball",
        ("basketball", "ball", "indoor outdoor basketball"),
    ),
    Leaf(
        ("Sports & Outdoors", "Racket Sports", "Tennis Rackets"),
        "racket",
        ("tennis racket", "racquet", "tennis racquet"),
    ),
    Leaf(
        ("Sports & Outdoors", "Fitness", "Dumbbells"),
        "dumbbell",
        ("dumbbell", "dumbbells", "hand weights"),
        sizes=("2kg", "5kg", "10kg", "20kg"),
    ),
    Leaf(
        ("Sports & Outdoors", "Hydration", "Water Bottles"),
        "bottle",
        ("water bottle", "sports bottle", "insulated bottle"),
        sizes=("500ml", "750ml", "1L"),
    ),
)

# Invented brand names: a real catalog's brands are a vocabulary the model has never seen.
BRANDS: tuple[str, ...] = (
    "Zentro",
    "Lumica",
    "Varokk",
    "Nordhavn",
    "Qilin",
    "Mareva",
    "Tokaru",
    "Belvio",
    "Aurix",
    "Kestrel&Co",
    "Ondine",
    "Pravo",
    "Sunvale",
    "Hexley",
    "Miyoto",
    "Castellan",
    "Brisa",
    "Ulvik",
    "Fennec",
    "Dravik",
    "Solenne",
    "Yunhe",
    "Okapi",
    "Verdano",
)

MARKETING: tuple[str, ...] = (
    "HOT SALE 2026",
    "free shipping",
    "NEW",
    "2026 new arrival",
    "best seller",
    "limited offer",
    "high quality",
    "on sale",
    "[Official Store]",
    "fast delivery",
    "top rated",
    "gift idea",
    "clearance",
    "factory direct",
    "!!!",
    "💥",
    "✨",
    "包邮",
    "新款",
    "envío gratis",
    "oferta",
    "Neuheit",
)

QUERY_FILLERS: tuple[str, ...] = ("cheap", "best", "for women", "for men", "2026", "sale", "new")


def leaf_attribute_vocab(leaf: Leaf) -> dict[str, tuple[str, ...]]:
    """The attribute keys and values a product of ``leaf`` draws from, in a fixed order."""
    department = DEPARTMENTS[leaf.department]
    vocab = {
        "color": department.colors,
        "pattern": leaf.patterns or department.patterns,
        "material": leaf.materials or department.materials,
        "style": department.styles,
        "size": leaf.sizes or department.sizes,
    }
    vocab.update(department.extra)
    return vocab


def check_taxonomy() -> None:
    """Raise ValueError when the tables above contradict each other (run by the tests)."""
    paths = [leaf.path for leaf in LEAVES]
    if len(set(paths)) != len(paths):
        raise ValueError("duplicate leaf path")
    shapes = [leaf.shape for leaf in LEAVES]
    if len(set(shapes)) != len(shapes):
        raise ValueError("two leaves share a shape")
    for leaf in LEAVES:
        if leaf.department not in DEPARTMENTS:
            raise ValueError(f"{leaf.path}: unknown department")
        vocab = leaf_attribute_vocab(leaf)
        for key, table in (
            ("color", COLORS),
            ("pattern", PATTERNS),
            ("material", MATERIALS),
            ("style", STYLES),
        ):
            unknown = [value for value in vocab[key] if value not in table]
            if unknown:
                raise ValueError(f"{leaf.path}: unknown {key} values {unknown}")
