"""check_ops: refuse ops the target cannot run; never modify the graph."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxscript")

from diffc.passes import PassError, PassOptionError  # noqa: E402
from diffc.passes.check_ops import CheckTargetOpsPass  # noqa: E402

CONTRIB = """
agraph (float[2, 5, 8] q, float[2, 5, 8] k, float[2, 5, 8] v) => (float[2, 5, 8] y) {
    y = com.microsoft.MultiHeadAttention<num_heads = 2>(q, k, v)
}
"""

CUDA_ONLY = """
agraph (float[2, 8, 4, 4] x, float[8] g, float[8] b) => (float[2, 8, 4, 4] y) {
    y = com.microsoft.GroupNorm<groups = 4, activation = 0, channels_last = 0, epsilon = 0.00001>(x, g, b)
}
"""

PACKED = """
agraph (float[2, 5, 2, 3, 4] qkv) => (float[2, 5, 8] y) {
    y = com.microsoft.MultiHeadAttention<num_heads = 2>(qkv, , )
}
"""


def test_cpu_legal_contrib_ops_pass_unchanged(kit):
    model = kit.parse(CONTRIB)
    pass_ = CheckTargetOpsPass(target="onnxruntime")
    out, result = kit.apply(pass_, model)
    assert not result.modified and pass_.fired == {} and pass_.found == {"contrib_ops": 1}
    assert kit.ops(out) == ["MultiHeadAttention"]


@pytest.mark.parametrize("text, target, needle", [
    (CUDA_ONLY, "onnxruntime", "com.microsoft::GroupNorm x1 (com.microsoft::GroupNorm run on CUDA only"),
    (PACKED, "onnxruntime", "packed QKV"),
    (CONTRIB, "tensorrt", "tensorrt cannot parse contrib"),
    (CONTRIB, "tensorrt_rtx", "tensorrt_rtx cannot parse contrib"),
    (CONTRIB, "openvino", "openvino cannot parse contrib"),
])
def test_illegal_ops_raise_a_typed_error(kit, text, target, needle):
    import onnx_ir as ir

    model = ir.serde.deserialize_model(kit.parse(text))
    with pytest.raises(PassError, match="cannot run") as err:
        CheckTargetOpsPass(target=target)(model)
    assert needle in str(err.value)


def test_unknown_target():
    with pytest.raises(PassOptionError, match="target"):
        CheckTargetOpsPass(target="cuda")
