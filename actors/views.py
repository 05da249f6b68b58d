"""How a memory looks in every `--json` output of the `memsync` command, defined once.

A memory is `{"namespace", "key", "version", "value", "embed", "deleted", "updated_at_ms",
"metadata"}`, with `value` as a JSON value (null for a deleted version); a search hit adds `score`,
and `chunk` and `span` (the matched chunk's number and character offsets in the text, null when the
text is one chunk). An export line is the part of it that `import` reads back: `{"key", "value",
"embed", "namespace"}` and `"metadata"` when the memory has any.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvstore import Record
    from vectorstore import Hit

__all__ = ["SCORE_DECIMALS", "export_item", "hit_view", "memory_view", "score_text"]

#: Decimals a search score is rounded to, in JSON and in text alike.
SCORE_DECIMALS = 4


def memory_view(record: Record) -> dict[str, Any]:
    """One version of a key, as `get --json` prints it."""
    return _memory(
        record.namespace,
        record.key,
        record.version,
        record.value,
        embed=record.embed,
        deleted=record.deleted,
        updated_at_ms=record.at_ms,
        metadata=record.metadata,
    )


def hit_view(hit: Hit) -> dict[str, Any]:
    """A search hit: the memory (always a current, embedded value) and its rounded score."""
    view = _memory(
        hit.namespace,
        hit.key,
        hit.version,
        hit.value,
        embed=True,
        deleted=False,
        updated_at_ms=hit.updated_at_ms,
        metadata=hit.metadata,
    )
    span = list(hit.span) if hit.span is not None else None
    return {**view, "score": round(hit.score, SCORE_DECIMALS), "chunk": hit.chunk, "span": span}


def export_item(record: Record) -> dict[str, Any]:
    """A current memory as an `import` item, the line `export` writes."""
    item = {"key": record.key, "value": record.value, "embed": record.embed, "namespace": record.namespace}
    return {**item, "metadata": record.metadata} if record.metadata_json else item


def score_text(score: float) -> str:
    """A score as the text output prints it, with the decimals of the JSON one."""
    return f"{score:.{SCORE_DECIMALS}f}"


def _memory(
    namespace: str,
    key: str,
    version: int,
    value: Any,
    *,
    embed: bool,
    deleted: bool,
    updated_at_ms: int,
    metadata: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "namespace": namespace,
        "key": key,
        "version": version,
        "value": value,
        "embed": embed,
        "deleted": deleted,
        "updated_at_ms": updated_at_ms,
        "metadata": dict(metadata),
    }
