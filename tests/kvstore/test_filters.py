"""Metadata filters: what check_where accepts and refuses, and matches giving Chroma's answers exactly."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import chromadb.errors
import pytest
from chromadb.api.models.Collection import Collection
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import InvalidFilter, check_metadata
from kvstore.filters import MAX_FILTER_DEPTH, MAX_FILTER_TERMS, Scalar, Where, check_where, matches, renamed
from vectorstore import chroma_client

#: Values stored and compared: every kind, integers and floats that meet, and Chroma's edges.
POOL: list[Scalar] = [
    -3, -1, 0, 1, 2, 3, 2**53 + 1, -(2**62), 2**63 - 1,
    -2.5, -0.5, 0.0, 0.5, 1.0, 1.5, 2.9999, 1e300, float(2**53),
    True, False, "", "a", "b", "B", "1", "true", "é",
]  # fmt: skip
FIELDS = ("a", "b", "c.d", "e-f", "key")
Records = dict[str, dict[str, Scalar]]


def _stored(name: str) -> str:
    return "m." + name


def _records() -> Records:
    """60 records over FIELDS, each field missing from about a quarter; `a` takes every POOL value."""
    rng = random.Random(20261201)
    records: Records = {}
    for n in range(60):
        metadata = {field: rng.choice(POOL) for field in FIELDS if rng.random() < 0.75}
        if n < len(POOL):
            metadata["a"] = POOL[n]
        records[f"r{n:02d}"] = metadata
    return records


def _as_stored(id_: str, metadata: dict[str, Scalar]) -> Any:
    """Metadata as memsync writes it to Chroma: bookkeeping fields beside the user's, renamed."""
    return {"key": id_, "version": 1} | {_stored(name): value for name, value in metadata.items()}


@pytest.fixture(scope="module")
def indexed_records() -> Iterator[tuple[Collection, Records]]:
    """A Chroma collection holding `_records()` as memsync stores them, and the records themselves.

    Module-wide, so that the records are written once; CHROMA_URL is the server tests/conftest.py started.
    """
    client = chroma_client(os.environ["CHROMA_URL"])
    name = f"filters-{uuid.uuid4().hex[:12]}"
    collection = client.create_collection(name, embedding_function=None)
    records = _records()
    embeddings: list[Sequence[float] | Sequence[int]] = [[0.5, 0.5]] * len(records)
    collection.add(
        ids=list(records), embeddings=embeddings, metadatas=[_as_stored(*i) for i in records.items()]
    )
    yield collection, records
    client.delete_collection(name)


def _chroma_ids(collection: Collection, where: Where | None) -> set[str]:
    chroma_where = None if where is None else renamed(where, _stored)
    return set(collection.get(where=chroma_where, include=[])["ids"])


def _python_ids(records: Records, where: Where | None) -> set[str]:
    return {id_ for id_, metadata in records.items() if matches(where, metadata)}


# Every operator, on every kind of stored value, with the edges where Chroma's answers are its own.
HAND_WRITTEN: list[dict[str, Any]] = [
    *({"a": value} for value in POOL),
    {"a": 1.2}, {"a": -0.9}, {"a": float(2**53 + 1)}, {"absent": 1},
    *({"a": {"$eq": value}} for value in (1, 1.5, True, "1")),
    *({"a": {"$ne": value}} for value in (1, 1.0, 1.5, -0.5, True, False, "a", "")),
    {"absent": {"$ne": 1}}, {"key": {"$ne": "r01"}},
    *(
        {"a": {op: value}}
        for op in ("$gt", "$gte", "$lt", "$lte")
        for value in (1, 1.5, -0.5, -2.5, 0, 0.0, 2.9999, 2**53, 2**63 - 1, -(2**63),
                      1e300, -1e300, 1e19, -1e19)
    ),
    {"absent": {"$gt": 0}}, {"absent": {"$lte": 0}},
    *(
        {"a": {op: values}}
        for op in ("$in", "$nin")
        for values in ([1], [1.0], [1.5, 2.9999], [-0.5], [True], [False, True], ["a", "B"], [""],
                       [2**53 + 1])
    ),
    {"absent": {"$in": [1]}}, {"absent": {"$nin": [1]}}, {"key": {"$in": ["r01", "r02"]}},
    {"a": 1, "b": 1}, {"a": {"$gte": 0}, "c.d": {"$ne": "a"}, "e-f": {"$nin": [True]}},
    {"$and": [{"a": {"$gt": -1}}, {"a": {"$lt": 2}}]},
    {"$or": [{"a": True}, {"b": {"$in": ["a", "b"]}}, {"absent": 1}]},
    {"$or": [{"a": {"$ne": 1}}, {"$and": [{"b": 1}, {"c.d": {"$gte": 0.5}}]}], "e-f": {"$nin": ["a"]}},
    {"$and": [{"$or": [{"a": 0}, {"a": False}]}, {"$or": [{"b": {"$ne": 0}}, {"key": 0}]}]},
]  # fmt: skip


@pytest.mark.parametrize("where", HAND_WRITTEN, ids=repr)
def test_matches_selects_the_records_chroma_selects_for_every_hand_written_filter(
    indexed_records: tuple[Collection, Records], where: dict[str, Any]
) -> None:
    collection, records = indexed_records
    checked = check_where(where)
    assert _python_ids(records, checked) == _chroma_ids(collection, checked)


def test_no_filter_selects_every_record(indexed_records: tuple[Collection, Records]) -> None:
    collection, records = indexed_records
    assert _python_ids(records, check_where(None)) == _chroma_ids(collection, None) == set(records)


_INTEGERS = st.one_of(
    st.sampled_from([v for v in POOL if type(v) is int]),
    st.integers(-4, 4),
    st.integers(-(2**63), 2**63 - 1),
)
_FLOATS = st.one_of(
    st.sampled_from([v for v in POOL if type(v) is float]),
    st.integers(-8, 8).map(lambda n: n / 2),
    st.floats(allow_nan=False, allow_infinity=False),
)
_STRINGS = st.one_of(st.sampled_from([v for v in POOL if type(v) is str]), st.text("abAB1é", max_size=2))
_NUMBERS = st.one_of(_INTEGERS, _FLOATS)
_SCALARS = st.one_of(_NUMBERS, _STRINGS, st.booleans())
_LISTS = st.one_of(
    *(st.lists(kind, min_size=1, max_size=4) for kind in (_INTEGERS, _FLOATS, _STRINGS, st.booleans()))
)
_CONDITIONS = st.one_of(
    _SCALARS,
    st.dictionaries(st.sampled_from(["$eq", "$ne"]), _SCALARS, min_size=1, max_size=1),
    st.dictionaries(st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), _NUMBERS, min_size=1, max_size=1),
    st.dictionaries(st.sampled_from(["$in", "$nin"]), _LISTS, min_size=1, max_size=1),
)
_NAMES = st.sampled_from([*FIELDS, "absent"])
FILTERS = st.recursive(
    st.dictionaries(_NAMES, _CONDITIONS, min_size=1, max_size=1),
    lambda children: st.one_of(
        st.builds(
            lambda op, items: {op: items},
            st.sampled_from(["$and", "$or"]),
            st.lists(children, min_size=2, max_size=3),
        ),
        st.dictionaries(_NAMES, _CONDITIONS, min_size=2, max_size=3),
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(where=FILTERS)
def test_matches_selects_the_records_chroma_selects_for_generated_filters(
    indexed_records: tuple[Collection, Records], where: dict[str, Any]
) -> None:
    collection, records = indexed_records
    checked = check_where(where)
    assert _python_ids(records, checked) == _chroma_ids(collection, checked)


# Refused by check_where and by Chroma alike (the field is written as Chroma would see it, prefixed).
REFUSED_BY_BOTH: list[tuple[dict[str, Any], str]] = [
    ({"$and": [{"a": 1}]}, "where.$and: expected a list of at least two filters, got 1 filter(s)"),
    ({"$or": []}, "where.$or: expected a list of at least two filters, got 0 filter(s)"),
    ({"$and": {"a": 1}}, "where.$and: expected a list of at least two filters, got a dict"),
    ({"a": {"$regex": "x"}}, "where.a: unknown operator '$regex'; expected one of $eq, $ne, $gt, $gte"),
    (
        {"a": {"$gt": 0, "$lt": 2}},
        "where.a: expected exactly one operator, got 2; combine comparisons with $and",
    ),
    ({"a": {}}, "where.a: expected exactly one operator, got 0"),
    ({"a": {"$gt": "b"}}, "where.a.$gt: compares numbers only, got a string"),
    ({"a": {"$lte": True}}, "where.a.$lte: compares numbers only, got a boolean"),
    ({"a": {"$in": []}}, "where.a.$in: expected a non-empty list of values, got an empty list"),
    ({"a": {"$nin": 1}}, "where.a.$nin: expected a non-empty list of values, got an integer"),
    (
        {"a": {"$in": [1, 2.5]}},
        "where.a.$in: values of one type only (integers and floats are two), got float and",
    ),
    (
        {"a": {"$nin": [True, 1]}},
        "where.a.$nin: values of one type only (integers and floats are two), got boolean",
    ),
    ({"a": {"$in": [1, "1"]}}, "where.a.$in: values of one type only"),
    ({"a": None}, "where.a: a null is not a value to compare with; expected a string, number or boolean"),
    ({"a": [1]}, "where.a: a list is not a value to compare with"),
    ({"a": {"$eq": [1]}}, "where.a.$eq: a list is not a value to compare with"),
    ({"a": {"$gt": float("nan")}}, "where.a.$gt: nan is not a finite number"),
    ({"a": {"$lt": float("inf")}}, "where.a.$lt: inf is not a finite number"),
    ({"a": {"$eq": 2**63}}, "where.a.$eq: integer out of the 64-bit range"),
    ({"a": {"$in": [1, -(2**63) - 1]}}, "where.a.$in[1]: integer out of the 64-bit range"),
    ({"a": "\ud800"}, "where.a: text that is not valid UTF-8"),
    ({"$not": {"a": 1}}, "where: unknown operator '$not' where a field name belongs; $and and $or combine"),
]


def _prefixed(node: Any) -> Any:
    """A filter, checked or not, with its field names as Chroma holds them."""
    if not isinstance(node, dict):
        return node
    return {
        (key if key.startswith("$") else _stored(key)): [_prefixed(v) for v in value]
        if key in ("$and", "$or") and isinstance(value, list)
        else value
        for key, value in node.items()
    }


@pytest.mark.parametrize(("where", "message"), REFUSED_BY_BOTH, ids=repr)
def test_a_filter_chroma_refuses_is_refused_before_it_is_sent_with_where_the_problem_is(
    indexed_records: tuple[Collection, Records], where: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidFilter) as refused:
        check_where(where)
    assert str(refused.value).startswith(message)
    collection, _ = indexed_records
    with pytest.raises((ValueError, TypeError, chromadb.errors.ChromaError)):
        collection.get(where=_prefixed(where), include=[])


def _nested(depth: int) -> dict[str, Any]:
    where: dict[str, Any] = {"a": 1}
    for _ in range(depth - 1):
        where = {"$and": [where, {"b": 1}]}
    return where


# Refused by check_where only: Chroma would run these, but they could never match checked metadata
# (field names, long text, operators on lists) or they are unbounded.
REFUSED_HERE: list[tuple[object, str]] = [
    ([{"a": 1}], "where: expected a filter object, got a list"),
    ("a", "where: expected a filter object, got a string"),
    ({"$and": [{"a": 1}, {}]}, "where.$and[1]: an empty filter object"),
    ({"$or": [{"a": 1}, 3]}, "where.$or[1]: expected a filter object, got an integer"),
    (
        {"$or": [{"a": 1}, {"b": {"$in": [1, {"x": 1}]}}]},
        "where.$or[1].b.$in[1]: a dict is not a value to compare",
    ),
    ({"1a": 1}, "where: '1a' is not a field name (1-64 of A-Z, a-z, 0-9, '_', '.', '-'"),
    ({"a b": 1}, "where: 'a b' is not a field name"),
    ({"": 1}, "where: '' is not a field name"),
    ({"x" * 65: 1}, "where: 'xxxxx"),
    ({"$and": [{"a": 1}, {"b": 2, 3: 1}]}, "where.$and[1]: 3 is not a field name"),
    ({"a": {"$contains": "x"}}, "where.a: unknown operator '$contains'; expected one of"),
    (
        {"a": {"eq": 1}},
        "where.a: unknown operator 'eq'; expected one of $eq, $ne, $gt, $gte, $lt, $lte, $in, $nin",
    ),
    ({"a": "x" * 1025}, "where.a: 1025 bytes of text; no metadata value is longer than 1024"),
    (
        _nested(MAX_FILTER_DEPTH + 1),
        "where.$and[0].$and[0].$and[0].$and[0].$and[0].$and[0].$and[0].$and[0]: filters",
    ),
    (
        {"$and": [{"a": 1}, _nested(MAX_FILTER_DEPTH)]},
        "where.$and[1]" + ".$and[0]" * 7 + ": filters nested more",
    ),
    ({"a": {"$in": list(range(MAX_FILTER_TERMS + 1))}}, "where.a.$in: 65 values; the limit is 64 terms"),
    (
        {"$or": [{"a": n} for n in range(MAX_FILTER_TERMS + 1)]},
        "where.$or: 65 filters; the limit is 64 terms",
    ),
    ({f"f{n}": n for n in range(MAX_FILTER_TERMS + 1)}, "where: 65 keys; the limit is 64 terms"),
    (
        {"$or": [{"a": {"$in": list(range(60))}}, {"b": {"$nin": list(range(5))}}]},
        "where.$or[1].b.$nin: the filter's 65 terms; the limit is 64 terms",
    ),
]


@pytest.mark.parametrize(("where", "message"), REFUSED_HERE, ids=lambda v: repr(v)[:60])
def test_a_malformed_filter_is_refused_with_where_the_problem_is(where: object, message: str) -> None:
    with pytest.raises(InvalidFilter) as refused:
        check_where(where)
    assert str(refused.value).startswith(message)


def test_filters_at_the_limits_are_accepted() -> None:
    assert check_where(_nested(MAX_FILTER_DEPTH)) is not None
    assert check_where({"a": {"$in": list(range(MAX_FILTER_TERMS))}}) is not None
    assert (
        check_where({"$or": [{"a": {"$in": list(range(60))}}, {"b": {"$nin": list(range(4))}}]}) is not None
    )


def test_no_filter_and_an_empty_one_mean_every_record() -> None:
    assert check_where(None) is None
    assert check_where({}) is None
    assert matches(None, {})


def test_the_canonical_form_writes_every_comparison_with_its_operator() -> None:
    assert check_where({"kind": "fact"}) == {"kind": {"$eq": "fact"}}
    assert check_where({"n": {"$in": [1, 2]}}) == {"n": {"$in": [1, 2]}}
    assert check_where({"$or": [{"a": 1}, {"b": {"$gt": 2.5}}]}) == {
        "$or": [{"a": {"$eq": 1}}, {"b": {"$gt": 2.5}}]
    }


def test_several_fields_in_one_object_must_all_hold() -> None:
    where = check_where({"kind": "fact", "user": "u1", "$or": [{"n": 1}, {"n": 2}]})
    assert where == {
        "$and": [
            {"kind": {"$eq": "fact"}},
            {"user": {"$eq": "u1"}},
            {"$or": [{"n": {"$eq": 1}}, {"n": {"$eq": 2}}]},
        ]
    }
    assert matches(where, {"kind": "fact", "user": "u1", "n": 2})
    assert not matches(where, {"kind": "fact", "user": "u2", "n": 2})
    assert not matches(where, {"kind": "fact", "user": "u1", "n": 3})


def test_the_canonical_form_is_a_copy_of_the_filter() -> None:
    values = [1, 2]
    where = check_where({"n": {"$in": values}})
    values.append(3)
    assert where == {"n": {"$in": [1, 2]}}


def test_renamed_maps_every_field_name_and_leaves_the_filter_as_it_was() -> None:
    where = check_where({"$or": [{"a": {"$nin": [1]}}, {"b": 2, "c": {"$gte": 0.5}}]})
    assert where is not None
    before = repr(where)
    assert renamed(where, lambda name: "m." + name) == {
        "$or": [
            {"m.a": {"$nin": [1]}},
            {"$and": [{"m.b": {"$eq": 2}}, {"m.c": {"$gte": 0.5}}]},
        ]
    }
    assert repr(where) == before


@pytest.mark.parametrize("name", ["a", "_a", "A.b-c_9", "x" * 64, "1a", ".a", "-a", "a b", "é", "x" * 65, ""])
def test_a_filter_names_the_same_fields_metadata_may_have(name: str) -> None:
    def accepted(check: Any, error: type[Exception]) -> bool:
        try:
            check({name: 1})
        except error:
            return False
        return True

    assert accepted(check_where, InvalidFilter) == accepted(check_metadata, Exception)


def _selected(where: object, *values: Scalar | None) -> list[Scalar | None]:
    """The values, of those given, that a record holding it in field `x` (None: no `x`) is selected for."""
    checked = check_where(where)
    return [v for v in values if matches(checked, {} if v is None else {"x": v})]


def test_ne_and_nin_select_records_that_lack_the_field_or_hold_another_kind() -> None:
    assert _selected({"x": {"$ne": 1}}, None, 1, 1.0, 2, True, "1") == [None, 2, True, "1"]
    assert _selected({"x": {"$nin": ["a"]}}, None, "a", "b", 0) == [None, "b", 0]
    assert _selected({"x": {"$eq": 1}}, None) == []
    assert _selected({"x": {"$in": [1]}}, None) == []
    assert _selected({"x": {"$lt": 1}}, None) == []


def test_booleans_strings_and_numbers_never_equal_one_another() -> None:
    assert _selected({"x": True}, True, 1, 1.0, "True") == [True]
    assert _selected({"x": 1}, True, 1, 1.0, "1") == [1, 1.0]
    assert _selected({"x": 0}, False, 0, 0.0, "") == [0, 0.0]
    assert _selected({"x": "1"}, True, 1, "1") == ["1"]
    assert _selected({"x": {"$in": [False]}}, False, 0) == [False]


def test_order_comparisons_select_stored_numbers_only() -> None:
    assert _selected({"x": {"$gt": 0}}, True, "z", 1, 0.5, 0) == [1, 0.5]
    assert _selected({"x": {"$gte": 0}}, False, "", 0, 0.0, -1) == [0, 0.0]


def test_a_float_operand_is_truncated_toward_zero_against_stored_integers() -> None:
    assert _selected({"x": 1.5}, 1, 1.5, 2) == [1, 1.5]
    assert _selected({"x": {"$lt": 1.5}}, 1, 1.0, 0) == [1.0, 0]
    assert _selected({"x": {"$lte": -0.5}}, 0, -0.5, -1) == [0, -0.5, -1]
    assert _selected({"x": {"$gt": -3.5}}, -3, -3.4, -4) == [-3.4]
    assert _selected({"x": {"$in": [2.9999]}}, 2, 3, 2.9999) == [2, 2.9999]
    assert _selected({"x": {"$nin": [1.5]}}, 1, 1.5, 2) == [2]


def test_a_float_operand_beyond_64_bits_saturates_against_stored_integers() -> None:
    assert _selected({"x": {"$eq": 1e19}}, 2**63 - 1, 2**62) == [2**63 - 1]
    assert _selected({"x": {"$lt": 1e300}}, 2**63 - 1, 2**62) == [2**62]
    assert _selected({"x": {"$gte": -1e19}}, -(2**63), 0) == [-(2**63), 0]


def test_an_integer_operand_is_a_float_against_stored_floats() -> None:
    assert _selected({"x": 2**53 + 1}, float(2**53), 2**53, 2**53 + 1) == [float(2**53), 2**53 + 1]
    assert _selected({"x": {"$gt": 0}}, 0.5, 0.0, -0.5) == [0.5]


def test_and_needs_every_filter_and_or_any() -> None:
    both = check_where({"$and": [{"x": {"$gt": 0}}, {"x": {"$lt": 2}}]})
    either = check_where({"$or": [{"x": {"$lt": 0}}, {"x": "a"}]})
    assert [matches(both, {"x": v}) for v in (-1, 1, 2)] == [False, True, False]
    assert [matches(either, {"x": v}) for v in (-1, 1, "a")] == [True, False, True]
