"""JSON-RPC 2.0 between runners and the node controller: one JSON object per line.

The messages are attrs classes (un)structured by cattrs; decoding is pure and never raises
for bad input: it yields the error response the peer should get. The transport (framing with a
size limit, a client call) is a thin layer over trio streams.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import attrs
import trio

from runner.netplan import NetworkPlan
from runner.node.cgroupfs import Pressure
from runner.node.pinning import KeptCounts
from runner.plan import Placed
from runner.spec import converter as strict_converter
from runner.spec import describe

MAX_MESSAGE = 64 * 1024
VERSION = "2.0"
# What one request may hold once parsed, checked before any of it is structured: what the
# decoder does for a caller is then bounded whatever the caller sends. Far above what a
# runner sends (a list is a VM's vCPUs; a string a UID or a CPU list).
MAX_ITEMS = 1024  # items in one list
MAX_STRING = 8192  # characters in one string (a sparse CPU list of a big node)
MAX_VALUES = 4096  # values in one request, nested ones counted
MAX_DEPTH = 6
MAX_TEXT = 200  # characters of an error message in a reply: it may quote the caller

# Standard codes, then the controller's own (-32000 to -32099 are for the application).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
FORBIDDEN = -32001  # the caller may not do this (not its pod, not its CPUs)
CONFLICT = -32002  # the uuid is live with another cpuset
BUSY = -32003  # the instance cgroup still holds threads
TOO_LARGE = -32004  # message over MAX_MESSAGE

Id = int | str | None


@attrs.frozen
class RegisterParams:
    uuid: str
    cpuset: str


@attrs.frozen
class RegisterResult:
    cgroup_path: str
    float_path: str
    # The caller's container cgroup and float's CPUs: a caller in a private cgroup namespace
    # can see neither.
    container_path: str = ""
    float_cpus: str = ""


@attrs.frozen
class DeregisterParams:
    uuid: str


@attrs.frozen
class DeregisterResult:
    removed: bool


@attrs.frozen
class EmptyParams:
    pass


@attrs.frozen
class InstanceInfo:
    uuid: str
    cgroup_path: str
    cpuset: str
    threads: int


@attrs.frozen
class ListResult:
    instances: list[InstanceInfo]


@attrs.frozen
class HealthResult:
    """The node's view for the node; to a pod, only whether the controller serves."""

    status: str
    float_cpus: str | None = None
    instances: int | None = None


@attrs.frozen
class MoveParams:
    """Move one process of the caller's pod (`pid` as the caller sees it, in its own PID
    namespace) into float or back into its container cgroup."""

    uuid: str
    pid: int
    to: Literal["float", "container"]


@attrs.frozen
class MoveResult:
    moved: bool


@attrs.frozen
class PlaceParams:
    """QEMU (`qemu`) to float and its vCPU threads each into the instance cgroup, on its
    CPU, SCHED_FIFO where a priority is given; then kept so while QEMU lives. `anchor` is the
    one process that stays in the container cgroup; anything else that joins it is moved to
    float. PIDs and TIDs as the caller sees them."""

    uuid: str
    qemu: int
    anchor: int
    vcpus: list[Placed]


@attrs.frozen
class PlaceResult:
    placed: int


@attrs.frozen
class StatusParams:
    uuid: str


@attrs.frozen
class StatusResult:
    """What a runner in a private cgroup namespace cannot read itself: cpu.pressure of its
    instance cgroup and of float, by those names, and the keeping counts (null before its
    vCPUs are placed)."""

    pressure: dict[str, Pressure]
    kept: KeptCounts | None


@attrs.frozen
class NetworkParams:
    """Make the plan in the caller's own network namespace (taps owned by the caller's
    user, the sysctls and the tables it needs)."""

    uuid: str
    plan: NetworkPlan


@attrs.frozen
class NetworkResult:
    before: dict[str, str]  # the sysctls as they were: sent back to unmake the plan


@attrs.frozen
class UnmakeNetworkParams:
    uuid: str
    plan: NetworkPlan
    before: dict[str, str]


@attrs.frozen
class UnmakeNetworkResult:
    removed: bool


PARAMS: dict[str, type] = {
    "registerCgroup": RegisterParams,
    "deregisterCgroup": DeregisterParams,
    "moveProcess": MoveParams,
    "placeVcpus": PlaceParams,
    "instanceStatus": StatusParams,
    "makeNetwork": NetworkParams,
    "unmakeNetwork": UnmakeNetworkParams,
    "listInstances": EmptyParams,
    "health": EmptyParams,
}


@attrs.frozen
class Request:
    method: str
    params: Any
    id: Id


@attrs.frozen
class ErrorObject:
    code: int
    message: str


@attrs.frozen
class Response:
    id: Id
    result: Any = None
    error: ErrorObject | None = None


class ConnectError(OSError):
    """No connection was made: nothing was sent."""


class ConnectionLost(OSError):
    """The connection broke after it was made: the request may have been read."""


class RPCError(Exception):
    """An error response, raised on the client side."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message


converter = strict_converter  # strict types, unknown keys refused: shared with the spec


def error(id_: Id, code: int, message: str) -> Response:
    return Response(id=id_, error=ErrorObject(code, trim(message)))


def trim(text: str, limit: int = MAX_TEXT) -> str:
    """A caller's text cut to `limit` characters, for a reply or a log line."""
    return text if len(text) <= limit else text[:limit] + "…"


def out_of_bounds(doc: object) -> str | None:
    """Why a parsed request is too big to be looked at further, or None. Iterative: a
    caller's nesting never reaches Python's recursion."""
    stack: list[tuple[object, int]] = [(doc, 0)]
    values = 0
    while stack:
        value, depth = stack.pop()
        values += 1
        if values > MAX_VALUES:
            return f"more than {MAX_VALUES} values"
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH}"
        if isinstance(value, str):
            if len(value) > MAX_STRING:
                return f"a string over {MAX_STRING} characters"
        elif isinstance(value, list):
            if len(value) > MAX_ITEMS:
                return f"a list over {MAX_ITEMS} items"
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, dict):
            if len(value) > MAX_ITEMS:
                return f"an object over {MAX_ITEMS} members"
            for k, v in value.items():
                stack.append((k, depth + 1))
                stack.append((v, depth + 1))
    return None


@attrs.frozen
class Notification:
    """A request without an id: JSON-RPC 2.0 forbids answering it. None is supported, so it
    is logged and dropped."""

    method: str


def decode_request(line: bytes) -> Request | Response | Notification:
    """A request, the error response that answers a malformed one, or a notification."""
    # Every value but the first follows a comma or a colon: a line with more of them than a
    # request may hold values is refused before the parser builds any of them.
    if line.count(b",") + line.count(b":") > MAX_VALUES:
        return error(None, INVALID_REQUEST, f"invalid request: more than {MAX_VALUES} values")
    try:
        doc = json.loads(line)
    except RecursionError:
        return error(None, PARSE_ERROR, "parse error: nested too deeply")
    except (ValueError, UnicodeDecodeError) as e:
        return error(None, PARSE_ERROR, f"parse error: {e}")
    if isinstance(doc, list):
        return error(None, INVALID_REQUEST, "invalid request: batches are not supported")
    if not isinstance(doc, dict):
        return error(None, INVALID_REQUEST, "invalid request: not a JSON object")
    if (why := out_of_bounds(doc)) is not None:
        return error(None, INVALID_REQUEST, f"invalid request: {why}")
    raw_id = doc.get("id")
    id_: Id = raw_id if type(raw_id) in (int, str) or raw_id is None else None
    if doc.get("jsonrpc") != VERSION:
        return error(id_, INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
    if "id" not in doc and isinstance(doc.get("method"), str):
        return Notification(trim(doc["method"], 64))
    if type(raw_id) not in (int, str):
        return error(None, INVALID_REQUEST, "invalid request: id must be a string or integer")
    method = doc.get("method")
    if not isinstance(method, str):
        return error(id_, INVALID_REQUEST, "invalid request: method must be a string")
    extra = set(doc) - {"jsonrpc", "method", "params", "id"}
    if extra:
        return error(id_, INVALID_REQUEST, f"invalid request: unknown member(s) {sorted(extra)}")
    kind = PARAMS.get(method)
    if kind is None:
        return error(id_, METHOD_NOT_FOUND, f"method not found: {method!r}")
    raw = doc.get("params", {})
    if not isinstance(raw, dict):
        return error(id_, INVALID_PARAMS, "invalid params: must be an object")
    try:
        params: object = converter.structure(raw, kind)
    except Exception as e:  # cattrs' grouped errors: describe them, never crash the server
        return error(id_, INVALID_PARAMS, f"invalid params: {describe(e)}")
    return Request(method, params, id_)


def encode_request(method: str, params: object, id_: Id) -> bytes:
    doc = {"jsonrpc": VERSION, "method": method, "params": converter.unstructure(params), "id": id_}
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def encode_response(resp: Response) -> bytes:
    doc: dict[str, Any] = {"jsonrpc": VERSION, "id": resp.id}
    if resp.error is not None:
        doc["error"] = {"code": resp.error.code, "message": resp.error.message}
    else:
        doc["result"] = converter.unstructure(resp.result)
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def decode_response(line: bytes, result_type: type, id_: Id = None) -> Any:
    """The result of a response line (to request `id_`, when given), or RPCError."""
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise RPCError(PARSE_ERROR, f"unreadable response: {e}") from None
    if not isinstance(doc, dict) or doc.get("jsonrpc") != VERSION:
        raise RPCError(INVALID_REQUEST, "not a JSON-RPC 2.0 response")
    if "error" in doc:
        err = doc["error"] if isinstance(doc["error"], dict) else {}
        code = err.get("code")
        raise RPCError(
            code if type(code) is int else INTERNAL_ERROR, str(err.get("message", "error"))
        )
    if id_ is not None and doc.get("id") != id_:
        raise RPCError(INVALID_REQUEST, f"response to request {doc.get('id')!r}, not {id_!r}")
    try:
        return converter.structure(doc.get("result"), result_type)
    except Exception as e:
        raise RPCError(INVALID_PARAMS, f"malformed result: {e}") from None


class LineReader:
    """Newline framing over a trio stream, refusing lines over `limit` bytes."""

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int = MAX_MESSAGE) -> None:
        self.stream = stream
        self.limit = limit
        self.buf = bytearray()

    async def readline(self) -> bytes | None:
        """One line without its newline; None at EOF; ValueError when over the limit."""
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                if nl > self.limit:
                    raise ValueError("message too large")
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                return line
            if len(self.buf) > self.limit:
                raise ValueError("message too large")
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buf += chunk


async def call(
    socket_path: str, method: str, params: object, result_type: type, timeout: float = 10
) -> Any:
    """One request on a fresh connection, with a deadline on everything."""
    with trio.fail_after(timeout):
        try:
            stream = await trio.open_unix_socket(socket_path)
        except OSError as e:
            raise ConnectError(
                e.errno, f"cannot connect to {socket_path}: {e.strerror or e}"
            ) from None
        try:
            async with stream:
                await stream.send_all(encode_request(method, params, 1))
                line = await LineReader(stream).readline()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            # ECONNRESET, EPIPE: a controller that is full, or restarting, dropped us.
            cause = e.__cause__ if isinstance(e.__cause__, OSError) else None
            raise ConnectionLost(
                getattr(cause, "errno", None) or 0,
                f"the controller at {socket_path} dropped the connection: "
                f"{getattr(cause, 'strerror', None) or type(e).__name__}",
            ) from None
    if line is None:
        raise RPCError(INTERNAL_ERROR, "the controller closed the connection")
    return decode_response(line, result_type, 1)
