"""Data-source quality (issue 6): how good is a third-party segment? (Geyik et al. 2017)

Python API::

    from estimation.quality import assess_users, assess_aggregate, true_category_reach

* :func:`assess_users`: provider labels vs panel truth for the same users (confusion
  matrix, precision, recall, accuracy with 95% intervals; post-stratified to a reach
  sample when the panel is not a uniform sample);
* :func:`assess_aggregate`: only per-campaign label mixes and vendor-measured true
  compositions; the matrix P(true | label) is estimated jointly across campaigns by
  constrained multinomial maximum likelihood, with bootstrap intervals and an explicit
  identifiability check;
* :func:`true_category_reach` / :func:`rank_providers`: use an assessment in reach
  forecasts (users truly in a category when targeting a provider's segment).

The CLI is ``adreach quality user|aggregate`` (:mod:`estimation.quality.cli`); the HTTP
endpoints live in :mod:`estimation.server` under ``/v1/quality/``.
"""

from __future__ import annotations

from estimation.quality.aggregate import assess_aggregate, fit_matrix
from estimation.quality.forecast import (
    QualityLookupError,
    QualityRegistry,
    TrueReach,
    rank_providers,
    true_category_reach,
)
from estimation.quality.inputs import QualityInputError
from estimation.quality.report import CategoryMetrics, QualityReport
from estimation.quality.simulated import as_shares, simulate_campaigns
from estimation.quality.user import assess_users, poststratify

__all__ = [
    "CategoryMetrics",
    "QualityInputError",
    "QualityLookupError",
    "QualityRegistry",
    "QualityReport",
    "TrueReach",
    "as_shares",
    "assess_aggregate",
    "assess_users",
    "fit_matrix",
    "poststratify",
    "rank_providers",
    "simulate_campaigns",
    "true_category_reach",
]
