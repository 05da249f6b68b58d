"""Bad input: fuzzed payloads and one-off runs are refused with an error naming the problem; nothing written.

Hypothesis builds calls with one thing wrong each: a missing or wrongly typed field, an unknown one,
a key that is empty, too long or holds a control character or a lone surrogate (not UTF-8), a bad
namespace, NaN or Infinity deep in a value, nesting past 64 levels, an oversized value, non-string
object keys, bytes, sets, a huge integer, `embed` that is not a bool, `ttl_ms` or `version` out of
range. They run through the job's own code (the payload model, then the checks of Memories and the
store) and through in-process one-off runs; a sample goes through a real worker process, and a
handful through `python -m actors`.

CI runs MEMSYNC_FUZZ_EXAMPLES (2,000) examples of each fuzzed property, a quarter of that for the
valid payloads, which embed and write. A larger run, on demand:

    MEMSYNC_FUZZ_EXAMPLES=20000 pytest tests/reliability/test_bad_input.py
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal

import dramatiq
import pytest
import redis
from dramatiq.results import ResultFailure, Results
from dramatiq.results.backends import RedisBackend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn, SearchStrategy

from actors import memory_rollback, memory_sync, oneoff, state
from actors.brokers import build_broker
from actors.deadletter import DeadLetters
from actors.errors import INPUT_ERRORS, is_permanent
from actors.payloads import MAX_TTL_MS, RollbackPayload, SyncPayload
from actors.runtime import Runtime
from actors.sendcheck import ValidateOnSend
from actors.tasks import JOBS, perform
from kvstore import Keys, WriteMeta
from kvstore.validate import MAX_DEPTH, MAX_KEY_LENGTH
from tests.reliability.conftest import Report
from tests.support.embedding_server import EmbeddingServer
from tests.support.worker import READY_LINE, group_members, print_logs, running_worker, wait_until
from vectorstore import OpenAIEmbedder

EXAMPLES: Final = int(os.environ.get("MEMSYNC_FUZZ_EXAMPLES", "2000"))
#: The value limit of the fuzzed runtime and worker: small, so that oversized values are cheap to make.
MAX_VALUE_BYTES: Final = 4096
#: How many hypothesis-made bad calls go through the real worker, besides the hand-picked ones.
WORKER_SAMPLE: Final = 150
#: The most a dead-letter reason keeps (actors.deadletter): the problem must be named before it.
REASON_LIMIT: Final = 1000
WAIT_MS: Final = 30_000
FUZZ: Final = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

Job = Literal["sync", "rollback"]
ACTORS: Final = {"sync": memory_sync, "rollback": memory_rollback}
FIELDS: Final = {"sync": list(SyncPayload.model_fields), "rollback": list(RollbackPayload.model_fields)}
POSITIONAL: Final = {"sync": SyncPayload.positional, "rollback": RollbackPayload.positional}
VALID_NAMESPACES: Final = [None, "a", "A.b_c-d@9", "user-42@example.com", "n" * 128]


@dataclass(frozen=True)
class Call:
    """One call of a job's actor and, for a bad one, what is wrong and what its error must name."""

    job: Job
    kwargs: dict[str, Any]
    args: tuple[Any, ...] = ()
    kind: str = "valid"
    problem: str = ""
    #: Still bad after Dramatiq's JSON round trip (bytes and sets cannot be sent; int keys become strings).
    sendable: bool = True


@dataclass(frozen=True)
class OneOffCase:
    """The environment of a bad one-off run and a pattern its one line on stderr must match."""

    environ: dict[str, str]
    kind: str
    pattern: str


# --- strategies ----------------------------------------------------------------------------------

KEY_CHARS = st.characters(exclude_categories=["Cc", "Cs", "Zl", "Zp"])
NOT_IN_KEYS = st.characters(categories=["Cc", "Cs", "Zl", "Zp"])
SURROGATES = st.characters(categories=["Cs"])
NOT_IN_NAMESPACES = st.characters(exclude_categories=["Cs"]).filter(
    lambda char: not re.fullmatch(r"[A-Za-z0-9_.@-]", char)
)

keys = st.text(KEY_CHARS, min_size=1, max_size=24) | st.integers(1, MAX_KEY_LENGTH).map(lambda n: "k" * n)
namespaces = st.from_regex(r"[A-Za-z0-9_.@-]{1,128}", fullmatch=True)
ANY_NAMESPACE: SearchStrategy[str | None] = namespaces | st.none()
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=16)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
#: Not a string, and still not one after a JSON round trip.
JSON_NON_TEXT = (
    st.integers()
    | st.floats()
    | st.booleans()
    | st.lists(scalars, max_size=3)
    | st.dictionaries(st.text(max_size=4), scalars, max_size=3)
)
#: What JSON cannot carry at all: only a direct call can pass these.
UNSENDABLE = (
    st.binary(max_size=8)
    | st.sets(st.integers(), max_size=3)
    | st.frozensets(st.text(max_size=3), max_size=3)
    | st.tuples(st.integers())
    | st.complex_numbers(allow_nan=False)
    | st.builds(object)
    | st.decimals(allow_nan=False, allow_infinity=False).map(Decimal)
)


def _sendable(strategy: SearchStrategy[Any], sendable: bool = True) -> SearchStrategy[tuple[Any, bool]]:
    return strategy.map(lambda value: (value, sendable))


def _inserted(text: str, char: str, at: int) -> str:
    at = min(at, len(text))
    return text[:at] + char + text[at:]


def nested(levels: int, innermost: Any) -> Any:
    """`innermost` inside `levels` arrays."""
    value = innermost
    for _ in range(levels):
        value = [value]
    return value


WRONG_TYPES = _sendable(JSON_NON_TEXT) | _sendable(UNSENDABLE, False)
BAD_KEYS = (
    _sendable(st.none())
    | WRONG_TYPES
    | _sendable(st.just(""))
    | _sendable(st.integers(MAX_KEY_LENGTH + 1, 4 * MAX_KEY_LENGTH).map(lambda n: "k" * n))
    | _sendable(st.builds(_inserted, st.text(KEY_CHARS, max_size=20), NOT_IN_KEYS, st.integers(0, 20)))
)
BAD_NAMESPACES = (
    WRONG_TYPES
    | _sendable(st.just(""))
    | _sendable(st.integers(129, 400).map(lambda n: "n" * n))
    | _sendable(st.builds(_inserted, namespaces, NOT_IN_NAMESPACES, st.integers(0, 128)))
)
BAD_EMBEDS = _sendable(st.integers() | st.floats() | st.text() | st.none() | st.lists(scalars, max_size=2))
BAD_TTLS = _sendable(
    st.integers(max_value=0)
    | st.integers(min_value=MAX_TTL_MS + 1)
    | st.floats()
    | st.text()
    | st.booleans()
    | st.lists(st.integers(1, 10), max_size=2)
)
BAD_VERSIONS = _sendable(st.integers(max_value=0) | st.floats() | st.text() | st.booleans())
#: What makes a value bad wherever it sits in it, with the kind reported for coverage.
POISONS: Final[list[tuple[str, SearchStrategy[tuple[Any, bool]]]]] = [
    ("value: NaN or Infinity", _sendable(st.sampled_from([math.nan, math.inf, -math.inf]))),
    (
        "value: lone surrogate",
        _sendable(st.builds(_inserted, st.text(max_size=8), SURROGATES, st.integers(0, 8))),
    ),
    ("value: lone surrogate in a name", _sendable(st.builds(lambda char: {f"a{char}": 1}, SURROGATES))),
    (
        "value: non-string object key",
        _sendable(
            st.dictionaries(st.integers() | st.floats() | st.booleans() | st.none(), scalars, min_size=1),
            False,
        ),
    ),
    ("value: not JSON (bytes, set, tuple...)", _sendable(UNSENDABLE, False)),
    ("value: integer too long for JSON", _sendable(st.integers(4301, 6000).map(lambda n: -(10**n)), False)),
]


@st.composite
def _planted(draw: DrawFn, poison: Any) -> Any:
    """`poison` as the value itself, or under a few arrays and objects, among valid siblings."""
    value = poison
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            siblings = draw(st.lists(json_values, max_size=2))
            at = draw(st.integers(0, len(siblings)))
            value = [*siblings[:at], value, *siblings[at:]]
        else:
            value = {**draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2)), "x": value}
    return value


def _wrapped(innermost: Any, levels: int, objects: int) -> Any:
    """`innermost` inside `levels` arrays and objects; bit i of `objects` makes level i an object."""
    value = innermost
    for level in range(levels):
        value = {f"k{level}": value} if objects >> level & 1 else [value]
    return value


# Drawn as a few numbers rather than a choice per level, which would overrun hypothesis's buffer.
TOO_DEEP = st.builds(
    _wrapped, scalars | st.just([]) | st.just({}), st.integers(MAX_DEPTH + 1, 400), st.integers(0, 2**400)
)


def _oversized(limit: int) -> SearchStrategy[Any]:
    """Values whose canonical JSON is larger than `limit` bytes (counting bytes, not characters)."""
    sizes = st.integers(limit, limit + limit // 4)
    return (
        st.builds(lambda n, rest: {"pad": "x" * n, "rest": rest}, sizes, json_values)
        | sizes.map(lambda n: "é" * (n // 2 + 1))
        | sizes.map(lambda n: [1] * (n // 2 + 1))
    )


def _blank() -> SearchStrategy[str]:
    return st.text(st.sampled_from(" \t\n\r\u00a0\u3000"), max_size=4)


@st.composite
def sync_fields(draw: DrawFn, names: SearchStrategy[str | None] = ANY_NAMESPACE) -> dict[str, Any]:
    """The keyword arguments of a valid sync: each optional field present or not."""
    fields: dict[str, Any] = {"key": draw(keys), "value": draw(json_values)}
    if (namespace := draw(names)) is not None:
        fields["namespace"] = namespace
    if draw(st.booleans()):
        value = fields["value"]
        fields["embed"] = draw(st.booleans()) and not (isinstance(value, str) and not value.strip())
    if draw(st.booleans()):
        fields["ttl_ms"] = draw(st.integers(60_000, MAX_TTL_MS))  # long enough to check what was stored
    return fields


@st.composite
def rollback_fields(draw: DrawFn) -> dict[str, Any]:
    fields: dict[str, Any] = {"key": draw(keys)}
    if draw(st.booleans()):
        fields["namespace"] = draw(namespaces)
    if draw(st.booleans()):
        fields["version"] = draw(st.integers(min_value=1))
    return fields


# Each mutation makes one thing wrong in a valid call's fields.
Mutation = Callable[[DrawFn, Job, dict[str, Any], int], Call]


def _missing(name: str) -> Mutation:
    def mutate(draw: DrawFn, job: Job, fields: dict[str, Any], limit: int) -> Call:
        rest = {field: value for field, value in fields.items() if field != name}
        return Call(job, rest, kind=f"{name}: missing", problem=name)

    return mutate


def _replaced(name: str, bad: SearchStrategy[tuple[Any, bool]]) -> Mutation:
    def mutate(draw: DrawFn, job: Job, fields: dict[str, Any], limit: int) -> Call:
        value, sendable = draw(bad)
        return Call(job, {**fields, name: value}, kind=name, problem=name, sendable=sendable)

    return mutate


def _poisoned(kind: str, poison: SearchStrategy[tuple[Any, bool]]) -> Mutation:
    """A value that holds `poison` somewhere inside."""

    def mutate(draw: DrawFn, job: Job, fields: dict[str, Any], limit: int) -> Call:
        bad, sendable = draw(poison)
        value = draw(_planted(bad))
        return Call(job, {**fields, "value": value}, kind=kind, problem="value", sendable=sendable)

    return mutate


def _too_deep(draw: DrawFn, job: Job, fields: dict[str, Any], limit: int) -> Call:
    kwargs = {**fields, "value": draw(TOO_DEEP)}
    return Call(job, kwargs, kind=f"value: nested past {MAX_DEPTH}", problem="value")


def _oversized_value(draw: DrawFn, job: Job, fields: dict[str, Any], limit: int) -> Call:
    kwargs = {**fields, "value": draw(_oversized(limit))}
    return Call(job, kwargs, kind="value: oversized", problem="value")


def _blank_embedded(draw: DrawFn, job: Job, fields: dict[str, Any], limit: int) -> Call:
    kwargs = {**fields, "value": draw(_blank()), "embed": True}
    return Call(job, kwargs, kind="value: blank text to embed", problem="value")


def _unknown_field(draw: DrawFn, job: Job, fields: dict[str, Any], limit: int) -> Call:
    names = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12)
    name = draw(names.filter(lambda name: name not in FIELDS[job]))
    shown = name if name.isprintable() else repr(name)  # a name with a line break is quoted
    return Call(job, {**fields, name: draw(json_values)}, kind="unknown field", problem=shown)


def _unreadable_field(draw: DrawFn, job: Job, fields: dict[str, Any], limit: int) -> Call:
    """An unknown field whose name is not UTF-8; pydantic cannot print it, so the error names the payload."""
    name = _inserted("field", draw(SURROGATES), draw(st.integers(0, 5)))
    return Call(job, {**fields, name: 1}, kind="unknown field, not UTF-8", problem="payload")


def _too_many_positional(draw: DrawFn, job: Job, fields: dict[str, Any], limit: int) -> Call:
    count = len(POSITIONAL[job])
    args = tuple(draw(st.lists(scalars, min_size=count + 1, max_size=count + 3)))
    return Call(job, {}, args, kind="too many positional arguments", problem="positional arguments")


def _given_twice(draw: DrawFn, job: Job, fields: dict[str, Any], limit: int) -> Call:
    return Call(job, fields, (fields["key"],), kind="key given twice", problem="key given twice")


SYNC_MUTATIONS: Final[list[Mutation]] = [
    _missing("key"),
    _missing("value"),
    _replaced("key", BAD_KEYS),
    _replaced("namespace", BAD_NAMESPACES),
    *(_poisoned(kind, poison) for kind, poison in POISONS),
    _too_deep,
    _oversized_value,
    _blank_embedded,
    _replaced("embed", BAD_EMBEDS),
    _replaced("ttl_ms", BAD_TTLS),
    _unknown_field,
    _unreadable_field,
    _too_many_positional,
    _given_twice,
]
ROLLBACK_MUTATIONS: Final[list[Mutation]] = [
    _missing("key"),
    _replaced("key", BAD_KEYS),
    _replaced("namespace", BAD_NAMESPACES),
    _replaced("version", BAD_VERSIONS),
    _unknown_field,
    _unreadable_field,
    _too_many_positional,
    _given_twice,
]


@st.composite
def bad_calls(draw: DrawFn, limit: int = MAX_VALUE_BYTES) -> Call:
    """A sync (two in three) or a rollback with exactly one thing wrong; `limit` is the value limit."""
    if draw(st.integers(0, 2)):
        return draw(st.sampled_from(SYNC_MUTATIONS))(draw, "sync", draw(sync_fields()), limit)
    return draw(st.sampled_from(ROLLBACK_MUTATIONS))(draw, "rollback", draw(rollback_fields()), limit)


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def _payload_case(call: Call) -> OneOffCase:
    """A bad call as a one-off run: NaN and Infinity are refused as JSON before the payload is read."""
    job = {"sync": "MEMORY_SYNC", "rollback": "MEMORY_ROLLBACK"}[call.job]
    finite = _is_finite_json(call.kwargs)
    pattern = re.escape(call.problem) if finite else "(NaN|Infinity) is not a JSON value"
    return OneOffCase({"WORKER_JOB": job, "WORKER_PAYLOAD": json.dumps(call.kwargs)}, call.kind, pattern)


def _is_finite_json(fields: dict[str, Any]) -> bool:
    try:
        json.dumps(fields, allow_nan=False)
    except ValueError:
        return False
    return True


def _sync_text(value_text: str) -> dict[str, str]:
    return {"WORKER_JOB": "MEMORY_SYNC", "WORKER_PAYLOAD": f'{{"key": "k", "value": {value_text}}}'}


def one_off_cases(limit: int) -> SearchStrategy[OneOffCase]:
    """Bad one-off runs: bad payloads, text that is not JSON or not an object, huge numbers, bad jobs."""
    payloads = bad_calls(limit).filter(lambda call: call.sendable and not call.args).map(_payload_case)
    sync = {"WORKER_JOB": "MEMORY_SYNC"}
    return st.one_of(
        payloads,
        payloads,
        st.text()
        .filter(_not_json)
        .map(lambda t: OneOffCase({**sync, "WORKER_PAYLOAD": t}, "not JSON", "not valid JSON")),
        json_values.filter(lambda v: not isinstance(v, dict)).map(
            lambda v: OneOffCase({**sync, "WORKER_PAYLOAD": json.dumps(v)}, "not an object", "a JSON object")
        ),
        st.integers(4301, 20_000).map(
            lambda n: OneOffCase(_sync_text("9" * n), "integer too long", "integer too long to read")
        ),
        st.sampled_from(["1e400", "-1e400", "1E999"]).map(
            lambda n: OneOffCase(_sync_text(n), "number beyond a double", "value holds -?inf")
        ),
        st.integers(MAX_DEPTH + 1, 100_000).map(
            lambda n: OneOffCase(_sync_text("[" * n + "]" * n), "nested JSON", "value|nested too deeply")
        ),
        st.text()
        .filter(lambda name: name not in JOBS)
        .map(
            lambda name: OneOffCase(
                {"WORKER_JOB": name, "WORKER_PAYLOAD": "{}"}, "unknown job", "is not a job"
            )
        ),
        st.just(OneOffCase({"WORKER_PAYLOAD": "{}"}, "no job", "is not a job")),
        st.just(OneOffCase(sync, "no payload", "WORKER_PAYLOAD is not set")),
    )


# --- running calls -------------------------------------------------------------------------------


def run_call(runtime: Runtime, call: Call) -> dict[str, Any]:
    """What the call's actor does with its arguments, on `runtime`: parse them, then run the job."""
    job = "MEMORY_SYNC" if call.job == "sync" else "MEMORY_ROLLBACK"
    return perform(job, call.args, call.kwargs, WriteMeta(), 0, runtime)


def refusal(runtime: Runtime, call: Call) -> Exception:
    """The error the job raises for `call`; fails when the job accepts it."""
    try:
        result = run_call(runtime, call)
    except Exception as error:
        return error
    raise AssertionError(f"accepted a bad call ({call.kind}): {call} -> {result}")


def writes(client: redis.Redis) -> int:
    """How many writes the Redis server has taken (it never saves, so the count only grows)."""
    return int(client.info("persistence")["rdb_changes_since_last_save"])


def keys_under(client: redis.Redis, prefix: str) -> list[bytes]:
    """The keys under `prefix`, but for the record of the active index that every runtime writes once."""
    active = Keys(prefix).active_index().encode()
    return [key for key in client.scan_iter(match=f"{prefix}:*", count=1000) if key != active]


def assert_names_its_problem(error: BaseException, call: Call) -> None:
    reason = f"{type(error).__name__}: {error}"
    assert isinstance(error, INPUT_ERRORS) and is_permanent(error), f"{call.kind}: {reason} ({call})"
    assert call.problem in reason[:REASON_LIMIT], f"{call.kind}: {reason[:300]!r} names no {call.problem!r}"
    assert "\n" not in reason, f"{call.kind}: the error is not one line: {reason[:300]!r}"


@pytest.fixture(scope="module")
def fuzz_runtime() -> Iterator[Runtime]:
    """The worker's wiring over a prefix of its own (anything written shows) and a 4 KiB value limit."""
    shared = state.runtime()
    own = shared.settings.model_copy(
        update={
            "prefix": f"{shared.settings.prefix}-fuzz-{uuid.uuid4().hex[:8]}",
            "max_value_bytes": MAX_VALUE_BYTES,
        }
    )
    runtime = Runtime(own, shared.redis_url, shared.chroma_url, shared.secrets)
    # The first use records which index is active ({prefix}:index:active): bookkeeping, not the input's.
    runtime.memories  # noqa: B018
    yield runtime
    runtime.memories.index.drop_all()
    if isinstance(runtime.memories.embedder, OpenAIEmbedder):
        runtime.memories.embedder.close()
    runtime.redis.close()


# --- the job's validation, fuzzed ----------------------------------------------------------------


@pytest.mark.timeout(300)
def test_every_bad_sync_or_rollback_is_refused_naming_its_problem_and_writes_nothing(
    fuzz_runtime: Runtime, reliability_report: Report
) -> None:
    client, kinds = fuzz_runtime.redis, Counter[str]()

    @FUZZ
    @given(call=bad_calls())
    def refused(call: Call) -> None:
        before = writes(client)
        assert_names_its_problem(refusal(fuzz_runtime, call), call)
        assert writes(client) == before, f"{call.kind}: Redis was written to ({call})"
        kinds[call.kind] += 1

    refused()
    assert keys_under(client, fuzz_runtime.settings.prefix) == []
    assert fuzz_runtime.memories.index.namespaces() == [], "a vector was written"
    if EXAMPLES >= 2000:  # the rarest kind is about 1 in 100
        assert len(kinds) >= 20, f"some kinds of bad input were never made: {sorted(kinds)}"
    reliability_report(
        "bad input: fuzzed sync and rollback calls (hypothesis)",
        f"{kinds.total()} examples, {len(kinds)} kinds",
        "each refused with an input error naming the field, on one line, within the dead-letter reason's "
        "1,000 characters; zero Redis writes; no Chroma collection",
    )


@pytest.mark.timeout(300)
def test_every_valid_sync_is_accepted_and_stored_as_sent(
    fuzz_runtime: Runtime, reliability_report: Report
) -> None:
    applied = Counter[bool]()

    @settings(FUZZ, max_examples=max(EXAMPLES // 4, 1))
    @given(fields=sync_fields(st.sampled_from(VALID_NAMESPACES)))
    def accepted(fields: dict[str, Any]) -> None:
        result = run_call(fuzz_runtime, Call("sync", fields))
        record = fuzz_runtime.store.record(fields["key"], namespace=fields.get("namespace"))
        assert (result["status"], result["outcome"]) == ("success", "applied"), result
        assert record is not None and record.version == result["version"]
        assert (record.value, record.embed) == (fields["value"], fields.get("embed", False))
        applied[record.embed] += 1

    accepted()
    reliability_report(
        "bad input: fuzzed valid syncs are accepted (hypothesis)",
        f"{applied.total()} examples, {applied[True]} embedded",
        "applied; Redis holds the value as sent, its version and embed flag",
    )


@pytest.mark.timeout(60)
def test_a_value_nested_64_levels_deep_is_accepted_and_65_refused(
    fuzz_runtime: Runtime, namespace: str
) -> None:
    # 64 arrays around a scalar, or 63 around an empty array or object: 64 levels either way.
    for levels, innermost in [(64, "leaf"), (63, []), (63, {})]:
        fits = Call("sync", {"key": "deep", "value": nested(levels, innermost), "namespace": namespace})
        run_call(fuzz_runtime, fits)
        deeper = nested(levels + 1, innermost)
        too_deep = Call("sync", {"key": "deeper", "value": deeper}, problem="nested more than 64")
        assert_names_its_problem(refusal(fuzz_runtime, too_deep), too_deep)
    assert fuzz_runtime.store.record("deeper") is None
    # Past pydantic's own limit (about 255 levels), the error keeps its problem, not a 2,000-character path.
    very_deep = Call("sync", {"key": "deeper", "value": nested(600, 1)}, problem="depth exceeded")
    assert_names_its_problem(refusal(fuzz_runtime, very_deep), very_deep)


@pytest.mark.timeout(60)
def test_a_value_of_exactly_the_limit_is_accepted_and_one_byte_more_refused(
    fuzz_runtime: Runtime, namespace: str
) -> None:
    fits = "x" * (MAX_VALUE_BYTES - 2)  # with its two quotes, exactly the limit
    run_call(fuzz_runtime, Call("sync", {"key": "fits", "value": fits, "namespace": namespace}))
    too_big = Call("sync", {"key": "big", "value": fits + "x", "namespace": namespace}, problem="value is")
    assert_names_its_problem(refusal(fuzz_runtime, too_big), too_big)
    assert fuzz_runtime.store.record("big", namespace=namespace) is None


@pytest.mark.timeout(60)
def test_a_ttl_beyond_what_redis_holds_is_refused_before_anything_is_written(
    fuzz_runtime: Runtime, namespace: str
) -> None:
    longest = Call("sync", {"key": "kept", "value": 1, "ttl_ms": MAX_TTL_MS, "namespace": namespace})
    run_call(fuzz_runtime, longest)
    assert fuzz_runtime.redis.pttl(fuzz_runtime.keys.head(namespace, "kept")) > 0
    for ttl_ms in (MAX_TTL_MS + 1, 2**62, 10**30):
        call = Call(
            "sync", {"key": "k", "value": 1, "ttl_ms": ttl_ms, "namespace": namespace}, problem="ttl_ms"
        )
        assert_names_its_problem(refusal(fuzz_runtime, call), call)
    assert fuzz_runtime.store.record("k", namespace=namespace) is None


# --- one-off runs ----------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_every_bad_one_off_run_exits_2_with_one_line_naming_its_problem_and_writes_nothing(
    redis_client: redis.Redis, reliability_report: Report
) -> None:
    kinds = Counter[str]()
    assert state.runtime().memories  # its first use records the active index: not a run's write

    @FUZZ
    @given(case=one_off_cases(state.settings().max_value_bytes))
    def refused(case: OneOffCase) -> None:
        out, err, before = io.StringIO(), io.StringIO(), writes(redis_client)
        code = oneoff.main(environ=case.environ, out=out, err=err)
        lines = err.getvalue().splitlines()
        assert (code, out.getvalue(), len(lines)) == (2, "", 1), (
            f"{case.kind}: {code} {err.getvalue()[:300]!r}"
        )
        assert re.search(case.pattern, lines[0]), f"{case.kind}: {lines[0][:300]!r} !~ {case.pattern!r}"
        assert writes(redis_client) == before, f"{case.kind}: Redis was written to"
        kinds[case.kind] += 1

    refused()
    reliability_report(
        "bad input: fuzzed one-off runs, in-process (hypothesis)",
        f"{kinds.total()} examples, {len(kinds)} kinds",
        "exit 2, nothing on stdout, one stderr line naming the problem, zero Redis writes",
    )


ONE_OFF_SUBPROCESS_CASES: Final = [
    OneOffCase({"WORKER_JOB": "MEMORY_SYNC", "WORKER_PAYLOAD": "{'key': 'k'}"}, "not JSON", "not valid JSON"),
    OneOffCase(_sync_text("NaN"), "NaN", "NaN is not a JSON value"),
    OneOffCase(_sync_text("9" * 5000), "huge integer", "integer too long to read"),
    # 100 KB: one environment string holds at most 128 KiB.
    OneOffCase(_sync_text("[" * 50_000 + "]" * 50_000), "deep nesting", "nested too deeply"),
    OneOffCase(
        {"WORKER_JOB": "MEMORY_SYNC", "WORKER_PAYLOAD": '{"key": "k", "value": 1, "a\\nb": 2}'},
        "line break",
        "'a",
    ),
    OneOffCase(
        {"WORKER_JOB": "MEMORY_DELETE", "WORKER_PAYLOAD": '{"key": "k"}'}, "unknown job", "is not a job"
    ),
]


@pytest.mark.timeout(120)
def test_bad_one_off_runs_of_python_m_actors_exit_2_with_one_line_and_no_traceback(
    redis_client: redis.Redis, reliability_report: Report
) -> None:
    before = writes(redis_client)
    base = {k: v for k, v in os.environ.items() if k not in ("WORKER_JOB", "WORKER_PAYLOAD")}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "actors"],
            env={**base, **case.environ},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case in ONE_OFF_SUBPROCESS_CASES
    ]
    outputs = [run.communicate(timeout=90) for run in runs]  # all of them, whatever fails below
    for case, run, (stdout, stderr) in zip(ONE_OFF_SUBPROCESS_CASES, runs, outputs, strict=True):
        lines = stderr.splitlines()
        assert (run.returncode, stdout, len(lines)) == (2, "", 1), (
            f"{case.kind}: {run.returncode} {stderr[-2000:]}"
        )
        assert re.search(case.pattern, lines[0]), f"{case.kind}: {lines[0]!r}"
    assert writes(redis_client) == before
    reliability_report(
        "bad input: one-off runs of `python -m actors`",
        f"{len(runs)} processes",
        "exit 2, one stderr line naming the problem (no traceback), zero Redis writes",
    )


# --- through a real worker -------------------------------------------------------------------------

HAND_PICKED: Final = [
    Call("sync", {"value": 1}, kind="no key", problem="key"),
    Call("sync", {"key": "k"}, kind="no value", problem="value"),
    Call("sync", {"key": "a\x00b", "value": 1}, kind="NUL in key", problem="key"),
    Call("sync", {"key": "a\ud800b", "value": 1}, kind="surrogate in key", problem="key"),
    Call("sync", {"key": "k" * 513, "value": 1}, kind="long key", problem="key"),
    Call("sync", {"key": "k", "value": {"a": [1, math.nan]}}, kind="NaN", problem="value"),
    Call("sync", {"key": "k", "value": -math.inf}, kind="-Infinity", problem="value"),
    Call("sync", {"key": "k", "value": "x" * 5000}, kind="oversized", problem="value"),
    Call("sync", {"key": "k", "value": nested(70, 1)}, kind="deep", problem="nested more than 64"),
    Call("sync", {"key": "k", "value": nested(600, 1)}, kind="very deep", problem="depth exceeded"),
    Call("sync", {"key": "k", "value": 1, "embed": "yes"}, kind="embed", problem="embed"),
    Call("sync", {"key": "k", "value": " ", "embed": True}, kind="blank", problem="value"),
    Call("sync", {"key": "k", "value": 1, "ttl_ms": 0}, kind="ttl 0", problem="ttl_ms"),
    Call("sync", {"key": "k", "value": 1, "ttl_ms": 2**62}, kind="ttl huge", problem="ttl_ms"),
    Call("sync", {"key": "k", "value": 1, "namespace": "a:b"}, kind="namespace", problem="namespace"),
    Call("sync", {"key": "k", "value": 1, "colour": "red"}, kind="unknown", problem="colour"),
    Call("rollback", {"key": "k", "version": 0}, kind="version 0", problem="version"),
    Call("rollback", {"key": "k", "version": "2"}, kind="version text", problem="version"),
]
INPUT_ERROR_NAMES: Final = {kind.__name__ for base in INPUT_ERRORS for kind in (base, *base.__subclasses__())}


def sampled_calls(count: int) -> list[Call]:
    """`count` hypothesis-made bad calls that Dramatiq can send."""
    calls: list[Call] = []

    @settings(FUZZ, max_examples=count)
    @given(call=bad_calls().filter(lambda call: call.sendable))
    def collect(call: Call) -> None:
        calls.append(call)

    collect()
    return calls


def sender(prefix: str, redis_url: str) -> tuple[dramatiq.Broker, RedisBackend]:
    """A broker for a worker on `prefix` (`actors.broker` is the session's), and its results."""
    settings_ = state.settings().model_copy(update={"prefix": prefix, "max_value_bytes": MAX_VALUE_BYTES})
    broker = build_broker(settings_, redis_url)
    # As an older sender, or one in another language: what this suite tests is the worker's own check.
    broker.middleware[:] = [m for m in broker.middleware if not isinstance(m, ValidateOnSend)]
    results = next(middleware for middleware in broker.middleware if isinstance(middleware, Results))
    return broker, results.backend


def send(broker: dramatiq.Broker, call: Call) -> dramatiq.Message[Any]:
    """`actor.send(*args, **kwargs)`, onto `broker`."""
    message: dramatiq.Message[Any] = ACTORS[call.job].message(*call.args, **call.kwargs)
    broker.enqueue(message)
    return message


def failure(message: dramatiq.Message[Any], backend: RedisBackend) -> str:
    """The stored failure of `message`; fails when it succeeded."""
    try:
        result = message.get_result(backend=backend, block=True, timeout=WAIT_MS)
    except ResultFailure as failed:
        return str(failed)
    raise AssertionError(f"the worker accepted {message}: {result}")


@pytest.mark.timeout(180)
def test_bad_calls_sent_to_a_real_worker_are_dead_lettered_at_once_and_the_worker_stays_up(
    redis_url: str,
    redis_client: redis.Redis,
    embedding_service: EmbeddingServer,
    tmp_path: Path,
    reliability_report: Report,
) -> None:
    prefix = f"{state.settings().prefix}-badworker-{uuid.uuid4().hex[:8]}"
    calls = HAND_PICKED + sampled_calls(WORKER_SAMPLE)
    broker, backend = sender(prefix, redis_url)
    dead_letters, log = DeadLetters(redis_client, Keys(prefix)), tmp_path / "worker.log"
    env = {"MEMSYNC_PREFIX": prefix, "MEMSYNC_MAX_VALUE_BYTES": str(MAX_VALUE_BYTES)}
    try:
        with running_worker(env, log) as worker:
            wait_until(lambda: READY_LINE in log.read_text(errors="replace"), 60, "the worker to boot")
            processes = sorted(group_members(worker.pid))
            for call, message in [(call, send(broker, call)) for call in calls]:
                stored = failure(message, backend)
                letter = dead_letters.get(message.message_id)
                assert letter is not None, f"{call.kind}: not dead-lettered ({call})"
                assert (letter.retries, letter.error in INPUT_ERROR_NAMES) == (0, True), letter
                assert call.problem in letter.reason and call.problem in stored, (
                    f"{call.kind}: {letter.reason!r}"
                )
            bookkeeping = [Keys(prefix).dead_letters().encode(), Keys(prefix).workers().encode()]
            assert sorted(keys_under(redis_client, prefix)) == sorted(bookkeeping), "a bad call wrote"
            assert embedding_service.embedding_requests == [], "a bad call was embedded"
            assert sorted(group_members(worker.pid)) == processes, "a worker process died or was replaced"
            probe = send(broker, Call("sync", {"key": "probe", "value": "still up", "embed": True}))
            assert probe.get_result(backend=backend, block=True, timeout=WAIT_MS)["status"] == "success"
    finally:
        broker.close()
        print_logs(tmp_path)
    assert "retrying message" not in log.read_text(), "a bad call was retried"
    reliability_report(
        "bad input: bad calls sent to the Procfile worker",
        f"{len(calls)} messages ({len(HAND_PICKED)} hand-picked, {len(calls) - len(HAND_PICKED)} hypothesis)",
        "each a failed result and a dead letter naming the problem, zero retries, no write, no embedding "
        "call; the same worker processes then apply a valid message",
    )
