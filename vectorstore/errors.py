"""The errors of vectorstore; foreign (openai, chromadb) errors are translated at the boundary."""

from __future__ import annotations

from kvstore.errors import MemsyncError

__all__ = [
    "EmbeddingRejected",
    "EmbeddingUnavailable",
    "IndexUnavailable",
    "InvalidQuery",
    "LocalModelMissing",
    "VectorStoreError",
]


class VectorStoreError(MemsyncError):
    """Raised when vectorstore cannot do what it was asked; the root of this package's errors."""


class EmbeddingUnavailable(VectorStoreError):
    """Raised when the embedding server is unreachable, times out, rate-limits (429) or fails (5xx)."""

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class EmbeddingRejected(VectorStoreError):
    """Raised when the embedding server refuses the request for good (400, 401, 403, 404, 422)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def about_the_input(self) -> bool:
        """Whether the refusal is about what was sent (400, 422), not the key or the model."""
        return self.status in (400, 413, 422)


class LocalModelMissing(VectorStoreError):
    """Raised when the offline model, or a tokenizer's data, is asked for but its package is missing."""


class IndexUnavailable(VectorStoreError):
    """Raised when the Chroma server cannot be reached or fails a request."""


class InvalidQuery(VectorStoreError):
    """Raised when a search's query text, k or filter is unusable."""
