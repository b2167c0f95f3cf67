"""``python -m diffc.selfcheck --gpu``: one command that proves diffc's GPU path on the machine it runs on.

Why it exists: diffc is developed on machines without a GPU, so its GPU code (the TensorRT session, the
onnxruntime CUDA backend) is written against documented APIs and tested on the CPU only as far as the logic allows.
The first machine with an NVIDIA GPU should be able to check all of it with one command and hand back one JSON.

On a machine with an NVIDIA GPU, within ``--budget-s`` (default 480 s; the steps that do not fit are recorded as
skipped, with the reason):

1. ``builds``: the ``demo`` model for ``cpu-fp32`` (the reference), ``cuda-fp16``, and ``rtx-fp16`` when the GPU is a
   TensorRT-RTX target and TensorRT-RTX is installed (built for this GPU's compute capability);
2. ``images``: one image per artifact (same prompt and seed), each GPU image's PSNR against the CPU image;
3. ``gpu_tests``: ``pytest -m gpu tests/engines`` (the GPU-marked tests; needs a source checkout);
4. ``unet_step``: one SD-1.5-architecture UNet step at 512x512 px (batch 2), diffc ``cuda-fp16`` against torch
   fp16 eager on the same GPU (``benchmarks/gpu_unet_step.py``: random weights from ``benchmarks/_sd15.py``;
   needs a source checkout and the ``export`` extra). ``--quick`` leaves it out.

Exit codes: 0 every check passed; 1 a check failed (the JSON says which, and why); 2 bad arguments;
3 no NVIDIA GPU is visible (the JSON says so: ``"status": "no_gpu"``). The JSON is written in every case but 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger("diffc.selfcheck")

SCHEMA = "diffc.selfcheck/1"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_GPU = 0, 1, 2, 3
DEFAULT_BUDGET_S = 480
DEFAULT_OUT = "selfcheck.json"
PROMPT = "a handwritten digit seven"
#: a GPU image passes at this PSNR against the CPU fp32 image: fp16 arithmetic over 4 steps of the demo model
#: stays far above it, while a wrong kernel, a stale CUDA graph or a layout bug gives noise (< 15 dB)
MIN_PSNR_DB = 25.0
#: the source checkout this module sits in (tests/ and benchmarks/ live there, not in an installed wheel)
REPO = Path(__file__).resolve().parent.parent
NO_GPU_MESSAGE = ("no NVIDIA GPU is visible to this process (no driver, no device, or CUDA_VISIBLE_DEVICES hides "
                  "it): the GPU self-check needs one. Run it on a machine with an NVIDIA GPU")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m diffc.selfcheck", description=__doc__.splitlines()[0],
                                 epilog="exit codes: 0 passed, 1 a check failed, 2 bad arguments, 3 no NVIDIA GPU")
    ap.add_argument("--gpu", action="store_true", required=True,
                    help="check the GPU path (the only self-check there is; required so that the command says so)")
    ap.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"the JSON report (default {DEFAULT_OUT})")
    ap.add_argument("--quick", action="store_true", help="leave out the SD-1.5 UNet step timing")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help=f"time for everything, in seconds (default {DEFAULT_BUDGET_S}); later checks that do not "
                         "fit are skipped")
    args = ap.parse_args(argv)
    if not args.budget_s > 0 or not math.isfinite(args.budget_s):
        ap.error(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    return args


def detect_gpu() -> dict[str, Any] | None:
    """``{"name", "compute_capability"}`` of GPU 0, or None when none is visible (CUDA bindings or nvidia-smi)."""
    from diffc.engines._trt_cuda import device_compute_capability, device_name

    cc = device_compute_capability()
    if cc is None:
        return None
    return {"name": device_name() or _smi_name(), "compute_capability": cc}


def _smi_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "--id=0"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return out or None
    except (OSError, subprocess.SubprocessError):
        return None


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two float images in [0, 1] (inf when identical)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


@dataclasses.dataclass
class Clock:
    """The self-check's time budget: what is left, and whether a step expected to take ``need`` seconds fits."""

    budget_s: float
    start: float = dataclasses.field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def fits(self, need: float) -> bool:
        return self.left() >= need


def _step(checks: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one check; its entry is what ``fn`` returns plus ``ok`` and ``seconds``, or the error that stopped it."""
    t0 = time.monotonic()
    try:
        entry = {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001 - one failed check must not hide the others
        log.exception("self-check %s failed", name)
        entry = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    entry["seconds"] = round(time.monotonic() - t0, 2)
    checks[name] = entry
    return entry


def _skip(checks: dict[str, Any], name: str, reason: str) -> None:
    log.warning("self-check %s skipped: %s", name, reason)
    checks[name] = {"ok": None, "skipped": reason}


def _rtx_profile(gpu_cc: str) -> tuple[Any | None, str | None]:
    """``rtx-fp16`` built for this GPU, or (None, why not)."""
    from diffc.engines._trt_runtime import rtx_targets
    from diffc.engines.tensorrt import available
    from diffc.profiles import load_profile

    if gpu_cc not in rtx_targets():
        return None, f"TensorRT-RTX does not target {gpu_cc} (it targets {', '.join(rtx_targets())})"
    if available("tensorrt_rtx") is None:
        return None, "TensorRT-RTX is not installed (pip install 'diffc[tensorrt]')"
    prof = load_profile("rtx-fp16")
    return prof.with_overrides(tensorrt=dataclasses.replace(prof.tensorrt, compute_capabilities=(gpu_cc,))), None


def _pytest_counts(text: str) -> dict[str, int]:
    """``5 passed, 2 skipped in 3.1s`` -> ``{"passed": 5, "skipped": 2}``."""
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)",
                                             text)}


def run_checks(args: argparse.Namespace, gpu: dict[str, Any], work: Path, clock: Clock) -> dict[str, Any]:
    import diffc
    from diffc.engines.onnxruntime_cuda import cuda_provider_problem

    checks: dict[str, Any] = {}
    profiles: dict[str, Any] = {"cpu": "cpu-fp32", "cuda-fp16": "cuda-fp16"}
    rtx, why = _rtx_profile(gpu["compute_capability"])
    if rtx is not None:
        profiles["rtx-fp16"] = rtx
    else:
        _skip(checks, "build:rtx-fp16", why)
    artifacts: dict[str, Path] = {}
    for label, prof in profiles.items():
        if not clock.fits(30):
            _skip(checks, f"build:{label}", "out of time budget")
            continue
        out = work / label
        if _step(checks, f"build:{label}",
                 lambda: {"artifact": str(diffc.build("demo", prof, out, progress=False))})["ok"]:
            artifacts[label] = out

    cuda_problem = cuda_provider_problem()
    images: dict[str, np.ndarray] = {}
    for label, art in artifacts.items():
        if label == "cuda-fp16" and cuda_problem:
            checks[f"image:{label}"] = {"ok": False, "error": cuda_problem}
            continue
        if not clock.fits(20):
            _skip(checks, f"image:{label}", "out of time budget")
            continue

        def generate(art=art, label=label):
            with diffc.load(art, progress=False) as pipe:
                pipe(PROMPT, seed=0)  # the first call compiles / captures; the second is the one compared
                t0 = time.perf_counter()
                images[label] = pipe(PROMPT, seed=0)
                entry = {"image_s": round(time.perf_counter() - t0, 3)}
            if label != "cpu" and "cpu" in images:
                value = psnr(images[label], images["cpu"])
                entry["psnr_db_vs_cpu"] = value if math.isfinite(value) else "inf"
                if value < MIN_PSNR_DB:
                    raise AssertionError(f"PSNR {value:.1f} dB against the CPU image is below {MIN_PSNR_DB} dB")
            return entry

        _step(checks, f"image:{label}", generate)

    tests = REPO / "tests" / "engines"
    if not tests.is_dir():
        _skip(checks, "gpu_tests", f"no tests folder at {tests} (run from a source checkout)")
    elif not clock.fits(60):
        _skip(checks, "gpu_tests", "out of time budget")
    else:
        def gpu_tests():
            timeout = max(clock.left() - (0 if args.quick else 240), 60)
            proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", str(tests), "-q",
                                   "-p", "no:cacheprovider", "-rs"], cwd=REPO, capture_output=True, text=True,
                                  timeout=timeout)
            tail = proc.stdout.strip().splitlines()[-30:]
            entry = {"returncode": proc.returncode, "counts": _pytest_counts(tail[-1] if tail else ""),
                     "output_tail": tail}
            if proc.returncode not in (0, 5):  # 5: nothing collected
                raise AssertionError(f"pytest -m gpu exited {proc.returncode}: {tail[-1] if tail else ''}")
            return entry

        _step(checks, "gpu_tests", gpu_tests)

    script = REPO / "benchmarks" / "gpu_unet_step.py"
    if args.quick:
        _skip(checks, "unet_step", "--quick")
    elif cuda_problem:
        checks["unet_step"] = {"ok": False, "error": cuda_problem}
    elif not script.is_file():
        _skip(checks, "unet_step", f"no {script} (run from a source checkout)")
    elif not clock.fits(120):
        _skip(checks, "unet_step", "out of time budget")
    else:
        def unet_step():
            result = work / "unet_step.json"
            proc = subprocess.run([sys.executable, str(script), "--out", str(result), "--workdir", str(work / "sd15")],
                                  cwd=REPO, capture_output=True, text=True, timeout=max(clock.left() - 5, 1))
            if proc.returncode != 0:
                raise AssertionError(f"{script.name} exited {proc.returncode}: "
                                     f"{' | '.join(proc.stderr.strip().splitlines()[-5:])}")
            return json.loads(result.read_text())

        _step(checks, "unet_step", unet_step)
    return checks


def report(gpu: dict[str, Any] | None, checks: dict[str, Any], *, status: str, message: str,
           started: str, seconds: float) -> dict[str, Any]:
    """The JSON the self-check writes (``schema`` names its form)."""
    from diffc.engines.onnxruntime_cuda import cuda_provider_problem

    versions: dict[str, str | None] = {}
    from importlib import metadata

    for dist in ("diffc", "onnxruntime", "onnxruntime-gpu", "tensorrt-rtx-cu12-bindings", "torch", "cuda-bindings"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        cuda_provider = cuda_provider_problem() or "available"
    except Exception as e:  # noqa: BLE001 - informational
        cuda_provider = f"unknown ({e})"
    return {"schema": SCHEMA, "status": status, "exit_code": {"passed": EXIT_OK, "failed": EXIT_FAILED,
                                                               "no_gpu": EXIT_NO_GPU}[status],
            "message": message, "started": started, "seconds": round(seconds, 2), "gpu": gpu,
            "onnxruntime_cuda_provider": cuda_provider, "versions": versions, "checks": checks}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage and the error
        return EXIT_USAGE if e.code else EXIT_OK
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    clock = Clock(args.budget_s)
    gpu = detect_gpu()
    if gpu is None:
        log.error("%s", NO_GPU_MESSAGE)
        result = report(None, {}, status="no_gpu", message=NO_GPU_MESSAGE, started=started,
                        seconds=clock.budget_s - clock.left())
    else:
        log.info("self-check on %s (%s), budget %.0f s", gpu["name"], gpu["compute_capability"], args.budget_s)
        with tempfile.TemporaryDirectory(prefix="diffc-selfcheck-") as work:
            os.environ.setdefault("DIFFC_CACHE_DIR", str(Path(work) / "host-cache"))  # no stale engines
            checks = run_checks(args, gpu, Path(work), clock)
        failed = sorted(k for k, v in checks.items() if v.get("ok") is False)
        status = "failed" if failed else "passed"
        message = f"failed: {', '.join(failed)}" if failed else "every check that ran passed"
        result = report(gpu, checks, status=status, message=message, started=started,
                        seconds=clock.budget_s - clock.left())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log.info("self-check %s; report written to %s", result["status"], args.out)
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
