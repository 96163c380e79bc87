"""A micro-batch's shipped rows as the feature groups read them: each column made contiguous once.

Why: the rows of a batch arrive as one Arrow chunk per repartition record (about 200 per
300k-event backlog cycle), and each group reads a subset of the rows at its positions.
Filtering a table per group copied every column it reads once per group; here a column
is combined (and a string column cast to ``string``) the first time a group asks for it,
and every group reads the same arrays: ``user_id`` is the user group's key and three
other groups' distinct-count values.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import NDArray

from streams.engine.keys import one_string_array
from streams.engine.router import event_type_codes


class ShippedRows:
    """The rows (one table, any chunks) and their :func:`event_type_codes`, with cached columns."""

    def __init__(self, table: pa.Table, type_codes: NDArray[np.int8] | None = None) -> None:
        self.table = table
        self.type_codes = event_type_codes(table.column("type")) if type_codes is None else type_codes
        self._strings: dict[str, pa.Array] = {}
        self._valid: dict[str, NDArray[np.bool_]] = {}
        self._integers: dict[str, NDArray[np.int64]] = {}
        self._amounts: dict[str, NDArray[np.float64]] = {}

    def strings(self, name: str) -> pa.Array:
        """Column ``name`` as one ``string`` array (other types cast)."""
        found = self._strings.get(name)
        if found is None:
            found = self._strings[name] = one_string_array(self.table.column(name))
        return found

    def valid(self, name: str) -> NDArray[np.bool_]:
        """Where column ``name`` is not null."""
        found = self._valid.get(name)
        if found is None:
            column = self.table.column(name)
            found = (
                np.ones(len(column), dtype=bool)
                if column.null_count == 0
                else np.asarray(pc.is_valid(column).to_numpy(zero_copy_only=False), dtype=bool)
            )
            self._valid[name] = found
        return found

    def integers(self, name: str) -> NDArray[np.int64]:
        """Column ``name`` (an integer column without nulls, e.g. event times or group masks) as int64."""
        found = self._integers.get(name)
        if found is None:
            found = self.table.column(name).to_numpy().astype(np.int64, copy=False)
            self._integers[name] = found
        return found

    def amounts(self, name: str) -> NDArray[np.float64]:
        """Column ``name`` as doubles, nulls as 0 (what a sum adds)."""
        found = self._amounts.get(name)
        if found is None:
            # Doubles, as in the Flink job and the reference: an int64 amount past 2**53 rounds
            # to the nearest one instead of failing Arrow's exact-cast check.
            column = self.table.column(name).cast(pa.float64(), safe=False)
            found = np.asarray(pc.fill_null(column, 0.0).to_numpy(), dtype=np.float64)
            self._amounts[name] = found
        return found
