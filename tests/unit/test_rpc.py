"""JSON-RPC codec: standard error codes for every kind of bad input, never an exception;
round trips for every message; framing with a size limit."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import cpus, rpc
from runner.node.cgroupfs import Pressure
from runner.node.pinning import KeptCounts
from runner.plan import Placed

UID = "0a1b2c3d-1111-2222-3333-444455556666"


def decode(doc: object) -> rpc.Request | rpc.Response | rpc.Notification:
    return rpc.decode_request(json.dumps(doc).encode())


def code_of(result: rpc.Request | rpc.Response | rpc.Notification) -> int | None:
    return result.error.code if isinstance(result, rpc.Response) and result.error else None


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{", rpc.PARSE_ERROR),
        (b"\xff\xfe", rpc.PARSE_ERROR),
        (b"[]", rpc.INVALID_REQUEST),
        (b'[{"jsonrpc":"2.0","method":"health","id":1}]', rpc.INVALID_REQUEST),
        (b"42", rpc.INVALID_REQUEST),
        (b'{"method":"health","id":1}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc":"1.0","method":"health","id":1}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":"health","id":[1]}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":5,"id":1}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":"health","id":1,"x":1}', rpc.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":"rm -rf","id":1}', rpc.METHOD_NOT_FOUND),
        (b'{"jsonrpc":"2.0","method":"registerCgroup","id":1,"params":[1]}', rpc.INVALID_PARAMS),
        (
            b'{"jsonrpc":"2.0","method":"registerCgroup","id":1,"params":{"uuid":5,"cpuset":"1"}}',
            rpc.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc":"2.0","method":"registerCgroup","id":1,"params":{"uuid":"u"}}',
            rpc.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc":"2.0","method":"deregisterCgroup","id":1,"params":{"uuid":"u","x":1}}',
            rpc.INVALID_PARAMS,
        ),
        # The calls an unprivileged pod makes: the controller acts on the node for them, so
        # nothing loose gets through: no other target cgroup, no strings for numbers.
        (
            b'{"jsonrpc":"2.0","method":"moveProcess","id":1,'
            b'"params":{"uuid":"u","pid":3,"to":"instance"}}',
            rpc.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc":"2.0","method":"moveProcess","id":1,'
            b'"params":{"uuid":"u","pid":3,"to":"/sys/fs/cgroup/kubepods"}}',
            rpc.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc":"2.0","method":"moveProcess","id":1,'
            b'"params":{"uuid":"u","pid":"3","to":"float"}}',
            rpc.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc":"2.0","method":"moveProcess","id":1,'
            b'"params":{"uuid":"u","pid":3.5,"to":"float"}}',
            rpc.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc":"2.0","method":"moveProcess","id":1,'
            b'"params":{"uuid":"u","pid":true,"to":"float"}}',
            rpc.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc":"2.0","method":"moveProcess","id":1,'
            b'"params":{"uuid":"u","pid":3,"to":"float","cgroup":"/"}}',
            rpc.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc":"2.0","method":"placeVcpus","id":1,'
            b'"params":{"uuid":"u","qemu":3,"anchor":2,"vcpus":{"0":1}}}',
            rpc.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc":"2.0","method":"placeVcpus","id":1,"params":{"uuid":"u","qemu":3,'
            b'"anchor":2,"vcpus":[{"vcpu":0,"tid":5,"cpu":1,"priority":"99"}]}}',
            rpc.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc":"2.0","method":"placeVcpus","id":1,"params":{"uuid":"u","qemu":3,'
            b'"anchor":2,"vcpus":[{"vcpu":0,"tid":5,"cpu":1,"policy":"fifo"}]}}',
            rpc.INVALID_PARAMS,
        ),
        (b'{"jsonrpc":"2.0","method":"instanceStatus","id":1,"params":{}}', rpc.INVALID_PARAMS),
        (
            b'{"jsonrpc":"2.0","method":"instanceStatus","id":1,"params":{"uuid":7}}',
            rpc.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc":"2.0","method":"instanceStatus","id":1,'
            b'"params":{"uuid":"u","cgroup":"/"}}',
            rpc.INVALID_PARAMS,
        ),
    ],
)
def test_bad_requests_get_standard_codes(line: bytes, code: int) -> None:
    assert code_of(rpc.decode_request(line)) == code


def test_deep_nesting_is_refused_not_a_crash() -> None:
    assert code_of(rpc.decode_request(b"[" * 100_000)) == rpc.PARSE_ERROR
    # 50,000 members: refused by their count before the parser sees them.
    assert code_of(rpc.decode_request(b'{"a":' * 50_000)) == rpc.INVALID_REQUEST
    assert code_of(rpc.decode_request(b'{"a":' * 1_000)) == rpc.PARSE_ERROR


def test_notifications_get_no_answer() -> None:
    assert rpc.decode_request(b'{"jsonrpc":"2.0","method":"health"}') == rpc.Notification("health")


def test_malformed_error_responses_and_wrong_ids() -> None:
    with pytest.raises(rpc.RPCError) as e:
        rpc.decode_response(b'{"jsonrpc":"2.0","id":1,"error":{"code":"x"}}', rpc.HealthResult)
    assert e.value.code == rpc.INTERNAL_ERROR
    ok = b'{"jsonrpc":"2.0","id":2,"result":{"status":"ok","float_cpus":"0","instances":0}}'
    with pytest.raises(rpc.RPCError, match="not 1"):
        rpc.decode_response(ok, rpc.HealthResult, 1)


def test_error_keeps_the_request_id_when_it_has_one() -> None:
    resp = decode({"jsonrpc": "2.0", "method": "nope", "id": "abc"})
    assert isinstance(resp, rpc.Response) and resp.id == "abc"


def test_valid_requests() -> None:
    req = decode(
        {
            "jsonrpc": "2.0",
            "method": "registerCgroup",
            "id": 7,
            "params": {"uuid": UID, "cpuset": "1-2"},
        }
    )
    assert req == rpc.Request("registerCgroup", rpc.RegisterParams(UID, "1-2"), 7)
    assert decode({"jsonrpc": "2.0", "method": "health", "id": "h"}) == rpc.Request(
        "health", rpc.EmptyParams(), "h"
    )
    move = {"uuid": UID, "pid": 7, "to": "container"}
    assert decode({"jsonrpc": "2.0", "method": "moveProcess", "id": 1, "params": move}) == (
        rpc.Request("moveProcess", rpc.MoveParams(UID, 7, "container"), 1)
    )
    place = {"uuid": UID, "qemu": 9, "anchor": 2, "vcpus": [{"vcpu": 0, "tid": 11, "cpu": 3}]}
    assert decode({"jsonrpc": "2.0", "method": "placeVcpus", "id": 2, "params": place}) == (
        rpc.Request("placeVcpus", rpc.PlaceParams(UID, 9, 2, [Placed(0, 11, 3, 0)]), 2)
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(st.binary(max_size=300))
def test_any_bytes_decode_without_raising(line: bytes) -> None:
    assert isinstance(rpc.decode_request(line), (rpc.Request, rpc.Response, rpc.Notification))


@given(json_values)
def test_any_json_decodes_without_raising(doc: object) -> None:
    assert isinstance(decode(doc), (rpc.Request, rpc.Response, rpc.Notification))


@given(
    st.fixed_dictionaries(
        {
            "jsonrpc": st.just("2.0"),
            "id": st.integers(),
            "method": st.sampled_from(sorted(rpc.PARAMS)),
            "params": json_values,
        }
    )
)
def test_any_params_decode_without_raising(doc: dict[str, object]) -> None:
    result = decode(doc)
    assert isinstance(result, (rpc.Request, rpc.Response, rpc.Notification))


uuids = st.uuids().map(str)
cpusets = st.sets(st.integers(0, 255), min_size=1).map(cpus.format)


@given(uuids, cpusets, st.integers() | st.text(max_size=10))
def test_register_round_trip(uuid: str, cpuset: str, id_: int | str) -> None:
    line = rpc.encode_request("registerCgroup", rpc.RegisterParams(uuid, cpuset), id_)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert rpc.decode_request(line[:-1]) == rpc.Request(
        "registerCgroup", rpc.RegisterParams(uuid, cpuset), id_
    )


@given(st.lists(st.builds(rpc.InstanceInfo, uuids, st.text(), cpusets, st.integers(0, 9))))
def test_list_result_round_trip(instances: list[rpc.InstanceInfo]) -> None:
    line = rpc.encode_response(rpc.Response(1, result=rpc.ListResult(instances)))
    assert rpc.decode_response(line, rpc.ListResult) == rpc.ListResult(instances)


@given(st.integers(-32768, -32000), st.text())
def test_error_round_trip(code: int, message: str) -> None:
    line = rpc.encode_response(rpc.error(3, code, message))
    with pytest.raises(rpc.RPCError) as e:
        rpc.decode_response(line, rpc.HealthResult)
    assert (e.value.code, e.value.message) == (code, message)


@settings(max_examples=50)
@given(
    st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b), max_size=8),
    st.integers(1, 17),
)
async def test_line_reader_frames_whatever_the_chunking(lines: list[bytes], chunk: int) -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    data = b"".join(line + b"\n" for line in lines)

    async def writer() -> None:
        for i in range(0, len(data), chunk):
            await send.send_all(data[i : i + chunk])
        await send.aclose()

    got = []
    async with trio.open_nursery() as n:
        n.start_soon(writer)
        reader = rpc.LineReader(receive)
        while (line := await reader.readline()) is not None:
            got.append(line)
    assert got == lines


async def test_line_reader_refuses_oversized_lines() -> None:
    send, receive = trio.testing.memory_stream_one_way_pair()
    await send.send_all(b"x" * (rpc.MAX_MESSAGE + 10))
    with pytest.raises(ValueError, match="too large"):
        await rpc.LineReader(receive).readline()


def test_status_round_trip() -> None:
    """What a runner in a private cgroup namespace reads through the controller; "full" is
    missing before 5.13 and kept counts before its vCPUs are placed."""
    for result in (
        rpc.StatusResult(
            {"instance": Pressure(250, 100), "float": Pressure(7, None)},
            KeptCounts(drifts=2, repins=1, moved_to_float=3, evicted=0),
        ),
        rpc.StatusResult({}, None),
    ):
        line = rpc.encode_response(rpc.Response(1, result=result))
        assert rpc.decode_response(line, rpc.StatusResult, 1) == result
    bad = b'{"jsonrpc":"2.0","id":1,"result":{"pressure":{"instance":{"some_us":"x"}}}}'
    with pytest.raises(rpc.RPCError):
        rpc.decode_response(bad, rpc.StatusResult, 1)


# --- the decoder's cost is bounded before anything is structured ----------------------------

# Generous against what the bounds allow (about 20 ms for the worst shape found, 1024 empty
# vCPU objects) and far below what an unbounded decoder spent (1 to 2.5 s per 64 KiB line).
CPU_BOUND = 0.25
REPLY_BOUND = 512

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=40,
)
_method = st.sampled_from([*rpc.PARAMS, "x", ""])


def _line(method: str, item: object, count: int, field: str) -> bytes:
    params: dict[str, object] = {"uuid": UID, "qemu": 1, "anchor": 1, "cpuset": "1", "pid": 1}
    params[field] = [item] * count
    doc = {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}
    return json.dumps(doc).encode()[: rpc.MAX_MESSAGE]


def _cost(line: bytes) -> tuple[float, int]:
    import time

    started = time.process_time()
    answer = rpc.decode_request(line)
    spent = time.process_time() - started
    reply = rpc.encode_response(answer) if isinstance(answer, rpc.Response) else b""
    return spent, len(reply)


@settings(max_examples=150, deadline=None)
@given(
    _method,
    _json,
    st.integers(0, 30000),
    st.sampled_from(["vcpus", "uuid", "cpuset", "extra", "pid"]),
)
def test_any_request_costs_little_and_is_answered_briefly(
    method: str, item: object, count: int, field: str
) -> None:
    line = _line(method, item, count, field)
    if len(line) >= rpc.MAX_MESSAGE:
        line = line[: rpc.MAX_MESSAGE - 1]  # a cut line: a parse error, cheaply
    spent, reply = _cost(line)
    assert spent < CPU_BOUND, (spent, line[:200])
    assert reply < REPLY_BOUND, reply


@pytest.mark.parametrize(
    "line",
    [
        _line("placeVcpus", {}, 21000, "vcpus"),  # measured before: 1 to 2.5 s, a 3 MB reply
        _line("placeVcpus", {}, rpc.MAX_ITEMS, "vcpus"),
        _line("placeVcpus", {"vcpu": "a", "tid": "b", "cpu": [], "priority": {}}, 1000, "vcpus"),
        _line("registerCgroup", "9" * 8000, 1, "cpuset"),
        b'{"jsonrpc":"2.0","id":1,"method":"health","params":' + b"[" * 30000,
        json.dumps({"jsonrpc": "2.0", "method": "m" * 60000}).encode(),
    ],
    ids=["64k-empty-vcpus", "max-empty-vcpus", "wrong-types", "long-string", "deep", "notify"],
)
def test_known_expensive_shapes_are_cheap(line: bytes) -> None:
    spent, reply = _cost(line)
    assert spent < CPU_BOUND and reply < REPLY_BOUND, (spent, reply)


def test_a_notification_carries_a_trimmed_method() -> None:
    doc = {"jsonrpc": "2.0", "method": "m" * 5000}
    note = rpc.decode_request(json.dumps(doc).encode())
    assert isinstance(note, rpc.Notification) and len(note.method) <= 65
