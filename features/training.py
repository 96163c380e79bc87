"""Point-in-time training sets through Feast's SDK, with every example kept and exact values.

Two faults of Feast 0.67's file offline store are worked around here:

* it drops an example (entity row) when all of its entity's feature rows lie after the
  example's time, instead of returning it with nulls; on streaming features, where an
  entity's history starts with its first event, that silently removes a large share of a
  training set (a third of the examples in our 120k-row test). The dropped examples are
  put back with null features, in the caller's row order;
* among rows with the same entity and event timestamp it picks at random, not the latest
  created (see :mod:`features.offline`); the views read are compacted first, so there is
  one row per entity and timestamp;
* it answers each (join keys, time) pair once and drops the other examples with it, even
  when their other columns differ (two impressions of one user in one millisecond, or one
  instant written in two zones): Feast is asked each distinct pair once, in UTC, and every
  example gets its pair's answer.

``FeatureStore.get_historical_features`` itself is called unchanged. One fault of its
engine is worked around too: Feast's file store runs on dask, which names every
intermediate result by a content hash of its pandas frames (pickled, two or three times
for object columns); that was 95% of a training set's read time. While Feast runs,
pandas objects are named by identity instead (:func:`_object_pandas_tokens`).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

_ROW = "__adreach_example_row"
_TIME = "__adreach_example_time"
EXAMPLES_PER_READ = 25_000
"""Examples per ``get_historical_features`` call. Feast's file store pairs every example with
every feature row of its entity before filtering by time (10.8 GB at 100,000 examples of the
LoopFM benchmark's world); reads of this size keep that to a few GB, at the same speed."""


class TrainingSetError(ValueError):
    """The entity frame cannot be used as a training set's examples; the message says why."""


def historical_features(
    store: Any, entity_df: pd.DataFrame, features: Sequence[str], *, timestamp_column: str = "event_timestamp"
) -> pd.DataFrame:
    """``store.get_historical_features(entity_df, features).to_df()`` with one row per example, in order.

    ``features`` are ``"view:feature"`` references, as for Feast. Examples Feast dropped
    come back with nulls (no feature value existed at or before their time): NaN in number
    columns, None in list and text columns, as Feast gives for an unknown entity.
    """
    if timestamp_column not in entity_df.columns:
        raise TrainingSetError(f"the entity frame has no {timestamp_column!r} column (the examples' times)")
    for reserved in (_ROW, _TIME):
        if reserved in entity_df.columns:
            raise TrainingSetError(f"the entity frame must not have a column named {reserved!r}")
    views = sorted({reference.split(":", 1)[0] for reference in features})
    _compact_views(store, views)
    keys = _join_keys(store, views)
    absent = [key for key in keys if key not in entity_df.columns]
    if absent:
        raise TrainingSetError(
            f"the entity frame has no {', '.join(map(repr, absent))} column(s) (join keys of {views})"
        )
    examples = entity_df.reset_index(drop=True).copy()
    try:
        examples[_TIME] = pd.to_datetime(examples[timestamp_column], utc=True)
    except (ValueError, TypeError) as exc:
        raise TrainingSetError(f"{timestamp_column!r} holds values that are not times ({exc})") from exc
    # Feast answers each (join keys, time) once and drops repeats, even with other columns
    # differing (two impressions of one ad in one millisecond): ask once, give every example.
    requests = examples[[*keys, _TIME]].drop_duplicates(ignore_index=True)
    requests[_ROW] = range(len(requests))
    asked = requests.rename(columns={_TIME: timestamp_column})
    parts = []
    for start in range(0, max(len(asked), 1), EXAMPLES_PER_READ):  # (no examples: one call all the same)
        chunk = asked.iloc[start : start + EXAMPLES_PER_READ]
        with _object_pandas_tokens():
            result = store.get_historical_features(entity_df=chunk, features=list(features)).to_df()
        parts.append(result[[_ROW, *(c for c in result.columns if c not in asked.columns)]])
    answered = requests.merge(pd.concat(parts, ignore_index=True), on=_ROW, how="left", validate="one_to_one")
    answered = answered.drop(columns=[_ROW]).drop(
        columns=[c for c in answered.columns if c in entity_df.columns and c not in keys]
    )
    merged = examples.merge(answered, on=[*keys, _TIME], how="left", validate="many_to_one")
    # The merge fills the examples Feast dropped with NaN, where Feast's own missing lists
    # (and strings) are None: one missing value, None, in every object column.
    for column in answered.columns:
        if column not in keys and column != _TIME and merged[column].dtype == object:
            merged[column] = merged[column].where(merged[column].notna(), None)
    return merged.drop(columns=[_TIME])


def _join_keys(store: Any, views: list[str]) -> list[str]:
    """The entity columns the features of ``views`` are looked up by, in a stable order."""
    keys: dict[str, None] = {}
    for view in views:
        keys.update(dict.fromkeys(store.get_feature_view(view).join_keys))
    return list(keys)


def _compact_views(store: Any, views: list[str]) -> None:
    """Compact the offline files of the adreach views among ``views`` (other views are left alone)."""
    from features.definitions import BATCH_TABLES, FEATURE_GROUPS
    from features.embeddings import FM_EMBEDDINGS
    from features.offline import compact_offline

    # (Batch tables too: with several part files, dask's join failed on an example whose
    # query had no row yet.)
    groups = {group.name: group for group in (*FEATURE_GROUPS, *BATCH_TABLES, FM_EMBEDDINGS)}
    for view in views:
        if view not in groups:
            continue
        source_path = Path(store.get_feature_view(view).batch_source.path)
        if source_path.name == view and source_path.is_dir():
            compact_offline(source_path.parent, groups[view])


class _IdentityTokens:
    """Dask's pandas normalizers swapped for naming by identity while any read needs it (see below).

    Reads may run in several threads (a server building training sets, say): the swap is
    made by the first one in and undone by the last one out, under a lock, so no read can
    restore the normalizers under another's feet or leave the identity ones installed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: dict[type, Any] = {}
        self._named: dict[int, tuple[Any, str]] = {}

    def _by_identity(self, value: Any) -> tuple[str, str]:
        # setdefault: two threads naming one object at once agree on its name. Named objects
        # are held, so an id in the table is never another object's.
        held = self._named.get(id(value)) or self._named.setdefault(id(value), (value, uuid.uuid4().hex))
        return ("adreach-pandas-object", held[1])

    @contextmanager
    def active(self) -> Iterator[None]:
        from dask import base

        normalize_token: Any = base.normalize_token  # (dask's dispatch is untyped)
        kinds = (pd.DataFrame, pd.Series, pd.Index)
        with self._lock:
            if self._users == 0:
                self._saved = {kind: normalize_token.dispatch(kind) for kind in kinds}
                for kind in kinds:
                    normalize_token.register(kind, self._by_identity)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    for kind, normalizer in self._saved.items():
                        normalize_token.register(kind, normalizer)
                    self._named.clear()


_IDENTITY_TOKENS = _IdentityTokens()


def _object_pandas_tokens() -> AbstractContextManager[None]:
    """Inside the block, dask names each pandas frame and series by its identity, not its content.

    Dask names a result by a hash of its inputs; for pandas objects it pickles and hashes
    their whole content, and Feast's point-in-time join hashes its merged frame (every
    example paired with every feature row of its entity: 2 million rows for 20,000
    examples here) at each of its steps: about 70% of a read's time. A name per object is
    as good for one computation: the same object keeps its name (objects named while any
    block is open are held until the last one ends, so no other object can take their
    ``id``); equal content in two objects just gets two names, which costs dask a
    deduplication it never needed here. Dask's registry is global: while a block is open
    in one thread, dask work in other threads names pandas objects by identity too
    (correct, as above), and the previous normalizers are put back when the last block
    ends.
    """
    return _IDENTITY_TOKENS.active()
