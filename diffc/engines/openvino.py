"""OpenVINO backend (CPU): the artifact ships OpenVINO IR (``model.xml`` + ``model.bin``); the runtime compiles it.

Why OpenVINO beside onnxruntime: onnxruntime's x86 CPU kernels compute in fp32 (or int8); OpenVINO's CPU plugin
has bf16 kernels (AVX512-BF16 / AMX) for convolutions, GEMMs and a fused attention it finds in the graph by
itself. SD-1.5's architecture at 512x512 on a 2-core AVX512-BF16 AMD EPYC: a UNet step (batch 2) 4.5-5.4 s in
bf16 vs 8.5 s on onnxruntime fp32; the VAE decoder 6.4 s vs 12.8 s (output rel. L2 error 2.2-2.4% vs fp32
with random weights). With diffc's calibrated int8 Q/DQ UNet (``int8`` precision), a step takes 3.0-3.5 s:
its convolutions and GEMMs run on int8 kernels (VNNI), attention and norms in bf16 (onnxruntime's int8 UNet:
~4.3 s). That needs static shapes: compiled for the IR's dynamic shapes, an int8 Q/DQ UNet took 7.0-7.6 s per
step, slower than bf16.

What an engine is here: the graph after diffc's passes for the ``openvino`` target (no contrib ops, attention
left decomposed for OpenVINO to fuse), converted to OpenVINO IR at build time. A ``bf16`` component keeps its
weights in fp16 in ``model.bin`` (OpenVINO's weight compression; the plugin turns them into bf16 when it packs
them, so nothing is lost that bf16 compute would keep): the SD-1.5 UNet's file is 1.7 GB instead of 3.4. An
``fp32`` component keeps fp32 weights. The precision is the plugin's inference precision hint, set when the
session compiles the graph. Memory: the compiled model keeps the weights file mapped beside its packed copy,
so the session drops the file's pages once compiled (SD-1.5 UNet after a 512x512 step: 1.9 GiB resident
instead of 3.5; 5.8 with the fp32 ONNX graph of the first version). Nothing is cached per host: compiling the
bf16 UNet for static shapes takes 3-4 s, while importing OpenVINO's cached compiled model (1.6 GB) took 1.9 s
but raised the process's peak memory to 5.0 GiB and kept the blob's pages resident; the int8 UNet compiles in
7-9 s (imported from OpenVINO's cache: 5.2 s, peak 2.97 GiB instead of 2.04).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from diffc.engines import check_feeds
from diffc.errors import ArtifactError, BackendUnavailableError, InputError

log = logging.getLogger("diffc.engines.openvino")

NAME = "openvino"
EXTRA = "pip install 'diffc[openvino]'"
#: diffc precision -> OpenVINO CPU inference precision hint. An int8 component is a Q/DQ graph (diffc's quantize
#: pass, calibrated on the sampling loop): OpenVINO runs its quantized convolutions and GEMMs with int8 kernels
#: (VNNI / AMX) and the layers left in float (attention, norms, keep_float layers) in bf16 where the CPU has it.
PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}


def available() -> str | None:
    """OpenVINO's version, or None when it is not importable."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


def _ov():
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailableError(f"this artifact runs on OpenVINO, which is not importable ({e}); "
                                      f"install it with {EXTRA}") from e
    return openvino


def version() -> str:
    return _ov().get_version()


def native_bf16(core=None) -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it OpenVINO computes in fp32.
    ``core``: an ``openvino.Core`` to ask (a new one if None)."""
    core = core or _ov().Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


#: the engine files of a component, in its folder
ENGINE_FILE = "model.xml"


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str) -> dict[str, Any]:
    """Convert ``onnx_path`` to OpenVINO IR at ``engine_path`` (``.xml``, weights in the ``.bin`` beside it):
    fp16 weights for a ``bf16`` component, fp32 for ``fp32``; an ``int8`` component's graph has Q/DQ nodes and
    int8 weights, kept as they are (its few float layers stay fp32). Returns the engine record; its ``files`` are
    relative to ``engine_path``'s folder."""
    import onnx

    ov = _ov()
    if precision not in PRECISIONS:
        raise BackendUnavailableError(f"the openvino backend builds {', '.join(PRECISIONS)}, not {precision}")
    engine_path = Path(engine_path)
    try:
        model = ov.Core().read_model(str(onnx_path))
    except Exception as e:  # OpenVINO raises its own exception types for an op it cannot convert
        raise BackendUnavailableError(f"OpenVINO {ov.get_version()} cannot read {onnx_path}: {e}") from e
    # one name per input/output port, the graph's own: OpenVINO also gives a port the names of the inner tensors
    # it was merged with, and the loop asks for outputs by the manifest's names
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    for ports, values in ((model.inputs, graph.input), (model.outputs, graph.output)):
        for port, value in zip(ports, values):
            port.get_tensor().set_names({value.name})
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(engine_path), compress_to_fp16=precision == "bf16")
    return {"backend": NAME, "backend_version": ov.get_version(),
            "files": [engine_path.name, engine_path.with_suffix(".bin").name]}


class Session:
    """One component compiled by OpenVINO's CPU plugin. ``run`` takes and returns numpy arrays by name.

    ``precision``: ``bf16``, ``fp32`` or ``int8`` (:data:`PRECISIONS` gives the plugin's inference precision
    hint); ``threads`` 0: OpenVINO's latency default (one stream over the physical cores).

    The graph is compiled for static input shapes: the plugin then packs the weights while compiling, where with
    the IR's dynamic shapes it packed them during the first inference, 2.6 s slower for the SD-1.5 UNet at
    512x512 (compiling takes ~1 s longer), and an int8 graph ran at half the speed. ``shapes`` (one per input,
    in the graph's order): compile for them now; a run with other shapes (or the first run, without
    ``shapes``) compiles for its own, replacing the compiled model (the loop gives each component one shape
    per image size and batch). After compiling, the session drops the IR's weight pages from its resident
    memory (:func:`_drop_file_pages`): the plugin has its packed copy (an fp32 graph reads some weights in
    place; those pages come back as they are read).
    """

    def __init__(self, path: str | os.PathLike, *, precision: str = "fp32", threads: int = 0,
                 shapes: Sequence[Sequence[int]] | None = None):
        ov = _ov()
        if precision not in PRECISIONS:
            raise InputError(f"OpenVINO sessions run {sorted(PRECISIONS)}, not {precision!r}; rebuild the artifact "
                             "with the cpu-openvino profile")
        self._config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision],
                                        "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._core = ov.Core()
        if PRECISIONS[precision] == "bf16" and not native_bf16(self._core):
            log.warning("this CPU has no bf16 instructions (AVX512-BF16 or AMX): OpenVINO runs %s in fp32", path)
        self.path, self.precision = Path(path), precision
        try:
            self._model = self._core.read_model(str(path))
        except Exception as e:  # OpenVINO raises RuntimeError for a bad or unreadable file
            raise ArtifactError(f"OpenVINO cannot read {path}: {e}; rebuild the artifact with `diffc build`") from e
        # the IR's ports carry one name each (build_engine): read them here, since compiling merges inner tensor
        # names into the output ports; the compiled model keeps the ports' order
        self.input_names = [p.get_any_name() for p in self._model.inputs]
        self.output_names = [p.get_any_name() for p in self._model.outputs]
        self._shapes: tuple[tuple[int, ...], ...] | None = None
        self._compiled = self._request = None
        if shapes is not None:
            self._compile(tuple(tuple(int(d) for d in shape) for shape in shapes))

    def _compile(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        # the old packed weights go before the new ones are made; a failed compile leaves no shapes to match
        self._compiled = self._request = self._shapes = None
        t0 = time.perf_counter()
        try:
            self._model.reshape(dict(zip(self.input_names, (list(s) for s in shapes))))
        except Exception as e:
            raise InputError(f"{self.path.parent.name}: inputs of shapes {dict(zip(self.input_names, shapes))} do not "
                             f"fit the graph: {e}") from e
        try:
            self._compiled = self._core.compile_model(self._model, "CPU", self._config)
        except Exception as e:
            raise ArtifactError(f"OpenVINO cannot compile {self.path}: {e}; rebuild the artifact with "
                                "`diffc build`") from e
        self._request = self._compiled.create_infer_request()
        self._shapes = shapes
        dropped = _drop_file_pages(self.path.with_suffix(".bin"))
        log.debug("OpenVINO compiled %s (%s) for %s in %.2f s; %.0f MiB of weight pages dropped", self.path,
                  self.precision, shapes, time.perf_counter() - t0, dropped / 2**20)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        check_feeds(self.input_names, feeds)
        arrays = [np.ascontiguousarray(feeds[n]) for n in self.input_names]
        shapes = tuple(a.shape for a in arrays)
        if shapes != self._shapes:
            self._compile(shapes)
        self._request.infer(arrays)
        # the request's output buffers are reused by the next run: copy what is returned
        return {n: self._request.get_output_tensor(self.output_names.index(n)).data.copy()
                for n in outputs or self.output_names}


#: madvise(2) advice that unmaps a range's pages from this process (Linux); file pages are read again on access
_MADV_DONTNEED = 4


def _drop_file_pages(path: Path) -> int:
    """Drop the pages of ``path``'s read-only mappings from this process's resident memory; returns the bytes
    of mapping advised. OpenVINO maps the IR's weights file and keeps the mapping after the plugin has packed
    its own copy of the weights, so every weight page it read while compiling stayed resident twice (the SD-1.5
    UNet: 1.66 GiB of file pages beside 1.85 GiB for the compiled model). A read-only mapping holds nothing
    that the file does not, so the pages can go; should OpenVINO read the file again they are read back.
    Linux only (``/proc/self/maps``); elsewhere nothing is done."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
    except OSError:
        return 0
    target = str(path.resolve())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[5] != target or "w" in fields[1]:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
            dropped += end - start
        else:
            log.debug("madvise on %s failed: errno %d", target, ctypes.get_errno())
    return dropped
