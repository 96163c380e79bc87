"""Third-party data providers that label users' gender and age band, imperfectly.

Each provider covers a fraction of users and, for each attribute, draws its label from
a known confusion matrix P(label | true category). Age confusions concentrate on
neighbouring bands, as with real age-inference models. The matrices are ground truth
for the data-source quality work, which must recover P(true | label) from data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streams.simulation.population import AGE_BANDS, GENDERS, Population

GENDER_LABELS = np.array(["female", "male"])


@dataclass(frozen=True)
class ProviderAttribute:
    provider: str
    attribute: str
    categories: NDArray[Any]  # true categories (rows)
    labels: NDArray[Any]  # provider labels (columns)
    confusion: NDArray[Any]  # P(label | true), rows sum to 1
    coverage: float


def provider_attributes(rng: np.random.Generator, providers: tuple[str, ...]) -> list[ProviderAttribute]:
    """Per provider: a coverage and a quality level, turned into confusion matrices."""
    out = []
    for index, name in enumerate(providers):
        quality = [0.85, 0.7, 0.55][index % 3] + rng.uniform(-0.03, 0.03)
        coverage = [0.7, 0.5, 0.9][index % 3]
        gender = np.array([[quality + 0.08, 0.0], [0.0, quality + 0.05], [0.5, 0.5]])
        gender[0, 1] = 1 - gender[0, 0]
        gender[1, 0] = 1 - gender[1, 1]
        bands = len(AGE_BANDS)
        age = np.zeros((bands, bands))
        for i in range(bands):
            age[i, i] = quality
            neighbours = [j for j in (i - 1, i + 1) if 0 <= j < bands]
            for j in neighbours:
                age[i, j] = (1 - quality) * 0.7 / len(neighbours)
            others = [j for j in range(bands) if j != i and j not in neighbours]
            for j in others:
                age[i, j] = (1 - quality) * 0.3 / len(others)
        out.append(ProviderAttribute(name, "gender", GENDERS, GENDER_LABELS, gender, coverage))
        out.append(ProviderAttribute(name, "age_band", AGE_BANDS, AGE_BANDS, age, coverage))
    return out


def draw_labels(rng: np.random.Generator, population: Population, spec: ProviderAttribute) -> NDArray[Any]:
    """Label codes per user (-1 = not covered), drawn row-wise from the confusion matrix."""
    true = population.gender if spec.attribute == "gender" else population.age_band
    cumulative = np.cumsum(spec.confusion, axis=1)[true]
    labels = (rng.random(len(true))[:, None] > cumulative).sum(axis=1)
    labels = np.minimum(labels, len(spec.labels) - 1)
    covered = rng.random(len(true)) < spec.coverage
    return np.where(covered, labels, -1)


def true_given_label(
    population: Population, spec: ProviderAttribute, labels: NDArray[Any]
) -> dict[str, dict[str, float]]:
    """P(true category | label) as measured on the population (what quality work estimates)."""
    true = population.gender if spec.attribute == "gender" else population.age_band
    covered = labels >= 0
    counts = np.zeros((len(spec.labels), len(spec.categories)))
    np.add.at(counts, (labels[covered], true[covered]), 1)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    return {
        str(label): {str(cat): float(shares[i, j]) for j, cat in enumerate(spec.categories)}
        for i, label in enumerate(spec.labels)
    }
