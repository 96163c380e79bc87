"""Ranking and calibration metrics for click models, in NumPy (no extra dependency).

``auc``: the probability that a random positive is scored above a random negative
(ties count one half). ``normalized_entropy`` (NE, He et al. 2014): the log loss divided
by the log loss of always predicting the evaluation set's base rate; below 1 means the
model knows more than the base rate, and lower is better.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

_EPS = 1e-7


def auc(labels: NDArray[Any], scores: NDArray[Any]) -> float:
    labels = np.asarray(labels, bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(order), np.float64)
    # Average rank within runs of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(order)]
    average = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(average, ends - starts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def auc_standard_error(auc_value: float, positives: int, negatives: int) -> float:
    """The standard error of an AUC measured on ``positives`` and ``negatives`` examples
    (Hanley & McNeil 1982): how far apart two models' AUCs on one evaluation set can be by
    chance alone, so a gap smaller than this says little about which model is better."""
    if positives == 0 or negatives == 0 or not np.isfinite(auc_value):
        return float("nan")
    a = auc_value
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    variance = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (
        positives * negatives
    )
    return float(np.sqrt(max(variance, 0.0)))


def log_loss(labels: NDArray[Any], probabilities: NDArray[Any]) -> float:
    p = np.clip(np.asarray(probabilities, np.float64), _EPS, 1 - _EPS)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def normalized_entropy(labels: NDArray[Any], probabilities: NDArray[Any]) -> float:
    base = float(np.clip(np.mean(labels), _EPS, 1 - _EPS))
    baseline = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    return float(log_loss(labels, probabilities) / baseline)


def summary(labels: NDArray[Any], probabilities: NDArray[Any]) -> dict[str, float]:
    return {
        "auc": auc(labels, probabilities),
        "ne": normalized_entropy(labels, probabilities),
        "log_loss": log_loss(labels, probabilities),
        "examples": float(len(labels)),
        "positives": float(np.sum(labels)),
    }
