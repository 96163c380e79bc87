"""The on-disk form of a reach sample (what ``adreach reach build`` writes) and loading it.

A sample directory holds:

* ``manifest.json``: format version, build settings, the field schema, the strata
  (attributes, levels, merge map), why those attributes were chosen, the activity model;
* ``strata.parquet``: per stratum its key, sampling rate and exact population total;
* ``sample.parquet``: the sampled users (their hash, stratum, activity posterior and
  every targetable column, in canonical types);
* ``directory.parquet``: every user's hash, stratum (-1: deleted) and last update time,
  which keeps totals exact when users change or leave (:mod:`estimation.shard`).

User ids themselves are not stored: every lookup goes through the salted hash.
Loading a shard reads only the rows whose hash maps to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from estimation.activity import ActivityModel
from estimation.hashing import shard_of
from estimation.rows import rows_from_table, vocabs_for
from estimation.schema import Schema
from estimation.shard import Directory, Shard
from estimation.strata import StrataTable

FORMAT = "adreach-reach-sample/1"
MANIFEST = "manifest.json"


class SampleError(ValueError):
    """A sample directory is missing, incomplete or of another format version."""


@dataclass
class SampleMeta:
    """Everything but the users: what the aggregator needs to stratify and decide."""

    directory: Path
    manifest: dict[str, Any]
    schema: Schema
    strata: StrataTable
    population: NDArray[np.int64]
    activity: ActivityModel
    seed: int

    @property
    def settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = self.manifest["settings"]
        return settings


def write_sample(
    out: Path,
    manifest: dict[str, Any],
    strata: StrataTable,
    population: NDArray[np.int64],
    sample: pa.Table,
    directory: pa.Table,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sampled = np.bincount(sample.column("_stratum").to_numpy(), minlength=len(strata.keys))
    pq.write_table(
        pa.table(
            {
                "key": pa.array(strata.keys, pa.int64()),
                "rate": pa.array(strata.rates, pa.float64()),
                "population": pa.array(population, pa.int64()),
                "sampled": pa.array(sampled, pa.int64()),
            }
        ),
        out / "strata.parquet",
    )
    pq.write_table(sample, out / "sample.parquet", row_group_size=256_000)
    pq.write_table(directory, out / "directory.parquet", row_group_size=1_000_000)
    (out / MANIFEST).write_text(json.dumps({"format": FORMAT, **manifest}, indent=2, default=str) + "\n")


def load_meta(directory: Path) -> SampleMeta:
    path = directory / MANIFEST
    if not path.is_file():
        raise SampleError(
            f"{directory} is not a reach sample (no {MANIFEST}); build one with `adreach reach build`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SampleError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise SampleError(
            f"{directory} holds format {manifest.get('format')!r}, this adreach reads {FORMAT!r}; rebuild it"
        )
    for name in ("strata.parquet", "sample.parquet", "directory.parquet"):
        if not (directory / name).is_file():
            raise SampleError(f"{directory} is incomplete: {name} is missing; rebuild it")
    strata_table = pq.read_table(directory / "strata.parquet")
    strata = StrataTable.from_json(
        manifest["strata"],
        strata_table.column("key").to_numpy(),
        strata_table.column("rate").to_numpy(),
    )
    return SampleMeta(
        directory=directory,
        manifest=manifest,
        schema=Schema.from_json(manifest["schema"]),
        strata=strata,
        population=strata_table.column("population").to_numpy().astype(np.int64),
        activity=ActivityModel.from_json(manifest["activity"]),
        seed=int(manifest["settings"]["seed"]),
    )


def load_shard(meta: SampleMeta, index: int, count: int, *, compact_fraction: float = 0.05) -> Shard:
    """Shard ``index`` of ``count``: its users' directory entries, totals and sampled rows."""
    directory = pq.read_table(meta.directory / "directory.parquet")
    hashes = directory.column("user_hash").to_numpy()
    strata = directory.column("stratum").to_numpy().astype(np.int64)
    updated = directory.column("updated_ms").to_numpy()
    mine = shard_of(hashes, count) == index
    hashes, strata, updated = hashes[mine], strata[mine], updated[mine]
    alive = strata >= 0
    population = np.bincount(strata[alive], minlength=len(meta.strata.keys)).astype(np.int64)
    sample = pq.read_table(meta.directory / "sample.parquet")
    sample_hashes = sample.column("_user_hash").to_numpy()
    keep = np.flatnonzero(shard_of(sample_hashes, count) == index)
    sample = sample.take(pa.array(keep))
    vocabs = vocabs_for(meta.schema)
    rows = rows_from_table(
        sample,
        meta.schema,
        vocabs,
        hashes=sample_hashes[keep],
        strata=sample.column("_stratum").to_numpy().astype(np.int64),
        updated_ms=np.zeros(len(keep), dtype=np.int64),
        act_shape=sample.column("_act_shape").to_numpy(),
        act_rate=sample.column("_act_rate").to_numpy(),
    )
    return Shard(
        meta.schema,
        vocabs,
        population,
        Directory.build(hashes, strata, updated),
        rows,
        prior=(meta.activity.prior_shape, meta.activity.prior_rate),
        compact_fraction=compact_fraction,
    )
