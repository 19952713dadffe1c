"""One table from (method, path) to handler; `{name}` segments capture path parameters."""

from __future__ import annotations

import attrs

from lb.http.errors import HTTPError
from lb.http.types import Handler, Request, Response


@attrs.define
class Router:
    _exact: dict[str, dict[str, Handler]] = attrs.field(factory=dict)
    _patterns: list[tuple[tuple[str, ...], dict[str, Handler]]] = attrs.field(factory=list)

    def add(self, method: str, path: str, handler: Handler) -> None:
        if "{" not in path:
            self._exact.setdefault(path, {})[method] = handler
            return
        parts = tuple(path.strip("/").split("/"))
        for pattern, methods in self._patterns:
            if pattern == parts:
                methods[method] = handler
                return
        self._patterns.append((parts, {method: handler}))

    def _match(self, path: str) -> tuple[dict[str, Handler], dict[str, str]] | None:
        methods = self._exact.get(path)
        if methods is not None:
            return methods, {}
        parts = path.strip("/").split("/")
        for pattern, methods in self._patterns:
            if len(pattern) != len(parts):
                continue
            params: dict[str, str] = {}
            for want, got in zip(pattern, parts, strict=True):
                if want.startswith("{") and want.endswith("}"):
                    if not got:
                        break
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return methods, params
        return None

    async def __call__(self, request: Request) -> Response:
        found = self._match(request.path)
        if found is None:
            raise HTTPError(404, f"Unknown path: {request.path}", code="not_found")
        methods, params = found
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allow = ", ".join(sorted(methods)).encode()
            raise HTTPError(
                405, f"Method {request.method} is not allowed on {request.path}",
                code="method_not_allowed", headers=[(b"allow", allow)],
            )
        request.path_params = params
        return await handler(request)
