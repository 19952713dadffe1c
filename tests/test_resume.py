"""STREAM_RESUME: a stream whose node dies mid-answer goes on on another node.

The pure parts (lb.routing.resume) under hypothesis: wherever a stream is cut, the client's
bytes are one valid stream; then end to end over real sockets with the official SDK and raw
httpx bytes: mock nodes that die after N events (`drop-after`), one that continues a trailing
assistant message (`continue_final_message`), and a scripted node for tool calls.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import orjson
import pytest
import trio
from harness import (
    CHAT,
    Running,
    RunningMock,
    Script,
    read_body,
    sdk,
    start_lb,
    start_mock,
    start_scripted,
)
from hypothesis import given
from hypothesis import strategies as st
from test_access_log import Logs, logs  # noqa: F401  (the fixture)
from test_dispatch import MODEL as D_MODEL
from test_dispatch import SSE, RecordingSink, Step, dispatcher, failures
from test_dispatch import Script as D_Script
from test_dispatch import intent as d_intent
from test_dispatch import node as d_node
from test_dispatch import trace as d_trace

from lb.errors import DeadlineExceeded
from lb.routing import resume
from lb.routing.resume import Rewriter, StreamTranscript, continuation
from lb.testing.mock import _answer_text

MODEL = "llama-3.1-8b"
TOKENS = 12
WHOLE = _answer_text(TOKENS)  # what one mock node streams for a whole answer


# --- pure: transcript, continuation, rewriter ----------------------------------------------


def chunk(cid: str, created: int, model: str, delta: dict[str, Any] | None = None,
          finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    obj: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
    }
    if usage:
        obj["usage"] = usage
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def node_stream(cid: str, created: int, model: str, words: list[str], prompt: int,
                with_usage: bool) -> list[bytes]:
    """A node's whole stream: role chunk, a chunk per word, finish, [usage], [DONE]."""
    events = [chunk(cid, created, model, {"role": "assistant", "content": ""})]
    events += [chunk(cid, created, model, {"content": word}) for word in words]
    events.append(chunk(cid, created, model, finish="stop"))
    if with_usage:
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words),
                 "total_tokens": prompt + len(words)}
        events.append(chunk(cid, created, model, usage=usage))
    events.append(b"data: [DONE]\n\n")
    return events


def parse_stream(data: bytes) -> list[Any]:
    """Every event of a client's stream, decoded; the stream must be byte-valid SSE."""
    assert data.endswith(b"\n\n")
    out: list[Any] = []
    for event in data.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: "), event
        payload = event[6:]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def check_one_stream(events: list[Any], text: str, model: str) -> dict[str, Any] | None:
    """One id, one model, one role chunk, the whole text, one finish, one [DONE] at the end;
    returns the usage chunk's usage, if any."""
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert {c["model"] for c in chunks} == {model}
    assert len({c["created"] for c in chunks}) == 1
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    assert sum("role" in d["delta"] for d in deltas) == 1
    assert "role" in deltas[0]["delta"]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == text
    assert sum(d["finish_reason"] is not None for d in deltas) == 1
    usages = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usages) <= 1
    return usages[0] if usages else None


@given(
    words=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=12),
    data=st.data(),
    with_usage=st.booleans(),
    prompt=st.integers(0, 50),
)
def test_a_cut_anywhere_before_the_finish_gives_one_stream(
    words: list[str], data: st.DataObject, with_usage: bool, prompt: int
) -> None:
    first = node_stream("chatcmpl-a", 100, "m", words, prompt, with_usage)
    # Cut after the role chunk and any number of words (before the finish chunk).
    cut = data.draw(st.integers(1, len(words)), label="cut")
    sent = b"".join(first[:cut])
    # The proxy forwards whole events, but several may come in one read.
    split = sorted(data.draw(st.sets(st.integers(1, cut - 1), max_size=3), label="reads")) \
        if cut > 1 else []
    transcript = StreamTranscript()
    for a, b in zip([0, *split], [*split, cut], strict=True):
        transcript.feed(b"".join(first[a:b]))
    assert transcript.resumable and transcript.role_sent
    assert transcript.text == "".join(words[: cut - 1])
    assert transcript.content_events == cut - 1
    # The next node continues: its prompt holds the text so far, as the mock counts it.
    carried = cut - 1
    rest = words[carried:]
    second = node_stream("chatcmpl-b", 200, "other", rest, prompt + carried, with_usage)
    rewriter = Rewriter(transcript)
    reads = data.draw(st.integers(1, len(second)), label="continuation reads")
    step = max(1, len(second) // reads)
    out = b"".join(rewriter.feed(b"".join(second[i:i + step])) for i in range(0, len(second), step))
    usage = check_one_stream(parse_stream(sent + out), "".join(words), "m")
    assert rewriter.usage_seen is with_usage
    if with_usage:
        assert usage == {"prompt_tokens": prompt, "completion_tokens": len(words),
                         "total_tokens": prompt + len(words)}
    assert transcript.done and transcript.text == "".join(words)


@given(text=st.text(min_size=1, max_size=40), limit=st.integers(0, 100),
       mode=st.sampled_from(resume.MODES), events=st.integers(1, 20))
def test_continuation_of_a_chat(text: str, limit: int, mode: str, events: int) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": limit, "stream_options": {"include_usage": True}}
    transcript = StreamTranscript()
    transcript.parts, transcript.content_events = [text], events
    out = continuation(body, transcript, mode, "go on")
    assert out["messages"][:1] == body["messages"]
    assert out["messages"][1] == {"role": "assistant", "content": text}
    assert out["max_tokens"] == max(1, limit - events)
    assert out["stream_options"] == body["stream_options"]
    if mode == resume.PREFILL:
        assert len(out["messages"]) == 2
        assert out["continue_final_message"] is True and out["add_generation_prompt"] is False
    else:
        assert out["messages"][2] == {"role": "user", "content": "go on"}
        assert "continue_final_message" not in out
    assert body["messages"] == [{"role": "user", "content": "hi"}]  # not mutated


def test_continuation_with_no_text_yet_is_the_request_again() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert continuation(body, StreamTranscript()) == body


@given(prompt=st.text(max_size=20), text=st.text(max_size=20), listed=st.booleans())
def test_continuation_of_a_completion_appends_the_text(
    prompt: str, text: str, listed: bool
) -> None:
    body = {"model": "m", "prompt": [prompt] if listed else prompt, "stream": True}
    assert resume.request_resumable(body, chat=False)
    transcript = StreamTranscript(chat=False)
    transcript.feed(b'data: {"id":"c","choices":[{"index":0,"text":' + orjson.dumps(text)
                    + b',"finish_reason":null}]}\n\n')
    assert continuation(body, transcript)["prompt"] == prompt + text


@pytest.mark.parametrize(("delta", "why"), [
    ({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}, "tools"),
    ({"function_call": {"name": "f"}}, "tools"),
    ({"reasoning_content": "hmm"}, "reasoning"),
])
def test_streams_that_cannot_be_continued(delta: dict[str, Any], why: str) -> None:
    transcript = StreamTranscript()
    transcript.feed(
        chunk("x", 1, "m", {"role": "assistant", "content": ""}) + chunk("x", 1, "m", delta)
    )
    assert getattr(transcript, why) and not transcript.resumable


def test_other_choices_a_half_event_or_the_end_cannot_be_continued() -> None:
    for data in (
        b'data: {"id":"x","choices":[{"index":1,"delta":{"content":"a"}}]}\n\n',
        b'data: {"id":"x","choices":[{"ind',
        b"data: [DONE]\n\n",
    ):
        transcript = StreamTranscript()
        transcript.feed(data)
        assert not transcript.resumable, data
    # Reasoning, then the answer's text: the text can be continued.
    transcript = StreamTranscript()
    transcript.feed(chunk("x", 1, "m", {"reasoning_content": "hmm"})
                    + chunk("x", 1, "m", {"content": "Yes"}))
    assert transcript.resumable


def test_requests_that_cannot_be_continued() -> None:
    assert not resume.request_resumable({"messages": [], "n": 2}, chat=True)
    assert not resume.request_resumable({"prompt": "a", "echo": True}, chat=False)
    assert not resume.request_resumable({"prompt": [1, 2]}, chat=False)
    assert resume.request_resumable({"messages": [], "n": 1}, chat=True)


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
def test_events_with_any_line_ending(end: bytes) -> None:
    data = b"data: {\"a\":1}" + end + end + b": comment" + end + end + b"data: [DONE]" + end + end
    found = resume.events(data)
    assert [resume.data_of(e) for e in found] == [b'{"a":1}', None, b"[DONE]"]


def test_rewriter_passes_comments_and_the_nodes_error_event_through() -> None:
    transcript = StreamTranscript()
    transcript.feed(chunk("x", 1, "m", {"role": "assistant", "content": ""}))
    rewriter = Rewriter(transcript)
    error = b'data: {"error":{"message":"boom"}}\n\n'
    assert rewriter.feed(b": ping\n\n" + error) == b": ping\n\n" + error


# --- end to end --------------------------------------------------------------------------


async def stream_raw(lb: Running, body: dict[str, Any], path: str = "/v1/chat/completions",
                     request_id: str = "r-1") -> bytes:
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{lb.url}{path}", json=body,
                                   headers={"x-request-id": request_id}, timeout=10)
        assert answer.status_code == 200
        return answer.content


async def sdk_stream(lb: Running, **extra: Any) -> tuple[list[Any], str]:
    """The SDK's chunks and the text they carry."""
    stream = await sdk(lb).chat.completions.create(
        model=MODEL, **CHAT, stream=True, **extra
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return chunks, text


async def two_nodes(nursery: trio.Nursery, fault: str, **settings: Any
                    ) -> tuple[Running, Any, Any]:
    """lb in front of a node that dies (`fault`) and a healthy one, tried in that order."""
    dying = await start_mock(nursery, models=(MODEL,), tokens=TOKENS, fault=fault, name="a")
    healthy = await start_mock(nursery, models=(MODEL,), tokens=TOKENS, name="b")
    options = {"routing_strategy": "FAILOVER", "stream_resume": True, **settings}
    lb = await start_lb(nursery, [dying, healthy], **options)
    return lb, dying, healthy


async def test_the_sdk_gets_one_whole_answer_when_a_node_dies_mid_stream(
    nursery: trio.Nursery, logs: Logs,  # noqa: F811
) -> None:
    with trio.fail_after(10):
        lb, dying, healthy = await two_nodes(nursery, "drop-after=5")
        chunks, text = await sdk_stream(lb, stream_options={"include_usage": True})
        assert text == WHOLE
        assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-a-")
        assert [c.choices[0].delta.role for c in chunks if c.choices].count("assistant") == 1
        assert [c.choices[0].finish_reason for c in chunks if c.choices].count("stop") == 1
        usage = chunks[-1].usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (2, TOKENS)
        # The second node continued the first one's text: role chunk + 4 tokens went out.
        sent = (await healthy.requests())[-1]["body"]
        assert sent["messages"][-1] == {"role": "assistant", "content": _answer_text(4)}
        assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
        # The raw bytes: one valid stream.
        raw = await stream_raw(lb, {"model": MODEL, **CHAT, "stream": True}, request_id="r-2")
        check_one_stream(parse_stream(raw), WHOLE, MODEL)
        assert (await dying.stats())["dropped"] == 2
    line, record = logs.access("r-2")
    assert f"node={healthy.key}" in line and "attempts=2" in line and "resumed=1" in line
    assert record["resumes"] == 1 and record["attempts"] == 2
    assert record["completion_tokens"] == TOKENS and record["tokens_estimated"]


async def test_resume_off_ends_the_stream_with_the_error_event(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        lb, _dying, healthy = await two_nodes(nursery, "drop-after=5", stream_resume=False)
        with pytest.raises(openai.APIError, match="closed the connection mid-stream"):
            await sdk_stream(lb)
        raw = await stream_raw(lb, {"model": MODEL, **CHAT, "stream": True})
        assert raw.endswith(b"data: [DONE]\n\n")
        assert parse_stream(raw)[-2]["error"]["code"] == "upstream_stream_error"
        assert await healthy.chats() == 0


async def test_no_other_node_ends_the_stream_with_the_error_event(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        dying = await start_mock(nursery, models=(MODEL,), tokens=TOKENS, fault="drop-after=5")
        lb = await start_lb(nursery, [dying], stream_resume=True)
        raw = await stream_raw(lb, {"model": MODEL, **CHAT, "stream": True})
        events = parse_stream(raw)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "upstream_stream_error"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) \
            == _answer_text(4)


async def test_resumes_are_bounded_by_stream_resume_max(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        nodes: list[Running] = [
            await start_mock(nursery, models=(MODEL,), tokens=TOKENS, fault="drop-after=4",
                             name=name)
            for name in "ab"
        ]
        nodes.append(await start_mock(nursery, models=(MODEL,), tokens=TOKENS, name="c"))
        lb = await start_lb(nursery, nodes, routing_strategy="FAILOVER", stream_resume=True,
                            stream_resume_max=1)
        raw = await stream_raw(lb, {"model": MODEL, **CHAT, "stream": True})
        events = parse_stream(raw)
        assert events[-2]["error"]["code"] == "upstream_stream_error"
        # Two nodes, three tokens each: one coherent text up to the second cut.
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
        assert text == _answer_text(6)
        mocks = [node for node in nodes if isinstance(node, RunningMock)]
        assert [await node.chats() for node in mocks] == [1, 1, 0]
        # With two resumes the third node finishes the answer.
        lb2 = await start_lb(nursery, nodes, routing_strategy="FAILOVER", stream_resume=True,
                             stream_resume_max=2)
        raw = await stream_raw(lb2, {"model": MODEL, **CHAT, "stream": True})
        check_one_stream(parse_stream(raw), WHOLE, MODEL)
        assert [await node.chats() for node in mocks] == [2, 2, 1]


async def test_tool_call_streams_are_not_resumed(nursery: trio.Nursery) -> None:
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    tool = (b'data: {"id":"t","object":"chat.completion.chunk","created":1,"model":"'
            + MODEL.encode() + b'","choices":[{"index":0,"delta":{"role":"assistant",'
            b'"tool_calls":[{"index":0,"id":"call_1","type":"function","function":'
            b'{"name":"f","arguments":"{\\"a\\""}}]},"finish_reason":null}]}\n\n')

    async def calls_then_dies(head_: bytes, stream: trio.SocketStream,
                              buffered: bytearray) -> None:
        await read_body(stream, head_, buffered)
        await stream.send_all(head + b"%x\r\n" % len(tool) + tool + b"\r\n")
        await trio.aclose_forcefully(stream)

    script: Script = calls_then_dies
    with trio.fail_after(10):
        node = await start_scripted(nursery, script, models=(MODEL,))
        healthy = await start_mock(nursery, models=(MODEL,), tokens=TOKENS)
        lb = await start_lb(nursery, [node, healthy], routing_strategy="FAILOVER",
                            stream_resume=True)
        raw = await stream_raw(lb, {"model": MODEL, **CHAT, "stream": True})
        events = parse_stream(raw)
        assert events[0]["choices"][0]["delta"]["tool_calls"][0]["id"] == "call_1"
        assert events[1]["error"]["code"] == "upstream_stream_error" and events[2] == "[DONE]"
        assert await healthy.chats() == 0


async def test_a_node_that_dies_after_the_finish_chunk_only_misses_done(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        # role + 12 tokens + finish went out, then the connection dropped.
        lb, _dying, healthy = await two_nodes(nursery, f"drop-after={TOKENS + 2}")
        raw = await stream_raw(lb, {"model": MODEL, **CHAT, "stream": True})
        check_one_stream(parse_stream(raw), WHOLE, MODEL)
        assert await healthy.chats() == 0


async def test_instruction_mode_asks_to_go_on(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        lb, _dying, healthy = await two_nodes(
            nursery, "drop-after=3", stream_resume_mode="instruction",
            stream_resume_prompt="Go on.",
        )
        raw = await stream_raw(lb, {"model": MODEL, **CHAT, "stream": True, "max_tokens": 9})
        sent = (await healthy.requests())[-1]["body"]
        assert sent["messages"][1:] == [
            {"role": "assistant", "content": _answer_text(2)},
            {"role": "user", "content": "Go on."},
        ]
        assert sent["max_tokens"] == 7 and "continue_final_message" not in sent
        # The mock knows no instructions (it starts over), but the stream is still one.
        events = parse_stream(raw)
        assert events.count("[DONE]") == 1 and len({e["id"] for e in events[:-1]}) == 1


async def test_a_node_that_refuses_the_continuation(nursery: trio.Nursery) -> None:
    """A node that answers the continuation with a 4xx (say, a prompt now too long) gives no
    continuation: the client gets the error event, with the node's reason."""
    with trio.fail_after(10):
        lb, _dying, healthy = await two_nodes(nursery, "drop-after=3")
        healthy.node.set_fault("status=400")
        raw = await stream_raw(lb, {"model": MODEL, **CHAT, "stream": True})
        events = parse_stream(raw)
        assert "refused to continue the stream: HTTP 400" in events[-2]["error"]["message"]


async def test_completions_resume_with_the_text_appended_to_the_prompt(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        lb, _dying, healthy = await two_nodes(nursery, "drop-after=3")
        body = {"model": MODEL, "prompt": "Say it", "stream": True}
        raw = await stream_raw(lb, body, path="/v1/completions")
        assert (await healthy.requests())[-1]["body"]["prompt"] == "Say it" + _answer_text(3)
        events = parse_stream(raw)
        assert events.count("[DONE]") == 1 and len({e["id"] for e in events[:-1]}) == 1
        assert sum(e["choices"][0]["finish_reason"] is not None for e in events[:-1]) == 1


# --- on trio's autojump clock: idle nodes and the one deadline ------------------------------


def _chunks(cid: str, words: list[str], finish: bool) -> list[Step]:
    steps: list[Step] = [chunk(cid, 1, D_MODEL, {"role": "assistant", "content": ""})]
    steps += [chunk(cid, 1, D_MODEL, {"content": word}) for word in words]
    if finish:
        steps += [chunk(cid, 1, D_MODEL, finish="stop"), b"data: [DONE]\n\n"]
    return steps


async def test_a_node_gone_idle_is_charged_and_another_continues(autojump_clock: Any) -> None:
    a, _ = d_node(D_Script(headers=list(SSE), body=[*_chunks("a", ["Hel", "lo"], False), 1000.0]))
    b, upstream_b = d_node(D_Script(headers=list(SSE), body=_chunks("b", [" world"], True)),
                           port=2)
    d = dispatcher(a, b, stream_resume=True, stream_idle_timeout=30.0,
                   routing_strategy="FAILOVER")
    sink = RecordingSink()
    started = trio.current_time()
    await d.execute(d_intent(stream=True), sink, d_trace())
    assert 27 <= trio.current_time() - started <= 31  # cut after 0.9 to 1 idle timeouts
    check_one_stream(parse_stream(sink.body), "Hello world", D_MODEL)
    assert failures(a) == 1 and failures(b) == 0
    sent = orjson.loads(upstream_b.requests[0]["body"])
    assert sent["messages"][-1] == {"role": "assistant", "content": "Hello"}


async def test_resumes_stay_inside_the_one_deadline(autojump_clock: Any) -> None:
    a, _ = d_node(D_Script(headers=list(SSE), body=[*_chunks("a", ["Hel"], False), 1000.0]))
    # The second node would answer, but only after the request's deadline.
    b, upstream_b = d_node(
        D_Script(headers=list(SSE), body=_chunks("b", ["lo"], True), head_after=100.0), port=2
    )
    d = dispatcher(a, b, stream_resume=True, stream_idle_timeout=30.0, request_timeout=60.0,
                   routing_strategy="FAILOVER")
    sink = RecordingSink()
    started = trio.current_time()
    with pytest.raises(DeadlineExceeded):
        await d.execute(d_intent(stream=True), sink, d_trace())
    assert trio.current_time() - started == pytest.approx(60.0)
    assert sink.committed and len(upstream_b.requests) == 1
    assert failures(b) == 0  # the deadline is nobody's failure


async def test_the_mock_continues_a_final_assistant_message_as_vllm_does(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        mock = await start_mock(nursery, models=(MODEL,), tokens=TOKENS)
        url = f"{mock.url}/v1/chat/completions"
        messages = [*CHAT["messages"], {"role": "assistant", "content": _answer_text(5)}]
        async with httpx.AsyncClient() as client:
            answer = await client.post(url, json={
                "model": MODEL, "messages": messages, "continue_final_message": True,
                "add_generation_prompt": False, "max_tokens": 4,
            })
            assert answer.json()["choices"][0]["message"]["content"] \
                == _answer_text(9)[len(_answer_text(5)):]
            assert answer.json()["choices"][0]["finish_reason"] == "length"
            # vLLM's refusals: with add_generation_prompt (true by default), or a user last.
            for body in (
                {"messages": messages, "continue_final_message": True},
                {"messages": CHAT["messages"], "continue_final_message": True,
                 "add_generation_prompt": False},
            ):
                refused = await client.post(url, json={"model": MODEL, **body})
                assert refused.status_code == 400


async def test_a_hedged_stream_is_resumed_too(nursery: trio.Nursery) -> None:
    """With HEDGE_AFTER_MS the first attempt runs inside a race; a stream it won and then
    broke goes on on the other node all the same."""
    with trio.fail_after(10):
        lb, _dying, healthy = await two_nodes(nursery, "drop-after=5", hedge_after_ms=5000)
        chunks, text = await sdk_stream(lb)
        assert text == WHOLE and len({c.id for c in chunks}) == 1
        assert (await healthy.requests())[-1]["body"]["continue_final_message"] is True


@pytest.mark.parametrize(("first", "second"), [
    ("anthropic", "anthropic"), ("openai", "anthropic"), ("anthropic", "openai"),
])
async def test_anthropic_nodes_resume_and_are_resumed(
    nursery: trio.Nursery, first: str, second: str,
) -> None:
    """A stream from an Anthropic node is watched like any other, and an Anthropic node
    continues one natively: the text so far is its prefill (a trailing assistant message, no
    flag); the client sees one stream either way."""
    from lb.config import NodeConfig

    def mock(dialect: str, name: str, **options: Any) -> Any:
        extra = {"dialect": "anthropic", "api_key": "k"} if dialect == "anthropic" else {}
        return start_mock(nursery, models=(MODEL,), tokens=TOKENS, name=name, **extra,
                          **options)

    def config(node: Any, dialect: str) -> NodeConfig:
        return NodeConfig(node.url, dialect=dialect, models=(MODEL,),
                          api_key="k" if dialect == "anthropic" else "")

    with trio.fail_after(10):
        dying = await mock(first, "a", fault="drop-after=6")
        healthy = await mock(second, "b")
        lb = await start_lb(nursery, [], configs=(config(dying, first), config(healthy, second)),
                            routing_strategy="FAILOVER", stream_resume=True)
        chunks, text = await sdk_stream(lb, max_tokens=64)
        assert text == WHOLE
        assert len({c.id for c in chunks}) == 1
        assert [c.choices[0].delta.role for c in chunks if c.choices].count("assistant") == 1
        assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
        sent = (await healthy.requests())[-1]["body"]
        carried = sent["messages"][-1]
        assert carried["role"] == "assistant"
        if second == "anthropic":  # native prefill: no vLLM flags, no trailing whitespace
            assert "continue_final_message" not in sent
            assert carried["content"][0]["text"] == text[: len(carried["content"][0]["text"])]
        else:
            assert sent["continue_final_message"] is True
