"""Targeting expressions as DuckDB SQL: the exact reference the estimator is checked against.

Date and timestamp values stay ISO 8601 text: DuckDB casts such a literal to the column's
DATE or TIMESTAMP type when comparing.
"""

from __future__ import annotations

from estimation.targeting import And, Between, Eq, Expr, HasAll, HasAny, In, Not, Or, Scalar


def _literal(value: Scalar) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def _column(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def to_sql(expr: Expr) -> str:
    """A WHERE clause with the estimator's semantics (null matches no leaf; NOT includes nulls)."""
    if isinstance(expr, And):
        return "(" + " AND ".join(to_sql(c) for c in expr.children) + ")" if expr.children else "TRUE"
    if isinstance(expr, Or):
        return "(" + " OR ".join(to_sql(c) for c in expr.children) + ")" if expr.children else "FALSE"
    if isinstance(expr, Not):
        return f"NOT coalesce({to_sql(expr.child)}, FALSE)"
    column = _column(expr.field)
    if isinstance(expr, Eq):
        return f"coalesce({column} = {_literal(expr.value)}, FALSE)"
    if isinstance(expr, In):
        return f"coalesce({column} IN ({', '.join(_literal(v) for v in expr.values)}), FALSE)"
    if isinstance(expr, Between):
        low, high = expr.low, expr.high
        if high is None:
            if low is None:  # (the parser never makes one: any value)
                return f"({column} IS NOT NULL)"
            return f"coalesce({column} >= {_literal(low)}, FALSE)"
        if low is None:
            return f"coalesce({column} <= {_literal(high)}, FALSE)"
        return f"coalesce({column} BETWEEN {_literal(low)} AND {_literal(high)}, FALSE)"
    values = "[" + ", ".join(_literal(v) for v in expr.values) + "]"
    if isinstance(expr, HasAny):
        return f"coalesce(list_has_any({column}, {values}), FALSE)"
    assert isinstance(expr, HasAll)
    return f"coalesce(list_has_all({column}, {values}), FALSE)"
