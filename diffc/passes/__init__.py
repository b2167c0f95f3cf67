"""Graph passes: pure ONNX graph -> ONNX graph transformations, one per module, run in an explicit order.

The passes are what makes diffc a compiler rather than an exporter: they turn what a torch exporter writes
into what the target backend runs fast, and refuse graphs the target cannot run at all.

=================  ==========================================================================================
``cleanup``        constant folding, shape simplification, dead / identity / duplicate node elimination
``legalize_norms`` GroupNorm into the target's fast form; LayerNorm and GELU fusions where it has kernels
``fuse_attention`` decomposed attention -> ``MultiHeadAttention`` / opset-23 ``Attention`` (onnxruntime only)
``check_ops``      refuse ops the target cannot run (CUDA-only contrib ops on CPU, any contrib op elsewhere)
=================  ==========================================================================================

Usage::

    specs = pass_list("onnxruntime", attention="mha")
    print(format_pass_list(specs))
    model, report = run_passes(model_proto, "unet", "onnxruntime", verify=True)

Options are plain keywords (a profile's ``[passes]`` table maps onto them one to one):

``attention``   ``"mha"`` | ``"attention23"`` | ``"none"`` (onnxruntime default ``"mha"``: measured faster than
                opset-23 Attention on the CPU provider at SD-1.5 shapes; TensorRT and OpenVINO: only ``"none"``)
``groupnorm``   ``"instance_norm"`` | ``"group_normalization"`` | ``"keep"`` (onnxruntime default
                ``"instance_norm"``: measured faster than its GroupNormalization-21 kernel; TensorRT default
                ``"group_normalization"``)
``layernorm``   fuse decomposed LayerNorm (default true)
``gelu``        fuse the erf GELU formula into ``Gelu`` (default true on onnxruntime, false on TensorRT)
``quick_gelu``  ``x*sigmoid(a*x)`` -> contrib ``QuickGelu`` (onnxruntime only; default true there)
``disable``     names of passes to leave out, e.g. ``["fuse_attention"]``
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

from diffc.passes._errors import PassError, PassOptionError

if TYPE_CHECKING:  # onnx_ir / onnxscript load only when passes are built or run
    import onnx

    from diffc.passes._base import DiffcPass

__all__ = ["PassSpec", "PassError", "PassOptionError", "TARGETS", "ATTENTION_KINDS", "GROUPNORM_FORMS",
           "QUANTIZE_ROLES", "pass_list",
           "format_pass_list", "resolve_options", "run_passes"]

log = logging.getLogger("diffc.passes")

TARGETS = ("onnxruntime", "tensorrt", "tensorrt_rtx", "openvino")
#: values of the ``attention`` option (fuse_attention's ``kind``)
ATTENTION_KINDS = ("mha", "attention23", "none")
#: layer roles the quantize pass can leave in float (``[quantize].keep_float``); see diffc.passes.quantize
QUANTIZE_ROLES = ("conv_in", "conv_out", "time_embedding", "skip_concat", "output_block", "text_projection", "layer",
                  "attention_softmax")
#: values of the ``groupnorm`` option (legalize_norms)
GROUPNORM_FORMS = ("instance_norm", "group_normalization", "keep")

#: per-target defaults of every option; the keys are the whole option vocabulary
DEFAULTS: dict[str, dict[str, Any]] = {
    "onnxruntime": {"attention": "mha", "groupnorm": "instance_norm", "layernorm": True, "gelu": True,
                    "quick_gelu": True, "disable": ()},
    "tensorrt": {"attention": "none", "groupnorm": "group_normalization", "layernorm": True, "gelu": False,
                 "quick_gelu": False, "disable": ()},
}
DEFAULTS["tensorrt_rtx"] = dict(DEFAULTS["tensorrt"])
#: OpenVINO fuses MatMul-Softmax-MatMul attention itself (its CPU plugin's scaled-dot-product subgraph) and runs
#: the InstanceNormalization form of GroupNorm as one MVN; it knows no onnxruntime contrib ops
DEFAULTS["openvino"] = {"attention": "none", "groupnorm": "instance_norm", "layernorm": True, "gelu": True,
                        "quick_gelu": False, "disable": ()}

PASS_NAMES = ("cleanup", "legalize_norms", "fuse_attention", "check_ops")


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """One entry of a pass list: which pass, with which options, and why it is there (for printing)."""

    name: str
    options: Mapping[str, Any]
    why: str
    factory: Callable[..., DiffcPass] = dataclasses.field(repr=False, compare=False)

    def create(self) -> DiffcPass:
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
    defaults = DEFAULTS[target]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise PassOptionError(f"[passes].{unknown[0]} is not a known pass option; known: {sorted(defaults)}")
    opts = {**defaults, **options}
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
    if target != "onnxruntime":
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
                  "quick_gelu": opts["quick_gelu"]},
                 "GroupNorm in the target's fastest legal form; LayerNorm/GELU fused where it has kernels",
                 LegalizeNormsPass),
    ]
    if opts["attention"] != "none":
        specs.append(PassSpec("fuse_attention", {"kind": opts["attention"]},
                              "decomposed attention -> one fused kernel the target runs on CPU", FuseAttentionPass))
    specs.append(PassSpec("check_ops", {"target": target}, "refuse ops the target has no kernel for",
                          CheckTargetOpsPass))
    return [s for s in specs if s.name not in opts["disable"]]


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
    """Run ``pass_list(target, **options)`` over ``model`` (not modified) and return the new model and a report.

    Report: ``{"component", "target", "options", "passes": [{"name", "fired", "modified", "seconds"}, ...],
    "op_counts_before", "op_counts_after"}``. With ``verify=True`` the onnx checker (full check) and shape
    inference run after every pass; a failure raises :class:`PassError` naming the pass.
    """
    import onnx_ir as ir

    from diffc.passes._base import op_counts
    from diffc.passes._base import verify as verify_model

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
    ir_model = ir.serde.deserialize_model(model)
    if verify:
        verify_model(ir_model, after="input")
    for spec in specs:
        instance = spec.create()
        t0 = time.perf_counter()
        result = instance(ir_model)
        seconds = time.perf_counter() - t0
        ir_model = result.model
        if verify:
            verify_model(ir_model, after=spec.name)
        report["passes"].append({"name": spec.name, "fired": dict(instance.fired), "modified": bool(result.modified),
                                 "seconds": round(seconds, 4)})
        log.info("%s: %s %s in %.2f s", component, spec.name,
                 {k: v for k, v in instance.fired.items() if v} or "nothing", seconds)
    out = ir.serde.serialize_model(ir_model)
    report["op_counts_after"] = op_counts(out)
    return out, report
