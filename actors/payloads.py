"""The payloads of the sync and rollback jobs, validated before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator

from actors.errors import InvalidPayload
from kvstore import KVStoreError, Scalar, check_key, check_metadata, check_namespace

__all__ = [
    "MAX_BATCH_ITEMS",
    "MAX_TTL_MS",
    "BatchPayload",
    "RollbackPayload",
    "SyncPayload",
    "parse",
    "parse_item",
]

P = TypeVar("P", bound=BaseModel)
C = TypeVar("C")

#: The longest time to live: the largest integer the write script's Lua numbers (doubles) hold exactly.
#: Past it they lose digits, and from about 1e17 Redis refuses them after the script has written the value.
MAX_TTL_MS = 2**53
#: The most items one `memory_sync_batch` message may carry.
MAX_BATCH_ITEMS = 1000
_LOCATION_LIMIT = 80


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    positional: ClassVar[tuple[str, ...]] = ("key", "namespace")

    key: str
    namespace: str | None = None

    @field_validator("key")
    @classmethod
    def _usable_key(cls, key: str) -> str:
        return _checked(check_key, key)

    @field_validator("namespace")
    @classmethod
    def _usable_namespace(cls, namespace: str | None) -> str:
        return _checked(check_namespace, namespace)


class SyncPayload(_Payload):
    """`{key, value, embed?, namespace?, ttl_ms?, metadata?}`: the MEMORY_SYNC job."""

    positional: ClassVar[tuple[str, ...]] = ("key", "value", "embed", "namespace", "ttl_ms", "metadata")

    value: JsonValue
    embed: bool = False
    ttl_ms: int | None = Field(None, gt=0, le=MAX_TTL_MS)
    metadata: dict[str, Scalar] | None = None

    @field_validator("metadata", mode="plain")
    @classmethod
    def _usable_metadata(cls, metadata: Any) -> dict[str, Scalar] | None:
        return _checked(check_metadata, metadata) or None


class RollbackPayload(_Payload):
    """`{key, version?, namespace?}`: the MEMORY_ROLLBACK job; no version means the previous one."""

    positional: ClassVar[tuple[str, ...]] = ("key", "version", "namespace")

    version: int | None = Field(None, gt=0)


class BatchPayload(BaseModel):
    """`{items: [{key, value, embed?, namespace?, ttl_ms?, metadata?}, ...], skip_unchanged?}`: the batch job.

    Each item is checked on its own (`parse_item`), so one bad item fails alone.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    positional: ClassVar[tuple[str, ...]] = ("items", "skip_unchanged")

    items: list[Any] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)
    skip_unchanged: bool = False


def parse_item(fields: Any) -> SyncPayload:
    """One item of a batch, checked as a MEMORY_SYNC payload of its own."""
    if not isinstance(fields, dict):
        raise InvalidPayload(f"invalid item: must be an object, not {type(fields).__name__}")
    return parse(SyncPayload, (), fields)


def parse(model: type[P], args: tuple[Any, ...], kwargs: dict[str, Any]) -> P:
    """Build a payload from an actor call's arguments (positional ones in the model's `positional` order)."""
    names: tuple[str, ...] = getattr(model, "positional")  # noqa: B009  (a ClassVar of every payload)
    if len(args) > len(names):
        raise InvalidPayload(f"invalid payload: {len(args)} positional arguments; at most {len(names)}")
    fields = dict(zip(names, args, strict=False))
    if clash := sorted(set(fields) & set(kwargs)):
        raise InvalidPayload(f"invalid payload: {', '.join(clash)} given twice")
    try:
        return model.model_validate({**fields, **kwargs})
    except ValidationError as err:
        raise InvalidPayload("invalid payload: " + _describe(err)) from None


def _checked(check: Callable[[Any], C], value: Any) -> C:
    try:
        return check(value)
    except KVStoreError as err:
        raise ValueError(str(err)) from None


def _describe(err: ValidationError) -> str:
    problems = []
    for problem in err.errors(include_url=False, include_input=False):
        problems.append(f"{_location(problem['loc'])}: {problem['msg']}")
    return "; ".join(problems)


def _location(loc: tuple[int | str, ...]) -> str:
    """Where a problem is, on one line (a name with a line break is quoted) and short."""
    where = ".".join(str(part) if str(part).isprintable() else repr(part) for part in loc) or "payload"
    if len(where) > _LOCATION_LIMIT:  # deep in a value: keep the problem, not a 2,000-character path
        where = where[:_LOCATION_LIMIT] + "..."
    return where
