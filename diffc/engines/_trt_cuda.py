"""The few CUDA runtime calls the TensorRT session needs: device query, buffers, copies, a stream, graphs.

Written against NVIDIA's ``cuda-bindings`` (``cuda.bindings.runtime``, the low-level half of cuda-python;
older cuda-python spells it ``cuda.cudart``). Every call returns ``(cudaError_t, *values)``; :func:`check`
turns a non-success code into a typed error that names the call. Imported only when a session or a build
asks about the GPU, never by ``import diffc.engines.tensorrt``.
"""

from __future__ import annotations

import functools
from typing import Any

from diffc.errors import BackendUnavailableError, CudaError

EXTRA = "pip install 'diffc[tensorrt]'"


@functools.lru_cache(maxsize=1)
def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as e:
            raise BackendUnavailableError(f"running TensorRT engines needs NVIDIA's CUDA Python bindings, which are "
                                          f"not installed ({e}); install them with {EXTRA}") from e
    return runtime


def check(result: Any, what: str):
    """``(err, *values)`` -> values (one value unwrapped); raise :class:`CudaError` naming ``what`` otherwise."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        _, msg = rt.cudaGetErrorString(err)
        text = msg.decode() if isinstance(msg, bytes) else str(msg)
        raise CudaError(f"CUDA {what} failed: {text} ({err.name if hasattr(err, 'name') else err})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_compute_capability(device: int = 0) -> str | None:
    """``"SM89"`` for the visible GPU ``device``; None when there is no usable GPU (or no CUDA bindings)."""
    try:
        rt = cudart()
    except BackendUnavailableError:
        return _nvidia_smi_cc(device)
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or count <= device:
        return None
    err, major = rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device)
    err2, minor = rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device)
    if err != rt.cudaError_t.cudaSuccess or err2 != rt.cudaError_t.cudaSuccess:
        return None
    return f"SM{major}{minor}"


def device_name(device: int = 0) -> str | None:
    try:
        rt = cudart()
        err, prop = rt.cudaGetDeviceProperties(device)
        if err != rt.cudaError_t.cudaSuccess:
            return None
        name = prop.name
        return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\0")
    except (BackendUnavailableError, AttributeError):
        return None


def _nvidia_smi_cc(device: int) -> str | None:
    """Fallback without the bindings (a build machine): ``nvidia-smi --query-gpu=compute_cap``."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=compute_cap", "--format=csv,noheader", f"--id={device}"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        major, minor = out.split(".")
        return f"SM{int(major)}{int(minor)}"
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class DeviceBuffer:
    """One ``cudaMalloc`` allocation, freed with the object."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        if self.ptr:
            cudart().cudaFree(self.ptr)
            self.ptr = 0

    def __del__(self):
        try:
            self.free()
        except Exception:  # interpreter shutdown: the CUDA context may already be gone
            pass


class Stream:
    def __init__(self):
        rt = cudart()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def h2d(self, dst: int, host, nbytes: int) -> None:
        rt = cudart()
        check(rt.cudaMemcpyAsync(dst, host.ctypes.data, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                 self.handle), "cudaMemcpyAsync (host to device)")

    def d2h(self, host, src: int, nbytes: int) -> None:
        rt = cudart()
        check(rt.cudaMemcpyAsync(host.ctypes.data, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                 self.handle), "cudaMemcpyAsync (device to host)")

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def begin_capture(self) -> None:
        rt = cudart()
        check(rt.cudaStreamBeginCapture(self.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
              "cudaStreamBeginCapture")

    def end_capture(self) -> "Graph":
        rt = cudart()
        graph = check(rt.cudaStreamEndCapture(self.handle), "cudaStreamEndCapture")
        try:
            exec_ = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            rt.cudaGraphDestroy(graph)
        return Graph(exec_)

    def destroy(self) -> None:
        if self.handle is not None:
            cudart().cudaStreamDestroy(self.handle)
            self.handle = None


class Graph:
    """An instantiated CUDA graph (``cudaGraphExec_t``)."""

    def __init__(self, exec_):
        self.exec = exec_

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self.exec, stream.handle), "cudaGraphLaunch")

    def destroy(self) -> None:
        if self.exec is not None:
            cudart().cudaGraphExecDestroy(self.exec)
            self.exec = None
