"""What vectorstore reports as it works, for metrics: an interface whose methods do nothing by default.

vectorstore never imports a metrics library: the wiring passes an Observer that counts (memsync's
is `actors.metrics.Metrics`). Calls come from any thread, must be cheap, and carry counts only:
never a key, a namespace or a value.
"""

from __future__ import annotations

__all__ = ["NO_OBSERVER", "Observer"]


class Observer:
    """Hears of embedding requests, embeddings skipped and stale search hits; override what you count."""

    def embedding_request(
        self, embedder: str, inputs: int, tokens: int | None, error: Exception | None = None
    ) -> None:
        """One request of `inputs` texts to `embedder` ("openai" or "local") answered, or failed with `error`.

        `tokens`: what the server reported it read (its `usage.prompt_tokens`), or None when it said
        nothing or the request failed.
        """

    def embeddings_skipped(self, inputs: int) -> None:
        """`inputs` texts were not embedded: the index already holds a vector of the same text."""

    def stale_hits_dropped(self, hits: int) -> None:
        """A search dropped `hits` index entries whose key is gone or holds a newer version."""


#: The observer that counts nothing: the default wherever one is taken.
NO_OBSERVER = Observer()
