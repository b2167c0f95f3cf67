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
        q = pattern.OrValue([op.Mul(q, q_scale), op.Div(q, q_scale), q], tag_var="q_op",
                            tag_values=["Mul", "Div", None])
        k_t = pattern.OrValue([op.Mul(k_t, k_scale), op.Div(k_t, k_scale), k_t], tag_var="k_op",
                              tag_values=["Mul", "Div", None])
        scores = op.MatMul(q, k_t)
        scores = pattern.OrValue([op.Mul(scores, s_scale), op.Div(scores, s_scale), scores], tag_var="s_op",
                                 tag_values=["Mul", "Div", None])
        scores = pattern.OrValue([op.Add(scores, mask), scores], tag_var="has_mask", tag_values=[True, False])
        probs = op.Softmax(scores, _outputs=["probs"])
        probs = pattern.OrValue([op.Where(op.IsNaN(probs), 0.0, probs), probs], tag_var="nan_guard",
                                tag_values=[True, False])
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
            if self.probe.is_causal(mask):
                plan["causal"] = True
            elif nan_guard:
                _fail("mask is not provably causal and the graph zeroes fully-masked rows (IsNaN guard), "
                      "which the fused kernels do not")
            elif mask.dtype not in (None, q3.dtype):
                _fail("mask is not an additive float mask of the query's dtype")
            elif _rank(mask) is None or _rank(mask) > 4:
                _fail("mask rank is unknown or > 4")
            else:
                if self.kind == "mha":
                    # attention_bias must be (B or 1, H or 1, S, L): no broadcasting over the last two axes
                    dims = [1] * (4 - _rank(mask)) + list(mask.shape)
                    if not (isinstance(dims[1], int) and dims[1] in (1, heads)) or 1 in (dims[2], dims[3]):
                        _fail(f"mask shape {dims} is not (B|1, H|1, S, L), the only form attention_bias takes")
                plan["bias"] = mask
        plan["class"] = ("causal_self_attention" if plan["causal"] else "masked_attention" if plan["bias"] is not None
                         else "self_attention" if self_attention else "cross_attention")
        return plan

    def rewrite(self, op, q3, k3, v3, out, **_):
        plan = self._plan
        self.counts[plan["class"]] += 1
        bias = plan["bias"]
        if bias is not None and _rank(bias) < 4:
            axes = op.Constant(value=ir.tensor(np.arange(4 - _rank(bias), dtype=np.int64)))
            bias = op.Unsqueeze(bias, axes)
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


class FuseAttentionPass(DiffcPass):
    """Fuse scaled-dot-product attention into ``MultiHeadAttention`` (contrib) or opset-23 ``Attention``.

    Fire counts: ``self_attention``, ``cross_attention``, ``causal_self_attention`` (mask recognised as causal
    and dropped for the kernel's own causal mode), ``masked_attention`` (other additive masks, passed on).
    """

    name = "fuse_attention"

    def __init__(self, *, kind: str = "mha") -> None:
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise PassOptionError(f"[passes].attention must be one of {list(ATTENTION_KINDS)}, got {kind!r}")
        self.kind = kind

    def run(self, model: ir.Model) -> dict[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        if self.kind != "none":
            rule = _AttentionRule.rule(self.kind, _CausalProbe(model), counts)
            apply_rules(model, [rule])
            if sum(counts.values()):
                if self.kind == "mha":
                    model.opset_imports.setdefault(MS_DOMAIN, 1)
                elif onnx_opset(model) < 23:
                    model.opset_imports[""] = 23
                    model.opset_imports.pop("ai.onnx", None)
        keys = ("self_attention", "cross_attention", "causal_self_attention", "masked_attention")
        return {k: counts[k] for k in keys}
