"""Event times as epoch milliseconds: the one reading of RFC 3339 texts and Arrow timestamps.

Why one place: the producer SDK takes any RFC 3339 instant (msgspec's parser): any number
of fraction digits (Python's ``datetime.isoformat()`` and the SDK's own encoder write
microseconds), a lowercase ``t``/``z``, a space for the ``T``, any UTC offset. The
embedded engine, the Flink job, the training readers and the reach builder must all read
those alike, and Arrow's cast to ``timestamp[ms]`` refuses anything finer than a
millisecond ("would lose data"), as it does for ``timestamp[us]``/``[ns]`` columns
(pandas writes nanoseconds). Every reader here truncates to the millisecond (features
use minute tiles; a millisecond orders events finely enough). The SDK's own reading,
used only for Kafka record timestamps, first rounds nanoseconds to microseconds, so for
texts with more than six fraction digits it can be 1 ms later.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:?[0-9]{2})$"
)
"""RFC 3339 ``date-time`` (seconds and a zone required): what the SDK accepts as an event time
(its parser also takes an offset without the colon, ``+0100``).

Written for both RE2 (Arrow) and Java (Flink) regular expressions."""

_FINER_THAN_MS = r"(\.[0-9]{3})[0-9]+"


class EventTimeError(ValueError):
    """A time column cannot be read as instants; the message names the reason."""


def malformed_times(texts: pa.Array | pa.ChunkedArray) -> NDArray[np.bool_]:
    """Per text, whether it is present but not written as an RFC 3339 instant (nulls: False).

    Arrow's own parser also takes looser forms ("2026-01-05T10Z", "+0200", a bare date);
    the SDK does not, so neither may the engines. (A missing time is another rule's business.)
    """
    matched = pc.match_substring_regex(texts, RFC3339_PATTERN)
    return np.asarray(pc.fill_null(pc.invert(matched), False).to_numpy(zero_copy_only=False), dtype=bool)


def epoch_ms(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Milliseconds since 1970 (int64, nulls kept) of RFC 3339 texts or of an Arrow timestamp column.

    Timestamps of any unit are truncated to the millisecond; a timestamp without a time
    zone is read as UTC (Arrow stores UTC instants either way). Texts are parsed as
    instants in any UTC offset; check their form with :func:`malformed_times` first where
    looser forms must be refused. Raises :class:`EventTimeError` for texts that are not
    instants (e.g. a 30th of February, no zone) and for other column types.
    """
    kind = values.type
    if pa.types.is_timestamp(kind):
        return values.cast(pa.timestamp("ms", kind.tz), safe=False).cast(pa.int64())
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise EventTimeError(f"times must be RFC 3339 texts or timestamps, not {kind}")
    utc_ms = pa.timestamp("ms", "UTC")
    try:
        return pc.cast(values, utc_ms).cast(pa.int64())
    except pa.ArrowInvalid:
        pass  # finer than a millisecond, or a lowercase t/z: normalized below (rare, so not first)
    normalized = pc.replace_substring_regex(pc.utf8_upper(values), _FINER_THAN_MS, r"\1")
    try:
        return pc.cast(normalized, utc_ms).cast(pa.int64())
    except pa.ArrowInvalid as exc:
        raise EventTimeError(str(exc)) from exc


def rfc3339_epoch_ms(texts: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """:func:`epoch_ms` of texts that must all be RFC 3339 instants, as the SDK writes them (nulls kept).

    Raises :class:`EventTimeError` when one is not: in a looser form Arrow would read
    (see :func:`malformed_times`) or not an instant at all.
    """
    if malformed_times(texts).any():
        raise EventTimeError("not in the form 2026-01-05T10:00:00.250Z (a zone is required)")
    return epoch_ms(texts)
