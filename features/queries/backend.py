"""The one interface both query-feature backends implement, and the batch they return."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from features.queries.schema import Judgement, QueryFeatureRecord, Rejection, RejectionLog
from features.queries.taxonomy import Taxonomy
from infra.settings import QueryFeatureSettings

F32Array = npt.NDArray[np.float32]


@dataclass
class QueryBatch:
    """Accepted records (with their embeddings, row-aligned) and what was rejected."""

    records: list[QueryFeatureRecord]
    embeddings: F32Array
    rejections: RejectionLog = field(default_factory=RejectionLog)

    def __post_init__(self) -> None:
        if len(self.records) != len(self.embeddings):
            raise ValueError(f"{len(self.records)} records but {len(self.embeddings)} embeddings")

    def columns(self) -> dict[str, pa.Array]:
        """The records as Arrow columns (no key normalisation: records hold normalized queries)."""
        dim = self.embeddings.shape[1] if self.embeddings.ndim == 2 else 0
        flat = pa.array(np.ascontiguousarray(self.embeddings, np.float32).ravel(), pa.float32())
        offsets = pa.array(np.arange(len(self.records) + 1, dtype=np.int32) * dim, pa.int32())
        return {
            "query": pa.array([r.query for r in self.records], pa.string()),
            "embedding": pa.ListArray.from_arrays(offsets, flat),
            "category": pa.array([r.category for r in self.records], pa.string()),
            "category_score": pa.array([r.category_score for r in self.records], pa.float64()),
            "commercial_intent": pa.array([r.commercial_intent for r in self.records], pa.float64()),
            "keywords": pa.array([list(r.keywords) for r in self.records], pa.list_(pa.string())),
        }


class QueryFeatureBackend(Protocol):
    """Turns normalized queries into features, and judges query–ad relevance.

    ``generator`` names backend, model and taxonomy; it is part of the cache key, so a
    different model or taxonomy regenerates instead of reusing stale answers.
    """

    name: str
    generator: str
    taxonomy: Taxonomy
    emits_reasoning: bool

    def generate(self, queries: Sequence[str]) -> QueryBatch: ...

    def judge(
        self, pairs: Sequence[tuple[str, str]], samples: int = 1
    ) -> list[list[Judgement | Rejection]]: ...

    def close(self) -> None: ...


def taxonomy_fingerprint(taxonomy: Taxonomy) -> str:
    """A short hash of the taxonomy's content: changes whenever a category or description does."""
    payload = json.dumps([[c.id, c.description, list(c.keywords)] for c in taxonomy.categories])
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def open_backend(settings: QueryFeatureSettings) -> QueryFeatureBackend:
    """The backend ``queries.backend`` names (vLLM is imported only when chosen)."""
    if settings.backend == "vllm":
        from features.queries.vllm_backend import VLLMBackend

        return VLLMBackend(settings)
    from features.queries.cpu import CPUBackend

    return CPUBackend(settings)
