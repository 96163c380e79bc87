"""Streaming feature definitions: written once, compiled for every engine.

A :class:`FeatureGroup` says which entity a set of features belongs to, which event
column keys it, and which aggregations to keep over which sliding windows. From these
definitions adreach generates the Feast objects (:mod:`features.feast_objects`), and the
stream engines (embedded and Flink) generate their aggregation plans, so a change here
changes every engine at once.

Window semantics (shared by all engines and the reference computation): time is cut
into tiles of :data:`TILE_SECONDS`; a feature "over W" as of time t covers the events
whose event time lies in ``[tile_end(t) - W, tile_end(t))``, where ``tile_end(t)`` is
the end of the tile containing t. ``last_n`` lists hold the N most recent values (by
event time) within the longest window.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from streams.events import EVENT_TYPE_NAMES

TILE_SECONDS = 60

AggregationKind = Literal["count", "sum", "distinct_count", "last_n"]
FeatureType = Literal["int64", "float64", "string_list", "string", "float_list"]


class DefinitionError(ValueError):
    """A feature definition is inconsistent; the message names the group and feature."""


@dataclass(frozen=True)
class Window:
    name: str
    seconds: int

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.seconds % TILE_SECONDS:
            raise DefinitionError(f"window {self.name}: must be a positive multiple of {TILE_SECONDS} s")


WINDOWS = (Window("10m", 600), Window("1h", 3_600), Window("24h", 86_400), Window("7d", 604_800))


@dataclass(frozen=True)
class Aggregation:
    """One aggregation of the events of ``event_types``.

    ``count`` counts events; ``sum`` adds ``column``; ``distinct_count`` counts distinct
    values of ``column``; ``last_n`` keeps the ``n`` latest values of ``column``.
    """

    name: str
    kind: AggregationKind
    event_types: tuple[str, ...]
    column: str | None = None
    n: int = 20

    def __post_init__(self) -> None:
        unknown = set(self.event_types) - set(EVENT_TYPE_NAMES)
        if unknown or not self.event_types:
            raise DefinitionError(
                f"aggregation {self.name}: unknown or missing event types {sorted(unknown)}"
            )
        if self.kind != "count" and not self.column:
            raise DefinitionError(f"aggregation {self.name}: {self.kind} needs a column")
        if self.kind == "last_n" and not 1 <= self.n <= 1_000:
            raise DefinitionError(f"aggregation {self.name}: n must be in 1..1000")

    @property
    def windowed(self) -> bool:
        return self.kind != "last_n"


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` per window (e.g. CTR = clicks / impressions); 0 when empty."""

    name: str
    numerator: str
    denominator: str


@dataclass(frozen=True)
class Feature:
    name: str
    type: FeatureType
    description: str


@dataclass(frozen=True)
class FeatureGroup:
    """Features of one entity, kept up to date from the event stream."""

    name: str
    entity: str
    key: str
    aggregations: tuple[Aggregation, ...]
    ratios: tuple[Ratio, ...] = ()
    windows: tuple[Window, ...] = WINDOWS
    description: str = ""
    extra: tuple[Feature, ...] = ()
    """Features written as they are by a batch job (no aggregation), e.g. model embeddings."""
    computed_by: str = "adreach stream engines"

    def __post_init__(self) -> None:
        names = [a.name for a in self.aggregations]
        if len(set(names)) != len(names):
            raise DefinitionError(f"group {self.name}: duplicate aggregation names")
        counts = {a.name for a in self.aggregations if a.kind in ("count", "sum")}
        for ratio in self.ratios:
            missing = {ratio.numerator, ratio.denominator} - counts
            if missing:
                raise DefinitionError(
                    f"group {self.name}: ratio {ratio.name} refers to unknown {sorted(missing)}"
                )

    @property
    def longest_window(self) -> Window:
        return max(self.windows, key=lambda w: w.seconds)

    def features(self) -> Iterator[Feature]:
        """Every feature column the group produces, in a stable order."""
        for aggregation in self.aggregations:
            sources = ", ".join(aggregation.event_types)
            if not aggregation.windowed:
                yield Feature(
                    aggregation.name,
                    "string_list",
                    f"latest {aggregation.n} {aggregation.column} values ({sources})",
                )
                continue
            kind: FeatureType = "float64" if aggregation.kind == "sum" else "int64"
            for window in self.windows:
                yield Feature(
                    f"{aggregation.name}_{window.name}",
                    kind,
                    f"{aggregation.kind} of {aggregation.column or 'events'} ({sources}) over {window.name}",
                )
        for ratio in self.ratios:
            for window in self.windows:
                yield Feature(
                    f"{ratio.name}_{window.name}",
                    "float64",
                    f"{ratio.numerator} / {ratio.denominator} over {window.name}",
                )
        yield from self.extra


def _counts(prefix: str = "") -> tuple[Aggregation, ...]:
    return (
        Aggregation(f"{prefix}impressions", "count", ("impression",)),
        Aggregation(f"{prefix}clicks", "count", ("click",)),
        Aggregation(f"{prefix}conversions", "count", ("conversion",)),
        Aggregation(f"{prefix}spend_micros", "sum", ("impression",), "cost_micros"),
    )


_RATES = (Ratio("ctr", "clicks", "impressions"), Ratio("cvr", "conversions", "clicks"))

FEATURE_GROUPS: tuple[FeatureGroup, ...] = (
    FeatureGroup(
        "user_activity",
        "user",
        "user_id",
        (
            *_counts(),
            Aggregation("searches", "count", ("search",)),
            Aggregation("distinct_ads", "distinct_count", ("impression",), "ad_id"),
            Aggregation("last_clicked_ads", "last_n", ("click",), "ad_id", n=20),
            Aggregation("last_queries", "last_n", ("search",), "query", n=20),
        ),
        _RATES,
        description="What a user saw, clicked, bought and searched recently.",
    ),
    FeatureGroup(
        "ad_performance",
        "ad",
        "ad_id",
        (*_counts(), Aggregation("distinct_users", "distinct_count", ("impression",), "user_id")),
        _RATES,
        description="Delivery and response of one ad.",
    ),
    FeatureGroup(
        "campaign_performance",
        "campaign",
        "campaign_id",
        (
            *_counts(),
            Aggregation("conversion_value", "sum", ("conversion",), "value"),
            Aggregation("distinct_users", "distinct_count", ("impression",), "user_id"),
        ),
        _RATES,
        description="Delivery, response and value of one campaign.",
    ),
    FeatureGroup(
        "advertiser_performance",
        "advertiser",
        "advertiser_id",
        (*_counts(), Aggregation("conversion_value", "sum", ("conversion",), "value")),
        _RATES,
        description="Delivery, response and value of one advertiser.",
    ),
    FeatureGroup(
        "query_popularity",
        "query",
        "query",
        (
            Aggregation("searches", "count", ("search",)),
            Aggregation("distinct_users", "distinct_count", ("search",), "user_id"),
        ),
        description="How often a (normalized) query is searched, and by how many users.",
    ),
)


@dataclass(frozen=True)
class FeatureTable(FeatureGroup):
    """Features of one entity computed by a batch job rather than aggregated from the stream.

    A table has explicit ``columns`` instead of aggregations and a ``ttl_seconds`` instead of
    windows. It is a :class:`FeatureGroup` (with no aggregations) so that the Feast objects
    and the fast online writer/reader serve it unchanged; the stream engines only ever see
    :data:`FEATURE_GROUPS`, which holds no tables.
    """

    columns: tuple[Feature, ...] = ()
    ttl_seconds: int = 365 * 86_400

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        if not names or len(set(names)) != len(names) or self.aggregations:
            raise DefinitionError(f"table {self.name}: needs unique columns and no aggregations")

    @property
    def longest_window(self) -> Window:
        return Window("ttl", self.ttl_seconds)

    def features(self) -> Iterator[Feature]:
        yield from self.columns


QUERY_EMBEDDING_DIM = 384

QUERY_FEATURES = FeatureTable(
    "query_features",
    "query",
    "query",
    (),
    columns=(
        Feature(
            "embedding",
            "float_list",
            f"{QUERY_EMBEDDING_DIM}-d unit-length all-MiniLM-L6-v2 sentence embedding of the query",
        ),
        Feature("category", "string", "ad-taxonomy category id (queries.taxonomy_path)"),
        Feature("category_score", "float64", "cosine similarity (cpu) or 1.0 (vllm) of the chosen category"),
        Feature("commercial_intent", "float64", "probability that the query intends to buy (0..1)"),
        Feature("keywords", "string_list", "keyword expansions"),
        Feature("generator", "string", "backend/model that generated the row (cache key)"),
    ),
    description="Language-model features of a normalized search query (adreach features queries).",
)

BATCH_TABLES: tuple[FeatureTable, ...] = (QUERY_FEATURES,)
"""Feature tables written by batch jobs; registered in Feast next to :data:`FEATURE_GROUPS`."""


QUERY_WHITESPACE: tuple[tuple[int, int], ...] = (
    (0x09, 0x0D),
    (0x1C, 0x20),
    (0x85, 0x85),
    (0xA0, 0xA0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x2028, 0x2029),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
)
"""The code point ranges :func:`normalize_query` splits on (Python's ``str.split()``), spelled
out so the engines' regular expressions use exactly these (their ``\\s`` is ASCII only)."""

QUERY_BLANK_RUNS = (
    "["
    + "".join(f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in QUERY_WHITESPACE)
    + "]+"
)
"""A run of :data:`QUERY_WHITESPACE`, as a regular expression both RE2 (Arrow) and Java (Flink) read."""


def normalize_query(text: str) -> str:
    """The key of the query entity: lower case, single spaces, no surrounding blanks.

    Lower case is Python's (full Unicode case mapping: ``"İ"`` becomes ``"i̇"``, a final
    ``"Σ"`` becomes ``"ς"``); blanks are :data:`QUERY_WHITESPACE`. The stream engine and the
    Flink job produce exactly these keys.
    """
    return " ".join(text.lower().split())
