"""Shared bits of the benchmark scripts: machine description, timing in fresh processes, JSON output."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    import importlib.metadata as md

    for pkg in ("diffc", "onnxruntime", "onnx", "torch", "diffusers", "numpy"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    info["diffc_commit"] = source_commit()
    return info


def source_commit() -> str | None:
    """The git commit of the checkout these scripts run from, with ``-dirty`` when tracked files differ from it;
    None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if changed else "")


def timed_subprocess(code: str, *, env: dict[str, str] | None = None) -> float:
    """Run ``code`` in a fresh interpreter; it must print one float (seconds) as its last line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return float(out.stdout.strip().splitlines()[-1])


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sig(x: float, digits: int = 3) -> float:
    """``x`` to ``digits`` significant figures: a small ratio or time (a tiny model on a fast machine) stays
    non-zero, which rounding to a fixed number of decimals does not keep."""
    return float(f"{x:.{digits}g}")


def artifact_label(artifact: Path | None, sd15: bool) -> str:
    """How a run names what it measured (``--artifact DIR``, ``--sd15`` or the default demo): the ``artifact``
    field and the middle of the saved file's name."""
    if sd15:
        return "sd15-256"
    return artifact.name.removesuffix(".diffc") if artifact else "demo"


def run_header(benchmark: str, artifact: str, load_before: tuple[float, ...]) -> dict[str, Any]:
    """The fields a saved run starts with: what ran, when, on which machine, and the 1-minute load average before
    (``os.getloadavg()`` taken by the caller before any work) and now (benchmarks/report.py prints both: on a
    shared machine a ratio is read with them)."""
    import datetime

    return {"benchmark": benchmark, "artifact": artifact, "date": datetime.date.today().isoformat(),
            "machine": machine(), "load_average_1min": {"before": round(load_before[0], 2),
                                                        "after": round(os.getloadavg()[0], 2)}}


def save_run(result: dict[str, Any]) -> Path:
    """Write ``result`` (a :func:`run_header` and the numbers) to
    ``benchmarks/results/<benchmark>_<artifact>_<date>.json``, where benchmarks/report.py renders it once cited."""
    name = f"{result['benchmark']}_{result['artifact']}_{result['date']}.json"
    out = Path(__file__).resolve().parent / "results" / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    logging.getLogger("benchmarks").info("wrote %s", out)
    return out


def emit(result: dict[str, Any]) -> None:
    """The one thing a benchmark writes to stdout."""
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


def log_to_stderr(*quiet: str) -> None:
    """INFO log with timestamps on stderr (stdout is the JSON); the ``quiet`` loggers at WARNING only."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


def call_worker(script: str | Path, worker: str, /, **kw) -> dict[str, Any]:
    """Run ``script --worker WORKER --key value ...`` in a fresh interpreter (None values left out, lists
    comma-joined, ``_`` in keys as ``-``) and return the JSON object its stdout ends with; its log (stderr)
    passes through."""
    argv = [sys.executable, str(Path(script).resolve()), "--worker", worker]
    for key, value in kw.items():
        if value is None:
            continue
        argv += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {worker} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
