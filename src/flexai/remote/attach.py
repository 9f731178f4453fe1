"""Attach to a lease that was granted for this process: a Kubernetes pod that asked for ``flexai.io/vxpu-remote``.

On Kubernetes the scheduler places the pod's slice, the agent of the slice's node starts its worker, and the pod
gets (docs/kubernetes.md, "Remote XPU"):

* ``FLEXAI_REMOTE_ENDPOINT``: ``tls://HOST:PORT`` of the worker's gateway (from the pod's annotation
  ``flexai.io/remote-endpoint``, downward API);
* ``FLEXAI_LEASE_TOKEN``: the lease token (``LEASE.EPOCH.MAC``; from the pod's Secret, ``secretKeyRef``);
* ``FLEXAI_REMOTE_CA``: the CA that signed the workers' certificates, as PEM text or a file path (from the same
  Secret), and ``FLEXAI_REMOTE_SERVER_NAME``, the name in their certificate, when it is not the endpoint's host.

```python
from flexai.remote.attach import attach
with attach() as xpu:
    net = xpu.create("mypkg.models:build")
```
"""

from __future__ import annotations

import os
import tempfile

from flexai.remote.client import HEARTBEAT_S, Lease, connect
from flexai.remote.errors import LeaseRefusedError


def _ca_file(ca: str | None) -> str | None:
    if not ca or not ca.lstrip().startswith("-----BEGIN"):
        return ca or None
    fd, path = tempfile.mkstemp(prefix="flexai-ca-", suffix=".pem")
    with os.fdopen(fd, "w") as out:
        out.write(ca)
    return path


def attach(
    endpoint: str | None = None,
    token: str | None = None,
    ca: str | None = None,
    server_name: str | None = None,
    *,
    cert: str | None = None,
    key: str | None = None,
    heartbeat_s: float = HEARTBEAT_S,
) -> Lease:
    """A session to the lease granted for this process (arguments, else ``FLEXAI_REMOTE_ENDPOINT``,
    ``FLEXAI_LEASE_TOKEN``, ``FLEXAI_REMOTE_CA`` and ``FLEXAI_REMOTE_SERVER_NAME``)."""
    endpoint = endpoint or os.environ.get("FLEXAI_REMOTE_ENDPOINT") or None
    token = token or os.environ.get("FLEXAI_LEASE_TOKEN") or None
    ca = ca or os.environ.get("FLEXAI_REMOTE_CA") or os.environ.get("FLEXAI_CA") or None
    server_name = server_name or os.environ.get("FLEXAI_REMOTE_SERVER_NAME") or None
    if not endpoint:
        raise LeaseRefusedError("FLEXAI_REMOTE_ENDPOINT is not set: no lease was granted to this process")
    if not token:
        raise LeaseRefusedError("FLEXAI_LEASE_TOKEN is not set: the lease's Secret is not readable here")
    lease_id = token.strip().split(".")[0]
    ca_path = _ca_file(ca)
    try:
        session = connect(
            endpoint, lease_id, token.strip(), ca=ca_path, cert=cert, key=key, server_name=server_name,
            heartbeat_s=heartbeat_s,
        )  # fmt: skip
    finally:
        if ca_path and ca_path != ca:
            os.unlink(ca_path)
    return Lease(session, {"id": lease_id, "endpoint": endpoint, "state": "ready"})


__all__ = ["attach"]
