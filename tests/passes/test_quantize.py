"""quantize: Q/DQ insertion for onnxruntime (u8 activations, fused kernels) and TensorRT (s8 / fp8, inputs only)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxscript")

import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402

from diffc.passes import PassOptionError  # noqa: E402
from diffc.passes.quantize import (  # noqa: E402
    QType,
    QuantizePass,
    activation_qparams,
    calibration_targets,
    from_float8_e4m3,
    roles,
    to_float8_e4m3,
)



def _unet_like() -> onnx.ModelProto:
    """conv_in -> SiLU -> conv -> (+ time projection) -> SiLU -> MatMul (linear) -> conv_out, with a time MLP
    from ``timestep`` and a text projection from ``encoder_hidden_states``: one node of every role."""
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)

    def w(name, *shape):
        return nh.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [
        h.make_node("Conv", ["sample", "w_in", "b_in"], ["h0"], pads=[1, 1, 1, 1], name="conv_in"),
        h.make_node("Sigmoid", ["h0"], ["s0"]), h.make_node("Mul", ["h0", "s0"], ["a0"]),
        h.make_node("Conv", ["a0", "w_mid", "b_mid"], ["h1"], pads=[1, 1, 1, 1], name="conv_mid"),
        h.make_node("Unsqueeze", ["timestep", "ax1"], ["t2"]),
        h.make_node("MatMul", ["t2", "w_t"], ["temb"], name="time_linear"),
        h.make_node("Unsqueeze", ["temb", "ax23"], ["temb4"]),
        h.make_node("Add", ["h1", "temb4"], ["h2"]),
        h.make_node("Sigmoid", ["h2"], ["s2"]), h.make_node("Mul", ["h2", "s2"], ["a2"]),
        h.make_node("Transpose", ["a2"], ["tok"], perm=[0, 2, 3, 1]),
        h.make_node("MatMul", ["tok", "w_lin"], ["lin"], name="linear"),
        h.make_node("MatMul", ["encoder_hidden_states", "w_txt"], ["txt"], name="to_k"),
        h.make_node("ReduceMean", ["txt", "ax1"], ["txtm"], keepdims=1),
        h.make_node("Unsqueeze", ["txtm", "ax1"], ["txtm4"]),
        h.make_node("Add", ["lin", "txtm4"], ["lin2"]),
        h.make_node("Transpose", ["lin2"], ["back"], perm=[0, 3, 1, 2]),
        h.make_node("Conv", ["back", "w_out", "b_out"], ["out_sample"], pads=[1, 1, 1, 1], name="conv_out"),
    ]
    inits = [w("w_in", 8, 4, 3, 3), w("b_in", 8), w("w_mid", 8, 8, 3, 3), w("b_mid", 8), w("w_t", 1, 8),
             w("w_lin", 8, 8), w("w_txt", 6, 8), w("w_out", 4, 8, 3, 3), w("b_out", 4),
             nh.from_array(np.array([2, 3], np.int64), "ax23"),
             nh.from_array(np.array([1], np.int64), "ax1")]
    graph = h.make_graph(nodes, "unet_like", [
        h.make_tensor_value_info("sample", onnx.TensorProto.FLOAT, ["N", 4, 6, 6]),
        h.make_tensor_value_info("timestep", onnx.TensorProto.FLOAT, ["N"]),
        h.make_tensor_value_info("encoder_hidden_states", onnx.TensorProto.FLOAT, ["N", 5, 6])],
        [h.make_tensor_value_info("out_sample", onnx.TensorProto.FLOAT, ["N", 4, 6, 6])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(seed=0, n=2):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((n, 4, 6, 6)).astype(np.float32),
            "timestep": rng.uniform(0, 1, (n,)).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((n, 5, 6)).astype(np.float32)}


def _run(model: onnx.ModelProto, feeds, outputs=None, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, opt_path=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if opt_path:
        so.optimized_model_filepath = str(opt_path)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def _ranges(model: onnx.ModelProto, names, feeds_list):
    """Exact min/max of ``names`` over the feeds (the calibration a test can check by hand)."""
    instrumented = onnx.ModelProto()
    instrumented.CopyFrom(model)
    for n in names:
        instrumented.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    lo, hi = collections.defaultdict(lambda: np.inf), collections.defaultdict(lambda: -np.inf)
    for feeds in feeds_list:
        for n, v in zip(names, _run(instrumented, feeds, names)):
            lo[n], hi[n] = min(lo[n], float(v.min())), max(hi[n], float(v.max()))
    return {n: (lo[n], hi[n]) for n in names}


def _quantize(model, qtype="uint8", **kw):
    ir_model = ir.serde.deserialize_model(model)
    targets = calibration_targets(ir_model.graph, output_ranges=kw.get("output_qdq", True),
                                  keep_float=kw.get("keep_float", ("conv_in", "conv_out", "time_embedding")))
    ranges = _ranges(model, targets, [_feeds(s) for s in range(4)])
    p = QuantizePass(qtype=qtype, ranges=ranges, **kw)
    result = p(ir_model)
    return ir.serde.serialize_model(result.model), p, result, ir_model


def test_roles_come_from_data_flow():
    graph = ir.serde.deserialize_model(_unet_like()).graph
    assert roles(graph) == {"conv_in": "conv_in", "conv_mid": "layer", "time_linear": "time_embedding",
                            "linear": "layer", "to_k": "text_projection", "conv_out": "conv_out"}


def test_onnxruntime_form_fuses_into_integer_kernels(tmp_path):
    model = _unet_like()
    out, p, result, _ = _quantize(model)
    assert result.modified
    assert p.fired == {"conv": 1, "matmul": 2, "gemm": 0, "conv_output": 1, "int32_bias": 1}
    ops = collections.Counter(n.op_type for n in out.graph.node)
    assert ops["QuantizeLinear"] == 4 and ops["DequantizeLinear"] == 4 + 3 + 1  # activations, weights, bias
    q_types = {i.name: i.data_type for i in out.graph.initializer}
    assert q_types["w_mid_quantized"] == onnx.TensorProto.INT8
    assert q_types["a0_zero_point"] == onnx.TensorProto.UINT8
    assert q_types["b_mid_quantized"] == onnx.TensorProto.INT32
    assert "w_mid" not in q_types  # the float weight is gone
    # sensitive layers untouched: their weights are still float initializers
    assert {"w_in", "w_out", "w_t"} <= set(q_types)
    onnx.checker.check_model(out, full_check=True)

    # numerics: close to float (8-bit), far from exact
    feeds = _feeds(7)
    ref, got = _run(model, feeds)[0], _run(out, feeds)[0]
    err = np.abs(ref - got).max() / np.abs(ref).max()
    assert 1e-5 < err < 0.05

    # onnxruntime fuses every Q/DQ group into an integer kernel: no float Conv or weight MatMul is left
    _run(out, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, opt_path=tmp_path / "opt.onnx")
    fused = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert fused["QLinearConv"] == 1 and fused["MatMulIntegerToFloat"] == 2
    assert fused["Conv"] + fused["FusedConv"] == 2  # conv_in, conv_out (kept float)
    assert fused["MatMul"] == 1  # the time embedding


@pytest.mark.parametrize("qtype, kw", [("uint8", {}), ("int8", {"output_qdq": False, "int32_bias": False}),
                                       ("fp8", {"output_qdq": False, "int32_bias": False})])
def test_second_run_is_not_modified(qtype, kw):
    """The same pass with the same ranges over its own output finds every op already quantized: nothing fires
    and the graph is byte-for-byte what the first run made (a pass that re-wrapped Q/DQ would fire again)."""
    out, first, result, ir_model = _quantize(_unet_like(), qtype=qtype, **kw)
    assert result.modified and sum(first.fired.values()) > 0
    again = QuantizePass(qtype=qtype, ranges=first.ranges, **kw)
    second = again(ir_model)
    assert not second.modified and sum(again.fired.values()) == 0
    assert ir.serde.serialize_model(second.model).SerializeToString() == out.SerializeToString()


def test_keep_float_override_and_bad_role():
    out, p, _, _ = _quantize(_unet_like(), keep_float=("conv_in", "conv_out", "time_embedding", "text_projection"))
    assert p.fired["matmul"] == 1
    out, p, _, _ = _quantize(_unet_like(), keep_float=())
    assert p.fired["conv"] == 3 and p.fired["matmul"] == 3
    with pytest.raises(PassOptionError, match="conv_in"):
        QuantizePass(qtype="uint8", ranges={}, keep_float=("conv_inn",))


def test_does_not_fire_without_ranges_or_on_activation_products():
    model = ir.serde.deserialize_model(_unet_like())
    p = QuantizePass(qtype="uint8", ranges={})
    assert not p(model).modified and sum(p.fired.values()) == 0
    text = """
    agraph (float[2, 3, 4] a, float[2, 4, 5] b) => (float[2, 3, 5] y) {
        y = MatMul(a, b)
    }"""
    m = ir.serde.deserialize_model(onnx.parser.parse_model('<ir_version: 10, opset_import: ["" : 21]>' + text))
    assert not QuantizePass(qtype="uint8", ranges={"a": (-1.0, 1.0), "b": (-1.0, 1.0)})(m).modified


@pytest.mark.parametrize("qtype", ["int8", "fp8"])
def test_tensorrt_form_is_symmetric_on_inputs_only(qtype):
    out, p, _, _ = _quantize(_unet_like(), qtype=qtype, output_qdq=False, int32_bias=False)
    assert p.fired["conv"] == 1 and p.fired["conv_output"] == 0 and p.fired["int32_bias"] == 0
    inits = {i.name: i for i in out.graph.initializer}
    want = onnx.TensorProto.INT8 if qtype == "int8" else onnx.TensorProto.FLOAT8E4M3FN
    assert inits["a0_zero_point"].data_type == want and inits["w_mid_quantized"].data_type == want
    assert onnx.numpy_helper.to_array(inits["b_mid"]).dtype == np.float32  # biases stay float
    onnx.checker.check_model(out, full_check=True)
    if qtype == "int8":  # s8 Q/DQ runs on the CPU too; fp8 does not (the build refuses fp8 there)
        feeds = _feeds(3)
        ref, got = _run(_unet_like(), feeds)[0], _run(out, feeds)[0]
        assert np.abs(ref - got).max() / np.abs(ref).max() < 0.05


def test_activation_qparams():
    assert activation_qparams(-1.0, 3.0, QType.UINT8) == (np.float32(4 / 255), 64)
    assert activation_qparams(0.5, 2.0, QType.UINT8)[1] == 0  # the range is widened to hold zero
    assert activation_qparams(-2.0, 1.0, QType.INT8) == (np.float32(2 / 127), 0)
    assert activation_qparams(-2.0, 1.0, QType.FP8) == (np.float32(2 / 448), 0)


def test_float8_e4m3_rounding():
    values = np.array([0.0, -0.0, 1.0, 1.0625, 1.1875, 448.0, 1000.0, -3.3, 2.0 ** -9, 2.0 ** -10], np.float32)
    bits = to_float8_e4m3(values)
    # 1.0625 is halfway between 1.0 (code 0x38) and 1.125 (0x39): ties go to the even code
    assert list(bits[:7]) == [0x00, 0x00, 0x38, 0x38, 0x3A, 0x7E, 0x7E]
    assert bits[7] & 0x80 and from_float8_e4m3(bits[7:8])[0] == -3.25
    assert from_float8_e4m3(bits[8:9])[0] == 2.0 ** -9  # the smallest subnormal
    assert bits[9] == 0  # half of it rounds to the even code, zero
    grid = np.linspace(-448, 448, 20001, dtype=np.float32)
    back = from_float8_e4m3(to_float8_e4m3(grid))
    assert np.all(np.abs(back - grid) <= np.maximum(np.abs(grid) * 2 ** -4, 2 ** -10) + 1e-6)
