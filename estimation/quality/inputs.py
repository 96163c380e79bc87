"""Reading and checking the tables a quality assessment starts from.

Two shapes of ground truth, two pairs of tables:

* **user level**: LABELS (``user_id``, ``label``) from the provider and TRUTH
  (``user_id``, ``truth``, optional ``weight``) from a panel;
* **aggregate**: MIX (``campaign_id``, ``label``, ``share`` or ``count``): the provider
  labels among the users each campaign reached, and TRUTH (``campaign_id``, ``category``,
  ``share`` or ``count``): the measurement vendor's composition of the same audience.

Everything that can be wrong with such files (an empty file, a missing column, shares
that do not add up, campaigns only one side knows) is a :class:`QualityInputError` whose
message names the file, the column and an example, because these files come from outside
(a vendor, an export) and the user needs to know what to fix, not where the code failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from infra.tables import TableFileError, read_table_file

SHARE_TOLERANCE = 0.01
"""How far a campaign's shares may be from 1 (rounded percentages from a vendor report)."""

MAX_LISTED = 5

AmountKind = Literal["shares", "counts"]


class QualityInputError(ValueError):
    """An input table of a quality assessment is unusable; the message says how to fix it."""


def read_table(path: Path, role: str) -> pa.Table:
    """Read a Parquet, CSV or JSON Lines file (:mod:`infra.tables`), turning "missing", "unreadable"
    and "no rows" into clear errors."""
    if not path.is_file():
        raise QualityInputError(f"{role} file {path} does not exist")
    try:
        table = read_table_file(path)
    except TableFileError as exc:
        raise QualityInputError(f"{role} file: {exc}") from None
    if table.num_rows == 0:
        raise QualityInputError(f"{role} file {path} has no rows")
    return table


def table_from_columns(columns: dict[str, list[Any]], role: str) -> pa.Table:
    """A table from JSON columns (``{"user_id": [...], "label": [...]}``), as the HTTP API sends them."""
    if not isinstance(columns, dict) or not columns:
        raise QualityInputError(
            f"{role} must be an object of equally long columns, e.g. {{'user_id': [...]}}"
        )
    lengths = {name: len(values) if isinstance(values, list) else -1 for name, values in columns.items()}
    if any(n < 0 for n in lengths.values()):
        bad = [name for name, n in lengths.items() if n < 0]
        raise QualityInputError(f"{role}: column(s) {', '.join(bad)} must be JSON lists")
    if len(set(lengths.values())) != 1:
        raise QualityInputError(f"{role}: columns have different lengths: {lengths}")
    try:
        table = pa.table({name: pa.array(values) for name, values in columns.items()})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise QualityInputError(f"{role}: a column mixes value types: {exc}") from None
    except OverflowError:
        raise QualityInputError(f"{role}: a number is too large (integers must fit in 64 bits)") from None
    if table.num_rows == 0:
        raise QualityInputError(f"{role} has no rows")
    return table


def _strings(table: pa.Table, name: str, role: str, *, nulls: bool = False) -> pa.Array:
    if name not in table.column_names:
        raise QualityInputError(f"{role} has no column {name!r} (columns: {', '.join(table.column_names)})")
    column = table.column(name).combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_integer(column.type) or pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.string())
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise QualityInputError(f"{role} column {name!r} must hold strings, not {column.type}")
    if column.null_count and not nulls:
        raise QualityInputError(f"{role} column {name!r} is null in {column.null_count} row(s)")
    return column


def _amounts(table: pa.Table, role: str) -> tuple[NDArray[np.float64], AmountKind]:
    has_share, has_count = "share" in table.column_names, "count" in table.column_names
    if has_share == has_count:
        what = "both" if has_share else "neither"
        raise QualityInputError(
            f"{role} has {what} of the columns 'share' and 'count'; give exactly one "
            "(shares per campaign summing to 1, or counts of users)"
        )
    name: str = "share" if has_share else "count"
    column = table.column(name)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise QualityInputError(f"{role} column {name!r} must be numeric, not {column.type}")
    if column.null_count:
        raise QualityInputError(f"{role} column {name!r} is null in {column.null_count} row(s)")
    values = np.asarray(column.to_numpy(), dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        raise QualityInputError(
            f"{role} column {name!r} must be finite and >= 0; row {int(np.flatnonzero(bad)[0])} "
            f"holds {values[bad][0]}"
        )
    return values, ("shares" if has_share else "counts")


def listed(values: list[str]) -> str:
    """Up to ``MAX_LISTED`` values, quoted, for an error message or a note."""
    shown = ", ".join(repr(v) for v in values[:MAX_LISTED])
    return shown + (f" and {len(values) - MAX_LISTED} more" if len(values) > MAX_LISTED else "")


# -- user level --------------------------------------------------------------------------


@dataclass
class UserData:
    """Panel users with their true category and the provider's label (-1: not labelled)."""

    user_ids: pa.Array
    labels: list[str]
    categories: list[str]
    label: NDArray[np.int64]
    truth: NDArray[np.int64]
    weight: NDArray[np.float64] | None
    labelled_only: int  # users the provider labelled but the panel does not know (ignored)
    notes: list[str] = field(default_factory=list)


def user_inputs(labels: pa.Table, truth: pa.Table) -> UserData:
    """Join provider labels to panel truth by ``user_id``.

    The assessment is over the panel (TRUTH): a panel user without a provider label counts
    as not labelled (a miss for recall), a labelled user outside the panel is ignored.
    """
    label_ids = _strings(labels, "user_id", "LABELS")
    label_values = _strings(labels, "label", "LABELS", nulls=True)
    truth_ids = _strings(truth, "user_id", "TRUTH")
    truth_values = _strings(truth, "truth", "TRUTH")
    for role, ids in (("LABELS", label_ids), ("TRUTH", truth_ids)):
        if pc.count_distinct(ids).as_py() != len(ids):
            counts = pc.value_counts(ids)
            repeated = [str(v["values"]) for v in counts.to_pylist() if v["counts"] > 1]
            raise QualityInputError(
                f"{role} lists a user_id more than once ({listed(repeated)}); one categorical "
                "attribute per file, one row per user"
            )
    weight = None
    if "weight" in truth.column_names:
        w = truth.column("weight")
        if w.null_count or not (pa.types.is_integer(w.type) or pa.types.is_floating(w.type)):
            raise QualityInputError("TRUTH column 'weight' must be numeric with no nulls")
        weight = np.asarray(w.to_numpy(), dtype=np.float64)
        if not np.all(np.isfinite(weight) & (weight >= 0)) or weight.sum() <= 0:
            raise QualityInputError("TRUTH column 'weight' must be finite, >= 0 and not all 0")
    position = pc.index_in(truth_ids, value_set=label_ids)
    found = int(len(position) - position.null_count)
    if found == 0:
        raise QualityInputError(
            "no user_id appears in both LABELS and TRUTH; the assessment needs users the provider "
            "labelled and the panel measured"
        )
    joined = label_values.take(position)  # null: not labelled (or not in LABELS)
    labels_seen = sorted(v for v in pc.unique(joined).to_pylist() if v is not None)
    if not labels_seen:
        raise QualityInputError("the users in both files all have a null label")
    categories = sorted(pc.unique(truth_values).to_pylist())
    if not set(labels_seen) & set(categories):
        # Not one label could ever be right: the two files spell the attribute differently
        # (booleans read as 'true'/'false' against 'True'/'False' or 1/0 labels, say).
        raise QualityInputError(
            f"the provider's labels ({listed(labels_seen)}) and the panel's truth values "
            f"({listed(categories)}) have no value in common; both files must spell the "
            "attribute's values the same way"
        )
    label = pc.fill_null(pc.index_in(joined, value_set=pa.array(labels_seen)), -1).to_numpy()
    true = pc.index_in(truth_values, value_set=pa.array(categories)).to_numpy()
    return UserData(
        user_ids=truth_ids,
        labels=labels_seen,
        categories=categories,
        label=np.asarray(label, dtype=np.int64),
        truth=np.asarray(true, dtype=np.int64),
        weight=weight,
        labelled_only=len(label_ids) - found,
    )


# -- aggregate ---------------------------------------------------------------------------


@dataclass
class AggregateData:
    """Per campaign: the label mix (shares) and the true composition (counts or shares)."""

    campaigns: list[str]
    labels: list[str]
    categories: list[str]
    mix: NDArray[np.float64]  # (campaigns, labels), rows sum to 1
    truth: NDArray[np.float64]  # (campaigns, categories), rows sum to 1
    panel: NDArray[np.float64] | None  # measured users per campaign (counts given), else None
    mix_kind: AmountKind
    truth_kind: AmountKind


def _wide(
    table: pa.Table, key: str, role: str, tolerance: float
) -> tuple[list[str], list[str], NDArray[np.float64], NDArray[np.float64], AmountKind]:
    campaigns = _strings(table, "campaign_id", role)
    keys = _strings(table, key, role)
    amounts, kind = _amounts(table, role)
    campaign_names = sorted(set(campaigns.to_pylist()))
    key_names = sorted(set(keys.to_pylist()))
    row = np.searchsorted(
        np.array(campaign_names, dtype=object), np.array(campaigns.to_pylist(), dtype=object)
    )
    col = np.searchsorted(np.array(key_names, dtype=object), np.array(keys.to_pylist(), dtype=object))
    flat = row * len(key_names) + col
    if len(np.unique(flat)) != len(flat):
        _, first, counts = np.unique(flat, return_index=True, return_counts=True)
        i = int(first[np.argmax(counts > 1)])
        raise QualityInputError(
            f"{role} has more than one row for campaign {campaign_names[row[i]]!r} and {key} "
            f"{key_names[col[i]]!r}"
        )
    wide = np.zeros((len(campaign_names), len(key_names)))
    wide[row, col] = amounts
    totals = wide.sum(axis=1)
    if kind == "shares":
        off = np.abs(totals - 1.0) > tolerance
        if off.any():
            bad = [f"{campaign_names[i]!r} ({totals[i]:.4g})" for i in np.flatnonzero(off)]
            hint = (
                " (they look like percentages: divide by 100)"
                if np.all(np.abs(totals[off] - 100) <= 100 * tolerance)
                else " (if these are numbers of users, name the column 'count')"
            )
            raise QualityInputError(
                f"{role} shares must sum to 1 per campaign (within {tolerance}); they do not for "
                f"{len(bad)} campaign(s): {listed(bad)}{hint}"
            )
    elif (totals <= 0).any():
        bad = [campaign_names[i] for i in np.flatnonzero(totals <= 0)]
        raise QualityInputError(f"{role} counts are all 0 for campaign(s) {listed(bad)}")
    return campaign_names, key_names, wide, totals, kind


def aggregate_inputs(mix: pa.Table, truth: pa.Table, *, tolerance: float = SHARE_TOLERANCE) -> AggregateData:
    """Check MIX and TRUTH and align them on the campaigns both describe (which must be all)."""
    mix_campaigns, labels, mix_wide, _, mix_kind = _wide(mix, "label", "MIX", tolerance)
    truth_campaigns, categories, truth_wide, truth_totals, truth_kind = _wide(
        truth, "category", "TRUTH", tolerance
    )
    unknown = sorted(set(truth_campaigns) - set(mix_campaigns))
    if unknown:
        raise QualityInputError(
            f"TRUTH has {len(unknown)} campaign(s) that MIX does not know: {listed(unknown)}; "
            "every measured campaign needs its label mix"
        )
    unmeasured = sorted(set(mix_campaigns) - set(truth_campaigns))
    if unmeasured:
        raise QualityInputError(
            f"MIX has {len(unmeasured)} campaign(s) with no TRUTH: {listed(unmeasured)}; "
            "drop them or add the vendor's measurement"
        )
    mix_share = mix_wide / mix_wide.sum(axis=1, keepdims=True)
    truth_share = truth_wide / truth_totals[:, None]
    return AggregateData(
        campaigns=mix_campaigns,
        labels=labels,
        categories=categories,
        mix=mix_share,
        truth=truth_share,
        panel=truth_totals if truth_kind == "counts" else None,
        mix_kind=mix_kind,
        truth_kind=truth_kind,
    )
