"""The probe responder: requests parsed and answered as pure functions, then served for real
on the loopback."""

from __future__ import annotations

import pytest
import trio

from runner import httpd

ROUTES: dict[str, httpd.Route] = {
    "/healthz": lambda: (200, "ok\n"),
    "/readyz": lambda: (503, "not yet\n"),
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":8080", ("0.0.0.0", 8080)),
        ("[::1]:9464", ("::1", 9464)),
        ("node.local:1", ("node.local", 1)),
    ],
)
def test_addresses(text: str, expected: tuple[str, int]) -> None:
    assert httpd.parse_address(text) == expected


@pytest.mark.parametrize("text", ["9464", "host:", "host:0", "host:65536", "host:http"])
def test_bad_addresses_are_one_line_errors(text: str) -> None:
    with pytest.raises(httpd.AddressError, match="is not HOST:PORT"):
        httpd.parse_address(text)


def status_and_body(answer: bytes) -> tuple[str, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body


@pytest.mark.parametrize(
    ("request_line", "status", "body"),
    [
        (b"GET /healthz HTTP/1.1", "HTTP/1.1 200 OK", b"ok\n"),
        (b"GET /readyz?verbose HTTP/1.1", "HTTP/1.1 503 Service Unavailable", b"not yet\n"),
        (b"HEAD /healthz HTTP/1.1", "HTTP/1.1 200 OK", b""),
        (b"GET /metrics HTTP/1.1", "HTTP/1.1 404 Not Found", b"not found\n"),
        (b"POST /healthz HTTP/1.1", "HTTP/1.1 405 Method Not Allowed", b"GET or HEAD only\n"),
        (b"\xff\xfe garbage", "HTTP/1.1 400 Bad Request", b"bad request\n"),
        (b"GET /healthz", "HTTP/1.1 400 Bad Request", b"bad request\n"),
    ],
)
def test_responses(request_line: bytes, status: str, body: bytes) -> None:
    answer = trio.run(httpd.respond, request_line + b"\r\nHost: x\r\n\r\n", ROUTES)
    assert status_and_body(answer) == (status, body)
    if not request_line.startswith(b"HEAD"):
        assert f"\r\nContent-Length: {len(body)}\r\n".encode() in answer


async def test_served_on_the_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpd, "REQUEST_DEADLINE", 0.5)
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        for listener in listeners:
            await listener.aclose()
        await nursery.start(httpd.serve, f"127.0.0.1:{port}", ROUTES)
        answers = []
        for path in ("/healthz", "/readyz"):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                data = b""
                while chunk := await stream.receive_some(4096):
                    data += chunk
            answers.append(status_and_body(data))
        # A client that connects and says nothing is dropped, not waited for forever.
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(httpd.REQUEST_DEADLINE + 2):
            assert await idle.receive_some(10) == b""
        await idle.aclose()
        nursery.cancel_scope.cancel()
    assert answers == [
        ("HTTP/1.1 200 OK", b"ok\n"),
        ("HTTP/1.1 503 Service Unavailable", b"not yet\n"),
    ]


def test_a_route_that_must_ask_someone_is_awaited() -> None:
    async def asks() -> httpd.Reply:
        await trio.sleep(0)
        return 200, "asked\n"

    answer = trio.run(httpd.respond, b"GET /metrics HTTP/1.1\r\n\r\n", {"/metrics": asks})
    assert status_and_body(answer) == ("HTTP/1.1 200 OK", b"asked\n")
