"""`/v1/admin/prefs`: read and change preferred models and per-node caps at run time;
`/v1/admin/traffic-split`: the blue/green weights (part of the same shared prefs).

Disabled (403) unless `LB_ADMIN_KEY` is set; then the key must come as a bearer token (401)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import orjson

from lb.cluster.prefs import Prefs, apply_update
from lb.errors import BadRequest, Forbidden, Unauthorized
from lb.http.routes import Router
from lb.http.types import Request, Response


def check_bearer(request: Request, key: str, what: str = "admin key",
                 setting: str = "LB_ADMIN_KEY") -> None:
    """401 unless the request carries `Authorization: Bearer <key>`."""
    header = request.header(b"authorization") or b""
    scheme, _, token = header.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized(f"Missing or invalid {what} (Authorization: Bearer <{setting}>)")


def check_admin(request: Request, admin_key: str) -> None:
    if not admin_key:
        raise Forbidden("Admin endpoints are disabled; set LB_ADMIN_KEY to enable them",
                        code="admin_disabled")
    check_bearer(request, admin_key)


def require_admin_if_set(request: Request, admin_key: str) -> None:
    """Views of the topology (nodes, addresses, errors) need the admin key once one is set."""
    if admin_key:
        check_admin(request, admin_key)


def add_routes(
    router: Router,
    *,
    admin_key: str,
    get_prefs: Callable[[], Prefs],
    change_prefs: Callable[[Prefs], Awaitable[bool]],  # True if the fleet got it too
    split_label: str = "version",
) -> None:
    async def read(request: Request) -> Response:
        check_admin(request, admin_key)
        return Response.json(get_prefs().to_json())

    async def change(request: Request) -> Response:
        check_admin(request, admin_key)
        body = _json_body(request)
        try:
            prefs = apply_update(get_prefs(), body)
        except ValueError as exc:
            raise BadRequest(str(exc), code="invalid_prefs") from None
        shared = await change_prefs(prefs)
        return Response.json({**prefs.to_json(), "shared": shared})

    def split_view(prefs: Prefs) -> dict[str, object]:
        return {"label": split_label, "weights": dict(prefs.traffic_split),
                "version": prefs.version}

    async def read_split(request: Request) -> Response:
        check_admin(request, admin_key)
        return Response.json(split_view(get_prefs()))

    async def change_split(request: Request) -> Response:
        """Body ``{"weights": {"blue": 90, "green": 10}}`` (or ``"blue=90,green=10"``; null or
        ``{}`` turns the split off): replaces the weights."""
        check_admin(request, admin_key)
        body = _json_body(request)
        if not isinstance(body, dict) or set(body) != {"weights"}:
            raise BadRequest('body must be {"weights": {"<label value>": weight, ...}}',
                             code="invalid_traffic_split")
        current = get_prefs()
        try:
            prefs = apply_update(current, {"traffic_split": body["weights"]})
        except ValueError as exc:
            raise BadRequest(str(exc), code="invalid_traffic_split") from None
        shared = await change_prefs(prefs)
        return Response.json({**split_view(prefs), "shared": shared})

    router.add("GET", "/v1/admin/prefs", read)
    router.add("POST", "/v1/admin/prefs", change)
    router.add("GET", "/v1/admin/traffic-split", read_split)
    router.add("PUT", "/v1/admin/traffic-split", change_split)


def _json_body(request: Request) -> object:
    try:
        return orjson.loads(request.body)
    except orjson.JSONDecodeError as exc:
        message = f"Request body is not valid JSON: {exc}"
        raise BadRequest(message, code="invalid_json") from None
