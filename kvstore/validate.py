"""Checks on keys, namespaces and values, and the canonical JSON form values are stored in."""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from kvstore.errors import InvalidKey, InvalidMetadata, InvalidValue, ValueTooLarge

__all__ = [
    "DEFAULT_NAMESPACE",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_DEPTH",
    "MAX_KEY_LENGTH",
    "MAX_METADATA_BYTES",
    "MAX_METADATA_FIELDS",
    "MAX_METADATA_STRING_BYTES",
    "METADATA_NAME",
    "Scalar",
    "canonical_json",
    "check_key",
    "check_metadata",
    "check_namespace",
    "content_hash",
    "embedding_text",
    "metadata_json",
    "same_metadata",
    "utf8_size",
]

DEFAULT_NAMESPACE = "default"
MAX_KEY_LENGTH = 512
MAX_DEPTH = 64
_NAMESPACE = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
_FORBIDDEN_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}

#: A metadata value: what Chroma's metadata and filters hold.
Scalar = str | int | float | bool
MAX_METADATA_FIELDS = 32
MAX_METADATA_STRING_BYTES = 1024
MAX_METADATA_BYTES = 8192
#: A metadata field's name (filters name fields the same way).
METADATA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_key(key: object) -> str:
    """Return `key` if it is a usable key: a non-empty string of printable characters."""
    if not isinstance(key, str):
        raise InvalidKey(f"key must be a string, not {type(key).__name__}")
    if not key:
        raise InvalidKey("key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"key is {len(key)} characters long; the limit is {MAX_KEY_LENGTH}")
    for position, char in enumerate(key):
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            raise InvalidKey(f"key holds control character U+{ord(char):04X} at position {position}")
    return key


def check_namespace(namespace: object) -> str:
    """Return `namespace`, or the default one for None; 1-128 of A-Z a-z 0-9 _ . @ -."""
    if namespace is None:
        return DEFAULT_NAMESPACE
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise InvalidKey("namespace must be 1-128 characters of A-Z, a-z, 0-9, '_', '.', '@' or '-'")
    return namespace


def canonical_json(value: Any, max_bytes: int) -> str:
    """Return the canonical JSON of `value` (sorted keys, no spaces), refusing what is not JSON."""
    _check_json(value)
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as err:  # an integer longer than sys.get_int_max_str_digits(), say
        raise InvalidValue(f"value cannot be written as JSON: {str(err).split(';')[0]}") from None
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise ValueTooLarge(f"value is {size} bytes as JSON; the limit is {max_bytes}")
    return text


def embedding_text(value: Any, stored_json: str) -> str:
    """The text a value is embedded as: a string as itself, anything else as its canonical JSON."""
    return value if isinstance(value, str) else stored_json


def content_hash(text: str) -> str:
    """A short, stable fingerprint of the text an embedding was made from."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _check_json(value: Any) -> None:
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        # Only arrays and objects are levels: 64 of them is allowed whatever the innermost holds.
        if depth > MAX_DEPTH and isinstance(item, list | tuple | dict):
            raise InvalidValue(f"value is nested more than {MAX_DEPTH} levels deep")
        pending.extend((child, depth + 1) for child in _children(item))


def _children(item: Any) -> list[Any]:
    if item is None or isinstance(item, bool | int):
        return []
    if isinstance(item, float | str):
        _check_scalar(item)
        return []
    if isinstance(item, list | tuple):
        return list(item)
    if isinstance(item, dict):
        _check_names(item)
        return list(item.values())
    raise InvalidValue(f"value holds a {type(item).__name__}, which is not JSON")


def _check_scalar(item: float | str) -> None:
    if isinstance(item, str):
        _check_text(item)
    elif not math.isfinite(item):
        raise InvalidValue(f"value holds {item!r}, which JSON cannot represent")


def _check_names(item: dict[Any, Any]) -> None:
    for name in item:
        if not isinstance(name, str):
            raise InvalidValue(f"object keys must be strings, not {type(name).__name__}")
        _check_text(name)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValue("value holds text that is not valid UTF-8 (a lone surrogate)") from None


def check_metadata(metadata: object) -> dict[str, Scalar]:
    """Return `metadata` if it is usable: a flat object of strings, numbers and booleans, bounded.

    None and {} mean no metadata. Names are 1-64 of A-Z a-z 0-9 _ . - (not starting with a digit, '.'
    or '-'), at most `MAX_METADATA_FIELDS` of them; a string holds at most `MAX_METADATA_STRING_BYTES`
    bytes; an integer fits 64 bits; the whole, as JSON, at most `MAX_METADATA_BYTES`.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidMetadata(f"metadata must be an object, not {type(metadata).__name__}")
    if len(metadata) > MAX_METADATA_FIELDS:
        raise InvalidMetadata(f"metadata has {len(metadata)} fields; the limit is {MAX_METADATA_FIELDS}")
    for name, value in metadata.items():
        _check_field(name, value)
    size = len(metadata_json(metadata).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise InvalidMetadata(f"metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
    return dict(metadata)


def metadata_json(metadata: Mapping[str, Scalar]) -> str:
    """The canonical JSON of checked metadata; "" for none (so that no metadata is stored as nothing)."""
    if not metadata:
        return ""
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _check_field(name: object, value: object) -> None:
    if not isinstance(name, str) or not METADATA_NAME.fullmatch(name):
        shown = repr(name)[:80]
        raise InvalidMetadata(
            f"metadata field name {shown} is not 1-64 of A-Z, a-z, 0-9, '_', '.', '-' "
            "starting with a letter or '_'"
        )
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidMetadata(f"metadata field {name!r}: integer out of the 64-bit range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidMetadata(f"metadata field {name!r}: {value!r} is not a finite number")
    elif isinstance(value, str):
        _check_metadata_text(name, value)
    else:
        kind = "null" if value is None else type(value).__name__
        raise InvalidMetadata(f"metadata field {name!r}: a {kind}; values are strings, numbers or booleans")


def _check_metadata_text(name: str, value: str) -> None:
    size = utf8_size(value)
    if size is None:
        raise InvalidMetadata(f"metadata field {name!r}: text that is not valid UTF-8")
    if size > MAX_METADATA_STRING_BYTES:
        raise InvalidMetadata(
            f"metadata field {name!r}: {size} bytes of text; the limit is {MAX_METADATA_STRING_BYTES}"
        )


def utf8_size(text: str) -> int | None:
    """The bytes of `text` in UTF-8, or None when it cannot be encoded (it holds a lone surrogate)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def same_metadata(a: Mapping[str, Scalar], b: Mapping[str, Scalar]) -> bool:
    """Whether two metadata hold the same fields and values, of the same types (1, 1.0 and True differ)."""
    return metadata_json(a) == metadata_json(b)
