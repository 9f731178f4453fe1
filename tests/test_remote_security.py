"""Remote XPU security: tokens, the allow-list, no unpickling, and fuzzed frames that never crash the worker
nor grant access."""

from __future__ import annotations

import pickle
import socket
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexai.remote import AuthError, FrameError, NotAllowedError, TransferError, connect
from flexai.remote.auth import check_token, make_token, new_secret, preamble
from flexai.remote.wire import MAGIC, PREFIX, VERSION, Limits, recv_frame
from tests.test_remote_support import InProcessWorker, token_of

ENTRY = "tests.test_remote_support:build"


@pytest.fixture
def worker(tmp_path: Path):  # noqa: ANN201
    w = InProcessWorker(tmp_path / "w")
    yield w
    w.stop()


def test_no_wrong_foreign_or_stale_token_is_accepted(worker: InProcessWorker, tmp_path: Path) -> None:
    spec = worker.spec
    other = InProcessWorker(tmp_path / "other")
    try:
        refused = {
            "": "token missing",
            "nonsense": "not a lease token",
            make_token(new_secret(), spec.lease, spec.epoch): "not issued by the pool",
            token_of(other.spec): f"issued for lease {other.spec.lease}",
            make_token(spec.secret, spec.lease, spec.epoch + 1): "epoch 2 is stale",
        }
        for token, message in refused.items():
            with pytest.raises(AuthError, match=message):
                connect(worker.endpoint, spec.lease, token).close()
        connect(worker.endpoint, spec.lease, token_of(spec)).close()
    finally:
        other.stop()


def test_a_token_goes_stale_when_the_epoch_moves_on() -> None:
    secret = new_secret()
    check_token(make_token(secret, "0123456789ab", 3), secret, "0123456789ab", 3)
    with pytest.raises(AuthError, match="epoch 2 is stale, lease 0123456789ab is at epoch 3"):
        check_token(make_token(secret, "0123456789ab", 2), secret, "0123456789ab", 3)


def test_only_allow_listed_entry_points_and_public_methods(worker: InProcessWorker) -> None:
    session = connect(worker.endpoint, worker.spec.lease, token_of(worker.spec))
    try:
        for entry, message in {
            "os:system": "allow-list is tests.test_remote_support:*",
            "builtins:eval": "allow-list",
            "tests.test_remote_support:_private": "no part may start with '_'",
            "tests.test_remote_support:Model.__init__.__globals__": "no part may start with '_'",
            "os.system": "module.path:callable",
            "tests.test_remote_support:nothing_here": "cannot be loaded",
        }.items():
            with pytest.raises(NotAllowedError, match=message):
                session.create(entry)
        net = session.create(ENTRY)
        for method in ("__reduce__", "__class__", "_private", "a b"):
            with pytest.raises(NotAllowedError, match="is not allowed: a public name"):
                net.call(method)
        assert net(np.ones(2)).tolist() == [1.0, 1.0]
    finally:
        session.close()


class _Boom:
    """Unpickling this creates the marker file: the proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def _raw_session(worker: InProcessWorker) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(worker.spec.unix)
    sock.sendall(preamble(worker.spec.lease))
    return sock


def _frame(header: dict, payload: bytes = b"", header_bytes: bytes | None = None) -> bytes:
    head = header_bytes if header_bytes is not None else msgpack.packb(header)
    return PREFIX.pack(MAGIC, VERSION, 0, len(head), len(payload)) + head + payload


def _answer(sock: socket.socket) -> dict:
    return recv_frame(sock, Limits()).header


def test_a_pickle_is_never_loaded(worker: InProcessWorker, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Boom(marker))
    token = token_of(worker.spec)
    session = connect(worker.endpoint, worker.spec.lease, token)
    try:
        net = session.create(ENTRY)
        assert net.call("echo", payload) == payload  # bytes travel as bytes
        with pytest.raises(TransferError, match="safetensors"):
            session.create(ENTRY, weights=payload)
        with pytest.raises(TransferError, match="dtype"):
            net.call("echo", np.array([_Boom(marker)], dtype=object))
    finally:
        session.close()
    # The same pickle declared as an object array, a structured array and a msgpack extension, on the wire.
    sock = _raw_session(worker)
    sock.sendall(_frame({"op": "hello", "token": token}))
    assert _answer(sock)["op"] == "ok"
    for dtype in ("|O", "O", "|V8", "<U1", "object"):
        args = {"ref": {"$ref": 1}, "method": "echo", "args": [{"$buf": 0, "dtype": dtype, "shape": [len(payload)]}]}
        sock.sendall(_frame({"op": "call", "id": 1, "token": token, "args": args, "bufs": [len(payload)]}, payload))
        answer = _answer(sock)
        assert answer["op"] == "error" and answer["kind"] == "frame" and "dtype" in answer["message"]
        sock.close()
        sock = _raw_session(worker)
        sock.sendall(_frame({"op": "hello", "token": token}))
        assert _answer(sock)["op"] == "ok"
    ext = msgpack.packb({"op": "call", "id": 2, "token": token, "args": msgpack.ExtType(1, payload)})
    sock.sendall(_frame({}, header_bytes=ext))
    answer = _answer(sock)
    assert answer["kind"] == "frame" and "extension type" in answer["message"]
    sock.close()
    assert not marker.exists()


def test_oversized_and_malformed_frames_are_refused_with_a_reason(worker: InProcessWorker) -> None:
    token = token_of(worker.spec)
    cases = {
        PREFIX.pack(b"HTTP", VERSION, 0, 10, 0): "magic",
        PREFIX.pack(MAGIC, 9, 0, 10, 0): "version 9",
        PREFIX.pack(MAGIC, VERSION, 0, 1 << 30, 0): "header length",
        PREFIX.pack(MAGIC, VERSION, 0, 10, 1 << 40): "payload length",
        _frame({}, header_bytes=b"\xc1\xc1\xc1"): "not valid msgpack",
        _frame({}, header_bytes=msgpack.packb([1, 2])): "a map is required",
        _frame({"op": "call", "token": token}): "before hello",
    }
    for data, message in cases.items():
        sock = _raw_session(worker)
        sock.sendall(data)
        answer = _answer(sock)
        assert answer["op"] == "error" and message in answer["message"], (data, answer)
        sock.close()
    # After hello: bounded buffers and shapes that must match the sizes.
    sock = _raw_session(worker)
    sock.sendall(_frame({"op": "hello", "token": token}))
    assert _answer(sock)["op"] == "ok"
    bad = {"$buf": 0, "dtype": "<f4", "shape": [1 << 40]}
    sock.sendall(_frame({"op": "call", "id": 1, "token": token, "args": {"args": [bad]}, "bufs": [8]}, bytes(8)))
    answer = _answer(sock)
    assert answer["kind"] == "frame" and "must agree" in answer["message"]
    sock.close()


frames = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda magic, version, flags, hlen, plen, body: PREFIX.pack(magic, version, flags, hlen, plen) + body,
        st.sampled_from([MAGIC, b"FXAJ", b"\x00\x00\x00\x00"]),
        st.sampled_from([VERSION, 0, 2, 65535]),
        st.sampled_from([0, 1]),
        st.integers(0, (1 << 32) - 1),
        st.integers(0, (1 << 64) - 1),
        st.binary(max_size=100),
    ),
    st.builds(
        lambda header, cut: _frame(header)[: cut if cut else None],
        st.dictionaries(
            st.sampled_from(["op", "id", "token", "args", "bufs", "$buf", "lease"]),
            st.one_of(st.none(), st.integers(-5, 1 << 40), st.text(max_size=20), st.binary(max_size=20),
                      st.lists(st.integers(-1, 1 << 33), max_size=3),
                      st.just("hello"), st.just("call"), st.just({"$buf": 0, "dtype": "<f4", "shape": [2]})),
        ),
        st.integers(0, 60),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=frames)
def test_fuzzed_frames_never_crash_the_worker_nor_grant_access(worker: InProcessWorker, data: bytes) -> None:
    sock = _raw_session(worker)
    sock.settimeout(0.3)
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # a truncated frame ends here
        answer = _answer(sock)
        assert answer["op"] == "error" and answer["kind"] in ("frame", "auth"), answer
    except (ConnectionError, TimeoutError, OSError, FrameError, struct.error):
        pass  # closed without a word, or still waiting for more: both refuse
    finally:
        sock.close()
    assert worker.thread.is_alive()
    assert not worker.worker.authenticated_once  # nothing fuzzed ever got in


def test_the_worker_still_serves_after_fuzzing(worker: InProcessWorker) -> None:
    for data in (b"\xff" * 50, _frame({}, header_bytes=b"\x81"), PREFIX.pack(MAGIC, VERSION, 0, 5, 0) + b"\x80"):
        sock = _raw_session(worker)
        sock.sendall(data)
        sock.close()
    session = connect(worker.endpoint, worker.spec.lease, token_of(worker.spec))
    assert session.create(ENTRY)(np.ones(3)).tolist() == [1.0, 1.0, 1.0]
    session.close()
