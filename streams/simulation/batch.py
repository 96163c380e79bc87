"""Event batches: one columnar schema for every event type, and their canonical JSON.

Parquet output uses :data:`EVENT_SCHEMA` directly (one wide, sparse table in arrival
order, so a replay reproduces the arrival order, late events included). JSON Lines and
Kafka output go through :meth:`EventBatch.to_json_lines`, which emits each event in the
v1 wire format (``streams.events``) with only its own type's fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

ATTRIBUTES_TYPE = pa.struct(
    [
        ("country", pa.string()),
        ("region", pa.string()),
        ("age", pa.int32()),
        ("age_band", pa.string()),
        ("gender", pa.string()),
        ("device", pa.string()),
        ("os", pa.string()),
        ("language", pa.string()),
    ]
)

EVENT_SCHEMA = pa.schema(
    [
        ("type", pa.string()),
        ("event_id", pa.string()),
        ("event_time", pa.timestamp("ms", "UTC")),
        ("arrival_time", pa.timestamp("ms", "UTC")),  # simulation only: when the event reached the pipeline
        ("user_id", pa.string()),
        ("ad_id", pa.string()),
        ("campaign_id", pa.string()),
        ("advertiser_id", pa.string()),
        ("placement", pa.string()),
        ("position", pa.int32()),
        ("cost_micros", pa.int64()),
        ("device", pa.string()),
        ("country", pa.string()),
        ("impression_id", pa.string()),
        ("click_id", pa.string()),
        ("conversion_type", pa.string()),
        ("value", pa.float64()),
        ("currency", pa.string()),
        ("query", pa.string()),
        ("locale", pa.string()),
        ("action", pa.string()),
        ("attributes", ATTRIBUTES_TYPE),
        ("interests", pa.list_(pa.string())),
        ("provider_labels", pa.list_(pa.string())),  # "provider.attribute.label"
    ]
)

# Fields each type carries on the wire, after type/event_id/event_time/user_id.
WIRE_FIELDS: Mapping[str, tuple[str, ...]] = {
    "impression": (
        "ad_id",
        "campaign_id",
        "advertiser_id",
        "placement",
        "position",
        "cost_micros",
        "device",
        "country",
    ),
    "click": ("impression_id", "ad_id", "campaign_id", "advertiser_id"),
    "conversion": (
        "ad_id",
        "campaign_id",
        "advertiser_id",
        "click_id",
        "conversion_type",
        "value",
        "currency",
    ),
    "search": ("query", "locale", "device"),
    "user_profile": ("action", "attributes", "interests", "provider_labels"),
}

_encoder = msgspec.json.Encoder()


def assemble(columns: Mapping[str, pa.Array | NDArray[Any]], length: int) -> pa.Table:
    """A table in :data:`EVENT_SCHEMA` from the columns one event type has (others null)."""
    arrays = []
    for field in EVENT_SCHEMA:
        if field.name in columns:
            arrays.append(pa.array(columns[field.name], type=field.type))
        else:
            arrays.append(pa.nulls(length, type=field.type))
    return pa.Table.from_arrays(arrays, schema=EVENT_SCHEMA)


@dataclass
class EventBatch:
    """Events in arrival order, in :data:`EVENT_SCHEMA`."""

    table: pa.Table

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def counts(self) -> dict[str, int]:
        counted = pc.value_counts(self.table.column("type"))
        return {str(item["values"]): int(item["counts"]) for item in counted.to_pylist()}

    def to_json_lines(self) -> list[bytes]:
        """Canonical v1 JSON per event (no trailing newline), in the batch's order."""
        table = self.table
        types = table.column("type").to_numpy(zero_copy_only=False)
        times = pc.strftime(table.column("event_time"), format="%Y-%m-%dT%H:%M:%SZ").to_numpy(
            zero_copy_only=False
        )
        out: list[bytes] = [b""] * len(types)
        for type_name, fields in WIRE_FIELDS.items():
            rows = np.nonzero(types == type_name)[0]
            if rows.size == 0:
                continue
            subset = table.take(pa.array(rows))
            event_ids = _python_values(subset.column("event_id"))
            users = _python_values(subset.column("user_id"))
            columns = [_python_values(subset.column(name)) for name in fields]
            for j, row in enumerate(rows):
                event: dict[str, Any] = {
                    "type": type_name,
                    "event_id": event_ids[j],
                    "event_time": times[row],
                    "user_id": users[j],
                }
                for name, column in zip(fields, columns, strict=True):
                    value = column[j]
                    if value is not None:
                        event[name] = value
                if type_name == "user_profile" and "provider_labels" in event:
                    event["provider_labels"] = _nest_labels(event["provider_labels"])
                out[row] = _encoder.encode(event)
        return out


def _python_values(column: pa.ChunkedArray) -> list[Any]:
    """Python values of a column. Flat columns go through NumPy, which pyarrow converts in
    C++ (``to_pylist`` builds one scalar object per value and was 10x slower here)."""
    values: list[Any]
    if pa.types.is_nested(column.type) or (column.null_count and not pa.types.is_string(column.type)):
        values = column.to_pylist()
        return values
    values = column.to_numpy(zero_copy_only=False).tolist()
    return values


def _nest_labels(flat: list[str]) -> dict[str, dict[str, str]]:
    nested: dict[str, dict[str, str]] = {}
    for item in flat:
        provider, attribute, label = item.split(".", 2)
        nested.setdefault(provider, {})[attribute] = label
    return nested
