"""Attention fusion: the exporters' decomposed attention -> one fused attention op the target runs fast.

Why: both torch exporters write scaled-dot-product attention as ~10 nodes (Reshape/Transpose per head split,
two MatMuls, Softmax, the inverse Transpose/Reshape). On onnxruntime's CPU provider that materialises the full
``(batch, heads, S, S)`` score tensor and runs every step as a separate kernel; at SD-1.5's 64x64 latents the
first UNet level has S=4096 and the decomposed form spends about twice as long in attention as contrib
``com.microsoft.MultiHeadAttention`` (measured on this machine: 1060 ms vs 529 ms for one batch-2 self-attention;
opset-23 ``Attention``: 724 ms). onnxruntime's own transformer optimizer only recognises the legacy exporter's
layout and by default emits packed-QKV / CUDA-only variants; this pass matches what *both* exporters write
and emits only ops onnxruntime's CPU provider implements:

* ``kind="mha"`` (default for onnxruntime): ``MultiHeadAttention(q, k, v)`` with separate Q/K/V in
  ``(batch, seq, hidden)`` layout, ``num_heads`` and ``scale`` attributes. A causal mask (CLIP) becomes
  ``unidirectional=1``; any other additive mask is passed as ``attention_bias``.
* ``kind="attention23"``: ONNX opset-23 ``Attention`` (3-D inputs, ``q_num_heads``/``kv_num_heads``,
  ``is_causal``); the model's ONNX opset import is raised to 23 (21 -> 23 only added types to the ops the
  exporters use).

TensorRT targets do not run this pass: TensorRT's builder fuses MatMul-Softmax-MatMul itself, and a
contrib op would make the graph unparseable for it.

Matched form (every variant either exporter writes)::

    q4 = Transpose(Reshape(q3, [B, S, H, D]), [0,2,1,3])             (optionally * or / a scalar)
    kT = Transpose(Reshape(k3, [B, L, H, D]), [0,2,3,1])             legacy
       | Reshape(Transpose(Reshape(Transpose(k4,[0,2,1,3]),[BH,L,D]),[0,2,1]),[B,H,D,L])   dynamo
       | Transpose(Transpose(k4, [0,2,1,3]), [0,1,3,2])              (optionally scaled)
    p  = Softmax(q4 @ kT [* scale] [+ mask], axis=-1) [-> Where(IsNaN(p), 0, p)]
    out = Reshape(Transpose(p @ Transpose(Reshape(v3, [B, L, H, Dv]), [0,2,1,3]), [0,2,1,3]), [B, S, H*Dv])

The head count and size are read from the constant parts of the Reshape shapes (the clean-up pass makes them
constant), and the softmax scale from the constant scalars; a match fails with a reason otherwise.

The transformer denoisers (FLUX, SD3.5, PixArt-Sigma, Sana) work on the heads *after* the head split: QK
RMSNorm (SD3.5, FLUX), RoPE (FLUX), and the concatenation of text and image tokens of joint attention (SD3's
and FLUX's double blocks; the single blocks attend over an already joined sequence). The fused op must take
Q and K after all of that, so a second rule matches the attention core on *computed* 4-D tensors --
``Transpose(Softmax(q @ kT) @ v, [0, 2, 1, 3])`` with q / v in (B, H, S, D) and kT from (B, H, L, D) or
(B, L, H, D) -- and feeds the fused op ``Reshape(q_bshd, [0, 0, H*D])`` views (see
:class:`_HeadLayoutAttentionRule`). PixArt's and Sana's cross-attention carries the T5 / Gemma key-padding
mask as an additive (B, H, 1, L) bias, expanded to what the kernels take (:func:`_bias_input`). Sana's
self-attention is linear attention (ReLU feature maps, no Softmax): not attention this pass fuses, and left
exactly as exported. OpenVINO fuses MatMul-Softmax-MatMul into its own MHA kernels and TensorRT-RTX into its
attention layers, so their targets keep the decomposed form (``attention = "none"``).

Reported: ``fired`` per attention class, ``found`` (how many fused attentions had QK norm / RoPE before
them, how many Softmax nodes were left) and ``left`` (each unfused Softmax and why).
"""

from __future__ import annotations

import collections
import logging
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.rewriter import pattern

from diffc.passes import ATTENTION_KINDS
from diffc.passes._base import MS_DOMAIN, DiffcPass, PassOptionError, apply_rules, const_scalar, onnx_opset

log = logging.getLogger("diffc.passes.fuse_attention")

#: additive mask values at or below this count as "masked out" when recognising a causal mask
_MASKED = -1.0e4
#: largest mask subgraph the causal probe evaluates (CLIP's is ~15 nodes)
_PROBE_MAX_NODES = 256


# ------------------------------------------------------------------------------------------ shape reading


def shape_entries(value: ir.Value | None) -> list[int | None] | None:
    """The entries of a 1-D shape tensor: ints where constant, None where computed at run time.

    Reads a constant, or a ``Concat`` of constants and run-time pieces of known length (both exporters build
    Reshape shapes as ``Concat(batch, seq, [heads], [head_size])``). None if even the length is unknown.
    """
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return [int(v) for v in tensor.numpy().reshape(-1)]
    node = value.producer()
    if node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
        return None
    out: list[int | None] = []
    for part in node.inputs:
        if part is None:
            return None
        t = ir.convenience.get_const_tensor(part)
        if t is not None:
            out.extend(int(v) for v in t.numpy().reshape(-1))
        elif part.shape is not None and len(part.shape) == 1 and isinstance(part.shape[0], int):
            out.extend([None] * part.shape[0])
        else:
            return None
    return out


def shape_parts(value: ir.Value | None) -> list[int | ir.Value] | None:
    """Like :func:`shape_entries`, but a run-time entry is the one-element value that computes it."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return [int(v) for v in tensor.numpy().reshape(-1)]
    node = value.producer()
    if node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
        return None
    out: list[int | ir.Value] = []
    for part in node.inputs:
        t = ir.convenience.get_const_tensor(part) if part is not None else None
        if t is not None:
            out.extend(int(v) for v in t.numpy().reshape(-1))
        elif part is not None and part.shape is not None and list(part.shape) == [1]:
            out.append(part)
        else:
            return None
    return out


def dim_ref(value: ir.Value) -> tuple[ir.Value, int] | None:
    """``(x, axis)`` if ``value`` is ``x.shape[axis]`` read by Shape/Gather/Slice/Unsqueeze/Cast, else None."""
    node = value.producer()
    while node is not None and node.op_type in ("Unsqueeze", "Cast", "Squeeze"):
        value = node.inputs[0]
        node = value.producer()
    if node is None:
        return None
    if node.op_type == "Shape":
        x = node.inputs[0]
        start = node.attributes.get_int("start", 0)
        if x is None or x.shape is None:
            return None
        return x, start % len(x.shape)
    if node.op_type not in ("Gather", "Slice"):
        return None
    src = node.inputs[0].producer() if node.inputs[0] is not None else None
    if src is None or src.op_type != "Shape" or src.inputs[0] is None or src.inputs[0].shape is None:
        return None
    x = src.inputs[0]
    start = src.attributes.get_int("start", 0)
    idx = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
    if idx is None or idx.numpy().size != 1:
        return None
    if node.op_type == "Gather" and node.attributes.get_int("axis", 0) != 0:
        return None
    return x, (start + int(idx.numpy().reshape(-1)[0])) % len(x.shape)


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is None or len(value.shape) == 0:
        return None
    d = value.shape[-1]
    return d if isinstance(d, int) else None


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _check_leading(shape: ir.Value, allowzero: int, source: ir.Value, seq_refs: set[tuple[ir.Value, int]],
                   what: str) -> None:
    """The first two entries of a Reshape shape must keep (batch, seq) of ``source``.

    An entry may be -1 or a copying 0, a constant equal to the static dim, or a run-time value read from
    axis 0 (batch: every tensor in these models is batch-major) / from a sequence axis: one in ``seq_refs``
    (the legacy exporter reads it off the attention's own tensors), or any axis carrying the same named
    symbolic dim (the dynamo exporter reads it off the graph input, e.g. ``input_ids`` axis 1).
    """
    parts = shape_parts(shape)
    if parts is None:
        _fail(f"{what}: Reshape shape entries are not readable")
    static = list(source.shape) if source.shape is not None else [None, None]
    for axis, part in enumerate(parts[:2]):
        if isinstance(part, int):
            if part == -1 or (part == 0 and not allowzero) or (part > 0 and static[axis] == part):
                continue
            _fail(f"{what}: Reshape entry {axis} is {part}, which does not keep the {('batch', 'seq')[axis]} axis")
        ref = dim_ref(part)
        if ref is None:
            _fail(f"{what}: Reshape entry {axis} is computed by something other than a shape read")
        if axis == 0 and ref[1] != 0:
            _fail(f"{what}: batch entry reads axis {ref[1]} of {ref[0].name}")
        if axis == 1 and ref not in seq_refs and not _same_symbol(ref[0], ref[1], source, 1):
            _fail(f"{what}: sequence entry reads axis {ref[1]} of {ref[0].name}, not a sequence axis")
    if [p for p in parts if isinstance(p, int)].count(-1) > 1:
        _fail(f"{what}: more than one -1 in a Reshape shape")


def _same_symbol(x: ir.Value, x_axis: int, y: ir.Value, y_axis: int) -> bool:
    if x.shape is None or y.shape is None or len(x.shape) <= x_axis or len(y.shape) <= y_axis:
        return False
    a, b = x.shape[x_axis], y.shape[y_axis]
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value and not str(a.value).startswith("unk__")


def _split_heads(reshape_out: ir.Value, src: ir.Value, seq_refs: set[tuple[ir.Value, int]],
                 what: str) -> tuple[int, int]:
    """(heads, head_size) of ``Reshape(src (B, S, C) -> (B, S, H, D))``; fails the match with a reason."""
    node = reshape_out.producer()
    if _rank(src) != 3:
        _fail(f"{what}: input is not known to be 3-D (batch, seq, hidden)")
    entries = shape_entries(node.inputs[1])
    if entries is None or len(entries) != 4:
        _fail(f"{what}: head-split Reshape shape is not 4 entries of readable length")
    _check_leading(node.inputs[1], node.attributes.get_int("allowzero", 0), src, seq_refs, what)
    heads, size = entries[2], entries[3]
    hidden = _last_dim(src)
    if heads == -1 and size is not None and size > 0 and hidden is not None and hidden % size == 0:
        heads = hidden // size
    if size == -1 and heads is not None and heads > 0 and hidden is not None and hidden % heads == 0:
        size = hidden // heads
    if heads is None or size is None or heads <= 0 or size <= 0:
        _fail(f"{what}: heads/head size not constant in the head-split Reshape ({entries})")
    if hidden is not None and heads * size != hidden:
        _fail(f"{what}: heads*head_size={heads * size} != hidden size {hidden}")
    return heads, size



def _plan_mask(plan: dict[str, Any], probe, kind: str, mask, nan_guard: bool, q_dtype, heads: int) -> None:
    """Both attention rules' mask decision: a provably causal mask -> ``plan["causal"]``; an additive float mask
    of rank <= 4 whose head axis fits -> ``plan["bias"]``; anything else fails the match with the reason."""
    if probe.is_causal(mask):
        plan["causal"] = True
    elif nan_guard:
        _fail("mask is not provably causal and the graph zeroes fully-masked rows (IsNaN guard), "
              "which the fused kernels do not")
    elif mask.dtype not in (None, q_dtype):
        _fail("mask is not an additive float mask of the query's dtype")
    elif _rank(mask) is None or _rank(mask) > 4:
        _fail("mask rank is unknown or > 4")
    else:
        _check_bias_heads(mask, heads, kind)
        plan["bias"] = mask


def _scaled_masked_softmax(op, q, k_t, mask, q_scale, k_scale, s_scale):
    """The pattern both attention rules share: ``Softmax((q [*|/ q_scale]) @ (k_t [*|/ k_scale]) [*|/ s_scale]
    [+ mask])`` with the optional NaN guard; the tags (``q_op``, ``k_op``, ``s_op``, ``has_mask``, ``nan_guard``)
    say which form matched."""
    q = pattern.OrValue([op.Mul(q, q_scale), op.Div(q, q_scale), q], tag_var="q_op",
                        tag_values=["Mul", "Div", None])
    k_t = pattern.OrValue([op.Mul(k_t, k_scale), op.Div(k_t, k_scale), k_t], tag_var="k_op",
                          tag_values=["Mul", "Div", None])
    scores = op.MatMul(q, k_t)
    scores = pattern.OrValue([op.Mul(scores, s_scale), op.Div(scores, s_scale), scores], tag_var="s_op",
                             tag_values=["Mul", "Div", None])
    scores = pattern.OrValue([op.Add(scores, mask), scores], tag_var="has_mask", tag_values=[True, False])
    probs = op.Softmax(scores, _outputs=["probs"])
    return pattern.OrValue([op.Where(op.IsNaN(probs), 0.0, probs), probs], tag_var="nan_guard",
                           tag_values=[True, False])

class _Fail(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _fail(reason: str):
    raise _Fail(reason)


# ------------------------------------------------------------------------------------------ causal masks


class _CausalProbe:
    """Decides whether an additive attention mask is the causal (lower-triangular) mask.

    Rather than matching each exporter's mask construction (legacy: ``Expand -> Trilu -> Equal -> Where`` per
    layer; dynamo: ``Range -> LessOrEqual -> Expand -> Where`` once), the mask's subgraph is evaluated: it must
    depend on the graph inputs only through ``Shape`` (so it cannot depend on token values), and at two
    different sizes for every dynamic axis it must be square, equal across its leading axes, 0 on and below
    the diagonal and <= -1e4 above. Such a mask is exactly ``unidirectional``/``is_causal`` attention.
    """

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self._cache: dict[int, bool] = {}

    def is_causal(self, mask: ir.Value) -> bool:
        key = id(mask)
        if key not in self._cache:
            try:
                self._cache[key] = self._probe(mask)
            except Exception as e:  # an unevaluable mask is simply "not known causal"
                log.debug("causal probe of %s failed: %s", mask.name, e)
                self._cache[key] = False
        return self._cache[key]

    def _subgraph(self, mask: ir.Value) -> tuple[list[ir.Node], list[ir.Value]] | None:
        """The nodes computing ``mask`` and the values only their *shapes* are needed of (fed as dummies).
        None if the mask reads any graph input's values, or is too large / random."""
        graph = self.model.graph
        graph_inputs = set(graph.inputs)
        nodes: set[ir.Node] = set()
        by_value: set[ir.Value] = set()
        by_shape: list[ir.Value] = []
        stack = [mask]
        while stack:
            v = stack.pop()
            if v in by_value:
                continue
            by_value.add(v)
            if v.producer() is None and v.const_value is not None:
                continue  # initializer
            if v in graph_inputs:
                return None  # the mask depends on input *values* (e.g. a padding mask)
            node = v.producer()
            if node is None or node.graph is not graph or node.op_type.startswith("Random"):
                return None
            if node in nodes:
                continue
            nodes.add(node)
            if len(nodes) > _PROBE_MAX_NODES:
                return None
            if node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
                by_shape.append(node.inputs[0])
            else:
                stack.extend(i for i in node.inputs if i is not None)
        order = [n for n in graph if n in nodes]
        dummies = [x for x in dict.fromkeys(by_shape) if x not in by_value]
        return order, dummies

    def _probe(self, mask: ir.Value) -> bool:
        import onnxruntime as ort

        found = self._subgraph(mask)
        if found is None:
            return False
        nodes, dummies = found
        if any(v.shape is None or v.dtype is None for v in dummies):
            return False
        proto_nodes = [ir.serde.serialize_node(n) for n in nodes]
        consts: dict[str, onnx.TensorProto] = {}
        for n in nodes:
            for i in n.inputs:
                if i is not None and i.producer() is None and i.const_value is not None and i.name not in consts:
                    consts[i.name] = ir.serde.serialize_tensor(i.const_value)
                    consts[i.name].name = i.name
        inputs = [onnx.helper.make_tensor_value_info(v.name, int(v.dtype), None) for v in dummies]
        out = onnx.helper.make_tensor_value_info(mask.name, int(mask.dtype or ir.DataType.FLOAT), None)
        graph = onnx.helper.make_graph(proto_nodes, "causal_probe", inputs, [out], list(consts.values()))
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()]
        probe = onnx.helper.make_model(graph, opset_imports=opsets)
        probe.ir_version = 8
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        # Every dynamic axis gets the same size: the legacy exporter names one axis differently on different
        # tensors (unk__3, unk__4 ...), and a square mask must come out square whichever name it read.
        for size in (5, 9):
            feeds = {v.name: np.zeros([d if isinstance(d, int) else size for d in v.shape],
                                      dtype=ir.DataType(v.dtype).numpy()) for v in dummies}
            m = np.asarray(sess.run(None, feeds)[0], dtype=np.float64)
            if m.ndim < 2 or m.shape[-1] != m.shape[-2] or m.shape[-1] < 2:
                return False
            flat = m.reshape(-1, m.shape[-2], m.shape[-1])
            if not np.all(flat == flat[:1]):
                return False
            n = flat.shape[-1]
            lower = np.tril(np.ones((n, n), dtype=bool))
            if not (np.all(flat[0][lower] == 0.0) and np.all(flat[0][~lower] <= _MASKED)):
                return False
        return True


# ------------------------------------------------------------------------------------------ the rule


class _AttentionRule(pattern.RewriteRuleClassBase):
    def __init__(self, kind: str, probe: _CausalProbe, counts: collections.Counter) -> None:
        # remove_nodes=False: the exporters compute the key-transpose Reshape shapes from Shape(key) *inside*
        # the matched subgraph, which onnxscript's matcher counts as an outside use; the check below allows
        # exactly such Shape uses, and the dead originals are removed after the rewrite.
        super().__init__(name=f"fuse_attention_{kind}", remove_nodes=False)
        self.kind = kind
        self.probe = probe
        self.counts = counts
        self._plan: dict[str, Any] = {}

    def pattern(self, op, q3, k3, v3, q_shape, k_shape, v_shape, out_shape, mask, q_scale, k_scale, s_scale,
                k_shape3, k_shape4, ctx_shape):
        q = op.Transpose(op.Reshape(q3, q_shape, _outputs=["q4"]), perm=[0, 2, 1, 3], _outputs=["q_bhsd"])
        k4 = op.Reshape(k3, k_shape, _outputs=["k4"])
        k_t = pattern.OrValue(
            [
                op.Transpose(k4, perm=[0, 2, 3, 1]),
                op.Reshape(op.Transpose(op.Reshape(op.Transpose(k4, perm=[0, 2, 1, 3]), k_shape3), perm=[0, 2, 1]),
                           k_shape4),
                op.Transpose(op.Transpose(k4, perm=[0, 2, 1, 3]), perm=[0, 1, 3, 2]),
            ],
            tag_var="k_form",
            tag_values=["transpose", "reshape3d", "two_transposes"],
        )
        probs = _scaled_masked_softmax(op, q, k_t, mask, q_scale, k_scale, s_scale)
        v = op.Transpose(op.Reshape(v3, v_shape, _outputs=["v4"]), perm=[0, 2, 1, 3])
        pv = op.MatMul(probs, v, _outputs=["pv"])
        # transformers' CLIP (legacy export) re-states the context's (B, H, S, D) shape with a Reshape
        pv = pattern.OrValue([op.Reshape(pv, ctx_shape), pv], tag_var="ctx_reshape", tag_values=[True, False])
        ctx = op.Transpose(pv, perm=[0, 2, 1, 3])
        return op.Reshape(ctx, out_shape, _outputs=["out"])

    def check(self, context, q3, k3, v3, out_shape, mask, q_scale, k_scale, s_scale, q4, k4, v4, probs, out,
              k_form, q_op, k_op, s_op, has_mask, nan_guard, k_shape3=None, k_shape4=None, ctx_reshape=False,
              ctx_shape=None, pv=None, q_bhsd=None, **_):
        result = pattern.MatchResult()
        matched = set(context.nodes)
        for node in matched:
            for value in node.outputs:
                if value is out:
                    continue
                if value.is_graph_output() or not _only_shape_reads(value, matched):
                    return result.fail(f"intermediate {value.name} is used outside the attention subgraph")
        try:
            self._plan = self._analyse(q3, k3, v3, out_shape, mask, q_scale, k_scale, s_scale, q4, k4, v4, q_bhsd,
                                       probs, out, k_form, q_op, k_op, s_op, has_mask, nan_guard, k_shape3, k_shape4)
            if ctx_reshape:
                _check_identity_reshape(ctx_shape, pv, q_bhsd, self._plan["heads"], self._plan["out_hidden"])
        except _Fail as f:
            return result.fail(f.reason)
        return result

    def _analyse(self, q3, k3, v3, out_shape, mask, q_scale, k_scale, s_scale, q4, k4, v4, q_bhsd, probs, out,
                 k_form, q_op, k_op, s_op, has_mask, nan_guard, k_shape3, k_shape4) -> dict[str, Any]:
        if any(x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16) for x in (q3, k3, v3)
               if x.dtype is not None):
            _fail("Q/K/V are not floating point")
        self_attention = _same_source(q3, k3)
        q_seq = {(q3, 1), (q4, 1), (q_bhsd, 2)}
        kv_seq = {(k3, 1), (k4, 1), (v3, 1), (v4, 1)}
        for x in (q3, k3, v3):
            act = _activation(x)
            if act is not None:
                (q_seq if x is q3 else kv_seq).add((act, 1))
        if self_attention:
            q_seq = kv_seq = q_seq | kv_seq
        heads, size = _split_heads(q4, q3, q_seq, "query")
        k_heads, k_size = _split_heads(k4, k3, kv_seq, "key")
        v_heads, v_size = _split_heads(v4, v3, kv_seq, "value")
        if not (heads == k_heads == v_heads):
            _fail(f"head counts differ: q={heads} k={k_heads} v={v_heads}")
        if size != k_size:
            _fail(f"query head size {size} != key head size {k_size}")
        if k_form == "reshape3d":
            e3, e4 = shape_entries(k_shape3), shape_entries(k_shape4)
            if e3 is None or len(e3) != 3 or e3[2] not in (k_size, None) or e4 is None or len(e4) != 4 \
                    or e4[2] not in (k_size, None):
                _fail(f"dynamo key transpose reshapes are not (BH, L, D) -> (B, H, D, L): {e3} {e4}")
        axis = probs.producer().attributes.get_int("axis", -1)
        if axis not in (-1, 3):
            _fail(f"Softmax over axis {axis}, not the key axis")
        entries = shape_entries(out_shape)
        if entries is None or len(entries) != 3:
            _fail(f"output Reshape is not to 3-D: {entries}")
        _check_leading(out_shape, out.producer().attributes.get_int("allowzero", 0), q3, q_seq, "output")
        if entries[2] not in (heads * v_size, -1):
            _fail(f"output Reshape last entry {entries[2]} != heads*head_size {heads * v_size}")

        scale = 1.0
        for op_kind, value, what in ((q_op, q_scale, "query"), (k_op, k_scale, "key"), (s_op, s_scale, "score")):
            if op_kind is None:
                continue
            c = const_scalar(value)
            if c is None or c == 0.0:
                _fail(f"{what} scale is not a constant scalar")
            scale *= c if op_kind == "Mul" else 1.0 / c

        plan: dict[str, Any] = {"heads": heads, "scale": scale, "causal": False, "bias": None,
                                "out_hidden": heads * v_size}
        if has_mask:
            _plan_mask(plan, self.probe, self.kind, mask, nan_guard, q3.dtype, heads)
        plan["class"] = ("causal_self_attention" if plan["causal"] else "masked_attention" if plan["bias"] is not None
                         else "self_attention" if self_attention else "cross_attention")
        return plan

    def rewrite(self, op, q3, k3, v3, out, **_):
        plan = self._plan
        self.counts[plan["class"]] += 1
        bias = _bias_input(op, plan["bias"], q3, k3)
        if self.kind == "mha":
            inputs = [q3, k3, v3] + ([None, None, bias] if bias is not None else [])
            attrs = {"num_heads": plan["heads"], "scale": float(plan["scale"])}
            if plan["causal"]:
                attrs["unidirectional"] = 1
            result = op.MultiHeadAttention(*inputs, _domain=MS_DOMAIN, **attrs)
        else:
            inputs = [q3, k3, v3] + ([bias] if bias is not None else [])
            attrs = {"q_num_heads": plan["heads"], "kv_num_heads": plan["heads"], "scale": float(plan["scale"])}
            if plan["causal"]:
                attrs["is_causal"] = 1
            result = op.Attention(*inputs, **attrs)
        # contrib ops have no ONNX shape inference: carry the known output type so later passes see it
        result.dtype = q3.dtype
        if out.shape is not None:
            result.shape = out.shape
        elif q3.shape is not None:
            result.shape = ir.Shape([*list(q3.shape)[:-1], plan["out_hidden"]])
        return result


def _check_bias_heads(mask: ir.Value, heads: int, kind: str) -> None:
    """An additive mask's head axis must be 1 or the head count (``attention_bias`` of MultiHeadAttention takes
    (B|1, H|1, S, L)); its query / key axes are expanded to (S, L) by :func:`_bias_input`."""
    dims = [1] * (4 - _rank(mask)) + list(mask.shape)
    if kind == "mha" and not (isinstance(dims[1], int) and dims[1] in (1, heads)):
        _fail(f"mask shape {dims}: the head axis is not 1 or {heads}, which attention_bias needs")
    if 1 in (dims[2], dims[3]):
        # statically a broadcast over the queries / keys: neither kernel takes one, and expanding it would
        # materialise a (B, H, S, L) tensor every call; left decomposed
        _fail(f"mask shape {dims} broadcasts over the query or key axis, which the fused kernels do not")


def _bias_input(op, bias: ir.Value | None, q3: ir.Value, k3: ir.Value) -> ir.Value | None:
    """The mask as the fused op's additive bias, exactly as the decomposed graph broadcast it.

    MultiHeadAttention's ``attention_bias`` must be (B|1, H|1, S, L) *without* broadcasting over the query and
    key axes, while the legacy exporter writes PixArt's / Sana's key-padding masks (diffusers'
    ``prepare_attention_mask``) as a (B, H, ?, ?) Reshape that is (B, H, 1, L) at run time: fused as is,
    onnxruntime fails on the first call ("attention_bias dimension 2 should be same as sequence_length").
    So a mask whose last two axes are not statically (S, L) is expanded to (., ., S, L) read off the 3-D
    query and key; Expand broadcasts exactly as the Add it replaces did (the decomposed graph materialised a
    tensor of that size too: the scores). A (B, L) ``key_padding_mask`` would need the 0/1 mask the additive
    one was made from, which is not in the matched subgraph. onnxruntime's opset-23 ``Attention`` needs the
    same (1.32: "inconsistent q_sequence_length (between attn_mask and Q)"), though ONNX lets ``attn_mask``
    broadcast.
    """
    if bias is None:
        return None
    if _rank(bias) < 4:
        bias = op.Unsqueeze(bias, op.Constant(value=ir.tensor(np.arange(4 - _rank(bias), dtype=np.int64))))
    if bias.shape is not None and _same_symbol(bias, 2, q3, 1) and _same_symbol(bias, 3, k3, 1):
        return bias  # already (., ., S, L): the same static or named dims
    ones = op.Constant(value=ir.tensor(np.ones(2, dtype=np.int64)))
    target = op.Concat(ones, op.Shape(q3, start=1, end=2), op.Shape(k3, start=1, end=2), axis=0)
    return op.Expand(bias, target)


def _only_shape_reads(value: ir.Value, matched: set[ir.Node], depth: int = 2) -> bool:
    """True if every use of ``value`` outside ``matched`` only reads its shape (directly via Shape, or through
    a layout op whose result only feeds Shape: the legacy CLIP export sizes its causal mask that way)."""
    for use in value.uses():
        node = use.node
        if node in matched or node.op_type == "Shape":
            continue
        if depth > 0 and node.op_type in ("Transpose", "Reshape", "Unsqueeze", "Squeeze") and all(
                not out.is_graph_output() and _only_shape_reads(out, matched, depth - 1) for out in node.outputs):
            continue
        return False
    return True


def _check_identity_reshape(shape: ir.Value, pv: ir.Value, q_bhsd: ir.Value, heads: int, out_hidden: int) -> None:
    """The optional context Reshape must map (B, H, S, Dv) to itself: constant entries H / Dv (or one -1),
    run-time entries read from the same axis of the context or of the (B, H, S, D) query."""
    parts = shape_parts(shape)
    if parts is None or len(parts) != 4:
        _fail(f"context Reshape shape is not 4 readable entries: {parts}")
    size = out_hidden // heads
    expected = {1: heads, 3: size}
    minus_one = 0
    for axis, part in enumerate(parts):
        if isinstance(part, int):
            if part == -1:
                minus_one += 1
            elif expected.get(axis) != part:
                _fail(f"context Reshape entry {axis} is {part}, not an identity reshape")
        else:
            ref = dim_ref(part)
            if ref is None or ref[0] not in (pv, q_bhsd) or ref[1] != axis:
                _fail(f"context Reshape entry {axis} is not read from the same axis of the context")
    if minus_one > 1:
        _fail("context Reshape has more than one -1")


def _same_source(q3: ir.Value, k3: ir.Value) -> bool:
    """True when Q and K are projections (MatMul [+ bias]) of the same activation: self-attention."""
    return _activation(q3) is _activation(k3) is not None


def _activation(v: ir.Value) -> ir.Value | None:
    for _ in range(3):
        node = v.producer()
        if node is None:
            return None
        if node.op_type == "Add":
            v = next((i for i in node.inputs if i is not None and i.const_value is None), None)
            if v is None:
                return None
        elif node.op_type in ("MatMul", "Gemm"):
            return node.inputs[0]
        else:
            return None
    return None


# ------------------------------------------------------------------------------------------ the 4-D rule

#: ops a head-split tensor passes through between its projection and the attention core in the transformer
#: families: QK RMSNorm (Pow/ReduceMean/Sqrt/Div/Mul or a fused norm), RoPE (Slice/Neg/Concat/Mul/Add and 5-D
#: Reshapes), the text + image Concat of joint attention, layout ops
_HEAD_PATH_OPS = frozenset({
    "Reshape", "Transpose", "Mul", "Div", "Add", "Sub", "Neg", "Concat", "Slice", "Unsqueeze", "Squeeze", "Split",
    "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Cast", "SimplifiedLayerNormalization", "RMSNormalization",
    "LayerNormalization"})
_NORM_OPS = frozenset({"ReduceMean", "SimplifiedLayerNormalization", "RMSNormalization", "LayerNormalization"})
_TRACE_MAX_NODES = 96


class _HeadTrace:
    """What lies between a 4-D Q / K / V tensor and the linear projection(s) it came from.

    ``heads``: head counts read off the head-split Reshapes found (3-D (B, S, C) -> 4-D with last entry D);
    ``sources``: the projections' input activations (self- vs cross-attention); ``ops``: op types seen
    (QK norm, RoPE); ``joint``: a Concat over a non-feature axis joins two streams (SD3 / FLUX joint attention).
    """

    def __init__(self, value: ir.Value, head_size: int) -> None:
        self.heads: set[int] = set()
        self.sources: set[ir.Value] = set()
        self.ops: set[str] = set()
        self.joint = False
        seen: set[ir.Node] = set()
        stack = [value]
        while stack and len(seen) < _TRACE_MAX_NODES:
            node = stack.pop().producer()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None \
                    and node.inputs[1].const_value is not None:
                self.sources.add(node.inputs[0])
                continue
            if node.op_type not in _HEAD_PATH_OPS:
                continue  # the RoPE tables, shape arithmetic: not on the activation path
            self.ops.add(node.op_type)
            if node.op_type == "Reshape":
                self._read_split(node, head_size)
            elif node.op_type == "Concat" and node.outputs[0].shape is not None:
                rank = len(node.outputs[0].shape)
                live = [i for i in node.inputs if i is not None and ir.convenience.get_const_tensor(i) is None]
                if rank in (3, 4) and len(live) >= 2 and node.attributes.get_int("axis", 0) % rank != rank - 1:
                    self.joint = True
            stack.extend(i for i in node.inputs if i is not None and i.const_value is None)

    def _read_split(self, node: ir.Node, head_size: int) -> None:
        src, out = node.inputs[0], node.outputs[0]
        if src is None or _rank(src) != 3 or _rank(out) != 4:
            return
        entries = shape_entries(node.inputs[1])
        if entries is None or len(entries) != 4 or entries[3] != head_size:
            return
        heads, hidden = entries[2], _last_dim(src)
        if heads == -1 and hidden is not None and hidden % head_size == 0:
            heads = hidden // head_size
        if heads is not None and heads > 0:
            self.heads.add(heads)


def _static(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or len(value.shape) <= axis:
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


def _bshd_source(value: ir.Value) -> ir.Value | None:
    """``x`` if ``value`` is ``Transpose(x, [0, 2, 1, 3])`` (so the BSHD tensor exists already), else None."""
    node = value.producer()
    if node is not None and node.op_type == "Transpose" and node.domain in ("", "ai.onnx") \
            and list(node.attributes.get_ints("perm", [])) == [0, 2, 1, 3]:
        return node.inputs[0]
    return None


class _HeadLayoutAttentionRule(pattern.RewriteRuleClassBase):
    """Attention whose Q / K / V are *computed* 4-D tensors, not a Reshape of a projection: the transformer
    families normalize (QK RMSNorm), rotate (RoPE) and concatenate (joint text + image attention) the heads
    after the head split, so the fused op must start after all of that.

    Matched: ``Transpose(Softmax(q @ kT [* s] [+ mask]) @ v, [0, 2, 1, 3])`` with q, v (B, H, S, D) and kT either
    ``Transpose(k (B, H, L, D), [0, 1, 3, 2])``, ``Transpose(k (B, L, H, D), [0, 2, 3, 1])`` or the dynamo
    exporter's 3-D reshape form. Rewritten to ``Reshape(MHA(Reshape(q_bshd, [0, 0, H*D]), ...), [0, 0, H, Dv])``:
    the (B, S, H, D) -> (B, S, H*D) Reshapes are free views, the BSHD tensor is taken from before the exporter's
    own Transpose when it exists. A wrong head count could not pass silently: ``[0, 0, H*D]`` only reshapes a
    tensor whose head axis really is H (D is static), anything else fails at run time.
    """

    def __init__(self, kind: str, probe: _CausalProbe, counts: collections.Counter,
                 features: collections.Counter, reasons: dict[int, str]) -> None:
        super().__init__(name=f"fuse_attention_heads_{kind}", remove_nodes=False)
        self.kind, self.probe, self.counts, self.features = kind, probe, counts, features
        #: id(Softmax node) -> why its match failed the checks (for the report's ``left``)
        self.reasons = reasons
        self._plan: dict[str, Any] = {}

    def pattern(self, op, q_h, k_h, v_h, mask, q_scale, k_scale, s_scale, k_shape3, k_shape4):
        k_t = pattern.OrValue(
            [
                op.Transpose(k_h, perm=[0, 1, 3, 2]),
                op.Transpose(k_h, perm=[0, 2, 3, 1]),
                op.Reshape(op.Transpose(op.Reshape(k_h, k_shape3), perm=[0, 2, 1]), k_shape4),
            ],
            tag_var="k_form",
            tag_values=["bhsd", "bshd", "reshape3d"],
        )
        probs = _scaled_masked_softmax(op, q_h, k_t, mask, q_scale, k_scale, s_scale)
        pv = op.MatMul(probs, v_h)
        return op.Transpose(pv, perm=[0, 2, 1, 3], _outputs=["ctx"])

    def check(self, context, q_h, k_h, v_h, mask, q_scale, k_scale, s_scale, probs, ctx, k_form, q_op, k_op, s_op,
              has_mask, nan_guard, k_shape3=None, k_shape4=None, **_):
        result = pattern.MatchResult()
        matched = set(context.nodes)
        for node in matched:
            for value in node.outputs:
                if value is not ctx and (value.is_graph_output() or not _only_shape_reads(value, matched)):
                    self.reasons[id(probs.producer())] = f"intermediate {value.name} is used outside the attention"
                    return result.fail(self.reasons[id(probs.producer())])
        try:
            self._plan = self._analyse(q_h, k_h, v_h, mask, q_scale, k_scale, s_scale, probs, k_form, q_op, k_op,
                                       s_op, has_mask, nan_guard, k_shape3, k_shape4)
        except _Fail as f:
            self.reasons[id(probs.producer())] = f.reason
            return result.fail(f.reason)
        return result

    def _analyse(self, q_h, k_h, v_h, mask, q_scale, k_scale, s_scale, probs, k_form, q_op, k_op, s_op, has_mask,
                 nan_guard, k_shape3, k_shape4) -> dict[str, Any]:
        if any(x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
               for x in (q_h, k_h, v_h)):
            _fail("Q/K/V are not known to be floating point")
        if any(_rank(x) != 4 for x in (q_h, k_h, v_h)):
            _fail("Q/K/V are not known to be 4-D")
        axis = probs.producer().attributes.get_int("axis", -1)
        if axis not in (-1, 3):
            _fail(f"Softmax over axis {axis}, not the key axis")
        # (B, H, S, D) for q and v; k as its form says
        k_head_axis = 2 if k_form == "bshd" else 1
        size, k_size, v_size = _static(q_h, 3), _static(k_h, 3), _static(v_h, 3)
        if size is None or v_size is None or k_size != size:
            _fail(f"head sizes are not static and equal: q={size} k={k_size} v={v_size}")
        if k_form == "reshape3d":
            e3, e4 = shape_entries(k_shape3), shape_entries(k_shape4)
            if e3 is None or len(e3) != 3 or e3[2] not in (size, None) or e4 is None or len(e4) != 4 \
                    or e4[2] not in (size, None):
                _fail(f"dynamo key transpose reshapes are not (BH, L, D) -> (B, H, D, L): {e3} {e4}")
        traces = {"q": _HeadTrace(q_h, size), "k": _HeadTrace(k_h, size), "v": _HeadTrace(v_h, v_size)}
        heads = {h for t in traces.values() for h in t.heads}
        heads |= {d for d in (_static(q_h, 1), _static(k_h, k_head_axis), _static(v_h, 1)) if d is not None}
        if len(heads) != 1:
            _fail(f"head count not readable or not the same for Q/K/V: {sorted(heads) or 'none found'}")
        n_heads = heads.pop()
        scale = 1.0
        for op_kind, value, what in ((q_op, q_scale, "query"), (k_op, k_scale, "key"), (s_op, s_scale, "score")):
            if op_kind is None:
                continue
            c = const_scalar(value)
            if c is None or c == 0.0:
                _fail(f"{what} scale is not a constant scalar")
            scale *= c if op_kind == "Mul" else 1.0 / c
        plan: dict[str, Any] = {"heads": n_heads, "size": size, "v_size": v_size, "scale": scale,
                                "causal": False, "bias": None, "k_bshd": k_form == "bshd"}
        if has_mask:
            _plan_mask(plan, self.probe, self.kind, mask, nan_guard, q_h.dtype, n_heads)
        q_src, k_src = traces["q"].sources, traces["k"].sources
        plan["class"] = ("causal_self_attention" if plan["causal"] else "masked_attention"
                         if plan["bias"] is not None else "joint_attention" if traces["q"].joint
                         else "self_attention" if q_src and q_src == k_src else "cross_attention")
        plan["features"] = [f for f, ok in (
            ("qk_norm", bool(_NORM_OPS & (traces["q"].ops | traces["k"].ops))),
            ("rope", "Neg" in traces["q"].ops and "Neg" in traces["k"].ops)) if ok]
        return plan

    def rewrite(self, op, q_h, k_h, v_h, **_):
        plan = self._plan
        self.counts[plan["class"]] += 1
        self.features.update(plan["features"])
        heads, size, v_size = plan["heads"], plan["size"], plan["v_size"]

        def to_3d(x: ir.Value, bshd: bool, width: int) -> ir.Value:
            src = x if bshd else (_bshd_source(x) or op.Transpose(x, perm=[0, 2, 1, 3]))
            return op.Reshape(src, op.Constant(value=ir.tensor(np.array([0, 0, width], dtype=np.int64))))

        q3 = to_3d(q_h, False, heads * size)
        k3 = to_3d(k_h, plan["k_bshd"], heads * size)
        v3 = to_3d(v_h, False, heads * v_size)
        bias = _bias_input(op, plan["bias"], q3, k3)
        if self.kind == "mha":
            attrs = {"num_heads": heads, "scale": float(plan["scale"])}
            if plan["causal"]:
                attrs["unidirectional"] = 1
            fused = op.MultiHeadAttention(q3, k3, v3, *([None, None, bias] if bias is not None else []),
                                          _domain=MS_DOMAIN, **attrs)
        else:
            attrs = {"q_num_heads": heads, "kv_num_heads": heads, "scale": float(plan["scale"])}
            if plan["causal"]:
                attrs["is_causal"] = 1
            fused = op.Attention(q3, k3, v3, *([bias] if bias is not None else []), **attrs)
        fused.dtype = q_h.dtype
        return op.Reshape(fused, op.Constant(value=ir.tensor(np.array([0, 0, heads, v_size], dtype=np.int64))))


class FuseAttentionPass(DiffcPass):
    """Fuse scaled-dot-product attention into ``MultiHeadAttention`` (contrib) or opset-23 ``Attention``.

    Fire counts: ``self_attention``, ``cross_attention``, ``causal_self_attention`` (mask recognised as causal
    and dropped for the kernel's own causal mode), ``masked_attention`` (other additive masks, passed on: the
    key-padding masks of PixArt / Sana cross-attention), ``joint_attention`` (text + image tokens concatenated
    after the head split: SD3's and FLUX's double blocks).

    :attr:`found`: ``qk_norm`` / ``rope`` (fused attentions whose Q and K were RMS-normalized / rotated before
    the match, which is where the fused op starts) and ``softmax_left`` (Softmax nodes not fused);
    :attr:`left` says why each of those was not (the build report carries it).
    """

    name = "fuse_attention"

    def __init__(self, *, kind: str = "mha") -> None:
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise PassOptionError(f"[passes].attention must be one of {list(ATTENTION_KINDS)}, got {kind!r}")
        self.kind = kind
        #: Softmax node name -> why it was left decomposed (last run)
        self.left: dict[str, str] = {}

    def run(self, model: ir.Model) -> dict[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        features: collections.Counter[str] = collections.Counter()
        self.left = {}
        if self.kind != "none":
            probe = _CausalProbe(model)
            # the 3-D rule first: it fuses straight onto the projections (no Reshape views); the head-layout
            # rule then takes what the transformer families compute after the head split
            apply_rules(model, [_AttentionRule.rule(self.kind, probe, counts)])
            reasons: dict[int, str] = {}
            apply_rules(model, [_HeadLayoutAttentionRule.rule(self.kind, probe, counts, features, reasons)])
            if sum(counts.values()):
                if self.kind == "mha":
                    model.opset_imports.setdefault(MS_DOMAIN, 1)
                elif onnx_opset(model) < 23:
                    model.opset_imports[""] = 23
                    model.opset_imports.pop("ai.onnx", None)
            self.left = _leftover_reasons(model, reasons)
            for name, reason in self.left.items():
                log.info("fuse_attention: %s left decomposed: %s", name, reason)
        self.found = {"qk_norm": features["qk_norm"], "rope": features["rope"], "softmax_left": len(self.left)}
        keys = ("self_attention", "cross_attention", "causal_self_attention", "masked_attention", "joint_attention")
        return {k: counts[k] for k in keys}


def _leftover_reasons(model: ir.Model, reasons: dict[int, str]) -> dict[str, str]:
    """Each Softmax still in the graph -> why the head-layout rule refused it where its pattern matched, else
    the structural reason."""
    return {node.name: reasons.get(id(node), "not the MatMul-Softmax-MatMul attention form the exporters write")
            for node in model.graph if node.op_type == "Softmax" and node.domain in ("", "ai.onnx")}
