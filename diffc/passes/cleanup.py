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

from diffc.passes._base import DiffcPass, apply_rules

log = logging.getLogger("diffc.passes.cleanup")

#: onnxscript's default rules: no-op elimination (Mul by 1, Reshape to own shape...), Slice/Cast/Reshape
#: simplification, Pad/BatchNorm into Conv. Not onnxscript's ``ort_fusions.shape_optimization.ExtractDim``:
#: it reads a dimension back out of a Reshape's shape operand without checking for -1, and on dynamo UNet
#: exports turns ``[-1, S, D]`` into the invalid ``[-1, -1, D]`` (onnxscript 0.7.2).
#: Private API: onnxscript exposes its default rule set only as ``rewriter._DEFAULT_REWRITE_RULES`` (its public
#: ``rewriter.rewrite()`` applies them but returns no count, and this pass reports how often rules fired);
#: copying the list instead would drift from onnxscript's as it gains rules.
_RULES = tuple(_rewriter._DEFAULT_REWRITE_RULES)


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


def _compute_nodes(graph: ir.Graph) -> int:
    return sum(1 for n in graph if n.op_type != "Constant" or n.domain not in ("", "ai.onnx"))


def _count(graph: ir.Graph, op_type: str) -> int:
    return sum(1 for n in graph if n.op_type == op_type and n.domain in ("", "ai.onnx"))


class CleanupPass(DiffcPass):
    """Fold constants, simplify shape arithmetic, drop dead/identity/duplicate nodes; repeat to a fixed point.

    Fire counts: ``folded`` (compute nodes replaced by constants, incl. the dead chains behind them),
    ``simplified`` (onnxscript rewrite-rule applications), ``identities_removed``, ``duplicates_merged``
    (common subexpressions), ``dead_removed``, ``constants_lifted`` (``Constant`` nodes made initializers,
    which is what ORT and TensorRT expect weights to be), ``functions_inlined``.
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
            common_passes.ShapeInferencePass(data_prop=True)(model)

            n = len(g)
            common_passes.RemoveUnusedNodesPass()(model)
            step["dead_removed"] += n - len(g)

            n = _compute_nodes(g)
            fold_static_shape_reads(g)
            optimizer.fold_constants(model, onnx_shape_inference=True, input_size_limit=self.fold_input_size_limit,
                                     output_size_limit=self.fold_output_size_limit)
            common_passes.RemoveUnusedNodesPass()(model)
            step["folded"] += n - _compute_nodes(g)

            step["simplified"] += apply_rules(model, _RULES, lift_constants=False)

            n = _count(g, "Identity")
            common_passes.IdentityEliminationPass()(model)
            step["identities_removed"] += n - _count(g, "Identity")

            n = len(g)
            common_passes.CommonSubexpressionEliminationPass()(model)
            step["duplicates_merged"] += n - len(g)

            n = len(g)
            common_passes.RemoveUnusedNodesPass()(model)
            step["dead_removed"] += n - len(g)

            counts.update(step)
            log.debug("cleanup iteration %d: %s", iteration, dict(step))
            if not any(v > 0 for v in step.values()):
                break

        n = _count(g, "Constant")
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        counts["constants_lifted"] += n - _count(g, "Constant")
        common_passes.RemoveUnusedOpsetsPass()(model)
        common_passes.ShapeInferencePass(data_prop=True)(model)
        keys = ("folded", "simplified", "identities_removed", "duplicates_merged", "dead_removed",
                "constants_lifted", "functions_inlined")
        return {k: max(0, counts[k]) for k in keys}
