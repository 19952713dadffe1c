"""The key admin API, on LiteLLM's paths and fields: `POST /key/generate`, `/key/update`,
`/key/delete`, `GET /key/info`, `/key/list`, and spend: `GET /spend/keys`, `/spend/logs`,
`/spend/daily`. Master key only (a virtual key may read its own `/key/info`)."""

from __future__ import annotations

from typing import Any

import orjson

from lb.errors import BadRequest, Forbidden, NotFound, Unauthorized
from lb.http.routes import Router
from lb.http.types import Request, Response
from lb.policy.gate import Gate, presented_key
from lb.policy.keys import hash_key

_PATHS = (
    ("POST", "/key/generate"), ("POST", "/key/update"), ("POST", "/key/delete"),
    ("GET", "/key/info"), ("GET", "/key/list"), ("GET", "/spend/keys"), ("GET", "/spend/logs"),
    ("GET", "/spend/daily"),
)


def _master(gate: Gate, request: Request) -> None:
    key = presented_key(request, b"x-api-key")
    if key is None or not gate.is_master(key):
        raise Unauthorized("Key management needs the master key (Authorization: Bearer "
                           "<LB_MASTER_KEY>)")


def _body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(request.body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object", code="invalid_json")
    return body


def _invalid(exc: ValueError) -> BadRequest:
    return BadRequest(str(exc), code="invalid_key_fields")


def add_routes(router: Router, gate: Gate | None) -> None:
    if gate is None:
        async def off(request: Request) -> Response:
            raise Forbidden("API keys are off; set LB_MASTER_KEY to turn them on",
                            code="keys_disabled")

        for method, path in _PATHS:
            router.add(method, path, off)
        return

    async def generate(request: Request) -> Response:
        _master(gate, request)
        try:
            key, record = await gate.create(_body(request))
        except ValueError as exc:
            raise _invalid(exc) from None
        # The key itself is in this answer and nowhere else, ever.
        return Response.json({"key": key, **record.to_json()})

    async def update(request: Request) -> Response:
        _master(gate, request)
        body = _body(request)
        which = body.get("key")
        if not isinstance(which, str) or not which:
            raise BadRequest("Missing required parameter: 'key'", code="missing_parameter",
                             param="key")
        try:
            record = await gate.update(await gate.resolve(which), body)
        except ValueError as exc:
            raise _invalid(exc) from None
        if record is None:
            raise NotFound("No such key", code="key_not_found")
        return Response.json(record.to_json())

    async def delete(request: Request) -> Response:
        _master(gate, request)
        body = _body(request)
        names = [*(body.get("keys") or []), *(body.get("key_aliases") or [])]
        if not names or not all(isinstance(name, str) and name for name in names):
            raise BadRequest("'keys' (or 'key_aliases') must be a non-empty list of keys",
                             code="missing_parameter", param="keys")
        tokens = [await gate.resolve(name) for name in names]
        gone = await gate.delete(tokens)
        if not gone:
            raise NotFound("No such key", code="key_not_found")
        return Response.json({"deleted_keys": gone})

    async def info(request: Request) -> Response:
        which = request.query_params().get("key") if request.query else None
        presented = presented_key(request, b"x-api-key")
        if presented is None:
            raise Unauthorized("Missing API key")
        if gate.is_master(presented):
            if not which:
                raise BadRequest("Missing required parameter: 'key'",
                                 code="missing_parameter", param="key")
            token = await gate.resolve(which)
        else:  # a virtual key may see itself
            token = hash_key(presented)
            if which and await gate.resolve(which) != token:
                raise Unauthorized("A virtual key may only read its own info")
        record = await gate.info(token)
        if record is None:
            raise (NotFound("No such key", code="key_not_found") if gate.is_master(presented)
                   else Unauthorized("Invalid API key"))
        return Response.json({"key": record.token, "info": record.to_json()})

    async def listing(request: Request) -> Response:
        _master(gate, request)
        records = [await gate.info(r.token) or r for r in await gate.store.list_keys()]
        full = request.query_params().get("return_full_object", "") in ("true", "1")
        keys: list[Any] = [r.to_json() for r in records] if full else [r.token for r in records]
        return Response.json({"keys": keys, "total_count": len(keys)})

    async def spend_keys(request: Request) -> Response:
        _master(gate, request)
        records = [await gate.info(r.token) or r for r in await gate.store.list_keys()]
        return Response.json([r.to_json() for r in records])

    async def spend_logs(request: Request) -> Response:
        _master(gate, request)
        params = request.query_params() if request.query else {}
        which = params.get("api_key")
        token = await gate.resolve(which) if which else None
        try:
            limit = max(1, min(10_000, int(params.get("limit", "100"))))
        except ValueError:
            raise BadRequest("'limit' must be a whole number", code="invalid_value",
                             param="limit") from None
        await gate.flush()  # what finished so far is in the answer
        return Response.json(await gate.store.spend_logs(token, limit))

    async def spend_daily(request: Request) -> Response:
        _master(gate, request)
        which = request.query_params().get("api_key") if request.query else None
        await gate.flush()
        return Response.json(await gate.store.spend_daily(await gate.resolve(which)
                                                          if which else None))

    for (method, path), handler in zip(
        _PATHS, (generate, update, delete, info, listing, spend_keys, spend_logs, spend_daily),
        strict=True,
    ):
        router.add(method, path, handler)
