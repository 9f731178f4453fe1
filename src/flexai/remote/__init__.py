"""Remote XPU: run AI work on a slice of another machine's accelerator (see docs/remote.md)."""

from __future__ import annotations

from flexai.remote.client import Lease, RemoteFuture, RemoteObject, Session, connect, lease
from flexai.remote.errors import (
    AuthError,
    CallCancelledError,
    CallTimeoutError,
    FrameError,
    LeaseExpiredError,
    LeaseRefusedError,
    NotAllowedError,
    RemoteCallError,
    RemoteError,
    TransferError,
    WorkerLostError,
)

__all__ = [
    "AuthError",
    "CallCancelledError",
    "CallTimeoutError",
    "FrameError",
    "Lease",
    "LeaseExpiredError",
    "LeaseRefusedError",
    "NotAllowedError",
    "RemoteCallError",
    "RemoteError",
    "RemoteFuture",
    "RemoteObject",
    "Session",
    "TransferError",
    "WorkerLostError",
    "connect",
    "lease",
]
