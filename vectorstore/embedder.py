"""Embedding behind one function that takes a list of texts: the Embedder protocol and its OpenAI form."""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import openai

from vectorstore.chunks import Chunker, openai_tokens
from vectorstore.errors import EmbeddingRejected, EmbeddingUnavailable, VectorStoreError
from vectorstore.index import Vectors
from vectorstore.observer import NO_OBSERVER, Observer

__all__ = [
    "MAX_INPUTS_PER_REQUEST",
    "MAX_INPUT_TOKENS",
    "MAX_TOKENS_PER_REQUEST",
    "Embedder",
    "OpenAIEmbedder",
    "redact",
    "request_groups",
    "retry_after_ms",
]

#: The most inputs an OpenAI embeddings request may carry.
MAX_INPUTS_PER_REQUEST = 2048
#: The most tokens a request may carry. A token is at least one byte of UTF-8, so bounding a
#: request's bytes by this bounds its tokens, with no tokenizer to download.
MAX_TOKENS_PER_REQUEST = 300_000
#: The most tokens one input may have (OpenAI's embedding models take 8,192; one is kept spare).
MAX_INPUT_TOKENS = 8191


class Embedder(Protocol):
    """Turns texts into vectors, one per text, in order."""

    @property
    def model(self) -> str: ...

    @property
    def dimensions(self) -> int | None:
        """The vector length when known before the first call."""
        ...

    @property
    def chunker(self) -> Chunker:
        """Splits a text into chunks the model takes whole."""
        ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """One float32 row per text, in order."""
        ...


class OpenAIEmbedder:
    """Embeddings from any OpenAI-compatible server through the openai SDK.

    The SDK's own retries are off: retries live in one place, the worker's retry policy, which
    reads `EmbeddingUnavailable.retry_after_ms`. Vectors are asked for as base64 and decoded
    straight into float32 arrays: turning 1,536 floats of JSON into Python floats cost about
    6.6 ms of CPU per vector.
    """

    def __init__(
        self,
        *,
        api_key: str,
        model: str,
        dimensions: int | None = None,
        base_url: str | None = None,
        timeout_ms: int = 30_000,
        max_input_tokens: int = MAX_INPUT_TOKENS,
        observer: Observer = NO_OBSERVER,
    ) -> None:
        self._model = model
        self._chunker = Chunker(openai_tokens(), max_tokens=max_input_tokens)
        self._observer = observer
        self._dimensions = dimensions
        self._secret = api_key
        self._client = openai.OpenAI(
            api_key=api_key, base_url=base_url, timeout=timeout_ms / 1000, max_retries=0
        )

    @property
    def model(self) -> str:
        return self._model

    @property
    def dimensions(self) -> int | None:
        return self._dimensions

    @property
    def chunker(self) -> Chunker:
        """Chunks of at most `max_input_tokens` tokens of cl100k_base, OpenAI's embedding models' encoding."""
        return self._chunker

    def close(self) -> None:
        """Close the SDK's HTTP connections."""
        self._client.close()

    def embed(self, texts: Sequence[str]) -> Vectors:
        parts = [self._request(group) for group in request_groups(texts)]
        return np.concatenate(parts) if parts else np.zeros((0, self._dimensions or 0), np.float32)

    def _request(self, texts: list[str]) -> Vectors:
        try:
            vectors, tokens = self._send(texts)
        except VectorStoreError as error:
            self._observer.embedding_request("openai", len(texts), None, error)
            raise
        self._observer.embedding_request("openai", len(texts), tokens)
        return vectors

    def _send(self, texts: list[str]) -> tuple[Vectors, int | None]:
        dimensions: int | openai.Omit = self._dimensions if self._dimensions else openai.omit
        try:
            raw = self._client.embeddings.with_raw_response.create(
                model=self._model, input=texts, encoding_format="base64", dimensions=dimensions
            )
        # `from None`: the SDK's error holds the server's unredacted body; a logged traceback would show it.
        except openai.APIStatusError as err:
            raise _translate_status(err, self._secret) from None
        except (openai.APITimeoutError, openai.APIConnectionError) as err:
            raise EmbeddingUnavailable(f"embedding server unreachable: {type(err).__name__}") from None
        return _vectors(raw.http_response.content, len(texts))


def request_groups(texts: Sequence[str]) -> list[list[str]]:
    """Split texts, in order, into requests within the input and token limits of one request."""
    groups: list[list[str]] = []
    size = 0
    for text in texts:
        length = len(text.encode("utf-8"))
        if not groups or len(groups[-1]) >= MAX_INPUTS_PER_REQUEST or size + length > MAX_TOKENS_PER_REQUEST:
            groups.append([])
            size = 0
        groups[-1].append(text)
        size += length
    return groups


def _vectors(body: bytes, expected: int) -> tuple[Vectors, int | None]:
    """The rows of an embeddings answer, in input order, and its prompt tokens.

    Anything malformed is a transient failure.
    """
    try:
        answer = json.loads(body)
        data = _answer_data(answer)
        ordered = sorted(data, key=lambda item: int(item["index"]))
        rows = [_row(item["embedding"]) for item in ordered]
        if len(rows) != expected:
            raise EmbeddingUnavailable(f"embedding server returned {len(rows)} vectors for {expected} texts")
        return (np.stack(rows) if rows else np.zeros((0, 0), np.float32)), _prompt_tokens(answer)
    except (AttributeError, KeyError, TypeError, ValueError, binascii.Error) as err:
        raise EmbeddingUnavailable(
            f"embedding server answered 200 with no usable embedding list ({type(err).__name__})"
        ) from None


def _answer_data(answer: Any) -> list[Any]:
    data = answer.get("data")
    if not isinstance(data, list):
        raise TypeError("no data list")
    return data


def _prompt_tokens(answer: Any) -> int | None:
    """The answer's `usage.prompt_tokens`, or None when the server did not report a count."""
    usage = answer.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0 else None


def _row(embedding: Any) -> Vectors:
    if isinstance(embedding, str):  # base64 of little-endian float32
        return np.frombuffer(base64.b64decode(embedding, validate=True), dtype="<f4").astype(np.float32)
    return np.asarray(embedding, dtype=np.float32)  # a server that ignored encoding_format


def _translate_status(err: openai.APIStatusError, secret: str) -> Exception:
    status = err.status_code
    reason = redact(f"embedding server answered {status}: {_short_message(err)}", secret)
    if status == 429 or status >= 500 or status == 408:
        return EmbeddingUnavailable(reason, retry_after_ms=retry_after_ms(err.response.headers))
    return EmbeddingRejected(reason, status=status)


def _short_message(err: openai.APIStatusError) -> str:
    body = err.body
    if isinstance(body, dict):
        detail = body.get("error", body)
        if isinstance(detail, dict) and isinstance(detail.get("message"), str):
            return str(detail["message"])[:300]
    return type(err).__name__


_KEY_LIKE = re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_*.\-]{3,}")


def redact(text: str, secret: str) -> str:
    """Remove the API key, and anything shaped like one (servers echo masked keys), from a message."""
    if secret:
        text = text.replace(secret, "***")
    return _KEY_LIKE.sub(r"\1-***", text)


def _number(text: str | None) -> float | None:
    """A finite number of at most a day's milliseconds, or None for anything else."""
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return min(value, 86_400_000.0) if math.isfinite(value) else None


def retry_after_ms(headers: Mapping[str, str]) -> int | None:
    """The wait response headers ask for, from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    if (asked_ms := _number(lowered.get("retry-after-ms"))) is not None:
        return max(0, int(asked_ms))
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    if (asked_s := _number(raw)) is not None:
        return max(0, int(asked_s * 1000))
    try:
        parsed = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0, int((parsed.timestamp() - time.time()) * 1000))
