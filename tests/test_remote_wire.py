"""Remote XPU wire details: the buffered frame reader and the pool of recycled receive blocks."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np

from flexai.remote import connect
from flexai.remote.wire import BufferPool, FrameReader, Limits, encode_tree, send_frame
from tests.test_remote_support import token_of, workers  # noqa: F401  (fixtures)


def test_frames_that_arrive_together_are_read_one_by_one() -> None:
    a, b = socket.socketpair()

    def send() -> None:
        for i, value in enumerate(([np.arange(5, dtype=np.int16)], {"k": b"raw"}, [np.ones(100_000)])):
            buffers: list[memoryview] = []
            send_frame(a, {"op": "call", "id": i, "args": encode_tree(value, buffers)}, buffers)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    with a, b:
        time.sleep(0.1)  # the small frames are queued together
        reader = FrameReader(b, size=4096)  # smaller than the third frame: it goes straight into its array
        first, second, third = (reader.read_frame(Limits()) for _ in range(3))
        assert [f.header["id"] for f in (first, second, third)] == [0, 1, 2]
        np.testing.assert_array_equal(first.value[0], np.arange(5, dtype=np.int16))
        assert second.value == {"k": bytearray(b"raw")}
        np.testing.assert_array_equal(third.value[0], np.ones(100_000))
        assert reader.buffered() == 0
        sender.join(5)


def test_a_pool_block_is_reused_only_when_nobody_holds_it() -> None:
    pool = BufferPool(max_bytes=8 << 20, min_bytes=1 << 20)
    first = pool.take(2 << 20)
    kept = first.view(np.float64)  # a view made by the called code keeps the memory
    del first
    second = pool.take(2 << 20)
    assert not np.shares_memory(second, kept)
    address = second.ctypes.data
    del second
    assert pool.take(2 << 20).ctypes.data == address  # free again: recycled


def test_a_long_call_leaves_the_connection_read(workers) -> None:  # noqa: F811
    """A call runs on the thread that read it; when it runs long, heartbeats and other calls are still read."""
    worker = workers()
    session = connect(f"unix:{worker.spec.unix}", worker.spec.lease, token_of(worker.spec), heartbeat_s=0.1)
    try:
        net = session.create("tests.test_remote_support:build")
        slow = net.call_async("sleep", 1.0)
        queued = net.call_async("echo", "next")
        started = time.monotonic()
        assert slow.result(5) == "slept" and queued.result(5) == "next"  # 3 missed heartbeats would be 0.3 s
        assert time.monotonic() - started < 3
        assert not session.closed
    finally:
        session.close()
