"""The persistent query-feature cache: a query is generated once per generator, ever.

A SQLite file (default ``<state_dir>/queries/cache.sqlite``) keyed by (normalized query,
generator), where the generator names backend, model, precision and taxonomy. SQLite
because it is in the standard library, safe for several processes, and a lookup of a few
thousand keys is one indexed query. Embeddings are stored as raw little-endian float32.
Only accepted outputs are cached; a rejected query is generated again next time.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from features.queries.backend import QueryBatch
from features.queries.schema import QueryFeatureRecord

_CHUNK = 900  # bound parameters per statement (SQLite's historic limit is 999)


class QueryCacheError(RuntimeError):
    """The cache file cannot be opened or written (permissions, disk, not a SQLite file)."""


class QueryCache:
    def __init__(self, path: Path, dim: int) -> None:
        self.path = path
        self.dim = dim
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS query_features ("
                "query TEXT NOT NULL, generator TEXT NOT NULL, category TEXT NOT NULL, "
                "category_score REAL NOT NULL, commercial_intent REAL NOT NULL, keywords TEXT NOT NULL, "
                "embedding BLOB NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (generator, query))"
            )
        except (OSError, sqlite3.Error) as exc:
            raise QueryCacheError(
                f"query cache {path}: {exc}; set queries.cache_path to a writable file"
            ) from exc

    def get(self, generator: str, queries: Sequence[str]) -> QueryBatch:
        """The cached rows among ``queries`` (in no particular order)."""
        records: list[QueryFeatureRecord] = []
        blobs: list[bytes] = []
        distinct = list(dict.fromkeys(queries))
        try:
            for start in range(0, len(distinct), _CHUNK):
                chunk = distinct[start : start + _CHUNK]
                rows = self._db.execute(
                    "SELECT query, category, category_score, commercial_intent, keywords, embedding "
                    f"FROM query_features WHERE generator = ? AND query IN ({','.join('?' * len(chunk))})",
                    [generator, *chunk],
                ).fetchall()
                for query, category, score, intent, keywords, embedding in rows:
                    records.append(
                        QueryFeatureRecord(query, category, score, intent, tuple(json.loads(keywords)))
                    )
                    blobs.append(embedding)
        except sqlite3.Error as exc:
            raise QueryCacheError(f"query cache {self.path}: reading failed ({exc})") from exc
        matrix = np.frombuffer(b"".join(blobs), "<f4").reshape(len(blobs), self.dim).astype(np.float32)
        return QueryBatch(records, matrix)

    def put(self, generator: str, batch: QueryBatch) -> int:
        """Store accepted rows (an existing row for the same key is kept: it was generated first)."""
        now = time.time()
        embeddings = np.ascontiguousarray(batch.embeddings, "<f4")
        rows = [
            (
                r.query,
                generator,
                r.category,
                r.category_score,
                r.commercial_intent,
                json.dumps(r.keywords),
                embeddings[i].tobytes(),
                now,
            )
            for i, r in enumerate(batch.records)
        ]
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR IGNORE INTO query_features VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise QueryCacheError(f"query cache {self.path}: writing failed ({exc})") from exc
        return len(rows)

    def count(self, generator: str | None = None) -> int:
        if generator is None:
            row = self._db.execute("SELECT count(*) FROM query_features").fetchone()
        else:
            row = self._db.execute(
                "SELECT count(*) FROM query_features WHERE generator = ?", [generator]
            ).fetchone()
        return int(row[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> QueryCache:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
