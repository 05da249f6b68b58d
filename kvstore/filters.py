"""Metadata filters: Chroma's `where` language, checked before use and evaluated in Python as Chroma does.

A filter is `{field: value}` (equality), `{field: {operator: operand}}` with one of `$eq $ne $gt $gte
$lt $lte $in $nin`, or `{"$and" | "$or": [filter, filter, ...]}` with at least two filters. Several
keys in one object mean all of them hold (Chroma itself refuses such objects, so `check_where`
writes them as an `$and`). `check_where` returns the canonical form: every comparison written
`{field: {operator: operand}}`, every object with exactly one key, which Chroma accepts as it is.

Semantics, as Chroma 1.5 evaluates them on its SQLite metadata segment (and `matches` repeats them):
- Booleans, strings and numbers are three kinds apart: `True` never equals `1`, `"1"` never equals 1.
- Integers and floats compare with each other. A stored float is compared with the operand as a
  float; a stored integer with the operand as an integer, so a float operand is truncated toward
  zero first, saturating at the 64-bit bounds (`{"n": {"$eq": 1.5}}` matches a stored 1 and a
  stored 1.5; `{"n": {"$lt": 1.5}}` matches a stored 1.0 but not a stored 1).
- `$gt $gte $lt $lte` take numbers only and match stored numbers only.
- `$in` is "equals one of", `$nin` is "equals none of"; the values listed are of one type (integers
  and floats are two types here).
- `$ne` and `$nin` match a record that lacks the field, or holds a value of another kind; every
  other operator needs the field present.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from kvstore.errors import InvalidFilter
from kvstore.validate import (
    INT64_MAX,
    INT64_MIN,
    MAX_METADATA_STRING_BYTES,
    METADATA_NAME,
    Scalar,
    utf8_size,
)

__all__ = [
    "COMPARISONS",
    "MAX_FILTER_DEPTH",
    "MAX_FILTER_TERMS",
    "Scalar",
    "Where",
    "check_where",
    "matches",
    "renamed",
]

#: A checked filter in canonical form (see the module docstring).
Where = dict[str, Any]

#: At most this many values compared in one filter: each comparison counts one, each value listed
#: under `$in` or `$nin` one.
MAX_FILTER_TERMS = 64
#: At most this many filter objects nested in one another: `{"f": 1}` is 1 deep, an `$and` of
#: those 2 (several keys in one object count as an `$and`).
MAX_FILTER_DEPTH = 8

COMPARISONS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin")
_LOGICAL = ("$and", "$or")
# The names check_metadata accepts: a filter on any other name could never match.


def check_where(where: object) -> Where | None:
    """Return `where` in canonical form, or None for no filter (None or {}).

    Raises InvalidFilter, naming the problem and where in the filter it is, for anything Chroma
    would refuse or that could never match a checked metadata field.
    """
    if where is None or (isinstance(where, dict) and not where):
        return None
    return _Checker().filter(where, "where", 1)


def matches(where: Mapping[str, Any] | None, metadata: Mapping[str, Scalar]) -> bool:
    """Whether a record with `metadata` is selected by `where`, a filter from `check_where`."""
    return where is None or _holds(where, metadata)


def renamed(where: Mapping[str, Any], rename: Callable[[str], str]) -> Where:
    """`where` with every field name mapped through `rename` (for Chroma: `lambda n: "m." + n`).

    Chroma 1.5 takes '.' and '-' in metadata names and in the field names of a filter as they are.
    """
    [(key, value)] = where.items()
    if key in _LOGICAL:
        return {key: [renamed(child, rename) for child in value]}
    [(op, operand)] = value.items()
    return {rename(key): {op: list(operand) if isinstance(operand, list) else operand}}


def _holds(where: Mapping[str, Any], metadata: Mapping[str, Scalar]) -> bool:
    [(key, value)] = where.items()
    if key == "$and":
        return all(_holds(child, metadata) for child in value)
    if key == "$or":
        return any(_holds(child, metadata) for child in value)
    [(op, operand)] = value.items()
    return _PREDICATES[op](metadata.get(key), operand)


def _equal(value: Scalar | None, operand: Scalar) -> bool:
    if _kind(operand) in ("integer", "float"):
        return _numeric(operator.eq, value, operand)
    return _kind(value) == _kind(operand) and value == operand


def _numeric(compare: Callable[[Any, Any], bool], value: Scalar | None, operand: Scalar) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float):
        return compare(value, float(operand))
    return compare(value, operand if isinstance(operand, int) else _as_i64(operand))


def _as_i64(number: Scalar) -> int:
    """`number` as Rust's `f as i64` makes it: truncated toward zero, saturating at the bounds."""
    return min(max(int(number), INT64_MIN), INT64_MAX)


def _in(value: Scalar | None, operands: list[Scalar]) -> bool:
    return any(_equal(value, operand) for operand in operands)


_PREDICATES: dict[str, Callable[[Scalar | None, Any], bool]] = {
    "$eq": _equal,
    "$ne": lambda value, operand: not _equal(value, operand),
    "$gt": partial(_numeric, operator.gt),
    "$gte": partial(_numeric, operator.ge),
    "$lt": partial(_numeric, operator.lt),
    "$lte": partial(_numeric, operator.le),
    "$in": _in,
    "$nin": lambda value, operands: not _in(value, operands),
}


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    return "null" if value is None else type(value).__name__


def _a_kind(value: object) -> str:
    kind = _kind(value)
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


class _Checker:
    """One check of one filter, counting its terms as it goes."""

    def __init__(self) -> None:
        self.terms = 0

    def filter(self, node: object, path: str, depth: int) -> Where:
        node = _filter_object(node, path, depth)
        if len(node) > 1:
            return self.conjunction(node, path, depth)
        [(key, value)] = node.items()
        if key in _LOGICAL:
            return {key: self.children(key, value, path, depth)}
        name = _check_field_name(key, path)
        return {name: self.comparison(value, f"{path}.{name}")}

    def conjunction(self, node: dict[Any, Any], path: str, depth: int) -> Where:
        _check_length(len(node), f"{path}: {len(node)} keys")
        return {"$and": [self.filter({key: value}, path, depth + 1) for key, value in node.items()]}

    def children(self, op: str, items: object, path: str, depth: int) -> list[Where]:
        if not isinstance(items, list) or len(items) < 2:
            shown = f"{len(items)} filter(s)" if isinstance(items, list) else f"a {_kind(items)}"
            raise InvalidFilter(f"{path}.{op}: expected a list of at least two filters, got {shown}")
        _check_length(len(items), f"{path}.{op}: {len(items)} filters")
        return [self.filter(item, f"{path}.{op}[{n}]", depth + 1) for n, item in enumerate(items)]

    def comparison(self, value: object, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            return {"$eq": self.operand("$eq", value, path)}
        if len(value) != 1:
            raise InvalidFilter(
                f"{path}: expected exactly one operator, got {len(value)}; combine comparisons with $and"
            )
        [(op, operand)] = value.items()
        if op not in _OPERAND_CHECKS:
            raise InvalidFilter(f"{path}: unknown operator {op!r}; expected one of {', '.join(COMPARISONS)}")
        return {op: self.operand(op, operand, f"{path}.{op}")}

    def operand(self, op: str, operand: object, path: str) -> Scalar | list[Scalar]:
        checked = _OPERAND_CHECKS[op](operand, path)
        self.terms += len(checked) if isinstance(checked, list) else 1
        _check_length(self.terms, f"{path}: the filter's {self.terms} terms")
        return checked


def _filter_object(node: object, path: str, depth: int) -> dict[Any, Any]:
    if depth > MAX_FILTER_DEPTH:
        raise InvalidFilter(
            f"{path}: filters nested more than {MAX_FILTER_DEPTH} deep "
            "(several keys in one object count as an $and)"
        )
    if not isinstance(node, dict):
        raise InvalidFilter(f"{path}: expected a filter object, got {_a_kind(node)}")
    if not node:
        raise InvalidFilter(f"{path}: an empty filter object")
    return node


def _check_length(count: int, what: str) -> None:
    if count > MAX_FILTER_TERMS:
        raise InvalidFilter(f"{what}; the limit is {MAX_FILTER_TERMS} terms")


def _check_field_name(name: object, path: str) -> str:
    if isinstance(name, str) and name.startswith("$"):
        raise InvalidFilter(
            f"{path}: unknown operator {name!r} where a field name belongs; $and and $or combine filters"
        )
    if not isinstance(name, str) or not METADATA_NAME.fullmatch(name):
        raise InvalidFilter(
            f"{path}: {repr(name)[:80]} is not a field name "
            "(1-64 of A-Z, a-z, 0-9, '_', '.', '-' starting with a letter or '_')"
        )
    return name


def _scalar(value: object, path: str) -> Scalar:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _integer(value, path)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidFilter(f"{path}: {value!r} is not a finite number")
        return value
    if isinstance(value, str):
        return _text(value, path)
    raise InvalidFilter(
        f"{path}: {_a_kind(value)} is not a value to compare with; expected a string, number or boolean"
    )


def _integer(value: int, path: str) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidFilter(f"{path}: integer out of the 64-bit range")
    return value


def _text(value: str, path: str) -> str:
    size = utf8_size(value)
    if size is None:
        raise InvalidFilter(f"{path}: text that is not valid UTF-8 (a lone surrogate)")
    if size > MAX_METADATA_STRING_BYTES:
        raise InvalidFilter(
            f"{path}: {size} bytes of text; no metadata value is longer than {MAX_METADATA_STRING_BYTES}"
        )
    return value


def _number(value: object, path: str) -> Scalar:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidFilter(f"{path}: compares numbers only, got {_a_kind(value)}")
    return _scalar(value, path)


def _scalars(values: object, path: str) -> list[Scalar]:
    if not isinstance(values, list) or not values:
        shown = "an empty list" if isinstance(values, list) else _a_kind(values)
        raise InvalidFilter(f"{path}: expected a non-empty list of values, got {shown}")
    _check_length(len(values), f"{path}: {len(values)} values")
    checked = [_scalar(value, f"{path}[{n}]") for n, value in enumerate(values)]
    kinds = sorted({_kind(value) for value in checked})
    if len(kinds) > 1:
        raise InvalidFilter(
            f"{path}: values of one type only (integers and floats are two), got {' and '.join(kinds)}"
        )
    return checked


_OPERAND_CHECKS: dict[str, Callable[[object, str], Scalar | list[Scalar]]] = {
    "$eq": _scalar,
    "$ne": _scalar,
    "$gt": _number,
    "$gte": _number,
    "$lt": _number,
    "$lte": _number,
    "$in": _scalars,
    "$nin": _scalars,
}
