"""Model resolution: parsing helpers, examples, and properties of resolve_model."""

from __future__ import annotations

import random
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.routing.resolve import (
    DEFAULT_SENTINELS,
    ModelKind,
    ModelNotFound,
    is_embedding_model,
    parameter_count,
    parse_list,
    resolve_model,
)

SENTINELS = DEFAULT_SENTINELS

# ---------------------------------------------------------------------------------- parse_list

# Modest example counts and no per-example deadline: fast and not flaky on a busy CI box.
FAST = settings(max_examples=50, deadline=None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("  ", ()),
        ("a", ("a",)),
        ("a,b", ("a", "b")),
        ("a;b", ("a", "b")),
        (" a ; b , c ", ("a", "b", "c")),
        ("a,,;b;", ("a", "b")),
        ("qwen3-8b;llama-3.1-70b", ("qwen3-8b", "llama-3.1-70b")),
    ],
)
def test_parse_list_examples(text: str, expected: tuple[str, ...]) -> None:
    assert parse_list(text) == expected


_items = st.lists(
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters=",;"))
    .map(str.strip)
    .filter(bool),
    max_size=6,
)


@FAST
@given(_items, st.lists(st.sampled_from([",", ";", " , ", ";;", ",  ;"]), min_size=6, max_size=6))
def test_parse_list_roundtrips_any_separators(items: list[str], seps: list[str]) -> None:
    text = "".join(item + sep for item, sep in zip(items, seps, strict=False))
    assert parse_list(text) == tuple(items)


# ----------------------------------------------------------------------------- parameter_count


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        ("qwen3-8b", 8.0),
        ("gemma3-270m", 0.27),
        ("llama-3.1-70B-instruct", 70.0),
        ("qwen2.5-1.5b", 1.5),
        ("qwen2.5-0.5b-instruct", 0.5),
        ("mistralai/mistral-small-3.2", None),
        ("mixtral-8x7b", 56.0),
        ("Mixtral-8x22B-Instruct-v0.1", 176.0),
        ("qwen3-30b-a3b", 30.0),
        ("qwen3-235b-a22b", 235.0),
        ("mlx-gpt-oss-20b-mxfp4-q4", 20.0),
        ("gpt-4", None),
        ("gpt-4o", None),
        ("gpt-3.5-turbo", None),
        ("llama-3.1", None),
        ("text-embedding-3-small", None),
        ("qwen3:8b", 8.0),
        ("llama3.2:3b-instruct-q4_K_M", 3.0),
        ("Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", 8.0),
        ("meta-llama/Llama-2-13b-chat-hf", 13.0),
        ("qwen2.5-7b-instruct-1m", 7.0),  # 1m is a context length
        ("phi-3-mini-4k-instruct", None),
        ("smollm-135m", 0.135),
        ("tinyllama-1.1b-chat", 1.1),
        ("kimi-k2-1t", 1000.0),
        ("mistral.7b.gguf", 7.0),
        ("llama-3.1.8b", None),  # ambiguous: could be version 3.1.8
        ("qwen2.5-32b-instruct-draft-0.5b", 32.0),  # the first size token wins
    ],
)
def test_parameter_count_examples(model_id: str, expected: float | None) -> None:
    got = parameter_count(model_id)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


@FAST
@given(
    st.sampled_from(["llama", "qwen", "gpt", "mistral", "phi"]),
    st.integers(0, 9),
    st.integers(0, 9),
)
def test_parameter_count_ignores_versions(family: str, major: int, minor: int) -> None:
    assert parameter_count(f"{family}-{major}.{minor}") is None
    assert parameter_count(f"{family}-{major}") is None
    assert parameter_count(f"{family}{major}.{minor}-instruct") is None


@FAST
@given(st.integers(1, 999), st.integers(1, 99))
def test_parameter_count_reads_size_after_version(size: int, active: int) -> None:
    assert parameter_count(f"llama-3.1-{size}b-instruct") == size
    assert parameter_count(f"qwen3-{size}b-a{active}b") == size


# -------------------------------------------------------------------------- is_embedding_model

EMBEDDING_IDS = [
    "text-embedding-3-small",
    "text-embedding-ada-002",
    "nomic-embed-text",
    "nomic-embed-text:latest",
    "mxbai-embed-large",
    "BAAI/bge-m3",
    "bge-large-en-v1.5",
    "intfloat/e5-large-v2",
    "intfloat/multilingual-e5-large",
    "e5-mistral-7b-instruct",
    "thenlper/gte-large",
    "gte-Qwen2-7B-instruct",
    "all-minilm",
    "all-MiniLM-L6-v2",
    "all-mpnet-base-v2",
    "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2",
    "Qwen/Qwen3-Embedding-8B",
    "snowflake-arctic-embed-m",
    "jina-embeddings-v3",
]
CHAT_IDS = [
    "qwen3-8b",
    "qwen2.5-7b-instruct",
    "phi-3.5-mini-instruct",
    "llama-3.1-70b-instruct",
    "gpt-4o",
    "gpt-oss-20b",
    "mistralai/mistral-small-3.2",
    "gemma3-270m",
    "mixtral-8x7b",
    "deepseek-r1-distill-qwen-7b",
    "bge-reranker-v2-m3",
]


@pytest.mark.parametrize("model_id", EMBEDDING_IDS)
def test_embedding_ids_are_embedding(model_id: str) -> None:
    assert is_embedding_model(model_id)


@pytest.mark.parametrize("model_id", CHAT_IDS)
def test_chat_ids_are_not_embedding(model_id: str) -> None:
    assert not is_embedding_model(model_id)


# ------------------------------------------------------------------------ resolve_model examples


def resolve(
    requested: str,
    available: dict[str, int],
    kind: ModelKind = "chat",
    *,
    preferred: tuple[str, ...] = (),
    prefer_small: bool = False,
    sizes: dict[str, float] | None = None,
) -> str:
    return resolve_model(
        requested,
        available,
        kind=kind,
        sentinels=SENTINELS,
        preferred=preferred,
        prefer_small=prefer_small,
        sizes=sizes or {},
    )


def test_concrete_id_resolves_to_itself() -> None:
    assert resolve("qwen3-8b", {"qwen3-8b": 1, "llama-3.1-70b": 5}) == "qwen3-8b"


def test_concrete_id_case_insensitive_returns_node_spelling() -> None:
    assert resolve("QWEN3-8B", {"Qwen3-8B": 1, "llama-3.1-70b": 5}) == "Qwen3-8B"


def test_concrete_id_ambiguous_case_insensitive_is_not_found() -> None:
    with pytest.raises(ModelNotFound, match="ambiguous"):
        resolve("QWEN3-8B", {"Qwen3-8B": 1, "qwen3-8b": 1})


def test_concrete_id_missing_raises_with_context() -> None:
    with pytest.raises(ModelNotFound) as info:
        resolve("gpt-5", {"qwen3-8b": 1, "llama-3.1-70b": 5})
    assert info.value.requested == "gpt-5"
    assert info.value.code == "model_not_found"
    assert info.value.status == 404
    assert "gpt-5" in info.value.message
    assert "qwen3-8b" in info.value.message and "llama-3.1-70b" in info.value.message


def test_zero_count_entries_are_not_available() -> None:
    with pytest.raises(ModelNotFound):
        resolve("qwen3-8b", {"qwen3-8b": 0})
    assert resolve("auto", {"qwen3-8b": 0, "llama-3.1-70b": 1}) == "llama-3.1-70b"


def test_sentinel_is_case_insensitive() -> None:
    assert resolve("AUTO", {"qwen3-8b": 1}) == "qwen3-8b"
    assert resolve("Default", {"qwen3-8b": 1}) == "qwen3-8b"


def test_custom_sentinel() -> None:
    got = resolve_model("my-lm", {"qwen3-8b": 1}, kind="chat", sentinels=("auto", "my-lm"))
    assert got == "qwen3-8b"
    with pytest.raises(ModelNotFound):
        resolve_model("my-lm", {"qwen3-8b": 1}, kind="chat", sentinels=("auto",))


def test_available_id_spelled_like_a_sentinel_stays_reachable() -> None:
    assert resolve("default", {"default": 1, "qwen3-8b": 3}) == "default"


def test_sentinel_picks_most_served_model() -> None:
    assert resolve("auto", {"a-model": 1, "b-model": 3, "c-model": 2}) == "b-model"


def test_sentinel_ties_broken_alphabetically() -> None:
    assert resolve("auto", {"zeta": 2, "alpha": 2, "mid": 2}) == "alpha"
    assert resolve("auto", {"mid": 2, "zeta": 2, "alpha": 2}) == "alpha"


def test_sentinel_prefers_first_available_preferred() -> None:
    avail = {"qwen3-8b": 1, "llama-3.1-70b": 5, "gemma3-270m": 2}
    assert resolve("auto", avail, preferred=("gpt-5", "gemma3-270m", "qwen3-8b")) == "gemma3-270m"


def test_sentinel_preferred_case_insensitive_returns_node_spelling() -> None:
    avail = {"Qwen3-8B": 1, "llama-3.1-70b": 5}
    assert resolve("auto", avail, preferred=("qwen3-8b",)) == "Qwen3-8B"


def test_sentinel_preferred_exact_beats_case_insensitive() -> None:
    avail = {"Qwen3-8B": 9, "qwen3-8b": 1}
    assert resolve("auto", avail, preferred=("qwen3-8b",)) == "qwen3-8b"


def test_sentinel_preferred_skips_wrong_kind() -> None:
    avail = {"nomic-embed-text": 1, "qwen3-8b": 1, "llama-3.1-70b": 4}
    assert resolve("auto", avail, preferred=("nomic-embed-text", "qwen3-8b")) == "qwen3-8b"


def test_prefer_small_picks_smallest_known() -> None:
    avail = {"qwen3-8b": 5, "gemma3-270m": 1, "mistral-small-3.2": 9, "llama-3.1-70b": 1}
    assert resolve("auto", avail, prefer_small=True) == "gemma3-270m"


def test_prefer_small_beats_preferred() -> None:
    avail = {"qwen3-8b": 5, "gemma3-270m": 1}
    assert resolve("auto", avail, prefer_small=True, preferred=("qwen3-8b",)) == "gemma3-270m"


def test_prefer_small_unknown_sizes_go_last() -> None:
    avail = {"mistral-small-3.2": 9, "llama-3.1-70b": 1}
    assert resolve("auto", avail, prefer_small=True) == "llama-3.1-70b"


def test_prefer_small_all_unknown_falls_back_to_preferred_then_count() -> None:
    avail = {"gpt-4o": 1, "mistral-small": 3, "claude": 2}
    assert resolve("auto", avail, prefer_small=True) == "mistral-small"
    assert resolve("auto", avail, prefer_small=True, preferred=("claude",)) == "claude"


def test_prefer_small_equal_sizes_fall_back_to_count() -> None:
    avail = {"qwen3-8b": 1, "llama-3.1-8b": 4}
    assert resolve("auto", avail, prefer_small=True) == "llama-3.1-8b"


def test_sizes_override_parsed_counts() -> None:
    avail = {"qwen3-8b": 1, "gemma3-270m": 1, "mystery": 1}
    assert resolve("auto", avail, prefer_small=True, sizes={"mystery": 0.1}) == "mystery"
    assert resolve("auto", avail, prefer_small=True, sizes={"gemma3-270m": 100.0}) == "qwen3-8b"


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_bad_configured_size_counts_as_unknown(bad: float) -> None:
    for avail in ({"qwen3-8b": 1, "gemma3-270m": 1}, {"gemma3-270m": 1, "qwen3-8b": 1}):
        got = resolve("auto", avail, prefer_small=True, sizes={"gemma3-270m": bad})
        assert got == "qwen3-8b"


def test_sentinel_for_embeddings_picks_only_embedding_models() -> None:
    avail = {"qwen3-8b": 9, "nomic-embed-text": 1, "bge-m3": 2}
    assert resolve("auto", avail, kind="embedding") == "bge-m3"
    assert resolve("auto", avail, kind="chat") == "qwen3-8b"
    assert resolve("auto", avail, kind="completion") == "qwen3-8b"


def test_sentinel_without_candidates_raises() -> None:
    with pytest.raises(ModelNotFound, match="embedding") as info:
        resolve("auto", {"qwen3-8b": 1}, kind="embedding")
    assert info.value.requested == "auto"
    with pytest.raises(ModelNotFound):
        resolve("auto", {"nomic-embed-text": 1}, kind="chat")
    with pytest.raises(ModelNotFound):
        resolve("auto", {}, kind="chat")


# ---------------------------------------------------------------------- resolve_model properties

_POOL = CHAT_IDS + EMBEDDING_IDS[:8] + ["gemma3-270m", "Qwen3-8B", "mystery-model"]
_model_ids = st.sampled_from(_POOL) | st.text(
    alphabet="abcxyz-0123456789.", min_size=1, max_size=10
)
_available = st.dictionaries(_model_ids, st.integers(1, 5), max_size=8)
_kinds: st.SearchStrategy[ModelKind] = st.sampled_from(["chat", "completion", "embedding"])
_sentinels = st.sampled_from(["auto", "AUTO", "default", "Default"])


def _not_sentinel(available: dict[str, int]) -> dict[str, int]:
    folded = {s.casefold() for s in SENTINELS}
    return {m: n for m, n in available.items() if m.casefold() not in folded}


class Options(NamedTuple):
    kind: ModelKind = "chat"
    preferred: tuple[str, ...] = ()
    prefer_small: bool = False
    sizes: dict[str, float] = {}


def _outcome(requested: str, available: dict[str, int], options: Options) -> str | None:
    try:
        return resolve(
            requested,
            available,
            options.kind,
            preferred=options.preferred,
            prefer_small=options.prefer_small,
            sizes=options.sizes,
        )
    except ModelNotFound:
        return None


_options = st.builds(
    Options,
    kind=_kinds,
    preferred=st.lists(_model_ids, max_size=3).map(tuple),
    prefer_small=st.booleans(),
    sizes=st.dictionaries(_model_ids, st.floats(0, 1000), max_size=3),
)


@settings(max_examples=100, deadline=None)
@given(_sentinels | _model_ids, _available, _options)
def test_result_is_always_available(
    requested: str, available: dict[str, int], options: Options
) -> None:
    got = _outcome(requested, available, options)
    assert got is None or got in available


@settings(max_examples=100, deadline=None)
@given(_sentinels, _available.map(_not_sentinel), _options)
def test_sentinel_result_has_the_right_kind(
    requested: str, available: dict[str, int], options: Options
) -> None:
    want_embedding = options.kind == "embedding"
    got = _outcome(requested, available, options)
    candidates = [m for m in available if is_embedding_model(m) == want_embedding]
    if got is None:
        assert not candidates
    else:
        assert is_embedding_model(got) == want_embedding


@FAST
@given(_available, st.data(), _options)
def test_available_ids_resolve_to_themselves(
    available: dict[str, int], data: st.DataObject, options: Options
) -> None:
    if not available:
        return
    requested = data.draw(st.sampled_from(sorted(available)))
    assert _outcome(requested, available, options) == requested


@settings(max_examples=100, deadline=None)
@given(_sentinels | _model_ids, _available, _options, st.randoms(use_true_random=False))
def test_permuting_available_never_changes_the_result(
    requested: str, available: dict[str, int], options: Options, rnd: random.Random
) -> None:
    items = list(available.items())
    rnd.shuffle(items)
    assert _outcome(requested, dict(items), options) == _outcome(requested, available, options)


@FAST
@given(_sentinels | _model_ids, _available, _options)
def test_deterministic(requested: str, available: dict[str, int], options: Options) -> None:
    assert _outcome(requested, available, options) == _outcome(requested, dict(available), options)


@FAST
@given(_sentinels, _available.map(_not_sentinel), _kinds)
def test_sentinel_without_preferences_picks_a_most_served_model(
    requested: str, available: dict[str, int], kind: ModelKind
) -> None:
    got = _outcome(requested, available, Options(kind=kind))
    if got is None:
        return
    same_kind = [m for m in available if is_embedding_model(m) == (kind == "embedding")]
    best = max(available[m] for m in same_kind)
    assert available[got] == best
    assert got == min(m for m in same_kind if available[m] == best)


@FAST
@given(_sentinels, _available.map(_not_sentinel), st.lists(_model_ids, min_size=1, max_size=4))
def test_sentinel_honours_first_available_preferred(
    requested: str, available: dict[str, int], preferred: list[str]
) -> None:
    got = _outcome(requested, available, Options(preferred=tuple(preferred)))
    chat = [m for m in available if not is_embedding_model(m)]
    for pref in preferred:
        matches = [m for m in chat if m.casefold() == pref.casefold()]
        if matches:
            assert got is not None and got.casefold() == pref.casefold()
            if pref in matches:
                assert got == pref
            return
    # No preferred model is available: fall back to the most-served rule.
    assert got == (min(chat, key=lambda m: (-available[m], m)) if chat else None)


@FAST
@given(_sentinels, _available.map(_not_sentinel))
def test_prefer_small_picks_a_smallest_known_model(
    requested: str, available: dict[str, int]
) -> None:
    got = _outcome(requested, available, Options(prefer_small=True))
    chat = [m for m in available if not is_embedding_model(m)]
    known = [size for m in chat if (size := parameter_count(m)) is not None]
    if got is None:
        assert not chat
    elif known:
        assert parameter_count(got) == min(known)
    else:
        assert parameter_count(got) is None
