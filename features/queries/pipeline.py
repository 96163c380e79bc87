"""Search events in, query features out: normalize, de-duplicate, look up, generate, store.

For each chunk of search events :class:`QueryFeaturePipeline`:

1. takes the distinct raw query strings (Arrow ``group_by``, with each one's earliest
   event time) and normalizes them with :func:`features.definitions.normalize_query`, the
   key of the ``query`` entity;
2. drops queries this run has already written;
3. looks the rest up in the persistent cache (:mod:`features.queries.cache`) and
   generates only the misses, ``queries.batch_size`` at a time; accepted answers go into
   the cache at once, rejected ones are counted by reason and not written;
4. writes every new query's row to Feast's ``query_features`` view: the online store
   through :class:`features.online.OnlineFeatureWriter` and the offline store as a Parquet
   part file, like the stream engine's sink. The row's event time is the query's first
   search seen, so point-in-time joins find it for that search and every later one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from features.definitions import QUERY_FEATURES, normalize_query
from features.feast_objects import TIMESTAMP_FIELD, append_offline, arrow_schema
from features.online import OnlineFeatureWriter
from features.queries.backend import QueryBatch, QueryFeatureBackend, open_backend
from features.queries.cache import QueryCache
from features.queries.schema import RejectionLog
from infra.settings import Settings


@dataclass
class QueryRunStats:
    """What one run did; ``describe()`` is the summary line the CLI prints."""

    events: int = 0
    searches: int = 0
    distinct_queries: int = 0
    cache_hits: int = 0
    generated: int = 0
    rows_written: int = 0
    generation_s: float = 0.0
    invalid_searches: int = 0  # search events left out by the engine's rules (bad JSON, time, blank query)
    rejections: RejectionLog = field(default_factory=RejectionLog)
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def describe(self) -> str:
        rate = self.generated / self.generation_s if self.generation_s > 0 else 0.0
        return (
            f"{self.events:,} events, {self.searches:,} searches"
            + (f" ({self.invalid_searches:,} invalid, left out)" if self.invalid_searches else "")
            + f", {self.distinct_queries:,} distinct "
            f"queries: {self.cache_hits:,} from the cache, {self.generated:,} generated "
            f"({rate:,.0f} queries/s), {self.rejections.describe()}; "
            f"{self.rows_written:,} feature rows written in {self.seconds:.1f} s"
        )


class QueryFeaturePipeline:
    """Turns chunks of ``(query, event_time)`` search rows into stored query features."""

    def __init__(
        self,
        settings: Settings,
        backend: QueryFeatureBackend | None = None,
        *,
        write_features: bool = True,
        on_batch: Callable[[QueryRunStats], None] | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend or open_backend(settings.queries)
        self.cache = QueryCache(settings.query_cache_path, _embedding_dim(self.backend))
        self.stats = QueryRunStats()
        self.on_batch = on_batch
        self._seen: set[str] = set()
        self._writer: OnlineFeatureWriter | None = None
        self._data_dir = settings.feature_repo_dir / "data"
        if write_features:
            from features.store import open_store

            open_store(settings)  # registers query_features (idempotent) and creates its tables
            self._writer = OnlineFeatureWriter(settings, (QUERY_FEATURES,))

    def process(self, searches: pa.Table, events: int | None = None) -> int:
        """Handle one chunk of search rows; return how many feature rows were written."""
        self.stats.events += searches.num_rows if events is None else events
        self.stats.searches += searches.num_rows
        if searches.num_rows == 0:
            return 0
        first_seen = searches.group_by("query").aggregate([("event_time", "min")])
        earliest: dict[str, int] = {}
        raw = first_seen.column("query").to_pylist()
        times = first_seen.column("event_time_min").cast(pa.int64()).fill_null(time.time_ns() // 1000)
        for text, micros in zip(raw, times.to_pylist(), strict=True):
            key = normalize_query(text)
            if key and key not in self._seen and micros < earliest.get(key, 1 << 62):
                earliest[key] = micros
        new = list(earliest)
        if not new:
            return 0
        self.stats.distinct_queries += len(new)
        batch = self.features_for(new)
        written = self._write(batch, earliest)
        self._seen.update(new)
        if self.on_batch is not None:
            self.on_batch(self.stats)
        return written

    def features_for(self, queries: Sequence[str]) -> QueryBatch:
        """Cached rows for ``queries`` plus freshly generated ones for the rest (never twice)."""
        generator = self.backend.generator
        cached = self.cache.get(generator, queries)
        self.stats.cache_hits += len(cached.records)
        have = {r.query for r in cached.records}
        missing = [q for q in queries if q not in have]
        parts = [cached]
        step = self.settings.queries.batch_size
        for start in range(0, len(missing), step):
            began = time.perf_counter()
            generated = self.backend.generate(missing[start : start + step])
            self.stats.generation_s += time.perf_counter() - began
            self.stats.generated += len(generated.records)
            self.stats.rejections.merge(generated.rejections)
            self.cache.put(generator, generated)
            parts.append(generated)
        records = [r for part in parts for r in part.records]
        return QueryBatch(records, np.concatenate([part.embeddings for part in parts]).astype(np.float32))

    def _write(self, batch: QueryBatch, earliest: dict[str, int]) -> int:
        if self._writer is None or not batch.records:
            return 0
        columns = batch.columns()
        stamps = [earliest[r.query] for r in batch.records]
        columns[TIMESTAMP_FIELD] = pa.array(stamps, pa.int64()).cast(pa.timestamp("us", "UTC"))
        columns["generator"] = pa.array([self.backend.generator] * len(batch.records), pa.string())
        schema = arrow_schema(QUERY_FEATURES)
        rows = pa.table({name: columns[name] for name in schema.names}).cast(schema)
        self._writer.write(QUERY_FEATURES, rows)
        append_offline(self._data_dir, QUERY_FEATURES, rows)
        self.stats.rows_written += rows.num_rows
        return int(rows.num_rows)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.cache.close()
        self.backend.close()


def _embedding_dim(backend: QueryFeatureBackend) -> int:
    encoder = getattr(backend, "encoder", None)
    return int(getattr(encoder, "dim", 384))
