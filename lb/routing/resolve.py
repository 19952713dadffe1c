"""Model resolution: turn the `model` a client sent into a model id some healthy node serves.

Clients either name a model exactly or send a sentinel such as ``"auto"`` meaning "whatever
is best".  Everything here is pure and deterministic (no I/O, no clocks, no randomness) so
every gateway process resolves the same request the same way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Literal

from lb.errors import ModelNotFound

__all__ = [
    "DEFAULT_SENTINELS",
    "ModelKind",
    "ModelNotFound",
    "is_embedding_model",
    "parameter_count",
    "parse_list",
    "resolve_model",
]

ModelKind = Literal["chat", "completion", "embedding"]

#: Default value of ``MODEL_SENTINELS``; ``LM_MODEL`` adds one more at configuration time.
DEFAULT_SENTINELS: tuple[str, ...] = ("auto", "default")

# How many model ids an error message lists before eliding the rest.
_MAX_LISTED = 20

# Immutable empty default for ``sizes``.
_NO_SIZES: Mapping[str, float] = MappingProxyType({})

_LIST_SPLIT = re.compile(r"[,;]")


def parse_list(text: str) -> tuple[str, ...]:
    """Split a comma- or semicolon-separated setting, stripping blanks and dropping empties."""
    return tuple(part for part in (p.strip() for p in _LIST_SPLIT.split(text)) if part)


# A size token: optional "<experts>x", a number, then a unit, standing alone between
# separators ("32k"/"128k" are context lengths, so there is no "k" unit).  The look-behinds
# reject digits glued to letters or following a decimal point, so "a3b" (active params of a
# MoE), "e4b", "q4" and version numbers such as "3.1" or "gpt-4" never count.
_SIZE_TOKEN = re.compile(
    r"(?<![a-z0-9])(?<!\d\.)(?:(?P<experts>\d+)x)?(?P<num>\d+(?:\.\d+)?)(?P<unit>[mbt])(?![a-z0-9])"
)
_UNIT_BILLIONS = {"m": 1e-3, "b": 1.0, "t": 1e3}


def parameter_count(model_id: str) -> float | None:
    """Parameter count in billions read from a model id, or None when it does not say.

    ``qwen3-8b`` -> 8, ``gemma3-270m`` -> 0.27, ``mixtral-8x7b`` -> 56, ``qwen3-30b-a3b`` -> 30.
    Billion-sized tokens win over ``m`` ones because ids like ``qwen2.5-7b-instruct-1m`` use
    ``m`` for a context length; among tokens of the same rank the first wins.
    """
    name = model_id.lower().rsplit("/", 1)[-1]
    best: float | None = None
    best_rank = -1
    for match in _SIZE_TOKEN.finditer(name):
        unit = match["unit"]
        value = float(match["num"]) * _UNIT_BILLIONS[unit]
        if match["experts"] is not None:
            value *= int(match["experts"])
        rank = 1 if unit in ("b", "t") else 0
        if rank > best_rank:
            best, best_rank = value, rank
    if best is None or best <= 0:
        return None
    return round(best, 6)


# Families of embedding models whose ids do not contain "embed".  Matched as whole
# separator-delimited tokens so "e5" never matches inside e.g. "qwen2.5".
_EMBEDDING_TOKENS = frozenset(
    {
        "bge",
        "e5",
        "gte",
        "minilm",
        "mpnet",
        "instructor",
        "sentence-t5",
        "simcse",
        "uae",
        "stella",
        "nv-embedqa",
        "paraphrase",
        "msmarco",
        "multi-qa",
        "labse",
        "contriever",
    }
)
_TOKEN_SPLIT = re.compile(r"[/_:.\-\s]+")


def is_embedding_model(model_id: str) -> bool:
    """Heuristic: does this id name an embedding model (which cannot chat or complete)?"""
    lowered = model_id.lower()
    if "embed" in lowered or "sentence-transformers/" in lowered:
        return True
    if "rerank" in lowered:
        return False  # bge-reranker & co. score pairs; they are not embedding endpoints.
    tokens = _TOKEN_SPLIT.split(lowered)
    if any(tok in _EMBEDDING_TOKENS for tok in tokens):
        return True
    # Multi-token family names ("sentence-t5", "multi-qa", "all-minilm" is covered by minilm).
    joined = "-".join(tokens)
    return any(f"-{family}-" in f"-{joined}-" for family in _EMBEDDING_TOKENS if "-" in family)


def _listing(ids: Iterable[str]) -> str:
    ordered = sorted(ids)
    if not ordered:
        return "none"
    shown = ", ".join(ordered[:_MAX_LISTED])
    more = len(ordered) - _MAX_LISTED
    return f"{shown} (and {more} more)" if more > 0 else shown


def _kind_matches(model_id: str, kind: ModelKind) -> bool:
    return is_embedding_model(model_id) == (kind == "embedding")


def resolve_model(
    requested: str,
    available: Mapping[str, int],
    *,
    kind: ModelKind,
    sentinels: Collection[str],
    preferred: Sequence[str] = (),
    prefer_small: bool = False,
    sizes: Mapping[str, float] = _NO_SIZES,
) -> str:
    """Resolve a requested model id to one in ``available``; raise ModelNotFound otherwise.

    ``available`` maps model ids to the number of healthy nodes serving them (entries with a
    count <= 0 are ignored).  An exact id that is available always resolves to itself, even
    if it is spelled like a sentinel, so a real model named "default" stays reachable.
    Ties are broken by id, so the answer never depends on the mapping's iteration order.
    """
    if available.get(requested, 0) > 0:  # the usual case, before building anything
        return requested
    live = {model: count for model, count in available.items() if count > 0}

    folded = requested.casefold()
    if folded not in {s.casefold() for s in sentinels}:
        matches = [model for model in live if model.casefold() == folded]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ModelNotFound(
                f"The model '{requested}' is ambiguous: it matches {_listing(matches)} "
                "case-insensitively; use the exact id.",
                requested=requested,
            )
        raise ModelNotFound(
            f"The model '{requested}' does not exist or no healthy node serves it. "
            f"Available models: {_listing(live)}.",
            requested=requested,
        )

    candidates = [model for model in live if _kind_matches(model, kind)]
    if not candidates:
        what = "embedding" if kind == "embedding" else kind
        raise ModelNotFound(
            f"No healthy node serves a {what} model to resolve '{requested}' to. "
            f"Available models: {_listing(live)}.",
            requested=requested,
        )
    if len(candidates) == 1:
        return candidates[0]

    folded_sizes = {name.casefold(): size for name, size in sizes.items()}

    def size_of(model: str) -> float | None:
        size = sizes.get(model)
        if size is None:
            size = folded_sizes.get(model.casefold())
        if size is None:
            return parameter_count(model)
        # A NaN or negative configured size would make the order depend on input order.
        return size if math.isfinite(size) and size >= 0 else None

    exact_rank = {name: i for i, name in reversed(list(enumerate(preferred)))}
    folded_rank = {name.casefold(): i for i, name in reversed(list(enumerate(preferred)))}
    unranked = len(preferred)

    def preference(model: str) -> tuple[int, int]:
        if model in exact_rank:
            return (exact_rank[model], 0)
        return (folded_rank.get(model.casefold(), unranked), 1)

    def sort_key(model: str) -> tuple[bool, float, tuple[int, int], int, str]:
        size = size_of(model) if prefer_small else None
        return (
            size is None,
            size if size is not None else 0.0,
            preference(model),
            -live[model],
            model,
        )

    return min(candidates, key=sort_key)
