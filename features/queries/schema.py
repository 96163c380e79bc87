"""What a generator must produce, as JSON Schemas, and the checks every output passes.

A language model's answer is text. Before it can become a feature row it is parsed as
JSON and validated against the schema the request asked for (the same schema vLLM's
guided decoding enforces, checked again because a truncated or unguided answer can still
break it), and its category must be one of the taxonomy's. Anything else becomes a
:class:`Rejection` with a reason from :data:`REJECTION_REASONS`, counted and reported,
never written.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import jsonschema

from features.queries.taxonomy import Taxonomy

RejectionReason = Literal["invalid_json", "schema_violation", "out_of_taxonomy"]
REJECTION_REASONS: Final[tuple[RejectionReason, ...]] = (
    "invalid_json",
    "schema_violation",
    "out_of_taxonomy",
)
RELEVANCE_LABELS: Final = ("relevant", "irrelevant")
MAX_KEYWORD_CHARS: Final = 80
MAX_REASONING_CHARS: Final = 2_000


@dataclass(frozen=True)
class QueryFeatureRecord:
    """One query's generated features (the embedding travels separately, as a matrix)."""

    query: str
    category: str
    category_score: float
    commercial_intent: float
    keywords: tuple[str, ...]


@dataclass(frozen=True)
class Judgement:
    """A relevance decision for one query–ad pair; ``reasoning`` is empty when none was produced."""

    label: Literal["relevant", "irrelevant"]
    reasoning: str
    probability: float | None = None


@dataclass(frozen=True)
class Rejection:
    """A model output that was not used, and why."""

    key: str
    reason: RejectionReason
    detail: str


@dataclass
class RejectionLog:
    """Counts of rejected outputs by reason, with the first few examples for the report."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[Rejection] = field(default_factory=list)
    keep_examples: int = 20

    def add(self, rejection: Rejection) -> None:
        self.counts[rejection.reason] += 1
        if len(self.examples) < self.keep_examples:
            self.examples.append(rejection)

    def merge(self, other: RejectionLog) -> None:
        self.counts.update(other.counts)
        room = self.keep_examples - len(self.examples)
        self.examples += other.examples[: max(room, 0)]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        if not self.total:
            return "0 rejected"
        parts = ", ".join(f"{reason} {self.counts[reason]:,}" for reason in sorted(self.counts))
        return f"{self.total:,} rejected ({parts})"


def query_features_schema(taxonomy: Taxonomy, max_keywords: int) -> dict[str, Any]:
    """The JSON object the LLM must return for one query."""
    return {
        "type": "object",
        "properties": {
            "category": {"type": "string", "enum": list(taxonomy.ids)},
            "commercial_intent": {"type": "number", "minimum": 0, "maximum": 1},
            "keywords": {
                "type": "array",
                "items": {"type": "string", "minLength": 1, "maxLength": MAX_KEYWORD_CHARS},
                "maxItems": max_keywords,
            },
        },
        "required": ["category", "commercial_intent", "keywords"],
        "additionalProperties": False,
    }


def relevance_schema() -> dict[str, Any]:
    """The JSON object the LLM must return for a query–ad pair: reasoning first, then the label."""
    return {
        "type": "object",
        "properties": {
            "reasoning": {"type": "string", "minLength": 1, "maxLength": MAX_REASONING_CHARS},
            "label": {"type": "string", "enum": list(RELEVANCE_LABELS)},
        },
        "required": ["reasoning", "label"],
        "additionalProperties": False,
    }


def _load(key: str, text: str, schema: dict[str, Any]) -> dict[str, Any] | Rejection:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        return Rejection(key, "invalid_json", f"{exc}: {text[:80]!r}")
    # Check the structure without the category enum first, so a made-up category gets its own reason.
    structure = json.loads(json.dumps(schema))
    category = structure.get("properties", {}).get("category")
    if category is not None:
        category.pop("enum", None)
    try:
        jsonschema.validate(value, structure)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "<root>"
        return Rejection(key, "schema_violation", f"{where}: {exc.message[:120]}")
    assert isinstance(value, dict)  # the schema's root is an object
    return value


def parse_query_output(
    query: str, text: str, taxonomy: Taxonomy, max_keywords: int
) -> QueryFeatureRecord | Rejection:
    """Validate one LLM answer for ``query``; a record, or the reason it was rejected."""
    value = _load(query, text, query_features_schema(taxonomy, max_keywords))
    if isinstance(value, Rejection):
        return value
    category = value["category"]
    if category not in taxonomy:
        return Rejection(
            query, "out_of_taxonomy", f"category {category!r} is not in taxonomy {taxonomy.name}"
        )
    keywords = tuple(dict.fromkeys(" ".join(k.lower().split()) for k in value["keywords"]))
    return QueryFeatureRecord(
        query=query,
        category=category,
        category_score=1.0,
        commercial_intent=float(value["commercial_intent"]),
        keywords=tuple(k for k in keywords if k and k != query),
    )


def parse_relevance_output(key: str, text: str) -> Judgement | Rejection:
    """Validate one LLM answer for a query–ad pair."""
    value = _load(key, text, relevance_schema())
    if isinstance(value, Rejection):
        return value
    return Judgement(label=value["label"], reasoning=value["reasoning"].strip())
