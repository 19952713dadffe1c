"""`lb.client`: the official `openai` SDK with the resilience knobs of the ai-lb "Story Engine"
client, configured from the environment, for applications that call lb (or any OpenAI-style
endpoint).

    from lb.client import LBClient
    client = LBClient(base_url="http://lb:8000/v1", api_key="...")
    answer = client.chat(model="auto", messages=[...], session_id="user-42")

- `LM_RETRY_ATTEMPTS` (default 1; at least 2 when the request has `response_format`): attempts
  on a network error, a timeout, a 5xx or a 429; never on another 4xx (the request is wrong).
- `LM_RETRY_BASE_DELAY` (0.2 s): exponential backoff with full jitter between attempts; a
  `Retry-After` from the server is honoured instead when it says more.
- `LM_REQUEST_BUDGET_MS`: one end-to-end budget per call; each attempt's timeout is what is
  left, and lb is told it in `x-request-budget-ms` so its own deadline matches.
- `LLM_CB_THRESHOLD` (3) / `LLM_CB_WINDOW_SEC` (15): a client-side circuit breaker; after that
  many failed calls in a row, calls fail at once with `CircuitOpen` for the window, then one
  probe call is let through (half-open): its success closes the circuit, its failure opens it
  again.
- Hints: `session_id=` sends `x-session-id` (sticky routing), `prefer_small=True` sends
  `x-prefer-small: 1`.

The SDK's own retries are off (`max_retries=0`): one retry policy, this one.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio
import attrs
import openai

T = TypeVar("T")

__all__ = [
    "AsyncLBClient",
    "BudgetExhausted",
    "CircuitBreaker",
    "CircuitOpen",
    "ClientSettings",
    "LBClient",
    "backoff",
    "is_retryable",
    "retry_after",
]


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a number") from None
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name}={text!r}: must be a number >= {minimum:g}")
    return value


@attrs.frozen
class ClientSettings:
    attempts: int = 1
    base_delay: float = 0.2  # seconds
    budget: float | None = None  # seconds per call, end to end
    cb_threshold: int = 3  # 0: no breaker
    cb_window: float = 15.0  # seconds

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ClientSettings:
        budget_ms = _number(env, "LM_REQUEST_BUDGET_MS", 0, 0)
        return cls(
            attempts=int(_number(env, "LM_RETRY_ATTEMPTS", 1, 1)),
            base_delay=_number(env, "LM_RETRY_BASE_DELAY", 0.2, 0),
            budget=budget_ms / 1000 if budget_ms else None,
            cb_threshold=int(_number(env, "LLM_CB_THRESHOLD", 3, 0)),
            cb_window=_number(env, "LLM_CB_WINDOW_SEC", 15.0, 0),
        )

    def attempts_for(self, request: Mapping[str, Any]) -> int:
        """Structured output fails more often on small models: it gets a second try."""
        return max(self.attempts, 2) if request.get("response_format") else self.attempts


class CircuitOpen(openai.OpenAIError):
    """The client-side breaker is open: the call was not sent."""


class BudgetExhausted(openai.OpenAIError):
    """The call's end-to-end budget ran out before another attempt could start."""


@attrs.define
class CircuitBreaker:
    """Consecutive failures open it for `window` seconds; then one probe is let through."""

    threshold: int
    window: float
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    open_until: float | None = None
    probing: bool = False
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def allow(self) -> bool:
        """Whether a call may go out now (claims the one probe when half-open)."""
        with self._lock:
            if self.threshold <= 0 or self.open_until is None:
                return True
            if self.clock() < self.open_until or self.probing:
                return False
            self.probing = True
            return True

    def success(self) -> None:
        with self._lock:
            self.failures, self.open_until, self.probing = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            if self.probing or (self.threshold > 0 and self.failures >= self.threshold):
                self.open_until = self.clock() + self.window
            self.probing = False


def backoff(attempt: int, base: float, rng: random.Random) -> float:
    """The wait after failed attempt `attempt` (1, 2, ...): full jitter over base * 2^(n-1)."""
    return rng.uniform(0, base * 2 ** (attempt - 1))


def is_retryable(exc: BaseException) -> bool:
    """Network errors, timeouts, 5xx and 429 may succeed on a second try; other 4xx will not."""
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500 or exc.status_code == 429
    return False


def retry_after(exc: BaseException) -> float | None:
    """A 429/503's `Retry-After` in seconds, if it sent one as a number."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    value = exc.response.headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _counts_against_node(exc: BaseException) -> bool:
    """What the breaker counts: the service failing, not a request it rightly refused."""
    return is_retryable(exc) and not (
        isinstance(exc, openai.APIStatusError) and exc.status_code == 429
    )


@attrs.define
class _Policy:
    """The retry loop, shared by the sync and async clients: what to do after each attempt."""

    settings: ClientSettings
    breaker: CircuitBreaker
    rng: random.Random
    clock: Callable[[], float]

    def headers(
        self, remaining: float | None, session_id: str | None, prefer_small: bool,
        extra: Mapping[str, str] | None,
    ) -> dict[str, str]:
        headers = dict(extra or {})
        if remaining is not None:
            headers["x-request-budget-ms"] = str(max(1, int(remaining * 1000)))
        if session_id:
            headers["x-session-id"] = session_id
        if prefer_small:
            headers["x-prefer-small"] = "1"
        return headers

    def admit(self) -> None:
        if not self.breaker.allow():
            raise CircuitOpen("lb.client: the circuit is open after repeated failures")

    def after_failure(
        self, exc: BaseException, attempt: int, attempts: int, deadline: float | None
    ) -> float:
        """The wait before the next attempt; re-raises `exc` if there is none."""
        if _counts_against_node(exc):
            self.breaker.failure()
        else:
            self.breaker.success()  # it answered: the service is up
        if not is_retryable(exc) or attempt >= attempts:
            raise exc
        wait = backoff(attempt, self.settings.base_delay, self.rng)
        told = retry_after(exc)
        if told is not None:
            wait = max(wait, told)
        if deadline is not None and self.clock() + wait >= deadline:
            raise exc  # no time left for another attempt
        return wait


class _Base:
    def __init__(
        self, settings: ClientSettings | None, env: Mapping[str, str] | None,
        rng: random.Random | None, clock: Callable[[], float],
    ) -> None:
        import os

        self.settings = settings or ClientSettings.from_env(os.environ if env is None else env)
        self.breaker = CircuitBreaker(self.settings.cb_threshold, self.settings.cb_window, clock)
        self._policy = _Policy(self.settings, self.breaker, rng or random.Random(), clock)
        self._clock = clock

    def _start(self, request: Mapping[str, Any]) -> tuple[int, float | None]:
        budget = self.settings.budget
        return self.settings.attempts_for(request), (
            None if budget is None else self._clock() + budget
        )

    def _options(
        self, deadline: float | None, session_id: str | None, prefer_small: bool,
        request: dict[str, Any],
    ) -> dict[str, Any]:
        remaining = None if deadline is None else deadline - self._clock()
        if remaining is not None and remaining <= 0:
            raise BudgetExhausted("lb.client: LM_REQUEST_BUDGET_MS ran out before an attempt")
        options = dict(request)
        options["extra_headers"] = self._policy.headers(
            remaining, session_id, prefer_small, request.get("extra_headers")
        )
        if remaining is not None:
            options["timeout"] = remaining
        return options


class LBClient(_Base):
    """The synchronous client; `.openai` is the SDK client underneath."""

    def __init__(
        self, *, settings: ClientSettings | None = None, env: Mapping[str, str] | None = None,
        rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep, **openai_options: Any,
    ) -> None:
        super().__init__(settings, env, rng, clock)
        self.openai = openai.OpenAI(max_retries=0, **openai_options)
        self._sleep = sleep

    def _call(
        self, create: Callable[..., T], request: dict[str, Any], session_id: str | None,
        prefer_small: bool,
    ) -> T:
        attempts, deadline = self._start(request)
        attempt = 0
        while True:
            attempt += 1
            self._policy.admit()
            try:
                result = create(**self._options(deadline, session_id, prefer_small, request))
            except openai.OpenAIError as exc:
                self._sleep(self._policy.after_failure(exc, attempt, attempts, deadline))
                continue
            self.breaker.success()
            return result

    def chat(self, *, session_id: str | None = None, prefer_small: bool = False,
             **request: Any) -> Any:
        """`chat.completions.create(**request)` with retries, budget, breaker and hints."""
        return self._call(self.openai.chat.completions.create, request, session_id, prefer_small)

    def completion(self, *, session_id: str | None = None, prefer_small: bool = False,
                   **request: Any) -> Any:
        return self._call(self.openai.completions.create, request, session_id, prefer_small)

    def embedding(self, *, session_id: str | None = None, prefer_small: bool = False,
                  **request: Any) -> Any:
        return self._call(self.openai.embeddings.create, request, session_id, prefer_small)


class AsyncLBClient(_Base):
    """The asynchronous client (asyncio or trio); `.openai` is the SDK client underneath."""

    def __init__(
        self, *, settings: ClientSettings | None = None, env: Mapping[str, str] | None = None,
        rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep, **openai_options: Any,
    ) -> None:
        super().__init__(settings, env, rng, clock)
        self.openai = openai.AsyncOpenAI(max_retries=0, **openai_options)
        self._sleep = sleep

    async def _call(
        self, create: Callable[..., Awaitable[T]], request: dict[str, Any],
        session_id: str | None, prefer_small: bool,
    ) -> T:
        attempts, deadline = self._start(request)
        attempt = 0
        while True:
            attempt += 1
            self._policy.admit()
            try:
                options = self._options(deadline, session_id, prefer_small, request)
                result = await create(**options)
            except openai.OpenAIError as exc:
                await self._sleep(self._policy.after_failure(exc, attempt, attempts, deadline))
                continue
            self.breaker.success()
            return result

    async def chat(self, *, session_id: str | None = None, prefer_small: bool = False,
                   **request: Any) -> Any:
        return await self._call(
            self.openai.chat.completions.create, request, session_id, prefer_small
        )

    async def completion(self, *, session_id: str | None = None, prefer_small: bool = False,
                         **request: Any) -> Any:
        return await self._call(self.openai.completions.create, request, session_id,
                                prefer_small)

    async def embedding(self, *, session_id: str | None = None, prefer_small: bool = False,
                        **request: Any) -> Any:
        return await self._call(self.openai.embeddings.create, request, session_id,
                                prefer_small)

    async def aclose(self) -> None:
        await self.openai.close()


