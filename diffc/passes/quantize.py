"""quantize: insert QuantizeLinear/DequantizeLinear (Q/DQ) around the UNet's (or VAE decoder's) GEMM-like ops.

Why this shape of graph. Neither onnxruntime nor TensorRT wants a graph with integer ops in it: both take
"fake-quantized" float graphs (Q/DQ pairs around float ops) and fuse them into their own integer kernels.
What they fuse is narrow, and a Q/DQ pair that is not fused costs a full pass over the tensor in memory:

- **onnxruntime (CPU)** fuses ``DQ(x) -> Conv(DQ(w), DQ(b_int32)) -> Q`` into ``QLinearConv`` (and its NHWC
  form at the layout level), ``DQ(x) -> MatMul(DQ(w))`` into ``MatMulIntegerToFloat`` (float output, so no Q
  after it) and ``DQ(x) -> Gemm`` into ``QGemm``. A Conv without the Q on its output, or whose bias stays
  float, is *not* fused: it runs as a float Conv that dequantizes its weights every call, which is slower than
  plain fp32 and is why a naive quantization gains nothing. Activations are uint8 (asymmetric: SiLU and
  GELU outputs are mostly positive, so a zero point keeps a bit) and weights int8 per output channel: x86's
  VNNI instruction multiplies u8 by s8.
- **TensorRT** wants symmetric activations (zero point 0) and per-channel weights, Q/DQ on the *inputs* of
  Conv/MatMul/Gemm only (it moves Qs and fuses them into the producer itself), and float biases: it has no
  int32 DQ. FP8 (E4M3) follows the same placement with scales at the E4M3 maximum, 448.

Why onnxruntime's own ``quantize_static`` gains nothing on an SD UNet (measured on SD-1.5's architecture, latent
64x64, batch 2, 2-core AVX-512 VNNI: diffc fp32 8.4 s per step): with S8S8 its graph does not even load in
onnxruntime 1.31 (a QuantizeLinear whose ``output_dtype`` disagrees with its zero point); with U8S8 it runs at
14.1 s, 0.6x of fp32. It quantizes the graph *before* attention is fused, so the attention core becomes
``QLinearMatMul`` (Q.K^T and P.V: per-head GEMMs with K = 40, 46% of the time together with the projections)
around a ``QLinearSoftmax`` over the 4096 x 4096 scores (3.9 s alone, where diffc's fused float
``MultiHeadAttention`` takes 1.7 s for the whole attention), and leaves 225 Q and 397 DQ nodes unfused.
This pass runs *after* attention fusion, quantizes only Conv/MatMul/Gemm with constant weights, and takes
``MatMulIntegerToFloat`` (no output Q) for linear layers: 3.9 s per step, 2.2x faster than fp32.

Sensitive layers stay in float by default (see :data:`DEFAULT_KEEP_FLOAT`): ``conv_in`` (reads the raw latent),
``conv_out`` (writes the prediction the sampler divides by small alphas), the time embedding MLP and the
per-resnet time projections (their input is the sinusoidal embedding; tiny GEMMs, large error), the
``skip_concat`` layers (the up path's 1x1 shortcut convs read the *un-normalized* concatenation of the main
branch and a skip feature, two tensors of different scale under one per-tensor scale: on the demo model they
were the most sensitive layers, and they are cheap) and the attention softmax (inside the fused attention
kernel; this pass never quantizes activation x activation products). ``output_block`` (every layer after the
last upsampler: the full-resolution up block, ~13% of SD-1.5's MACs) is the next most sensitive group, float
on request. Roles are found from the graph's data flow, not node names, so they hold for both exporters.

Scales come from calibration (:mod:`diffc.build.calibrate`): ``ranges`` maps a tensor name to the ``(lo, hi)``
range chosen for it. A tensor without a range is left in float (counted as ``no_range`` in the report).
"""

from __future__ import annotations

import collections
import enum
import logging
from typing import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from diffc.passes import QUANTIZE_ROLES
from diffc.passes._base import DiffcPass, PassOptionError

log = logging.getLogger("diffc.passes.quantize")

#: roles :func:`roles` assigns; ``attention_softmax`` is accepted in ``keep_float`` too (and always float here:
#: this pass never quantizes activation x activation products, so the softmax and its MatMuls stay float)
ROLES = tuple(r for r in QUANTIZE_ROLES if r != "attention_softmax")
#: layer roles left in float unless the profile says otherwise ([quantize].keep_float)
DEFAULT_KEEP_FLOAT = ("conv_in", "conv_out", "time_embedding", "skip_concat")
#: graph inputs that carry the timestep and the other per-image conditioning vectors (SDXL's pooled text and
#: size ids, FLUX's guidance, SD3 / FLUX's pooled projections): the time-embedding path depends on them only
TIME_INPUTS = ("timestep", "timestep_cond", "time_ids", "text_embeds", "guidance", "pooled_projections")
TEXT_INPUTS = ("encoder_hidden_states",)
FP8_E4M3_MAX = 448.0
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


class QType(str, enum.Enum):
    """Activation encoding; weights are always symmetric per output channel (int8, or E4M3 for fp8)."""

    UINT8 = "uint8"  # asymmetric, zero point in [0, 255]: onnxruntime on x86
    INT8 = "int8"  # symmetric, zero point 0: TensorRT
    FP8 = "fp8"  # E4M3FN, zero point 0: TensorRT on Ada / Hopper / Blackwell


def _e4m3_table() -> np.ndarray:
    """The 127 non-negative finite float values of E4M3FN, indexed by their 7-bit code (0x7F is NaN)."""
    codes = np.arange(127)
    exp, man = codes >> 3, codes & 7
    sub = man / 8.0 * 2.0 ** -6
    norm = (1.0 + man / 8.0) * 2.0 ** (exp - 7)
    return np.where(exp == 0, sub, norm)


_E4M3 = _e4m3_table()


def to_float8_e4m3(x: np.ndarray) -> np.ndarray:
    """Float values -> E4M3FN bit patterns (uint8), round to nearest (ties to the even code), saturating at
    +-448 as QuantizeLinear does (``saturate=1``). numpy has no float8 type; onnx stores these as raw bytes."""
    mag = np.minimum(np.abs(x.astype(np.float64)), FP8_E4M3_MAX)
    hi = np.clip(np.searchsorted(_E4M3, mag, side="left"), 0, 126)
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = mag - _E4M3[lo], _E4M3[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    return np.where(np.signbit(x) & (code > 0), code | 0x80, code).astype(np.uint8)


def from_float8_e4m3(bits: np.ndarray) -> np.ndarray:
    """E4M3FN bit patterns -> float32 (for tests and the fp8 error report)."""
    mag = _E4M3[np.minimum(bits & 0x7F, 126)]
    return np.where(bits & 0x80, -mag, mag).astype(np.float32)


def activation_qparams(lo: float, hi: float, qtype: QType) -> tuple[np.float32, int]:
    """(scale, zero point) for a tensor whose calibrated range is ``[lo, hi]``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)  # the range must hold 0 exactly (padding, ReLU zeros)
    if qtype is QType.UINT8:
        scale = (hi - lo) / 255.0 or 1.0
        return np.float32(scale), int(np.clip(round(-lo / scale), 0, 255))
    amax = max(-lo, hi) or 1.0
    return np.float32(amax / (FP8_E4M3_MAX if qtype is QType.FP8 else 127.0)), 0


def roles(graph: ir.Graph) -> dict[str, str]:
    """Role of every Conv/MatMul/Gemm node (by name), from which graph inputs its activation depends on.

    The transformer denoisers map onto the same roles, so a profile's ``keep_float`` means the same for every
    family: ``conv_in`` is any layer reading the latent input itself (the UNet's conv_in, the DiTs' patch
    embedding: a Conv for SD3 / PixArt / Sana, FLUX's ``x_embedder`` Linear); ``conv_out`` is the last layer
    before the output (the UNet's conv_out, the DiTs' ``proj_out``: no Conv / MatMul / Gemm after it, only
    bias, unpatchify reshapes, slices); ``time_embedding`` is every layer whose input depends on the
    conditioning vectors alone (:data:`TIME_INPUTS`): the timestep / guidance / pooled-text embedders *and*
    the AdaLN modulation linears of every block and of ``norm_out``, which read ``silu(temb)``. Those run on
    one row per image (M = batch), a negligible share of the MACs, so float costs nothing there.
    """
    deps: dict[int, frozenset[str]] = {}
    for v in graph.inputs:
        deps[id(v)] = frozenset([v.name])
    out: dict[str, str] = {}
    resizes = [n for n in graph if n.op_type == "Resize"]
    after_last_upsampler = _descendants(resizes[-1]) if resizes else set()
    last = _last_layers(graph)
    conditioning = set(TIME_INPUTS) | set(TEXT_INPUTS)
    for node in graph:
        inputs = [v for v in node.inputs if v is not None and node.op_type not in ("Shape", "Size")]
        # (a shape read is not a data dependency: diffusers broadcasts the timestep to sample.shape[0])
        d = frozenset().union(*(deps.get(id(v), frozenset()) for v in inputs)) if inputs else frozenset()
        for v in node.outputs:
            deps[id(v)] = d
        if node.op_type not in QUANTIZED_OPS or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        x = node.inputs[0]
        xd = deps.get(id(x), frozenset()) if x is not None else frozenset()
        if x is not None and x.is_graph_input() and x.name not in conditioning:
            role = "conv_in"
        elif id(node) in last:
            role = "conv_out"
        elif xd and xd <= set(TIME_INPUTS):
            role = "time_embedding"
        elif x is not None and x.producer() is not None and x.producer().op_type == "Concat" \
                and node.op_type == "Conv":
            role = "skip_concat"
        elif id(node) in after_last_upsampler:
            role = "output_block"
        elif xd and xd <= set(TEXT_INPUTS):
            role = "text_projection"
        else:
            role = "layer"
        out[node.name] = role
    return out


def _last_layers(graph: ir.Graph) -> set[int]:
    """ids of the Conv/MatMul/Gemm nodes that reach a graph output with no Conv/MatMul/Gemm after them.

    A use inside an If / Loop body counts as a use by that node (PixArt's legacy export squeezes the
    ``proj_out`` output in an If)."""
    owner: dict[int, ir.Node] = {}
    for node in graph:
        for attr in node.attributes.values():
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                for sub in ([attr.value] if attr.type == ir.AttributeType.GRAPH else attr.value):
                    for inner in ir.traversal.RecursiveGraphIterator(sub):
                        owner[id(inner)] = node
    outputs = {id(v) for v in graph.outputs}
    # reverse graph order: a node's users are settled before it
    gemm_after: dict[int, bool] = {}
    reaches_out: dict[int, bool] = {}
    last: set[int] = set()
    for node in reversed(list(graph)):
        users = {id(owner.get(id(u), u)): owner.get(id(u), u) for o in node.outputs for u, _ in o.uses()}
        after = any(u.op_type in QUANTIZED_OPS or gemm_after.get(k, False) for k, u in users.items())
        reaches = any(id(o) in outputs for o in node.outputs) or any(reaches_out.get(k, False) for k in users)
        gemm_after[id(node)], reaches_out[id(node)] = after, reaches
        if node.op_type in QUANTIZED_OPS and reaches and not after:
            last.add(id(node))
    return last


def _descendants(start: ir.Node) -> set[int]:
    """ids of every node downstream of ``start`` (its consumers, theirs, ...)."""
    seen: set[int] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        for out in node.outputs:
            for user, _ in out.uses():
                if id(user) not in seen:
                    seen.add(id(user))
                    todo.append(user)
    return seen


def check_keep_float(keep_float: Iterable[str]) -> tuple[str, ...]:
    keep = tuple(keep_float)
    bad = sorted(set(keep) - set(QUANTIZE_ROLES))
    if bad or isinstance(keep_float, str):
        raise PassOptionError(f"[quantize].keep_float names unknown role {bad[0] if bad else keep_float!r}; "
                              f"roles: {list(QUANTIZE_ROLES)}")
    return keep


def calibration_targets(graph: ir.Graph, *, keep_float: Iterable[str] = DEFAULT_KEEP_FLOAT,
                        output_ranges: bool = True) -> list[str]:
    """Names of the tensors whose ranges :class:`QuantizePass` will need: the activation input of every
    quantizable node, and (``output_ranges``, onnxruntime) every Conv output."""
    keep = set(check_keep_float(keep_float))
    node_roles = roles(graph)
    names: dict[str, None] = {}
    for node in graph:
        if _weight_axis(node) is None or node_roles.get(node.name) in keep:
            continue
        names[node.inputs[0].name] = None
        if output_ranges and node.op_type == "Conv" and not node.outputs[0].is_graph_output():
            names[node.outputs[0].name] = None
    return list(names)


def _weight_axis(node: ir.Node) -> int | None:
    """The per-output-channel axis of the node's constant weight, or None if the node is not quantizable
    (not Conv/MatMul/Gemm, weight not a constant, already quantized)."""
    if node.op_type not in QUANTIZED_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if x is None or w is None or w.const_value is None:
        return None  # weights from Dequantize (already quantized) or activation x activation products
    if w.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return None
    rank = len(w.const_value.shape)
    if node.op_type == "Conv":
        return 0 if rank >= 3 else None
    if node.op_type == "MatMul":
        return 1 if rank == 2 else None
    if rank != 2:
        return None
    return 0 if node.attributes.get_int("transB", 0) else 1


class QuantizePass(DiffcPass):
    """Insert Q/DQ around Conv / MatMul / Gemm nodes with constant weights.

    ``qtype``: activation encoding (:class:`QType`). ``ranges``: calibrated ``(lo, hi)`` per activation tensor.
    ``keep_float``: roles left in float (:data:`ROLES`). ``output_qdq``: also quantize each Conv's output
    (onnxruntime needs it to fuse ``QLinearConv``; TensorRT does not). ``int32_bias``: quantize Conv biases to
    int32 at scale ``x_scale * w_scale`` (onnxruntime's ``QLinearConv`` takes them so; TensorRT cannot).
    """

    name = "quantize"
    needs_shapes = False

    def __init__(self, *, qtype: QType | str, ranges: Mapping[str, tuple[float, float]],
                 keep_float: Iterable[str] = DEFAULT_KEEP_FLOAT, output_qdq: bool = True,
                 int32_bias: bool = True) -> None:
        super().__init__()
        self.qtype = QType(qtype)
        self.ranges = dict(ranges)
        self.keep_float = set(check_keep_float(keep_float))
        self.output_qdq = output_qdq
        self.int32_bias = int32_bias and self.qtype is QType.UINT8

    # --------------------------------------------------------------------------- tensors

    def _const(self, graph: ir.Graph, name: str, array: np.ndarray | ir.Tensor) -> ir.Value:
        tensor = array if isinstance(array, ir.TensorProtocol) else ir.tensor(array, name=name)
        value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
        graph.register_initializer(value)
        return value

    def _zero_point(self, graph: ir.Graph, name: str, zp: int | np.ndarray, shape: tuple[int, ...] = ()) -> ir.Value:
        if self.qtype is QType.FP8:
            data = np.zeros(shape, np.uint8)
            return self._const(graph, name, ir.Tensor(data, dtype=ir.DataType.FLOAT8E4M3FN, name=name))
        dtype = np.uint8 if self.qtype is QType.UINT8 else np.int8
        return self._const(graph, name, np.full(shape, zp, dtype))

    def _quantized_weight(self, graph: ir.Graph, w: ir.Value, axis: int) -> tuple[ir.Value, np.ndarray]:
        """Per-channel symmetric weight: (DequantizeLinear output, scales)."""
        wf = w.const_value.numpy().astype(np.float32)
        moved = np.moveaxis(wf, axis, 0).reshape(wf.shape[axis], -1)
        amax = np.abs(moved).max(axis=1)
        qmax = FP8_E4M3_MAX if self.qtype is QType.FP8 else 127.0
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        bshape = [1] * wf.ndim
        bshape[axis] = -1
        if self.qtype is QType.FP8:
            q = ir.Tensor(to_float8_e4m3(wf / scale.reshape(bshape)), dtype=ir.DataType.FLOAT8E4M3FN,
                          name=f"{w.name}_quantized")
            zp = ir.Tensor(np.zeros(scale.shape, np.uint8), dtype=ir.DataType.FLOAT8E4M3FN, name=f"{w.name}_zero_point")
        else:
            q = np.clip(np.round(wf / scale.reshape(bshape)), -127, 127).astype(np.int8)
            zp = np.zeros(scale.shape, np.int8)
        q_val = self._const(graph, f"{w.name}_quantized", q)
        s_val = self._const(graph, f"{w.name}_scale", scale)
        z_val = self._const(graph, f"{w.name}_zero_point", zp)
        dq = ir.node("DequantizeLinear", [q_val, s_val, z_val], attributes={"axis": axis},
                     name=f"{w.name}_DequantizeLinear")
        dq.outputs[0].name = f"{w.name}_dequantized"
        return dq, scale

    def _activation_qdq(self, graph: ir.Graph, x: ir.Value, cache: dict[str, tuple], consumer: str
                        ) -> tuple[list[ir.Node], ir.Value, np.float32] | None:
        """One QuantizeLinear per tensor (shared), one DequantizeLinear per consumer (onnxruntime's fusions
        want a DQ per node unit). Returns (new nodes, DQ output, scale), or None when ``x`` has no range.
        A tensor this pass already quantized (a Conv output) is read through a new DQ of the same Q."""
        new: list[ir.Node] = []
        producer = x.producer()
        if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0] is not None \
                and producer.inputs[0].producer() is not None \
                and producer.inputs[0].producer().op_type == "QuantizeLinear":
            q_out, s_val, z_val = producer.inputs[0], producer.inputs[1], producer.inputs[2]
            scale = np.float32(s_val.const_value.numpy())
            source = q_out.producer().inputs[0].name
        elif x.name in self.ranges:
            source = x.name
            if source not in cache:
                scale, zp = activation_qparams(*self.ranges[source], self.qtype)
                s_val = self._const(graph, f"{source}_scale", np.array(scale, np.float32))
                z_val = self._zero_point(graph, f"{source}_zero_point", zp)
                q = ir.node("QuantizeLinear", [x, s_val, z_val], name=f"{source}_QuantizeLinear")
                q.outputs[0].name = f"{source}_quantized"
                new.append(q)
                cache[source] = (q.outputs[0], s_val, z_val, scale)
            q_out, s_val, z_val, scale = cache[source]
        else:
            return None
        dq = ir.node("DequantizeLinear", [q_out, s_val, z_val], name=f"{source}_DequantizeLinear_{consumer}")
        dq.outputs[0].name = f"{source}_dequantized_{consumer}"
        new.append(dq)
        return new, dq.outputs[0], scale

    # --------------------------------------------------------------------------- the pass

    def run(self, model: ir.Model) -> dict[str, int]:
        graph = model.graph
        node_roles = roles(graph)
        fired = collections.Counter({"conv": 0, "matmul": 0, "gemm": 0, "conv_output": 0, "int32_bias": 0})
        cache: dict[str, tuple] = {}
        for node in list(graph):
            axis = _weight_axis(node)
            if axis is None:
                continue
            role = node_roles.get(node.name, "layer")
            x, w = node.inputs[0], node.inputs[1]
            if role in self.keep_float:
                continue
            if self.output_qdq and node.op_type == "Conv" and not node.outputs[0].is_graph_output() \
                    and node.outputs[0].name not in self.ranges:
                continue  # a Conv onnxruntime cannot fuse would run slower than float: leave it
            act = self._activation_qdq(graph, x, cache, node.name)
            if act is None:
                continue
            qdq, x_dq, x_scale = act
            w_dq, w_scale = self._quantized_weight(graph, w, axis)
            graph.insert_before(node, [*qdq, w_dq])
            node.replace_input_with(0, x_dq)
            node.replace_input_with(1, w_dq.outputs[0])
            if node.op_type == "Conv" and len(node.inputs) > 2 and node.inputs[2] is not None \
                    and self.int32_bias and node.inputs[2].const_value is not None:
                node.replace_input_with(2, self._int32_bias(graph, node, node.inputs[2], x_scale, w_scale))
                fired["int32_bias"] += 1
            if self.output_qdq and node.op_type == "Conv" and not node.outputs[0].is_graph_output():
                self._output_qdq(graph, node)
                fired["conv_output"] += 1
            fired[node.op_type.lower()] += 1
        if sum(fired.values()):
            for init in [v for v in graph.initializers.values() if not v.uses() and not v.is_graph_output()]:
                graph.initializers.pop(init.name)
        return dict(fired)

    def _int32_bias(self, graph: ir.Graph, node: ir.Node, b: ir.Value, x_scale: np.float32,
                    w_scale: np.ndarray) -> ir.Value:
        scale = (np.float64(x_scale) * w_scale.astype(np.float64)).astype(np.float32)
        bq = np.round(b.const_value.numpy().astype(np.float64) / scale).clip(-2**31, 2**31 - 1).astype(np.int32)
        q_val = self._const(graph, f"{b.name}_quantized", bq)
        s_val = self._const(graph, f"{b.name}_scale", scale)
        z_val = self._const(graph, f"{b.name}_zero_point", np.zeros(scale.shape, np.int32))
        dq = ir.node("DequantizeLinear", [q_val, s_val, z_val], attributes={"axis": 0},
                     name=f"{b.name}_DequantizeLinear")
        dq.outputs[0].name = f"{b.name}_dequantized"
        graph.insert_before(node, dq)
        return dq.outputs[0]

    def _output_qdq(self, graph: ir.Graph, node: ir.Node) -> None:
        y = node.outputs[0]
        users = list(y.uses())  # before the Q below becomes one
        scale, zp = activation_qparams(*self.ranges[y.name], self.qtype)
        s_val = self._const(graph, f"{y.name}_scale", np.array(scale, np.float32))
        z_val = self._zero_point(graph, f"{y.name}_zero_point", zp)
        q = ir.node("QuantizeLinear", [y, s_val, z_val], name=f"{y.name}_QuantizeLinear")
        q.outputs[0].name = f"{y.name}_quantized"
        dq = ir.node("DequantizeLinear", [q.outputs[0], s_val, z_val], name=f"{y.name}_DequantizeLinear")
        dq.outputs[0].name = f"{y.name}_dequantized"
        graph.insert_after(node, [q, dq])
        for user, idx in users:
            user.replace_input_with(idx, dq.outputs[0])
