from __future__ import annotations

import pytest

from flexai.model import Node


@pytest.fixture
def small_nodes() -> list[Node]:
    return [
        Node("n-a", cpu_milli=32_000, host_memory_mib=131_072, device_count=2, device_model="T4"),
        Node("n-b", cpu_milli=64_000, host_memory_mib=262_144, device_count=8, device_model="V100M32"),
        Node("n-c", cpu_milli=16_000, host_memory_mib=65_536, device_count=1, device_model="T4"),
        Node("n-cpu", cpu_milli=96_000, host_memory_mib=393_216),
    ]


# ---------------------------------------------------------------- no process left behind
def _processes_mentioning(text: str) -> dict[int, str]:
    """pid -> command line of every live process (not this one) whose command line mentions ``text``."""
    import os
    from pathlib import Path

    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if text in cmdline:
            found[int(entry.name)] = cmdline
    return found


def _end_session_of(leader: int) -> None:
    """Resume and kill every process of a pool job (the session its shim leads)."""
    import os
    import signal

    from flexai.local.procfs import processes_of

    for pid, _ in processes_of(leader):
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """After the whole run: every process a test started under its tmp_path (pool daemons, job shims and their
    jobs) must have ended. Leftovers are killed; pool processes among them fail the run, others warn."""
    import os
    import signal
    import time
    import warnings

    yield
    base = str(tmp_path_factory.getbasetemp())
    deadline = time.monotonic() + 3.0  # jobs released by the last tests get a moment to end by themselves
    left = _processes_mentioning(base)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _processes_mentioning(base)
    if not left:
        return
    pool = {pid: cmd for pid, cmd in left.items() if "flexai.local.shim" in cmd or " serve " in cmd}
    for pid, cmd in left.items():
        if "flexai.local.shim" in cmd:
            _end_session_of(pid)
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    listing = "\n".join(f"  {pid}: {cmd[:300]}" for pid, cmd in left.items())
    if pool:
        pytest.fail(f"tests left {len(left)} process(es) behind (killed now):\n{listing}", pytrace=False)
    warnings.warn(f"tests left {len(left)} process(es) behind (killed now):\n{listing}", stacklevel=1)
