"""What every diffc pass shares: the pass base class, fire counts, rule application and verification.

A diffc pass is an ``onnx_ir`` in-place pass (``requires -> call -> ensures``) that also says how often it
fired. ``modified`` is derived from those counts, so a pass that reports ``modified=False`` has provably
changed nothing, and running a pass twice must give ``modified=False`` the second time (the tests check).
"""

from __future__ import annotations

import abc

import collections
import logging
import time
from typing import ClassVar, Iterable

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
# Private API: onnx_ir's helper that hands a model to an onnx C++ API with its large initializers stripped (protobuf
# cannot serialize past 2 GiB, an SD-1.5 UNet is 3.4 GB). onnx_ir's public passes use it internally, but none runs
# strict-mode, type-checking shape inference with data propagation, which :func:`verify` needs.
from onnx_ir.passes.common import _c_api_utils
from onnxscript.rewriter import pattern

from diffc.passes._errors import PassError, PassOptionError

__all__ = ["DiffcPass", "PassError", "PassOptionError", "VerifyPass", "apply_rules", "op_counts", "verify"]

log = logging.getLogger("diffc.passes")

#: onnxruntime's contributed-operator domain
MS_DOMAIN = "com.microsoft"


class DiffcPass(ir.passes.InPlacePass):
    """Base of every diffc pass: subclasses implement :meth:`run`, which mutates the model in place and
    returns how often each of its rewrites fired. ``modified`` is true exactly when some count is > 0."""

    #: stable name, used in pass lists, reports and the profile's ``[passes].disable``
    name: ClassVar[str] = ""
    #: run data-propagating shape inference first (the rewrites read ranks and static dims)
    needs_shapes: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        #: how often each rewrite fired in the last run (the build report's counts: rewrites, nothing else)
        self.fired: dict[str, int] = {}
        #: what a checking pass saw without changing anything (e.g. check_ops' legal contrib nodes)
        self.found: dict[str, int] = {}
        #: wall time of the last run, shape inference included
        self.seconds = 0.0

    @abc.abstractmethod
    def run(self, model: ir.Model) -> dict[str, int]:
        """Rewrite ``model`` in place; return how often each rewrite fired."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        t0 = time.perf_counter()
        if self.needs_shapes:
            common_passes.ShapeInferencePass(data_prop=True)(model)
        self.fired = {k: int(v) for k, v in self.run(model).items()}
        self.seconds = time.perf_counter() - t0
        modified = any(v > 0 for v in self.fired.values())
        log.debug("%s fired %s", self.name, self.fired)
        return ir.passes.PassResult(model, modified)


class VerifyPass(ir.passes.InPlacePass):
    """:func:`verify` as a pass, so a pass manager can check the graph after each pass (``--verify-passes``)."""

    def __init__(self, *, after: str) -> None:
        super().__init__()
        self.after = after

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        verify(model, after=self.after)
        return ir.passes.PassResult(model, False)


def apply_rules(model: ir.Model, rules: Iterable[pattern.RewriteRule], *, commute: bool = False,
                lift_constants: bool = True) -> int:
    """Apply ``rules`` until none matches; returns the number of rewrites. Matched nodes are removed by the
    rewriter; nodes left without consumers (e.g. a shape chain feeding only the old subgraph) are removed too.
    ``commute``: also match every operand order of commutative ops (Add, Mul). ``lift_constants``: turn the
    Constant nodes rewrites create into initializers (backends expect weights and shapes there)."""
    rule_set = pattern.RewriteRuleSet(list(rules), commute=commute)
    total = 0
    for _ in range(8):  # rewrites can expose new matches; the rule sets here converge in 1-2 rounds
        n = rule_set.apply_to_model(model)
        total += n
        if n == 0:
            break
    if total:
        common_passes.RemoveUnusedNodesPass()(model)
    if total and lift_constants:
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    return total


def op_counts(model: onnx.ModelProto | ir.Model) -> dict[str, int]:
    """Node counts per op type (``domain::Op`` for non-ONNX domains), main graph only, sorted by name."""
    if isinstance(model, onnx.ModelProto):
        keys = (_op_key(n.domain, n.op_type) for n in model.graph.node)
    else:
        keys = (_op_key(n.domain, n.op_type) for n in model.graph)
    return dict(sorted(collections.Counter(keys).items()))


def _op_key(domain: str, op_type: str) -> str:
    return op_type if domain in ("", "ai.onnx") else f"{domain}::{op_type}"


def onnx_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def _const_array(value: ir.Value | None):
    """The numpy value of a constant tensor (initializer or Constant node output), or None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def const_ints(value: ir.Value | None) -> list[int] | None:
    """The value of a constant integer tensor, or None."""
    array = _const_array(value)
    if array is None or array.dtype.kind not in "iu":
        return None
    return [int(v) for v in array.reshape(-1)]


def const_scalar(value: ir.Value | None) -> float | None:
    """The value of a constant one-element float/int tensor, or None."""
    array = _const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(-1)[0])


def verify(model: ir.Model, *, after: str) -> None:
    """onnx checker (``full_check``: includes strict shape inference) and a data-propagating shape inference.

    Large weights are stripped for the C++ calls (protobuf cannot hold more than 2 GiB), so this works on an
    SD-1.5-sized UNet too. Raises :class:`PassError` naming the pass that broke the graph.
    """

    def check(proto: onnx.ModelProto) -> None:
        onnx.checker.check_model(proto, full_check=True)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)

    try:
        _c_api_utils.call_onnx_api(check, model)
    except Exception as e:  # onnx raises ValidationError, InferenceError, or plain RuntimeError
        raise PassError(
            f"the graph is invalid after pass {after!r}: {e}. Re-run with that pass disabled "
            f"([passes].disable = [{after!r}]) and report the model config"
        ) from e
