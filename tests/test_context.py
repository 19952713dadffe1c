"""Context windows: the prompt estimate and the fallback / 400 decision (lb.routing.context)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.catalogue import Catalogue, parse_catalogue
from lb.errors import BadRequest, ContextWindowExceeded
from lb.http.errors import error_payload
from lb.routing.context import (
    BYTES_PER_TOKEN,
    TOKENS_PER_IMAGE,
    TOKENS_PER_MESSAGE,
    check_context,
    estimate_tokens,
)


def test_estimate_examples() -> None:
    text = "x" * 400
    assert estimate_tokens({"messages": [{"role": "user", "content": text}]}, "chat") == (
        400 // BYTES_PER_TOKEN + TOKENS_PER_MESSAGE
    )
    parts = [{"type": "text", "text": "abcd" * 10},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    assert estimate_tokens({"messages": [{"role": "user", "content": parts}]}, "chat") == (
        10 + TOKENS_PER_MESSAGE + TOKENS_PER_IMAGE
    )
    # Multi-byte text counts its UTF-8 bytes; a partial token rounds up.
    assert estimate_tokens({"prompt": "é"}, "completion") == 1
    assert estimate_tokens({"input": ["abcd", "efgh"]}, "embedding") == 2
    assert estimate_tokens({"input": [1, 2, 3]}, "embedding") == 3  # token ids are tokens
    assert estimate_tokens({"input": [[1, 2], [3]]}, "embedding") == 3
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert estimate_tokens({"messages": [], "tools": tools}, "chat") == -(
        -len(orjson.dumps(tools)) // BYTES_PER_TOKEN
    )
    # What is not a prompt costs nothing, and never raises.
    assert estimate_tokens({"messages": "nope"}, "chat") == 0
    assert estimate_tokens({}, "embedding") == 0


json_text = st.text(max_size=200)
content = st.one_of(
    json_text,
    st.lists(st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": json_text}),
        st.fixed_dictionaries({"type": st.just("image_url"),
                               "image_url": st.fixed_dictionaries({"url": json_text})}),
    ), max_size=4),
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": content},
    optional={"name": json_text, "tool_call_id": json_text},
)


@given(st.lists(message, max_size=6), message, st.integers(0, 6))
def test_adding_a_message_never_lowers_the_estimate(
    messages: list[dict[str, Any]], extra: dict[str, Any], where: int
) -> None:
    before = estimate_tokens({"messages": messages}, "chat")
    after = estimate_tokens({"messages": [*messages[:where], extra, *messages[where:]]}, "chat")
    assert after >= before + TOKENS_PER_MESSAGE


@given(st.lists(message, min_size=1, max_size=6), st.data())
def test_longer_text_never_lowers_the_estimate(
    messages: list[dict[str, Any]], data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(messages) - 1))
    more = data.draw(st.text(min_size=1, max_size=100))
    longer = [dict(m) for m in messages]
    target = longer[index]
    if isinstance(target["content"], str):
        target["content"] = target["content"] + more
    else:
        target["content"] = [*target["content"], {"type": "text", "text": more}]
    assert estimate_tokens({"messages": longer}, "chat") >= estimate_tokens(
        {"messages": messages}, "chat"
    )


@given(st.lists(st.text(max_size=50), max_size=6), st.text(max_size=50))
def test_embedding_inputs_add_up(inputs: list[str], extra: str) -> None:
    assert estimate_tokens({"input": [*inputs, extra]}, "embedding") >= estimate_tokens(
        {"input": inputs}, "embedding"
    )


def windows(**limits: int | None) -> Catalogue:
    model_list = []
    for handle, limit in limits.items():
        entry: dict[str, Any] = {"model_name": handle,
                                 "litellm_params": {"model": f"openai/{handle}",
                                                    "api_base": "http://box:1/v1"}}
        if limit is not None:
            entry["model_info"] = {"max_input_tokens": limit}
        model_list.append(entry)
    return parse_catalogue({
        "model_list": model_list,
        "router_settings": {"context_window_fallbacks": [
            {"small": ["medium", "large"]}, {"tiny": ["small", "big"]}, {"medium": ["open"]},
        ]},
        "aliases": {"big": "large"},
    }, {})


def test_a_prompt_that_fits_stays() -> None:
    catalogue = windows(small=1000, medium=4000, large=16000, tiny=10, open=None)
    assert catalogue.limited == {"small", "medium", "large", "tiny"}
    assert check_context(catalogue, "small", 1000) == "small"
    assert check_context(catalogue, "open", 10**9) == "open"


def test_a_prompt_too_long_goes_to_the_first_fallback_that_takes_it() -> None:
    catalogue = windows(small=1000, medium=4000, large=16000, tiny=10, open=None)
    assert check_context(catalogue, "small", 1001) == "medium"
    assert check_context(catalogue, "small", 4001) == "large"
    assert check_context(catalogue, "medium", 10**9) == "open"  # no known limit there
    assert check_context(catalogue, "tiny", 1001) == "large"  # through the alias "big"


def test_a_prompt_no_window_takes_is_a_400_before_any_node() -> None:
    catalogue = windows(small=1000, medium=4000, large=16000, tiny=10, open=None)
    with pytest.raises(ContextWindowExceeded) as info:
        check_context(catalogue, "small", 20000)
    assert isinstance(info.value, BadRequest)
    assert "about 20000 tokens" in info.value.message and "at most 1000" in info.value.message
    assert error_payload(info.value) == {"error": {
        "message": info.value.message, "type": "invalid_request_error", "param": "messages",
        "code": "context_length_exceeded",
    }}
    assert info.value.status == 400
    with pytest.raises(ContextWindowExceeded):
        check_context(catalogue, "tiny", 16001)  # every fallback is too small as well
