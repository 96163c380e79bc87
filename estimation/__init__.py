"""Reach forecasting: a stratified in-memory sample with fuzzy fall-back, sharded (issue 5).

Python API::

    from estimation import ReachForecaster, build_sample

``build_sample`` writes a sample directory from a population Parquet file;
``ReachForecaster.open(directory, shards=K)`` answers ``estimate(targeting, horizon_days)``
and follows profile changes (``apply_profiles``, ``delete_users``). The HTTP service is
:mod:`estimation.server`; the Kafka follower :mod:`estimation.updates`.
"""

from __future__ import annotations

from estimation.build import BuildReport, build_sample
from estimation.estimator import ReachEstimate
from estimation.forecaster import ProfileChanges, ReachForecaster
from estimation.schema import PopulationError
from estimation.sharding import ShardUnavailableError
from estimation.store import SampleError
from estimation.targeting import TargetingError, parse_targeting

__all__ = [
    "BuildReport",
    "PopulationError",
    "ProfileChanges",
    "ReachEstimate",
    "ReachForecaster",
    "SampleError",
    "ShardUnavailableError",
    "TargetingError",
    "build_sample",
    "parse_targeting",
]
