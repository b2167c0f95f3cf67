"""Dynamic step caching: cut a step-marked denoiser into a *head* graph and a *tail* graph.

Why: from one sampler step to the next, most of a denoiser's work often changes its output little. First-block
caching (FBCache, TeaCache's plain variant) runs only the first block on every step and decides from how much its
result moved whether the rest must run (diffc.runtime.step_cache has the rule). That needs the denoiser as two
graphs: the head (embeddings and the first block) and the tail (everything after it).

The boundary is found by name: the exporter marks the first block's results as graph outputs ``step_cache_<k>``
and the compared tensor as ``step_cache_decision`` (diffc.exporter.step_marks), so the cut works on graphs from
either torch exporter and after every other pass (passes keep graph outputs).

``StepHeadPass``: the marks become the only outputs (``out_sample`` goes); dead-code elimination leaves the
embeddings and the first block. ``StepTailPass``: every mark the rest reads becomes a graph input of the same
name and ``out_sample`` the only output; dead-code elimination removes the first block (the time / text
embeddings stay: the tail recomputes them from the denoiser's inputs). Both keep the denoiser's own inputs, even
unused ones, so a runner feeds head and tail the same feeds (the tail also the head's marks). The cut tensors'
axes other than the batch and channel / hidden axis are named symbolically (``<mark>_<axis>``), since an exporter
may write the traced size into an output it was not told is dynamic.

:func:`split` runs them on copies of one marked ``ir.Model``, with ``StepFullPass`` (the marks dropped: the whole
denoiser, which a call without the step cache runs), and reports node counts.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from diffc.passes._base import DiffcPass, PassError

log = logging.getLogger("diffc.passes.step_cache")

MARK = re.compile(r"^step_cache_(\d+|decision)$")
DECISION = "step_cache_decision"
OUTPUT = "out_sample"


def marks(graph: ir.Graph) -> list[ir.Value]:
    """The step-cache marks among ``graph``'s outputs (the decision tensor first, then ``step_cache_<k>`` in
    order)."""
    found = [v for v in graph.outputs if MARK.match(v.name or "")]
    return sorted(found, key=lambda v: -1 if v.name == DECISION else int(v.name.rsplit("_", 1)[1]))


def _require_marks(graph: ir.Graph) -> list[ir.Value]:
    found = marks(graph)
    if not any(v.name == DECISION for v in found) or len(found) < 2:
        raise PassError("step_cache: the graph has no step_cache_decision / step_cache_<k> outputs to cut at; export "
                        "the denoiser with step marks (a profile with [savings.step_cache] does)")
    return found


def symbolic_shape(value: ir.Value) -> ir.Shape | None:
    """``value``'s shape with every axis but the batch (0) and the channel / hidden one (1 for rank 4, the last
    for rank 3) named ``<name>_<axis>``."""
    shape = value.shape
    if shape is None:
        return None
    keep = {1} if len(shape) == 4 else {len(shape) - 1}
    dims = ["batch" if i == 0 else d if i in keep and isinstance(d, int) else f"{value.name}_{i}"
            for i, d in enumerate(shape)]
    return ir.Shape(dims)


def _remove_dead(model: ir.Model) -> tuple[int, int]:
    nodes, inits = len(model.graph), len(model.graph.initializers)
    common_passes.RemoveUnusedNodesPass()(model)
    return nodes - len(model.graph), inits - len(model.graph.initializers)


class StepFullPass(DiffcPass):
    """Drop the step-cache marks: the whole denoiser as it was before marking (the no-savings path).

    Fire counts: ``marks_dropped``, ``nodes_removed``, ``initializers_removed``.
    """

    name = "step_cache_full"
    needs_shapes = False

    def run(self, model: ir.Model) -> dict[str, int]:
        g = model.graph
        found = marks(g)
        for value in found:
            g.outputs.remove(value)
        nodes, inits = _remove_dead(model) if found else (0, 0)
        return {"marks_dropped": len(found), "nodes_removed": nodes, "initializers_removed": inits}


class StepHeadPass(DiffcPass):
    """Keep the step-cache marks as the only outputs: the head graph.

    Fire counts: ``outputs_dropped``, ``nodes_removed``, ``initializers_removed``.
    """

    name = "step_cache_head"
    needs_shapes = False

    def run(self, model: ir.Model) -> dict[str, int]:
        g = model.graph
        found = _require_marks(g)
        dropped = [v for v in g.outputs if v not in found]
        for value in dropped:
            g.outputs.remove(value)
        for value in found:
            value.shape = symbolic_shape(value)
        nodes, inits = _remove_dead(model) if dropped else (0, 0)
        return {"outputs_dropped": len(dropped), "nodes_removed": nodes, "initializers_removed": inits}


class StepTailPass(DiffcPass):
    """Cut the graph after the first block: the marks the rest reads become inputs, the first block goes.

    Fire counts: ``cut`` (marks that became inputs), ``marks_dropped`` (marks the rest does not read: a
    transformer's decision residual, a duplicate mark), ``nodes_removed``, ``initializers_removed``.
    """

    name = "step_cache_tail"
    needs_shapes = False

    def run(self, model: ir.Model) -> dict[str, int]:
        g = model.graph
        found = marks(g)
        if not found and any(MARK.match(v.name or "") for v in g.inputs):
            return {"cut": 0, "marks_dropped": 0, "nodes_removed": 0, "initializers_removed": 0}
        found = _require_marks(g)
        if not any(v.name == OUTPUT for v in g.outputs):
            raise PassError(f"step_cache: the graph has no {OUTPUT!r} output; it is not a diffc denoiser export")
        for v in found:
            g.outputs.remove(v)
        cut = dropped = 0
        for value in found:
            name = value.name
            # the decision tensor is cut too when the rest reads it (a UNet's first-block output: the exporter
            # then marks the same tensor twice, once through an Identity that nothing reads)
            if value.uses():
                new_input = ir.Value(name=name, type=value.type, shape=symbolic_shape(value))
                value.name = f"{name}_computed"
                value.replace_all_uses_with(new_input)
                g.inputs.append(new_input)
                cut += 1
            else:
                dropped += 1
        if not cut:
            raise PassError("step_cache: nothing after the first block reads its marks; the marks do not cut the "
                            "denoiser. Build without [savings.step_cache] and report the model config")
        nodes, inits = _remove_dead(model)
        return {"cut": cut, "marks_dropped": dropped, "nodes_removed": nodes, "initializers_removed": inits}


def split(model: ir.Model) -> tuple[ir.Model, ir.Model, ir.Model, dict[str, Any]]:
    """``(full, head, tail, report)`` from a step-marked denoiser (``model`` is not modified). Report: ``nodes``
    (marked / full / head / tail), ``head_fraction`` (head nodes over full nodes), ``initializers``,
    ``head_outputs`` and ``tail_inputs`` (the cut tensors' names), each pass's fire counts."""
    _require_marks(model.graph)
    report: dict[str, Any] = {"nodes": {"marked": len(model.graph)}}
    out = []
    for key, instance in (("full", StepFullPass()), ("head", StepHeadPass()), ("tail", StepTailPass())):
        part = model.clone()  # nodes and values copied; the weights' tensors are shared, never modified here
        instance(part)
        report[key] = dict(instance.fired)
        report["nodes"][key] = len(part.graph)
        report.setdefault("initializers", {})[key] = len(part.graph.initializers)
        out.append(part)
    full, head, tail = out
    report["head_outputs"] = [v.name for v in head.graph.outputs]
    report["tail_inputs"] = [v.name for v in tail.graph.inputs if MARK.match(v.name or "")]
    report["head_fraction"] = round(report["nodes"]["head"] / max(1, report["nodes"]["full"]), 4)
    log.info("step cache: %d nodes, head %d, tail %d (cut at %s)", report["nodes"]["full"],
             report["nodes"]["head"], report["nodes"]["tail"], report["tail_inputs"])
    return full, head, tail, report
