"""Date and timestamp fields: how their values are written in targeting and held in a sample.

A sample holds a date as days since 1970-01-01 and a timestamp as microseconds since
1970-01-01T00:00:00Z, in the float64 columns all numeric fields share (exact: 2^53
microseconds is 285 years either side of 1970), so ranges, strata and counts work on
them as on integers. People write them as ISO 8601 text: dates as ``"2024-01-31"``,
timestamps as ISO 8601 instants (``"2024-01-31T12:00:00Z"``, any UTC offset; a bare date
means its midnight). Timestamps without a time zone, in a population or a query, are UTC.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from estimation.quoting import quoted

_EPOCH_DAY = date(1970, 1, 1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROS = {"s": 1_000_000, "ms": 1_000, "us": 1}


class TemporalValueError(ValueError):
    """A text is not a date (or timestamp) as the field's kind needs; the message shows the form."""


def is_temporal(data_type: pa.DataType) -> bool:
    return bool(pa.types.is_date(data_type) or pa.types.is_timestamp(data_type))


def epoch_days(text: str) -> int:
    """``"2024-01-31"`` -> days since 1970-01-01."""
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise TemporalValueError(f'{quoted(text, 40)} is not a date; write dates as "YYYY-MM-DD"') from None
    return (day - _EPOCH_DAY).days


def epoch_micros(text: str) -> int:
    """An ISO 8601 instant -> microseconds since the epoch (no zone: UTC; a bare date: its midnight)."""
    try:
        instant = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise TemporalValueError(
            f"{quoted(text, 40)} is not a timestamp; "
            'write "YYYY-MM-DDTHH:MM:SSZ" (any UTC offset) or "YYYY-MM-DD"'
        ) from None
    if instant.tzinfo is None:  # as population timestamps without a zone are read
        instant = instant.replace(tzinfo=UTC)
    delta = instant - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def canonical(text: str, date_field: bool) -> str:
    """The one spelling of a date (``"2024-01-31"``) or an instant (``"2024-01-31T11:00:00Z"``, UTC)."""
    return iso_text(as_number(text, date_field), date_field)


def as_number(value: str | float, date_field: bool) -> float:
    """A date or timestamp as a sample holds it; numbers are taken as already in those units."""
    if isinstance(value, str):
        return float(epoch_days(value) if date_field else epoch_micros(value))
    return float(value)


def iso_text(number: float, date_field: bool) -> str:
    """Epoch days (a date field) or microseconds (a timestamp field) as ISO 8601 text."""
    return iso_date(number) if date_field else iso_timestamp(number)


def iso_date(days: float) -> str:
    return (_EPOCH_DAY + timedelta(days=int(days))).isoformat()


def iso_timestamp(micros: float) -> str:
    """Microseconds since the epoch -> ``"2024-01-31T12:00:00Z"`` (fraction digits only when needed)."""
    text = (_EPOCH + timedelta(microseconds=int(micros))).isoformat()
    return text.replace("+00:00", "Z")


def temporal_numbers(array: pa.Array) -> pa.Array:
    """A date or timestamp column as int64 days or microseconds since the epoch (nulls kept).

    Timestamps finer than a microsecond are truncated to it (pandas writes nanoseconds).
    """
    if pa.types.is_date64(array.type):
        array = array.cast(pa.date32())
    if pa.types.is_date32(array.type):
        return array.cast(pa.int32()).cast(pa.int64())
    unit = array.type.unit
    raw = array.view(pa.int64())  # (timestamps are stored as UTC, whatever their zone)
    if unit == "ns":
        micros = np.floor_divide(raw.fill_null(0).to_numpy(), 1000)
        return pa.array(micros, pa.int64(), mask=raw.is_null().to_numpy(zero_copy_only=False))
    return pc.multiply_checked(raw, pa.scalar(_MICROS[unit], pa.int64()))  # (overflow: ArrowInvalid)


def outside_iso_years(numbers: pa.Array, date_field: bool) -> str | None:
    """Why a column of epoch days or microseconds cannot be written as ISO 8601 text (years
    1 - 9999), or ``None`` when every value can."""
    bounds = pc.min_max(numbers)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    if low is None:
        return None
    try:
        iso_text(low, date_field), iso_text(high, date_field)
    except (OverflowError, ValueError):
        return "values outside the years 1 - 9999 that ISO 8601 text can write"
    return None
