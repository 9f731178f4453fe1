"""Remote XPU client and worker: resident objects, handles, pipelined calls, weights, TLS and unix transports."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from flexai.remote import RemoteCallError, RemoteObject, TransferError, connect
from flexai.remote.client import parse_memory, parse_share
from tests.test_remote_support import certs, token_of, workers  # noqa: F401  (fixtures)

ENTRY = "tests.test_remote_support:build"


@pytest.fixture
def tls_worker(workers, certs):  # noqa: ANN001, ANN201, F811
    cert, key = certs
    return workers(tcp="127.0.0.1:0", tls_cert=cert, tls_key=key)


@pytest.mark.parametrize("transport", ["unix", "tls"])
def test_resident_objects_handles_and_pipelined_calls(tls_worker, certs, transport: str) -> None:  # noqa: F811
    endpoint = f"unix:{tls_worker.spec.unix}" if transport == "unix" else tls_worker.tls_endpoint
    session = connect(endpoint, tls_worker.spec.lease, token_of(tls_worker.spec), ca=certs[0])
    try:
        net = session.create(ENTRY, scale=3.0)
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        np.testing.assert_array_equal(net(x), x * 3)
        kept = net.call("encode", x, keep=True)
        assert isinstance(kept, RemoteObject)
        np.testing.assert_array_equal(kept.fetch(), x * 2)
        assert net.call("total", kept, x) == pytest.approx(float((x * 3).sum()))  # a handle passed on
        futures = [net.call_async("echo", {"i": i, "name": "é", "v": [x[i], None, True, 2.5]}) for i in range(3)]
        for i, future in enumerate(futures):
            got = future.result(10)
            assert got["i"] == i and got["name"] == "é" and got["v"][1:] == [None, True, 2.5]
            np.testing.assert_array_equal(got["v"][0], x[i])
        assert net.call("echo", b"raw\x00bytes") == b"raw\x00bytes"
        for dtype in ("bool", "int8", "uint64", "float16", "float64", "complex64"):
            value = np.ones((2, 0, 3) if dtype == "bool" else (5,), dtype)
            back = net.call("echo", value)
            assert back.dtype == value.dtype and back.shape == value.shape
        strided = np.arange(20, dtype=np.int32)[::2]
        np.testing.assert_array_equal(net.call("echo", strided), strided)
        kept.free()
    finally:
        session.close()


def test_errors_come_back_typed_and_the_session_goes_on(tls_worker) -> None:
    session = connect(f"unix:{tls_worker.spec.unix}", tls_worker.spec.lease, token_of(tls_worker.spec))
    try:
        net = session.create(ENTRY)
        with pytest.raises(RemoteCallError, match="boom") as caught:
            net.call("fail", "boom")
        assert caught.value.remote_type == "ValueError"
        with pytest.raises(TransferError, match="cannot travel"):
            net.call("opaque")
        assert isinstance(net.call("opaque", keep=True), RemoteObject)  # kept on the slice instead
        with pytest.raises(TransferError, match="dtype"):
            net.call("echo", np.array([object()], dtype=object))
        assert net.call("echo", 7) == 7
    finally:
        session.close()


def test_weights_load_as_safetensors(tls_worker, tmp_path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file({"bias": np.full(4, 0.5, np.float32)}, str(path))
    session = connect(f"unix:{tls_worker.spec.unix}", tls_worker.spec.lease, token_of(tls_worker.spec))
    try:
        net = session.create(ENTRY, weights=path, scale=2.0)
        np.testing.assert_array_equal(net(np.ones(4, np.float32)), np.full(4, 2.5, np.float32))
        with pytest.raises(TransferError, match="safetensors"):
            session.create(ENTRY, weights=b"not a safetensors file")
    finally:
        session.close()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_a_torch_module_runs_remotely(tls_worker) -> None:
    import torch

    session = connect(f"unix:{tls_worker.spec.unix}", tls_worker.spec.lease, token_of(tls_worker.spec))
    try:
        net = session.create("tests.test_remote_support:torch_module")
        x = torch.ones(2, 8)
        y = net(x)
        assert isinstance(y, torch.Tensor) and y.shape == (2, 4)
        from tests.test_remote_support import torch_module

        torch.testing.assert_close(y, torch_module()(x).detach())
    finally:
        session.close()


def test_share_and_memory_parsing() -> None:
    assert parse_share("10%") == 100 and parse_share("250m") == 250 and parse_share(300) == 300
    assert parse_memory("4GiB") == 4096 and parse_memory("512MiB") == 512 and parse_memory(0) == 0
    with pytest.raises(ValueError, match="share='ten' is not allowed"):
        parse_share("ten")
    with pytest.raises(ValueError, match="memory='4 bananas' is not allowed"):
        parse_memory("4 bananas")
