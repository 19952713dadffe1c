"""The mock upstream LLM node: an OpenAI-compatible server with knobs for latency and faults.

It stands in for LM Studio, Ollama, llama.cpp or vLLM in lb's tests, benchmarks and demo, so
it must be cheap per request: no logging, answers built from precomputed byte fragments where
the shape is fixed (stream chunks), and orjson for the rest.

Endpoints: `GET /v1/models`, `GET /api/tags` (Ollama discovery), `GET /health`,
`POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/embeddings`, Ollama's native
`POST /api/chat`, `/api/generate` and `/api/embed` (see lb.testing.mock_ollama), and the control
endpoints `GET /mock/stats`, `POST /mock/reset`, `GET|POST /mock/fault`, `GET /mock/requests`.
Faults (see lb.testing.faults) apply node-wide or per request (header `x-mock-fault`, which
wins); control endpoints are never faulted, counted or recorded.

Node-wide options play the quirks of real servers that users hit:

- `busy_probes`: while an answer is being generated (a request in flight on chat, completions
  or embeddings), `GET /v1/models` and `GET /api/tags` do not answer; they wait until no
  generation is in flight, then answer, like llama-cpp-python's single worker. A prober with a
  timeout sees a timeout. (`/health` still answers.)
- `strict_request_id`: a POST whose `x-request-id` is not a UUID (`uuid.UUID` refuses it) is
  answered `400` with an empty body, as llama-cpp-python does.
- `honours_max_completion_tokens=False`: `max_completion_tokens` is ignored and only
  `max_tokens` cuts the answer, as in llama-cpp-python (by default `max_completion_tokens`,
  when given, wins over `max_tokens`).

Two opt-in models of a real server's time to first token, for routing benchmarks:

- `prefix_cache`: a chat or completions prompt (each message's role and text, or the prompt)
  is cut into `CACHE_BLOCK`-byte blocks hashed as a chain (a block's hash covers every block
  before it, the last one may be short). The node keeps an LRU of `cache_entries` block hashes
  it has answered; TTFT grows by `prefill_ms_per_kb` per KiB of the prompt after its longest
  cached prefix. Once the answer is sent in full, all the prompt's blocks are cached.
  `/mock/stats` reports `prefix_cache: {hits_bytes, miss_bytes, entries}`; `/mock/reset`
  empties the cache.
- `ttft_per_inflight_ms`: TTFT grows by that much per other generation request (chat,
  completions, embeddings) in flight on the node when the request arrives.

`tool_calls=True` answers a chat request that offers tools with a tool call (see
lb.testing.tools), for clients' tool handling end to end.

The fault item `drop-after-done=1` plays llama-cpp-python's end of a stream when the context
fills: every event, `data: [DONE]` included, then the connection closes without the chunked
body's last chunk.

`dialect="anthropic"` makes the node play Anthropic's Messages API instead of OpenAI's (see
lb.testing.mock_anthropic). `api_key`, when set, must come with every API request
(`Authorization: Bearer <key>`, or Anthropic's `x-api-key`), else 401.

A chat request with `continue_final_message: true` (vLLM's native prefill) goes on from the
trailing assistant message: its words count as the answer's first tokens, so a continued answer
is what one node would have streamed whole (STREAM_RESUME's tests rely on it).

`GET /mock/requests` shows the last requests as received: `headers` maps each name (lower-case,
as h11 gives it) to its value, repeated headers joined with ", " in the order received, and
`raw_headers` lists the `[name, value]` pairs exactly in the order received, repeats included.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import orjson
import trio

from lb.errors import BadRequest, LBError, ModelNotFound, Unauthorized
from lb.http.errors import error_body, error_headers
from lb.http.routes import Router
from lb.http.server import HTTPServer, ServerLimits
from lb.http.sse import DONE, SSE_HEADERS, error_event
from lb.http.types import (
    JSON_HEADERS,
    ClientGone,
    Handler,
    Request,
    Response,
    ResponseSink,
    StreamBody,
)
from lb.testing import tools
from lb.testing.embeddings import embed, embed_tokens, to_base64, words
from lb.testing.faults import FaultSpec, FaultSpecError, parse_fault

RECENT_REQUESTS = 50
CACHE_BLOCK = 256  # bytes per prefix-cache block
MAX_EMBEDDING_DIM = 8192
# The answer text: `tokens` of these words, cycled (deltas carry a leading space after the first).
WORDS = (
    "Lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do",
    "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua", "Ut",
    "enim", "ad", "minim", "veniam", "quis", "nostrud", "exercitation", "ullamco", "laboris",
    "nisi", "aliquip", "ex", "ea", "commodo", "consequat",
)
_MODEL_CREATED = 1_700_000_000
_GENERATE, _PROBE, _OTHER = "generate", "probe", "other"  # endpoint kinds, for busy probes


class DropConnection(ClientGone):
    """Raised from a stream writer so that the server closes the connection mid-answer.

    A ClientGone, so the server closes the connection quietly without another byte; the
    client sees a truncated chunked body (or no answer at all, before the head).
    """


@attrs.define
class MockStats:
    """Counters of API requests (control endpoints excluded)."""

    requests: int = 0
    by_path: dict[str, int] = attrs.field(factory=dict)
    concurrent: int = 0
    max_concurrent: int = 0
    disconnects: int = 0  # the client went away before the answer was complete
    completed: int = 0  # answered in full, whatever the status
    errors: int = 0  # of those, answers with status >= 400
    faults_injected: int = 0  # requests a fault spec was applied to (after `rate`)
    dropped: int = 0  # connections closed on purpose by `drop-after` or `drop-after-done`

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def reset(self) -> None:
        """Zero the counters; requests in flight stay counted in `concurrent`."""
        in_flight = self.concurrent
        for field in attrs.fields(MockStats):
            setattr(self, field.name, field.default)
        self.by_path = {}
        self.concurrent = self.max_concurrent = in_flight


@attrs.define(slots=True)
class _Knobs:
    """The effective per-request settings: node defaults with the fault's overrides."""

    ttft: float  # seconds
    itl: float  # seconds
    tokens: int
    drop_after: int | None
    drop_after_done: bool
    error_after: int | None = None


_Endpoint = Callable[[Request, _Knobs], Awaitable[Response]]


def _check_fault(_node: Any, _attr: Any, value: str) -> None:
    parse_fault(value)


def _to_models(value: Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.define(eq=False)
class MockNode:
    """One fake LLM server. `handler` is its Router; `serve` listens on host:port."""

    models: Sequence[str] = attrs.field(default=("mock-model",), converter=_to_models)
    ttft_ms: float = 0
    itl_ms: float = 0
    tokens: int = 8
    embedding_dim: int = 64
    fault: str = attrs.field(default="", validator=_check_fault)
    name: str = "mock"
    seed: int = 0
    busy_probes: bool = False
    strict_request_id: bool = False
    honours_max_completion_tokens: bool = True
    prefix_cache: bool = False
    prefill_ms_per_kb: float = attrs.field(default=20.0, validator=attrs.validators.ge(0))
    cache_entries: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    ttft_per_inflight_ms: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    tool_calls: bool = False  # answer requests that offer tools with a call (lb.testing.tools)
    dialect: str = attrs.field(
        default="openai", validator=attrs.validators.in_(("openai", "anthropic"))
    )
    api_key: str = ""
    stats: MockStats = attrs.field(factory=MockStats, init=False)
    server: HTTPServer | None = attrs.field(default=None, init=False)
    _router: Router = attrs.field(init=False)
    _rng: random.Random = attrs.field(init=False)
    _recent: collections.deque[tuple[str, str, list[tuple[bytes, bytes]], bytes]] = attrs.field(
        init=False, factory=lambda: collections.deque(maxlen=RECENT_REQUESTS)
    )
    _ids: itertools.count[int] = attrs.field(init=False, factory=lambda: itertools.count(1))
    _generating: int = attrs.field(init=False, default=0)  # generation requests in flight
    _idle: trio.lowlevel.ParkingLot = attrs.field(init=False, factory=trio.lowlevel.ParkingLot)
    # Prefix cache: block hashes, least recently used first, and bytes found / not found.
    _cache: collections.OrderedDict[bytes, None] = attrs.field(
        init=False, factory=collections.OrderedDict
    )
    _cache_hits: int = attrs.field(init=False, default=0)
    _cache_misses: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._router = self._build_router()

    @property
    def handler(self) -> Router:
        return self._router

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled; `nursery.start` returns the bound port."""
        self.server = HTTPServer(self._router, ServerLimits())
        await self.server.serve_tcp(host, port, task_status=task_status)

    async def serve_listeners(
        self, listeners: Sequence[trio.SocketListener], *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on sockets already listening (lb.testing.processes) until cancelled."""
        self.server = HTTPServer(self._router, ServerLimits())
        await self.server.serve(listeners, task_status=task_status)

    def set_fault(self, spec: str) -> FaultSpec:
        """Change the node-wide fault (raises FaultSpecError) and reseed the fault RNG."""
        parsed = parse_fault(spec)
        self.fault = spec
        self._rng.seed(self.seed)
        return parsed

    def reset(self) -> None:
        """Zero the counters, forget recorded requests, empty the prefix cache and reseed the
        fault RNG."""
        self.stats.reset()
        self._recent.clear()
        self._cache.clear()
        self._cache_hits = self._cache_misses = 0
        self._rng.seed(self.seed)

    def stats_dict(self) -> dict[str, Any]:
        """What `GET /mock/stats` answers: the counters, and the prefix cache's if it is on."""
        out = self.stats.as_dict()
        if self.prefix_cache:
            out["prefix_cache"] = {
                "hits_bytes": self._cache_hits,
                "miss_bytes": self._cache_misses,
                "entries": len(self._cache),
            }
        return out

    def recent_requests(self) -> list[dict[str, Any]]:
        """The last requests received, oldest first: method, path, headers (name to value,
        repeated names joined with ", " in the order received), raw_headers (the `[name,
        value]` pairs in the order received, repeats included), body (JSON if it parses, else
        text) and raw_body (the bytes as text). Names are lower-case, as h11 gives them."""
        out = []
        for method, path, headers, raw in self._recent:
            body: Any
            try:
                body = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                body = raw.decode("utf-8", "replace")
            pairs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers]
            joined: dict[str, str] = {}
            for name, value in pairs:
                joined[name] = f"{joined[name]}, {value}" if name in joined else value
            out.append({
                "method": method,
                "path": path,
                "headers": joined,
                "raw_headers": pairs,
                "body": body,
                "raw_body": raw.decode("utf-8", "replace"),
            })
        return out

    # -- routing and bookkeeping ---------------------------------------------------------------

    def _build_router(self) -> Router:
        router = Router()
        if self.dialect == "anthropic":
            from lb.testing.mock_anthropic import add_routes

            add_routes(self, router)
        else:
            router.add("GET", "/v1/models", self._api(self._models, _PROBE))
            router.add("GET", "/api/tags", self._api(self._tags, _PROBE))
            router.add("POST", "/v1/chat/completions", self._api(self._chat, _GENERATE))
            router.add("POST", "/v1/completions", self._api(self._completions, _GENERATE))
            router.add("POST", "/v1/embeddings", self._api(self._embeddings, _GENERATE))
            from lb.testing import mock_ollama  # here: it builds on this module

            mock_ollama.add_routes(router, self)
        router.add("GET", "/health", self._api(self._health, _OTHER))
        router.add("GET", "/mock/stats", self._get_stats)
        router.add("POST", "/mock/reset", self._post_reset)
        router.add("GET", "/mock/fault", self._get_fault)
        router.add("POST", "/mock/fault", self._post_fault)
        router.add("GET", "/mock/requests", self._get_requests)
        return router

    def _api(
        self, endpoint: _Endpoint, kind: str, render: Callable[[LBError], bytes] = error_body
    ) -> Handler:
        """Wrap an API endpoint with counting, recording, the node's quirks and fault
        injection. `kind`: _GENERATE (counted as a generation in flight until its answer is
        complete), _PROBE (waits for no generation in flight under `busy_probes`) or _OTHER.
        `render`: an error's body in the endpoint's dialect (OpenAI's by default)."""
        generates = kind == _GENERATE
        probe = kind == _PROBE

        async def handle(request: Request) -> Response:
            stats = self.stats
            stats.requests += 1
            path = request.path
            stats.by_path[path] = stats.by_path.get(path, 0) + 1
            # A copy: the record must stay what was received whatever later changes the list.
            self._recent.append((request.method, path, list(request.headers), request.body))
            stats.concurrent += 1
            if stats.concurrent > stats.max_concurrent:
                stats.max_concurrent = stats.concurrent
            if generates:
                self._generating += 1
            streaming = False
            try:
                if probe and self.busy_probes:
                    while self._generating:
                        await self._idle.park()
                if self.strict_request_id and request.method == "POST":
                    request_id = request.header(b"x-request-id")
                    if request_id is not None and not _is_uuid(request_id):
                        # llama-cpp-python's answer: a bare 400, no body at all.
                        stats.completed += 1
                        stats.errors += 1
                        return Response(400, [(b"x-mock-node", self.name.encode())])
                if self.api_key and kind != _OTHER:
                    self._check_key(request)
                fault = self._fault_for(request)
                knobs = self._knobs(fault)
                if fault is not None:
                    if fault.hang:
                        await trio.sleep_forever()
                    if fault.status is not None:
                        if fault.ttft_ms:
                            await trio.sleep(fault.ttft_ms / 1000)
                        raise self._fault_error(fault)
                response = await endpoint(request, knobs)
                if knobs.drop_after == 0 and response.stream is None:
                    response = Response(200, list(JSON_HEADERS), stream=_drop_now)
                headers = [*response.headers, (b"x-mock-node", self.name.encode())]
                if response.stream is not None:
                    streaming = True
                    return attrs.evolve(
                        response, headers=headers,
                        stream=self._tracked(response.stream, generates),
                    )
                stats.completed += 1
                return attrs.evolve(response, headers=headers)
            except trio.Cancelled:
                stats.disconnects += 1
                raise
            except LBError as exc:
                stats.completed += 1
                stats.errors += 1
                body = render(exc)
                headers = [*error_headers(exc, body), (b"x-mock-node", self.name.encode())]
                return Response(exc.status, headers, body)
            finally:
                if not streaming:
                    stats.concurrent -= 1
                    if generates:
                        self._generation_ended()

        return handle

    def _generation_ended(self) -> None:
        self._generating -= 1
        if not self._generating:
            self._idle.unpark_all()  # busy probes waiting for an idle node

    def _tracked(self, writer: StreamBody, generates: bool) -> StreamBody:
        """Count a streamed answer's end: completed, dropped on purpose, or client gone."""

        async def write(sink: ResponseSink) -> None:
            stats = self.stats
            try:
                await writer(sink)
            except DropConnection:
                stats.dropped += 1
                raise
            except (trio.Cancelled, ClientGone):
                stats.disconnects += 1
                raise
            else:
                stats.completed += 1
            finally:
                stats.concurrent -= 1
                if generates:
                    self._generation_ended()

        return write

    def _check_key(self, request: Request) -> None:
        if self.dialect == "anthropic":
            from lb.testing.mock_anthropic import check_key

            check_key(self, request)
        elif request.header(b"authorization") != b"Bearer " + self.api_key.encode():
            raise Unauthorized(f"Invalid API key for mock node {self.name}")

    def _fault_for(self, request: Request) -> FaultSpec | None:
        """The fault to apply to this request, if any (the header wins over the node's)."""
        raw = request.header(b"x-mock-fault")
        if raw is None:
            if not self.fault:
                return None
            spec = parse_fault(self.fault)
        else:
            try:
                spec = parse_fault(raw.decode("latin-1"))
            except FaultSpecError as exc:
                raise BadRequest(str(exc), code="invalid_fault", param="x-mock-fault") from None
        if spec.empty:
            return None
        if spec.rate < 1.0 and self._rng.random() >= spec.rate:
            return None
        self.stats.faults_injected += 1
        return spec

    def _knobs(self, fault: FaultSpec | None) -> _Knobs:
        if fault is None:
            return _Knobs(self.ttft_ms / 1000, self.itl_ms / 1000, self.tokens, None, False)
        return _Knobs(
            (self.ttft_ms if fault.ttft_ms is None else fault.ttft_ms) / 1000,
            (self.itl_ms if fault.itl_ms is None else fault.itl_ms) / 1000,
            self.tokens if fault.tokens is None else fault.tokens,
            fault.drop_after,
            fault.drop_after_done,
            fault.error_after,
        )

    def _fault_error(self, fault: FaultSpec) -> LBError:
        assert fault.status is not None
        return LBError(
            f"Injected fault: status {fault.status} from mock node {self.name}",
            status=fault.status, code="mock_fault", retry_after=fault.retry_after,
        )

    def _timed(
        self, knobs: _Knobs, prompt: bytes | None
    ) -> tuple[_Knobs, Callable[[], None] | None]:
        """The knobs with TTFT grown by the capacity model and, for a `prompt` under
        `prefix_cache`, the prefill of its uncached bytes; and what to call once the answer is
        sent in full (caching the prompt's blocks), if anything."""
        extra = self.ttft_per_inflight_ms * max(self._generating - 1, 0)
        on_done: Callable[[], None] | None = None
        if self.prefix_cache and prompt is not None:
            hashes = _block_hashes(prompt)
            cached = 0
            for i, digest in enumerate(hashes):
                if digest not in self._cache:
                    break
                self._cache.move_to_end(digest)
                cached = min((i + 1) * CACHE_BLOCK, len(prompt))
            uncached = len(prompt) - cached
            self._cache_hits += cached
            self._cache_misses += uncached
            extra += self.prefill_ms_per_kb * uncached / 1024
            on_done = functools.partial(self._cache_store, hashes)
        if extra:
            knobs = attrs.evolve(knobs, ttft=knobs.ttft + extra / 1000)
        return knobs, on_done

    def _cache_store(self, hashes: list[bytes]) -> None:
        cache = self._cache
        for digest in hashes:
            cache[digest] = None
            cache.move_to_end(digest)
        while len(cache) > self.cache_entries:
            cache.popitem(last=False)

    def _check_model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required and must be a string", param="model")
        if model not in self.models:
            raise ModelNotFound(f"The model `{model}` does not exist on mock node {self.name}")
        return model

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{self.name}-{next(self._ids)}"

    # -- API endpoints -------------------------------------------------------------------------

    async def _models(self, request: Request, knobs: _Knobs) -> Response:
        data = [
            {"id": m, "object": "model", "created": _MODEL_CREATED, "owned_by": self.name}
            for m in self.models
        ]
        return Response.json({"object": "list", "data": data})

    async def _tags(self, request: Request, knobs: _Knobs) -> Response:
        return Response.json({"models": [_ollama_tag(m) for m in self.models]})

    async def _health(self, request: Request, knobs: _Knobs) -> Response:
        return Response.json({"status": "ok"})

    async def _chat(self, request: Request, knobs: _Knobs) -> Response:
        body = _json_body(request)
        model = self._check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array", param="messages")
        prompt_tokens = sum(_message_words(m) for m in messages)
        start = _continued_from(body, messages)
        n, finish = _completion_length(
            body, max(knobs.tokens - start, 0), self.honours_max_completion_tokens
        )
        knobs, on_done = self._timed(
            knobs, _chat_prompt_bytes(messages) if self.prefix_cache else None
        )
        created = int(time.time())
        cid = self._new_id("chatcmpl")
        if self.tool_calls and (tool := tools.wanted_tool(body)) is not None:
            usage = _usage(prompt_tokens, len(tools.arguments_for(body, tool)) // 4)
            return tools.tool_answer(body, tool, cid, created, model, usage, knobs.ttft)
        if body.get("stream") is True:
            return _stream(
                _CHAT, cid, created, model, n, finish,
                _usage(prompt_tokens, n) if _include_usage(body) else None, knobs, on_done,
                start,
            )
        await _generate_delay(knobs, n)
        if on_done is not None:
            on_done()
        text = _answer_text(n) if not start else _answer_text(start + n)[len(_answer_text(start)):]
        return Response.json({
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }],
            "usage": _usage(prompt_tokens, n),
        })

    async def _completions(self, request: Request, knobs: _Knobs) -> Response:
        body = _json_body(request)
        model = self._check_model(body)
        prompt = body.get("prompt")
        prompt_tokens = _prompt_words(prompt)
        n, finish = _completion_length(
            body, knobs.tokens, self.honours_max_completion_tokens
        )
        knobs, on_done = self._timed(
            knobs, _completion_prompt_bytes(prompt) if self.prefix_cache else None
        )
        created = int(time.time())
        cid = self._new_id("cmpl")
        if body.get("stream") is True:
            return _stream(
                _TEXT, cid, created, model, n, finish,
                _usage(prompt_tokens, n) if _include_usage(body) else None, knobs, on_done,
            )
        await _generate_delay(knobs, n)
        if on_done is not None:
            on_done()
        return Response.json({
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0, "text": _answer_text(n), "logprobs": None, "finish_reason": finish,
            }],
            "usage": _usage(prompt_tokens, n),
        })

    async def _embeddings(self, request: Request, knobs: _Knobs) -> Response:
        body = _json_body(request)
        model = self._check_model(body)
        dim = body.get("dimensions", self.embedding_dim)
        if not _is_int(dim) or not 1 <= dim <= MAX_EMBEDDING_DIM:
            raise BadRequest(
                f"'dimensions' must be an integer from 1 to {MAX_EMBEDDING_DIM}",
                param="dimensions",
            )
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadRequest(
                "'encoding_format' must be 'float' or 'base64'", param="encoding_format"
            )
        vectors, prompt_tokens = _embed_input(body.get("input"), dim)
        knobs, _ = self._timed(knobs, None)
        if knobs.ttft:
            await trio.sleep(knobs.ttft)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": to_base64(v) if encoding == "base64" else v,
            }
            for i, v in enumerate(vectors)
        ]
        return Response.json({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        })

    # -- control endpoints ---------------------------------------------------------------------

    async def _get_stats(self, request: Request) -> Response:
        return Response.json(self.stats_dict())

    async def _post_reset(self, request: Request) -> Response:
        self.reset()
        return Response.json(self.stats_dict())

    async def _get_fault(self, request: Request) -> Response:
        return Response.json({"fault": parse_fault(self.fault).format()})

    async def _post_fault(self, request: Request) -> Response:
        body = _json_body(request)
        spec = body.get("fault")
        if not isinstance(spec, str):
            raise BadRequest("body must be {\"fault\": \"<spec>\"}", param="fault")
        try:
            parsed = self.set_fault(spec)
        except FaultSpecError as exc:
            raise BadRequest(str(exc), code="invalid_fault", param="fault") from None
        return Response.json({"fault": parsed.format()})

    async def _get_requests(self, request: Request) -> Response:
        return Response.json(self.recent_requests())


# -- helpers (pure, module level so they are cheap to call) ------------------------------------


async def _drop_now(sink: ResponseSink) -> None:
    # Raised before any byte: the server closes the connection without answering.
    raise DropConnection("mock fault: drop-after=0")


def _is_uuid(value: bytes) -> bool:
    try:
        uuid.UUID(value.decode("ascii"))
    except ValueError:  # UnicodeDecodeError included
        return False
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object")
    return body


def _message_words(message: Any) -> int:
    if not isinstance(message, dict):
        raise BadRequest("each message must be an object", param="messages")
    content = message.get("content")
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return sum(
            len(part["text"].split())
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _block_hashes(prompt: bytes) -> list[bytes]:
    """The prompt's CACHE_BLOCK-byte blocks (the last may be short), hashed as a chain: each
    hash covers its block and every block before it."""
    hashes: list[bytes] = []
    previous = b""
    for start in range(0, len(prompt), CACHE_BLOCK):
        previous = hashlib.blake2b(
            previous + prompt[start:start + CACHE_BLOCK], digest_size=16
        ).digest()
        hashes.append(previous)
    return hashes


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"] for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _chat_prompt_bytes(messages: list[Any]) -> bytes:
    """The prefix cache's view of a chat prompt: each message's role and text, then a newline.
    (The messages were checked by _message_words.)"""
    return "".join(
        f"{m.get('role', '')}\n{_message_text(m.get('content'))}\n" for m in messages
    ).encode()


def _completion_prompt_bytes(prompt: Any) -> bytes:
    """The prefix cache's view of a completions prompt: the text (strings joined by newlines),
    or the token ids as JSON. (The prompt was checked by _prompt_words.)"""
    if isinstance(prompt, str):
        return prompt.encode()
    if all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt).encode()
    return orjson.dumps(prompt)


def _prompt_words(prompt: Any) -> int:
    """Words in a completions prompt: a string, strings, token ids or lists of token ids."""
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return sum(len(p.split()) for p in prompt)
        if all(_is_int(p) for p in prompt):
            return len(prompt)
        if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
            return sum(len(p) for p in prompt)
    raise BadRequest("'prompt' must be a string, an array of strings or an array of token ids",
        param="prompt",
    )


def _embed_input(value: Any, dim: int) -> tuple[list[list[float]], int]:
    """Vectors and word count for `input`: a string, strings, token ids or lists of them."""
    if isinstance(value, str):
        return [embed(value, dim)], len(words(value))
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [embed(v, dim) for v in value], sum(len(words(v)) for v in value)
        if all(_is_int(v) for v in value):
            return [embed_tokens(value, dim)], len(value)
        if all(isinstance(v, list) and all(_is_int(t) for t in v) for v in value):
            return [embed_tokens(v, dim) for v in value], sum(len(v) for v in value)
    raise BadRequest("'input' must be a non-empty string, array of strings or array of token ids",
        param="input",
    )


def _continued_from(body: dict[str, Any], messages: list[Any]) -> int:
    """vLLM's `continue_final_message`: the answer goes on from the trailing assistant
    message, whose words are the answer's first tokens (the mock's tokens are words), so the
    continuation is what one uninterrupted answer would have been. Like vLLM, it refuses the
    flag with `add_generation_prompt` (true by default) or without an assistant message last."""
    if body.get("continue_final_message") is not True:
        return 0
    if body.get("add_generation_prompt", True) is not False:
        raise BadRequest(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )
    last = messages[-1]
    if last.get("role") != "assistant":
        raise BadRequest(
            "continue_final_message needs the final message to be the assistant's",
            param="messages",
        )
    return _message_words(last)


def _completion_length(
    body: dict[str, Any], tokens: int, honours_max_completion_tokens: bool = True
) -> tuple[int, str]:
    """Tokens to answer and the finish reason: a limit shorter than the answer cuts it. The
    limit is `max_completion_tokens` if given, else `max_tokens`; a node that does not honour
    `max_completion_tokens` (llama-cpp-python) looks at `max_tokens` only."""
    limit = body.get("max_tokens")
    if honours_max_completion_tokens:
        limit = body.get("max_completion_tokens", limit)
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < tokens:
        return limit, "length"
    return tokens, "stop"


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token_text(i: int) -> str:
    word = WORDS[i % len(WORDS)]
    return word if i == 0 else " " + word


@functools.lru_cache(maxsize=64)
def _answer_text(n: int) -> str:
    return "".join(_token_text(i) for i in range(n))


async def _generate_delay(knobs: _Knobs, n: int) -> None:
    """A non-stream answer takes as long as the stream would: TTFT, then n-1 gaps."""
    delay = knobs.ttft + knobs.itl * max(n - 1, 0)
    if delay > 0:
        await trio.sleep(delay)


def _ollama_tag(model: str) -> dict[str, Any]:
    return {
        "name": model,
        "model": model,
        "modified_at": "2024-01-01T00:00:00Z",
        "size": 0,
        "digest": hashlib.sha256(model.encode()).hexdigest(),
        "details": {
            "format": "gguf", "family": "mock", "parameter_size": "1B",
            "quantization_level": "Q4_0",
        },
    }


# -- streaming -----------------------------------------------------------------------------------
# Each SSE event is a per-request head (id, object, created, model) plus a precomputed tail.


@attrs.frozen
class _StreamKind:
    object: bytes
    role_tail: bytes | None  # chat sends an assistant-role chunk first
    token_tail: Callable[[int], bytes]
    finish_tail: Callable[[str], bytes]


@functools.lru_cache(maxsize=4096)
def _chat_token_tail(i: int) -> bytes:
    text = orjson.dumps(_token_text(i))
    return b'"delta":{"content":' + text + b'},"logprobs":null,"finish_reason":null}]}\n\n'


@functools.lru_cache(maxsize=4096)
def _text_token_tail(i: int) -> bytes:
    text = orjson.dumps(_token_text(i))
    return b'"text":' + text + b',"logprobs":null,"finish_reason":null}]}\n\n'


@functools.lru_cache(maxsize=8)
def _chat_finish_tail(reason: str) -> bytes:
    return b'"delta":{},"logprobs":null,"finish_reason":' + orjson.dumps(reason) + b"}]}\n\n"


@functools.lru_cache(maxsize=8)
def _text_finish_tail(reason: str) -> bytes:
    return b'"text":"","logprobs":null,"finish_reason":' + orjson.dumps(reason) + b"}]}\n\n"


_CHAT = _StreamKind(
    b"chat.completion.chunk",
    b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n',
    _chat_token_tail,
    _chat_finish_tail,
)
_TEXT = _StreamKind(b"text_completion", None, _text_token_tail, _text_finish_tail)


def _stream(
    kind: _StreamKind, cid: str, created: int, model: str, n: int, finish: str,
    usage: dict[str, int] | None, knobs: _Knobs, on_done: Callable[[], None] | None = None,
    start: int = 0,
) -> Response:
    """An SSE answer: [role], one chunk per token, finish, [usage], [DONE]; TTFT and ITL
    delays and `drop-after` apply to these frames, and `drop-after-done` drops the connection
    after the last of them (in place of the chunked body's last chunk). `on_done` is called
    once every frame is sent, unless `drop-after` cut them. `start`: the index of the first
    token (a continued answer's)."""
    id_json = orjson.dumps(cid)
    model_json = orjson.dumps(model)
    created_bytes = str(created).encode()
    head = (
        b'data: {"id":' + id_json + b',"object":"' + kind.object + b'","created":'
        + created_bytes + b',"model":' + model_json + b',"choices":[{"index":0,'
    )
    frames: list[bytes] = []
    if kind.role_tail is not None:
        frames.append(head + kind.role_tail)
    first_token = len(frames)
    token_tail = kind.token_tail
    frames.extend([head + token_tail(i) for i in range(start, start + n)])
    frames.append(head + kind.finish_tail(finish))
    if usage is not None:
        frames.append(
            b'data: {"id":' + id_json + b',"object":"' + kind.object + b'","created":'
            + created_bytes + b',"model":' + model_json + b',"choices":[],"usage":'
            + orjson.dumps(usage) + b"}\n\n"
        )
    frames.append(DONE)
    if knobs.error_after is not None and knobs.error_after < len(frames) - 1:
        frames[knobs.error_after:] = [error_event({"error": {
            "message": "Injected fault: error event (error-after)", "type": "server_error",
            "param": None, "code": "mock_fault",
        }})]

    # Frames that wait `itl` first: every token after the first.
    gap_from, gap_to = first_token + 1, first_token + n
    write = frames_writer(frames, knobs, lambda i, _: gap_from <= i < gap_to, on_done)
    return Response(200, list(SSE_HEADERS), stream=write)


def frames_writer(
    frames: list[bytes], knobs: _Knobs, waits: Callable[[int, bytes], bool],
    on_done: Callable[[], None] | None, cut: bool = False,
) -> StreamBody:
    """A streamed answer of `frames` in any dialect: TTFT before the first, ITL before each
    frame `waits(index, frame)` picks (all at once without an ITL), cut by `drop-after=N`
    and dropped after `drop-after-done`. `on_done` runs for an answer sent whole (`cut`: it
    was not, an error fault ended it)."""
    drop: str | None = None  # why the connection is dropped after the frames, if it is
    if knobs.drop_after is not None and knobs.drop_after < len(frames):
        frames, cut = frames[: knobs.drop_after], True
        drop = f"drop-after={knobs.drop_after}"
    elif knobs.drop_after_done:
        drop = "drop-after-done=1"
    ttft, itl = knobs.ttft, knobs.itl

    async def write(sink: ResponseSink) -> None:
        send = sink.send
        if ttft > 0:
            await trio.sleep(ttft)
        if itl <= 0:
            await send(b"".join(frames))  # one write: far fewer syscalls under load
        else:
            for i, frame in enumerate(frames):
                if waits(i, frame):
                    await trio.sleep(itl)
                await send(frame)
        if on_done is not None and not cut:
            on_done()
        if drop is not None:
            raise DropConnection(f"mock fault: {drop}")

    return write
