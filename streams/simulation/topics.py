"""Ad topics, the interest segments they map to, and search-query text pools.

Each topic doubles as an interest segment and an ad vertical, so user interests, ad
topics and query topics share one vocabulary and the response model can relate them.
Query pools are ordered head-first and drawn with Zipf frequencies, so a few head
queries repeat often and a long tail exists, as in real search logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Topic:
    segment: str
    phrases: tuple[str, ...]
    brands: tuple[str, ...]
    base_cost_micros: int
    conversion_value: float


TOPICS: tuple[Topic, ...] = (
    Topic(
        "running",
        ("running shoes", "trail running shoes", "marathon training plan", "running socks"),
        ("stride", "fleetfoot", "aerorun"),
        900,
        80.0,
    ),
    Topic(
        "auto_insurance",
        ("car insurance", "auto insurance quote", "cheap car insurance", "young driver insurance"),
        ("safedrive", "autoshield"),
        4_000,
        300.0,
    ),
    Topic(
        "travel",
        ("cheap flights", "hotel deals", "last minute holidays", "city break", "flights to lisbon"),
        ("skyhop", "staywell", "wanderly"),
        1_500,
        450.0,
    ),
    Topic(
        "smartphones",
        ("new smartphone", "phone with best camera", "5g phone deals", "refurbished phone"),
        ("novaphone", "pixelon", "fruitphone"),
        1_200,
        600.0,
    ),
    Topic(
        "laptops",
        ("gaming laptop", "lightweight laptop", "laptop for students", "ultrabook"),
        ("corebook", "zenpad", "lumatop"),
        1_300,
        900.0,
    ),
    Topic(
        "home_decor",
        ("living room ideas", "scandinavian furniture", "wall art", "rug sale"),
        ("nordhaus", "casaluz"),
        700,
        150.0,
    ),
    Topic(
        "gardening",
        ("vegetable garden", "lawn mower", "raised garden bed", "garden tools"),
        ("greenthumb", "mowmaster"),
        600,
        90.0,
    ),
    Topic(
        "fitness",
        ("home gym", "adjustable dumbbells", "yoga mat", "fitness tracker"),
        ("ironcore", "flexfit", "pulsewear"),
        800,
        120.0,
    ),
    Topic(
        "cooking",
        ("easy dinner recipes", "air fryer", "cast iron pan", "meal kit"),
        ("chefbox", "panpro"),
        500,
        60.0,
    ),
    Topic(
        "pets",
        ("dog food", "cat litter", "puppy training", "pet insurance"),
        ("pawfect", "furbowl"),
        600,
        70.0,
    ),
    Topic(
        "gaming",
        ("new video games", "gaming console", "gaming headset", "game pass"),
        ("playforge", "questbox"),
        1_000,
        70.0,
    ),
    Topic(
        "streaming",
        ("streaming service", "new series to watch", "movie streaming", "sports streaming"),
        ("flixly", "streamon"),
        900,
        15.0,
    ),
    Topic(
        "personal_finance",
        ("budgeting app", "high interest savings", "credit card rewards", "investing for beginners"),
        ("coinwise", "saveup"),
        3_000,
        200.0,
    ),
    Topic(
        "mortgages",
        ("mortgage rates", "first time buyer mortgage", "remortgage", "mortgage calculator"),
        ("homelend", "keystone"),
        5_000,
        1_200.0,
    ),
    Topic(
        "skincare",
        ("vitamin c serum", "sunscreen spf 50", "anti aging cream", "moisturizer for dry skin"),
        ("glowlab", "dermapure"),
        700,
        45.0,
    ),
    Topic(
        "womens_fashion",
        ("summer dresses", "women's boots", "handbags sale", "linen trousers"),
        ("elara", "modiva"),
        800,
        95.0,
    ),
    Topic(
        "mens_fashion",
        ("men's sneakers", "slim fit jeans", "leather jacket", "men's watches"),
        ("northline", "gentry"),
        800,
        110.0,
    ),
    Topic(
        "baby",
        ("baby stroller", "diapers", "baby monitor", "car seat"),
        ("tinysteps", "cuddlebug"),
        900,
        130.0,
    ),
    Topic(
        "electric_cars",
        ("electric car", "ev charging at home", "hybrid suv", "electric car lease"),
        ("voltra", "ampere motors"),
        3_500,
        2_000.0,
    ),
    Topic(
        "camping",
        ("camping tent", "sleeping bag", "hiking backpack", "camping stove"),
        ("trailhaus", "summitgear"),
        700,
        140.0,
    ),
    Topic(
        "coffee",
        ("espresso machine", "coffee beans", "coffee subscription", "milk frother"),
        ("brewcraft", "beanery"),
        500,
        40.0,
    ),
    Topic(
        "online_courses",
        ("learn python", "online mba", "data science course", "language learning app"),
        ("skillpath", "learnly"),
        2_000,
        250.0,
    ),
    Topic(
        "concerts",
        ("concert tickets", "music festival", "live shows near me", "stadium tour"),
        ("ticketfly", "gigpass"),
        1_100,
        120.0,
    ),
    Topic(
        "food_delivery",
        ("food delivery", "pizza near me", "sushi delivery", "grocery delivery"),
        ("dashbite", "grubgo"),
        600,
        30.0,
    ),
)

SEGMENTS: tuple[str, ...] = tuple(t.segment for t in TOPICS)

_MODIFIERS = (
    "best",
    "cheap",
    "buy",
    "reviews",
    "deals",
    "near me",
    "2026",
    "discount",
    "compare",
    "how to choose",
)


def query_pools(rng: np.random.Generator, per_topic: int = 200) -> list[NDArray[Any]]:
    """Per topic, an array of distinct query strings ordered from head to tail.

    Head: the bare phrases; then phrase + modifier and brand + phrase combinations in a
    seeded order. Sampling index ``k`` with Zipf weights makes early entries frequent.
    """
    pools = []
    for topic in TOPICS:
        head = list(topic.phrases)
        combos = [
            f"{m} {p}" if m not in ("near me", "2026", "reviews", "deals") else f"{p} {m}"
            for p in topic.phrases
            for m in _MODIFIERS
        ]
        combos += [f"{b} {p}" for p in topic.phrases for b in topic.brands]
        combos += [f"{b} {p} {m}" for p in topic.phrases for b in topic.brands for m in _MODIFIERS[:4]]
        order = rng.permutation(len(combos))
        ordered = head + [combos[i] for i in order]
        seen: dict[str, None] = dict.fromkeys(ordered)
        pools.append(np.array(list(seen)[:per_topic], dtype=object))
    return pools


def zipf_indices(rng: np.random.Generator, sizes: NDArray[Any], exponent: float = 1.1) -> NDArray[Any]:
    """For each requested pool size, a Zipf-distributed index in [0, size)."""
    max_size = int(sizes.max()) if sizes.size else 1
    weights = 1.0 / np.arange(1, max_size + 1) ** exponent
    cumulative = np.cumsum(weights)
    # Scale a uniform draw into each pool's own cumulative mass so small pools stay in range.
    u = rng.random(sizes.size) * cumulative[sizes - 1]
    return np.minimum(np.searchsorted(cumulative, u, side="right"), sizes - 1)
