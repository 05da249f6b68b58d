"""The active index of this process, built from the settings: an embedder for whichever model it names.

The settings' EMBEDDING_MODEL and EMBEDDING_DIMENSIONS are what `memsync reindex` moves to, and the
index of an installation that has none recorded yet. Searches and syncs follow the index recorded
in Redis (see `vectorstore.active`), which may name another model: with an OpenAI-compatible server
that is only another model name; the offline model is the one model a process without a key has.
"""

from __future__ import annotations

from collections.abc import Callable

from actors import metrics
from kvstore import MemoryStore
from settings import Settings
from vectorstore.active import ActiveIndexes, IndexSpec, ReindexError
from vectorstore.embedder import Embedder, OpenAIEmbedder
from vectorstore.index import chroma_client

__all__ = ["active_indexes", "embedder_for", "own_spec"]


def own_spec(settings: Settings) -> IndexSpec:
    """The index this process's settings name: the OpenAI-compatible model, or the offline one."""
    if settings.uses_openai():
        return IndexSpec(settings.embedding_model, settings.embedding_dimensions)
    from vectorstore.local_model import DIMENSIONS, MODEL

    return IndexSpec(MODEL, DIMENSIONS)


def embedder_for(settings: Settings, spec: IndexSpec) -> Embedder:
    """An embedder of `spec`'s model and dimensions, with this process's server and key."""
    from vectorstore.local_model import DIMENSIONS, MODEL, LocalMiniLM

    offline = IndexSpec(MODEL, DIMENSIONS)
    if settings.uses_openai() and (spec != offline or spec == own_spec(settings)):
        return _openai(settings, spec)
    if spec == offline:
        return LocalMiniLM(observer=metrics.observer(settings))
    raise ReindexError(
        f"the index in use was made with {spec}, which needs OPENAI_API_KEY (and OPENAI_BASE_URL) here too"
    )


def _openai(settings: Settings, spec: IndexSpec) -> OpenAIEmbedder:
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
    return OpenAIEmbedder(
        api_key=key or "unused",
        model=spec.model,
        dimensions=spec.dimensions,
        base_url=settings.openai_base_url,
        timeout_ms=settings.embedding_timeout_ms,
        max_input_tokens=settings.embedding_max_tokens,
        observer=metrics.observer(settings),
    )


def active_indexes(
    settings: Settings,
    store: MemoryStore,
    chroma_url: str | None,
    make_embedder: Callable[[IndexSpec], Embedder] | None = None,
) -> ActiveIndexes:
    """This process's view of the active index, over the settings' Chroma."""
    client = chroma_client(chroma_url, str(settings.data_dir / "chroma"))
    return ActiveIndexes(
        store,
        client,
        make_embedder or (lambda spec: embedder_for(settings, spec)),
        default=own_spec(settings),
        prefix=settings.prefix,
        shards=settings.index_shards,
        check_ms=settings.index_check_ms,
        search_retry_budget_ms=settings.search_retry_budget_ms,
        observer=metrics.observer(settings),
    )
