"""fuse_attention: both exporters' decomposed attention -> MultiHeadAttention / opset-23 Attention."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxscript")

from diffc.passes import PassOptionError  # noqa: E402
from diffc.passes.fuse_attention import FuseAttentionPass  # noqa: E402

B, S, L, C, H = 2, 5, 7, 8, 2  # batch, query length, key length, hidden, heads (head size 4)

# Legacy-exporter layout: key transposed straight to (B, H, D, L), q and k each scaled by D**-0.25.
LEGACY = """
agraph (float[B, S, 8] x, float[B, L, 8] ctx, float[8, 8] wq, float[8, 8] wk, float[8, 8] wv{extra_in})
        => (float[B, S, 8] y{extra_out}) {{
    q3 = MatMul(x, wq)
    k3 = MatMul({kv}, wk)
    v3 = MatMul({kv}, wv)
    split = Constant<value = int64[4] {{0, -1, 2, 4}}>()
    q4 = Reshape(q3, split)
    qt = Transpose<perm = [0, 2, 1, 3]>(q4)
    k4 = Reshape(k3, split)
    kt = Transpose<perm = [0, 2, 3, 1]>(k4)
    c = Constant<value = float {{0.70710678}}>()
    qm = Mul(qt, c)
    km = Mul(kt, c)
    scores = MatMul(qm, km)
    {mask}
    probs = Softmax<axis = {axis}>({logits})
    {guard}
    v4 = Reshape(v3, split)
    vt = Transpose<perm = [0, 2, 1, 3]>(v4)
    o = MatMul({weights}, vt)
    ot = Transpose<perm = [0, 2, 1, 3]>(o)
    merge = Constant<value = int64[3] {{0, -1, 8}}>()
    y = Reshape(ot, merge)
}}
"""

# The causal mask as the legacy exporter builds it for CLIP: ones(S, S) -> Trilu -> == 0 -> Where(-big, 0)
CAUSAL = """sh = Shape(q3)
    st = Constant<value = int64[1] {1}>()
    en = Constant<value = int64[1] {2}>()
    seq = Slice(sh, st, en)
    sq = Concat<axis = 0>(seq, seq)
    onef = Constant<value = float {1.0}>()
    full = Expand(onef, sq)
    tri = Trilu<upper = 0>(full)
    zf = Constant<value = float {0.0}>()
    above = Equal(tri, zf)
    big = Constant<value = float {-1000000000.0}>()
    cmask = Where(above, big, zf)
    masked = Add(scores, cmask)"""

GUARD = """nan = IsNaN(probs)
    zero = Constant<value = float {0.0}>()
    weights = Where(nan, zero, probs)"""


def legacy(*, kv="ctx", mask="", guard="", axis=-1, extra_in="", extra_out=""):
    return LEGACY.format(kv=kv, mask=mask, guard=guard, axis=axis, extra_in=extra_in, extra_out=extra_out,
                         logits="masked" if mask else "scores", weights="weights" if guard else "probs")


# Dynamo-exporter layout: key to (B, H, L, D), then transposed through a 3-D reshape; one scale on the scores.
DYNAMO = """
agraph (float[2, 7, 8] x, float[8, 8] wq, float[8, 8] wk, float[8, 8] wv) => (float[2, 7, 8] y) {
    q3 = MatMul(x, wq)
    k3 = MatMul(x, wk)
    v3 = MatMul(x, wv)
    split = Constant<value = int64[4] {2, 7, 2, 4}>()
    q4 = Reshape<allowzero = 1>(q3, split)
    qt = Transpose<perm = [0, 2, 1, 3]>(q4)
    k4 = Reshape<allowzero = 1>(k3, split)
    kt0 = Transpose<perm = [0, 2, 1, 3]>(k4)
    s3 = Constant<value = int64[3] {-1, 7, 4}>()
    k3d = Reshape(kt0, s3)
    k3t = Transpose<perm = [0, 2, 1]>(k3d)
    s4 = Constant<value = int64[4] {2, 2, 4, 7}>()
    kt = Reshape(k3t, s4)
    scores = MatMul(qt, kt)
    c = Constant<value = float {0.5}>()
    scaled = Mul(scores, c)
    probs = Softmax<axis = -1>(scaled)
    v4 = Reshape<allowzero = 1>(v3, split)
    vt = Transpose<perm = [0, 2, 1, 3]>(v4)
    o = MatMul(probs, vt)
    ot = Transpose<perm = [0, 2, 1, 3]>(o)
    merge = Constant<value = int64[3] {2, 7, 8}>()
    y = Reshape<allowzero = 1>(ot, merge)
}
"""


def feeds(seed=0, *, x_len=S, mask=False, dynamo=False):
    rng = np.random.default_rng(seed)
    f = {"x": rng.standard_normal((B, x_len, C)).astype(np.float32)}
    if not dynamo:
        f["ctx"] = rng.standard_normal((B, L, C)).astype(np.float32)
    for w in ("wq", "wk", "wv"):
        f[w] = (rng.standard_normal((C, C)) * 0.5).astype(np.float32)
    if mask:
        f["bias"] = np.where(rng.random((B, 1, x_len, L)) < 0.3, -1e4, 0.0).astype(np.float32)
    return f


def fired(pass_):
    return {k: v for k, v in pass_.fired.items() if v}


def attrs(model, op_type):
    node = next(n for n in model.graph.node if n.op_type == op_type)
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}, node


def test_legacy_cross_attention_becomes_mha(kit):
    model = kit.parse(legacy())
    out, pass_ = kit.contract(lambda: FuseAttentionPass(kind="mha"), model, feeds())
    assert kit.ops(out) == ["MatMul", "MatMul", "MatMul", "MultiHeadAttention"]
    a, node = attrs(out, "MultiHeadAttention")
    assert node.domain == "com.microsoft" and a["num_heads"] == H and a["scale"] == pytest.approx(0.5)
    assert len(node.input) == 3  # separate Q/K/V, no packed QKV
    assert fired(pass_) == {"cross_attention": 1}


def test_self_attention_with_causal_mask_becomes_unidirectional(kit):
    model = kit.parse(legacy(kv="x", mask=CAUSAL, guard=GUARD))
    out, pass_ = kit.contract(lambda: FuseAttentionPass(kind="mha"), model, feeds(x_len=S))
    a, node = attrs(out, "MultiHeadAttention")
    assert a.get("unidirectional") == 1 and len(node.input) == 3
    assert "Trilu" not in kit.ops(out) and "IsNaN" not in kit.ops(out)  # the mask subgraph is gone
    assert fired(pass_) == {"causal_self_attention": 1}
    # a different sequence length: the causal mode follows the input
    kit.assert_same(model, out, feeds(3, x_len=11))


def test_additive_mask_becomes_attention_bias(kit):
    model = kit.parse(legacy(mask="masked = Add(scores, bias)", extra_in=", float[B, 1, S, L] bias"))
    out, pass_ = kit.contract(lambda: FuseAttentionPass(kind="mha"), model, feeds(mask=True))
    _, node = attrs(out, "MultiHeadAttention")
    assert list(node.input)[3:] == ["", "", "bias"]
    assert fired(pass_) == {"masked_attention": 1}


def test_dynamo_layout_becomes_mha(kit):
    model = kit.parse(DYNAMO)
    out, pass_ = kit.contract(lambda: FuseAttentionPass(kind="mha"), model, feeds(x_len=7, dynamo=True))
    assert "Softmax" not in kit.ops(out) and kit.ops(out).count("MultiHeadAttention") == 1
    assert fired(pass_) == {"self_attention": 1}


def test_attention23_kind(kit):
    model = kit.parse(legacy(kv="x", mask=CAUSAL))
    out, pass_ = kit.contract(lambda: FuseAttentionPass(kind="attention23"), model, feeds())
    a, node = attrs(out, "Attention")
    assert node.domain == "" and a["q_num_heads"] == a["kv_num_heads"] == H and a["is_causal"] == 1
    assert {o.domain: o.version for o in out.opset_import}.get("") == 23


@pytest.mark.parametrize("case", ["runtime_heads", "probs_is_output", "softmax_axis", "guarded_unknown_mask",
                                  "scale_not_constant", "mask_broadcast_over_queries"])
def test_must_not_fire(kit, case):
    if case == "runtime_heads":  # head split read from an input: heads are unknown at build time
        text = legacy(extra_in=", int64[4] split_in").replace(
            "split = Constant<value = int64[4] {0, -1, 2, 4}>()", "split = Identity(split_in)")
    elif case == "probs_is_output":  # the attention weights are a graph output: they must stay
        text = legacy(extra_out=", float[B, 2, S, L] probs")
    elif case == "softmax_axis":
        text = legacy(axis=2)
    elif case == "guarded_unknown_mask":  # IsNaN guard + a mask not known to be causal: rows may be all -inf
        text = legacy(mask="masked = Add(scores, bias)", guard=GUARD, extra_in=", float[B, 1, S, L] bias")
    elif case == "mask_broadcast_over_queries":  # (B, 1, 1, L): MHA's attention_bias cannot broadcast over S
        text = legacy(mask="masked = Add(scores, bias)", extra_in=", float[B, 1, 1, L] bias")
    else:
        text = legacy(extra_in=", float[1] cin").replace(
            "c = Constant<value = float {0.70710678}>()", "c = Identity(cin)")
    model = kit.parse(text)
    pass_ = FuseAttentionPass(kind="mha")
    out, result = kit.apply(pass_, model)
    assert not result.modified and not any(pass_.fired.values())
    assert "MultiHeadAttention" not in kit.ops(out) and "Softmax" in kit.ops(out)


def test_bad_kind_is_a_typed_error():
    with pytest.raises(PassOptionError, match="attention"):
        FuseAttentionPass(kind="flash")
