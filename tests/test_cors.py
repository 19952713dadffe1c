"""The CORS policy, pure: which origins are allowed and what a preflight answers."""

from __future__ import annotations

from lb.http.cors import CorsPolicy
from lb.http.types import Request


def test_no_origins_is_no_policy() -> None:
    assert CorsPolicy.from_setting(()) is None
    assert CorsPolicy.from_setting(("",)) is None


def test_listed_origins_only_and_star_for_any() -> None:
    policy = CorsPolicy.from_setting(("https://a.example/", "http://b.example:3000"))
    assert policy is not None
    assert policy.allow(b"https://a.example") == b"https://a.example"  # trailing / ignored
    assert policy.allow(b"http://b.example:3000") == b"http://b.example:3000"
    assert policy.allow(b"https://evil.example") is None
    assert policy.allow(None) is None
    assert (b"vary", b"Origin") in policy.tags(b"https://a.example")
    anyone = CorsPolicy.from_setting(("*",))
    assert anyone is not None and anyone.allow(b"https://x.example") == b"*"
    assert all(name != b"vary" for name, _ in anyone.tags(b"*"))


def test_a_preflight_echoes_plain_header_names_only() -> None:
    policy = CorsPolicy.from_setting(("*",))
    assert policy is not None

    def allowed(asked: bytes) -> bytes:
        request = Request("OPTIONS", "/v1/models", "", [(b"access-control-request-headers", asked)])
        answer = policy.preflight(request)
        assert answer.status == 204
        return dict(answer.headers)[b"access-control-allow-headers"]

    assert allowed(b"X-Stainless-OS, x-custom").endswith(b", x-stainless-os, x-custom")
    assert b"\r" not in allowed(b"x-a\r\nset-cookie: y") and b"set-cookie" not in allowed(
        b"x-a\r\nset-cookie: y"
    )
