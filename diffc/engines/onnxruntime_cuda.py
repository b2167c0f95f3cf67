"""onnxruntime's CUDA execution provider: the GPU backend that runs on every NVIDIA GPU TensorRT-RTX does not
target (datacenter H100 / H200 / B200 included), with no TensorRT install.

Build (any machine, no GPU): the passed graph, for fp16 converted by the same edge conversion ``rtx-fp16`` uses
(:func:`diffc.engines._trt_autocast.autocast_fp16`: fp32 I/O and normalizations), with onnxruntime's *basic*
optimizations applied (constant folding, redundant nodes: provider-independent). The extended fusions are left to
the CUDA provider at load: run on the building CPU, they would pick CPU-only fused kernels.

Run: ``onnxruntime-gpu`` (the ``cuda`` extra), whose CUDA and cuDNN libraries come from NVIDIA's pip wheels and are
loaded with ``onnxruntime.preload_dlls()``. Inputs go to the GPU through an I/O binding and outputs stay there
until read; an input the loop passes unchanged from call to call (the text conditioning) is uploaded once. Where
shapes repeat (the denoising loop at one size) the session replays a CUDA graph per input-shape set (onnxruntime's
``enable_cuda_graph`` with a ``gpu_graph_id`` per shape), feeding it through buffers that keep their addresses.

Int8 is refused: onnxruntime's CUDA provider has no int8 convolution kernels, so a Q/DQ UNet runs its
convolutions dequantized to fp32 (slower than fp16, and no smaller at run time); int8 on NVIDIA GPUs is
TensorRT's (``rtx-int8``).

The CPU ``onnxruntime`` wheel (a base dependency) and ``onnxruntime-gpu`` install the same ``onnxruntime``
package; with both installed, whichever was installed last wins. :func:`cuda_provider_problem` tells which case a
machine is in and the fix.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from diffc.engines import (BuiltEngine, SessionOptions, check_feeds, component_entry, engine_io, plain_description,
                           register)
from diffc.errors import ArtifactError, BackendUnavailableError, CudaError, InputError, ProfileError

log = logging.getLogger("diffc.engines.onnxruntime_cuda")

NAME = "onnxruntime_cuda"
PROVIDER = "CUDAExecutionProvider"
PRECISIONS = ("fp32", "fp16")
EXTRA = "pip install 'diffc[cuda]'"
#: the whole fix for a CPU wheel that shadows the GPU one (both install the module ``onnxruntime``)
VENV_FIX = ("in a virtual environment of its own: python -m venv .venv-cuda && . .venv-cuda/bin/activate && "
            "pip install 'diffc[cuda]' && pip uninstall -y onnxruntime && "
            "pip install --force-reinstall --no-deps 'onnxruntime-gpu>=1.20'")
#: what the build applies (written into the manifest's backend_options)
BUILD_OPTIMIZATION = "basic"


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError(f"onnxruntime is not importable ({e}); install the GPU wheel {VENV_FIX}") from e
    return onnxruntime


def _installed(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cuda_provider_problem(providers: list[str] | None = None, dists: Mapping[str, str | None] | None = None,
                          ) -> str | None:
    """None when onnxruntime's CUDA provider is usable here; else what is wrong and the fix, as one sentence.

    ``providers`` (``onnxruntime.get_available_providers()``) and ``dists`` (installed versions of the
    ``onnxruntime`` and ``onnxruntime-gpu`` distributions) default to this environment's; tests pass them.
    """
    if dists is None:
        dists = {d: _installed(d) for d in ("onnxruntime", "onnxruntime-gpu")}
    if providers is None:
        providers = list(_ort().get_available_providers())
    if PROVIDER in providers:
        return None
    cpu, gpu = dists.get("onnxruntime"), dists.get("onnxruntime-gpu")
    if cpu and gpu:
        return (f"both onnxruntime {cpu} (CPU) and onnxruntime-gpu {gpu} are installed; they share the module "
                "'onnxruntime' and the CPU one is what imports, so there is no CUDA provider. Install the GPU wheel "
                + VENV_FIX)
    if not gpu:
        return ("onnxruntime's CUDA provider needs the onnxruntime-gpu wheel, and this environment has the CPU "
                f"onnxruntime {cpu or '(none)'}; the two wheels conflict, so install the 'cuda' extra {VENV_FIX}")
    return (f"onnxruntime-gpu {gpu} is installed but its CUDA provider is not available (no NVIDIA driver, or CUDA "
            "12 / cuDNN 9 libraries missing); check `nvidia-smi`, and install the libraries with " + EXTRA)


def _preload() -> None:
    """Load the CUDA / cuDNN libraries from NVIDIA's pip wheels (the ``cuda`` extra) before the first session:
    without it onnxruntime looks for them on the system library path only."""
    ort = _ort()
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is not None:
        try:
            preload()
        except Exception as e:  # noqa: BLE001 - missing wheels fall back to the system libraries
            log.debug("onnxruntime.preload_dlls: %s", e)


# ------------------------------------------------------------------------------------------------ build


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str) -> dict[str, Any]:
    """``onnx_path`` -> ``engine_path`` (weights in ``model.onnx.data``): fp16-converted for ``fp16``, with
    onnxruntime's basic optimizations. Runs on the CPU; needs no GPU and no onnxruntime-gpu."""
    from diffc.engines.onnxruntime import _session_options

    if precision not in PRECISIONS:
        raise ProfileError(f"the onnxruntime CUDA backend builds {list(PRECISIONS)}, not {precision!r}")
    ort = _ort()
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="diffc-cuda-") as work:
        src = Path(onnx_path)
        if precision == "fp16":
            from diffc.engines._trt_autocast import autocast_fp16

            src = Path(work) / "model.onnx"
            report["autocast"] = autocast_fp16(onnx_path, src)
        opts = _session_options()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(engine_path)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      engine_path.name + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        data = engine_path.with_name(engine_path.name + ".data")
        if data.exists():
            data.unlink()
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    files = [engine_path.name] + ([data.name] if data.exists() else [])
    return {"backend_version": ort.__version__, "files": files, "report": report}


# ------------------------------------------------------------------------------------------------ run


class Session:
    """One component on onnxruntime's CUDA provider. ``run`` takes and returns numpy arrays by name (an
    ``onnxruntime.OrtValue`` already on the GPU is bound as it is); :meth:`run_device` returns the outputs as
    OrtValues left on the GPU, for a caller that feeds them on.

    ``cuda_graph``: capture and replay one CUDA graph per input-shape set, from the second call at that set on
    (the first runs eagerly and tells the output shapes the graph's fixed buffers need). A graph is replayed only
    when the previous call had the same shapes; anything that fails while capturing turns graphs off for the
    session, which then runs eagerly.
    """

    def __init__(self, path: str | os.PathLike, *, device: int = 0, cuda_graph: bool = True, threads: int = 0):
        from diffc.engines.onnxruntime import _session_options

        problem = cuda_provider_problem()
        if problem is not None:
            raise BackendUnavailableError(problem)
        _preload()
        ort = self._ort = _ort()
        self.device = device
        self.from_cache = False
        opts = _session_options(threads)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        provider = {"device_id": str(device), "cudnn_conv_algo_search": "HEURISTIC",
                    "do_copy_in_default_stream": "1", "enable_cuda_graph": "1" if cuda_graph else "0"}
        try:
            self._sess = ort.InferenceSession(str(path), opts, providers=[(PROVIDER, provider), "CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            if not cuda_graph:
                raise ArtifactError(f"onnxruntime cannot load {path} on the CUDA provider: {e}; rebuild the "
                                    "artifact with `diffc build --profile cuda-fp16`") from e
            # a graph with nodes the CUDA provider lacks cannot be captured: open it without CUDA graphs
            log.info("onnxruntime refused CUDA graphs for %s (%s); opening without", path, e)
            cuda_graph = False
            provider["enable_cuda_graph"] = "0"
            try:
                self._sess = ort.InferenceSession(str(path), opts,
                                                  providers=[(PROVIDER, provider), "CPUExecutionProvider"])
            except Exception as e2:  # noqa: BLE001
                raise ArtifactError(f"onnxruntime cannot load {path} on the CUDA provider: {e2}; rebuild the "
                                    "artifact with `diffc build --profile cuda-fp16`") from e2
        #: the session was made with enable_cuda_graph: every run must say which graph (-1: none)
        self._graph_session = bool(cuda_graph)
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self._graphs_enabled = bool(cuda_graph)
        self._binding = self._sess.io_binding()
        self._resident: dict[str, tuple[np.ndarray, Any]] = {}  # name -> (host copy, its OrtValue on the GPU)
        #: shape key -> (graph id, fixed input OrtValues, fixed output OrtValues, binding)
        self._graphs: dict[tuple, tuple[int, dict[str, Any], dict[str, Any], Any]] = {}
        self._output_shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}
        self._last_key: tuple | None = None
        self._closed = False

    # -- feeds

    def _device_value(self, name: str, value: Any):
        """``value`` as an OrtValue on this GPU: OrtValues pass through; an array equal to the previous call's
        for ``name`` reuses its upload (the conditioning is the same every step of the loop)."""
        ort = self._ort
        if isinstance(value, ort.OrtValue):
            return value
        arr = np.ascontiguousarray(value)
        held = self._resident.get(name)
        if held is not None and held[0].shape == arr.shape and held[0].dtype == arr.dtype \
                and np.array_equal(held[0], arr):
            return held[1]
        ov = ort.OrtValue.ortvalue_from_numpy(arr, "cuda", self.device)
        self._resident[name] = (arr.copy(), ov)
        return ov

    def _check_open(self) -> None:
        if self._closed:
            raise InputError("this session is closed; open the artifact again with diffc.load()")

    # -- running

    def run_device(self, feeds: Mapping[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
        """Run with every feed on the GPU; the outputs as OrtValues on the GPU (valid until the next call)."""
        self._check_open()
        check_feeds(self.input_names, feeds)
        names = list(outputs or self.output_names)
        key = tuple((n, tuple(getattr(feeds[n], "shape", ())) if not isinstance(feeds[n], self._ort.OrtValue)
                     else tuple(feeds[n].shape())) for n in self.input_names)
        if self._graphs_enabled and key == self._last_key and key in self._output_shapes:
            try:
                out = self._run_graph(key, feeds)
                self._last_key = key
                return {n: out[n] for n in names}
            except Exception as e:  # noqa: BLE001 - onnxruntime's capture errors are untyped; eager from now on
                log.info("CUDA graph capture failed (%s); running without CUDA graphs", e)
                self._graphs_enabled = False
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for n in self.input_names:
            b.bind_ortvalue_input(n, self._device_value(n, feeds[n]))
        for n in self.output_names:  # every output: onnxruntime computes them anyway; unbound ones go to the CPU
            b.bind_output(n, "cuda", self.device)
        self._run(b, graph_id=-1)
        values = dict(zip(self.output_names, b.get_outputs()))
        self._output_shapes[key] = {n: tuple(v.shape()) for n, v in values.items()}
        self._last_key = key
        return {n: values[n] for n in names}

    def _run(self, binding, graph_id: int) -> None:
        ro = self._ort.RunOptions()
        if self._graph_session:
            ro.add_run_config_entry("gpu_graph_id", str(graph_id))  # -1: run without capturing or replaying
        try:
            self._sess.run_with_iobinding(binding, ro)
        except Exception as e:  # onnxruntime's exceptions are untyped
            raise CudaError(f"onnxruntime CUDA run failed for {self.input_names}: {e}") from e

    def _run_graph(self, key: tuple, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Replay (or, the first time at ``key``, capture) the CUDA graph for this shape set: inputs are copied
        into buffers whose addresses the graph recorded."""
        ort = self._ort
        entry = self._graphs.get(key)
        if entry is None:
            graph_id = len(self._graphs) + 1  # 0 is onnxruntime's default id; ours start at 1
            ins = {}
            for n in self.input_names:
                v = feeds[n]
                host = v.numpy() if isinstance(v, ort.OrtValue) else np.ascontiguousarray(v)
                ins[n] = ort.OrtValue.ortvalue_from_numpy(host, "cuda", self.device)
            dtypes = {o.name: o.type for o in self._sess.get_outputs()}
            outs = {n: ort.OrtValue.ortvalue_from_shape_and_type(list(shape), _np_type(dtypes[n]), "cuda", self.device)
                    for n, shape in self._output_shapes[key].items()}
            binding = self._sess.io_binding()
            for n, v in ins.items():
                binding.bind_ortvalue_input(n, v)
            for n, v in outs.items():
                binding.bind_ortvalue_output(n, v)
            entry = self._graphs[key] = (graph_id, ins, outs, binding)
        else:
            graph_id, ins, outs, binding = entry
            for n in self.input_names:
                v = feeds[n]
                ins[n].update_inplace(v.numpy() if isinstance(v, ort.OrtValue) else np.ascontiguousarray(v))
        try:
            self._run(binding, graph_id)
        except CudaError:
            del self._graphs[key]
            raise
        return outs

    def run(self, feeds: Mapping[str, Any], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        return {n: v.numpy() for n, v in self.run_device(feeds, outputs).items()}

    def close(self) -> None:
        """Release the session, its bindings and device buffers (onnxruntime synchronizes its stream first)."""
        if self._closed:
            return
        self._closed = True
        self._graphs.clear()
        self._resident.clear()
        self._binding = None
        self._sess = None


def _np_type(onnx_type: str):
    """``tensor(float16)`` -> numpy dtype."""
    table = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(double)": np.float64, "tensor(bool)": np.bool_}
    if onnx_type not in table:
        raise ArtifactError(f"engine output of type {onnx_type} has no numpy form; rebuild with fp32 I/O")
    return table[onnx_type]


# ------------------------------------------------------------------------------------------------ protocol


class OnnxRuntimeCudaBackend:
    """onnxruntime's CUDA execution provider behind :class:`diffc.engines.Backend`."""

    name = NAME
    #: standard ONNX ops only: diffc.passes allows contrib ops (MultiHeadAttention, QuickGelu) for the CPU target
    #: alone, although the CUDA provider has kernels for them (fp16 flash attention); InstanceNormalization for
    #: GroupNorm (kept fp32 by the fp16 conversion)
    pass_defaults = MappingProxyType({"attention": "none", "groupnorm": "instance_norm", "layernorm": True,
                                      "gelu": False, "quick_gelu": False, "disable": ()})
    parallel_open = False
    #: the build machine may have no GPU (or another one): nothing to warm there
    warm_host_cache = False
    runs_on_build_host = False
    contrib_ops = False
    rmsnorm_op = False
    int8_activations = ("int8",)  # none built: check_profile refuses int8 (no int8 convolution kernels)
    fp8_kernels = False
    qdq_form = MappingProxyType({"output_qdq": False, "int32_bias": False})
    runs_on_gpu = True
    tensorrt_options = False
    #: the head / tail pair is not tested on the CUDA provider (fp16 conversion of the cut graphs)
    step_cache_split = False
    describe_build = staticmethod(plain_description)

    def available(self) -> str | None:
        """The onnxruntime that builds (any machine); running needs the GPU wheel (:func:`cuda_provider_problem`)."""
        try:
            return _ort().__version__
        except BackendUnavailableError:
            return None

    def version(self) -> str:
        return _ort().__version__

    def tolerance(self, precision: str) -> float:
        # fp32 convolutions may run TF32 on Ampere and later (cuDNN's default); fp16 as its mantissa allows
        return {"fp32": 5e-3, "fp16": 1e-2}.get(precision, 0.0)

    def check_profile(self, profile, graphs=None) -> None:
        for comp in (graphs or ("text_encoder", "text_encoder_2", "unet", "vae_decoder")):
            prec = profile.precision_of(comp).value
            if prec == "int8":
                raise ProfileError(
                    f"profile {profile.name!r} asks for int8 ({comp}) on onnxruntime's CUDA provider, which has no "
                    "int8 convolution kernels: a Q/DQ UNet would run dequantized in fp32, slower than fp16. Use "
                    "cuda-fp16, or rtx-int8 (TensorRT) for int8 on NVIDIA GPUs")
            if prec not in PRECISIONS:
                raise ProfileError(f"profile {profile.name!r} asks for {prec} ({comp}); the onnxruntime CUDA backend "
                                   f"builds {list(PRECISIONS)} (cuda-fp16, cuda-fp32)")

    def build_engine(self, component: str, onnx_path: Path, artifact: Path, *, profile, shape_ranges,
                     no_cache: bool = False) -> BuiltEngine:
        artifact = Path(artifact)
        precision = profile.precision_of(component).value
        engine = artifact / component / "model.onnx"
        info = build_engine(onnx_path, engine, precision=precision)
        built = component_entry(artifact, component, info["files"], backend=NAME,
                                backend_version=info["backend_version"], precision=precision,
                                io=engine_io(engine), shape_ranges=shape_ranges,
                                backend_options={"provider": PROVIDER, "graph_optimization_applied": BUILD_OPTIMIZATION,
                                                 "autocast": "fp16" if precision == "fp16" else None})
        built.report.update(info["report"])
        return built

    def build_engine_group(self, graphs, artifact: Path, folder: str, *, profile, shape_ranges,
                           no_cache: bool = False) -> dict[str, BuiltEngine]:
        """Each graph its own engine (``<component>/model.onnx``)."""
        return {name: self.build_engine(name, Path(p), artifact, profile=profile, shape_ranges=shape_ranges[name],
                                        no_cache=no_cache) for name, p in graphs.items()}

    def open_session(self, name: str, component, path: Path, options: SessionOptions) -> Session:
        return Session(path, cuda_graph=options.cuda_graph, threads=options.threads)


BACKEND = register(OnnxRuntimeCudaBackend())
