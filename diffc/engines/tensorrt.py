"""TensorRT backend, both flavours: datacenter TensorRT (``tensorrt``) and TensorRT-RTX (``tensorrt_rtx``).

Build: ONNX graph -> strongly typed network -> one optimization profile per engine (min / opt / max shape of
every input, converted here from diffc's backend-neutral per-axis ranges) -> serialized engine (a "plan"),
named by a content hash and kept in a build cache so an unchanged component is never rebuilt.
Run: :class:`Session` deserializes a plan after :func:`check_engine_compatible` has compared the manifest's
record with this machine, and runs it with ``execute_async_v3`` on device buffers, optionally replaying
CUDA graphs.

The two flavours build differently, and the code says so where it matters:

* **TensorRT-RTX** compiles ahead of time for a list of compute capabilities and specializes kernels just in
  time on the user's GPU. Its builder needs no GPU, so ``rtx-*`` profiles build on any Linux/Windows x86-64
  machine. It builds strongly typed networks only (no FP16/INT8 builder flags), has no timing cache (its
  timing-cache API is a deprecated no-op) and no version-compatible engines: an engine runs only on the
  release that built it.
* **Datacenter TensorRT** autotunes on the GPU it builds on; an engine is for that GPU's architecture (wider
  with ``hardware_compat``) and that TensorRT version (later ones with ``version_compat``). A timing cache
  makes rebuilds fast.

Precision lives in the graph (strong typing, the only mode TensorRT-RTX and TensorRT 11 have): fp16 means
the fp32 graph is converted to fp16 first (:mod:`diffc.engines._trt_autocast`), int8 / fp8 mean the graph
must already carry Q/DQ pairs of that type (diffc's quantization pass makes them; TensorRT does no implicit
calibration in strongly typed mode). :func:`check_precision` is the one place that decides this, and the
builder can call it before any export or build.

Nothing here imports TensorRT or CUDA at module import time (``import diffc.engines.tensorrt`` is cheap and
works without the extra); :func:`available` answers without loading the 200 MB libraries.

This module is the backend's API and its build; the rest is split by what each part may import:
``_trt_common`` (flavours, lazy import), ``_trt_graph`` (ONNX facts, content hash), ``_trt_plan`` (precision,
shape profiles, dry run: pure Python), ``_trt_autocast`` (fp16 graphs), ``_trt_runtime`` (compatibility check,
:class:`Session`) and ``_trt_cuda`` (the CUDA runtime calls a session makes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import numpy as np

from diffc._fs import sha256_file, write_atomic
from diffc.engines._trt_common import (
    _MIB,
    CACHE_FORMAT,
    ENGINE_FILE,
    EXTRAS,
    FLAVOURS,
    HARDWARE_COMPAT,
    MIN_COMPUTE_CAPABILITY,
    NAME,
    PRECISIONS,
    EngineBuildError,
    _cc_number,
    _check_flavour,
    _import,
    available,
    default_cache_dir,
    version,
)
from diffc.engines import BuiltEngine, InputProfile, SessionOptions, input_profiles, register
from diffc.engines._trt_autocast import AUTOCAST_VERSION
from diffc.engines._trt_graph import GraphInfo, content_hash, inspect_graph
from diffc.engines.host_cache import HostCache
from diffc.engines._trt_plan import check_precision, describe_build, options_from_profile
from diffc.engines._trt_runtime import Session, check_engine_compatible
from diffc.errors import BackendUnavailableError, ProfileError

__all__ = [
    "NAME", "FLAVOURS", "EXTRAS", "ENGINE_FILE", "PRECISIONS", "HARDWARE_COMPAT", "MIN_COMPUTE_CAPABILITY",
    "EngineBuildError", "GraphInfo", "InputProfile", "Session",
    "available", "version", "check_precision", "input_profiles", "options_from_profile", "describe_build",
    "build_engine", "manifest_entry", "check_engine_compatible", "default_cache_dir", "inspect_graph",
]

log = logging.getLogger("diffc.engines.tensorrt")

# ------------------------------------------------------------------------------------------------ build cache


def _cache_store(cache: HostCache, key: str, engine_path: Path, record: dict[str, Any], *, replace: bool) -> None:
    """Keep the engine just built (hard-linked: both sides are written once) with its record as the host cache
    entry ``key``; ``replace``: instead of an entry already there (``no_cache`` rebuilds refresh it)."""
    if replace:
        cache.remove(key)
    pending = cache.begin(key)
    if pending is None:
        return
    try:
        _link_or_copy(engine_path, pending.path / ENGINE_FILE)
    except OSError as e:
        pending.discard()
        cache.unwritable(e)
        return
    pending.finish(record)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when possible: a cached engine is never modified in place (both sides are written once)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# ------------------------------------------------------------------------------------------------ build


def _settings(flavour: str, ver: str, precision: str, plan: dict[str, Any], profiles: dict[str, InputProfile], *,
              opt_level: int, workspace_bytes: int | None, refit: bool, weight_streaming: bool,
              compute_capabilities: list[str], hardware_compat: str, version_compat: bool,
              build_gpu: str | None) -> dict[str, Any]:
    """Everything that decides the engine's bytes besides the graph: hashed into the cache key, and recorded."""
    return {
        "format": CACHE_FORMAT, "flavour": flavour, "version": ver, "precision": precision,
        "strongly_typed": plan["strongly_typed"], "autocast": plan["autocast"],
        "profiles": [{k: v.to_dict() for k, v in profiles.items()}],
        "opt_level": opt_level, "workspace_bytes": workspace_bytes, "refit": refit,
        "weight_streaming": weight_streaming, "compute_capabilities": compute_capabilities,
        "hardware_compat": hardware_compat, "version_compat": version_compat, "build_gpu": build_gpu,
        # the fp16 conversion decides the engine's bytes too: a changed conversion must not reuse old engines
        **({"autocast_version": AUTOCAST_VERSION} if plan["autocast"] else {}),
    }


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                 shape_ranges: Mapping[str, Any], precision: str = "fp32", backend: str | None = None,
                 strongly_typed: bool | None = None, opt_level: int = 3, workspace_bytes: int | None = None,
                 memory_budget_bytes: int | None = None, timing_cache: str | os.PathLike | bool | None = None,
                 refit: bool = False, weight_streaming: bool = False, compute_capabilities: Iterable[str] = (),
                 hardware_compat: str = "none", version_compat: bool = False, static_shapes: bool = False,
                 cache_dir: str | os.PathLike | None = None, no_cache: bool = False,
                 component: str = "") -> dict[str, Any]:
    """Build (or fetch from the build cache) the engine of one component; return its manifest record.

    ``shape_ranges``: ``[min, opt, max]`` per symbolic axis (see :func:`input_profiles`); the UNet's batch
    range is already doubled for classifier-free guidance by the caller. ``backend``: ``tensorrt`` or
    ``tensorrt_rtx`` (default: :func:`available`). ``workspace_bytes``: the builder's workspace pool limit;
    when None and ``memory_budget_bytes`` is given, the budget minus the weights. ``timing_cache``: a file
    to load and update (datacenter TensorRT), ``True`` for one per (version, GPU) in the cache folder.
    ``cache_dir``: the build cache (default :func:`default_cache_dir`; ``DIFFC_CACHE_DIR=off`` disables it);
    ``no_cache``: rebuild even if the cache holds this engine (and refresh the entry).

    The record: ``backend``, ``backend_version``, ``precision``, ``file``/``files`` (names next to
    ``engine_path``), ``inputs``/``outputs``, ``backend_options`` (what :func:`check_engine_compatible`
    and :class:`Session` read: compute capabilities, compatibility modes, profiles, flags, engine sha256,
    cache key) and ``report`` (build seconds, engine bytes, cache hit/miss, inspector summary) for the
    build report rather than the manifest.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    flavour = backend or available()
    if flavour is None:
        raise BackendUnavailableError(f"no TensorRT is installed; install TensorRT-RTX with {EXTRAS['tensorrt_rtx']}")
    _check_flavour(flavour)
    precision = getattr(precision, "value", precision)
    ccs = list(compute_capabilities)
    for cc in ccs:
        _cc_number(cc)
    if hardware_compat not in HARDWARE_COMPAT:
        raise ProfileError(f"[tensorrt].hardware_compat must be one of {list(HARDWARE_COMPAT)}, "
                           f"got {hardware_compat!r}")
    if flavour == "tensorrt_rtx" and (hardware_compat != "none" or version_compat):
        raise ProfileError("[tensorrt].hardware_compat and [tensorrt].version_compat are datacenter TensorRT "
                           "settings; TensorRT-RTX engines run on the listed compute capabilities, with the release "
                           "that built them")
    if not 0 <= opt_level <= 5:
        raise ProfileError(f"[tensorrt].opt_level must be from 0 to 5, got {opt_level}")
    trt = _import(flavour)  # first: a missing backend is the error to report, not what it would have refused
    ver = str(trt.__version__)

    t_start = time.perf_counter()
    info = inspect_graph(onnx_path)
    plan = check_precision(precision, backend=flavour, compute_capabilities=ccs, graph=info,
                           strongly_typed=strongly_typed, component=component)
    profiles = input_profiles(info.inputs, shape_ranges, static=static_shapes)

    build_gpu = None
    if flavour == "tensorrt":
        build_gpu = _datacenter_build_gpu(ccs, hardware_compat, component)
    elif refit:
        from diffc.engines._trt_cuda import device_compute_capability

        if device_compute_capability() is None:  # measured: REFIT fails in the JIT compiler without a device
            raise BackendUnavailableError("refittable TensorRT-RTX engines need a GPU on the build machine (the "
                                          "builder compiles the refit kernels on it); build on a GPU or set "
                                          "[tensorrt].refit = false")

    weight_bytes = info.weight_bytes - info.weight_floats.get("fp32", 0) // 2 if plan["autocast"] == "fp16" \
        else info.weight_bytes
    if workspace_bytes is None and memory_budget_bytes:
        workspace_bytes = memory_budget_bytes - (0 if weight_streaming else weight_bytes)
        if workspace_bytes <= 0:
            raise ProfileError(f"[memory].budget_mib ({memory_budget_bytes // _MIB} MiB) is smaller than the weights "
                               f"of {component or onnx_path.name} ({weight_bytes / _MIB:.0f} MiB in {precision}); "
                               "raise it, quantize the component, or enable [tensorrt].weight_streaming")

    settings = _settings(flavour, ver, precision, plan, profiles, opt_level=opt_level, workspace_bytes=workspace_bytes,
                         refit=refit, weight_streaming=weight_streaming, compute_capabilities=ccs,
                         hardware_compat=hardware_compat if flavour == "tensorrt" else "none",
                         version_compat=version_compat, build_gpu=build_gpu)
    key = hashlib.sha256(json.dumps({"graph": content_hash(onnx_path, info), "settings": settings},
                                    sort_keys=True).encode()).hexdigest()
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # the key is the hash of the graph itself (not of a digest someone claims) and every build setting: an entry
    # can only be what building this graph here gives; its integrity record catches damage since
    cache = HostCache(flavour, folder=cache_root / flavour if cache_root is not None else None)
    entry = HostCache.key(key) if cache.enabled else None

    if entry is not None and not no_cache:
        found = cache.lookup(entry)
        cached = None
        try:
            if found is not None:
                _link_or_copy(found.path / ENGINE_FILE, engine_path)
                cached = found.meta
        except FileNotFoundError:  # another process is replacing the entry right now: build instead
            cached = None
        if cached is not None:
            record = _relocate(cached, engine_path)
            record["report"]["cache"] = "hit"
            record["report"]["seconds"] = round(time.perf_counter() - t_start, 3)
            log.info("%s: engine unchanged (cache %s), not rebuilt", component or onnx_path.name, key[:12])
            return record

    tc_path = None
    if timing_cache and flavour == "tensorrt":
        tc_path = (Path(timing_cache) if not isinstance(timing_cache, bool) else
                   (cache_root or Path(tempfile.gettempdir())) / f"timing-{ver}-{build_gpu}.cache")

    with tempfile.TemporaryDirectory(prefix="diffc-trt-") as work:
        src = onnx_path
        autocast_report = None
        if plan["autocast"] == "fp16":
            from diffc.engines._trt_autocast import autocast_fp16

            src = Path(work) / "model.onnx"
            autocast_report = autocast_fp16(onnx_path, src)
        t0 = time.perf_counter()
        blob, net_io, logsum = _build_plan(trt, flavour, src, profiles, plan, opt_level=opt_level,
                                           workspace_bytes=workspace_bytes, refit=refit,
                                           weight_streaming=weight_streaming, ccs=ccs, hardware_compat=hardware_compat,
                                           version_compat=version_compat, timing_cache=tc_path,
                                           precision=precision, component=component or onnx_path.name)
        build_s = time.perf_counter() - t0
    write_atomic(engine_path, memoryview(blob))
    nbytes = engine_path.stat().st_size
    del blob

    inspector = _inspect_engine(trt, engine_path, logsum)
    dtypes = net_io  # what TensorRT made of each I/O tensor (shapes keep the graph's axis names)
    record = {
        "backend": flavour,
        "backend_version": ver,
        "precision": precision,
        "file": engine_path.name,
        "files": [engine_path.name],
        "inputs": [dict(s, dtype=dtypes.get(s["name"], s["dtype"])) for s in info.inputs],
        "outputs": [dict(s, dtype=dtypes.get(s["name"], s["dtype"])) for s in info.outputs],
        "backend_options": {
            "flavour": flavour,
            "compute_capabilities": [build_gpu] if flavour == "tensorrt" else ccs,
            # TensorRT-RTX with no listed targets builds its portable default engine: it runs on the targets its
            # ComputeCapability enum lists from Ampere on (not on every SM >= 80: no SM87, SM90, SM100), which
            # check_engine_compatible reads from this release's enum; "none": no datacenter compatibility level
            "hardware_compat": hardware_compat if flavour == "tensorrt" else "none",
            "version_compat": bool(version_compat),
            "strongly_typed": plan["strongly_typed"],
            "autocast": plan["autocast"],
            "quantized": plan["quantized"],
            "opt_level": opt_level,
            "workspace_bytes": workspace_bytes,
            "refit": refit,
            "weight_streaming": weight_streaming,
            "static_shapes": static_shapes,
            "profiles": settings["profiles"],
            "engine_sha256": sha256_file(engine_path),
            "cache_key": key,
        },
        "report": {
            "cache": "off" if entry is None else ("rebuilt" if no_cache else "miss"),
            "build_seconds": round(build_s, 3),
            "seconds": round(time.perf_counter() - t_start, 3),
            "engine_bytes": nbytes,
            "weights_bytes_estimate": weight_bytes,
            "timing_cache": str(tc_path) if tc_path else None,
            "autocast": autocast_report,
            "inspector": inspector,
        },
    }
    if memory_budget_bytes and inspector.get("activation_bytes") is not None:
        need = inspector["activation_bytes"] + (0 if weight_streaming else weight_bytes)
        record["report"]["fits_memory_budget"] = need <= memory_budget_bytes
        if need > memory_budget_bytes:
            log.warning("%s needs about %.0f MiB (weights + activations) at its max shapes, over the %d MiB budget",
                        component or onnx_path.name, need / _MIB, memory_budget_bytes // _MIB)
    if entry is not None:
        _cache_store(cache, entry, engine_path, record, replace=no_cache)
    log.info("%s: built %s engine (%s, %.1f MB) in %.1f s", component or onnx_path.name, flavour, precision,
             nbytes / 1e6, build_s)
    return record


def manifest_entry(record: Mapping[str, Any], folder: str) -> dict[str, Any]:
    """The manifest's ``components.<name>`` entry for an engine built into ``<artifact>/<folder>/``.

    Everything but the ``report`` (which belongs in the build report); the engine's sha256 is the one taken at
    build time, so the builder need not hash it again. The caller adds ``shape_ranges``.
    """
    rel = f"{folder}/{record['file']}"
    return {
        "file": rel,
        "files": {rel: record["backend_options"]["engine_sha256"]},
        **{k: record[k] for k in ("backend", "backend_version", "precision", "inputs", "outputs")},
        "backend_options": dict(record["backend_options"]),
    }


def _relocate(record: dict[str, Any], engine_path: Path) -> dict[str, Any]:
    record = json.loads(json.dumps(record))
    record["file"] = engine_path.name
    record["files"] = [engine_path.name]
    return record


def _datacenter_build_gpu(ccs: list[str], hardware_compat: str, component: str) -> str:
    """Datacenter TensorRT autotunes on the build GPU: the engine is for that GPU, so it must be the target."""
    from diffc.engines._trt_cuda import device_compute_capability

    cc = device_compute_capability()
    if cc is None:
        raise BackendUnavailableError(
            "datacenter TensorRT builds engines on the GPU they are for, and no NVIDIA GPU is visible here; build on "
            "the target machine, or use a tensorrt_rtx profile (rtx-fp16), which builds without a GPU")
    if ccs and cc not in ccs:
        if hardware_compat == "ampere_plus" and _cc_number(cc) >= 80:
            return cc
        raise ProfileError(f"this machine's GPU is {cc}, but the profile's [tensorrt].compute_capabilities is {ccs}: "
                           "TensorRT builds for the GPU it runs on. Build on a target GPU, or add "
                           f"{cc} to the list (or set [tensorrt].hardware_compat = \"ampere_plus\")")
    return cc


_LOG_PATTERNS = {
    "engine_layers": re.compile(r"After reformat layers: (\d+) layers"),
    "activation_bytes": re.compile(r"Total Activation Memory: (\d+)"),
    "weights_bytes": re.compile(r"Total Weights Memory: (\d+)"),
    "scratch_bytes": re.compile(r"Max Scratch Memory: (\d+)"),
}
_FOREIGN = re.compile(r"Computing costs for \{ForeignNode\[(.*?)\]\}")
_ATTENTION = re.compile(r"self-attention|fmha|flash.?attention|\bmha\b", re.IGNORECASE)


def _make_logger(trt):
    """A TensorRT logger that forwards warnings to ``logging`` and keeps what the build report summarizes.

    TensorRT says which regions went to Myelin (its fusing graph compiler: ``ForeignNode[...]``) and whether
    it recognized attention only at VERBOSE level, so the logger listens at VERBOSE and keeps just the lines
    that match; on a GPU-less TensorRT-RTX build this is the only source (the engine inspector needs a
    deserialized engine, which needs a GPU).
    """
    S = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.summary: dict[str, Any] = {"myelin_regions": set(), "attention_lines": 0}

        def log(self, severity, msg):
            if severity in (S.INTERNAL_ERROR, S.ERROR):
                self.errors.append(msg)
                log.debug("TensorRT: %s", msg)
            elif severity == S.WARNING:
                log.debug("TensorRT: %s", msg)
            elif severity == S.INFO:
                log.debug("TensorRT: %s", msg)
            for key, pat in _LOG_PATTERNS.items():
                m = pat.search(msg)
                if m:
                    self.summary[key] = int(m.group(1))
            m = _FOREIGN.search(msg)
            if m:
                self.summary["myelin_regions"].add(m.group(1))
            if _ATTENTION.search(msg) and ("Myelin" in msg or "fus" in msg.lower()):
                self.summary["attention_lines"] += 1

    return _Logger()


def _build_plan(trt, flavour: str, src: Path, profiles: dict[str, InputProfile], plan: dict[str, Any], *,
                opt_level: int, workspace_bytes: int | None, refit: bool, weight_streaming: bool, ccs: list[str],
                hardware_compat: str, version_compat: bool, timing_cache: Path | None, precision: str,
                component: str):
    """Parse ``src`` and build the serialized engine. Returns (plan bytes, {io name: dtype}, log summary)."""
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if plan["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):  # reads external data next to the file
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{flavour} cannot parse the {component} graph: {'; '.join(errs) or 'unknown error'}. "
                               "An op TensorRT does not support must be rewritten (diffc's passes for this target) "
                               "or the component built with the 'cpu' profile")
    network_layers = network.num_layers
    # ONNX Attention (opset 23) arrives as one IAttention (ATTENTION_INPUT/OUTPUT layers): fused by construction
    attention_layers = sum(network.get_layer(i).type.name == "ATTENTION_OUTPUT" for i in range(network_layers))

    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if not plan["strongly_typed"]:  # datacenter TensorRT 10.x only (validated): the legacy precision flags
        flag = {"fp16": "FP16", "bf16": "BF16"}.get(precision)
        if flag:
            if not hasattr(trt.BuilderFlag, flag):
                raise BackendUnavailableError(f"TensorRT {trt.__version__} has no {flag} builder flag (weakly typed "
                                              "builds were removed); set [tensorrt].strongly_typed = \"auto\"")
            config.set_flag(getattr(trt.BuilderFlag, flag))
    if flavour == "tensorrt_rtx":
        if ccs:
            config.num_compute_capabilities = len(ccs)
            for i, cc in enumerate(ccs):
                member = getattr(trt.ComputeCapability, cc, None)
                if member is None:
                    known = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
                    raise ProfileError(f"[tensorrt].compute_capabilities: TensorRT-RTX {trt.__version__} cannot target "
                                       f"{cc}; it knows {known}")
                config.set_compute_capability(member, i)
    else:
        if hardware_compat != "none":
            config.hardware_compatibility_level = {
                "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
                "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY}[hardware_compat]
        if version_compat:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        cache = None
        if timing_cache is not None:
            blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, ignore_mismatch=False)

    opt_profile = builder.create_optimization_profile()
    for name, p in profiles.items():
        opt_profile.set_shape(name, p.min, p.opt, p.max)
    config.add_optimization_profile(opt_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors[-5:]) or "no error message"
        hint = ""
        if "workspace" in detail.lower():
            hint = " Raise [memory].budget_mib or [tensorrt].workspace_mib."
        elif "Attention" in detail or "attention" in detail:
            hint = " ONNX Attention has no fp32 kernel in TensorRT-RTX: build this component in fp16 or unfused."
        raise EngineBuildError(f"{flavour} {trt.__version__} could not build the {component} engine in {precision}: "
                               f"{detail}.{hint}")
    if flavour == "tensorrt" and timing_cache is not None and cache is not None:
        write_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))

    dtypes = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dtypes[t.name] = _np_name(trt, t.dtype)
    for i in range(network.num_outputs):
        t = network.get_output(i)
        dtypes[t.name] = _np_name(trt, t.dtype)
    summary = dict(logger.summary)
    summary["network_layers"] = network_layers
    summary["attention_layers"] = attention_layers
    return serialized, dtypes, summary


def _np_name(trt, dtype) -> str:
    try:
        return np.dtype(trt.nptype(dtype)).name
    except TypeError:  # bf16 / fp8 have no numpy type
        return {"BF16": "bfloat16", "FP8": "float8_e4m3fn"}.get(dtype.name, dtype.name.lower())


def _inspect_engine(trt, engine_path: Path, logsum: dict[str, Any]) -> dict[str, Any]:
    """Build-report summary: from TensorRT's engine inspector when a GPU can load the engine, else the build log."""
    out: dict[str, Any] = {
        "source": "build_log",
        "network_layers": logsum.get("network_layers"),
        "engine_layers": logsum.get("engine_layers"),
        "myelin_regions": len(logsum.get("myelin_regions", ())),
        "fused_attention": bool(logsum.get("attention_lines") or logsum.get("attention_layers")),
        "activation_bytes": logsum.get("activation_bytes"),
        "weights_bytes": logsum.get("weights_bytes"),
    }
    from diffc.engines._trt_cuda import device_compute_capability

    if device_compute_capability() is None:
        return out
    try:  # the inspector needs a deserialized engine; any failure leaves the build-log summary
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
        layers = info.get("Layers", [])
        names = [(lay.get("Name", "") if isinstance(lay, dict) else str(lay)) for lay in layers]
        kinds = [(lay.get("LayerType", "") if isinstance(lay, dict) else "") for lay in layers]
        out.update(source="engine_inspector", engine_layers=len(layers),
                   myelin_regions=max(out["myelin_regions"], sum("ForeignNode" in n or k == "Myelin"
                                                                  for n, k in zip(names, kinds))),
                   fused_attention=out["fused_attention"] or any(_ATTENTION.search(n) for n in names))
    except Exception as e:  # noqa: BLE001 - informational only
        log.debug("engine inspector unavailable: %s", e)
    return out




class TensorRTBackend:
    """One TensorRT flavour (``tensorrt`` or ``tensorrt_rtx``) behind :class:`diffc.engines.Backend`."""

    #: TensorRT has no onnxruntime contrib ops; it fuses attention itself (Myelin) and has a GroupNormalization
    #: layer; its erf GELU runs as written
    pass_defaults = MappingProxyType({"attention": "none", "groupnorm": "group_normalization", "layernorm": True,
                                      "gelu": False, "quick_gelu": False, "disable": ()})
    parallel_open = False
    #: an engine may be for a GPU the build machine lacks: nothing to warm there
    warm_host_cache = False
    runs_on_build_host = False
    contrib_ops = False
    rmsnorm_op = False
    #: explicit quantization: symmetric int8 (no zero points), FP8 E4M3 on Hopper / Ada and later
    int8_activations = ("int8",)
    fp8_kernels = True
    #: Q/DQ on the inputs only, float bias: TensorRT fuses the rest itself
    qdq_form = MappingProxyType({"output_qdq": False, "int32_bias": False})
    runs_on_gpu = True
    #: both flavours read the [tensorrt] table (diffc.profiles.schema refuses what TensorRT-RTX lacks)
    tensorrt_options = True
    #: the cut tensors' axes would need shape profiles of their own: not built for the step cache yet
    step_cache_split = False

    def __init__(self, flavour: str):
        self.name = _check_flavour(flavour)

    def available(self) -> str | None:
        if available(self.name) is None:
            return None
        try:
            return version(self.name)
        except BackendUnavailableError:  # found but not importable (bindings without their libraries)
            return None

    def version(self) -> str:
        return version(self.name)

    def tolerance(self, precision: str) -> float:
        # fp32 layers may run in TF32 on Ampere and later; fp16 / bf16 as their mantissas allow
        return {"fp32": 5e-3, "fp16": 1e-2, "bf16": 3e-2, "int8": 0.1, "fp8": 0.1}.get(precision, 0.0)

    @staticmethod
    def describe_build(profile, component: str, shape_ranges: Mapping[str, Any]) -> dict[str, Any]:
        """Flags, precision plan and shape ranges of the engine build, without TensorRT (:func:`describe_build`)."""
        return describe_build(profile, component, shape_ranges)

    def check_profile(self, profile, graphs=None) -> None:
        """Refuse what the profile cannot build before any work: a missing backend, a precision the targets lack,
        and (with ``graphs``, after export) int8/fp8 components whose graphs carry no Q/DQ."""
        if available(self.name) is None:
            raise BackendUnavailableError(f"profile {profile.name!r} builds {self.name} engines, and {self.name} is "
                                          f"not installed; install it with {EXTRAS[self.name]}")
        for comp in (graphs or ("text_encoder", "text_encoder_2", "unet", "vae_decoder")):
            check_precision(profile.precision_of(comp), backend=self.name,
                            compute_capabilities=profile.tensorrt.compute_capabilities,
                            strongly_typed=profile.tensorrt.strongly_typed,
                            graph=graphs[comp] if graphs else None, component=comp, profile=profile.name)

    def build_engine(self, component: str, onnx_path: Path, artifact: Path, *, profile, shape_ranges,
                     no_cache: bool = False) -> BuiltEngine:
        rec = build_engine(onnx_path, Path(artifact) / component / ENGINE_FILE, no_cache=no_cache,
                           **options_from_profile(profile, component, shape_ranges))
        return BuiltEngine({**manifest_entry(rec, component), "shape_ranges": dict(shape_ranges)},
                           {"engine_bytes": rec["report"]["engine_bytes"], "tensorrt": rec["report"]})

    def build_engine_group(self, graphs, artifact: Path, folder: str, *, profile, shape_ranges,
                           no_cache: bool = False) -> dict[str, BuiltEngine]:
        """Each graph its own engine (``<component>/model.plan``): a plan embeds its weights."""
        return {name: self.build_engine(name, Path(p), artifact, profile=profile, shape_ranges=shape_ranges[name],
                                        no_cache=no_cache) for name, p in graphs.items()}

    def open_session(self, name: str, component, path: Path, options: SessionOptions) -> Session:
        # checks TensorRT version and GPU architecture against the record before deserializing
        return Session(path, record=component, cache_key=options.cache_key, cuda_graph=options.cuda_graph,
                       gate=options.gate)


BACKENDS = {f: register(TensorRTBackend(f)) for f in FLAVOURS}
