"""CPU cost per request of lb.upstream.client vs httpx vs a bare h11 loop, under trio.

The server runs in a child process (asyncio, canned keep-alive response), so the CPU time
measured here (time.process_time of this process) is the client's alone.

    python bench/upstream_client_cpu.py [--requests 5000] [--rounds 5] [--stream]

--stream answers with a chunked body of 20 small SSE events instead of one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from collections.abc import Awaitable, Callable

import h11
import trio

from lb.upstream.client import ConnectionPool

JSON_BODY = b'{"id":"x","object":"chat.completion","choices":[{"message":{"content":"hi"}}]}'
JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (len(JSON_BODY), JSON_BODY)
)
EVENT = b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'
SSE_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    + (b"%x\r\n%s\r\n" % (len(EVENT), EVENT)) * 20
    + b"0\r\n\r\n"
)
REQUEST_BODY = b'{"model":"m","messages":[{"role":"user","content":"hello"}],"stream":false}'
HEADERS = [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-test")]


def server_main(port_queue: multiprocessing.Queue[int], stream: bool) -> None:
    response = SSE_RESPONSE if stream else JSON_RESPONSE

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while True:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.buf[:end].lower()
                length = 0
                at = head.find(b"content-length:")
                if at >= 0:
                    length = int(head[at + 15 :].split(b"\r\n", 1)[0])
                if len(self.buf) < end + 4 + length:
                    return
                self.buf = self.buf[end + 4 + length :]
                self.transport.write(response)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Proto, "127.0.0.1", 0)
        port_queue.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


async def lb_client(port: int, n: int) -> None:
    pool = ConnectionPool(f"http://127.0.0.1:{port}")
    for _ in range(n):
        async with pool.request("POST", "/v1/chat/completions", HEADERS, REQUEST_BODY) as resp:
            while await resp.receive_some():
                pass
    await pool.aclose()


async def httpx_client(port: int, n: int) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(n):
            async with client.stream(
                "POST", "/v1/chat/completions", headers=HEADERS, content=REQUEST_BODY
            ) as resp:
                async for _chunk in resp.aiter_raw():
                    pass


async def bare_h11(port: int, n: int) -> None:
    """The floor: one h11 connection, no pool, no error handling."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    headers = [
        (b"host", b"127.0.0.1:%d" % port),
        *HEADERS,
        (b"content-length", b"%d" % len(REQUEST_BODY)),
    ]
    for _ in range(n):
        data = conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=headers))
        data += conn.send(h11.Data(data=REQUEST_BODY)) + conn.send(h11.EndOfMessage())
        await stream.send_all(data)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.EndOfMessage):
                break
        conn.start_next_cycle()
    await stream.aclose()


CLIENTS: dict[str, Callable[[int, int], Awaitable[None]]] = {
    "bare-h11": bare_h11,
    "lb": lb_client,
    "httpx": httpx_client,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stream", action="store_true")
    args = parser.parse_args()

    queue: multiprocessing.Queue[int] = multiprocessing.Queue()
    server = multiprocessing.Process(target=server_main, args=(queue, args.stream), daemon=True)
    server.start()
    port = queue.get(timeout=10)
    try:
        results: dict[str, list[float]] = {name: [] for name in CLIENTS}
        for _ in range(args.rounds):
            for name, client in CLIENTS.items():
                trio.run(client, port, 200)  # warm up imports and caches
                cpu = time.process_time()
                trio.run(client, port, args.requests)
                cpu = time.process_time() - cpu
                results[name].append(cpu * 1000 / args.requests)
        kind = "SSE, 20 events" if args.stream else "JSON"
        print(f"CPU-ms per request ({kind}), median of {args.rounds} x {args.requests}:")
        for name, values in results.items():
            spread = ", ".join(f"{v:.3f}" for v in values)
            print(f"  {name:9} {statistics.median(values):.3f}   ({spread})")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
