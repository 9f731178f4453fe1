"""GPU acceptance checks of the embedded pool, for a machine with an NVIDIA GPU (one call, one script).

    python benchmarks/gpu_check.py [--window 20] [--out DIR]

Needs PyTorch with CUDA and nvidia-ml-py (`pip install -e '.[nvidia]' torch`). It starts `flexai serve
--devices auto` on a temporary state and measures, on device 0:
1. two PyTorch matmul loops at 30 % and 70 %: their throughputs should split 3:7 within 10 %;
2. a job over its memory quota (allocates 4 GiB with a 1 GiB quota) is stopped by the watchdog;
3. four small jobs at 25 % each finish sooner together than one after another (the utilisation gain).
Prints a summary and writes gpu_check.json to --out (default: $OUT or the current folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

MATMUL = textwrap.dedent(
    """
    import json, sys, time, torch
    seconds, size, iterations = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    a = torch.randn(size, size, device="cuda"); b = torch.randn(size, size, device="cuda")
    torch.cuda.synchronize(); start = time.time(); done = 0
    while (iterations and done < iterations) or (not iterations and time.time() - start < seconds):
        for _ in range(10):
            a @ b
        torch.cuda.synchronize(); done += 10
    print(json.dumps({"iterations": done, "seconds": time.time() - start}))
    """
)
HOG = textwrap.dedent(
    """
    import time, torch
    block = torch.empty(4 * 1024**3, dtype=torch.uint8, device="cuda")
    block.fill_(1); torch.cuda.synchronize(); time.sleep(120)
    """
)


def flexai(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flexai", args[0], "--state", str(state), *args[1:]], capture_output=True, text=True
    )


def jobs(state: Path) -> dict[str, dict]:
    return {j["name"]: j for j in json.loads(flexai(state, "ps", "--json").stdout)}


def wait_done(state: Path, names: list[str], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        current = jobs(state)
        if all(current.get(n, {}).get("state") not in (None, "queued", "running") for n in names):
            return
        time.sleep(0.5)
    raise TimeoutError(f"jobs {names} did not finish in {timeout_s} s")


def result_of(state: Path, name: str) -> dict:
    job = jobs(state)[name]
    return json.loads(flexai(state, "logs", job["id"]).stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible to PyTorch")
    work = Path(tempfile.mkdtemp(prefix="flexai-gpu-check-"))
    state = work / "state"
    (work / "matmul.py").write_text(MATMUL)
    (work / "hog.py").write_text(HOG)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "flexai", "serve", "--devices", "auto", "--state", str(state), "--memory-grace", "3"],
        stdout=open(work / "daemon.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    report: dict[str, object] = {"device": torch.cuda.get_device_name(0)}
    try:
        for _ in range(300):
            if flexai(state, "pool", "--json").returncode == 0:
                break
            time.sleep(0.2)
        report["pool"] = json.loads(flexai(state, "pool", "--json").stdout)

        # 1. Compute shares.
        for name, share in (("mm30", "30%"), ("mm70", "70%")):
            flexai(
                state,
                "run",
                "--share",
                share,
                "--name",
                name,
                "--model",
                report["pool"]["devices"][0]["model"],
                "--",
                sys.executable,
                str(work / "matmul.py"),
                str(args.window),
                "8192",
                "0",
            )
        wait_done(state, ["mm30", "mm70"], args.window * 4 + 120)
        rates = {n: result_of(state, n)["iterations"] / result_of(state, n)["seconds"] for n in ("mm30", "mm70")}
        split = rates["mm30"] / (rates["mm30"] + rates["mm70"])
        report["shares"] = {"rates_per_s": rates, "split_30": split, "within_10pct": abs(split - 0.3) <= 0.03}

        # 2. Memory quota.
        flexai(
            state,
            "run",
            "--share",
            "50%",
            "--memory",
            "1GiB",
            "--name",
            "hog",
            "--",
            sys.executable,
            str(work / "hog.py"),
        )
        wait_done(state, ["hog"], 120)
        hog = jobs(state)["hog"]
        report["memory"] = {"state": hog["state"], "reason": hog["reason"], "stopped": hog["state"] == "stopped"}

        # 3. Co-location gain: 4 small jobs together vs one after another.
        small = [sys.executable, str(work / "matmul.py"), "0", "1024", "3000"]
        start = time.time()
        for n in range(4):
            flexai(state, "run", "--share", "100%", "--name", f"seq{n}", "--wait", "--", *small)
        sequential_s = time.time() - start
        start = time.time()
        for n in range(4):
            flexai(state, "run", "--share", "20%", "--name", f"co{n}", "--", *small)
        wait_done(state, [f"co{n}" for n in range(4)], 600)
        together_s = time.time() - start
        report["colocation"] = {
            "sequential_s": sequential_s,
            "together_s": together_s,
            "gain": sequential_s / together_s,
        }
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "pool"}, indent=2))


if __name__ == "__main__":
    main()
