"""Deterministic toy embeddings: texts that share words are closer (cosine) than texts that don't.

Each lower-cased word gets a pseudo-random vector derived from a stable hash (SHAKE-256 of the
word, so the same on every run and machine, unlike `hash()`); a text's vector is the normalised
sum of its words' vectors. Random vectors in a few dozen dimensions are nearly orthogonal, so
the cosine of two texts grows with the share of words they have in common — enough for testing
semantic caches and memory without a model.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import re
import struct
from collections.abc import Sequence

_WORD = re.compile(r"\w+")
_SCALE = 1.0 / 32768.0


def words(text: str) -> list[str]:
    """The lower-cased words of `text`, as the embedding sees them."""
    return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=65536)
def word_vector(word: str, dim: int) -> tuple[float, ...]:
    """A fixed pseudo-random vector for `word` (components uniform in [-1, 1))."""
    digest = hashlib.shake_256(word.encode("utf-8")).digest(2 * dim)
    return tuple(v * _SCALE for v in struct.unpack(f"<{dim}h", digest))


def embed(text: str, dim: int) -> list[float]:
    """The unit vector of `text` in `dim` dimensions (a text without words gets a fixed one)."""
    found = words(text) or [""]
    total = [0.0] * dim
    for word in found:
        for i, value in enumerate(word_vector(word, dim)):
            total[i] += value
    norm = math.sqrt(sum(v * v for v in total))
    if norm == 0.0:  # only if words cancel out exactly; keep the answer a unit vector
        return [1.0] + [0.0] * (dim - 1)
    return [v / norm for v in total]


def embed_tokens(tokens: Sequence[int], dim: int) -> list[float]:
    """Token-id input: each id counts as a word of its own."""
    return embed(" ".join(f"t{token}" for token in tokens), dim)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def to_base64(vector: Sequence[float]) -> str:
    """OpenAI's `encoding_format: base64`: little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
