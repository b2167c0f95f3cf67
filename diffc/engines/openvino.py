"""OpenVINO backend (CPU): the artifact ships OpenVINO IR (``model.xml`` + ``model.bin``); the runtime compiles it.

Why OpenVINO beside onnxruntime: onnxruntime's x86 CPU kernels compute in fp32 (or int8); OpenVINO's CPU plugin
has bf16 kernels (AVX512-BF16 / AMX) for convolutions, GEMMs and a fused attention it finds in the graph by
itself. SD-1.5's architecture at 512x512 on a 2-core AVX512-BF16 Xeon: a UNet step (batch 2) 4.8-5.4 s in bf16
vs 8.5 s on onnxruntime fp32; the VAE decoder 6.4 s vs 12.8 s (output rel. L2 error 2.2-2.4% vs fp32 with
random weights).

What an engine is here: the graph after diffc's passes for the ``openvino`` target (no contrib ops, attention
left decomposed for OpenVINO to fuse), converted to OpenVINO IR at build time. A ``bf16`` component keeps its
weights in fp16 in ``model.bin`` (OpenVINO's weight compression; the plugin turns them into bf16 when it packs
them, so nothing is lost that bf16 compute would keep): the SD-1.5 UNet's file is 1.7 GB instead of 3.4, and
since the compiled model keeps the file mapped, its resident memory after a 512x512 step is 3.7 GiB instead of
5.8 with the fp32 ONNX graph. An ``fp32`` component keeps fp32 weights. The precision is the plugin's
inference precision hint, set when the session compiles the graph. Nothing is cached per host: compiling the
UNet takes 2-3 s (weights are packed on the first run), while importing OpenVINO's exported compiled model
(3.4 GB) took 8.7-12.6 s.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffc.engines import check_feeds
from diffc.errors import ArtifactError, BackendUnavailableError, InputError

log = logging.getLogger("diffc.engines.openvino")

NAME = "openvino"
EXTRA = "pip install 'diffc[openvino]'"
#: diffc precision -> OpenVINO CPU inference precision hint
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


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
    fp16 weights for a ``bf16`` component, fp32 for ``fp32``. Returns the engine record; its ``files`` are
    relative to ``engine_path``'s folder."""
    import onnx

    ov = _ov()
    if precision not in PRECISIONS:
        raise BackendUnavailableError(f"the openvino backend builds {' and '.join(PRECISIONS)}, not {precision}")
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

    ``precision``: ``bf16`` or ``fp32`` (the plugin's inference precision hint); ``threads`` 0: OpenVINO's
    latency default (one stream over the physical cores).
    """

    def __init__(self, path: str | os.PathLike, *, precision: str = "fp32", threads: int = 0):
        ov = _ov()
        if precision not in PRECISIONS:
            raise InputError(f"OpenVINO sessions run {sorted(PRECISIONS)}, not {precision!r}; rebuild the artifact "
                             "with the cpu-openvino profile")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        if precision == "bf16" and not native_bf16(core):
            log.warning("this CPU has no bf16 instructions (AVX512-BF16 or AMX): OpenVINO runs %s in fp32", path)
        t0 = time.perf_counter()
        try:
            model = core.read_model(str(path))
            # the IR's ports carry one name each (build_engine): read them here, since compiling merges inner
            # tensor names into the output ports; the compiled model keeps the ports' order
            self.input_names = [p.get_any_name() for p in model.inputs]
            self.output_names = [p.get_any_name() for p in model.outputs]
            self._compiled = core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError for a bad or unreadable file
            raise ArtifactError(f"OpenVINO cannot compile {path}: {e}; rebuild the artifact with `diffc build`") from e
        self._request = self._compiled.create_infer_request()
        self.precision = precision
        log.debug("OpenVINO compiled %s (%s) in %.2f s", path, precision, time.perf_counter() - t0)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        check_feeds(self.input_names, feeds)
        self._request.infer([np.ascontiguousarray(feeds[n]) for n in self.input_names])
        # the request's output buffers are reused by the next run: copy what is returned
        return {n: self._request.get_output_tensor(self.output_names.index(n)).data.copy()
                for n in outputs or self.output_names}
