"""Texts per second of the local model, padded to each batch's longest input and to a fixed 256 tokens.

Both runs use one onnxruntime session, the same batching (32 texts, sorted by length) and the same
pooling; only the tokenizer's padding differs. Fixed 256 is what Chroma's bundled ONNX function does.
Run: python bench/bench_local_model.py
"""

from __future__ import annotations

import copy
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from vectorstore.local_model import MAX_TOKENS, LocalMiniLM, tokenizer_path

TEXTS = 500
MIN_ROUNDS = 2
MIN_SECONDS = 10.0
SUBJECTS = [
    "The user",
    "My sister",
    "Our team",
    "The new manager",
    "A customer",
    "The doctor",
    "Everyone here",
]
VERBS = ["prefers", "asked about", "forgot", "wants to book", "complained about", "recommended", "likes"]
OBJECTS = [
    "a dark theme",
    "the quarterly report",
    "flights to Lisbon",
    "vegetarian restaurants",
    "the blue running shoes",
    "a quiet hotel room",
    "jazz concerts",
    "the Python course",
]
TAILS = [
    "on weekday mornings",
    "before the end of the month",
    "near the old harbour",
    "when it rains",
    "for the whole family",
    "without any sugar",
    "at least twice a week",
    "after the long meeting with finance",
]


def sentences(count: int, seed: int = 7) -> list[str]:
    """Varied English sentences of 5 to 15 words, the same ones on every run."""
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(count)]


def _sentence(rng: random.Random) -> str:
    words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}".split()
    target = rng.randint(5, 15)
    for tail in rng.sample(TAILS, len(TAILS)):
        if len(words) + len(tail.split()) > target:
            break
        words += tail.split()
    return " ".join(words) + "."


def padded_to_fixed_length(model: LocalMiniLM) -> LocalMiniLM:
    """A copy of the model sharing its session, whose tokenizer pads every input to 256 tokens."""
    tokenizer = Tokenizer.from_file(str(tokenizer_path()))
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    tokenizer.enable_padding(length=MAX_TOKENS)
    fixed = copy.copy(model)
    fixed._loaded = (tokenizer, model._model()[1])  # the one difference between the two runs
    return fixed


def texts_per_second(embed: Callable[[Sequence[str]], Any], texts: list[str]) -> float:
    """The best of timed runs (at least 2, and at least 10 s of them), after one warm-up batch.

    The best run, not the mean: the machine is shared, and the best is the least disturbed.
    """
    embed(texts[:32])
    timings: list[float] = []
    while len(timings) < MIN_ROUNDS or sum(timings) < MIN_SECONDS:
        start = time.perf_counter()
        embed(texts)
        timings.append(time.perf_counter() - start)
    return len(texts) / min(timings)


def largest_difference(a: Any, b: Any) -> float:
    return float(abs(np.asarray(a) - np.asarray(b)).max())


def main() -> None:
    texts = sentences(TEXTS)
    longest = LocalMiniLM()
    fixed = padded_to_fixed_length(longest)
    print(f"{TEXTS} sentences of 5-15 words, batches of 32, {os.cpu_count()} cores, {platform.machine()}")
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    longest_rate = texts_per_second(longest.embed, texts)
    print(f"padded to the longest input: {longest_rate:8.1f} texts/s")
    fixed_rate = texts_per_second(fixed.embed, texts)
    print(f"padded to {MAX_TOKENS} tokens:       {fixed_rate:8.1f} texts/s")
    print(f"ratio: {longest_rate / fixed_rate:.1f}x")
    sample = texts[:64]
    difference = largest_difference(longest.embed(sample), fixed.embed(sample))
    print(f"largest difference between the two runs' vectors: {difference:.1e}")


if __name__ == "__main__":
    main()
