"""Backends: one module per backend, each behind one protocol and registered by name.

The builder and the runtime never switch on a backend's name: they ask :func:`get_backend` for the object a
backend module registered and call the protocol below. :func:`get_backend` imports the backend's module on
first use, so ``import diffc.engines`` (and ``import diffc.runtime``) stays light: no onnxruntime, OpenVINO or
TensorRT until a backend is asked for.

The protocol (:class:`Backend`; a new backend is one module that implements it and calls :func:`register`):

``name: str``
    the manifest's and the profile's ``backend`` value (``onnxruntime``, ``openvino``, ``tensorrt``,
    ``tensorrt_rtx``).
``pass_defaults: Mapping[str, Any]``
    the default of every :mod:`diffc.passes` option for this target (the option vocabulary is their keys).
``parallel_open: bool``
    whether :func:`diffc.runtime.pipeline.open_sessions` may open this backend's sessions on a worker thread
    (OpenVINO compiles without the GIL, largely on one core).
``warm_host_cache: bool``
    whether the build opens the new artifact's sessions once, so this host's engine cache holds their per-host
    files (layout-optimized graphs, compiled models) before the first ``diffc run``.
``runs_on_build_host: bool``
    whether the build machine's CPU runs this backend's engines (onnxruntime, OpenVINO): the build's quality
    gate then runs the artifact itself, and gates bf16 / fp16 compute too; a GPU engine may be for a GPU the
    build machine lacks, so its gate runs the Q/DQ graph on onnxruntime instead (:mod:`diffc.build.quantize`).
``contrib_ops: bool``
    whether it runs onnxruntime's CPU contrib ops (``MultiHeadAttention``, ``QuickGelu`` ...) and the ops
    onnxruntime adds to the ONNX domain: which ``[passes]`` options are legal, what ``check_ops`` refuses.
``rmsnorm_op: bool``
    whether the passes fuse decomposed RMSNorm into opset-23 ``RMSNormalization`` (onnxruntime has the kernel;
    OpenVINO and TensorRT fuse the decomposed form themselves).
``int8_activations: tuple[str, ...]``
    the int8 Q/DQ activation encodings its kernels fuse, the ``[quantize].activations = "auto"`` choice first
    (onnxruntime: ``uint8``, x86 VNNI multiplies u8 x s8, then ``int8``; elsewhere ``int8`` alone: no zero points).
``fp8_kernels: bool``
    whether it runs FP8 Q/DQ graphs (TensorRT on Hopper / Ada and later); a profile asking fp8 of another
    backend is refused before any work.
``qdq_form: Mapping[str, bool]``
    the :class:`~diffc.passes.quantize.QuantizePass` options its int8 kernels need: ``output_qdq`` (Q/DQ on each
    Conv's output, for onnxruntime's ``QLinearConv``) and ``int32_bias``.
``runs_on_gpu: bool``
    whether its engines run only on an NVIDIA GPU: a Triton repository for such an artifact asks for
    ``KIND_GPU`` instances (:mod:`diffc.serve.repository`), any other for ``KIND_CPU``.
``tensorrt_options: bool``
    whether the profile's ``[tensorrt]`` table (builder flags, shape specialization, CUDA graphs) applies to it;
    the profile schema refuses the table for any other backend.
``step_cache_split: bool``
    whether the dynamic step cache's head / tail pair (``[savings.step_cache]``, :mod:`diffc.build.step_cache`)
    is built and tested for it; a profile asking it of another backend is refused before any work.
``describe_build(profile, component, shape_ranges) -> dict``
    what building ``component`` would do, without the backend installed (``diffc build --dry-run``): backend,
    precision and shape ranges (:func:`plain_description`), or more (TensorRT: flags and profiles).
``available() -> str | None``
    the installed version, or None when the backend is not importable (asking imports nothing heavy).
``version() -> str``
    the installed version; :class:`~diffc.errors.BackendUnavailableError` (saying what to install) without it.
``tolerance(precision: str) -> float``
    the relative L2 error this backend's output may have against onnxruntime fp32 on the same graph (the
    conformance suite's bound, tests/engines/test_conformance.py).
``check_profile(profile, graphs=None) -> None``
    refuse, with a typed error saying what to do, a :class:`~diffc.profiles.schema.Profile` this backend cannot
    build, before any work (missing backend, a precision it lacks); with ``graphs`` (component -> exported
    ONNX path) also what only the graphs tell (TensorRT: int8 / fp8 graphs without Q/DQ).
``build_engine(component, onnx_path, artifact, *, profile, shape_ranges, no_cache=False) -> BuiltEngine``
    build ``component``'s engine from the passed graph ``onnx_path`` into ``artifact/<component>/`` and
    return its manifest entry (file, files with their sha256, backend, backend_version, precision, inputs,
    outputs, shape_ranges, backend_options) and its build-report entry (``engine_bytes``, ...).
``build_engine_group(graphs, artifact, folder, *, profile, shape_ranges, no_cache=False) -> dict[str, BuiltEngine]``
    several graphs cut from one model (the cache-reuse UNet pair: ``{"unet": path, "unet_shallow": path}``),
    built into ``artifact/<folder>/`` so that they share what they can (onnxruntime: one weights file);
    ``shape_ranges`` per component. A backend that cannot share builds each as :meth:`build_engine` does.
``open_session(name, component, path, options: SessionOptions) -> Session``
    open component ``name`` (its manifest entry ``component``, its engine file ``path``) as a session:
    ``input_names``, ``output_names``, ``from_cache`` and ``run(feeds, outputs=None) -> dict`` of numpy
    arrays by name; ``run`` raises :class:`~diffc.errors.InputError` for a missing input (:func:`check_feeds`).

A session keeps what it derives on this machine (onnxruntime's layout-optimized graph, OpenVINO's compiled
model, TensorRT-RTX's kernels) in the per-host cache (:mod:`diffc.engines.host_cache`), keyed by
``SessionOptions.cache_key`` (the engine files' sha256 digests) and published only once
``SessionOptions.gate`` says those digests were verified against the files: a tampered artifact that fails
verification leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from diffc.errors import BackendUnavailableError, InputError, ProfileError

#: where each built-in backend lives: imported on first :func:`get_backend`, which registers it
_MODULES = {"onnxruntime": "diffc.engines.onnxruntime", "openvino": "diffc.engines.openvino",
            "tensorrt": "diffc.engines.tensorrt", "tensorrt_rtx": "diffc.engines.tensorrt",
            "onnxruntime_cuda": "diffc.engines.onnxruntime_cuda"}
_REGISTRY: dict[str, "Backend"] = {}
_REGISTRY_LOCK = threading.Lock()


@dataclasses.dataclass
class BuiltEngine:
    """What :meth:`Backend.build_engine` returns: the component's manifest entry and its build-report entry."""

    manifest: dict[str, Any]
    report: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SessionOptions:
    """How :meth:`Backend.open_session` opens a session; each backend reads what applies to it.

    ``threads``: intra-op threads (0: the backend's / profile's default). ``cache_key``: the engine files'
    sha256 digests as the manifest records them (None: no host cache). ``gate``: holds new host cache entries
    until those digests are verified (None: the caller vouches for them, e.g. a build that just wrote the
    files). ``cuda_graph``: TensorRT's CUDA graphs. ``onnxruntime``: the profile's ``[onnxruntime]`` table,
    ``memory_arena`` resolved. ``dims``: named dimensions (latent ``height`` / ``width``) that shape-specialized
    backends compile for instead of the profile's opt values.
    """

    threads: int = 0
    cache_key: str | None = None
    gate: Any = None  # diffc.engines.host_cache.PublishGate (not imported here: the module stays light)
    cuda_graph: bool = True
    onnxruntime: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"memory_arena": "denoiser"})
    dims: Mapping[str, int] | None = None


@runtime_checkable
class Session(Protocol):
    input_names: list[str]
    output_names: list[str]
    from_cache: bool

    def run(self, feeds: Mapping[str, Any], outputs: list[str] | None = None) -> dict[str, Any]: ...


@runtime_checkable
class Backend(Protocol):
    name: str
    pass_defaults: Mapping[str, Any]
    parallel_open: bool
    warm_host_cache: bool
    runs_on_build_host: bool
    contrib_ops: bool
    rmsnorm_op: bool
    int8_activations: tuple[str, ...]
    fp8_kernels: bool
    qdq_form: Mapping[str, bool]
    runs_on_gpu: bool
    tensorrt_options: bool
    step_cache_split: bool

    def describe_build(self, profile: Any, component: str, shape_ranges: Mapping[str, Any]) -> dict[str, Any]: ...

    def available(self) -> str | None: ...

    def version(self) -> str: ...

    def tolerance(self, precision: str) -> float: ...

    def check_profile(self, profile: Any, graphs: Mapping[str, Path] | None = None) -> None: ...

    def build_engine(self, component: str, onnx_path: Path, artifact: Path, *, profile: Any,
                     shape_ranges: Mapping[str, Any], no_cache: bool = False) -> BuiltEngine: ...

    def build_engine_group(self, graphs: Mapping[str, Path], artifact: Path, folder: str, *, profile: Any,
                           shape_ranges: Mapping[str, Mapping[str, Any]],
                           no_cache: bool = False) -> dict[str, BuiltEngine]: ...

    def open_session(self, name: str, component: Mapping[str, Any], path: Path,
                     options: SessionOptions) -> Session: ...


def register(backend: Backend) -> Backend:
    """Make ``backend`` what :func:`get_backend` returns for its name (a backend module calls this on import)."""
    with _REGISTRY_LOCK:
        _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``, its module imported on first use; a name no backend has raises
    :class:`BackendUnavailableError` naming those this diffc knows."""
    name = getattr(name, "value", name)  # a diffc.profiles.schema.Backend member
    backend = _REGISTRY.get(name)
    if backend is None and name in _MODULES:
        importlib.import_module(_MODULES[name])
        backend = _REGISTRY.get(name)
    if backend is None:
        raise BackendUnavailableError(f"this diffc has no {name!r} backend (it knows {backend_names()}); rebuild "
                                      "the artifact with a profile for one of them, e.g. 'cpu'")
    return backend


def backend_names() -> list[str]:
    """Every backend name :func:`get_backend` can answer, built-in or registered."""
    return sorted(set(_MODULES) | set(_REGISTRY))


def engine_io(model_path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """An ONNX graph's ``inputs`` / ``outputs`` as the manifest records them (name, numpy dtype name, shape with
    the symbolic dims' names), read without its weights."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)

    def spec(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {"inputs": [spec(i) for i in model.graph.input], "outputs": [spec(o) for o in model.graph.output]}


def component_entry(artifact: Path, folder: str, files: Sequence[str], *, backend: str, backend_version: str,
                    precision: str, io: Mapping[str, Any], shape_ranges: Mapping[str, Any],
                    backend_options: Mapping[str, Any] | None = None) -> BuiltEngine:
    """A :class:`BuiltEngine` for engine ``files`` written into ``artifact/<folder>/`` (the first is the one a
    session opens): each file's sha256 recorded, the engine bytes reported."""
    from diffc._fs import sha256_file

    rel = [f"{folder}/{f}" for f in files]
    manifest = {"file": rel[0], "files": {r: sha256_file(artifact / r) for r in rel}, "backend": backend,
                "backend_version": backend_version,
                **({"backend_options": dict(backend_options)} if backend_options else {}),
                "precision": precision, **io, "shape_ranges": dict(shape_ranges)}
    return BuiltEngine(manifest, {"engine_bytes": sum((artifact / r).stat().st_size for r in rel)})


def plain_description(profile: Any, component: str, shape_ranges: Mapping[str, Any]) -> dict[str, Any]:
    """:meth:`Backend.describe_build` of a backend with nothing to say beyond the profile: its name, the
    component's precision and the shape ranges it is built for."""
    return {"backend": profile.backend.value, "precision": profile.precision_of(component).value,
            "shape_ranges": shape_ranges}


def check_feeds(input_names: Sequence[str], feeds: Mapping[str, object]) -> None:
    """Raise :class:`InputError` naming the inputs a session's ``run`` was not given."""
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise InputError(f"missing inputs {missing} for this engine (it takes {list(input_names)})")


@dataclasses.dataclass(frozen=True)
class InputProfile:
    """min / opt / max shape of one input: plain data until :func:`_add_profile` hands it to TensorRT."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def input_profiles(inputs: Iterable[Mapping[str, Any]], shape_ranges: Mapping[str, Any], *,
                   static: bool = False) -> dict[str, InputProfile]:
    """Per-axis ranges (``{"batch": [1, 2, 8], "height": [32, 64, 128], ...}``) -> per-input min/opt/max shapes.

    The graph's symbolic dim names (``batch``, ``sequence``, ``height``, ``width`` ...) say which range applies
    to which axis; static dims stay as they are. ``static=True`` collapses every range to its opt value (one
    shape, as a Jetson profile wants). A ``shape_ranges`` key that names an input (``{"sample": {"min": [...],
    "opt": [...], "max": [...]}}``) sets that input's shapes directly.
    """
    out: dict[str, InputProfile] = {}
    for spec in inputs:
        name, dims = spec["name"], list(spec["shape"])
        direct = shape_ranges.get(name)
        if isinstance(direct, Mapping):
            shapes = [tuple(int(v) for v in direct[k]) for k in ("min", "opt", "max")]
            if any(len(s) != len(dims) for s in shapes):
                raise ProfileError(f"shape range for input {name!r} has rank {len(shapes[0])}, the graph's input has "
                                   f"rank {len(dims)}")
        else:
            shapes = [[], [], []]
            for axis, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    rng = [d, d, d]
                else:
                    rng = shape_ranges.get(d) if isinstance(d, str) else None
                    if rng is None:
                        known = ", ".join(sorted(k for k, v in shape_ranges.items() if not isinstance(v, Mapping)))
                        raise ProfileError(f"input {name!r} axis {axis} is dynamic ({d!r}) but the shape ranges give "
                                           f"no range for it (they cover: {known or 'nothing'})")
                    if not (len(rng) == 3 and all(isinstance(v, int) and v >= 1 for v in rng)
                            and rng[0] <= rng[1] <= rng[2]):
                        raise ProfileError(f"shape range for axis {d!r} must be [min, opt, max] with "
                                           f"1 <= min <= opt <= max, got {rng!r}")
                for i in range(3):
                    shapes[i].append(int(rng[i]))
            shapes = [tuple(s) for s in shapes]
        if static:
            shapes = [shapes[1]] * 3
        if not all(a <= b <= c for a, b, c in zip(*shapes)):
            raise ProfileError(f"shape range for input {name!r} is not ordered min <= opt <= max: {shapes}")
        out[name] = InputProfile(*shapes)
    return out


def opt_shapes(component: Mapping[str, Any], dims: Mapping[str, int] | None = None) -> list[tuple[int, ...]] | None:
    """Each input's shape at the profile's opt point (the manifest's ``shape_ranges``: the default image size and
    batch), named dimensions in ``dims`` (e.g. the latent ``height`` / ``width``) replaced; None when the
    ranges do not give every input a shape."""
    ranges = dict(component.get("shape_ranges") or {})
    for name, value in (dims or {}).items():
        if name in ranges:
            ranges[name] = [ranges[name][0], value, ranges[name][2]]
    try:
        return [p.opt for p in input_profiles(component["inputs"], ranges).values()]
    except ProfileError:
        return None
