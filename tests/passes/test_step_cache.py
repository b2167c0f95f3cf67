"""step_cache: the whole / head / tail cut of a step-marked denoiser, on an inline graph.

The real denoisers (the tiny UNet through a build, the tiny SD3 transformer exported here) are checked in
tests/runtime/test_step_cache.py; this file checks the mechanics: what each graph keeps, the decision tensor cut
when the rest reads it, symbolic axes on the cut, idempotence, and the refusals.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from diffc.passes import PassError
from diffc.passes.step_cache import StepFullPass, StepHeadPass, StepTailPass, split

# embed -> first block (two results, the second also what the rest continues from) -> rest; ``t`` stands for
# a time embedding both halves read, which the tail recomputes
MARKED = """
agraph (float[2,3] x, float[2,3] t, float[2,3] unused) => (float[2,3] out_sample, float[2,3] step_cache_decision,
                                                          float[2,3] step_cache_0, float[2,3] step_cache_1) {
    temb = Sigmoid(t)
    embedded = Relu(x)
    step_cache_0 = Add(embedded, temb)
    step_cache_decision = Tanh(step_cache_0)
    step_cache_1 = Identity(step_cache_decision)
    deep = Exp(step_cache_decision)
    mixed = Mul(deep, temb)
    out_sample = Add(mixed, step_cache_0)
}
"""


@pytest.fixture
def marked(kit):
    return kit.parse(MARKED)


def feeds(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((2, 3)).astype(np.float32), "t": rng.standard_normal((2, 3)).astype(np.float32),
            "unused": np.zeros((2, 3), np.float32)}


def test_split_cuts_after_the_first_block(kit, marked):
    full, head, tail, rep = split(ir.serde.deserialize_model(marked))
    full, head, tail = (ir.serde.serialize_model(m) for m in (full, head, tail))
    for m in (full, head, tail):
        kit.check(m)
    # the whole denoiser: the marks' duplicate Identity goes with them
    assert kit.ops(full) == [op for op in kit.ops(marked) if op != "Identity"]
    assert [o.name for o in full.graph.output] == ["out_sample"]
    assert kit.ops(head) == ["Sigmoid", "Relu", "Add", "Tanh", "Identity"]
    # the rest reads the decision tensor itself (the exporter's Identity duplicate is read by nothing): it is cut
    assert rep["tail_inputs"] == ["step_cache_decision", "step_cache_0"]
    assert kit.ops(tail) == ["Sigmoid", "Exp", "Mul", "Add"]  # the first block is gone, the embedding recomputed
    assert [i.name for i in tail.graph.input] == ["x", "t", "unused", "step_cache_decision", "step_cache_0"]
    assert rep["nodes"] == {"marked": 8, "full": 7, "head": 5, "tail": 4}
    # the cut tensors' axes other than batch and channels are symbolic (an exporter may write traced sizes)
    dims = [d.dim_param or d.dim_value for d in tail.graph.input[-1].type.tensor_type.shape.dim]
    assert dims == ["batch", 3]
    f = feeds()
    (whole,) = kit.run(full, f)
    marks = dict(zip([o.name for o in head.graph.output], kit.run(head, f)))
    (got,) = kit.run(tail, {**f, **{k: marks[k] for k in rep["tail_inputs"]}})
    np.testing.assert_array_equal(got, whole)
    # fed another step's marks, the tail uses them (it does not recompute its own)
    other = dict(zip([o.name for o in head.graph.output], kit.run(head, feeds(1))))
    (moved,) = kit.run(tail, {**f, **{k: other[k] for k in rep["tail_inputs"]}})
    temb = 1 / (1 + np.exp(-f["t"]))
    np.testing.assert_allclose(moved, np.exp(other["step_cache_decision"]) * temb + other["step_cache_0"], rtol=1e-6)


def test_passes_are_idempotent(kit, marked):
    for factory in (StepFullPass, StepHeadPass, StepTailPass):
        once, first = kit.apply(factory(), marked)
        assert first.modified
        again, second = kit.apply(factory(), once)
        assert not second.modified and kit.ops(again) == kit.ops(once), factory.name


def test_unmarked_graph_is_refused(kit):
    plain = kit.parse("agraph (float[2] x) => (float[2] out_sample) { out_sample = Relu(x) }")
    for pass_obj in (StepHeadPass(), StepTailPass()):
        with pytest.raises(PassError, match="no step_cache_decision"):
            kit.apply(pass_obj, plain)
    assert not kit.apply(StepFullPass(), plain)[1].modified
