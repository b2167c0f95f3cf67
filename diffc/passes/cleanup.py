"""Clean-up: constant folding, shape simplification, dead-node / identity / duplicate elimination.

Why: both torch exporters leave work in the graph that no backend should redo every step, and that hides the
patterns the fusion passes look for. The legacy (TorchScript) exporter computes every attention head size and
softmax scale at run time (``Shape -> Gather -> Div -> Cast -> Sqrt ...``), emits ``Identity`` and ``Constant``
nodes by the hundred, and repeats the causal-mask construction in every CLIP layer; the dynamo exporter
reshapes through ``Shape -> Slice -> Concat`` chains. Once shapes are inferred with data propagation, most of
those chains are constants: head counts and scales become attributes the attention fusion can read.

This pass uses onnxscript's constant folder and default rewrite rules and onnx_ir's common passes rather
than home-made ones, iterated to a fixed point: shape inference can only see through a ``Reshape`` once the
folder has made its shape input partly constant, which can in turn make the next ``Shape`` foldable.
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer
from onnxscript import rewriter as _rewriter
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import _no_op

from diffc.passes._base import DiffcPass, apply_rules

log = logging.getLogger("diffc.passes.cleanup")

#: onnxscript's default rules: no-op elimination (Mul by 1, Reshape to own shape...), Slice/Cast/Reshape
#: simplification, Pad/BatchNorm into Conv. Not onnxscript's ``ort_fusions.shape_optimization.ExtractDim``:
#: it reads a dimension back out of a Reshape's shape operand without checking for -1, and on dynamo UNet
#: exports turns ``[-1, S, D]`` into the invalid ``[-1, -1, D]`` (onnxscript 0.7.2).
#: Private API: onnxscript exposes its default rule set only as ``rewriter._DEFAULT_REWRITE_RULES`` (its public
#: ``rewriter.rewrite()`` applies them but returns no count, and this pass reports how often rules fired);
#: copying the list instead would drift from onnxscript's as it gains rules.
#: The no-op rules (``x + 0``, ``x * 1`` ...) are replaced by exact ones (:func:`_exact_no_op_rules`): onnxscript
#: matches a pattern constant with ``abs_tol=1e-8``, so it removes Sana's linear-attention ``+ 1e-15`` guard
#: from ``num / (den + eps)`` and the output turns NaN wherever the ReLU kernel's denominator is 0.
#: (Private API: onnxscript names its no-op rules only in ``rules.common._no_op``; its Dropout rules are kept.)
_NO_OP = frozenset(r for r in _no_op.rules.rules
                   if r not in (_no_op.dropout_zero_rule, _no_op.dropout_inference_rule))


def _exact_no_op_rules() -> tuple[pattern.RewriteRule, ...]:
    """``x + 0``, ``0 + x``, ``x - 0``, ``x * 1``, ``1 * x``, ``x / 1`` -> ``x``, only for an exact 0 / 1 that
    does not broadcast ``x`` to a larger shape or another type."""

    def exact(want: float):
        def condition(context, x, c, **_) -> bool:
            array = None if c is None else ir.convenience.get_const_tensor(c)
            if array is None or x.dtype is None or c.dtype != x.dtype:
                return False
            values = array.numpy()
            if values.size != 1 or float(values.reshape(-1)[0]) != want:
                return False
            return values.ndim == 0 or (x.shape is not None and len(x.shape) >= values.ndim)
        return condition

    def identity(op, x, **_):
        return op.Identity(x)

    return (
        pattern.RewriteRule(lambda op, x, c: op.Add(x, c), identity, exact(0.0), name="AddZero"),
        pattern.RewriteRule(lambda op, x, c: op.Add(c, x), identity, exact(0.0), name="ZeroAdd"),
        pattern.RewriteRule(lambda op, x, c: op.Sub(x, c), identity, exact(0.0), name="SubZero"),
        pattern.RewriteRule(lambda op, x, c: op.Mul(x, c), identity, exact(1.0), name="MulOne"),
        pattern.RewriteRule(lambda op, x, c: op.Mul(c, x), identity, exact(1.0), name="OneMul"),
        pattern.RewriteRule(lambda op, x, c: op.Div(x, c), identity, exact(1.0), name="DivOne"),
    )


_RULES = _exact_no_op_rules() + tuple(r for r in _rewriter._DEFAULT_REWRITE_RULES if r not in _NO_OP)


def _read_of_shape(node: ir.Node) -> np.ndarray | None:
    """``Gather(Shape(x), i)`` / ``Slice(Shape(x), ...)`` whose selected dims of ``x`` are static -> the value.

    onnxscript's folder only folds these when *all* of ``x``'s dims are static (and Gather only with 1-D
    indices); the legacy exporter reads single static dims (hidden size, head size) out of shapes whose batch
    and sequence axes are dynamic, always with scalar indices.
    """
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Gather", "Slice"):
        return None
    src = node.inputs[0]
    shape_node = src.producer() if src is not None else None
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.domain not in ("", "ai.onnx"):
        return None
    x = shape_node.inputs[0]
    if x is None or x.shape is None:
        return None
    rank = len(x.shape)
    start = shape_node.attributes.get_int("start", 0)
    end = shape_node.attributes.get_int("end", rank)
    dims = list(x.shape)[slice(start, end)]
    if node.op_type == "Gather":
        if node.attributes.get_int("axis", 0) != 0 or len(node.inputs) < 2:
            return None
        idx = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
        if idx is None:
            return None
        idx = idx.numpy()
        picked = [dims[int(i)] for i in idx.reshape(-1)]
        if not all(isinstance(d, int) for d in picked):
            return None
        return np.array(picked, dtype=np.int64).reshape(idx.shape)
    consts = []
    for v in node.inputs[1:]:
        t = ir.convenience.get_const_tensor(v) if v is not None else None
        if v is not None and t is None:
            return None
        consts.append(None if t is None else t.numpy().reshape(-1))
    while len(consts) < 4:
        consts.append(None)
    starts, ends, axes, steps = consts
    if starts is None or ends is None or len(starts) != 1 or (axes is not None and int(axes[0]) not in (0, -1)):
        return None
    if steps is not None and int(steps[0]) != 1:
        return None
    # ONNX clamps out-of-range starts/ends (INT64_MAX means "to the end") the way Python slicing does
    picked = dims[int(starts[0]):int(ends[0])]
    if not all(isinstance(d, int) for d in picked):
        return None
    return np.array(picked, dtype=np.int64)


def fold_static_shape_reads(graph: ir.Graph) -> int:
    """Replace every :func:`_read_of_shape` by a constant; returns how many. The Shape nodes die later."""
    count = 0
    for node in list(graph):
        value = _read_of_shape(node)
        out = node.outputs[0]
        if value is None or out.is_graph_output():
            continue
        const = ir.node("Constant", [], attributes={"value": ir.tensor(value)}, name=f"{node.name}_static")
        const.outputs[0].shape = ir.Shape(value.shape)
        const.outputs[0].dtype = ir.DataType.INT64
        graph.insert_before(node, const)
        ir.convenience.replace_all_uses_with(out, const.outputs[0])
        count += 1
    return count


def eliminate_identities(graph: ir.Graph) -> int:
    """Remove the main graph's ``Identity`` nodes; returns how many.

    Not onnx_ir's ``IdentityEliminationPass``: it also rewrites If / Loop bodies, and there an Identity that
    returns an outer-scope value must stay (onnxruntime refuses a subgraph whose output *is* an outer value;
    the legacy exporter writes exactly that for PixArt's ``squeeze(1)`` of a dynamic axis), and it renames
    the outer value after the subgraph output, which breaks the outer graph's names too.
    """
    count = 0
    for node in list(graph):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1 \
                or len(node.outputs) != 1 or node.inputs[0] is None:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if y.is_graph_output() and (x.is_graph_input() or x.is_initializer() or x.is_graph_output()):
            continue  # a graph output that must stay a distinct value
        if x.type is None:
            x.type = y.type
        if x.shape is None:
            x.shape = y.shape
        was_output = y.is_graph_output()
        ir.convenience.replace_all_uses_with(y, x, replace_graph_outputs=True)
        if was_output:
            x.name = y.name  # the graph's output keeps its name
        graph.remove(node, safe=True)
        count += 1
    return count


def fold_constants(model: ir.Model, *, input_size_limit: int, output_size_limit: int) -> int:
    """onnxscript's constant folder over ``model``; returns how many nodes it rewrote (replaced by constants or
    by simpler nodes). The folder reports only whether it changed something; each node it rewrites leaves the
    graph (``replace_nodes_and_values``), so the rewrites are the nodes present before and gone after. The
    producers that only fed a folded node die with it and are not counted again."""
    before = {id(n) for n in model.graph}
    optimizer.fold_constants(model, onnx_shape_inference=True, input_size_limit=input_size_limit,
                             output_size_limit=output_size_limit)
    return len(before - {id(n) for n in model.graph})


def _count(graph: ir.Graph, op_type: str) -> int:
    return sum(1 for n in graph if n.op_type == op_type and n.domain in ("", "ai.onnx"))


class CleanupPass(DiffcPass):
    """Fold constants, simplify shape arithmetic, drop dead/identity/duplicate nodes; repeat to a fixed point.

    Fire counts, each the number of rewrites made (not a difference of node counts): ``folded`` (static shape
    reads and the constant folder's node rewrites; the producers that only fed them die with them, uncounted),
    ``simplified`` (onnxscript rewrite-rule applications), ``identities_removed``, ``duplicates_merged``
    (common subexpressions merged), ``dead_removed`` (nodes no output depended on when an iteration began),
    ``constants_lifted`` (``Constant`` nodes made initializers, which is what ORT and TensorRT expect weights to
    be), ``functions_inlined``.
    """

    name = "cleanup"
    needs_shapes = False  # runs shape inference itself, every iteration

    def __init__(self, *, max_iterations: int = 6, fold_input_size_limit: int = 8192,
                 fold_output_size_limit: int = 512 * 512) -> None:
        super().__init__()
        self.max_iterations = max_iterations
        self.fold_input_size_limit = fold_input_size_limit
        self.fold_output_size_limit = fold_output_size_limit

    def run(self, model: ir.Model) -> dict[str, int]:
        counts: collections.Counter[str] = collections.Counter()
        g = model.graph
        if model.functions:
            counts["functions_inlined"] += len(model.functions)
            common_passes.InlinePass()(model)
            common_passes.RemoveUnusedFunctionsPass()(model)

        for iteration in range(self.max_iterations):
            step: collections.Counter[str] = collections.Counter()
            nodes_before = len(g)
            common_passes.ShapeInferencePass(data_prop=True)(model)

            n = len(g)
            common_passes.RemoveUnusedNodesPass()(model)
            step["dead_removed"] += n - len(g)

            step["folded"] += fold_static_shape_reads(g)
            step["folded"] += fold_constants(model, input_size_limit=self.fold_input_size_limit,
                                             output_size_limit=self.fold_output_size_limit)
            common_passes.RemoveUnusedNodesPass()(model)  # what fed only the folded nodes

            step["simplified"] += apply_rules(model, _RULES, lift_constants=False)

            step["identities_removed"] += eliminate_identities(g)

            n = len(g)
            common_passes.CommonSubexpressionEliminationPass()(model)
            step["duplicates_merged"] += n - len(g)
            common_passes.RemoveUnusedNodesPass()(model)  # what fed only the merged duplicates

            counts.update(step)
            log.debug("cleanup iteration %d: %s", iteration, dict(step))
            # a fixed point: nothing fired and nothing changed uncounted (the folder may rewire inputs only)
            if not any(v > 0 for v in step.values()) and len(g) == nodes_before:
                break

        n = _count(g, "Constant")
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        counts["constants_lifted"] += n - _count(g, "Constant")
        common_passes.RemoveUnusedOpsetsPass()(model)
        common_passes.ShapeInferencePass(data_prop=True)(model)
        keys = ("folded", "simplified", "identities_removed", "duplicates_merged", "dead_removed",
                "constants_lifted", "functions_inlined")
        return {k: counts[k] for k in keys}
