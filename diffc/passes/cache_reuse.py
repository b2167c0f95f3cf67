"""Cache reuse (DeepCache): split a cache-marked UNet into a full graph and a shallow graph.

Why: the deep features of a UNet change slowly from one denoising step to the next. On a *full* step the UNet
also returns the main-branch tensor entering one up layer (the cached feature); on the following *shallow*
steps a much smaller graph recomputes only the shallow down layers and the up path from that point, reading
the deep part from the cache. Which steps are full is the manifest's ``cache.full_steps`` mask
(diffc.runtime.cache); the graphs here know nothing about schedules.

The boundary is found by name, not by guessing: the exporter marks every branch's tensor as a graph output
``cache_feature_<m>`` (captured with forward hooks on the diffusers up blocks, see
``diffc.exporter.contracts._CacheMarkedUNet``), so the split works the same on graphs from either torch
exporter and after any other pass (passes keep graph outputs). Branch numbering is DeepCache's (module
docstring of diffc.exporter.unet_blocks): branch ``m`` is the tensor concatenated with skip feature ``s_{m+1}``;
branch 0 is the shallowest and cheapest.

``CacheFullPass(branch)``: keep ``out_sample`` and ``cache_feature_<branch>`` as outputs, drop the other marks
(and nodes only they needed). ``CacheShallowPass(branch)``: the chosen feature becomes a graph input of the
same name, every other mark is dropped, and dead-code elimination removes every node and initializer
``out_sample`` no longer needs (the whole deep half). The UNet's normal inputs stay, even one that became
unused, so a runner feeds the shallow graph the same inputs as the full one plus the feature.

:func:`split` runs both on copies of one marked ``ir.Model`` (the build's passes stage hands it the model its
graph passes just ran on: no reload, no protobuf round trip) and reports node counts.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from diffc.passes._base import DiffcPass, PassError

log = logging.getLogger("diffc.passes.cache_reuse")

MARK = re.compile(r"^cache_feature_(\d+)$")
OUTPUT = "out_sample"


def marks(graph: ir.Graph) -> dict[int, ir.Value]:
    """The cache marks among ``graph``'s outputs, by branch index."""
    found = {}
    for value in graph.outputs:
        match = MARK.match(value.name or "")
        if match:
            found[int(match.group(1))] = value
    return found


def _check_branch(branch: int, available: Sequence[int], graph: ir.Graph) -> None:
    if not isinstance(branch, int) or isinstance(branch, bool):
        raise PassError(f"cache_reuse: branch must be an integer, got {branch!r}")
    if branch in available:
        return
    if not available:
        raise PassError("cache_reuse: the graph has no cache_feature_<m> outputs to split at; export the UNet with "
                        "cache marks (a profile with [cache].enabled = true does)")
    raise PassError(f"cache_reuse: branch {branch} does not exist in this graph: it has branches "
                    f"{min(available)} to {max(available)}; set [cache].branch in that range")


def _remove_dead(model: ir.Model) -> tuple[int, int]:
    nodes, inits = len(model.graph), len(model.graph.initializers)
    common_passes.RemoveUnusedNodesPass()(model)
    return nodes - len(model.graph), inits - len(model.graph.initializers)


class CacheFullPass(DiffcPass):
    """Keep ``out_sample`` and the chosen branch's feature as outputs; drop the other marks.

    Fire counts: ``marks_dropped``, ``nodes_removed``, ``initializers_removed``.
    """

    name = "cache_full"
    needs_shapes = False

    def __init__(self, branch: int) -> None:
        super().__init__()
        self.branch = branch

    def run(self, model: ir.Model) -> dict[str, int]:
        g = model.graph
        found = marks(g)
        _check_branch(self.branch, sorted(found), g)
        dropped = [v for b, v in found.items() if b != self.branch]
        for value in dropped:
            g.outputs.remove(value)
        nodes, inits = _remove_dead(model) if dropped else (0, 0)
        return {"marks_dropped": len(dropped), "nodes_removed": nodes, "initializers_removed": inits}


class CacheShallowPass(DiffcPass):
    """Cut the graph at the chosen branch's feature: it becomes an input; the deep half is removed.

    ``dims``: symbolic names of the new input's axes (``None`` entries keep the exported graph's own), so the
    feature's batch and spatial axes carry names the TensorRT shape ranges know (diffc.runtime.cache).
    Fire counts: ``cut`` (1 when the feature became an input), ``marks_dropped``, ``nodes_removed``,
    ``initializers_removed``.
    """

    name = "cache_shallow"
    needs_shapes = False

    def __init__(self, branch: int, dims: Sequence[str | int | None] | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.dims = tuple(dims) if dims is not None else None

    def run(self, model: ir.Model) -> dict[str, int]:
        g = model.graph
        found = marks(g)
        feature = f"cache_feature_{self.branch}"
        already = any(v.name == feature for v in g.inputs)
        if already and not found:
            return {"cut": 0, "marks_dropped": 0, "nodes_removed": 0, "initializers_removed": 0}
        _check_branch(self.branch, sorted(found), g)
        if not any(v.name == OUTPUT for v in g.outputs):
            raise PassError(f"cache_reuse: the graph has no {OUTPUT!r} output; it is not a diffc UNet export")
        value = found[self.branch]
        for v in found.values():
            g.outputs.remove(v)
        shape = value.shape
        if self.dims is not None:
            if shape is None or len(self.dims) != len(shape):
                raise PassError(f"cache_reuse: {feature} has shape {shape}, which does not fit the axis names "
                                f"{list(self.dims)}; re-export the UNet with cache marks")
            shape = ir.Shape([d if n is None else n for d, n in zip(shape, self.dims)])
        value.name = f"{feature}_computed"
        new_input = ir.Value(name=feature, type=value.type, shape=shape)
        value.replace_all_uses_with(new_input)
        g.inputs.append(new_input)
        nodes, inits = _remove_dead(model)
        return {"cut": 1, "marks_dropped": len(found) - 1, "nodes_removed": nodes, "initializers_removed": inits}


def split(model: ir.Model, branch: int, *, dims: Sequence[str | int | None] | None = None
          ) -> tuple[ir.Model, ir.Model, dict[str, Any]]:
    """``(full, shallow, report)`` from a cache-marked UNet (``model`` is not modified).

    Report: ``branch``, ``nodes`` (marked / full / shallow), ``shallow_fraction`` (shallow nodes over full
    nodes), ``initializers`` (full / shallow), and each pass's fire counts.
    """
    report: dict[str, Any] = {"branch": branch, "nodes": {"marked": len(model.graph)}}
    graphs = []
    for key, instance in (("full", CacheFullPass(branch)), ("shallow", CacheShallowPass(branch, dims))):
        part = model.clone()  # nodes and values copied; the weights' tensors are shared, never modified here
        instance(part)
        report[key] = dict(instance.fired)
        report["nodes"][key] = len(part.graph)
        report.setdefault("initializers", {})[key] = len(part.graph.initializers)
        graphs.append(part)
    report["shallow_fraction"] = round(report["nodes"]["shallow"] / max(1, report["nodes"]["full"]), 4)
    log.info("cache branch %d: %d nodes full, %d shallow (%.0f %%)", branch, report["nodes"]["full"],
             report["nodes"]["shallow"], 100 * report["shallow_fraction"])
    return graphs[0], graphs[1], report
