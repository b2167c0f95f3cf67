"""ONNX Runtime backend: build (pre-optimize and save) and run (a thin session wrapper).

Why pre-optimize at build time: a plain ``InferenceSession`` on an SD-1.5-sized UNet spends most of its
start-up in graph optimization (constant folding, fusions over thousands of nodes). We run those
machine-independent optimizations (``ORT_ENABLE_EXTENDED``) once, save the optimized graph, and the runtime
opens it with the graph already optimized: it only applies the cheap hardware-specific layout pass.
``ORT_ENABLE_ALL`` output is not saved because its NCHWc layout nodes are specific to the building CPU.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from diffc.engines import (BuiltEngine, SessionOptions, check_feeds, component_entry, engine_io, plain_description,
                           register)
from diffc.engines.host_cache import HostCache, PublishGate, with_fallback
from diffc.errors import ArtifactError, BackendUnavailableError, InputError
from diffc.names import base_component

log = logging.getLogger("diffc.engines.onnxruntime")

NAME = "onnxruntime"
#: written into the manifest: what level was applied at build time
BUILD_OPTIMIZATION = "extended"


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # the base install has it; a broken environment may not
        raise BackendUnavailableError(f"onnxruntime is not importable ({e}); reinstall diffc: pip install diffc") from e
    return onnxruntime


def version() -> str:
    return _ort().__version__


#: a session's CPU memory: ``own`` arena (onnxruntime's default: buffers kept at their peak for the life of the
#: session), ``none`` (every buffer from the system and back after each run), ``shared`` (one process-wide arena
#: that every ``shared`` session draws from, so they reuse each other's buffers; held at the largest run's peak)
ARENAS = ("own", "none", "shared")

_shared_arena_lock = threading.Lock()
_shared_arena_registered = False


def _register_shared_arena() -> None:
    """Register, once per process, the onnxruntime environment's CPU arena that ``shared`` sessions use."""
    global _shared_arena_registered
    with _shared_arena_lock:
        if _shared_arena_registered:
            return
        ort = _ort()
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # no size limit, grow by powers of two (onnxruntime's default), default chunk sizes
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 0, -1, -1))
        _shared_arena_registered = True


def _session_options(threads: int = 0, inter_threads: int = 0, arena: str = "own"):
    if arena not in ARENAS:
        raise InputError(f"unknown memory arena {arena!r}; use one of {list(ARENAS)}")
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena != "none"
    # onnxruntime's memory pattern plans, from a session's first run, one block for all of a run's activations and
    # asks the allocator for it from the second run on; an arena still holding the first run's buffers grows by
    # that block (onnxruntime issue #14477). Per-buffer allocations from the arena instead: SD-1.5 at 512x512 peaks
    # at 4.93 GiB instead of 5.59 (cpu-cache), 2.40 instead of 2.71 (int8 + cache); image times within this
    # machine's run-to-run noise. Without an arena the planned block is one malloc per run, freed after it.
    opts.enable_mem_pattern = arena == "none"
    if arena == "shared":
        _register_shared_arena()
        opts.add_session_config_entry("session.use_env_allocators", "1")
    # repack weights for the kernels on every intra-op thread: the SD-1.5 int8 UNet's session opens in 1.0 s
    # instead of 1.7 on 2 cores, same packed weights (outputs bit-identical), same run speed
    opts.add_session_config_entry("session.prepack.enable_parallel", "1")
    if threads:
        opts.intra_op_num_threads = threads
    if inter_threads:
        opts.inter_op_num_threads = inter_threads
    return opts


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                 external: bool | None = None) -> dict[str, Any]:
    """Optimize ``onnx_path`` with onnxruntime's portable graph optimizations and save it at ``engine_path``.

    Large models keep their weights in one external file next to the engine (``external=True``: always).
    """
    ort = _ort()
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    opts = _session_options()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(engine_path)
    onnx_size = Path(onnx_path).stat().st_size
    data = Path(str(onnx_path) + ".data")
    if external or (external is None and (data.exists() or onnx_size > (1 << 30))):
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      engine_path.name + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    files = [engine_path.name]
    if (engine_path.parent / (engine_path.name + ".data")).exists():
        files.append(engine_path.name + ".data")
    return {"backend": NAME, "backend_version": ort.__version__, "optimization": BUILD_OPTIMIZATION, "files": files}


def build_engines_sharing_weights(graphs: dict[str, tuple[Path, Path]], data_path: Path) -> dict[str, dict[str, Any]]:
    """:func:`build_engine` for several graphs cut from one model (the cache-reuse UNet pair), saved so that one
    external data file (``data_path``, next to every engine) holds each weight once.

    onnxruntime's optimizer writes its own data file per graph and may rename what it folds, so the optimized
    graphs are rewritten afterwards with identical tensors deduplicated by content
    (:func:`diffc.onnx_io.save_models_sharing_data`). ``graphs``: name -> (onnx path, engine path).
    Returns name -> :func:`build_engine`'s record, whose ``files`` are relative to ``data_path``'s folder.
    """
    import onnx

    from diffc.onnx_io import save_models_sharing_data

    records, models = {}, {}
    with tempfile.TemporaryDirectory(prefix="diffc-ort-") as scratch:
        for name, (onnx_path, engine_path) in graphs.items():
            optimized = Path(scratch) / name / "model.onnx"
            records[name] = build_engine(onnx_path, optimized, external=True)
            models[Path(engine_path)] = onnx.load(str(optimized))
        stats = save_models_sharing_data(models, data_path)
    log.info("shared weights: %d tensors, %d of them shared, %.1f MB written for %.1f MB referenced",
             stats["tensors"], stats["shared"], stats["bytes_written"] / 1e6, stats["bytes_referenced"] / 1e6)
    for name, (_, engine_path) in graphs.items():
        records[name]["files"] = [Path(engine_path).name, data_path.name]
        records[name]["shared_weights"] = stats
    return records


def cpu_signature() -> str:
    """What a layout-optimized graph depends on: CPU architecture, its vector ISA, the onnxruntime version."""
    import platform

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = {x for x in line.split(":", 1)[1].split() if x.startswith(("avx", "amx", "sse4", "fma",
                                                                                       "f16c", "asimd", "sve"))}
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{version()}|{','.join(sorted(flags))}"


#: how a cache entry is laid out (in its key, so entries of another layout are made again, never misread):
#: 2 = weights always in ``model.onnx.data`` (1 = inline when the artifact's graph had them inline)
CACHE_LAYOUT = 2


class Session:
    """One component's onnxruntime session. ``run`` takes and returns numpy arrays by name.

    With a ``cache_key`` (the engine files' sha256 digests), the first session on a machine also saves the
    graph after onnxruntime's hardware-specific layout pass (NCHWc convolutions: ~4.5 s of a 6.4 s start
    for the SD-1.5 UNet) into the per-host cache (:mod:`diffc.engines.host_cache`), keyed by those digests and
    :func:`cpu_signature`, its weights in a data file onnxruntime maps; later sessions open that graph with
    optimizations off and start in ~1.0 s. The artifact itself stays portable: the cache never leaves the
    machine that made it. ``gate``: the entry is published only once it opens (the runtime opens it when the
    digests have been verified against the files); without one the caller vouches for ``cache_key``.

    ``arena`` (one of :data:`ARENAS`) says where the session's activations live: its ``own`` onnxruntime arena,
    held at their peak for the life of the session; ``none``: given back to the system after each run (the
    next run faults them in again); ``shared``: one arena for all ``shared`` sessions of the process.

    ``initializers`` (name -> fp32 array): tensors that replace the graph's initializers of those names (a
    run-time LoRA, :mod:`diffc.runtime.lora`). onnxruntime takes them as OrtValues over the arrays' own memory
    (``SessionOptions.add_initializer``) and never reads those tensors from the file, so the session holds one
    copy of each weight. Such a session bypasses the host cache: the cached graph's layout-optimized weights
    are the base ones.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 0, inter_threads: int = 0,
                 cache_key: str | None = None, arena: str = "own", gate: PublishGate | None = None,
                 initializers: dict[str, np.ndarray] | None = None):
        ort = _ort()
        path = Path(path)
        _session_options(threads, inter_threads, arena)  # a bad arena is refused before any work
        # the arrays must outlive the session: onnxruntime uses their memory in place
        self._initializers = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in (initializers or {}).items()}
        # onnxruntime's NCHWc layout pass reorders Conv weights from the graph's own initializers, not from
        # replacements (onnxruntime 1.32: a replaced Conv weight is silently ignored); without it the
        # replacements hold, at the cost of the blocked-layout convolutions for this session
        self._disabled = ["NchwcTransformer"] if any(a.ndim == 4 for a in (initializers or {}).values()) else []
        if self._initializers:
            cache_key = None
        cache = HostCache(NAME)
        key = cache.key(cache_key, cpu_signature(), CACHE_LAYOUT) if cache_key and cache.enabled else None
        entry = cache.lookup(key) if key else None
        self.from_cache = False
        if entry is not None:
            opts = _session_options(threads, inter_threads, arena)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                self._sess = self._open(entry.path / "model.onnx", opts)
                self.from_cache = True
            except ArtifactError as e:  # made by an onnxruntime that reads it differently, or removed meanwhile
                entry.discard(str(e))
        if not self.from_cache:
            pending = cache.begin(key, gate) if key else None

            def layout_options():
                # Extended optimizations were applied at build time; only the layout pass remains to do here.
                opts = _session_options(threads, inter_threads, arena)
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                for name, value in self._initializers.items():
                    opts.add_initializer(name, value)
                return opts

            def open_cached():
                opts = layout_options()
                opts.optimized_model_filepath = str(pending.path / "model.onnx")
                # weights always in a data file beside the graph, which onnxruntime maps instead of parsing:
                # the SD-1.5 text encoder's entry (492 MB, single file in the artifact) opens in 0.3 s, not 1.3
                opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                              "model.onnx.data")
                opts.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
                return self._open(path, opts)

            self._sess, written = with_fallback(open_cached, lambda: self._open(path, layout_options()), pending,
                                                cache)
            if written:
                pending.finish({"cpu": cpu_signature()})
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]

    def _open(self, path: Path, opts):
        ort = _ort()
        try:
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=getattr(self, "_disabled", None) or None)
        except Exception as e:  # onnxruntime raises its own exception types for a bad file
            raise ArtifactError(f"onnxruntime cannot load {path}: {e}; rebuild the artifact with `diffc build`") from e

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        check_feeds(self.input_names, feeds)
        names = outputs or self.output_names
        values = self._sess.run(names, {n: feeds[n] for n in self.input_names})
        return dict(zip(names, values))


class OnnxRuntimeBackend:
    """The onnxruntime CPU backend behind :class:`diffc.engines.Backend`."""

    name = NAME
    #: onnxruntime has CPU kernels for its contrib ops: MultiHeadAttention (measured faster than opset-23
    #: Attention at SD-1.5 shapes), QuickGelu, and InstanceNormalization for GroupNorm (faster than its
    #: GroupNormalization-21 kernel)
    pass_defaults = MappingProxyType({"attention": "mha", "groupnorm": "instance_norm", "layernorm": True,
                                      "gelu": True, "quick_gelu": True, "disable": ()})
    parallel_open = False
    #: its sessions keep a layout-optimized graph per host: worth making at build time
    warm_host_cache = True
    runs_on_build_host = True
    contrib_ops = True
    rmsnorm_op = True
    #: x86 VNNI multiplies u8 x s8: uint8 activations (with zero points) by default
    int8_activations = ("uint8", "int8")
    fp8_kernels = False
    #: QLinearConv fuses only with Q/DQ on the Conv's output too, and takes an int32 bias
    qdq_form = MappingProxyType({"output_qdq": True, "int32_bias": True})
    runs_on_gpu = False
    tensorrt_options = False
    #: the head / tail pair shares one weights file and runs with dynamic shapes: built and tested here
    step_cache_split = True
    describe_build = staticmethod(plain_description)
    #: sessions open with replaced initializers (``open_session(..., weights=)``): run-time LoRAs
    replaces_weights = True
    PRECISIONS = ("fp32", "int8")

    def available(self) -> str | None:
        try:
            return version()
        except BackendUnavailableError:
            return None

    def version(self) -> str:
        return version()

    def tolerance(self, precision: str) -> float:
        return {"fp32": 1e-5, "int8": 0.1}.get(precision, 0.0)

    def check_profile(self, profile, graphs=None) -> None:
        for comp, prec in profile.precision.items():
            if prec.value not in self.PRECISIONS:
                raise BackendUnavailableError(
                    f"profile {profile.name!r} asks for {prec.value} ({comp}); the onnxruntime CPU backend builds "
                    "fp32, and int8 for the denoiser (cpu-int8)")

    def build_engine(self, component: str, onnx_path: Path, artifact: Path, *, profile, shape_ranges,
                     no_cache: bool = False) -> BuiltEngine:
        info = build_engine(onnx_path, Path(artifact) / component / "model.onnx")
        return self._entry(component, component, info, artifact, profile, shape_ranges)

    def build_engine_group(self, graphs, artifact: Path, folder: str, *, profile, shape_ranges,
                           no_cache: bool = False) -> dict[str, BuiltEngine]:
        """One weights file (``<folder>/weights.data``) for every graph: ``<folder>/model.onnx`` for the
        component named ``folder``, ``<folder>/<rest>.onnx`` for ``<folder>_<rest>`` (``unet/shallow.onnx``)."""
        artifact = Path(artifact)
        paths = {name: (Path(p), artifact / folder / ("model.onnx" if name == folder else
                                                      f"{name.removeprefix(folder + '_')}.onnx"))
                 for name, p in graphs.items()}
        records = build_engines_sharing_weights(paths, artifact / folder / "weights.data")
        return {name: self._entry(name, folder, records[name], artifact, profile, shape_ranges[name])
                for name in graphs}

    @staticmethod
    def _entry(component, folder, info, artifact, profile, shape_ranges) -> BuiltEngine:
        return component_entry(Path(artifact), folder, info["files"], backend=NAME,
                               backend_version=info["backend_version"],
                               precision=profile.precision_of(component).value,
                               io=engine_io(Path(artifact) / folder / info["files"][0]), shape_ranges=shape_ranges,
                               backend_options={"graph_optimization_applied": info["optimization"]})

    @staticmethod
    def weight_tensors(path: Path, artifact: Path):
        """Yield ``(value, record)`` for every fp32 initializer (2-D and up) of the built graph at ``path``, as a
        run-time weight swap addresses it: ``record`` = {initializer, dims, file, offset, dtype}, ``file`` /
        ``offset`` where its bytes lie in the artifact (its external data file, or the raw bytes inside the graph
        file itself), so the runtime reads the base weight with one seek, without onnx. Build time only."""
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path), load_external_data=False)
        blob, resume = None, 0
        for init in model.graph.initializer:
            if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) < 2:
                continue
            record: dict[str, Any] = {"initializer": init.name, "dims": list(init.dims), "dtype": "float32"}
            count = int(np.prod(init.dims))
            if init.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in init.external_data}
                data = path.parent / info["location"]
                offset = int(info.get("offset", 0))
                array = np.fromfile(data, dtype=np.float32, count=count, offset=offset)
                record.update(file=data.relative_to(artifact).as_posix(), offset=offset)
            else:
                array = numpy_helper.to_array(init)
                if init.raw_data:
                    # the bytes at any place they are found are the tensor's own; initializers are serialized in
                    # order, so the search resumes after the last one found (one pass over the file in all)
                    blob = path.read_bytes() if blob is None else blob
                    at = blob.find(init.raw_data, resume)
                    at = blob.find(init.raw_data) if at < 0 else at
                    if at >= 0:
                        record.update(file=path.relative_to(artifact).as_posix(), offset=at)
                        resume = at + len(init.raw_data)
            yield array, record

    def open_session(self, name: str, component, path: Path, options: SessionOptions,
                     weights: dict[str, np.ndarray] | None = None) -> Session:
        """``weights``: initializers to replace (name -> fp32 array), see :class:`Session`."""
        ort_options = options.onnxruntime
        if ort_options.get("memory_arena") == "shared":
            arena = "shared"
        else:
            # "denoiser": only the denoiser (UNet or transformer), which runs every step, keeps an arena of its own: the text encoder and the
            # VAE decoder run once per image, and their arenas would hold their peak activations (the 512x512
            # decoder's are large) while the UNet runs (SD 1.5 at 512x512: 6.9 GiB peak with every arena on, 5.3
            # without theirs, same speed)
            arena = "own" if base_component(name) in ("unet", "transformer") else "none"
        return Session(path, threads=options.threads or ort_options.get("intra_op_num_threads", 0),
                       inter_threads=ort_options.get("inter_op_num_threads", 0), cache_key=options.cache_key,
                       arena=arena, gate=options.gate, initializers=weights)


BACKEND = register(OnnxRuntimeBackend())
