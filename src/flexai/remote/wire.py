"""The remote XPU frame: a fixed prefix, a msgpack header, raw tensor buffers.

```
prefix  20 bytes  magic b"FXAI", version u16, flags u16, header length u32, payload length u64 (big endian)
header  msgpack   a map: op, id, lease, epoch, token, ... and ``args``, a tree of values in which an array is
                  {"$buf": i, "dtype": "<f4", "shape": [..]}, raw bytes are {"$bytes": i} and a resident object
                  is {"$ref": n}; ``bufs`` lists the byte length of each buffer
payload           the buffers, back to back, exactly as in memory (C order)
```

Sending is scatter-gather: ``socket.sendmsg`` takes the prefix, the header and every array's memory (buffer
protocol) in one call, so a large array is never copied into a bytes object. Over TLS (``SSLSocket`` has no
``sendmsg``) small parts are joined and large ones written straight from the array's memory. Receiving
(``FrameReader``) reads into a reusable buffer: one ``recv_into`` usually brings the prefix, the header and small
payloads of a frame at once. The header is validated, each array allocated (``numpy.empty``, or a recycled block
of a ``BufferPool`` for large ones) and large payloads are read straight into their arrays with ``recv_into``.

Nothing here unpickles: msgpack extension types are refused, dtypes are limited to booleans, integers, floats
and complex numbers (no object, string or structured dtype), and every size is bounded (``Limits``) before
anything is allocated.
"""

from __future__ import annotations

import re
import socket
import ssl
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from flexai.remote.errors import FrameError, TransferError

MAGIC = b"FXAI"
VERSION = 1
PREFIX = struct.Struct("!4sHHIQ")
PREFIX_BYTES = PREFIX.size
MAX_DEPTH = 32
"""How deep a value tree may nest (lists and dicts inside each other)."""
MAX_NDIM = 32
SMALL_PART_BYTES = 64 * 1024
"""Parts up to this size are joined into one write over TLS (one record instead of several)."""
SENDMSG_MAX_PARTS = 512
"""Below the kernel's IOV_MAX (1024) with room to spare."""
RECV_CHUNK_BYTES = 4 << 20
"""``recv_into`` reads a large buffer in chunks of this size (one system call per chunk)."""
SEND_CHUNK_BYTES = 4 << 20
"""Large buffers are written in chunks of this size over TLS (each a sign of life for the heartbeat check)."""
READ_BUFFER_BYTES = 256 * 1024
"""A ``FrameReader``'s reusable buffer: prefixes, headers and payloads up to ``BUFFERED_PAYLOAD_BYTES`` go
through it (several frames per system call when they queue up); larger payloads go straight into their arrays."""
BUFFERED_PAYLOAD_BYTES = 64 * 1024
POOL_MIN_BYTES = 1 << 20
"""Arrays of at least this size come from a ``BufferPool`` where the reader has one."""

_DTYPE = re.compile(r"^[<>|=]?(b1|[iu][1248]|f[248]|c(8|16))$")
ALLOWED_DTYPES = "bool, int8..int64, uint8..uint64, float16/32/64, complex64/128"


@dataclass(frozen=True)
class Limits:
    """Bounds on what one frame may carry; a frame outside them is refused before anything is allocated."""

    max_header_bytes: int = 1 << 20
    max_payload_bytes: int = 4 << 30
    max_buffers: int = 4096
    max_items: int = 100_000
    """Values in one header's tree."""


HELLO_LIMITS = Limits(max_header_bytes=4096, max_payload_bytes=0, max_buffers=0, max_items=64)
"""What a connection may send before it has shown a valid token: one small header, no payload."""


@dataclass
class Frame:
    header: dict[str, Any]
    value: Any
    """``header["args"]`` with every buffer descriptor replaced by its array (or bytes)."""
    payload_bytes: int


# ----------------------------------------------------------------------------- encode
class Ref:
    """A resident object on the worker, named by its number; it travels as {"$ref": n}."""

    __slots__ = ("ref",)

    def __init__(self, ref: int) -> None:
        self.ref = ref

    def __repr__(self) -> str:
        return f"Ref({self.ref})"


def _torch_to_numpy(value: Any) -> np.ndarray | None:
    """A torch tensor as a numpy array (on the CPU), without importing torch when it is not in use."""
    if type(value).__module__.split(".")[0] != "torch" or not hasattr(value, "detach"):
        return None
    return value.detach().cpu().numpy()


def check_dtype(dtype: np.dtype, where: str = "array") -> None:
    if dtype.hasobject or not _DTYPE.match(dtype.str):
        raise TransferError(f"{where}: dtype {dtype.str!r} ({dtype}) is not allowed: {ALLOWED_DTYPES}")


def encode_tree(value: Any, buffers: list[memoryview], ref_of: Callable[[Any], int | None] | None = None) -> Any:
    """``value`` as a msgpack-able tree; arrays and bytes are appended to ``buffers`` (their memory, not a copy).

    ``ref_of`` turns a client-side handle into its resident object number (None: not a handle)."""

    def walk(item: Any, depth: int) -> Any:
        # The common exact types first (one ``type()`` look-up each); anything else takes the general path.
        kind = type(item)
        if kind is str or kind is float or kind is bool or item is None:
            return item
        if depth > MAX_DEPTH:
            raise TransferError(f"the value nests deeper than {MAX_DEPTH} levels: not allowed")
        if kind is np.ndarray:
            return _encode_array(item, buffers)
        if kind is Ref:
            return {"$ref": item.ref}
        if (kind is list or kind is tuple or kind is dict) and item and depth >= MAX_DEPTH:
            raise TransferError(f"the value nests deeper than {MAX_DEPTH} levels: not allowed")
        if kind is list or kind is tuple:
            return [v if type(v) in _PLAIN else walk(v, depth + 1) for v in item]
        if kind is dict:
            out = {}
            for key, v in item.items():
                if type(key) is not str or key.startswith("$"):
                    raise TransferError(f"dict key {key!r} is not allowed: a string not starting with '$'")
                out[key] = v if type(v) in _PLAIN else walk(v, depth + 1)
            return out
        if isinstance(item, bool | str | float):
            return item
        if isinstance(item, int):
            if not -(1 << 63) <= item < (1 << 64):
                raise TransferError(f"integer {item} is not allowed: -2**63..2**64-1 (use an array of objects)")
            return item
        if isinstance(item, Ref):
            return {"$ref": item.ref}
        if ref_of is not None:
            ref = ref_of(item)
            if ref is not None:
                return {"$ref": ref}
        if isinstance(item, np.generic):
            check_dtype(item.dtype, "scalar")
            return item.item()
        array = item if isinstance(item, np.ndarray) else _torch_to_numpy(item)
        if array is not None:
            return _encode_array(array, buffers)
        if isinstance(item, bytes | bytearray | memoryview):
            buffers.append(memoryview(item).cast("B"))
            return {"$bytes": len(buffers) - 1}
        if isinstance(item, list | tuple):
            return [walk(v, depth + 1) for v in item]
        if isinstance(item, dict):
            return walk(dict(item), depth)
        raise TransferError(
            f"a value of type {type(item).__module__}.{type(item).__qualname__} cannot travel: arrays, tensors, "
            "scalars, strings, bytes, lists, dicts and handles can (keep other results resident with keep=True)"
        )

    return walk(value, 0)


_PLAIN = frozenset({str, float, bool, type(None)})
"""Exact types that travel as they are (no check, no copy)."""


_SENDABLE: dict[np.dtype, str] = {}
"""dtypes already checked, with their wire names."""


def _encode_array(array: np.ndarray, buffers: list[memoryview]) -> dict[str, Any]:
    name = _SENDABLE.get(array.dtype)
    if name is None:
        check_dtype(array.dtype)
        name = _SENDABLE.setdefault(array.dtype, array.dtype.str)
    if array.ndim > MAX_NDIM:
        raise TransferError(f"array of {array.ndim} dimensions is not allowed: at most {MAX_NDIM}")
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    buffers.append(memoryview(array).cast("B") if array.nbytes else memoryview(b""))
    return {"$buf": len(buffers) - 1, "dtype": name, "shape": list(array.shape)}


def pack_header(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def send_frame(
    sock: socket.socket,
    header: dict[str, Any],
    buffers: list[memoryview] | None = None,
    progress: Callable[[], None] | None = None,
) -> int:
    """Write one frame; returns the bytes written. ``header["bufs"]`` is filled in here. ``progress`` is called
    as large parts go out (the peer taking data is a sign of life while a long send blocks other frames)."""
    buffers = buffers or []
    sizes = header["bufs"] = [b.nbytes for b in buffers]
    head = pack_header(header)
    payload = sum(sizes)
    prefix = PREFIX.pack(MAGIC, VERSION, 0, len(head), payload)
    if payload <= SMALL_PART_BYTES:  # a small frame: one write (one TLS record, one segment)
        sock.sendall(b"".join([prefix, head, *buffers]) if buffers else prefix + head)
        return PREFIX_BYTES + len(head) + payload
    parts: list[Any] = [prefix, head, *buffers]
    if isinstance(sock, ssl.SSLSocket):
        _send_tls(sock, parts, progress)
    else:
        _sendmsg_all(sock, parts, progress)
    return PREFIX_BYTES + len(head) + payload


def _send_tls(sock: ssl.SSLSocket, parts: list[Any], progress: Callable[[], None] | None) -> None:
    pending: list[Any] = []
    pending_bytes = 0
    for part in parts:
        size = memoryview(part).nbytes
        if size <= SMALL_PART_BYTES:
            pending.append(part)
            pending_bytes += size
            if pending_bytes < SMALL_PART_BYTES:
                continue
        if pending:
            joined = b"".join(pending)
            pending, pending_bytes = [], 0
            sock.sendall(joined)
        if size > SMALL_PART_BYTES:
            view = memoryview(part).cast("B")
            for offset in range(0, size, SEND_CHUNK_BYTES):
                sock.sendall(view[offset : offset + SEND_CHUNK_BYTES])  # straight from the array's memory
                if progress is not None:
                    progress()
    if pending:
        sock.sendall(b"".join(pending))


def _sendmsg_all(sock: socket.socket, parts: list[Any], progress: Callable[[], None] | None) -> None:
    views = [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]
    while views:
        batch = views[:SENDMSG_MAX_PARTS]
        sent = sock.sendmsg(batch)
        if progress is not None and sent > SMALL_PART_BYTES:  # small sends land in the kernel's buffer even
            progress()  # when the peer is frozen: only bulk data taken counts as a sign of life
        # Drop what went out; a partly sent view continues from where the kernel stopped.
        while sent and views:
            size = views[0].nbytes
            if sent >= size:
                sent -= size
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


# ----------------------------------------------------------------------------- decode
def recv_exact_into(sock: socket.socket, view: memoryview, progress: Callable[[], None] | None = None) -> None:
    """Fill ``view`` from the socket; a stream that ends first raises ``ConnectionError``. ``progress`` is called
    after each chunk of a large read (a long transfer is a sign of life, not a missed heartbeat)."""
    got = 0
    total = view.nbytes
    while got < total:
        n = sock.recv_into(view[got : got + RECV_CHUNK_BYTES], min(RECV_CHUNK_BYTES, total - got))
        if n == 0:
            raise ConnectionError(f"the stream ended after {got} of {total} bytes")
        got += n
        if progress is not None:
            progress()


def _reject_ext(code: int, data: bytes) -> Any:
    raise FrameError(f"msgpack extension type {code} is not allowed in a header (only plain values)")


def unpack_header(data: bytes | bytearray | memoryview, limits: Limits) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            max_array_len=limits.max_items,
            max_map_len=limits.max_items,
        )
    except FrameError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise FrameError(f"the header is not valid msgpack: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise FrameError(f"the header is a {type(header).__name__}: a map is required")
    return header


def check_prefix(raw: bytes | bytearray | memoryview, limits: Limits) -> tuple[int, int]:
    """(header length, payload length) of a frame's 20-byte prefix, or ``FrameError``."""
    magic, version, flags, header_bytes, payload_bytes = PREFIX.unpack(raw)
    if magic != MAGIC:
        raise FrameError(f"frame magic {bytes(magic)!r} is not allowed: {MAGIC!r}")
    if version != VERSION:
        raise FrameError(f"frame version {version} is not allowed: {VERSION}")
    if flags:
        raise FrameError(f"frame flags {flags:#x} are not allowed: 0")
    if not 0 < header_bytes <= limits.max_header_bytes:
        raise FrameError(f"header length {header_bytes} is not allowed: 1..{limits.max_header_bytes} bytes")
    if payload_bytes > limits.max_payload_bytes:
        raise FrameError(f"payload length {payload_bytes} is not allowed: at most {limits.max_payload_bytes} bytes")
    return header_bytes, payload_bytes


def read_prefix(sock: socket.socket, limits: Limits) -> tuple[int, int]:
    raw = bytearray(PREFIX_BYTES)
    recv_exact_into(sock, memoryview(raw))
    return check_prefix(raw, limits)


def recv_frame(
    sock: socket.socket,
    limits: Limits,
    progress: Callable[[], None] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> Frame:
    """Read one frame, not a byte more (``FrameReader`` reads ahead). A protocol break raises ``FrameError``; a
    stream that ends raises ``ConnectionError``. ``check`` sees the header before any payload is read or
    allocated (the token is checked there)."""
    header_bytes, payload_bytes = read_prefix(sock, limits)
    head = bytearray(header_bytes)
    recv_exact_into(sock, memoryview(head))
    header = unpack_header(head, limits)
    if check is not None:
        check(header)
    tree, targets = plan_payload(header, payload_bytes, limits)
    for target in targets:
        recv_exact_into(sock, target, progress)
    return Frame(header, tree, payload_bytes)


class BufferPool:
    """Recycled blocks for large received arrays: a fresh ``numpy.empty`` of many MiB costs page faults (and, with
    transparent huge pages, compaction) on every frame, which halved the throughput of 64 MiB calls here.

    The pool keeps the blocks it handed out (at most ``max_bytes`` of them) and hands one out again only when
    nothing but the pool refers to it any more (``sys.getrefcount``): an array that the called code kept (resident,
    in a result, in a view or in a tensor made from it) keeps its block to itself."""

    def __init__(self, max_bytes: int = 512 << 20, min_bytes: int = POOL_MIN_BYTES) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self._blocks: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A flat uint8 block of exactly ``nbytes`` (a recycled one when one of that size is free)."""
        with self._lock:
            spare = None
            for block in self._blocks:
                # References to a free block: the list, ``block`` here and getrefcount's argument.
                if sys.getrefcount(block) <= 3:
                    if block.nbytes == nbytes:
                        return block
                    spare = block
            fresh = np.empty(nbytes, np.uint8)
            total = sum(b.nbytes for b in self._blocks) + nbytes
            if total > self.max_bytes and spare is not None:  # make room: drop a free block of another size
                total -= spare.nbytes
                self._blocks = [b for b in self._blocks if b is not spare]
            del spare
            if total <= self.max_bytes:
                self._blocks.append(fresh)
            return fresh


class FrameReader:
    """Reads frames from one socket through a reusable buffer (one reader at a time: the caller serialises).

    One ``recv_into`` usually brings a small frame whole (prefix, header and payload), and bytes read past the
    end of a frame are the start of the next one. Payloads over ``BUFFERED_PAYLOAD_BYTES`` are read straight into
    their arrays. Nothing is allocated for a payload before its header is validated and ``check`` accepted it."""

    def __init__(self, sock: socket.socket, pool: BufferPool | None = None, size: int = READ_BUFFER_BYTES) -> None:
        self.sock = sock
        self.pool = pool
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def buffered(self) -> int:
        """Bytes read from the socket and not yet handed out (a ``select`` on the socket does not see them)."""
        return self._end - self._start

    def _fill(self, need: int) -> None:
        """At least ``need`` (<= the buffer's size) bytes buffered."""
        if self._end - self._start >= need:
            return
        if self._start + need > len(self._buf):  # move what is left to the front
            left = self._end - self._start
            self._view[:left] = self._view[self._start : self._end]
            self._start, self._end = 0, left
        elif self._start == self._end:
            self._start = self._end = 0
        while self._end - self._start < need:
            n = self.sock.recv_into(self._view[self._end :], len(self._buf) - self._end)
            if n == 0:
                raise ConnectionError(f"the stream ended after {self._end - self._start} of {need} bytes")
            self._end += n

    def _take_into(self, target: memoryview, progress: Callable[[], None] | None) -> None:
        """Fill ``target`` from the buffer, then (large ones) straight from the socket."""
        total = target.nbytes
        if total <= BUFFERED_PAYLOAD_BYTES:
            self._fill(total)
            target[:] = self._view[self._start : self._start + total]
            self._start += total
            return
        have = min(self._end - self._start, total)
        if have:
            target[:have] = self._view[self._start : self._start + have]
            self._start += have
        if have < total:
            recv_exact_into(self.sock, target[have:], progress)

    def read_frame(
        self,
        limits: Limits,
        progress: Callable[[], None] | None = None,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> Frame:
        """The next frame: ``FrameError`` for a protocol break, ``ConnectionError`` when the stream ends."""
        self._fill(PREFIX_BYTES)
        header_bytes, payload_bytes = check_prefix(self._view[self._start : self._start + PREFIX_BYTES], limits)
        self._start += PREFIX_BYTES
        if header_bytes <= len(self._buf):
            self._fill(header_bytes)
            header = unpack_header(self._view[self._start : self._start + header_bytes], limits)
            self._start += header_bytes
        else:  # a header larger than the buffer (the client's limits allow it): read into its own
            head = bytearray(header_bytes)
            self._take_into(memoryview(head), None)
            header = unpack_header(head, limits)
        if check is not None:
            check(header)
        tree, targets = plan_payload(header, payload_bytes, limits, self.pool)
        for target in targets:
            self._take_into(target, progress)
        return Frame(header, tree, payload_bytes)


def plan_payload(
    header: dict[str, Any],
    payload_bytes: int,
    limits: Limits,
    pool: BufferPool | None = None,
) -> tuple[Any, list[memoryview]]:
    """Check the header's ``bufs`` and ``args`` tree and allocate its arrays: (the value tree with its arrays and
    bytes in place, the byte views to fill from the payload in order)."""
    sizes = header.get("bufs", [])
    if type(sizes) is not list or len(sizes) > limits.max_buffers:
        raise FrameError(f"bufs={str(sizes)[:80]} is not allowed: a list of at most {limits.max_buffers} sizes")
    if not all(type(s) is int and s >= 0 for s in sizes) or sum(sizes) != payload_bytes:
        raise FrameError(f"bufs={str(sizes)[:80]} is not allowed: sizes >= 0 adding up to the payload {payload_bytes}")
    targets: list[Any] = [None] * len(sizes)
    tree = _plan(header.get("args"), sizes, targets, limits, pool)
    for index, target in enumerate(targets):
        if target is None:
            raise FrameError(f"buffer {index} is not used by any value: every buffer must be")
    return tree, [t for t in targets if t.nbytes]  # (an empty array's memory cannot even be viewed as bytes)


def _plan(
    node: Any,
    sizes: list[int],
    targets: list[Any],
    limits: Limits,
    pool: BufferPool | None,
) -> Any:
    """Check the tree and allocate the array of each buffer descriptor, in place in the tree (nothing received
    yet): ``targets[i]`` is buffer i's memory as bytes."""
    count = 0

    def walk(item: Any, depth: int) -> Any:
        nonlocal count
        count += 1
        if count > limits.max_items or depth > MAX_DEPTH:
            raise FrameError(f"the value tree is over {limits.max_items} items or {MAX_DEPTH} levels: not allowed")
        kind = type(item)
        if kind is str or kind is int or kind is float or kind is bool or item is None:
            return item
        if kind is list:
            out_list = []
            for v in item:
                if type(v) in _LEAVES:
                    count += 1
                    out_list.append(v)
                else:
                    out_list.append(walk(v, depth + 1))
            if count > limits.max_items or depth + 1 > MAX_DEPTH and item:
                raise FrameError(f"the value tree is over {limits.max_items} items or {MAX_DEPTH} levels: not allowed")
            return out_list
        if kind is not dict:
            raise FrameError(f"a {kind.__name__} value is not allowed in the tree (use $bytes for raw bytes)")
        if "$buf" in item:
            return _allocate(item, sizes, targets, pool)
        if "$bytes" in item:
            index = _index(item, "$bytes", sizes, targets, {"$bytes"})
            data = bytearray(sizes[index])
            targets[index] = memoryview(data)
            return data
        if "$ref" in item:
            ref = item["$ref"]
            if len(item) != 1 or type(ref) is not int or ref < 0:
                raise FrameError(f"{str(item)[:80]} is not allowed: a handle is {{'$ref': n}} with n >= 0")
            return Ref(ref)
        out = {}
        for key, value in item.items():
            if key.startswith("$"):
                raise FrameError(f"key {key[:40]!r} is not allowed: $buf, $bytes and $ref only")
            if type(value) in _LEAVES:
                count += 1
                out[key] = value
            else:
                out[key] = walk(value, depth + 1)
        if count > limits.max_items or depth + 1 > MAX_DEPTH and item:
            raise FrameError(f"the value tree is over {limits.max_items} items or {MAX_DEPTH} levels: not allowed")
        return out

    return walk(node, 0)


_LEAVES = frozenset({str, int, float, bool, type(None)})


def _index(item: dict[str, Any], key: str, sizes: list[int], targets: list[Any], keys: set[str]) -> int:
    index = item[key]
    if len(item) != len(keys) or not all(k in item for k in keys):
        raise FrameError(f"{str(item)[:80]} is not allowed: exactly the keys {sorted(keys)}")
    if type(index) is not int or not 0 <= index < len(sizes):
        raise FrameError(f"{key}={str(index)[:20]} is not allowed: a buffer index 0..{len(sizes) - 1}")
    if targets[index] is not None:
        raise FrameError(f"buffer {index} is used twice: each buffer belongs to one value")
    return index


_DTYPES: dict[str, np.dtype] = {}


def _allocate(
    item: dict[str, Any],
    sizes: list[int],
    targets: list[Any],
    pool: BufferPool | None,
) -> np.ndarray:
    index = _index(item, "$buf", sizes, targets, {"$buf", "dtype", "shape"})
    dtype_text, shape = item["dtype"], item["shape"]
    dtype = _DTYPES.get(dtype_text) if type(dtype_text) is str else None
    if dtype is None:
        if not isinstance(dtype_text, str) or not _DTYPE.match(dtype_text):
            raise FrameError(f"dtype={str(dtype_text)[:40]!r} is not allowed: {ALLOWED_DTYPES}")
        dtype = _DTYPES.setdefault(dtype_text, np.dtype(dtype_text))
    if type(shape) is not list or len(shape) > MAX_NDIM or not all(type(d) is int and d >= 0 for d in shape):
        raise FrameError(f"shape={str(shape)[:80]} is not allowed: a list of at most {MAX_NDIM} sizes >= 0")
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    if nbytes != sizes[index]:
        raise FrameError(f"buffer {index}: dtype {dtype_text} x shape {shape} is {nbytes} bytes, the frame says "
                         f"{sizes[index]}: they must agree")
    if pool is not None and nbytes >= pool.min_bytes:
        raw = pool.take(nbytes)
        targets[index] = memoryview(raw)
        return raw.view(dtype).reshape(shape)
    array = np.empty(shape, dtype)
    targets[index] = memoryview(array.reshape(-1).view(np.uint8)) if nbytes else memoryview(b"")
    return array
