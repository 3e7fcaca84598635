"""What a guest needs besides QEMU: taps with DHCP (dnsmasq), virtiofs daemons, the console.

Thin effectful layer; the command lines come from runner.argv. Every child goes through the
one reaper (runner.procs), including the short `ip` commands.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import trio

from runner.log import log
from runner.procs import Child, Reaper

MAX_LINE = 8192  # bytes: a guest writing without newlines must not grow PID 1's memory


class PlumbingError(Exception):
    """A guest resource could not be set up; the message is for the operator."""


async def forward_lines(fd: int, on_line: Callable[[str], None]) -> None:
    """Read a pipe or socket to its end, one callback per line (cut at MAX_LINE bytes).
    Never raises."""
    try:
        stream = trio.lowlevel.FdStream(fd)
        buf = b""
        async with stream:
            while chunk := await stream.receive_some(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                while len(buf) > MAX_LINE:
                    lines.append(buf[:MAX_LINE])
                    buf = buf[MAX_LINE:]
                for raw in lines:
                    on_line(raw.decode(errors="replace").rstrip("\r"))
            if buf:
                on_line(buf.decode(errors="replace"))
    except Exception as e:  # output is lost, the instance is not
        log.warning("output-lost", error=f"{type(e).__name__}: {e}")


def spawn_logged(
    reaper: Reaper,
    nursery: trio.Nursery,
    name: str,
    argv: list[str],
    tail: list[str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> Child:
    """Start a child whose stdout and stderr become log events (and its last lines in `tail`)."""
    r, w = os.pipe()
    try:
        child = reaper.spawn(name, argv, stdout=w, stderr=w, pass_fds=pass_fds)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)

    def on_line(line: str) -> None:
        if tail is not None:
            tail[:] = [*tail[-9:], line]
        log.info("child-output", child=name, line=line)

    nursery.start_soon(forward_lines, r, on_line)
    return child


async def run_command(
    reaper: Reaper, nursery: trio.Nursery, argv: list[str], timeout: float = 10
) -> None:
    """A short command that must succeed (e.g. `ip`); PlumbingError with its output if not."""
    tail: list[str] = []
    try:
        child = spawn_logged(reaper, nursery, argv[0].rsplit("/", 1)[-1], argv, tail)
    except OSError as e:
        raise PlumbingError(f"cannot run {argv[0]}: {e.strerror}") from None
    try:
        with trio.move_on_after(timeout):
            code = await child.wait()
            await trio.sleep(0.01)  # its last line
            if code == 0:
                return
            last = tail[-1] if tail else ""
            raise PlumbingError(f"{' '.join(argv)} failed ({code}): {last}")
        raise PlumbingError(f"{' '.join(argv)} did not finish within {timeout:g} s")
    finally:
        if child.running:  # timed out, or start-up interrupted: never leave it behind
            with trio.CancelScope(shield=True):
                await child.stop(1)


async def start_socket_daemon(
    reaper: Reaper, nursery: trio.Nursery, name: str, argv: list[str], socket: str, timeout: float
) -> Child:
    """Start a daemon QEMU connects to (virtiofsd) and wait for its socket: QEMU must not
    start before it exists."""
    tail: list[str] = []
    try:
        child = spawn_logged(reaper, nursery, name, argv, tail)
    except OSError as e:
        raise PlumbingError(f"cannot start {argv[0]}: {e.strerror}") from None
    try:
        with trio.move_on_after(timeout):
            while not Path(socket).exists():
                if not child.running:
                    await trio.sleep(0.05)  # its last words
                    last = tail[-1] if tail else "no output"
                    raise PlumbingError(f"{name} exited with code {child.exit_code}: {last}")
                await trio.sleep(0.02)
            return child
        raise PlumbingError(f"{name} did not create {socket} within {timeout:g} s")
    except BaseException:
        # Refused, timed out or interrupted: the caller never gets the child, so stop it here.
        with trio.CancelScope(shield=True):
            await child.stop(1)
        raise


async def supervise_dnsmasq(
    reaper: Reaper,
    name: str,
    argv: list[str],
    on_up: Callable[[], None] = lambda: None,
) -> None:
    """Keep dnsmasq running: DHCP is not fatal, so a dead dnsmasq is restarted with backoff.
    The first one must come up (a wrong option would otherwise loop for ever). Cancelling
    this task stops it."""
    delay = 0.5
    started = False
    async with trio.open_nursery() as nursery:
        while True:
            tail: list[str] = []
            try:
                child = spawn_logged(reaper, nursery, name, argv, tail)
            except OSError as e:
                raise PlumbingError(f"cannot start dnsmasq: {e.strerror}") from None
            try:
                if not started:
                    with trio.move_on_after(0.5):
                        await child.wait()
                        await trio.sleep(0.05)  # its last words
                        raise PlumbingError(
                            f"{name} exited at once with code "
                            f"{child.exit_code}: {tail[-1] if tail else ''}"
                        )
                    on_up()
                    started = True
                code = await child.wait()
            finally:
                if child.running:
                    with trio.CancelScope(shield=True):
                        await child.stop(2)
            log.warning("dnsmasq-restart", child=name, code=code, delay=delay)
            reaper.restarts[name] += 1
            await trio.sleep(delay)
            delay = min(delay * 2, 10.0)
