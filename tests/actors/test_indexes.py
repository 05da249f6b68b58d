"""Which embedder a process makes for the index a record names, from its own settings."""

from __future__ import annotations

import pytest

from actors.indexes import embedder_for, own_spec
from settings import Settings
from vectorstore.active import IndexSpec, ReindexError
from vectorstore.embedder import OpenAIEmbedder


def test_with_a_key_any_model_is_another_model_name_on_the_same_server() -> None:
    settings = Settings(
        EMBEDDING_MODEL="model-b", EMBEDDING_DIMENSIONS=256
    )  # the key comes from the tests' environment
    assert own_spec(settings) == IndexSpec("model-b", 256)
    embedder = embedder_for(settings, IndexSpec("model-a", None))
    assert isinstance(embedder, OpenAIEmbedder)
    assert (embedder.model, embedder.dimensions) == ("model-a", None)


def test_without_a_key_only_the_offline_model_can_be_embedded_with() -> None:
    settings = Settings(MEMSYNC_EMBEDDER="local")
    assert own_spec(settings) == IndexSpec("all-MiniLM-L6-v2", 384)
    with pytest.raises(ReindexError, match=r"^the index in use was made with model-a \(native dimensions\)"):
        embedder_for(settings, IndexSpec("model-a", None))
