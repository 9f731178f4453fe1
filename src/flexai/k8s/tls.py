"""Serving TLS whose certificate is re-read when its files change (cert-manager renews the webhook's).

The server's ``SSLContext`` calls back at every handshake (``sni_callback``, called for every ClientHello); the
callback compares the identity of the certificate and key files (device, inode, size, modification time) with
what it loaded last, at most once per ``check_interval_s``, and when they changed loads them into a fresh
context and hands that context to the connection. A pair that cannot be loaded (e.g. caught half-written) is
logged and the previous certificate kept; the next handshake tries again. A Secret volume is updated by the
kubelet swapping a symlink, which gives the files a new identity, so the renewed certificate is served from
the first handshake after the kubelet updated the volume, without a restart.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FileIdentity = tuple[int, int, int, int] | None


def _identity(path: Path) -> FileIdentity:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class ReloadingServerTLS:
    """``context`` is the server's SSLContext; it serves the newest loadable certificate of ``certfile``/``keyfile``."""

    def __init__(
        self,
        certfile: str | os.PathLike[str],
        keyfile: str | os.PathLike[str],
        check_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.certfile = Path(certfile)
        self.keyfile = Path(keyfile)
        self.check_interval_s = check_interval_s
        self.clock = clock
        self.reloads = 0
        self._lock = threading.Lock()
        self._identity = self._identities()
        self.context = self._load()  # raises for a broken pair at start: better not to start at all
        self.context.sni_callback = self._on_hello
        self._current = self.context
        self._checked_at = clock()

    def _identities(self) -> tuple[FileIdentity, FileIdentity]:
        return _identity(self.certfile), _identity(self.keyfile)

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.certfile, self.keyfile)
        return context

    def current(self) -> ssl.SSLContext:
        """The context with the newest certificate (re-read if the files changed since the last check)."""
        with self._lock:
            now = self.clock()
            if now - self._checked_at < self.check_interval_s:
                return self._current
            self._checked_at = now
            identity = self._identities()
            if identity == self._identity:
                return self._current
            try:
                fresh = self._load()
            except (OSError, ssl.SSLError) as exc:
                log.warning("cannot load the renewed certificate %s (%s); serving the previous one", self.certfile, exc)
                return self._current
            self._identity = identity
            self._current = fresh
            self.reloads += 1
            log.info("loaded the renewed certificate %s", self.certfile)
            return fresh

    def _on_hello(self, connection: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self.current()
        if current is not context:
            connection.context = current


def uvicorn_config(app: Any, host: str, port: int, tls: ReloadingServerTLS | None, **kwargs: Any) -> Any:
    """A ``uvicorn.Config`` serving ``app`` with ``tls``'s reloading context (plain HTTP when ``tls`` is None)."""
    import uvicorn

    class Config(uvicorn.Config):
        def load(self) -> None:
            super().load()
            if tls is not None:
                self.ssl = tls.context

    files = {"ssl_certfile": str(tls.certfile), "ssl_keyfile": str(tls.keyfile)} if tls is not None else {}
    return Config(app, host=host, port=port, **files, **kwargs)
