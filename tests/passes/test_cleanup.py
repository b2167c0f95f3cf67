"""cleanup: constant folding, shape simplification, dead / identity / duplicate elimination."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxscript")

from diffc.passes.cleanup import CleanupPass  # noqa: E402

# What the legacy exporter writes around attention: a head size read off a dynamic-batch shape with a scalar
# Gather, divided at run time; an Identity; a node nobody reads; the same product computed twice.
LEGACY_STYLE = """
agraph (float[N, 8] x) => (float[N, 2, 4] y, float[N, 8] z) {
    s = Shape(x)
    one = Constant<value = int64 {1}>()
    hidden = Gather<axis = 0>(s, one)
    two = Constant<value = int64 {2}>()
    head = Div(hidden, two)
    zero = Constant<value = int64[1] {0}>()
    head1 = Unsqueeze(head, zero)
    zero_s = Constant<value = int64 {0}>()
    batch = Gather<axis = 0>(s, zero_s)
    batch1 = Unsqueeze(batch, zero)
    heads = Constant<value = int64[1] {2}>()
    shape = Concat<axis = 0>(batch1, heads, head1)
    xi = Identity(x)
    y = Reshape(xi, shape)
    unused = Relu(x)
    m1 = Mul(x, x)
    m2 = Mul(x, x)
    z = Add(m1, m2)
}
"""


def test_cleanup_folds_and_simplifies(kit):
    model = kit.parse(LEGACY_STYLE)
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    out, pass_ = kit.contract(CleanupPass, model, feeds)
    kinds = kit.ops(out)
    for gone in ("Shape", "Gather", "Div", "Identity", "Relu", "Constant"):
        assert gone not in kinds, kinds
    assert kinds.count("Mul") == 1
    fired = pass_.fired
    # rewrites, not node-count differences: the static dim's scalar-index Gather (a shape read), then the folder's
    # Div and Unsqueeze; the rest of the shape chain goes with the rule that makes the Reshape's shape constant
    assert fired["folded"] == 3 and fired["simplified"] == 1
    assert fired["duplicates_merged"] == 1 and fired["dead_removed"] == 1
    assert fired["constants_lifted"] >= 1


def test_cleanup_must_not_fire_on_clean_graph(kit):
    model = kit.parse("""
    agraph (float[N, 8] x, float[8, 4] w) => (float[N, 4] y) {
        h = MatMul(x, w)
        y = Relu(h)
    }
    """)
    pass_ = CleanupPass()
    out, result = kit.apply(pass_, model)
    assert not result.modified
    assert not any(pass_.fired.values())
    assert kit.ops(out) == ["MatMul", "Relu"]
