"""legalize_norms: GroupNorm into the target's fast form, LayerNorm / GELU / QuickGelu fusions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxscript")

from diffc.passes import PassOptionError  # noqa: E402
from diffc.passes.legalize_norms import LegalizeNormsPass  # noqa: E402

GAMMA = "1.0, 0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 3.0"
BETA = "0.1, -0.2, 0.3, 0.0, 1.0, -1.0, 0.5, 0.2"

GROUP_NORM = f"""
agraph (float[N, 8, 3, 5] x) => (float[N, 8, 3, 5] y) <float[8] g = {{{GAMMA}}}, float[8] b = {{{BETA}}}> {{
    y = GroupNormalization<num_groups = 4, epsilon = 0.00001>(x, g, b)
}}
"""

# The legacy exporter's GroupNorm (what torch.onnx writes for nn.GroupNorm)
INSTANCE_FORM = """
agraph (float[N, 8, 3, 5] x) => (float[N, 8, 3, 5] y)
    <float[G] ones = {ONES}, float[G] zeros = {ZEROS}, float[8, 1, 1] gamma = {GAMMA}, float[8, 1, 1] beta = {BETA}> {
    grouped_shape = Constant<value = int64[3] {0, G, -1}>()
    grouped = Reshape(x, grouped_shape)
    normed = InstanceNormalization<epsilon = 0.00001>(grouped, ones, zeros)
    back_shape = Shape(x)
    back = Reshape(normed, back_shape)
    scaled = Mul(back, gamma)
    y = Add(scaled, beta)
}
"""


def instance_form(groups=4, ones=1.0):
    text = INSTANCE_FORM.replace("ONES", ", ".join([str(ones)] * groups))
    text = text.replace("ZEROS", ", ".join(["0.0"] * groups))
    return text.replace("GAMMA", GAMMA).replace("BETA", BETA).replace("G", str(groups))


LAYER_NORM = """
agraph (float[N, 6, 8] x) => (float[N, 6, 8] y)
    <float[8] g = {1.0, 0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 3.0},
     float[8] b = {0.1, -0.2, 0.3, 0.0, 1.0, -1.0, 0.5, 0.2}> {
    axes = Constant<value = int64[1] {AXIS}>()
    mean = ReduceMean<keepdims = 1>(x, axes)
    d = Sub(x, mean)
    two = Constant<value = float {2.0}>()
    sq = Pow(d, two)
    var = ReduceMean<keepdims = 1>(sq, axes)
    eps = Constant<value = float {0.00001}>()
    ve = Add(var, eps)
    std = Sqrt(ve)
    n = Div(d, std)
    s = Mul(n, g)
    y = Add(s, b)
}
"""

ERF_GELU = """
agraph (float[N, 16] x) => (float[N, 16] y) {
    c = Constant<value = float {SQRT2}>()
    d = Div(x, c)
    e = Erf(d)
    one = Constant<value = float {1.0}>()
    a = Add(e, one)
    m = Mul(x, a)
    half = Constant<value = float {0.5}>()
    y = Mul(m, half)
}
"""

QUICK_GELU = """
agraph (float[N, 16] x) => (float[N, 16] y, float[N, 16] z) {
    alpha = Constant<value = float {1.702}>()
    xa = Mul(x, alpha)
    s = Sigmoid(xa)
    y = Mul(x, s)
    s2 = Sigmoid(x)
    z = Mul(s2, x)
}
"""


def image(seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((2, 8, 3, 5)).astype(np.float32) * 3 + 1}


def vectors(shape, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 2}


def only(**kw):
    """A LegalizeNormsPass doing exactly one thing."""
    opts = {"groupnorm": "keep", "layernorm": False, "gelu": False, "quick_gelu": False, **kw}
    return lambda: LegalizeNormsPass(**opts)


def test_group_normalization_to_instance_norm_form(kit):
    out, pass_ = kit.contract(only(groupnorm="instance_norm"), kit.parse(GROUP_NORM), image())
    assert kit.ops(out) == ["Reshape", "InstanceNormalization", "Shape", "Reshape", "Mul", "Add"]
    assert pass_.fired["group_norm_to_instance_norm"] == 1


def test_instance_norm_form_to_group_normalization(kit):
    out, pass_ = kit.contract(only(groupnorm="group_normalization"), kit.parse(instance_form()), image(1))
    assert kit.ops(out) == ["GroupNormalization"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert attrs["num_groups"] == 4
    assert pass_.fired["instance_norm_to_group_norm"] == 1


def test_groupnorm_forms_round_trip(kit):
    """GroupNormalization -> InstanceNorm form -> GroupNormalization is the identity, numerically."""
    model = kit.parse(GROUP_NORM)
    there, _ = kit.apply(only(groupnorm="instance_norm")(), model)
    back, _ = kit.apply(only(groupnorm="group_normalization")(), there)
    assert kit.ops(back) == ["GroupNormalization"]
    kit.assert_same(model, back, image(2))


def test_layer_norm_fusion(kit):
    model = kit.parse(LAYER_NORM.replace("AXIS", "-1"))
    out, pass_ = kit.contract(only(layernorm=True), model, vectors((3, 6, 8)))
    assert kit.ops(out) == ["LayerNormalization"] and pass_.fired["layer_norm"] == 1


def test_erf_gelu_fusion(kit):
    model = kit.parse(ERF_GELU.replace("SQRT2", "1.4142135"))
    out, pass_ = kit.contract(only(gelu=True), model, vectors((4, 16)))
    assert kit.ops(out) == ["Gelu"] and out.graph.node[0].domain == "" and pass_.fired["gelu"] == 1


def test_quick_gelu_and_silu_become_contrib_quick_gelu(kit):
    out, pass_ = kit.contract(only(quick_gelu=True), kit.parse(QUICK_GELU), vectors((4, 16)))
    assert kit.ops(out) == ["QuickGelu", "QuickGelu"]
    alphas = sorted(round(n.attribute[0].f, 3) for n in out.graph.node)
    assert alphas == [1.0, 1.702] and all(n.domain == "com.microsoft" for n in out.graph.node)
    assert pass_.fired["quick_gelu"] == 1 and pass_.fired["silu"] == 1


@pytest.mark.parametrize("case", ["instance_norm_scaled", "layer_norm_wrong_axis", "gelu_wrong_constant",
                                  "all_disabled"])
def test_must_not_fire(kit, case):
    if case == "instance_norm_scaled":  # InstanceNormalization with a real scale is not a GroupNorm
        model, pass_ = kit.parse(instance_form(ones=2.0)), only(groupnorm="group_normalization")()
    elif case == "layer_norm_wrong_axis":
        model, pass_ = kit.parse(LAYER_NORM.replace("AXIS", "1")), only(layernorm=True)()
    elif case == "gelu_wrong_constant":
        model, pass_ = kit.parse(ERF_GELU.replace("SQRT2", "1.5")), only(gelu=True)()
    else:
        model, pass_ = kit.parse(GROUP_NORM), only()()
    out, result = kit.apply(pass_, model)
    assert not result.modified and not any(pass_.fired.values())
    assert kit.ops(out) == kit.ops(model)


def test_bad_options_are_typed_errors():
    with pytest.raises(PassOptionError, match="groupnorm"):
        LegalizeNormsPass(groupnorm="GroupNorm")
    with pytest.raises(PassOptionError, match="gelu"):
        LegalizeNormsPass(gelu="yes")
