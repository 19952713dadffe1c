"""One table from (method, path) to handler; `{name}` segments capture path parameters."""

from __future__ import annotations

from urllib.parse import unquote

import attrs

from lb.errors import MethodNotAllowed, NotFound
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
            params = _bind(pattern, parts)
            if params is not None:
                return methods, params
        return None

    async def __call__(self, request: Request) -> Response:
        found = self._match(request.path) or self._match_leniently(request.path)
        if found is None:
            raise NotFound(f"Unknown path: {request.path}")
        methods, params = found
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            raise MethodNotAllowed(
                f"Method {request.method} is not allowed on {request.path}",
                allowed=sorted(methods),
            )
        request.path_params = params
        return await handler(request)


    def _match_leniently(
        self, path: str
    ) -> tuple[dict[str, Handler], dict[str, str]] | None:
        """Many clients are configured with a base URL without `/v1`, or add a slash: `/models`,
        `/chat/completions/` and `/v1/models/` find their routes too."""
        stripped = path.rstrip("/") or "/"
        found = self._match(stripped) if stripped != path else None
        if found is None and not stripped.startswith("/v1/"):
            found = self._match("/v1" + stripped)
        return found


def _bind(pattern: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    """The path parameters if `parts` fits `pattern`. A last segment `{name:path}` takes the
    rest of the path, slashes included (model ids such as `qwen/qwen3-8b`)."""
    if pattern[-1].endswith(":path}"):
        if len(parts) < len(pattern):
            return None
        parts = [*parts[: len(pattern) - 1], "/".join(parts[len(pattern) - 1 :])]
        pattern = (*pattern[:-1], pattern[-1].removesuffix(":path}") + "}")
    elif len(pattern) != len(parts):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern, parts, strict=True):
        if want.startswith("{") and want.endswith("}"):
            if not got:
                return None
            params[want[1:-1]] = unquote(got)  # decoded after splitting: %2F stays in one
        elif want != got:
            return None
    return params
