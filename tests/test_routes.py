"""The route table: exact paths, `{name}` and `{name:path}` parameters, 404 and 405."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.errors import LBError, MethodNotAllowed
from lb.http.routes import Router
from lb.http.types import Request, Response

segment = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=12)


def router() -> Router:
    table = Router()

    def answer(name: str):  # type: ignore[no-untyped-def]
        async def handler(request: Request) -> Response:
            return Response.json({"route": name, "params": request.path_params})

        return handler

    table.add("GET", "/v1/models", answer("list"))
    table.add("GET", "/v1/models/{model:path}", answer("model"))
    table.add("GET", "/v1/things/{id}/parts", answer("parts"))
    table.add("POST", "/v1/things/{id}/parts", answer("post-parts"))
    return table


async def route(method: str, path: str) -> bytes:
    return (await router()(Request(method=method, path=path, query="", headers=[]))).body


@given(st.lists(segment, min_size=1, max_size=4))
async def test_path_parameter_takes_the_rest(parts: list[str]) -> None:
    model = "/".join(parts)
    body = await route("GET", f"/v1/models/{model}")
    assert body == b'{"route":"model","params":{"model":"%s"}}' % model.encode()


@given(segment)
async def test_segment_parameter(thing: str) -> None:
    assert b'"route":"parts"' in await route("GET", f"/v1/things/{thing}/parts")
    assert b'"route":"post-parts"' in await route("POST", f"/v1/things/{thing}/parts")


async def test_exact_beats_patterns_and_head_uses_get() -> None:
    assert b'"route":"list"' in await route("GET", "/v1/models")
    assert b'"route":"list"' in await route("HEAD", "/v1/models")


async def test_paths_without_v1_or_with_a_trailing_slash_find_their_route() -> None:
    for path in ("/models", "/models/", "/v1/models/"):
        assert b'"route":"list"' in await route("GET", path), path


@pytest.mark.parametrize("path", ["/v1/things//parts", "/v1/things/x", "/nope", "/v1/nope/"])
async def test_unknown_is_404(path: str) -> None:
    with pytest.raises(LBError) as caught:
        await route("GET", path)
    assert caught.value.status == 404


async def test_wrong_method_is_405_with_allow() -> None:
    with pytest.raises(MethodNotAllowed) as caught:
        await route("DELETE", "/v1/things/x/parts")
    assert caught.value.status == 405
    assert caught.value.allowed == ("GET", "POST")
