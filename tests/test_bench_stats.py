"""lb bench's pure parts: percentiles, summaries, paired differences, the open loop's schedule
and the workloads (hypothesis)."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.bench.schedule import StopRule, open_loop_schedule, poisson_arrivals
from lb.bench.stats import cdf, paired_differences, per_second, percentile, summarize
from lb.bench.workloads import BuiltIn, WorkloadError, parse_jsonl

values = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200)
quantile = st.floats(0.0, 1.0)


@given(values, quantile, quantile)
def test_percentiles_lie_within_the_values_and_grow_with_q(xs: list[float], a: float,
                                                           b: float) -> None:
    ordered = sorted(xs)
    low, high = sorted((a, b))
    p_low, p_high = percentile(ordered, low), percentile(ordered, high)
    assert ordered[0] <= p_low <= p_high <= ordered[-1]
    assert percentile(ordered, 0.0) == ordered[0]
    assert percentile(ordered, 1.0) == ordered[-1]


@given(values)
def test_percentiles_agree_with_the_standard_librarys_inclusive_quantiles(xs: list[float]) -> None:
    if len(xs) < 2:
        return
    ordered = sorted(xs)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    for q in (50, 90, 95, 99):
        assert percentile(ordered, q / 100) == pytest.approx(cuts[q - 1], abs=1e-6, rel=1e-9)


def test_percentile_of_nothing_is_nan_and_q_outside_0_1_is_refused() -> None:
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError, match="quantile"):
        percentile([1.0], 1.5)


@given(values)
def test_a_summary_is_ordered_and_counts_every_value(xs: list[float]) -> None:
    s = summarize(xs)
    assert s.count == len(xs)
    assert s.min <= s.p50 <= s.p90 <= s.p95 <= s.p99 <= s.max
    assert s.min == min(xs) and s.max == max(xs)
    assert s.min - 1e-6 <= s.mean <= s.max + 1e-6


def test_the_summary_of_nothing_has_a_count_of_zero() -> None:
    s = summarize([])
    assert s.count == 0 and math.isnan(s.p50)


pairs = st.lists(st.tuples(st.none() | st.floats(0, 1e3), st.none() | st.floats(0, 1e3)),
                 max_size=100)


@given(pairs)
def test_paired_differences_keep_only_pairs_where_both_sides_answered(
    ps: list[tuple[float | None, float | None]],
) -> None:
    diffs = paired_differences(ps)
    both = [(a, b) for a, b in ps if a is not None and b is not None]
    assert diffs == [a - b for a, b in both]


@given(st.lists(st.floats(0, 100), min_size=2, max_size=100), st.floats(0.0, 50.0))
def test_a_constant_added_latency_shows_as_that_constant_in_every_percentile(
    base: list[float], added: float,
) -> None:
    diffs = paired_differences((b + added, b) for b in base)
    s = summarize(diffs)
    assert s.p50 == pytest.approx(added, abs=1e-9)
    assert s.p99 == pytest.approx(added, abs=1e-9)


def test_paired_percentiles_are_not_differences_of_percentiles() -> None:
    # lb adds 10 ms to the fast requests only: per pair the p99 of what it adds is 10 ms,
    # while the difference of the two p99s says 0.
    direct = [1.0] * 90 + [100.0] * 10
    via = [11.0] * 90 + [100.0] * 10
    s = summarize(paired_differences(zip(via, direct, strict=True)))
    assert s.p50 == 10.0 and s.max == 10.0
    assert summarize(via).p99 - summarize(direct).p99 == 0.0


@given(values, st.integers(1, 50))
def test_a_cdf_rises_to_one_and_ends_at_the_maximum(xs: list[float], points: int) -> None:
    curve = cdf(xs, points)
    assert curve[-1] == (max(xs), 1.0)
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in itertools.pairwise(curve))
    assert len(curve) <= 2 * points + 1


@given(st.lists(st.floats(0, 100), max_size=200), st.floats(0.1, 10))
def test_per_second_counts_every_event_once(times: list[float], bucket: float) -> None:
    series = per_second(times, bucket=bucket)
    assert sum(series) * bucket == pytest.approx(len(times))


# --- the open loop's schedule -----------------------------------------------------------------


@settings(deadline=None)  # up to 40,000 arrivals: time is not the point
@given(st.floats(0.1, 1e4), st.integers(0, 2**32), st.integers(0, 500))
def test_the_schedule_is_increasing_repeatable_and_stops_at_the_count(
    rate: float, seed: int, count: int,
) -> None:
    times = open_loop_schedule(rate, seed, requests=count)
    assert len(times) == count
    assert all(0 < a < b for a, b in itertools.pairwise(times))
    assert times == open_loop_schedule(rate, seed, requests=count)


@settings(deadline=None)  # up to 40,000 arrivals: time is not the point
@given(st.floats(0.5, 2000), st.integers(0, 2**32), st.floats(0.1, 20))
def test_the_schedule_stops_at_the_duration(rate: float, seed: int, duration: float) -> None:
    times = open_loop_schedule(rate, seed, duration=duration)
    assert all(t < duration for t in times)
    arrivals = poisson_arrivals(rate, random.Random(seed))
    assert times == list(itertools.takewhile(lambda t: t < duration, arrivals))


@settings(deadline=None, max_examples=25)  # 20,000 arrivals per example
@given(st.floats(10, 1000), st.integers(0, 2**32))
def test_arrivals_are_poisson_at_the_rate(rate: float, seed: int) -> None:
    # 20,000 exponential gaps: the mean is 1/rate within 5 standard errors (1/rate/sqrt(n)),
    # and the coefficient of variation of exponential gaps is 1 (a fixed-interval schedule
    # would have 0).
    times = open_loop_schedule(rate, seed, requests=20_000)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    mean = statistics.fmean(gaps)
    assert abs(mean - 1 / rate) < 5 * (1 / rate) / math.sqrt(len(gaps))
    assert 0.9 < statistics.pstdev(gaps) / mean < 1.1


def test_a_stop_rule_needs_a_limit_and_ends_at_the_first_limit() -> None:
    with pytest.raises(ValueError, match="duration or a number"):
        StopRule()
    rule = StopRule(duration=2.0, requests=3)
    assert rule.may_send(2, 1.9)
    assert not rule.may_send(3, 0.0)
    assert not rule.may_send(0, 2.0)
    with pytest.raises(ValueError, match="rate"):
        next(poisson_arrivals(0.0, random.Random(0)))


# --- workloads ----------------------------------------------------------------------------------


kinds = st.sampled_from(["fixed", "random", "shared-prefix", "multi-turn"])
endpoints = st.sampled_from(["chat", "completions", "embeddings"])


@given(kinds, endpoints, st.integers(0, 10_000), st.integers(0, 100))
def test_request_i_is_a_function_of_the_workload_and_i(kind: str, endpoint: str, index: int,
                                                      seed: int) -> None:
    work = BuiltIn(kind=kind, endpoint=endpoint, seed=seed, prefix_words=64, max_words=64)
    first = work.request(index)
    assert first == BuiltIn(kind=kind, endpoint=endpoint, seed=seed, prefix_words=64,
                            max_words=64).request(index)
    body = orjson.loads(first.body)
    assert body["model"] == "mock-model"
    assert first.path == {"chat": "/v1/chat/completions", "completions": "/v1/completions",
                          "embeddings": "/v1/embeddings"}[endpoint]
    key = {"chat": "messages", "completions": "prompt", "embeddings": "input"}[endpoint]
    assert body[key]


@given(st.integers(1, 8), st.integers(0, 1000), st.integers(0, 1000))
def test_shared_prefix_requests_of_a_group_share_the_system_prompt_only(
    prefixes: int, a: int, b: int,
) -> None:
    work = BuiltIn(kind="shared-prefix", prefixes=prefixes, prefix_words=50)
    ma, mb = work.messages(a), work.messages(b)
    assert (ma[0] == mb[0]) == (a % prefixes == b % prefixes)
    assert ma[0]["role"] == "system" and len(ma[0]["content"].split()) == 50
    assert ma[1]["role"] == "user"


@given(st.integers(1, 10), st.integers(1, 10), st.integers(0, 500))
def test_a_conversations_next_turn_repeats_the_turn_before(conversations: int, turns: int,
                                                           index: int) -> None:
    work = BuiltIn(kind="multi-turn", conversations=conversations, turns=turns)
    turn = (index // conversations) % turns
    messages = work.messages(index)
    assert len(messages) == 2 * turn + 1
    if turn + 1 < turns:
        later = work.messages(index + conversations)
        assert later[: len(messages)] == messages


@given(st.integers(1, 50), st.integers(0, 50), st.integers(0, 1000))
def test_random_lengths_stay_within_bounds(low: int, extra: int, index: int) -> None:
    work = BuiltIn(kind="random", min_words=low, max_words=low + extra)
    words = len(work.messages(index)[0]["content"].split())
    assert low <= words <= low + extra


def test_a_stream_asks_for_usage_and_embeddings_do_not_stream() -> None:
    body = orjson.loads(BuiltIn(stream=True).request(0).body)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    with pytest.raises(WorkloadError, match="embeddings do not stream"):
        BuiltIn(endpoint="embeddings", stream=True)
    with pytest.raises(WorkloadError, match="unknown workload"):
        BuiltIn(kind="nope")


def test_jsonl_lines_are_bodies_or_path_and_body_and_cycle() -> None:
    work = parse_jsonl([
        b'{"messages": [{"role": "user", "content": "a"}], "stream": true}\n',
        b"\n",
        b'{"path": "/v1/embeddings", "body": {"model": "e", "input": "x"}}\n',
    ], model="m")
    first, second, third = work.request(0), work.request(1), work.request(2)
    assert first.path == "/v1/chat/completions" and first.stream
    assert orjson.loads(first.body)["model"] == "m"
    assert second.path == "/v1/embeddings" and orjson.loads(second.body)["model"] == "e"
    assert third == first


@pytest.mark.parametrize(("lines", "message"), [
    ([b"{nope"], "f.jsonl:1: not JSON"),
    ([b"", b"[1]"], "f.jsonl:2: expected a JSON object"),
    ([b'{"body": 3}'], "body must be a JSON object"),
    ([b'{"path": "v1", "body": {}}'], "path must be a string starting with /"),
    ([], "no requests"),
])
def test_a_bad_jsonl_file_names_the_line(lines: list[bytes], message: str) -> None:
    with pytest.raises(WorkloadError, match=message):
        parse_jsonl(lines, source="f.jsonl")


# --- the report's summary -------------------------------------------------------------------

errors_st = st.none() | st.sampled_from(["http 503", "timeout", "closed"])
samples_st = st.lists(
    st.tuples(errors_st, st.floats(0.001, 10), st.integers(0, 100)), min_size=1, max_size=50,
)


@given(samples_st, st.floats(0.1, 100))
def test_a_summary_counts_every_request_once(rows: list[tuple[str | None, float, int]],
                                             elapsed: float) -> None:
    from lb.bench.report import side_summary
    from lb.bench.runner import Sample

    samples = [
        Sample(index=i, start=0.0, error=err, latency=None if err else lat,
               ttft=None if err else lat, tokens=0 if err else tokens)
        for i, (err, lat, tokens) in enumerate(rows)
    ]
    s = side_summary(samples, elapsed)
    assert s["ok"] + sum(s["errors"].values()) == s["requests"] == len(rows)
    assert s["latency_ms"]["count"] == s["ok"]
    assert s["tokens"] == sum(t for err, _, t in rows if err is None)
    assert s["requests_per_s"] == pytest.approx(s["ok"] / elapsed)


@pytest.mark.parametrize(("args", "message"), [
    (["http://x", "--rate", "5", "-c", "2"], "exclude each other"),
    ([], "give a URL or --against"),
    (["http://x", "--workload", "nope"], "not one of fixed"),
    (["http://x", "--endpoint", "embeddings", "--stream"], "embeddings do not stream"),
    (["http://x", "-H", "no colon"], "expected 'Name: value'"),
])
def test_bad_options_are_clear_errors(args: list[str], message: str) -> None:
    from click.testing import CliRunner

    from lb.cli import main

    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2
    assert message in result.output
