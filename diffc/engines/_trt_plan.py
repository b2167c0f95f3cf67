"""The TensorRT-free half of a build: what precision means for a graph, per-input shape profiles from per-axis
ranges, a profile's build options, and the dry-run description. Pure Python: the builder and ``--dry-run`` call it
on machines without TensorRT.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Mapping

from diffc.engines._trt_common import (
    _MIB,
    MIN_COMPUTE_CAPABILITY,
    PRECISIONS,
    _cc_number,
    _check_flavour,
    available,
)
from diffc.engines import input_profiles
from diffc.engines._trt_graph import GraphInfo, inspect_graph
from diffc.errors import BackendUnavailableError, ProfileError

# ------------------------------------------------------------------------------------------------ precision


def check_precision(precision: str, *, backend: str, compute_capabilities: Iterable[str] = (),
                    graph: GraphInfo | str | os.PathLike | None = None, strongly_typed: bool | None = None,
                    component: str = "", profile: str = "") -> dict[str, Any]:
    """Decide how ``component`` is built in ``precision``, or refuse with a typed error saying what to do.

    Pure Python (no TensorRT import): the builder can call it for every component right after loading the
    profile (``graph=None``: checks what the targets can run) and again with each exported graph (checks
    that int8/fp8 graphs carry Q/DQ, and that a quantized graph is not built as something else).
    Returns ``{"strongly_typed": bool, "autocast": "fp16" | None, "quantized": [...]}``.
    """
    _check_flavour(backend)
    precision = getattr(precision, "value", precision)
    who = f"profile {profile!r} " if profile else ""
    field = f"[precision].{component or 'default'}"
    if precision not in PRECISIONS:
        raise ProfileError(f"{who}{field} must be one of {list(PRECISIONS)}, got {precision!r}")
    for cc in compute_capabilities:
        if _cc_number(cc) < MIN_COMPUTE_CAPABILITY[precision]:
            raise BackendUnavailableError(
                f"{who}asks for {precision} ({field}) on {cc}, which has no {precision} kernels (needs "
                f"SM{MIN_COMPUTE_CAPABILITY[precision]} or later); drop {cc} from [tensorrt].compute_capabilities "
                f"or use fp16 for {component or 'this component'}")
    if backend == "tensorrt_rtx" and strongly_typed is False:
        raise ProfileError(f"{who}[tensorrt].strongly_typed cannot be false with TensorRT-RTX, which builds strongly "
                           "typed networks only")
    plan: dict[str, Any] = {"strongly_typed": True if strongly_typed is None else strongly_typed, "autocast": None,
                            "quantized": []}
    if precision in ("fp16", "bf16") and plan["strongly_typed"]:
        plan["autocast"] = precision
    if graph is None:
        return plan

    info = graph if isinstance(graph, GraphInfo) else inspect_graph(graph)
    plan["quantized"] = sorted(info.quantized)
    what = component or "this component"
    if precision in ("int8", "fp8"):
        plan["autocast"] = None
        if precision not in info.quantized:
            has = f" (it has {', '.join(sorted(info.quantized))} Q/DQ)" if info.quantized else ""
            raise BackendUnavailableError(
                f"{who}asks for {precision} ({field}), but the {what} graph carries no {precision} "
                f"QuantizeLinear/DequantizeLinear pairs{has}. TensorRT builds {precision} only from an explicitly "
                f"quantized (Q/DQ) graph: build it with `diffc build` (which calibrates and inserts Q/DQ for "
                f"{precision} components), or from a graph quantized with NVIDIA ModelOpt")
        if strongly_typed is False:
            raise ProfileError(f"{who}[tensorrt].strongly_typed cannot be false for a Q/DQ graph: the graph's types "
                               f"decide which layers run in {precision}; use \"auto\"")
        plan["strongly_typed"] = True
    elif info.quantized:
        raise ProfileError(f"{who}{field} is {precision!r}, but the {what} graph is quantized "
                           f"({', '.join(sorted(info.quantized))} Q/DQ); set {field} to "
                           f"{sorted(info.quantized)[0]!r} or build from the unquantized graph")
    elif precision == "bf16" and info.float_type != "bf16":
        raise BackendUnavailableError(
            f"{who}asks for bf16 ({field}): a strongly typed build needs a bf16 graph and diffc converts graphs to "
            "fp16 only; use fp16 for this component")
    if plan["autocast"] and (info.metadata.get("diffc.autocast") == plan["autocast"]
                             or info.float_type == plan["autocast"]):
        plan["autocast"] = None  # the graph already is fp16
    if plan["autocast"] == "bf16":
        plan["autocast"] = None  # a bf16 graph is built as it is
    return plan


# ------------------------------------------------------------------------------------------------ shapes


# ------------------------------------------------------------------------------------------------ options


def options_from_profile(profile, component: str, shape_ranges: Mapping[str, Any]) -> dict[str, Any]:
    """A diffc :class:`~diffc.profiles.schema.Profile` -> the keyword arguments of :func:`build_engine`."""
    t = profile.tensorrt
    budget = profile.memory.budget_mib
    return {
        "backend": profile.backend.value,
        "precision": profile.precision_of(component).value,
        "shape_ranges": {k: list(v) for k, v in shape_ranges.items()},
        "static_shapes": t.static_shapes,
        "strongly_typed": t.strongly_typed,
        "opt_level": t.opt_level,
        "workspace_bytes": t.workspace_mib * _MIB if t.workspace_mib else None,
        "memory_budget_bytes": budget * _MIB if budget else None,
        "timing_cache": bool(t.timing_cache),
        "refit": t.refit,
        "weight_streaming": t.weight_streaming,
        "compute_capabilities": list(t.compute_capabilities),
        "hardware_compat": t.hardware_compat,
        "version_compat": t.version_compat,
        "component": component,
    }


def describe_build(profile, component: str, shape_ranges: Mapping[str, Any],
                   inputs: Iterable[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """What :func:`build_engine` would do for ``component``, without TensorRT (``diffc build --dry-run``).

    Raises the same typed errors a real build would raise early (bad precision for a target, bad ranges).
    """
    opts = options_from_profile(profile, component, shape_ranges)
    plan = check_precision(opts["precision"], backend=opts["backend"],
                           compute_capabilities=opts["compute_capabilities"],
                           strongly_typed=opts["strongly_typed"], component=component, profile=profile.name)
    flavour = opts["backend"]
    desc = {
        "component": component, "backend": flavour, "installed": _installed_version(flavour),
        "precision": opts["precision"],
        "graph": ("fp32 graph converted to fp16 (fp32 I/O and normalizations)" if plan["autocast"] == "fp16" else
                  f"{opts['precision']} Q/DQ graph from diffc's quantize pass, calibrated on the fp32 loop"
                  if opts["precision"] in ("int8", "fp8") else "as exported"),
        "compute_capabilities": opts["compute_capabilities"] or (
            "TensorRT-RTX default: Ampere and later" if flavour == "tensorrt_rtx" else "the build GPU"),
        "shape_ranges": ({k: [v[1]] * 3 for k, v in opts["shape_ranges"].items()} if opts["static_shapes"]
                         else opts["shape_ranges"]),
        "flags": {k: opts[k] for k in ("strongly_typed", "opt_level", "static_shapes", "refit", "weight_streaming",
                                       "hardware_compat", "version_compat", "timing_cache", "workspace_bytes",
                                       "memory_budget_bytes")},
    }
    desc["flags"]["strongly_typed"] = plan["strongly_typed"]
    if flavour == "tensorrt_rtx":
        desc["flags"]["timing_cache"] = False  # no-op on TensorRT-RTX
    if inputs is not None:
        desc["profiles"] = {k: v.to_dict() for k, v in
                            input_profiles(inputs, opts["shape_ranges"], static=opts["static_shapes"]).items()}
    return desc


def _installed_version(flavour: str) -> str | None:
    """The installed version from package metadata (no import), or None."""
    import importlib.metadata as md

    if available(flavour) is None:
        return None
    names = (["tensorrt_rtx", "tensorrt-rtx-cu12-bindings", "tensorrt-rtx-cu13-bindings"] if flavour == "tensorrt_rtx"
             else ["tensorrt", "tensorrt-cu12-bindings", "tensorrt-cu13-bindings", "tensorrt-cu12", "tensorrt-cu13"])
    for n in names:
        with contextlib.suppress(md.PackageNotFoundError):
            return md.version(n)
    return "unknown"


