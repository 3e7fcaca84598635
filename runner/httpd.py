"""A small HTTP/1.1 responder for kubelet's probes: GET or HEAD of a few fixed paths, one
request per connection, then close. kubelet runs httpGet probes itself; an exec probe would
run inside the container's cgroup, on the CPUs it should leave alone.

It only wakes when a request comes: no timers while idle.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus

import trio

from runner.log import log

# A route answers with a status and a body, computed when asked (awaited, when it must ask
# someone); a third item, when there is one, is the body's content type (text/plain otherwise).
Reply = tuple[int, str] | tuple[int, str, str]
Route = Callable[[], Reply | Awaitable[Reply]]
TEXT = "text/plain; charset=utf-8"

REQUEST_DEADLINE = 5.0  # a client that does not finish its request head in time is dropped
MAX_HEAD = 8192


class AddressError(ValueError):
    """An address that is not HOST:PORT."""


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or :PORT for every address."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"{text!r} is not HOST:PORT (for example 0.0.0.0:9464)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


async def respond(head: bytes, routes: Mapping[str, Route]) -> bytes:
    """The whole response to a request head. Pure but for the route it calls."""
    try:
        method, target, _version = head.split(b"\r\n", 1)[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        return _response(400, "bad request\n", with_body=True)
    path = target.split("?", 1)[0]
    if path not in routes:
        return _response(404, "not found\n", with_body=method != "HEAD")
    if method not in ("GET", "HEAD"):
        return _response(405, "GET or HEAD only\n", with_body=True)
    try:
        reply = routes[path]()
        status, body, *kind = await reply if inspect.isawaitable(reply) else reply
    except Exception as e:  # a route's bug answers this request, never stops the listener
        log.error("http-route-failed", path=path, error=f"{type(e).__name__}: {e}")
        return _response(500, "internal error\n", with_body=method == "GET")
    return _response(
        status, body, with_body=method == "GET", content_type=kind[0] if kind else TEXT
    )


def _response(status: int, body: str, with_body: bool, content_type: str = TEXT) -> bytes:
    data = body.encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head + data if with_body else head


async def _handle(stream: trio.SocketStream, routes: Mapping[str, Route]) -> None:
    async with stream:
        head = b""
        with trio.move_on_after(REQUEST_DEADLINE):
            while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
                try:
                    chunk = await stream.receive_some(MAX_HEAD)
                except trio.BrokenResourceError:
                    return
                if not chunk:
                    break
                head += chunk
        if not head:
            return
        with trio.move_on_after(REQUEST_DEADLINE):
            try:
                await stream.send_all(await respond(head, routes))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def serve(
    address: str,
    routes: Mapping[str, Route],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `routes` on `address` until cancelled; started() once listening. Raises OSError
    when the address cannot be bound."""
    host, port = parse_address(address)
    listeners = await trio.open_tcp_listeners(port, host=host)
    log.info("http-serving", address=address, paths=sorted(routes))

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, routes)

    task_status.started()
    await trio.serve_listeners(handler, listeners)
