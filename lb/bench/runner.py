"""Sends a bench's requests and times them: the only I/O of `lb bench`.

Built on its own small HTTP/1.1 client (lb.bench.wire: prebuilt request bytes, llhttp
parsing, keep-alive pooled), so the generator costs well under what lb spends per request.
Every time is `trio.current_time()` (so tests run on trio's autojump clock). Closed loop:
`concurrency` workers, each sending its next request when the last one ended; a sample's clock
starts when it is sent. Open loop: the whole Poisson schedule is fixed up front and each
request's clock starts at its *scheduled* time, so a target that stalls is charged for the
requests that queued behind the stall (coordinated omission excluded); how late the generator
itself sent is kept as `lag`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import attrs
import orjson
import trio

from lb.bench.schedule import StopRule, open_loop_schedule
from lb.bench.sse import EventCounter
from lb.bench.wire import Target, WireConn, WireError
from lb.bench.workloads import Request, Workload


@attrs.define(slots=True)
class Sample:
    """One request. Times in seconds: `start` from the run's start (the scheduled time in an
    open loop), `ttft` and `latency` from `start` (None if it failed)."""

    index: int
    start: float
    status: int = 0
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    tokens: int = 0
    itls: list[float] = attrs.Factory(list)
    lag: float = 0.0  # open loop: how late after its scheduled time the request was sent


@attrs.frozen
class Plan:
    url: str
    workload: Workload
    stop: StopRule
    concurrency: int | None = 1  # closed loop; None with a rate
    rate: float | None = None  # open loop, requests per second
    compare: str | None = None  # each request also sent here, alternately first
    seed: int = 0
    timeout: float = 60.0
    warmup: int = 0
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __attrs_post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give either a concurrency (closed loop) or a rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        for url in (self.url, self.compare):
            if url:
                Target(url, self.headers)  # a bad URL or header: a ValueError now, not mid-run


@attrs.define
class Run:
    plan: Plan
    samples: list[Sample]
    compared: list[Sample]  # with --compare: compared[k] is samples[k]'s twin
    elapsed: float  # from the start to the last answer, seconds
    wall_start: float  # time.time() at the start, for the report
    cpu: float = 0.0  # the generator's own CPU seconds over the run (is it the bottleneck?)


Progress = Callable[[int], None]


async def run(plan: Plan, progress: Progress | None = None) -> Run:
    headers = [(b"content-type", b"application/json"), *plan.headers]
    targets = [Target(url, headers, connect_timeout=plan.timeout)
               for url in (plan.url, plan.compare) if url]
    try:
        if plan.warmup:
            warm = attrs.evolve(plan, stop=StopRule(requests=plan.warmup), rate=None,
                                concurrency=min(plan.concurrency or 16, plan.warmup), warmup=0)
            await _closed(warm, targets, trio.current_time(), [], [], None)
        samples: list[Sample] = []
        compared: list[Sample] = []
        wall = time.time()
        cpu = time.process_time()
        t0 = trio.current_time()
        if plan.rate is not None:
            await _open(plan, targets, t0, samples, compared, progress)
        else:
            await _closed(plan, targets, t0, samples, compared, progress)
        elapsed = trio.current_time() - t0
        return Run(plan, samples, compared, elapsed, wall, time.process_time() - cpu)
    finally:
        for target in targets:
            await target.aclose()


async def _closed(
    plan: Plan, targets: list[Target], t0: float, samples: list[Sample],
    compared: list[Sample], progress: Progress | None,
) -> None:
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while plan.stop.may_send(sent, trio.current_time() - t0):
            index = sent
            sent += 1
            await _send(plan, targets, index, t0, trio.current_time(), samples, compared)
            if progress:
                progress(1)

    async with trio.open_nursery() as nursery:
        for _ in range(plan.concurrency or 1):
            nursery.start_soon(worker)


async def _open(
    plan: Plan, targets: list[Target], t0: float, samples: list[Sample],
    compared: list[Sample], progress: Progress | None,
) -> None:
    assert plan.rate is not None
    schedule = open_loop_schedule(
        plan.rate, plan.seed, duration=plan.stop.duration, requests=plan.stop.requests
    )

    async def one(index: int, at: float) -> None:
        await _send(plan, targets, index, t0, at, samples, compared)
        if progress:
            progress(1)

    async with trio.open_nursery() as nursery:
        for index, offset in enumerate(schedule):
            at = t0 + offset
            if at > trio.current_time():  # those already due go at once, in one batch
                await trio.sleep_until(at)
            nursery.start_soon(one, index, at)


async def _send(
    plan: Plan, targets: list[Target], index: int, t0: float, scheduled: float,
    samples: list[Sample], compared: list[Sample],
) -> None:
    request = plan.workload.request(index)
    if len(targets) == 1:
        samples.append(await measure(targets[0], request, index, t0, scheduled, plan.timeout))
        return
    # Paired: the same request both ways, one after the other, alternately first, each timed
    # from its own send (the second did not wait in any queue of the first's).
    order = (0, 1) if index % 2 == 0 else (1, 0)
    pair: list[Sample | None] = [None, None]
    for side in order:
        pair[side] = await measure(targets[side], request, index, t0, trio.current_time(),
                                   plan.timeout)
    assert pair[0] is not None and pair[1] is not None
    samples.append(pair[0])
    compared.append(pair[1])


async def measure(
    target: Target, request: Request, index: int, t0: float, scheduled: float, limit: float,
) -> Sample:
    """Send one request and time it from `scheduled` (trio clock), within `limit` seconds;
    never raises for the target's faults: they become the sample's `error`."""
    now = trio.current_time()
    sample = Sample(index=index, start=scheduled - t0, lag=now - scheduled if now > scheduled
                    else 0.0)
    conn: WireConn | None = None
    # A cancel scope, not fail_after: this runs per request, and the context manager costs.
    with trio.CancelScope(deadline=now + limit) as scope:
        try:
            conn = await target.send(target.payload(request))
            response = conn.response
            if request.stream and (response.status == 200 or not response.headers_done):
                await _read_stream(conn, sample, scheduled)
            else:
                parts = await _drain(conn)
                if response.status != 200:
                    sample.error = f"http {response.status}"
                elif not request.stream:
                    sample.ttft = sample.latency = trio.current_time() - scheduled
                    sample.tokens = _tokens(parts[0] if len(parts) == 1 else b"".join(parts),
                                            sample)
            sample.status = response.status
            target.release(conn, trio.current_time())
            conn = None
        except WireError as exc:
            sample.error = exc.kind
        finally:
            if conn is not None:  # failed or cancelled mid-answer: never reused
                conn.close()
    if scope.cancelled_caught:
        sample.error = "timeout"
    if sample.error is not None:
        sample.ttft = sample.latency = None
    return sample


async def _drain(conn: WireConn) -> list[bytes]:
    """The rest of the body, in pieces."""
    response = conn.response
    parts = response.take()
    while not response.complete:
        await conn.read()
        parts += response.take()
    return parts


async def _read_stream(conn: WireConn, sample: Sample, scheduled: float) -> None:
    """TTFT: the first read that ends an SSE event. ITL: the gaps between reads that end
    events (events that end in one read are one gap: that is when the client saw them)."""
    response = conn.response
    counter = EventCounter()
    last = 0.0
    while True:
        ended = 0
        for piece in response.take():
            ended += counter.feed(piece)
        if ended:
            now = trio.current_time()
            if sample.ttft is None:
                sample.ttft = now - scheduled
            else:
                sample.itls.append(now - last)
            last = now
        if response.complete:
            break
        await conn.read()
    sample.latency = trio.current_time() - scheduled
    if response.status != 200:
        sample.error = f"http {response.status}"
    elif not counter.done:
        sample.error = "truncated stream"
    elif counter.error:
        sample.error = "error event"
    elif counter.usage:
        sample.tokens = _tokens(counter.usage, sample)
    else:  # no usage: content events, less [DONE] and the stop
        sample.tokens = max(0, counter.events - 2)


def _tokens(body: bytes, sample: Sample) -> int:
    """Completion tokens from an answer's usage (prompt tokens for embeddings)."""
    try:
        usage = orjson.loads(body).get("usage") or {}
        return int(usage.get("completion_tokens", usage.get("prompt_tokens", 0)))
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        sample.error = "bad json"
        return 0


def rate_of(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.nan
