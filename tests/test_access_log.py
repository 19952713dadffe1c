"""The access log and the log formats: the line of hand-made traces, then end to end (the
official openai SDK -> lb -> mock nodes) through the same handlers `lb serve` installs, text and
JSON at once: a chat, a stream, an unknown model, bad JSON, a failover whose dispatch warning
carries the request's id, and secrets that never reach a line."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import signal
from collections.abc import Iterator
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
from harness import CHAT, Running, start_lb, start_mock
from harness import sdk as sdk_for
from test_cli import lb_serve

from lb.config import ConfigError, Settings, load_settings
from lb.obs.access_log import AccessLog, access_fields, access_text
from lb.obs.logs import BATCH_BYTES, REQUEST_ID, configure_logging, make_handler
from lb.obs.observer import Trace

MODEL = "llama-3.1-8b"


def chat_trace(**changes: Any) -> Trace:
    trace = Trace(
        "req-1", "chat", False, "auto", 100.0, client="127.0.0.1:50412",
        path="/v1/chat/completions", model=MODEL, node="127.0.0.1:9001", attempts=1,
        first_byte=0.0041, status=200, prompt_tokens=5, completion_tokens=16,
        upstream_request_id="up-7", duration=0.01234,
    )
    for name, value in changes.items():
        setattr(trace, name, value)
    return trace


# --- the line, from hand-made traces ---------------------------------------------------------


def test_text_line_of_a_chat() -> None:
    assert access_text(chat_trace()) == (
        "req=req-1 POST /v1/chat/completions model=auto resolved=llama-3.1-8b "
        "node=127.0.0.1:9001 status=200 attempts=1 ms=12.3 ttfb_ms=4.1 tokens=5+16 "
        "upstream=up-7 client=127.0.0.1:50412"
    )


def test_text_line_of_a_stream_with_estimated_tokens_and_a_client_gone() -> None:
    trace = chat_trace(
        requested_model=MODEL, stream=True, prompt_tokens=None, usage_estimated=True,
        completion_tokens=7, client_gone=True, attempts=2, error="upstream_error",
    )
    assert access_text(trace) == (
        "req=req-1 POST /v1/chat/completions model=llama-3.1-8b stream node=127.0.0.1:9001 "
        "status=200 attempts=2 ms=12.3 ttfb_ms=4.1 tokens=?+~7 error=upstream_error "
        "upstream=up-7 client=127.0.0.1:50412 client_gone"
    )


def test_text_line_leaves_out_what_lb_does_not_know() -> None:
    """Bad JSON: refused before routing; no model, node, first byte, tokens."""
    trace = Trace("req-2", "chat", False, "", 5.0, client="10.0.0.9:4000",
                  path="/v1/chat/completions", status=400, error="invalid_json",
                  duration=0.0004)
    assert access_text(trace) == (
        "req=req-2 POST /v1/chat/completions status=400 attempts=0 ms=0.4 error=invalid_json "
        "client=10.0.0.9:4000"
    )


def test_a_value_from_a_client_cannot_forge_a_line_or_a_field() -> None:
    trace = chat_trace(requested_model='x\nINFO lb.access: req=forged status=200 "', model=None,
                       upstream_request_id="a b")
    line = access_text(trace)
    assert "\n" not in line
    assert r'model="x\nINFO lb.access: req=forged status=200 \""' in line
    assert 'upstream="a b"' in line


def test_json_fields() -> None:
    fields = access_fields(chat_trace(stream=True))
    assert fields == {
        "request_id": "req-1", "method": "POST", "path": "/v1/chat/completions",
        "model": "auto", "resolved_model": MODEL, "stream": True, "node": "127.0.0.1:9001",
        "status": 200, "attempts": 1, "hedges": 0, "duration_ms": 12.3, "ttfb_ms": 4.1,
        "prompt_tokens": 5, "completion_tokens": 16, "tokens_estimated": False, "error": None,
        "upstream_request_id": "up-7", "client": "127.0.0.1:50412", "client_gone": False,
    }


def _logger(name: str, stream: io.StringIO, log_format: str, level: int) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers = [make_handler(log_format, stream)]
    logger.propagate = False
    logger.setLevel(level)
    return logger


def flush_logs_of(*names: str) -> None:
    """Info lines are batched (lb flushes them twice a second): write them out now."""
    for name in names:
        for handler in logging.getLogger(name).handlers:
            handler.flush()


def test_access_record_as_text_and_as_json() -> None:
    text, js = io.StringIO(), io.StringIO()
    AccessLog(_logger("test.access.text", text, "text", logging.INFO)).finished(chat_trace())
    AccessLog(_logger("test.access.json", js, "json", logging.INFO)).finished(chat_trace())
    flush_logs_of("test.access.text", "test.access.json")
    line = text.getvalue()
    assert line.endswith(" INFO test.access.text: " + access_text(chat_trace())
                         + "\n")
    assert "[req=" not in line  # the line starts with req= itself
    record = json.loads(js.getvalue())
    assert record.pop("time").endswith("Z")
    assert record == {
        "level": "INFO", "logger": "test.access.json",
        "message": access_text(chat_trace()), **access_fields(chat_trace()),
    }


def test_nothing_is_read_or_built_when_info_is_off() -> None:
    empty = Trace.__new__(Trace)  # no field set: reading any one raises AttributeError
    stream = io.StringIO()
    AccessLog(_logger("test.access.off", stream, "text", logging.WARNING)).finished(empty)
    assert stream.getvalue() == ""
    with pytest.raises(AttributeError):  # with info on, the same trace is read
        AccessLog(_logger("test.access.on", stream, "text", logging.INFO)).finished(empty)


def test_text_lines_show_the_request_id_when_there_is_one() -> None:
    stream = io.StringIO()
    logger = _logger("test.ids", stream, "text", logging.INFO)

    def in_request() -> None:
        REQUEST_ID.set("abc-1")
        logger.warning("inside %s", "a request")

    contextvars.copy_context().run(in_request)
    logger.warning("outside")
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith(" WARNING test.ids [req=abc-1]: inside a request")
    assert outside.endswith(" WARNING test.ids: outside")


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    httpx_level = logging.getLogger("httpx").level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(httpx_level)


def test_configure_logging_json_makes_every_line_one_object(restore_root: None) -> None:
    stream = io.StringIO()
    configure_logging("info", "text")  # replaced by the next call, not doubled
    configure_logging("info", "json", stream)
    assert sum(h.get_name() == "lb" for h in logging.getLogger().handlers) == 1

    def in_request() -> None:
        REQUEST_ID.set("abc-2")
        logging.getLogger("lb.dispatch").warning("attempt %d failed", 1)

    contextvars.copy_context().run(in_request)
    logging.getLogger("lb.scanner").info("node %s is up", "n1")
    logging.getLogger("lb.scanner").debug("not shown at info")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logging.getLogger("lb.http").exception("handler failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    warning, info, error = (json.loads(line) for line in lines)
    assert {key: warning[key] for key in ("level", "logger", "message", "request_id")} == {
        "level": "WARNING", "logger": "lb.dispatch", "message": "attempt 1 failed",
        "request_id": "abc-2",
    }
    assert info["message"] == "node n1 is up" and "request_id" not in info
    assert error["level"] == "ERROR" and "RuntimeError: boom\nsecond line" in error["exc_info"]
    assert sorted(warning) == ["level", "logger", "message", "request_id", "time"]


def test_configure_logging_text(restore_root: None) -> None:
    stream = io.StringIO()
    configure_logging("warning", "text", stream)
    logging.getLogger("lb.scanner").info("not shown at warning")
    logging.getLogger("lb.scanner").warning("shown")
    assert stream.getvalue().endswith(" WARNING lb.scanner: shown\n")
    assert stream.getvalue().count("\n") == 1
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING


def test_lb_serve_with_json_logs_writes_only_json_lines() -> None:
    with lb_serve("--demo", "--log-format", "json") as (process, url):
        answer = httpx.post(
            f"{url}/v1/chat/completions", json={"model": "auto", **CHAT},
            headers={"x-request-id": "cli-1"}, timeout=10,
        )
        assert answer.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert process.stdout is not None and process.stderr is not None
        with process.stdout, process.stderr:
            stderr = process.stderr.read()
    records = [json.loads(line) for line in stderr.splitlines()]
    access = [r for r in records if r["logger"] == "lb.access"]
    assert [(r["request_id"], r["status"], r["attempts"]) for r in access] == [("cli-1", 200, 1)]
    assert any(r["message"].startswith("SIGTERM: draining") for r in records)


def test_log_format_setting() -> None:
    assert Settings().log_format == "text"
    assert load_settings(env={"LB_LOG_FORMAT": "JSON"}).log_format == "json"
    assert load_settings(flags={"log_format": "text"}).log_format == "text"
    with pytest.raises(ConfigError, match="LB_LOG_FORMAT='xml'"):
        load_settings(env={"LB_LOG_FORMAT": "xml"})


# --- end to end ------------------------------------------------------------------------------


@attrs.define
class Logs:
    """What lb logged, through the handlers `lb serve` installs: text and JSON at once."""

    text: io.StringIO
    json: io.StringIO
    handlers: list[logging.Handler] = attrs.field(factory=list)

    def lines(self) -> list[str]:
        self.flush()
        return self.text.getvalue().splitlines()

    def records(self) -> list[dict[str, Any]]:
        self.flush()
        return [json.loads(line) for line in self.json.getvalue().splitlines()]

    def flush(self) -> None:
        """Info lines are batched (lb flushes them twice a second): write them out now."""
        for handler in self.handlers:
            handler.flush()

    def access(self, request_id: str) -> tuple[str, dict[str, Any]]:
        """The access line of a request, as text and as JSON (exactly one of each)."""
        texts = [line for line in self.lines() if f" lb.access: req={request_id} " in line]
        records = [r for r in self.records()
                   if r["logger"] == "lb.access" and r["request_id"] == request_id]
        assert len(texts) == 1 and len(records) == 1, (texts, records)
        return texts[0], records[0]


@pytest.fixture
def logs() -> Iterator[Logs]:
    logger = logging.getLogger("lb")
    captured = Logs(io.StringIO(), io.StringIO())
    handlers = [make_handler("text", captured.text), make_handler("json", captured.json)]
    captured.handlers = handlers
    level = logger.level
    logger.setLevel(logging.DEBUG)
    for handler in handlers:
        logger.addHandler(handler)
    yield captured
    for handler in handlers:
        logger.removeHandler(handler)
    logger.setLevel(level)


async def test_chat(nursery: trio.Nursery, logs: Logs) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tokens=5)
        lb = await start_lb(nursery, [node])
        raw = await sdk_for(lb).chat.completions.with_raw_response.create(
            model="auto", **CHAT, extra_headers={"x-request-id": "chat-1"}
        )
        raw.parse()
    line, record = logs.access("chat-1")
    upstream = raw.headers["x-upstream-request-id"]  # the node's own id ("chat-1" is no UUID)
    assert upstream and upstream != "chat-1"
    assert f"req=chat-1 POST /v1/chat/completions model=auto resolved={MODEL} " \
           f"node={node.key} status=200 attempts=1 ms=" in line
    assert f" tokens=2+5 upstream={upstream} client=127.0.0.1:" in line
    assert record["message"] == line.partition(" lb.access: ")[2]
    assert {k: record[k] for k in (
        "method", "path", "model", "resolved_model", "node", "status", "attempts", "stream",
        "prompt_tokens", "completion_tokens", "tokens_estimated", "error", "upstream_request_id",
        "client_gone",
    )} == {
        "method": "POST", "path": "/v1/chat/completions", "model": "auto",
        "resolved_model": MODEL, "node": node.key, "status": 200, "attempts": 1,
        "stream": False, "prompt_tokens": 2, "completion_tokens": 5, "tokens_estimated": False,
        "error": None, "upstream_request_id": upstream, "client_gone": False,
    }
    assert 0 < record["ttfb_ms"] <= record["duration_ms"]
    assert record["client"].startswith("127.0.0.1:")
    # Lines outside any request (the node found at start) carry no id.
    found = [r for r in logs.records() if r["message"].startswith(f"node {node.key} is up")]
    assert found and "request_id" not in found[0]


async def test_stream(nursery: trio.Nursery, logs: Logs) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,), tokens=6, ttft_ms=30)
        lb = await start_lb(nursery, [node])
        raw = await sdk_for(lb).chat.completions.with_raw_response.create(
            model=MODEL, stream=True, **CHAT  # no usage asked for: lb counts the events
        )
        request_id = raw.headers["x-request-id"]
        chunks = [chunk async for chunk in raw.parse()]
        assert chunks
    line, record = logs.access(request_id)
    assert f"model={MODEL} stream node={node.key} status=200 attempts=1 " in line
    assert "resolved=" not in line and " tokens=?+~6 " in line
    assert record["stream"] is True and record["tokens_estimated"] is True
    assert record["prompt_tokens"] is None and record["completion_tokens"] == 6
    assert 30 <= record["ttfb_ms"] <= record["duration_ms"]  # TTFT: after the node's 30 ms


async def test_unknown_model_is_404_in_the_log(nursery: trio.Nursery, logs: Logs) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk_for(lb).chat.completions.create(model="no-such-model", **CHAT)
    request_id = caught.value.response.headers["x-request-id"]
    line, record = logs.access(request_id)
    assert f"req={request_id} POST /v1/chat/completions model=no-such-model status=404 " \
           "attempts=0 ms=" in line
    assert " error=model_not_found client=127.0.0.1:" in line
    assert "node=" not in line and "ttfb_ms" not in line
    assert (record["status"], record["error"], record["node"], record["ttfb_ms"]) == (
        404, "model_not_found", None, None)


async def test_bad_json_is_400_in_the_log(nursery: trio.Nursery, logs: Logs) -> None:
    with trio.fail_after(10):
        node = await start_mock(nursery, models=(MODEL,))
        lb = await start_lb(nursery, [node])
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{lb.url}/v1/chat/completions", content=b'{"model": "x", ',
                headers={"content-type": "application/json", "x-request-id": "bad-1"},
            )
        assert answer.status_code == 400
    line, record = logs.access("bad-1")
    assert " lb.access: req=bad-1 POST /v1/chat/completions status=400 attempts=0 ms=" in line
    assert " error=invalid_json client=127.0.0.1:" in line
    assert (record["model"], record["resolved_model"], record["attempts"]) == ("", None, 0)


async def _failover(nursery: trio.Nursery, **options: Any) -> tuple[Running, Running, Running]:
    """Two nodes, round robin; the first fails every request once lb saw it healthy."""
    bad = await start_mock(nursery, models=(MODEL,))
    good = await start_mock(nursery, models=(MODEL,))
    lb = await start_lb(nursery, [bad, good], routing_strategy="ROUND_ROBIN", **options)
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"{bad.url}/mock/fault", json={"fault": "status=503"})
        answer.raise_for_status()
    return bad, good, lb


async def test_failover_and_the_warning_carry_the_request_id(
    nursery: trio.Nursery, logs: Logs
) -> None:
    with trio.fail_after(10):
        bad, good, lb = await _failover(nursery)
        client = sdk_for(lb)
        answers = [await client.chat.completions.with_raw_response.create(model=MODEL, **CHAT)
                   for _ in range(2)]  # round robin: one of the two goes to the bad node first
    failed_over = [a.headers["x-request-id"] for a in answers if a.headers["x-attempts"] == "2"]
    assert len(failed_over) == 1
    request_id = failed_over[0]
    line, record = logs.access(request_id)
    assert f" node={good.key} status=200 attempts=2 " in line
    assert (record["node"], record["attempts"], record["status"]) == (good.key, 2, 200)
    warned = f"attempt 1 on {bad.key} failed"
    texts = [line for line in logs.lines() if warned in line]
    assert len(texts) == 1 and f" WARNING lb.dispatch [req={request_id}]: " in texts[0]
    records = [r for r in logs.records() if warned in r["message"]]
    assert len(records) == 1 and records[0]["request_id"] == request_id
    assert records[0]["logger"] == "lb.dispatch" and records[0]["level"] == "WARNING"


async def test_no_secret_reaches_a_log_line(nursery: trio.Nursery, logs: Logs) -> None:
    secrets = ["sk-secret-api-key-1", "xk-secret-x-api-key-2", "cookie-secret-3",
               "admin-secret-4"]
    with trio.fail_after(10):
        bad, _good, lb = await _failover(nursery, admin_key=secrets[3])
        client = openai.AsyncOpenAI(
            base_url=f"{lb.url}/v1", api_key=secrets[0], max_retries=0,
            default_headers={"x-api-key": secrets[1], "cookie": f"session={secrets[2]}"},
        )
        for _ in range(2):
            await client.chat.completions.create(model=MODEL, **CHAT)
        stream = await client.chat.completions.create(model=MODEL, stream=True, **CHAT)
        assert [chunk async for chunk in stream]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="no-such-model", **CHAT)
        async with httpx.AsyncClient() as http:
            headers = {"authorization": f"Bearer {secrets[0]}", "x-api-key": secrets[1],
                       "cookie": f"session={secrets[2]}"}
            refused = await http.post(f"{lb.url}/v1/chat/completions", content=b"{",
                                      headers=headers)
            assert refused.status_code == 400
            nodes = await http.get(f"{lb.url}/v1/nodes",
                                   headers={"authorization": f"Bearer {secrets[3]}"})
            assert nodes.status_code == 200
    logs.flush()
    text, js = logs.text.getvalue(), logs.json.getvalue()
    assert f"attempt 1 on {bad.key} failed" in text  # a failure was logged (at debug level)
    assert text.count(" lb.access: ") == 5 and js.count('"logger":"lb.access"') == 5
    for secret in secrets:
        assert secret not in text and secret not in js


def test_info_lines_are_batched_and_warnings_go_out_at_once() -> None:
    stream = io.StringIO()
    logger = _logger("test.batching", stream, "text", logging.INFO)
    logger.info("first")
    logger.info("second")
    assert stream.getvalue() == ""  # gathered: one write for many access lines
    logger.warning("trouble")
    assert stream.getvalue().splitlines()[-1].endswith("trouble")  # with what came before
    assert len(stream.getvalue().splitlines()) == 3
    for _ in range(BATCH_BYTES // 40 + 1):
        logger.info("x" * 40)
    assert len(stream.getvalue()) > BATCH_BYTES  # a full batch goes out by itself
    flush_logs_of("test.batching")
    assert stream.getvalue().endswith("x" * 40 + "\n")
