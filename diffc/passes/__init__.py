"""Graph passes: pure ONNX graph -> ONNX graph transformations, one per module, run in an explicit order.

The passes are what makes diffc a compiler rather than an exporter: they turn what a torch exporter writes
into what the target backend runs fast, and refuse graphs the target cannot run at all.

=================  ==========================================================================================
``cleanup``        constant folding, shape simplification, dead / identity / duplicate node elimination
``legalize_norms`` GroupNorm into the target's fast form; LayerNorm, RMSNorm and GELU fusions where it has kernels
``fuse_attention`` decomposed attention (UNet, CLIP, and the DiTs' joint / QK-normed / RoPE / key-padded
                   attention) -> ``MultiHeadAttention`` / opset-23 ``Attention`` (onnxruntime only)
``check_ops``      refuse ops the target cannot run (CUDA-only contrib ops on CPU, any contrib op elsewhere)
``cache_split``    (profiles with ``[cache]``) the UNet cut into a full and a shallow graph, by the build's passes stage
``quantize``       (int8 / fp8 profiles) Q/DQ insertion with calibrated ranges, by the build's quantize stage
=================  ==========================================================================================

Usage::

    specs = pass_list("onnxruntime", attention="mha")   # the graph passes run_passes runs
    print(format_pass_list(profile_pass_list(profile)))  # and the stage passes, as `diffc passes` shows
    model, report = run_passes(model_proto, "unet", "onnxruntime", verify=True)
    report = run_pass_list(ir_model, "unet", "onnxruntime")  # the same, in place on an onnx_ir model (the build)

Options are plain keywords (a profile's ``[passes]`` table maps onto them one to one):

``attention``   ``"mha"`` | ``"attention23"`` | ``"none"`` (onnxruntime default ``"mha"``: measured faster than
                opset-23 Attention on the CPU provider at SD-1.5 shapes; TensorRT and OpenVINO: only ``"none"``)
``groupnorm``   ``"instance_norm"`` | ``"group_normalization"`` | ``"keep"`` (onnxruntime default
                ``"instance_norm"``: measured faster than its GroupNormalization-21 kernel; TensorRT default
                ``"group_normalization"``)
``layernorm``   fuse decomposed LayerNorm (default true); on onnxruntime also RMSNorm (the transformers' QK norm)
                into opset-23 ``RMSNormalization`` (OpenVINO and TensorRT fuse the decomposed form themselves)
``gelu``        fuse the erf GELU formula into ``Gelu`` (default true on onnxruntime, false on TensorRT)
``quick_gelu``  ``x*sigmoid(a*x)`` -> contrib ``QuickGelu`` (onnxruntime only; default true there)
``disable``     names of passes to leave out, e.g. ``["fuse_attention"]``
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable, Mapping

from diffc.engines import get_backend
from diffc.errors import ProfileError
from diffc.passes._errors import PassError, PassOptionError

if TYPE_CHECKING:  # onnx_ir / onnxscript load only when passes are built or run
    import onnx

    from diffc.passes._base import DiffcPass

__all__ = ["PassSpec", "PassError", "PassOptionError", "TARGETS", "ATTENTION_KINDS", "GROUPNORM_FORMS",
           "QUANTIZE_ROLES", "STAGE_PASSES", "activation_type", "defaults", "pass_list", "profile_pass_list",
           "format_pass_list", "pass_entry", "resolve_options", "run_pass_list", "run_passes"]

log = logging.getLogger("diffc.passes")

TARGETS = ("onnxruntime", "tensorrt", "tensorrt_rtx", "openvino", "onnxruntime_cuda")
#: values of the ``attention`` option (fuse_attention's ``kind``)
ATTENTION_KINDS = ("mha", "attention23", "none")
#: layer roles the quantize pass can leave in float (``[quantize].keep_float``); see diffc.passes.quantize
QUANTIZE_ROLES = ("conv_in", "conv_out", "time_embedding", "skip_concat", "output_block", "text_projection", "layer",
                  "attention_softmax")
#: values of the ``groupnorm`` option (legalize_norms)
GROUPNORM_FORMS = ("instance_norm", "group_normalization", "keep")


def defaults(target: str) -> dict[str, Any]:
    """``target``'s default of every option (the keys are the whole option vocabulary): each backend declares its
    own (``pass_defaults``, :mod:`diffc.engines`), since which fused forms are fast or legal is backend knowledge.
    """
    return dict(get_backend(target).pass_defaults)


PASS_NAMES = ("cleanup", "legalize_norms", "fuse_attention", "check_ops")


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """One entry of a pass list: which pass, with which options, and why it is there (for printing)."""

    name: str
    options: Mapping[str, Any]
    why: str
    #: None for the passes a build stage runs with inputs of its own (:data:`STAGE_PASSES`)
    factory: Callable[..., DiffcPass] | None = dataclasses.field(default=None, repr=False, compare=False)

    def create(self) -> DiffcPass:
        if self.factory is None:
            raise PassOptionError(f"pass {self.name!r} runs in its build stage ({STAGE_PASSES[self.name]}), not in "
                                  "run_passes")
        return self.factory(**self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": _plain(self.options)}

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.name}({opts})"


def _plain(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as JSON-able data (tuples become lists) for reports and manifests."""
    return {k: list(v) if isinstance(v, (tuple, frozenset, set)) else v for k, v in options.items()}


def resolve_options(target: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over ``target``'s defaults, every name and value checked: what :func:`pass_list` runs with.

    Light (no onnx_ir/onnxscript import), so the profile loader can validate a ``[passes]`` table in the
    runtime install. Raises :class:`PassOptionError` naming the field.
    """
    if target not in TARGETS:
        raise PassOptionError(f"unknown pass target {target!r}; use one of {list(TARGETS)} (the profile's backend)")
    base = defaults(target)
    unknown = sorted(set(options) - set(base))
    if unknown:
        raise PassOptionError(f"[passes].{unknown[0]} is not a known pass option; known: {sorted(base)}")
    opts = {**base, **options}
    disable = opts["disable"]
    if isinstance(disable, str) or not all(isinstance(d, str) for d in disable):
        raise PassOptionError(f"[passes].disable must be a list of pass names, got {disable!r}")
    bad = sorted(set(disable) - set(PASS_NAMES))
    if bad:
        raise PassOptionError(f"[passes].disable names unknown pass {bad[0]!r}; passes: {list(PASS_NAMES)}")
    opts["disable"] = tuple(disable)
    if opts["attention"] not in ATTENTION_KINDS:
        raise PassOptionError(f"[passes].attention must be one of {list(ATTENTION_KINDS)}, got {opts['attention']!r}")
    if opts["groupnorm"] not in GROUPNORM_FORMS:
        raise PassOptionError(f"[passes].groupnorm must be one of {list(GROUPNORM_FORMS)}, got {opts['groupnorm']!r}")
    for key in ("layernorm", "gelu", "quick_gelu"):
        if not isinstance(opts[key], bool):
            raise PassOptionError(f"[passes].{key} must be true or false, got {opts[key]!r}")
    if not get_backend(target).contrib_ops:
        if opts["attention"] != "none":
            raise PassOptionError(
                f"[passes].attention = {opts['attention']!r} is not available for {target}: it fuses "
                "MatMul-Softmax-MatMul attention itself and cannot read contrib MultiHeadAttention; use 'none'")
        if opts["quick_gelu"]:
            raise PassOptionError(f"[passes].quick_gelu emits an onnxruntime contrib op; {target} cannot run it")
    return opts




def pass_list(target: str, **options: Any) -> list[PassSpec]:
    """The ordered passes for ``target`` (one of :data:`TARGETS`) with ``options``
    (see the module docstring) applied over the target's defaults. Raises :class:`PassOptionError`."""
    from diffc.passes.check_ops import CheckTargetOpsPass
    from diffc.passes.cleanup import CleanupPass
    from diffc.passes.fuse_attention import FuseAttentionPass
    from diffc.passes.legalize_norms import LegalizeNormsPass

    opts = resolve_options(target, options)

    specs = [
        PassSpec("cleanup", {}, "fold constants and shape arithmetic, drop dead/identity/duplicate nodes",
                 CleanupPass),
        PassSpec("legalize_norms",
                 {"groupnorm": opts["groupnorm"], "layernorm": opts["layernorm"], "gelu": opts["gelu"],
                  "quick_gelu": opts["quick_gelu"],
                  # RMSNorm -> opset-23 RMSNormalization where the target has the kernel (its rmsnorm_op)
                  "rmsnorm": get_backend(target).rmsnorm_op and opts["layernorm"]},
                 "GroupNorm in the target's fastest legal form; LayerNorm/RMSNorm/GELU fused where it has kernels",
                 LegalizeNormsPass),
    ]
    if opts["attention"] != "none":
        specs.append(PassSpec("fuse_attention", {"kind": opts["attention"]},
                              "decomposed attention -> one fused kernel the target runs on CPU", FuseAttentionPass))
    specs.append(PassSpec("check_ops", {"target": target}, "refuse ops the target has no kernel for",
                          CheckTargetOpsPass))
    return [s for s in specs if s.name not in opts["disable"]]


#: passes the build runs at the stage where their inputs exist, after the graph passes of :func:`pass_list`:
#: the cache split turns the UNet into two graphs, quantize needs the ranges calibrated in the fp32 twin's loop
STAGE_PASSES = {"cache_split": "diffc.build.passes.split_cache: the UNet only",
                "quantize": "diffc.build.quantize, after calibration: the quantized components"}


def activation_type(profile: Any, precision: Any) -> str:
    """The Q/DQ encoding of a quantized component's activations under ``profile``: ``fp8``, or the int8
    signedness the target fuses (its backend's ``int8_activations``, the first for ``auto``: uint8 on
    onnxruntime, where x86 VNNI multiplies u8 x s8; int8 elsewhere). See :mod:`diffc.passes.quantize`. Raises
    :class:`~diffc.errors.ProfileError` for an encoding the target does not fuse (uint8 without zero points)."""
    if getattr(precision, "value", precision) == "fp8":
        return "fp8"
    kinds = get_backend(profile.backend).int8_activations
    acts = profile.quantize.activations
    if acts == "auto":
        return kinds[0]
    if acts not in kinds:
        raise ProfileError(f"profile {profile.name!r}: [quantize].activations = {acts!r} needs zero points, which "
                           f"{profile.backend.value} does not support; use {' or '.join(map(repr, kinds))} or 'auto'")
    return acts


def profile_pass_list(profile: Any) -> list[PassSpec]:
    """Every pass a build for ``profile`` (a :class:`~diffc.profiles.Profile`) runs, in order: the graph passes
    of :func:`pass_list` on each component, then, when the profile asks for them, ``cache_split`` and
    ``quantize`` (:data:`STAGE_PASSES`). What ``diffc passes`` prints and ``build_report.json`` records."""
    specs = pass_list(profile.backend.value, **profile.passes)
    if profile.cache.enabled:
        specs.append(PassSpec("cache_split", {"branch": profile.cache.branch},
                              "cut the UNet at the cached feature into a full graph and a shallow one"))
    quantized = profile.quantized_components()
    if quantized:
        specs.append(PassSpec(
            "quantize", {"activations": {c: activation_type(profile, p) for c, p in quantized.items()},
                         "keep_float": tuple(profile.quantize.keep_float),
                         **get_backend(profile.backend).qdq_form},
            "Q/DQ around Conv/MatMul/Gemm with ranges calibrated in the fp32 twin's loop"))
    return specs


def format_pass_list(specs: list[PassSpec]) -> str:
    """A numbered, aligned listing for ``diffc passes --profile P``."""
    if not specs:
        return "(no passes)"
    rows = [(f"{i}.", s.name, ", ".join(f"{k}={v!r}" for k, v in s.options.items()) or "-", s.why)
            for i, s in enumerate(specs, 1)]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    return "\n".join(f"{a:<{widths[0]}} {b:<{widths[1]}}  {c:<{widths[2]}}  # {d}" for a, b, c, d in rows)


def run_passes(model: onnx.ModelProto, component: str, target: str, *, verify: bool = False,
               **options: Any) -> tuple[onnx.ModelProto, dict]:
    """:func:`run_pass_list` on a protobuf model (not modified): returns the new model and the report."""
    import onnx_ir as ir

    ir_model = ir.serde.deserialize_model(model)
    report = run_pass_list(ir_model, component, target, verify=verify, **options)
    return ir.serde.serialize_model(ir_model), report


def run_pass_list(model: Any, component: str, target: str, *, verify: bool = False, **options: Any) -> dict:
    """Run ``pass_list(target, **options)`` over the ``onnx_ir`` model ``model``, in place, and return a report.

    Report: ``{"component", "target", "options", "passes": [{"name", "fired", "modified", "seconds"[, "found"]
    [, "left"]}, ...],
    "op_counts_before", "op_counts_after"}``. With ``verify=True`` the onnx checker (full check) and shape
    inference run after every pass; a failure raises :class:`PassError` naming the pass.
    """
    import onnx_ir as ir

    from diffc.errors import DiffcError
    from diffc.passes._base import VerifyPass, op_counts

    specs = pass_list(target, **options)
    if not isinstance(component, str) or not component:
        raise PassOptionError(f"component must be a non-empty name such as 'unet', got {component!r}")
    report: dict[str, Any] = {
        "component": component,
        "target": target,
        "options": _plain(resolve_options(target, options)),
        "passes": [],
        "op_counts_before": op_counts(model),
    }
    instances = [spec.create() for spec in specs]
    # One IR model through onnx_ir's PassManager, once (steps=1): each pass iterates to its own fixed point
    # (cleanup's folding loop, apply_rules' rounds), and a second sweep of the list over an SD UNet would cost
    # as much as the first to find nothing (the pass tests check that a second run is not modified).
    chain: list[ir.passes.PassBase] = [VerifyPass(after="input")] if verify else []
    for spec, instance in zip(specs, instances):
        chain += [instance, VerifyPass(after=spec.name)] if verify else [instance]
    if chain:
        try:
            ir.passes.PassManager(chain, steps=1)(model)  # in-place passes: the result is ``model`` itself
        except ir.passes.PassError as e:  # the manager wraps what a pass raised: diffc's typed error goes on
            cause = e.__cause__
            while cause is not None and not isinstance(cause, DiffcError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from None
    for spec, instance in zip(specs, instances):
        report["passes"].append(pass_entry(spec.name, instance))
        log.info("%s: %s %s in %.2f s", component, spec.name,
                 {k: v for k, v in instance.fired.items() if v} or "nothing", instance.seconds)
    report["op_counts_after"] = op_counts(model)
    return report


def pass_entry(name: str, instance: DiffcPass) -> dict[str, Any]:
    """A pass's record in ``build_report.json`` after it ran: its rewrite counts, ``modified`` (some count > 0),
    wall time, and what a checking pass saw (``found``) or a fusion pass left undone and why (``left``). The
    build's stage passes (``cache_split``, ``quantize``) are recorded the same way."""
    return {"name": name, "fired": dict(instance.fired), "modified": any(v > 0 for v in instance.fired.values()),
            "seconds": round(instance.seconds, 4),
            **({"found": dict(instance.found)} if instance.found else {}),
            **({"left": dict(instance.left)} if getattr(instance, "left", None) else {})}
