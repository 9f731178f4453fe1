"""The webhook's TLS: a renewed certificate is served without a restart (cert-manager renews it in place)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from flexai.k8s.tls import ReloadingServerTLS, uvicorn_config
from flexai.k8s.webhook import create_webhook_app

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl is needed to make the test certificates")


def make_cert(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed EC certificate for the webhook Service's name (openssl, fast EC keys)."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [
            str(OPENSSL), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "2", "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:flexai-webhook.flexai-system.svc",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def served_fingerprint(port: int) -> str:
    """SHA-256 of the certificate the server presents (the client sends SNI, as the API server does)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="flexai-webhook.flexai-system.svc") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def fingerprint(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {name: make_cert(tmp_path, name) for name in ("first", "renewed")}


@pytest.fixture
def webhook(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]]
) -> Iterator[tuple[int, Path, Path, ReloadingServerTLS]]:
    """The webhook serving the mounted tls.crt/tls.key (copies of "first") on a free loopback port."""
    mounted_cert, mounted_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(certs["first"][0], mounted_cert)
    shutil.copy(certs["first"][1], mounted_key)
    tls = ReloadingServerTLS(mounted_cert, mounted_key, check_interval_s=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(create_webhook_app(), "127.0.0.1", port, tls, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    waiting = threading.Event()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        waiting.wait(0.01)  # uvicorn reports no other way that it listens
    assert server.started
    try:
        yield port, mounted_cert, mounted_key, tls
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def renew(source: tuple[Path, Path], cert: Path, key: Path) -> None:
    """As the kubelet updates a Secret volume: new files swapped in atomically (new inodes)."""
    for src, dst in zip(source, (cert, key), strict=True):
        staged = dst.with_suffix(".new")
        shutil.copy(src, staged)
        os.replace(staged, dst)


def test_a_renewed_certificate_is_served_from_the_next_handshake(
    webhook: tuple[int, Path, Path, ReloadingServerTLS], certs: dict[str, tuple[Path, Path]]
) -> None:
    port, cert, key, tls = webhook
    assert served_fingerprint(port) == fingerprint(certs["first"][0])
    renew(certs["renewed"], cert, key)
    assert served_fingerprint(port) == fingerprint(certs["renewed"][0])
    assert tls.reloads == 1
    assert served_fingerprint(port) == fingerprint(certs["renewed"][0]) and tls.reloads == 1  # read once


def test_a_half_written_renewal_keeps_the_previous_certificate(
    webhook: tuple[int, Path, Path, ReloadingServerTLS], certs: dict[str, tuple[Path, Path]]
) -> None:
    port, cert, key, tls = webhook
    staged = cert.with_suffix(".new")
    staged.write_text(certs["renewed"][0].read_text()[:100])  # the certificate cut short, the old key
    os.replace(staged, cert)
    assert served_fingerprint(port) == fingerprint(certs["first"][0])
    renew(certs["renewed"], cert, key)  # the rest arrives
    assert served_fingerprint(port) == fingerprint(certs["renewed"][0])


def test_checks_are_at_most_once_per_interval(tmp_path: Path, certs: dict[str, tuple[Path, Path]]) -> None:
    clock = [0.0]
    tls = ReloadingServerTLS(*certs["first"], check_interval_s=1.0, clock=lambda: clock[0])
    first = tls.current()
    shutil.copy(certs["renewed"][0], certs["first"][0])
    shutil.copy(certs["renewed"][1], certs["first"][1])
    os.utime(certs["first"][0], ns=(1, 1))  # a new identity even on a coarse clock
    assert tls.current() is first  # within the interval: not looked at
    clock[0] += 1.0
    assert tls.current() is not first and tls.reloads == 1
