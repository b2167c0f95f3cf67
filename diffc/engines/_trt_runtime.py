"""Running TensorRT engines: the pre-deserialization compatibility check and the :class:`Session`.

Written against TensorRT's documented runtime API (``IRuntime.deserialize_cuda_engine``,
``IExecutionContext.set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``) and, for TensorRT-RTX,
its ``IRuntimeConfig`` (built-in CUDA graphs, runtime cache). Device memory, copies and CUDA graphs go through
:mod:`diffc.engines._trt_cuda`, imported when a session opens.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from diffc._fs import write_atomic
from diffc.engines._trt_common import (
    EXTRAS,
    FLAVOURS,
    _cc_number,
    _import,
    available,
    default_cache_dir,
    version,
)
from diffc.engines import check_feeds
from diffc.errors import ArtifactError, BackendUnavailableError, InputError

log = logging.getLogger("diffc.engines.tensorrt")


# ------------------------------------------------------------------------------------------------ compatibility


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:4])


def check_engine_compatible(record: Mapping[str, Any], *, installed_version: str | None = None,
                            device_cc: str | None = None, component: str = "") -> None:
    """Refuse, before deserializing, an engine this machine cannot run: other TensorRT version or GPU architecture.

    ``record`` is a manifest component entry (or :func:`build_engine`'s record). ``installed_version`` and
    ``device_cc`` default to this machine's (TensorRT import, CUDA device query); tests pass them.
    """
    flavour = record.get("backend")
    what = f"the {component} engine" if component else "this engine"
    if flavour not in FLAVOURS:
        raise ArtifactError(f"{what} has backend {flavour!r}, not a TensorRT flavour; rebuild the artifact")
    opts = record.get("backend_options", {})
    built = str(record.get("backend_version", ""))
    label = "TensorRT-RTX" if flavour == "tensorrt_rtx" else "TensorRT"
    if installed_version is None:
        if available(flavour) is None:
            raise BackendUnavailableError(f"{what} needs {label} {built}, which is not installed; install it with "
                                          f"{EXTRAS[flavour]}")
        installed_version = version(flavour)
    if opts.get("version_compat") and flavour == "tensorrt":
        if _version_tuple(installed_version) < _version_tuple(built):
            raise ArtifactError(f"{what} was built by {label} {built}; this machine has the older {installed_version}. "
                                f"Upgrade {label} to >= {built}, or rebuild the artifact here with `diffc build`")
    elif installed_version != built:
        raise ArtifactError(f"{what} was built by {label} {built}, but this machine has {label} {installed_version}: "
                            f"{label} engines only run on the version that built them. Rebuild the artifact with "
                            f"`diffc build` (same profile) against {installed_version}, or install {label} {built}")

    if device_cc is None:
        from diffc.engines._trt_cuda import device_compute_capability

        device_cc = device_compute_capability()
        if device_cc is None:
            raise BackendUnavailableError(f"{what} runs on an NVIDIA GPU, and none is visible to this process (no "
                                          "driver, no device, or CUDA_VISIBLE_DEVICES hides it); run it on a GPU "
                                          "machine, or build the artifact with the 'cpu' profile")
    ccs = list(opts.get("compute_capabilities") or [])
    hw = opts.get("hardware_compat", "none")
    if flavour == "tensorrt_rtx" and not ccs:
        # TensorRT-RTX's default (no listed targets) engine is portable across the architectures its
        # ComputeCapability enum lists from Ampere on, not "any SM >= 80": an H100 (SM90) or B200 (SM100) is none
        default = rtx_default_targets()
        ok, targets = device_cc in default, f"TensorRT-RTX's default targets, Ampere on ({', '.join(default)})"
    elif hw == "ampere_plus":
        ok, targets = _cc_number(device_cc) >= 80, "Ampere (SM80) or later"
    else:
        ok, targets = device_cc in ccs, ", ".join(ccs) or "unknown"
    if not ok:
        if flavour == "tensorrt_rtx" and device_cc not in rtx_targets():
            fix = (f"TensorRT-RTX does not target {device_cc} (it targets {', '.join(rtx_targets())}); on this GPU "
                   "build with the 'cuda-fp16' profile (onnxruntime's CUDA provider) or datacenter TensorRT")
        elif flavour == "tensorrt_rtx":
            fix = f"rebuild with a profile whose [tensorrt].compute_capabilities includes {device_cc}"
        else:
            fix = ("rebuild the artifact on this GPU (TensorRT builds for the GPU it runs on), or build with "
                   "[tensorrt].hardware_compat = \"ampere_plus\"")
        raise ArtifactError(f"{what} was built for {targets}, but this GPU is {device_cc}: {fix}")


#: TensorRT-RTX 1.7's ``ComputeCapability`` members, for when TensorRT-RTX itself is not importable here
_RTX_TARGETS_1_7 = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")


def rtx_targets() -> tuple[str, ...]:
    """The GPU architectures the installed TensorRT-RTX can build for (its ``ComputeCapability`` enum's SM
    members); TensorRT-RTX 1.7's when it is not installed. An SM missing here (SM87, SM90, SM100) cannot run any
    TensorRT-RTX engine."""
    if available("tensorrt_rtx") is None:
        return _RTX_TARGETS_1_7
    try:
        members = _import("tensorrt_rtx").ComputeCapability.__members__
    except (BackendUnavailableError, AttributeError):
        return _RTX_TARGETS_1_7
    found = tuple(m for m in members if re.fullmatch(r"SM\d+", m))
    return tuple(sorted(found, key=_cc_number)) or _RTX_TARGETS_1_7


def rtx_default_targets() -> tuple[str, ...]:
    """Where an engine built without listed compute capabilities runs: TensorRT-RTX's portable default covers
    its targets from Ampere (SM80) on."""
    return tuple(cc for cc in rtx_targets() if _cc_number(cc) >= 80)


def io_dtype(trt, dtype, name: str = "") -> np.dtype:
    """The numpy dtype of an engine I/O tensor of TensorRT type ``dtype``: ``trt.nptype``'s, and for the types
    numpy lacks, ml_dtypes' (a dependency of onnx): BF16 -> bfloat16, FP8 -> float8_e4m3fn. INT4 / FP4 I/O has no
    byte-addressable host form: :class:`ArtifactError` saying to rebuild with float I/O."""
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        pass
    kind = getattr(dtype, "name", str(dtype))
    try:
        import ml_dtypes

        fallback = {"BF16": ml_dtypes.bfloat16, "FP8": ml_dtypes.float8_e4m3fn}.get(kind)
    except ImportError:
        fallback = None
    if fallback is None:
        raise ArtifactError(f"engine tensor {name!r} has type {kind}, which has no host (numpy) form; rebuild the "
                            "artifact with float I/O (diffc's fp16 / int8 / fp8 builds keep graph inputs and outputs "
                            "fp32)")
    return np.dtype(fallback)


def output_buffer_bytes(name: str, shape, max_output_size: int | None, itemsize: int) -> int:
    """Bytes to allocate for output ``name`` once every input is at its largest shape: the shape's size when
    TensorRT knows it, else ``get_max_output_size`` (data-dependent shapes); -1 there means TensorRT has no bound,
    which a fixed buffer cannot serve (:class:`ArtifactError`, not a 1-byte buffer written past its end)."""
    shape = tuple(int(d) for d in shape)
    if all(d >= 0 for d in shape):
        return int(np.prod(shape, dtype=np.int64)) * itemsize
    if max_output_size is None or max_output_size < 0:
        raise ArtifactError(f"engine output {name!r} has a data-dependent shape {shape} with no upper bound "
                            "(get_max_output_size = -1); diffc's sessions need bounded outputs: re-export the "
                            "component with static output shapes")
    return max(int(max_output_size), itemsize)


# ------------------------------------------------------------------------------------------------ runtime


def _runtime_cache_file(cache_key: str | None, device_cc: str, trt_version: str = "") -> Path | None:
    """The TensorRT-RTX runtime cache of an engine (``cache_key``: its verified digests) on this GPU and release.
    TensorRT-RTX itself rejects a cache another GPU, driver or release wrote (it is then compiled again)."""
    root = default_cache_dir()
    if root is None or not cache_key:
        return None
    digest = hashlib.sha256(f"{cache_key}|{device_cc}|{trt_version}".encode()).hexdigest()[:32]
    return root / "runtime-cache" / f"{digest}.bin"


class Session:
    """One component's TensorRT engine. ``run`` takes and returns numpy arrays by name, like the onnxruntime one.

    ``record``: the manifest component entry; with it the engine is checked against this machine before it is
    deserialized (:func:`check_engine_compatible`). Buffers are allocated once at the profile's max shapes, so
    tensor addresses never change and a captured CUDA graph stays valid for its input shapes:
    datacenter TensorRT replays one graph per input-shape set (``cuda_graph``); TensorRT-RTX captures and
    replays itself (its runtime config's ``WHOLE_GRAPH_CAPTURE`` strategy) and keeps its just-in-time compiled
    kernels in a runtime cache file in the per-host cache (keyed by ``cache_key`` and the GPU), so only the
    first session on a machine pays for JIT compilation; with a ``gate`` (a
    :class:`~diffc.engines.host_cache.PublishGate`), that file is written only once the gate has opened (the
    engine's digests verified), so kernels of a refused engine are never kept under a genuine one's key.
    ``threads`` is accepted for interface parity.
    """

    def __init__(self, path: str | os.PathLike, *, record: Mapping[str, Any] | None = None, cuda_graph: bool = True,
                 cache_key: str | None = None, threads: int = 0, device: int = 0,
                 weight_streaming_budget: int | None = None, runtime_cache: str | os.PathLike | None = None,
                 gate: Any = None):
        from diffc.engines import _trt_cuda as cu

        self._cu = cu
        self._closed = True
        path = Path(path)
        flavour = (record or {}).get("backend") or available()
        if flavour is None:
            raise BackendUnavailableError(f"no TensorRT is installed; install it with {EXTRAS['tensorrt_rtx']}")
        device_cc = cu.device_compute_capability(device)
        if record is not None:  # a manifest entry names its file "<component>/model.plan"
            rel = str(record.get("file", ""))
            check_engine_compatible(record, device_cc=device_cc, component=rel.split("/")[0] if "/" in rel else "")
        if device_cc is None:
            raise BackendUnavailableError("TensorRT engines run on an NVIDIA GPU, and none is visible to this process")
        cu.check(cu.cudart().cudaSetDevice(device), "cudaSetDevice")
        trt = _import(flavour)
        self.flavour = flavour
        opts = (record or {}).get("backend_options", {})
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if opts.get("version_compat"):
            self._runtime.engine_host_code_allowed = True  # a version-compatible plan embeds its lean runtime
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise ArtifactError(f"cannot read engine {path} ({e}); rebuild the artifact with `diffc build`") from e
        if hasattr(self._runtime, "get_engine_validity"):  # TensorRT-RTX >= 1.1: reads only the header
            validity, diagnostics = self._runtime.get_engine_validity(blob)
            if validity == trt.EngineValidity.INVALID:
                why = [n for n, m in trt.EngineInvalidityDiagnostics.__members__.items() if diagnostics & int(m)]
                raise ArtifactError(f"{flavour} {trt.__version__} refuses engine {path} "
                                    f"({', '.join(why) or 'invalid'}) on this machine; rebuild the artifact here "
                                    "with `diffc build`")
        self.engine = self._runtime.deserialize_cuda_engine(blob)
        del blob
        if self.engine is None:
            raise ArtifactError(f"{flavour} {trt.__version__} cannot deserialize {path} (built by another version, for "
                                "another GPU, or corrupt); rebuild the artifact with `diffc build`")
        if weight_streaming_budget is not None and self.engine.streamable_weights_size > 0:
            self.engine.weight_streaming_budget_v2 = int(weight_streaming_budget)

        self._rtx_cache = None
        self._rtx_cache_file = None
        self._rtx_config = None
        self._gate = gate  # diffc.engines.host_cache.PublishGate: the runtime cache is written only once it opens
        if flavour == "tensorrt_rtx":
            # kept as long as the context made from it (close() releases context, then config, then cache)
            rc = self._rtx_config = self.engine.create_runtime_config()
            if cuda_graph:
                rc.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            self._rtx_cache_file = Path(runtime_cache) if runtime_cache else \
                _runtime_cache_file(cache_key, device_cc, str(trt.__version__))
            if self._rtx_cache_file is not None:
                self._rtx_cache = rc.create_runtime_cache()
                if self._rtx_cache_file.is_file():
                    # rejected (and left empty) when another GPU, driver or release wrote it
                    if not self._rtx_cache.deserialize(self._rtx_cache_file.read_bytes()):
                        log.info("runtime cache %s is from another setup; recompiling", self._rtx_cache_file)
                rc.set_runtime_cache(self._rtx_cache)
            self.context = self.engine.create_execution_context(rc)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailableError(f"cannot create an execution context for {path} (out of GPU memory?)")
        self._graphs_enabled = bool(cuda_graph) and flavour == "tensorrt"

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: io_dtype(trt, self.engine.get_tensor_dtype(n), n) for n in names}
        self._ranges = {n: [tuple(d) for d in self.engine.get_tensor_profile_shape(n, 0)] for n in self.input_names}

        self._buffers: dict[str, Any] = {}
        self._graphs: dict[tuple, Any] = {}
        #: the input shapes of the last enqueue: a graph is replayed only at them (TensorRT applies shape changes
        #: at enqueue, so a graph captured at A replayed after the context ran B would be stale)
        self._last_key: tuple | None = None
        self._stream = cu.Stream()
        self._closed = False
        for n in self.input_names:  # the largest shapes the profile allows: addresses never change afterwards
            self.context.set_input_shape(n, self._ranges[n][2])
        for n in names:
            size = self._dtypes[n].itemsize
            if n in self.input_names:
                nbytes = int(np.prod(self._ranges[n][2], dtype=np.int64)) * size
            else:
                shape = tuple(self.context.get_tensor_shape(n))
                bound = None if all(d >= 0 for d in shape) else self.context.get_max_output_size(n)
                nbytes = output_buffer_bytes(n, shape, bound, size)
            self._buffers[n] = cu.DeviceBuffer(nbytes)
            self.context.set_tensor_address(n, self._buffers[n].ptr)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        check_feeds(self.input_names, feeds)
        host = {}
        for n in self.input_names:
            arr = np.ascontiguousarray(feeds[n], dtype=self._dtypes[n])
            lo, _, hi = self._ranges[n]
            if arr.ndim != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, arr.shape, hi)):
                raise InputError(f"input {n!r} has shape {tuple(arr.shape)}, outside the engine's profile (min {lo}, "
                                 f"max {hi}); use a size in range or rebuild with wider [shapes]")
            if not self.context.set_input_shape(n, arr.shape):
                raise InputError(f"TensorRT refused shape {tuple(arr.shape)} for input {n!r}")
            host[n] = arr
            self._stream.h2d(self._buffers[n].ptr, arr, arr.nbytes)
        key = tuple(host[n].shape for n in self.input_names)
        # replay only in the loop's steady state (the previous call's shapes); a new shape runs eagerly
        graph = self._graphs.get(key) if key == self._last_key else None
        if graph is not None:
            graph.launch(self._stream)
        else:
            self._execute()
        names = outputs or self.output_names
        result = {}
        for n in names:
            out = np.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtypes[n])
            self._stream.d2h(out, self._buffers[n].ptr, out.nbytes)
            result[n] = out
        self._stream.synchronize()
        self._last_key = key
        if graph is None and self._graphs_enabled and key not in self._graphs:
            self._capture(key)
        return result

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self._stream.ptr):
            raise self._cu.CudaError(f"TensorRT execute_async_v3 failed for {self.input_names} (see the TensorRT log)")

    def _capture(self, key: tuple) -> None:
        """Record this shape's enqueue as a CUDA graph (after one eager run has done any lazy setup)."""
        cu = self._cu
        try:
            self._stream.begin_capture()
            try:
                ok = bool(self.context.execute_async_v3(self._stream.ptr))
            except BaseException:
                # end the capture and destroy what it made, so the exception leaks no graph or capturing stream
                with contextlib.suppress(Exception):
                    self._stream.end_capture().destroy()
                raise
            graph = self._stream.end_capture()
            if not ok:  # an enqueue that failed under capture recorded nothing: replaying it would return stale outputs
                graph.destroy()
                raise cu.CudaError("execute_async_v3 returned False during CUDA graph capture")
            self._graphs[key] = graph
        except cu.CudaError as e:  # e.g. an engine with data-dependent shapes; run eagerly from now on
            log.info("CUDA graph capture unavailable for this engine (%s); running without graphs", e)
            self._graphs_enabled = False

    def save_runtime_cache(self) -> bool:
        """Write TensorRT-RTX's runtime cache (the kernels JIT-compiled so far) to the per-host cache; True when
        written. Only once the gate says the engine's digests were verified: kernels compiled for an engine that
        was not are never kept under its claimed digests. :meth:`close` calls it."""
        trusted = self._gate is None or self._gate.state is True
        if self._rtx_cache is None or self._rtx_cache_file is None or not trusted:
            return False
        try:
            write_atomic(self._rtx_cache_file, memoryview(self._rtx_cache.serialize()))
        except OSError as e:
            log.info("cannot write the runtime cache %s (%s); the next session compiles again", self._rtx_cache_file, e)
            return False
        return True

    def close(self) -> None:
        """Save the runtime cache, wait for the stream's work, then release graphs, context, runtime config and
        cache (in that order: a context uses its config), buffers and stream. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            # in-flight kernels may still read the buffers freed below (cudaFree does not wait for a
            # non-blocking stream)
            self._stream.synchronize()
        finally:
            self.save_runtime_cache()
            for g in self._graphs.values():
                g.destroy()
            self._graphs.clear()
            self.context = None
            self._rtx_config = None
            self._rtx_cache = None
            for b in self._buffers.values():
                b.free()
            self._stream.destroy()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
