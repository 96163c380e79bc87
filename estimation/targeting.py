"""The targeting language: JSON expression trees, parsed and type-checked against a schema.

Canonical (JSON) form, the API's input::

    {"and": [E, ...]}   {"or": [E, ...]}   {"not": E}
    {"field": F, "eq": v}          {"field": F, "in": [v, ...]}
    {"field": F, "between": [lo, hi]}          (inclusive: numeric, date and timestamp fields;
                                               null for an open end: [65, null] is >= 65)
    {"field": F, "has_any": [v, ...]}   {"field": F, "has_all": [v, ...]}   (list fields)

Date and timestamp values are ISO 8601 text (``"2024-01-31"``, ``"2024-01-31T12:00:00Z"``;
see :mod:`estimation.temporal`), kept in the parsed tree in one canonical spelling.
``{"and": []}`` is everyone and ``{"or": []}`` nobody. A missing (null) value matches no
``eq``/``in``/``between``/``has_*``; ``not`` inverts a match (so it includes nulls).

Everything a planner can get wrong is caught here, before any data is touched, with an
error that names the place (``$.and[1].field``) and the problem: unknown fields (with a
"did you mean"), an operator that does not suit the field's kind, values of the wrong
type, malformed nodes and trees too deep or too large. :func:`to_text` renders an
expression for people (``country = "US" AND age BETWEEN 25 AND 34``).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from typing import Any, TypeAlias

from estimation import temporal
from estimation.quoting import SHOWN_CHARS, quoted
from estimation.schema import FieldKind, FieldSpec, Schema

Scalar: TypeAlias = str | int | float | bool

MAX_DEPTH = 32
MAX_NODES = 2_000
MAX_VALUES = 10_000
# Unknown values named one by one per leaf (the rest are counted), and how much of each.
MAX_VALUE_WARNINGS = 20
LOGICAL = ("and", "or", "not")
LEAF_OPERATORS = ("eq", "in", "between", "has_any", "has_all")


class TargetingError(ValueError):
    """A targeting expression is invalid. ``path`` locates the problem (JSONPath-like)."""

    def __init__(self, message: str, path: str = "$") -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


class MalformedTargetingError(TargetingError):
    """The tree's shape is wrong: not an object, no/several operators, extra keys, too deep."""


class UnknownFieldError(TargetingError):
    """A leaf names a field the sample does not have."""


class TargetingTypeError(TargetingError):
    """An operator does not suit the field's kind, or a value has the wrong type."""


@dataclass(frozen=True, slots=True)
class And:
    children: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Or:
    children: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Not:
    child: Expr


@dataclass(frozen=True, slots=True)
class Eq:
    field: str
    value: Scalar


@dataclass(frozen=True, slots=True)
class In:
    field: str
    values: tuple[Scalar, ...]


@dataclass(frozen=True, slots=True)
class Between:
    """Inclusive bounds: numbers, or ISO 8601 text for date and timestamp fields; ``None``
    leaves that end open (at least one end is given)."""

    field: str
    low: float | str | None
    high: float | str | None


@dataclass(frozen=True, slots=True)
class HasAny:
    field: str
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HasAll:
    field: str
    values: tuple[str, ...]


Expr: TypeAlias = And | Or | Not | Eq | In | Between | HasAny | HasAll
Leaf: TypeAlias = Eq | In | Between | HasAny | HasAll
EVERYONE = And(())


def parse_targeting(data: object, schema: Schema | None = None) -> Expr:
    """Parse a JSON-decoded targeting tree; type-check it against ``schema`` when given.

    Raises a :class:`TargetingError` subclass naming the offending node.
    """
    return _Parser(schema).parse(data, "$", 0)


def parse_targeting_json(text: str | bytes, schema: Schema | None = None) -> Expr:
    """Like :func:`parse_targeting` for a JSON document."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedTargetingError(f"not a JSON document: {exc}") from None
    return parse_targeting(data, schema)


class _Parser:
    def __init__(self, schema: Schema | None) -> None:
        self.schema = schema
        self.nodes = 0

    def parse(self, data: object, path: str, depth: int) -> Expr:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise MalformedTargetingError(f"the expression has more than {MAX_NODES} nodes", path)
        if depth > MAX_DEPTH:
            raise MalformedTargetingError(f"the expression is nested deeper than {MAX_DEPTH} levels", path)
        if not isinstance(data, dict):
            raise MalformedTargetingError(
                f'expected an object such as {{"field": ..., "eq": ...}} or {{"and": [...]}}, '
                f"got {_describe(data)}",
                path,
            )
        keys = set(data)
        logical = keys & set(LOGICAL)
        if logical:
            if len(keys) != 1:
                raise MalformedTargetingError(
                    f"a logical node has exactly one key ({'/'.join(LOGICAL)}); got {_keys(data)}", path
                )
            (op,) = logical
            return self._logical(op, data[op], f"{path}.{op}", depth)
        if "field" not in keys:
            raise MalformedTargetingError(
                f'expected one of {", ".join(LOGICAL)} or a leaf with "field"; got {_keys(data)}', path
            )
        operators = keys & set(LEAF_OPERATORS)
        extra = keys - {"field"} - set(LEAF_OPERATORS)
        if extra:
            raise MalformedTargetingError(
                f"unexpected key(s) {_keys_list(extra)} in a leaf; a leaf is "
                f'{{"field": F, OP: value}} with OP one of {", ".join(LEAF_OPERATORS)}',
                path,
            )
        if len(operators) != 1:
            raise MalformedTargetingError(
                f"a leaf needs exactly one operator ({', '.join(LEAF_OPERATORS)}); got "
                f"{_keys_list(operators) if operators else 'none'}",
                path,
            )
        (op,) = operators
        return self._leaf(data["field"], op, data[op], path)

    def _logical(self, op: str, operand: object, path: str, depth: int) -> Expr:
        if op == "not":
            return Not(self.parse(operand, path, depth + 1))
        if not isinstance(operand, list):
            raise MalformedTargetingError(
                f'"{op}" takes a list of expressions, got {_describe(operand)}', path
            )
        children = tuple(self.parse(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(operand))
        return And(children) if op == "and" else Or(children)

    def _leaf(self, name: object, op: str, operand: object, path: str) -> Leaf:
        if not isinstance(name, str) or not name:
            raise MalformedTargetingError(
                f'"field" must be a non-empty string, got {_describe(name)}', f"{path}.field"
            )
        kind = self._kind(name, op, f"{path}.field")
        where = f"{path}.{op}"
        if op == "eq":
            return Eq(name, self._scalar(operand, name, kind, where))
        if op == "between":
            return self._between(name, kind, operand, where)
        values = self._values(operand, op, where)
        if op == "in":
            return In(
                name, _unique(self._scalar(v, name, kind, f"{where}[{i}]") for i, v in enumerate(values))
            )
        strings = _unique(self._scalar(v, name, kind, f"{where}[{i}]") for i, v in enumerate(values))
        texts = tuple(str(v) for v in strings)
        return HasAny(name, texts) if op == "has_any" else HasAll(name, texts)

    def _kind(self, name: str, op: str, path: str) -> FieldKind | None:
        if self.schema is None:
            return None
        if name not in self.schema:
            known = self.schema.names()
            close = difflib.get_close_matches(name, known, n=1) if len(name) <= SHOWN_CHARS else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            skipped = self.schema.skipped.get(name)
            if skipped is not None:  # in the population, but not a targetable column
                raise UnknownFieldError(f"field {name!r} cannot be targeted: {skipped}", path)
            raise UnknownFieldError(f"unknown field {quoted(name)}{hint}; fields: {', '.join(known)}", path)
        spec = self.schema[name]
        if op not in spec.operators:
            suggestion = {
                FieldKind.LIST: "use has_any or has_all",
                FieldKind.CATEGORICAL: "use eq or in",
                FieldKind.BOOLEAN: "use eq",
            }.get(spec.kind, "use eq, in or between")
            raise TargetingTypeError(
                f"operator {op!r} does not apply to {spec.kind.value} field {name!r}; {suggestion}", path
            )
        return spec.kind

    def _values(self, operand: object, op: str, path: str) -> list[object]:
        if not isinstance(operand, list):
            raise TargetingTypeError(f'"{op}" takes a list of values, got {_describe(operand)}', path)
        if not operand:
            raise TargetingTypeError(f'"{op}" needs at least one value', path)
        if len(operand) > MAX_VALUES:
            raise TargetingTypeError(f'"{op}" takes at most {MAX_VALUES} values, got {len(operand)}', path)
        return operand

    def _scalar(self, value: object, name: str, kind: FieldKind | None, path: str) -> Scalar:
        if kind is None:  # no schema: accept any JSON scalar
            if isinstance(value, bool):
                return bool(value)
            if isinstance(value, str):
                return str(value)
            if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
                return value
            raise TargetingTypeError(f"expected a string, number or boolean, got {_describe(value)}", path)
        if kind in (FieldKind.CATEGORICAL, FieldKind.LIST):
            if isinstance(value, str):
                return str(value)  # plain str: values are looked up by exact type
            raise TargetingTypeError(
                f"{name!r} is {_article(kind.value)} field; values are strings, got {_describe(value)}", path
            )
        if kind is FieldKind.BOOLEAN:
            if isinstance(value, bool):
                return bool(value)
            raise TargetingTypeError(
                f"{name!r} is a boolean field; use true or false, got {_describe(value)}", path
            )
        if kind.temporal:
            return _temporal(value, name, kind, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TargetingTypeError(
                f"{name!r} is {_article(kind.value)} field; expected a number, got {_describe(value)}", path
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise TargetingTypeError(f"{name!r}: values must be finite numbers", path)
        if kind is FieldKind.INTEGER:
            if isinstance(value, float):
                if not value.is_integer():
                    raise TargetingTypeError(
                        f"{name!r} is an integer field; {value!r} is not a whole number "
                        "(use between for ranges)",
                        path,
                    )
                return int(value)
            return int(value)
        return float(value)

    def _between(self, name: str, kind: FieldKind | None, operand: object, path: str) -> Between:
        if not isinstance(operand, list) or len(operand) != 2:
            raise TargetingTypeError(f'"between" takes [low, high], got {_describe(operand)}', path)
        if operand[0] is None and operand[1] is None:
            raise TargetingTypeError(
                '"between" needs at least one bound (null leaves one end open), got [null, null]', path
            )
        if kind is not None and kind.temporal:
            first, last = (
                None if bound is None else _temporal(bound, name, kind, f"{path}[{i}]")
                for i, bound in enumerate(operand)
            )
            between = Between(name, first, last)
            earliest, latest = numeric_bounds(between, kind)
            if earliest > latest:
                raise TargetingTypeError(f"{name!r}: low bound {first!r} is after high bound {last!r}", path)
            return between
        bounds: list[float | None] = []
        for i, bound in enumerate(operand):
            if bound is None:
                bounds.append(None)
                continue
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                raise TargetingTypeError(
                    f"{name!r}: bounds must be finite numbers (or null: an open end), got {_describe(bound)}",
                    f"{path}[{i}]",
                )
            bounds.append(float(bound))
        low, high = bounds
        if low is not None and high is not None and low > high:
            raise TargetingTypeError(
                f"{name!r}: low bound {operand[0]!r} is above high bound {operand[1]!r}", path
            )
        return Between(name, low, high)


def _temporal(value: object, name: str, kind: FieldKind, path: str) -> str:
    """A date or timestamp value in its canonical ISO 8601 spelling."""
    if not isinstance(value, str):
        example = '"2024-01-31"' if kind is FieldKind.DATE else '"2024-01-31T12:00:00Z" or "2024-01-31"'
        raise TargetingTypeError(
            f"{name!r} is a {kind.value} field; values are ISO 8601 text such as {example}, "
            f"got {_describe(value)}",
            path,
        )
    try:
        return temporal.canonical(value, kind is FieldKind.DATE)
    except temporal.TemporalValueError as exc:
        raise TargetingTypeError(f"{name!r}: {exc}", path) from None


def numeric_bounds(node: Between, kind: FieldKind) -> tuple[float, float]:
    """A between's bounds as a sample holds them (dates and timestamps as epoch numbers; an
    open end as an infinity)."""
    date_field = kind is FieldKind.DATE

    def number(bound: float | str | None, open_end: float) -> float:
        if bound is None:
            return open_end
        return temporal.as_number(bound, date_field) if kind.temporal else float(bound)

    return number(node.low, -math.inf), number(node.high, math.inf)


def numeric_values(node: Eq | In, kind: FieldKind) -> tuple[Scalar, ...]:
    """An eq's or in's values, dates and timestamps as the numbers a sample holds (others as they are)."""
    values = (node.value,) if isinstance(node, Eq) else node.values
    if not kind.temporal:
        return values
    date_field = kind is FieldKind.DATE
    return tuple(temporal.as_number(v, date_field) for v in values if not isinstance(v, bool))


def _unique(values: Any) -> tuple[Any, ...]:
    seen: dict[tuple[type, Any], Any] = {}
    for value in values:
        seen.setdefault((type(value), value), value)
    return tuple(seen.values())


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {quoted(value, 40)}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"an object with keys {_keys(value)}"
    return type(value).__name__


def _keys(data: dict[Any, Any]) -> str:
    return _keys_list(set(data)) if data else "none"


def _keys_list(keys: set[Any]) -> str:
    return ", ".join(repr(k) for k in sorted(map(str, keys)))


# -- rendering ------------------------------------------------------------------------------


def to_json(expr: Expr) -> dict[str, Any]:
    """The canonical JSON form (parses back to an equal expression)."""
    if isinstance(expr, And):
        return {"and": [to_json(c) for c in expr.children]}
    if isinstance(expr, Or):
        return {"or": [to_json(c) for c in expr.children]}
    if isinstance(expr, Not):
        return {"not": to_json(expr.child)}
    if isinstance(expr, Eq):
        return {"field": expr.field, "eq": expr.value}
    if isinstance(expr, In):
        return {"field": expr.field, "in": list(expr.values)}
    if isinstance(expr, Between):
        return {"field": expr.field, "between": [_bound(expr.low), _bound(expr.high)]}
    if isinstance(expr, HasAny):
        return {"field": expr.field, "has_any": list(expr.values)}
    return {"field": expr.field, "has_all": list(expr.values)}


def to_text(expr: Expr) -> str:
    """A readable rendering, e.g. ``country = "US" AND NOT (device = "tablet")``."""
    if isinstance(expr, (And, Or)):
        if not expr.children:
            return "everyone" if isinstance(expr, And) else "nobody"
        joiner = " AND " if isinstance(expr, And) else " OR "
        parts = [
            f"({to_text(c)})" if isinstance(c, (And, Or)) and len(c.children) > 1 else to_text(c)
            for c in expr.children
        ]
        return joiner.join(parts)
    if isinstance(expr, Not):
        return f"NOT ({to_text(expr.child)})"
    if isinstance(expr, Eq):
        return f"{expr.field} = {_literal(expr.value)}"
    if isinstance(expr, In):
        return f"{expr.field} IN ({', '.join(_literal(v) for v in expr.values)})"
    if isinstance(expr, Between):
        low, high = _bound(expr.low), _bound(expr.high)
        if low is None:
            return f"{expr.field} <= {_literal(high)}" if high is not None else f"{expr.field} IS NOT NULL"
        if high is None:
            return f"{expr.field} >= {_literal(low)}"
        return f"{expr.field} BETWEEN {_literal(low)} AND {_literal(high)}"
    op = "HAS ANY" if isinstance(expr, HasAny) else "HAS ALL"
    return f"{expr.field} {op} ({', '.join(_literal(v) for v in expr.values)})"


def _literal(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(_number(float(value)) if isinstance(value, float) else value)


def _bound(value: float | str | None) -> int | float | str | None:
    return value if value is None or isinstance(value, str) else _number(value)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() and abs(value) < 2**53 else value


def fields_of(expr: Expr) -> set[str]:
    """Every field an expression reads."""
    if isinstance(expr, (And, Or)):
        out: set[str] = set()
        for child in expr.children:
            out |= fields_of(child)
        return out
    if isinstance(expr, Not):
        return fields_of(expr.child)
    return {expr.field}


def criteria_count(expr: Expr) -> int:
    """Number of leaves (targeting criteria)."""
    if isinstance(expr, (And, Or)):
        return sum(criteria_count(c) for c in expr.children)
    if isinstance(expr, Not):
        return criteria_count(expr.child)
    return 1


def unknown_value_warnings(expr: Expr, schema: Schema) -> list[str]:
    """Values that no user had at build time (they match nobody unless streamed in later)."""
    warnings: list[str] = []

    def visit(node: Expr) -> None:
        if isinstance(node, (And, Or)):
            for child in node.children:
                visit(child)
        elif isinstance(node, Not):
            visit(node.child)
        elif isinstance(node, (Eq, In, Between)) and node.field in schema and schema[node.field].kind.numeric:
            warnings.extend(_outside_range(node, schema[node.field]))
        elif isinstance(node, (Eq, In, HasAny, HasAll)) and node.field in schema:
            spec = schema[node.field]
            if spec.kind not in (FieldKind.CATEGORICAL, FieldKind.LIST) or not spec.complete:
                return
            known = set(spec.values)
            values = (node.value,) if isinstance(node, Eq) else node.values
            unknown = [value for value in values if value not in known]
            for value in unknown[:MAX_VALUE_WARNINGS]:
                text = str(value)
                close = (
                    difflib.get_close_matches(text, [str(v) for v in spec.values], n=1)
                    if len(text) <= SHOWN_CHARS
                    else []
                )
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                warnings.append(f"{node.field} has no user with value {quoted(value)}{hint}")
            if len(unknown) > MAX_VALUE_WARNINGS:
                more = len(unknown) - MAX_VALUE_WARNINGS
                warnings.append(f"{node.field}: {more} more values no user had")

    visit(expr)
    return warnings


def _outside_range(node: Eq | In | Between, spec: FieldSpec) -> list[str]:
    """A numeric, date or timestamp leaf that no value of the build-time range can match
    (a mistyped year, a range past the data); values inside the range are not checked."""
    if spec.minimum is None or spec.maximum is None:
        return []
    span = f"values at build: {_shown(spec.minimum, spec)}..{_shown(spec.maximum, spec)}"
    if isinstance(node, Between):
        low, high = numeric_bounds(node, spec.kind)
        if high < spec.minimum or low > spec.maximum:
            return [f"{to_text(node)} matches no user ({span})"]
        return []
    values = (node.value,) if isinstance(node, Eq) else node.values
    numbers = numeric_values(node, spec.kind)
    if len(numbers) != len(values):  # (a boolean where a date belongs: the parser refuses those)
        return []
    return [
        f"{node.field} has no user with value {_literal(value)} ({span})"
        for value, number in zip(values, numbers, strict=True)
        if not spec.minimum <= float(number) <= spec.maximum
    ]


def _shown(number: float, spec: FieldSpec) -> str:
    if spec.kind.temporal:
        return temporal.iso_text(number, spec.kind is FieldKind.DATE)
    return str(_number(number))


def _article(word: str) -> str:
    """``word`` with "a" or "an" (field kinds: "an integer", "a number")."""
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"
