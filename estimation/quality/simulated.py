"""Simulated campaigns over a labelled population: what a measurement vendor would report.

Used by ``adreach demo``, ``benchmarks/quality.py`` and the tests, so that all three
exercise the same realistic setting: most campaigns target one or two of a provider's
labels (segments), deliver part of their impressions outside them (lookalike expansion,
untargeted inventory), a few are untargeted, and the vendor measures each campaign's
true composition on a panel of only a few hundred of the users it reached.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray


def simulate_campaigns(
    rng: np.random.Generator,
    label: NDArray[np.int64],
    truth: NDArray[np.int64],
    labels: list[str],
    categories: list[str],
    campaigns: int,
    *,
    panel: tuple[int, int] = (200, 500),
    reached: tuple[int, int] = (2_000, 20_000),
    spill: tuple[float, float] = (0.05, 0.3),
    untargeted: float = 0.1,
    prefix: str = "c",
) -> tuple[pa.Table, pa.Table]:
    """``(MIX, TRUTH)`` tables with counts for ``campaigns`` simulated campaigns.

    ``label``: each user's provider label code (-1: not labelled; such users are never
    reached, as campaigns buy the provider's labelled inventory); ``truth``: true category
    codes. MIX counts every reached user; TRUTH counts the panel (``panel`` users, uniform).
    """
    labelled = np.flatnonzero(label >= 0)
    if labelled.size == 0:
        raise ValueError("no labelled users to reach")
    pools = [np.flatnonzero(label == i) for i in range(len(labels))]
    usable = [i for i, pool in enumerate(pools) if pool.size]
    mix_rows: dict[str, list[Any]] = {"campaign_id": [], "label": [], "count": []}
    truth_rows: dict[str, list[Any]] = {"campaign_id": [], "category": [], "count": []}
    width = len(str(campaigns))
    for j in range(campaigns):
        name = f"{prefix}{j:0{width}d}"
        size = int(rng.integers(reached[0], reached[1] + 1))
        if rng.random() < untargeted:
            users = labelled[rng.integers(0, labelled.size, size)]
        else:
            k = 1 if rng.random() < 0.6 or len(usable) < 2 else 2
            chosen = rng.choice(usable, size=k, replace=False)
            pool = np.concatenate([pools[i] for i in chosen])
            outside = int(round(size * rng.uniform(*spill)))
            users = np.concatenate(
                [
                    pool[rng.integers(0, pool.size, size - outside)],
                    labelled[rng.integers(0, labelled.size, outside)],
                ]
            )
        mix = np.bincount(label[users], minlength=len(labels))
        measured = users[
            rng.choice(
                users.size, size=min(int(rng.integers(panel[0], panel[1] + 1)), users.size), replace=False
            )
        ]
        true = np.bincount(truth[measured], minlength=len(categories))
        for i in np.flatnonzero(mix):
            mix_rows["campaign_id"].append(name)
            mix_rows["label"].append(labels[i])
            mix_rows["count"].append(int(mix[i]))
        for c in np.flatnonzero(true):
            truth_rows["campaign_id"].append(name)
            truth_rows["category"].append(categories[c])
            truth_rows["count"].append(int(true[c]))
    return pa.table(mix_rows), pa.table(truth_rows)


def as_shares(table: pa.Table) -> pa.Table:
    """The same table with ``count`` replaced by per-campaign ``share`` (what many vendors send)."""
    ids = np.array(table.column("campaign_id").to_pylist(), dtype=object)
    counts = table.column("count").to_numpy().astype(np.float64)
    _, inverse = np.unique(ids, return_inverse=True)
    totals = np.bincount(inverse, weights=counts)
    return table.drop(["count"]).append_column("share", pa.array(counts / totals[inverse]))
