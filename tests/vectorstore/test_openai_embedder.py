"""OpenAIEmbedder through the real openai SDK against the local embeddings test server."""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from tests.support.embedding_server import (
    DISCONNECT,
    MALFORMED,
    TIMEOUT,
    TRUNCATED,
    EmbeddingServer,
    EmbeddingServerFactory,
    mask_key,
    vector_for,
)
from vectorstore.embedder import MAX_INPUTS_PER_REQUEST, OpenAIEmbedder, redact, retry_after_ms
from vectorstore.errors import EmbeddingRejected, EmbeddingUnavailable, VectorStoreError

pytestmark = pytest.mark.timeout(30)

SENTINEL = "sk-test-SENTINEL-4242-abcdef"
MODEL = "text-embedding-3-small"


class EmbedderMaker:
    """Builds embedders against a test server, and closes their SDK clients at the end of the test.

    Closing matters: an error's traceback keeps the embedder in a reference cycle, and when the garbage
    collector finalises the socket before the SDK client, Python warns of an unclosed socket.
    """

    def __init__(self) -> None:
        self._made: list[OpenAIEmbedder] = []

    def __call__(
        self,
        server: EmbeddingServer,
        *,
        dimensions: int | None = None,
        timeout_ms: int = 5_000,
        api_key: str = SENTINEL,
    ) -> OpenAIEmbedder:
        embedder = OpenAIEmbedder(
            api_key=api_key,
            model=MODEL,
            dimensions=dimensions,
            base_url=server.base_url,
            timeout_ms=timeout_ms,
        )
        self._made.append(embedder)
        return embedder

    def close(self) -> None:
        # OpenAIEmbedder has no close() of its own yet.
        for embedder in self._made:
            embedder._client.close()


@pytest.fixture
def embedder_for() -> Iterator[EmbedderMaker]:
    """Makes OpenAIEmbedders for a test server; their connections are closed after the test."""
    maker = EmbedderMaker()
    yield maker
    maker.close()


def error_from(embedder: OpenAIEmbedder, texts: Sequence[str] = ("hello",)) -> VectorStoreError:
    with pytest.raises(VectorStoreError) as caught:
        embedder.embed(texts)
    return caught.value


def visible_text(err: BaseException) -> str:
    """Everything an error shows of itself: its message, its repr and its args."""
    return " | ".join([str(err), repr(err), *map(str, err.args)])


def _same_vectors(vectors: Any, texts: list[str]) -> bool:
    """Whether `vectors` are the test server's vectors of `texts`, in order, as float32 carries them."""
    expected = np.array([vector_for(text) for text in texts], dtype=np.float32)
    return bool(vectors.shape == expected.shape and np.allclose(vectors, expected, atol=1e-7))


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))


# --- vectors and requests ------------------------------------------------------------------------


def test_each_text_gets_the_servers_vector_in_input_order(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    texts = ["the cat sat", "stock market news", "a cat"]
    assert _same_vectors(embedder_for(embedding_server).embed(texts), texts)


def test_vectors_keep_input_order_when_the_server_lists_them_out_of_order(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedding_server.reverse_data = True
    texts = ["first", "second", "third"]
    assert _same_vectors(embedder_for(embedding_server).embed(texts), texts)


def test_texts_that_share_words_come_back_closer_than_texts_that_share_none(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    cat_sat, a_cat, market = embedder_for(embedding_server).embed(["the cat sat", "a cat", "stock market"])
    assert cosine(cat_sat, a_cat) > cosine(cat_sat, market)


def test_a_batch_is_one_request_for_base64_vectors_of_the_model(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedder_for(embedding_server).embed(["one", "two", "three"])
    [request] = embedding_server.embedding_requests
    assert (request.inputs, request.model, request.encoding_format, request.status) == (
        3,
        MODEL,
        "base64",
        200,
    )


def test_dimensions_is_sent_when_set(embedding_server: EmbeddingServer, embedder_for: EmbedderMaker) -> None:
    [vector] = embedder_for(embedding_server, dimensions=32).embed(["hello"])
    assert embedding_server.embedding_requests[0].dimensions == 32
    assert vector.tolist() == pytest.approx(vector_for("hello", 32), abs=1e-6)


def test_dimensions_is_not_sent_when_unset(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    [vector] = embedder_for(embedding_server).embed(["hello"])
    assert embedding_server.embedding_requests[0].dimensions is None
    assert len(vector) == embedding_server.default_dimensions


def test_more_than_2048_texts_are_split_into_requests_of_at_most_2048(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    texts = [f"memory number {i}" for i in range(MAX_INPUTS_PER_REQUEST + 1)]
    vectors = embedder_for(embedding_server).embed(texts)
    assert [request.inputs for request in embedding_server.embedding_requests] == [2048, 1]
    assert _same_vectors(vectors, texts)


def test_no_texts_make_no_request(embedding_server: EmbeddingServer, embedder_for: EmbedderMaker) -> None:
    assert len(embedder_for(embedding_server).embed([])) == 0
    assert embedding_server.requests == []


def test_calls_reuse_one_kept_alive_connection(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedder = embedder_for(embedding_server)
    for text in ("one", "two", "three"):
        embedder.embed([text])
    assert len({request.client_port for request in embedding_server.requests}) == 1


def test_a_server_that_requires_the_key_accepts_the_right_one(
    embedding_server_factory: EmbeddingServerFactory, embedder_for: EmbedderMaker
) -> None:
    server = embedding_server_factory(api_key=SENTINEL)
    assert _same_vectors(embedder_for(server).embed(["hello"]), ["hello"])


# --- transient failures: EmbeddingUnavailable ----------------------------------------------------


def test_a_429_with_retry_after_in_seconds_is_unavailable_with_that_wait_in_ms(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(429, retry_after_s=2)
    err = error_from(embedder_for(embedding_server))
    assert isinstance(err, EmbeddingUnavailable)
    assert err.retry_after_ms == 2000


def test_a_429_with_retry_after_ms_is_unavailable_with_that_wait(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(429, retry_after_ms=1500)
    err = error_from(embedder_for(embedding_server))
    assert isinstance(err, EmbeddingUnavailable)
    assert err.retry_after_ms == 1500


def test_retry_after_ms_wins_over_retry_after_when_both_are_sent(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(429, retry_after_s=2, retry_after_ms=250)
    err = error_from(embedder_for(embedding_server))
    assert isinstance(err, EmbeddingUnavailable)
    assert err.retry_after_ms == 250


def test_a_429_without_retry_after_is_unavailable_with_no_wait(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(429)
    err = error_from(embedder_for(embedding_server))
    assert isinstance(err, EmbeddingUnavailable)
    assert err.retry_after_ms is None


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_a_server_error_is_unavailable_after_exactly_one_request(
    embedding_server: EmbeddingServer, status: int, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(status)
    assert isinstance(error_from(embedder_for(embedding_server)), EmbeddingUnavailable)
    assert [request.status for request in embedding_server.requests] == [status]


def test_a_timeout_is_unavailable_within_the_configured_timeout(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(TIMEOUT)
    started = time.monotonic()
    err = error_from(embedder_for(embedding_server, timeout_ms=300))
    elapsed_s = time.monotonic() - started
    assert isinstance(err, EmbeddingUnavailable)
    assert 0.25 <= elapsed_s < 1.3
    assert [request.status for request in embedding_server.requests] == [None]


def test_a_dropped_connection_is_unavailable_after_exactly_one_request(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(DISCONNECT)
    assert isinstance(error_from(embedder_for(embedding_server)), EmbeddingUnavailable)
    assert len(embedding_server.requests) == 1


def test_an_unreachable_server_is_unavailable(
    embedding_server_factory: EmbeddingServerFactory, embedder_for: EmbedderMaker
) -> None:
    server = embedding_server_factory()
    embedder = embedder_for(server)
    server.stop()
    assert isinstance(error_from(embedder), EmbeddingUnavailable)


def test_an_answer_missing_a_vector_is_unavailable(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(TRUNCATED)
    assert isinstance(error_from(embedder_for(embedding_server), ["one", "two"]), EmbeddingUnavailable)


def test_an_answer_that_is_not_json_is_unavailable(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(MALFORMED)
    assert isinstance(error_from(embedder_for(embedding_server)), EmbeddingUnavailable)


def test_a_retry_after_too_large_for_an_int_is_still_unavailable(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(429, retry_after_s=math.inf)
    assert isinstance(error_from(embedder_for(embedding_server)), EmbeddingUnavailable)


# --- permanent failures: EmbeddingRejected -------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_a_refusal_is_rejected_after_exactly_one_request(
    embedding_server: EmbeddingServer, status: int, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(status)
    assert isinstance(error_from(embedder_for(embedding_server)), EmbeddingRejected)
    assert [request.status for request in embedding_server.requests] == [status]


def test_an_empty_text_is_rejected(embedding_server: EmbeddingServer, embedder_for: EmbedderMaker) -> None:
    err = error_from(embedder_for(embedding_server), ["fine", ""])
    assert isinstance(err, EmbeddingRejected)
    assert "400" in str(err)


def test_a_wrong_key_is_rejected(
    embedding_server_factory: EmbeddingServerFactory, embedder_for: EmbedderMaker
) -> None:
    server = embedding_server_factory(api_key="sk-the-right-key-0000")
    err = error_from(embedder_for(server))
    assert isinstance(err, EmbeddingRejected)
    assert "401" in str(err)


def test_the_error_names_the_servers_reason(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(404, message="The model `nope` does not exist.")
    assert "The model `nope` does not exist." in str(error_from(embedder_for(embedding_server)))


# --- the key never shows ---------------------------------------------------------------------------


def test_a_wrong_key_echoed_masked_by_the_server_is_not_in_the_error(
    embedding_server_factory: EmbeddingServerFactory, embedder_for: EmbedderMaker
) -> None:
    server = embedding_server_factory(api_key="sk-the-right-key-0000")
    shown = visible_text(error_from(embedder_for(server)))
    assert SENTINEL not in shown
    assert mask_key(SENTINEL) not in shown
    assert "Incorrect API key provided" in shown


@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 500, 503])
def test_a_full_key_echoed_in_an_error_message_is_not_in_the_error(
    embedding_server: EmbeddingServer, status: int, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(status, message=f"Incorrect API key provided: {SENTINEL}.")
    shown = visible_text(error_from(embedder_for(embedding_server)))
    assert SENTINEL not in shown
    assert "SENTINEL" not in shown


def test_a_timeout_error_does_not_show_the_key(
    embedding_server: EmbeddingServer, embedder_for: EmbedderMaker
) -> None:
    embedding_server.fail_next(TIMEOUT)
    assert "SENTINEL" not in visible_text(error_from(embedder_for(embedding_server, timeout_ms=200)))


@pytest.mark.parametrize("echo", [SENTINEL, mask_key(SENTINEL)], ids=["full", "masked"])
def test_a_key_echoed_by_the_server_does_not_reach_a_logged_traceback(
    embedding_server: EmbeddingServer,
    caplog: pytest.LogCaptureFixture,
    echo: str,
    embedder_for: EmbedderMaker,
) -> None:
    embedding_server.fail_next(401, message=f"Incorrect API key provided: {echo}.")
    err = error_from(embedder_for(embedding_server))
    logging.getLogger("memsync.test").error("embedding failed", exc_info=err)
    assert echo not in caplog.text


# --- redact() ------------------------------------------------------------------------------------


def test_redact_removes_the_key_wherever_it_appears() -> None:
    text = redact(f"key={SENTINEL}; again {SENTINEL}", SENTINEL)
    assert SENTINEL not in text
    assert "SENTINEL" not in text


def test_redact_removes_a_key_that_is_not_shaped_like_one() -> None:
    secret = "0123456789abcdef0123456789abcdef"
    assert redact(f"bad key {secret}", secret) == "bad key ***"


@pytest.mark.parametrize("echo", ["sk-ab***yz", "sk-proj-********abcd", "pk-live-1234", "rk-abc.def"])
def test_redact_masks_anything_shaped_like_a_key(echo: str) -> None:
    text = redact(f"Incorrect API key provided: {echo}.", secret="")
    assert echo not in text
    assert text.startswith("Incorrect API key provided: ")


@pytest.mark.parametrize("text", ["a task-force met", "risk-free", "model not found", "sk-"])
def test_redact_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text, SENTINEL) == text


# --- retry_after_ms() ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "2"}, 2000),
        ({"retry-after": "0.5"}, 500),
        ({"retry-after-ms": "1500"}, 1500),
        ({"retry-after-ms": "250.7"}, 250),
        ({"retry-after-ms": "250", "retry-after": "2"}, 250),
        ({"retry-after-ms": "soon", "retry-after": "2"}, 2000),
        ({"retry-after": "-3"}, 0),
        ({"retry-after": "whenever"}, None),
        ({}, None),
    ],
)
def test_retry_after_ms_reads_the_wait_in_milliseconds(headers: dict[str, str], expected: int | None) -> None:
    assert retry_after_ms(headers) == expected


def test_retry_after_ms_reads_an_http_date_as_the_wait_until_then() -> None:
    then = email.utils.formatdate(time.time() + 30, usegmt=True)
    wait_ms = retry_after_ms({"retry-after": then})
    assert wait_ms is not None
    assert 28_000 <= wait_ms <= 30_000


def test_retry_after_ms_reads_an_http_date_in_the_past_as_no_wait() -> None:
    assert retry_after_ms({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0
