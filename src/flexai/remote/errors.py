"""Typed errors of remote XPU calls: one class per failure a caller can act on.

Every error raised by ``flexai.remote`` is a ``RemoteError``; an in-flight call that fails is never retried
behind the caller's back (the far side may or may not have run it), it fails with one of these.
"""

from __future__ import annotations

from concurrent.futures import CancelledError


class RemoteError(Exception):
    """Base of every remote XPU error."""

    kind = "error"


class FrameError(RemoteError):
    """A frame broke the protocol: bad magic or version, a malformed header, a size over the limits, a dtype
    or shape that is not allowed. The connection that sent it is closed."""

    kind = "frame"


class AuthError(RemoteError):
    """No token, a wrong token, another lease's token or a stale epoch: refused, the connection closed."""

    kind = "auth"


class NotAllowedError(RemoteError):
    """An entry point that the worker's allow-list does not name, or a method name that may not be called."""

    kind = "not_allowed"


class TransferError(RemoteError):
    """A value that cannot travel: an object that is no array, scalar, string, list, dict or handle (keep it
    resident with ``keep=True`` instead), or an array of a dtype that is not allowed (object, structured)."""

    kind = "transfer"


class WorkerLostError(RemoteError):
    """The worker or the link is gone (reset, end of stream, or heartbeats missed): in-flight calls failed and
    were not retried. Resident objects on that worker are lost with it."""

    kind = "lost"


class LeaseExpiredError(RemoteError):
    """The lease's TTL ran out without a heartbeat: the worker freed the slice."""

    kind = "lease_expired"


class CallCancelledError(RemoteError, CancelledError):
    """The call was cancelled by the caller; its result (if it ever comes) is dropped on the worker."""

    kind = "cancelled"


class CallTimeoutError(RemoteError, TimeoutError):
    """The call did not answer within its timeout; it was cancelled on the worker."""

    kind = "timeout"


class RemoteCallError(RemoteError):
    """The called function raised on the worker. ``remote_type`` is the name of its exception class (only the
    name and message travel; no traceback object is ever unpickled)."""

    kind = "call"

    def __init__(self, message: str, remote_type: str = "Exception") -> None:
        super().__init__(message)
        self.remote_type = remote_type


class LeaseRefusedError(RemoteError):
    """The pool refused the lease request (bad share or memory, wrong pool token, no pool reachable) or did not
    grant it in time."""

    kind = "lease_refused"


ERRORS_BY_KIND: dict[str, type[RemoteError]] = {
    cls.kind: cls
    for cls in (
        FrameError,
        AuthError,
        NotAllowedError,
        TransferError,
        WorkerLostError,
        LeaseExpiredError,
        CallCancelledError,
        CallTimeoutError,
        RemoteCallError,
        LeaseRefusedError,
    )
}


def error_from_wire(kind: object, message: object, remote_type: object = None) -> RemoteError:
    """The typed error for an error frame (an unknown kind becomes a plain ``RemoteError``)."""
    text = str(message)[:4000]
    cls = ERRORS_BY_KIND.get(str(kind), RemoteError)
    if cls is RemoteCallError:
        return RemoteCallError(text, str(remote_type or "Exception")[:200])
    return cls(text)
