"""A build's memory: per-stage peak RSS for the build report, and the check that refuses a build up front.

Issue 30: a build must fit where the model does (peak RSS <= 2x the fp32 bytes of its largest component + 2 GB).
Two things serve that here:

* :class:`StageMemory` records the peak resident set of every build stage (``build_report.json``'s
  ``memory``), so a regression names the stage that grew. It reads ``VmHWM`` at each stage's end -- exact
  whenever the stage set a new high for the process -- and a light sampling thread's maximum of ``VmRSS``
  otherwise. It never resets the high-water mark (``/proc/self/clear_refs``): that would also reset the
  process's ``ru_maxrss``, which a parent (``benchmarks/build_memory.py``) reads with ``wait4``.
* :func:`check_memory` estimates the build's peak from the source folder's safetensors (their tensor shapes,
  read from the headers: nothing is loaded) and the profile, and raises :class:`~diffc.errors.MemoryBudgetError`
  before the export when ``MemAvailable`` cannot hold it -- a build the kernel OOM-kills an hour in (after
  taking other processes' memory with it) is worse than one refused in a second.

:func:`release` hands freed buffers back to the OS between stages: glibc keeps large freed arenas mapped
(``malloc_trim`` returns them), so without it the next stage's allocations stack on the last one's.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import struct
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from diffc.errors import MemoryBudgetError

log = logging.getLogger("diffc.build")

MIB = 1 << 20

#: what the build process holds before any weight is loaded: Python, torch, onnxruntime and OpenVINO libraries,
#: diffusers' imports (measured on SD 1.5 builds: 0.9-1.3 GB). Added to every estimate.
BASE_BYTES = int(1.4e9)

#: the largest component's share of the peak, in multiples of its fp32 bytes, by build kind; the other
#: components' fp32 weights come on top once (the loaded pipeline stays resident until the stages that compare
#: with PyTorch are done). From the stages' structure: while the largest component is exported and checked, the
#: torch module (1x) and one ONNX copy or onnxruntime session (1x) are resident; the twin's calibration loop
#: adds the recorded activations, the quality gate an engine's working set. Compare with the per-stage peaks that
#: benchmarks/build_memory.py records, and raise a factor when a measured build exceeds its estimate.
LARGEST_FACTOR = {"plain": 2.0, "gated": 2.2, "quantized": 2.4}

#: safetensors dtype -> bytes per element (only the element count matters here: the estimate is in fp32)
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1}

#: set to 1 to build even when the memory check says the build will not fit (``build(..., force_memory=True)``)
FORCE_ENV = "DIFFC_FORCE_MEMORY"


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident set now (0 where /proc is missing)."""
    return (_status_kib("VmRSS") or 0) * 1024


def hwm_bytes() -> int:
    """This process's peak resident set so far (``VmHWM``; 0 where /proc is missing)."""
    return (_status_kib("VmHWM") or 0) * 1024


def mem_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes: what the kernel can give without swapping; None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release() -> None:
    """Collect garbage and return freed heap to the OS (glibc's ``malloc_trim``; a no-op elsewhere), so the next
    stage does not stack its buffers on memory the last one freed but the allocator kept."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StageMemory:
    """Peak RSS per build stage. ``with mem.stage("export"): ...`` around each stage; :meth:`report` is the
    ``memory`` section of the build report (MiB)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.stages: dict[str, int] = {}
        self._max = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start_rss = rss_bytes()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = rss_bytes()
            with self._lock:
                self._max = max(self._max, rss)

    def __enter__(self) -> "StageMemory":
        self._thread = threading.Thread(target=self._sample, name="diffc-build-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Record the peak RSS while the block runs under ``name`` (stages run more than once add up to their
        largest peak). Frees what the stage dropped (:func:`release`) before the next one starts."""
        hwm_before = hwm_bytes()
        with self._lock:
            self._max = rss_bytes()
        try:
            yield
        finally:
            hwm_after = hwm_bytes()
            with self._lock:
                peak = max(self._max, rss_bytes())
            if hwm_after > hwm_before:  # this stage set the process's high-water mark: VmHWM is its exact peak
                peak = max(peak, hwm_after)
            self.stages[name] = max(self.stages.get(name, 0), peak)
            release()
            log.debug("stage %s: peak RSS %.0f MiB (now %.0f MiB)", name, peak / MIB, rss_bytes() / MIB)

    def report(self) -> dict[str, Any]:
        return {"unit": "MiB", "peak_rss": round(hwm_bytes() / MIB),
                "stages": {k: round(v / MIB) for k, v in self.stages.items()},
                "start_rss": round(self.start_rss / MIB)}


# ---- the estimate and the check ------------------------------------------------------------------------------

def safetensors_elements(path: Path) -> int:
    """Number of tensor elements in a safetensors file, from its JSON header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        a, b = info["data_offsets"]
        total += (b - a) // _DTYPE_BYTES.get(info["dtype"], 4)
    return total


def component_fp32_bytes(folder: Path, subfolders: list[str]) -> dict[str, int]:
    """fp32 bytes of each model subfolder's weights (``unet``, ``vae``, ``text_encoder``, ...), whatever dtype
    the checkpoint stores. A subfolder without safetensors (a ``.bin`` checkpoint) counts its files' size as
    fp32 (an over-estimate for an fp16 one, never an under-estimate of an fp32 one)."""
    out: dict[str, int] = {}
    for sub in subfolders:
        d = folder / sub
        files = sorted(d.glob("*.safetensors"))
        if files:
            out[sub] = 4 * sum(safetensors_elements(p) for p in files)
        else:
            out[sub] = sum(p.stat().st_size for p in d.glob("*.bin"))
    return out


def build_kind(profile) -> str:
    """``quantized`` (int8 / fp8: twin + calibration + gate), ``gated`` (bf16 compute: twin + gate) or ``plain``."""
    from diffc.build.plan import gated

    if profile.quantized_components():
        return "quantized"
    return "gated" if gated(profile) else "plain"


def estimate_peak(sizes: dict[str, int], kind: str) -> int:
    """The build's peak RSS from its components' fp32 bytes: the libraries, every component's weights (the loaded
    pipeline stays resident through the build) and the largest component's working copies (its ONNX graph,
    an onnxruntime session on it, the engine being built) at once."""
    if not sizes:
        return BASE_BYTES
    largest = max(sizes.values())
    return int(BASE_BYTES + sum(sizes.values()) - largest + LARGEST_FACTOR[kind] * largest)


def check_memory(folder: Path, subfolders: list[str], profile, *, force: bool = False) -> dict[str, Any]:
    """Refuse, before loading anything, a build whose estimated peak does not fit in ``MemAvailable`` (plus what
    this process already holds). ``force`` (or ``DIFFC_FORCE_MEMORY=1``) builds anyway. Returns what was
    checked (the build report's ``memory_check``)."""
    sizes = component_fp32_bytes(folder, subfolders)
    kind = build_kind(profile)
    need = estimate_peak(sizes, kind)
    avail = mem_available()
    held = rss_bytes()
    forced = force or os.environ.get(FORCE_ENV, "") not in ("", "0")
    entry = {"kind": kind, "fp32_bytes": sizes, "estimated_peak_bytes": need, "available_bytes": avail,
             "process_rss_bytes": held, "forced": forced}
    if avail is None:
        entry["skipped"] = "MemAvailable unknown (no /proc/meminfo)"
        return entry
    fits = need <= avail + held
    entry["fits"] = fits
    if not fits:
        gb = lambda n: f"{n / 1e9:.1f} GB"  # noqa: E731
        largest = max(sizes, key=sizes.get) if sizes else "?"
        msg = (f"this {kind} build of {folder} needs about {gb(need)} of memory at its peak (the largest "
               f"component, {largest}, is {gb(sizes.get(largest, 0))} in fp32) but only {gb(avail + held)} is "
               "available")
        if forced:
            log.warning("%s; building anyway (forced)", msg)
        else:
            advice = ("; free memory (stop other jobs), build on a larger machine, choose a profile without int8 "
                      "or bf16 gating (e.g. --profile cpu-fp32), or pass --force-memory (DIFFC_FORCE_MEMORY=1) "
                      "to try anyway")
            raise MemoryBudgetError(msg + advice)
    return entry
