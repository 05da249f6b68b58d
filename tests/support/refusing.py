"""An embedder whose marked texts reach the embedding server as an input it refuses."""

from __future__ import annotations

from collections.abc import Sequence

from vectorstore import Embedder
from vectorstore.chunks import Chunker
from vectorstore.index import Vectors

__all__ = ["REFUSED", "RefusingEmbedder"]

#: A text the embedding server cannot take (see `RefusingEmbedder`).
REFUSED = "<<refused by the embedding server>>"


class RefusingEmbedder:
    """The real OpenAI embedder, except that a text holding REFUSED reaches the server as "".

    The test server refuses a request holding an empty input with a 400 about `$.input`, as OpenAI
    does; Memories itself never sends one, so this is how a batch meets an input the server refuses.
    """

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner

    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def dimensions(self) -> int | None:
        return self.inner.dimensions

    @property
    def chunker(self) -> Chunker:
        return self.inner.chunker

    def embed(self, texts: Sequence[str]) -> Vectors:
        return self.inner.embed(["" if REFUSED in text else text for text in texts])
