"""Norm legalization and fusion: GroupNorm in the form the target runs fastest, LayerNorm, RMSNorm and GELU fused.

Why: the two torch exporters write the UNet's 61 GroupNorms differently -- the legacy exporter as
``Reshape -> InstanceNormalization -> Reshape -> Mul -> Add``, the dynamo exporter as opset-21
``GroupNormalization`` -- and the backends disagree on which is fast:

* onnxruntime CPU (1.31): the InstanceNormalization form is 1.4-2.9x *faster* than its
  ``GroupNormalization``-21 kernel at SD-1.5 shapes (measured on this machine, batch 2, 32 groups:
  (320, 64x64) 6.1 vs 8.6 ms, (640, 32x32) 1.0 vs 2.0 ms, (1280, 8x8) 0.15 vs 0.43 ms). So for CPU,
  ``groupnorm="instance_norm"`` rewrites GroupNormalization into that form. Never contrib ``GroupNorm`` /
  ``SkipGroupNorm``: onnxruntime implements those for CUDA only.
* TensorRT parses ``GroupNormalization`` into its native normalization layer; the InstanceNorm form goes
  through a plugin. ``groupnorm="group_normalization"`` rewrites the decomposed form into opset-21
  ``GroupNormalization`` (per-channel scale/bias -- opset 18's per-group semantics differ, so a model that
  imports an older opset is left alone).

LayerNorm: both exporters emit ``LayerNormalization`` at opset >= 17, but graphs exported at lower opsets
(or hand-written ones) carry the ReduceMean/Sub/Pow/Sqrt/Div chain; ``layernorm=True`` fuses it.
RMSNorm (the transformers' QK norm, Sana's caption norm): diffc's ``rms_norm`` symbolic writes
``x / sqrt(mean(x^2) + eps) * w``, diffusers' ``RMSNorm`` ``x * (1 / sqrt(...)) * w``; ``rmsnorm=True``
(onnxruntime only) fuses both into opset-23 ``RMSNormalization``. Measured on onnxruntime 1.32's CPU provider
(2 loaded cores, median of 25, FLUX's QK norm shapes): (1, 4608, 24, 128) decomposed 325 ms, fused
RMSNormalization 128 ms, contrib-style SimplifiedLayerNormalization 108 ms; (2, 1024, 24, 128) 123 / 37 / 42
ms -- the fused kernels tie, both ~3x the decomposed chain. onnxruntime's EXTENDED optimizer (the level the
engine is built at) fuses either decomposed form into SimplifiedLayerNormalization itself, so the pass makes the
artifact's graph the same at every level rather than faster; RMSNormalization because the onnx checker knows it
(SimplifiedLayerNormalization is registered in the ONNX domain by onnxruntime only). OpenVINO's CPU plugin fuses
the decomposed chain into its RMS kernel, and TensorRT its own, so those targets keep it.

GELU: the erf formula -> opset-20 ``Gelu`` (``gelu=True``; both backends have kernels), and for onnxruntime
``x * sigmoid(a * x)`` (CLIP's quick_gelu, a=1.702; SiLU, a=1) -> contrib ``QuickGelu``, which its CPU
provider implements (``quick_gelu=True``). onnxruntime would fuse QuickGelu itself at session start; doing
it here makes the artifact's graph the same whatever optimization level the runtime uses.
"""

from __future__ import annotations

import collections
import logging
import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from diffc.passes import GROUPNORM_FORMS
from diffc.passes._base import MS_DOMAIN, DiffcPass, PassOptionError, apply_rules, const_ints, const_scalar, onnx_opset
from diffc.passes.fuse_attention import shape_entries

log = logging.getLogger("diffc.passes.legalize_norms")


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _close(value: float | None, target: float, rel: float = 1e-3) -> bool:
    return value is not None and math.isclose(value, target, rel_tol=rel)


# ------------------------------------------------------------------------------------------ GroupNorm


class _GroupNormToInstanceNorm(pattern.RewriteRuleClassBase):
    """GroupNormalization(x, scale, bias) -> Reshape(x, [0, G, -1]) -> InstanceNormalization -> Reshape(x's
    shape) -> Mul(scale[C,1,1]) -> Add(bias[C,1,1]): the form onnxruntime's CPU provider runs fastest."""

    def __init__(self, opset: int) -> None:
        super().__init__(name="group_norm_to_instance_norm")
        self.opset = opset

    def pattern(self, op, x, scale, bias):
        return op.GroupNormalization(x, scale, bias, _outputs=["y"])

    def check(self, context, x, scale, bias, y, **_):
        result = pattern.MatchResult()
        node = y.producer()
        groups = node.attributes.get_int("num_groups", 0)
        if x.shape is None or len(x.shape) < 3 or not isinstance(x.shape[1], int):
            return result.fail("input rank or channel count is unknown")
        channels = x.shape[1]
        if groups <= 0 or channels % groups:
            return result.fail(f"{channels} channels are not divisible into {groups} groups")
        s, b = _const_array(scale), _const_array(bias)
        if s is None or b is None:
            return result.fail("scale/bias are not constants")
        if self.opset < 21:  # opset 18-20: scale/bias are per group
            s, b = np.repeat(s.reshape(-1), channels // groups), np.repeat(b.reshape(-1), channels // groups)
        if s.size != channels or b.size != channels:
            return result.fail(f"scale/bias have {s.size}/{b.size} entries for {channels} channels")
        bshape = (channels,) + (1,) * (len(x.shape) - 2)
        self._groups, self._eps = groups, node.attributes.get_float("epsilon", 1e-5)
        self._scale, self._bias = s.reshape(bshape).astype(s.dtype), b.reshape(bshape).astype(b.dtype)
        return result

    def rewrite(self, op, x, **_):
        dtype = self._scale.dtype
        grouped = op.Reshape(x, op.Constant(value=ir.tensor(np.array([0, self._groups, -1], np.int64))))
        normed = op.InstanceNormalization(grouped, op.Constant(value=ir.tensor(np.ones(self._groups, dtype))),
                                          op.Constant(value=ir.tensor(np.zeros(self._groups, dtype))),
                                          epsilon=self._eps)
        back = op.Reshape(normed, op.Shape(x))
        return op.Add(op.Mul(back, op.Constant(value=ir.tensor(self._scale))),
                      op.Constant(value=ir.tensor(self._bias)))


class _InstanceNormToGroupNorm(pattern.RewriteRuleClassBase):
    """Reshape(x, [B, G, -1]) -> InstanceNormalization(ones, zeros) -> Reshape(shape of x) -> Mul -> Add
    -> GroupNormalization-21 (what TensorRT maps to its normalization layer)."""

    def __init__(self) -> None:
        super().__init__(name="instance_norm_to_group_norm")

    def pattern(self, op, x, s1, s2, ones, zeros, gamma, beta):
        grouped = op.Reshape(x, s1)
        normed = op.InstanceNormalization(grouped, ones, zeros, _outputs=["normed"])
        back = op.Reshape(normed, s2)
        return op.Add(op.Mul(back, gamma), beta)

    def check(self, context, x, s1, s2, ones, zeros, gamma, beta, normed, **_):
        result = pattern.MatchResult()
        if x.shape is None or len(x.shape) < 3 or not isinstance(x.shape[1], int):
            return result.fail("input rank or channel count is unknown")
        channels, rank = x.shape[1], len(x.shape)
        o, z = _const_array(ones), _const_array(zeros)
        if o is None or z is None or o.ndim != 1 or not np.all(o == 1) or not np.all(z == 0):
            return result.fail("InstanceNormalization scale/bias are not ones/zeros")
        groups = o.size
        entries = shape_entries(s1)
        if entries is None or len(entries) != 3 or entries[1] != groups or entries[2] != -1:
            return result.fail(f"grouping Reshape is not [B, {groups}, -1]: {entries}")
        if entries[0] is not None and entries[0] not in (0, -1) and entries[0] != x.shape[0]:
            return result.fail("grouping Reshape does not keep the batch axis")
        back_src = s2.producer()
        static = list(x.shape)
        if not ((back_src is not None and back_src.op_type == "Shape" and back_src.inputs[0] is x
                 and not back_src.attributes) or
                (all(isinstance(d, int) for d in static) and const_ints(s2) == static)):
            return result.fail("the reshape back is not to the input's own shape")
        if channels % groups:
            return result.fail(f"{channels} channels are not divisible into {groups} groups")
        g, b = _const_array(gamma), _const_array(beta)
        want = (channels,) + (1,) * (rank - 2)
        for arr, what in ((g, "scale"), (b, "bias")):
            if arr is None or arr.size != channels or tuple(arr.shape[-(rank - 1):]) != want:
                return result.fail(f"{what} is not a per-channel constant of shape {want}")
        self._groups = groups
        self._eps = normed.producer().attributes.get_float("epsilon", 1e-5)
        self._gamma, self._beta = g.reshape(-1), b.reshape(-1)
        return result

    def rewrite(self, op, x, **_):
        return op.GroupNormalization(x, op.Constant(value=ir.tensor(self._gamma)),
                                     op.Constant(value=ir.tensor(self._beta)), num_groups=self._groups,
                                     epsilon=self._eps)


# ------------------------------------------------------------------------------------------ LayerNorm


class _LayerNormFusion(pattern.RewriteRuleClassBase):
    """(x - mean) / sqrt(var + eps) * gamma [+ beta] over the last axis -> LayerNormalization."""

    def __init__(self, with_bias: bool) -> None:
        super().__init__(name="layer_norm" + ("_bias" if with_bias else ""))
        self.with_bias = with_bias

    def pattern(self, op, x, eps, gamma, beta, two):
        mean = op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"])
        d = op.Sub(x, mean)
        sq = pattern.OrValue([op.Pow(d, two), op.Mul(d, d)], tag_var="square", tag_values=["Pow", "Mul"])
        var = op.ReduceMean(sq, _allow_other_inputs=True, _outputs=["var"])
        std = op.Sqrt(op.Add(var, eps))
        normed = pattern.OrValue([op.Div(d, std), op.Mul(d, op.Reciprocal(std))])
        y = op.Mul(normed, gamma)
        return op.Add(y, beta) if self.with_bias else y

    def check(self, context, x, eps, gamma, mean, var, square, two=None, beta=None, **_):
        result = pattern.MatchResult()
        if x.shape is None:
            return result.fail("input rank unknown")
        rank = len(x.shape)
        for reduce in (mean, var):
            node = reduce.producer()
            axes = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
            if axes is None:
                axes = list(node.attributes.get_ints("axes", []) or [])
            if [a % rank for a in axes] != [rank - 1] or node.attributes.get_int("keepdims", 1) != 1:
                return result.fail(f"ReduceMean over axes {axes}, not the last axis with keepdims")
        if square == "Pow" and not _close(const_scalar(two), 2.0, 1e-6):
            return result.fail("Pow exponent is not 2")
        e = const_scalar(eps)
        if e is None:
            return result.fail("epsilon is not a constant")
        width = x.shape[-1]
        for value, what in ((gamma, "scale"), (beta, "bias")):
            if value is None:
                continue
            if value.shape is None or list(value.shape) != [width]:
                return result.fail(f"{what} is not a 1-D vector over the normalized axis")
        self._eps = e
        return result

    def rewrite(self, op, x, gamma, beta=None, **_):
        inputs = [x, gamma] + ([beta] if beta is not None else [])
        return op.LayerNormalization(*inputs, axis=-1, epsilon=self._eps)


class _LayerNormBias(pattern.RewriteRuleClassBase):
    """LayerNormalization(x, scale) + bias -> LayerNormalization(x, scale, bias)."""

    def __init__(self) -> None:
        super().__init__(name="layer_norm_add_bias")

    def pattern(self, op, x, scale, bias):
        return op.Add(op.LayerNormalization(x, scale, _outputs=["normed"]), bias)

    def check(self, context, x, bias, normed, **_):
        result = pattern.MatchResult()
        node = normed.producer()
        axis = node.attributes.get_int("axis", -1)
        if x.shape is None or axis % len(x.shape) != len(x.shape) - 1:
            return result.fail("LayerNormalization is not over the last axis")
        if bias.shape is None or list(bias.shape) != [x.shape[-1]]:
            return result.fail("the added bias is not a vector over the normalized axis")
        return result

    def rewrite(self, op, x, scale, bias, normed, **_):
        return op.LayerNormalization(x, scale, bias, **normed.producer().attributes)


# ------------------------------------------------------------------------------------------ RMSNorm


class _RMSNormFusion(pattern.RewriteRuleClassBase):
    """x / sqrt(mean(x^2) + eps) [* w] over the last axis (diffc's ``rms_norm`` symbolic: FLUX's QK norm), and
    x * (1 / sqrt(...)) / x * Reciprocal(sqrt(...)) (diffusers' ``RMSNorm``: SD3.5's QK norm, Sana's caption
    norm) -> opset-23 ``RMSNormalization`` (fp32 accumulation, ``stash_type=1``, as the exported graph computes).

    Not onnxruntime's ``SimplifiedLayerNormalization``: onnxruntime registers it in the ONNX domain though ONNX
    does not define it, so the onnx checker refuses the graph (``--verify-passes``), and it measured no faster
    than onnxruntime's RMSNormalization kernel (see the module docstring)."""

    FORMS = ("Div", "Reciprocal", "OneDiv")

    def __init__(self, form: str, with_weight: bool) -> None:
        super().__init__(name=f"rms_norm_{form}" + ("_weight" if with_weight else ""))
        self.form, self.with_weight = form, with_weight

    def pattern(self, op, x, two, eps, one, gamma):
        sq = pattern.OrValue([op.Pow(x, two), op.Mul(x, x)], tag_var="square", tag_values=["Pow", "Mul"])
        var = op.ReduceMean(sq, _allow_other_inputs=True, _outputs=["var"])
        std = op.Sqrt(op.Add(var, eps))
        # (one rule per form: onnxscript cannot return an OrValue from a pattern, as the scale-less rules would)
        normed = (op.Div(x, std) if self.form == "Div" else op.Mul(x, op.Reciprocal(std))
                  if self.form == "Reciprocal" else op.Mul(x, op.Div(one, std)))
        return op.Mul(normed, gamma) if self.with_weight else normed

    def check(self, context, x, eps, var, square, two=None, one=None, gamma=None, **_):
        result = pattern.MatchResult()
        if x.shape is None or not isinstance(x.shape[-1], int):
            return result.fail("input rank or normalized width unknown")
        if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            return result.fail("not a float / float16 tensor")
        rank, width = len(x.shape), x.shape[-1]
        node = var.producer()
        axes = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if axes is None:
            axes = list(node.attributes.get_ints("axes", []) or [])
        if [a % rank for a in axes] != [rank - 1] or node.attributes.get_int("keepdims", 1) != 1:
            return result.fail(f"ReduceMean over axes {axes}, not the last axis with keepdims")
        if square == "Pow" and const_scalar(two) != 2.0:
            return result.fail("Pow exponent is not 2")
        if self.form == "OneDiv" and const_scalar(one) != 1.0:
            return result.fail("the reciprocal's numerator is not 1")
        e = const_scalar(eps)
        if e is None or e < 0:
            return result.fail("epsilon is not a non-negative constant")
        w = None
        if self.with_weight:
            w = _const_array(gamma)
            # a weight that broadcasts x to a larger rank or over other axes is not the norm's scale
            if w is None or w.size != width or w.ndim > rank or (w.ndim and w.shape[-1] != width):
                return result.fail("the scale is not a constant vector over the normalized axis")
            w = w.reshape(width).astype(ir.DataType(x.dtype).numpy())
        self._eps, self._weight = e, w
        self._width, self._dtype = width, ir.DataType(x.dtype).numpy()
        return result

    def rewrite(self, op, x, **_):
        weight = self._weight if self._weight is not None else np.ones(self._width, self._dtype)
        return op.RMSNormalization(x, op.Constant(value=ir.tensor(weight)), axis=-1, epsilon=float(self._eps),
                                   stash_type=1)


# ------------------------------------------------------------------------------------------ GELU


class _ErfGelu(pattern.RewriteRuleClassBase):
    """0.5 * x * (1 + erf(x / sqrt(2))) in the groupings exporters write -> Gelu (opset 20)."""

    def __init__(self, grouping: int, use_contrib: bool) -> None:
        super().__init__(name=f"erf_gelu_{grouping}")
        self.grouping = grouping
        self.use_contrib = use_contrib

    def pattern(self, op, x, c_sqrt2, one, half):
        scaled = pattern.OrValue([op.Div(x, c_sqrt2), op.Mul(x, c_sqrt2)], tag_var="div_or_mul",
                                 tag_values=["Div", "Mul"])
        cdf2 = op.Add(op.Erf(scaled), one)
        if self.grouping == 0:
            return op.Mul(op.Mul(x, half), cdf2)
        if self.grouping == 1:
            return op.Mul(op.Mul(x, cdf2), half)
        return op.Mul(x, op.Mul(cdf2, half))

    def check(self, context, c_sqrt2, one, half, div_or_mul, **_):
        result = pattern.MatchResult()
        c = const_scalar(c_sqrt2)
        if not _close(c, math.sqrt(2.0) if div_or_mul == "Div" else 1 / math.sqrt(2.0)):
            return result.fail(f"erf argument scale {c} is not 1/sqrt(2)")
        if not _close(const_scalar(one), 1.0, 1e-6) or not _close(const_scalar(half), 0.5, 1e-6):
            return result.fail("constants are not 1 and 0.5")
        return result

    def rewrite(self, op, x, **_):
        if self.use_contrib:
            return op.Gelu(x, _domain=MS_DOMAIN)
        return op.Gelu(x)


class _QuickGelu(pattern.RewriteRuleClassBase):
    """x * sigmoid(a * x) (quick_gelu, a=1.702) and x * sigmoid(x) (SiLU) -> contrib QuickGelu(alpha=a)."""

    def __init__(self, scaled: bool) -> None:
        super().__init__(name="quick_gelu" if scaled else "silu")
        self.scaled = scaled

    def pattern(self, op, x, alpha):
        inner = op.Mul(x, alpha) if self.scaled else x
        return op.Mul(x, op.Sigmoid(inner))

    def check(self, context, x, alpha=None, **_):
        result = pattern.MatchResult()
        if x.dtype not in (None, ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            return result.fail("not a float tensor")
        a = 1.0 if not self.scaled else const_scalar(alpha)
        if a is None:
            return result.fail("sigmoid scale is not a constant scalar")
        self._alpha = a
        return result

    def rewrite(self, op, x, **_):
        return op.QuickGelu(x, alpha=float(self._alpha), _domain=MS_DOMAIN)


class LegalizeNormsPass(DiffcPass):
    """GroupNorm into the target's fast form; LayerNorm and GELU fusions where the target has kernels.

    Fire counts: ``group_norm_to_instance_norm``, ``instance_norm_to_group_norm``, ``layer_norm``, ``rms_norm``,
    ``gelu``, ``quick_gelu``, ``silu``. ``rmsnorm``: fuse RMSNorm into opset-23 ``RMSNormalization`` (raising an
    opset-21/22 model to 23; onnxruntime only: :func:`diffc.passes.pass_list` turns it on for that target when
    ``layernorm`` is on).
    """

    name = "legalize_norms"

    def __init__(self, *, groupnorm: str = "instance_norm", layernorm: bool = True, gelu: bool = True,
                 quick_gelu: bool = False, rmsnorm: bool = False) -> None:
        super().__init__()
        if groupnorm not in GROUPNORM_FORMS:
            raise PassOptionError(f"[passes].groupnorm must be one of {list(GROUPNORM_FORMS)}, got {groupnorm!r}")
        for key, value in (("layernorm", layernorm), ("gelu", gelu), ("quick_gelu", quick_gelu),
                           ("rmsnorm", rmsnorm)):
            if not isinstance(value, bool):
                raise PassOptionError(f"[passes].{key} must be true or false, got {value!r}")
        self.groupnorm, self.layernorm, self.gelu, self.quick_gelu = groupnorm, layernorm, gelu, quick_gelu
        self.rmsnorm = rmsnorm

    def run(self, model: ir.Model) -> dict[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        opset = onnx_opset(model)
        if self.groupnorm == "instance_norm":
            counts["group_norm_to_instance_norm"] = apply_rules(model, [_GroupNormToInstanceNorm.rule(opset)])
        elif self.groupnorm == "group_normalization":
            if opset >= 21:
                counts["instance_norm_to_group_norm"] = apply_rules(model, [_InstanceNormToGroupNorm.rule()])
            else:
                log.info("legalize_norms: opset %d < 21, GroupNormalization has per-group scale there; "
                         "leaving the InstanceNormalization form", opset)
        if self.layernorm:
            if opset >= 17:
                counts["layer_norm"] = apply_rules(
                    model, [_LayerNormFusion.rule(True), _LayerNormFusion.rule(False)], commute=True)
                # the bias-less rule matches first at the Mul; fold the Add that follows into it
                apply_rules(model, [_LayerNormBias.rule()], commute=True)
            else:
                log.info("legalize_norms: opset %d < 17 has no LayerNormalization", opset)
        if self.rmsnorm and opset >= 21:
            # with the scale first: the scale-less rule would otherwise match at the Div and leave the Mul
            for with_weight in (True, False):
                counts["rms_norm"] += apply_rules(
                    model, [_RMSNormFusion.rule(f, with_weight) for f in _RMSNormFusion.FORMS], commute=True)
            if counts["rms_norm"] and opset < 23:
                # 21 -> 23 only added types to the ops the exporters write (as for fuse_attention's attention23)
                model.opset_imports[""] = 23
                model.opset_imports.pop("ai.onnx", None)
        elif self.rmsnorm:
            log.info("legalize_norms: opset %d < 21 (GroupNormalization's meaning changes on the way to 23); "
                     "leaving RMSNorm decomposed", opset)
        if self.gelu:
            contrib = opset < 20
            counts["gelu"] = apply_rules(model, [_ErfGelu.rule(g, contrib) for g in range(3)], commute=True)
            if contrib and counts["gelu"]:
                model.opset_imports.setdefault(MS_DOMAIN, 1)
        if self.quick_gelu:
            counts["quick_gelu"] = apply_rules(model, [_QuickGelu.rule(True)], commute=True)
            counts["silu"] = apply_rules(model, [_QuickGelu.rule(False)], commute=True)
            if counts["quick_gelu"] or counts["silu"]:
                model.opset_imports.setdefault(MS_DOMAIN, 1)
        keys = ("group_norm_to_instance_norm", "instance_norm_to_group_norm", "layer_norm", "rms_norm", "gelu",
                "quick_gelu", "silu")
        return {k: counts[k] for k in keys}
