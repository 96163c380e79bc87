"""Quality in reach forecasts: users *truly* in a category, and ranking providers for one.

Targeting a provider's segment ("acme says 25-34") reaches the users the provider
labelled so, of whom only a fraction ``P(true 25-34 | label 25-34)`` truly are. Given an
assessment of that provider (:class:`QualityReport`), the truly-in-category reach of a
targeting expression ``E`` that selects labels ``l_1..l_k`` of the provider is

    Y = sum_l R_l * P(category | l),    R_l = reach(E AND label l)

where each ``R_l`` comes from the reach sample with its own interval. The interval of
``Y`` combines both sources of error: the sampling error of each ``R_l`` and the
assessment's interval of each ``P(category | l)``, added in quadrature on each side (the
two are independent: different data). So the answer is wider than the plain segment
reach by exactly what the provider assessment is unsure of.

Assessments are kept in a :class:`QualityRegistry` keyed by (provider, attribute), loaded
from JSON files written by ``adreach quality ... --out`` or posted to the service.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from estimation.estimator import Z95, ReachEstimate
from estimation.forecaster import ReachForecaster
from estimation.quality.report import QualityReport
from estimation.targeting import EVERYONE, And, Between, Eq, Expr, HasAll, HasAny, In, Not, Or


class QualityLookupError(ValueError):
    """A forecast asked for an assessment, label or category that is not available."""


class QualityRegistry:
    """Assessments by (provider, attribute); thread-safe, the service adds to it at run time."""

    def __init__(self, reports: Iterable[QualityReport] = ()) -> None:
        self._reports: dict[tuple[str, str], QualityReport] = {}
        self._lock = threading.Lock()
        for report in reports:
            self.add(report)

    @classmethod
    def load(cls, paths: Iterable[Path]) -> QualityRegistry:
        return cls(QualityReport.load(path) for path in paths)

    def add(self, report: QualityReport) -> None:
        if not report.provider or not report.attribute:
            raise QualityLookupError("an assessment needs a provider and an attribute name to be stored")
        with self._lock:
            self._reports[report.key] = report

    def get(self, provider: str, attribute: str) -> QualityReport:
        with self._lock:
            report = self._reports.get((provider, attribute))
            known = sorted(f"{p}.{a}" for p, a in self._reports)
        if report is None:
            raise QualityLookupError(
                f"no quality assessment for provider {provider!r} attribute {attribute!r} "
                f"(known: {', '.join(known) or 'none'}); run `adreach quality ... --out` and serve it with "
                "`reach serve --quality FILE`, or POST one with save=true"
            )
        return report

    def for_attribute(self, attribute: str) -> list[QualityReport]:
        with self._lock:
            return [r for (_, a), r in sorted(self._reports.items()) if a == attribute]

    def summary(self) -> list[dict[str, Any]]:
        with self._lock:
            reports = sorted(self._reports.values(), key=lambda r: r.key)
        return [
            {
                "provider": r.provider,
                "attribute": r.attribute,
                "kind": r.kind,
                "labels": r.labels,
                "categories": r.categories,
                "identified_labels": [x for x in r.labels if r.identified(x)],
                "accuracy": r.accuracy,
            }
            for r in reports
        ]


@dataclass
class TrueReach:
    """Users truly in ``category`` among those a segment targeting reaches."""

    provider: str
    attribute: str
    category: str
    reach: float
    ci95: tuple[float, float]
    segment_reach: float
    segment_ci95: tuple[float, float]
    by_label: list[dict[str, Any]] = field(default_factory=list)
    assessment: str = ""

    @property
    def precision(self) -> float:
        return self.reach / self.segment_reach if self.segment_reach > 0 else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "attribute": self.attribute,
            "category": self.category,
            "reach": self.reach,
            "ci95": list(self.ci95),
            "segment_reach": self.segment_reach,
            "segment_ci95": list(self.segment_ci95),
            "precision": None if math.isnan(self.precision) else self.precision,
            "by_label": self.by_label,
            "assessment": self.assessment,
        }


def _parsed(forecaster: ReachForecaster, targeting: object) -> Expr:
    if isinstance(targeting, And | Or | Not | Eq | In | Between | HasAny | HasAll):
        return targeting
    return forecaster.parse(targeting)


def segment_labels(expr: Expr, segment_field: str, provider: str, attribute: str) -> list[str]:
    """The provider labels a targeting expression is restricted to (top-level segment leaf).

    The expression must *be* a ``has_any`` on the segment field listing only this provider
    attribute's labels, or be an ``and`` with such a child; only then is every reached user
    known to carry one of those labels, which is what the matrix is about.
    """
    prefix = f"{provider}.{attribute}."
    children = expr.children if isinstance(expr, And) else (expr,)
    for child in children:
        if isinstance(child, HasAny | HasAll) and child.field == segment_field:
            values = [str(v) for v in child.values]
            if values and all(v.startswith(prefix) for v in values):
                labels = sorted({v[len(prefix) :] for v in values})
                if isinstance(child, HasAll) and len(labels) > 1:
                    raise QualityLookupError(
                        f"has_all over several {provider} {attribute} labels matches nobody "
                        "(a user has one label per attribute)"
                    )
                return labels
    raise QualityLookupError(
        f"true_category needs the targeting to select {provider}'s {attribute} segment: a "
        f'{{"field": "{segment_field}", "has_any": ["{prefix}LABEL", ...]}} leaf, alone or inside the '
        "top-level and"
    )


def _combine(
    parts: list[tuple[float, float, float, float, float, float]],
) -> tuple[float, float, float]:
    """``sum r*p`` over ``(r, r_lo, r_hi, p, p_lo, p_hi)`` with both errors added in quadrature."""
    value = sum(r * p for r, _, _, p, _, _ in parts)
    down = math.sqrt(sum((p * (r - r_lo)) ** 2 + (r * (p - p_lo)) ** 2 for r, r_lo, _, p, p_lo, _ in parts))
    up = math.sqrt(sum((p * (r_hi - r)) ** 2 + (r * (p_hi - p)) ** 2 for r, _, r_hi, p, _, p_hi in parts))
    ceiling = sum(r_hi for _, _, r_hi, _, _, _ in parts)
    return value, max(value - down, 0.0), max(min(value + up, ceiling), value)


def true_category_reach(
    forecaster: ReachForecaster,
    targeting: object,
    report: QualityReport,
    category: str,
    *,
    horizon_days: float | None = None,
    allow_partial: bool | None = None,
) -> tuple[ReachEstimate, TrueReach]:
    """The reach answer for ``targeting`` turned into users truly in ``category``.

    Returns the adjusted :class:`ReachEstimate` (``reach``/``ci95`` now count users truly in
    the category; audience and impressions likewise with a horizon) and the
    :class:`TrueReach` breakdown.
    """
    provider, attribute = report.key
    expr = _parsed(forecaster, targeting)
    segment_field = forecaster.settings.provider_labels_field
    labels = segment_labels(expr, segment_field, provider, attribute)
    if category not in report.categories:
        raise QualityLookupError(
            f"category {category!r} is not in the {provider} {attribute} assessment "
            f"(categories: {', '.join(report.categories)})"
        )
    total = forecaster.estimate(expr, horizon_days, allow_partial=allow_partial)
    reach_parts, impression_parts, by_label = [], [], []
    audience = 0.0  # with a horizon: the users truly in the category, active or not
    for label in labels:
        if label not in report.labels or not report.identified(label):
            why = "not in" if label not in report.labels else "not identified by"
            raise QualityLookupError(f"label {label!r} is {why} the {provider} {attribute} assessment")
        p, p_lo, p_hi = report.cell(label, category)
        part = forecaster.estimate(
            And((expr, HasAny(segment_field, (f"{provider}.{attribute}.{label}",)))),
            horizon_days,
            allow_partial=allow_partial,
        )
        reach_parts.append((part.reach, part.ci95[0], part.ci95[1], p, p_lo, p_hi))
        if part.impressions is not None and part.impressions_ci95 is not None:
            lo, hi = part.impressions_ci95
            impression_parts.append((part.impressions, lo, hi, p, p_lo, p_hi))
        audience += (part.audience or 0.0) * p
        by_label.append(
            {
                "label": label,
                "segment_reach": part.reach,
                "segment_ci95": list(part.ci95),
                "p": p,
                "p_ci95": [p_lo, p_hi],
            }
        )
    value, low, high = _combine(reach_parts)
    answer = ReachEstimate(**{**total.__dict__})
    answer.reach, answer.ci95 = value, (low, high)
    answer.std_error = (high - low) / (2 * Z95)
    answer.method = f"{total.method}+quality"
    if impression_parts and answer.impressions is not None:
        imp, imp_lo, imp_hi = _combine(impression_parts)
        answer.impressions, answer.impressions_ci95 = imp, (imp_lo, imp_hi)
    if answer.audience is not None:
        answer.audience = audience
    answer.warnings = [
        *total.warnings,
        f"reach counts users truly {attribute} = {category!r} by the {provider} {report.kind}-level "
        "assessment "
        f"(segment reach {total.reach:,.0f}); the interval includes the assessment's uncertainty",
    ]
    true = TrueReach(
        provider=provider,
        attribute=attribute,
        category=category,
        reach=value,
        ci95=(low, high),
        segment_reach=total.reach,
        segment_ci95=total.ci95,
        by_label=by_label,
        assessment=report.method,
    )
    return answer, true


def rank_providers(
    registry: QualityRegistry,
    attribute: str,
    category: str,
    *,
    forecaster: ReachForecaster | None = None,
    targeting: object | None = None,
    sort_by: Literal["precision", "true_reach"] = "precision",
) -> list[dict[str, Any]]:
    """Each assessed provider's segment for ``category``: precision, and with a forecaster its reach.

    The segment is the provider's label with the category's name. Providers whose row is
    not identified are listed last with ``precision: null``; ``sort_by="true_reach"`` puts
    the most users truly in the category first (needs a forecaster).
    """
    reports = registry.for_attribute(attribute)
    if not reports:
        raise QualityLookupError(f"no quality assessment for attribute {attribute!r}")
    base: Expr = EVERYONE if targeting is None or forecaster is None else _parsed(forecaster, targeting)
    rows: list[dict[str, Any]] = []
    for report in reports:
        provider = report.provider or ""
        row: dict[str, Any] = {"provider": provider, "label": category, "kind": report.kind}
        if (
            category not in report.labels
            or category not in report.categories
            or not report.identified(category)
        ):
            row.update(precision=None, note=f"no identified {category!r} row in this assessment")
            rows.append(row)
            continue
        p, lo, hi = report.cell(category, category)
        row.update(precision=p, precision_ci95=[lo, hi])
        if forecaster is not None:
            segment = HasAny(
                forecaster.settings.provider_labels_field, (f"{provider}.{attribute}.{category}",)
            )
            expr = And((*base.children, segment)) if isinstance(base, And) else And((base, segment))
            answer, true = true_category_reach(forecaster, expr, report, category)
            row.update(
                segment_reach=true.segment_reach,
                segment_ci95=list(true.segment_ci95),
                true_reach=true.reach,
                true_reach_ci95=list(true.ci95),
            )
        rows.append(row)
    key = "true_reach" if sort_by == "true_reach" and forecaster is not None else "precision"
    rows.sort(key=lambda r: (r.get(key) is None, -(r.get(key) or 0.0)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows
