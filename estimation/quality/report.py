"""The result of a quality assessment: confusion matrix, intervals, per-category metrics.

Both assessments (user level and aggregate) produce a :class:`QualityReport` so that the
CLI, the HTTP service and forecasting read one shape. The matrix is **P(true category |
provider label)**, rows = labels, because that is what a buyer of a segment needs ("of
the users labelled 25-34, how many are 25-34?") and what the aggregate data identify.
A row the data cannot identify is ``None`` (JSON ``null``), never a guess.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from estimation.quality.stats import condition_text


@dataclass
class CategoryMetrics:
    """Precision (P(true c | label c)), recall (P(label c | true c)) and support of one category."""

    precision: float | None = None
    precision_ci95: tuple[float, float] | None = None
    recall: float | None = None
    recall_ci95: tuple[float, float] | None = None
    support: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": _num(self.precision),
            "precision_ci95": _pair(self.precision_ci95),
            "recall": _num(self.recall),
            "recall_ci95": _pair(self.recall_ci95),
            "support": _num(self.support),
        }


@dataclass
class QualityReport:
    """A provider attribute's quality: ``matrix[i, j]`` = P(category j | label i); NaN rows: unidentified."""

    kind: str  # "user" | "aggregate"
    labels: list[str]
    categories: list[str]
    matrix: NDArray[np.float64]
    low: NDArray[np.float64]
    high: NDArray[np.float64]
    metrics: dict[str, CategoryMetrics]
    method: str
    weighting: str
    provider: str | None = None
    attribute: str | None = None
    se: NDArray[np.float64] | None = None
    accuracy: float | None = None
    accuracy_ci95: tuple[float, float] | None = None
    support: dict[str, float] = field(default_factory=dict)
    identifiability: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    # -- access ----------------------------------------------------------------------------

    def identified(self, label: str) -> bool:
        return label in self.labels and bool(np.isfinite(self.matrix[self.labels.index(label)]).all())

    def cell(self, label: str, category: str) -> tuple[float, float, float]:
        """``(p, low, high)`` of P(category | label); raises KeyError for unknown names."""
        if label not in self.labels:
            raise KeyError(f"label {label!r} is not in this assessment (labels: {', '.join(self.labels)})")
        if category not in self.categories:
            raise KeyError(
                f"category {category!r} is not in this assessment (categories: {', '.join(self.categories)})"
            )
        i, j = self.labels.index(label), self.categories.index(category)
        return float(self.matrix[i, j]), float(self.low[i, j]), float(self.high[i, j])

    @property
    def key(self) -> tuple[str, str]:
        return (self.provider or "", self.attribute or "")

    # -- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        def rows(values: NDArray[np.float64]) -> dict[str, dict[str, float] | None]:
            return {
                label: (
                    {cat: float(values[i, j]) for j, cat in enumerate(self.categories)}
                    if np.isfinite(self.matrix[i]).all()
                    else None
                )
                for i, label in enumerate(self.labels)
            }

        ci = {
            label: (
                {
                    cat: [float(self.low[i, j]), float(self.high[i, j])]
                    for j, cat in enumerate(self.categories)
                }
                if np.isfinite(self.matrix[i]).all()
                else None
            )
            for i, label in enumerate(self.labels)
        }
        out: dict[str, Any] = {
            "kind": self.kind,
            "provider": self.provider,
            "attribute": self.attribute,
            "labels": self.labels,
            "categories": self.categories,
            "matrix": rows(self.matrix),
            "ci95": ci,
            "metrics": {cat: m.to_json() for cat, m in self.metrics.items()},
            "accuracy": _num(self.accuracy),
            "accuracy_ci95": _pair(self.accuracy_ci95),
            "support": self.support,
            "method": self.method,
            "weighting": self.weighting,
            "notes": self.notes,
        }
        if self.se is not None:
            out["se"] = rows(self.se)
        if self.identifiability is not None:
            out["identifiability"] = self.identifiability
        out.update(self.details)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QualityReport:
        """Rebuild a report from :meth:`to_json` output (e.g. a file saved by ``--out``)."""
        try:
            labels = [str(x) for x in data["labels"]]
            categories = [str(x) for x in data["categories"]]
            shape = (len(labels), len(categories))
            matrix, low, high = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
            for i, label in enumerate(labels):
                row = data["matrix"].get(label)
                ci = data["ci95"].get(label)
                if row is None or ci is None:
                    continue
                for j, cat in enumerate(categories):
                    matrix[i, j] = float(row[cat])
                    low[i, j], high[i, j] = (float(v) for v in ci[cat])
            metrics = {
                cat: CategoryMetrics(
                    precision=m.get("precision"),
                    precision_ci95=_tuple(m.get("precision_ci95")),
                    recall=m.get("recall"),
                    recall_ci95=_tuple(m.get("recall_ci95")),
                    support=m.get("support"),
                )
                for cat, m in data.get("metrics", {}).items()
            }
            return cls(
                kind=str(data["kind"]),
                labels=labels,
                categories=categories,
                matrix=matrix,
                low=low,
                high=high,
                metrics=metrics,
                method=str(data.get("method", "")),
                weighting=str(data.get("weighting", "")),
                provider=data.get("provider"),
                attribute=data.get("attribute"),
                accuracy=data.get("accuracy"),
                accuracy_ci95=_tuple(data.get("accuracy_ci95")),
                support=dict(data.get("support", {})),
                identifiability=data.get("identifiability"),
                notes=list(data.get("notes", [])),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a quality report: {type(exc).__name__}: {exc}") from None

    @classmethod
    def load(cls, path: Path) -> QualityReport:
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"cannot load the quality report {path}: {exc}") from None

    # -- text ------------------------------------------------------------------------------

    def describe(self) -> str:
        """A readable table: the matrix with intervals, then per-category metrics."""
        name = " ".join(x for x in (self.provider, self.attribute) if x) or "provider"
        lines = [f"{name}: P(true category | provider label), {self.kind}-level ground truth"]
        width = max(12, *(len(c) + 2 for c in self.categories))
        label_width = max(8, *(len(x) for x in self.labels))
        lines.append("  " + "label".ljust(label_width) + "".join(c.rjust(width + 8) for c in self.categories))
        for i, label in enumerate(self.labels):
            if not np.isfinite(self.matrix[i]).all():
                lines.append(f"  {label.ljust(label_width)}  not identified by these data")
                continue
            cells = "".join(
                f"{self.matrix[i, j]:.3f} [{self.low[i, j]:.2f},{self.high[i, j]:.2f}]".rjust(width + 8)
                for j in range(len(self.categories))
            )
            lines.append(f"  {label.ljust(label_width)}{cells}")
        lines.append("  per category: precision [95%]  recall [95%]")
        for cat, m in self.metrics.items():
            precision, recall = _fmt(m.precision, m.precision_ci95), _fmt(m.recall, m.recall_ci95)
            lines.append(f"    {cat.ljust(label_width)}  {precision}  {recall}")
        if self.accuracy is not None:
            lines.append(f"  accuracy {_fmt(self.accuracy, self.accuracy_ci95)}")
        lines.append(f"  method: {self.method}")
        lines.append(f"  weighting: {self.weighting}")
        if self.identifiability is not None:
            ident = self.identifiability
            lines.append(
                f"  identifiability: {ident['status']} (campaigns {ident['campaigns']}, labels "
                f"{ident['labels']}, rank {ident['rank']}, condition number "
                f"{condition_text(ident['condition_number'])})"
            )
            lines.extend(f"    - {reason}" for reason in ident.get("reasons", []))
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _num(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _pair(value: tuple[float, float] | None) -> list[float] | None:
    return None if value is None else [float(value[0]), float(value[1])]


def _tuple(value: Any) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def _fmt(value: float | None, ci: tuple[float, float] | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a".ljust(20)
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return f"{value:.3f}{interval}".ljust(20)
