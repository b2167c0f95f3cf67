"""The fp16 conversion a strongly typed TensorRT build runs on an fp32 graph: checked like a pass, on onnxruntime
(CPU), against the unconverted graph. Needs torch (the tiny pipeline export), not TensorRT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from diffc.engines import tensorrt as T
from diffc.engines._trt_autocast import FP32_OPS, autocast_fp16
from diffc.engines._trt_graph import inspect_graph

ort = pytest.importorskip("onnxruntime")
COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def _feeds(comp, rng):
    if comp == "text_encoder":
        ids = rng.integers(0, 49406, (2, 77)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 49406, 49407
        return {"input_ids": ids}
    if comp == "unet":
        return {"sample": rng.standard_normal((2, 4, 16, 12)).astype(np.float32),
                "timestep": np.array([980.0, 20.0], np.float32),
                "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    return {"latent_sample": rng.standard_normal((1, 4, 16, 12)).astype(np.float32)}


@pytest.fixture(scope="module")
def converted(tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    return {c: (autocast_fp16(tiny_onnx[c], out / c / "model.onnx"), out / c / "model.onnx") for c in COMPONENTS}


@pytest.mark.parametrize("comp", COMPONENTS)
def test_matches_fp32(tiny_onnx, converted, comp):
    """Outputs are O(1) on the tiny pipeline; fp16 with fp32 normalizations stays within 2e-2 (measured: 5e-3)."""
    counts, path = converted[comp]
    onnx.checker.check_model(str(path), full_check=True)
    ref = ort.InferenceSession(str(tiny_onnx[comp]), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = _feeds(comp, np.random.default_rng(0))
    for want, got in zip(ref.run(None, feeds), new.run(None, feeds)):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-2, rtol=0)
    assert counts["casts_inserted"] > 0 and counts["kept_fp32"] > 0


@pytest.mark.parametrize("comp", COMPONENTS)
def test_io_and_normalizations_stay_fp32(tiny_onnx, converted, comp):
    _, path = converted[comp]
    before, after = inspect_graph(tiny_onnx[comp]), inspect_graph(path)
    assert after.inputs == before.inputs and after.outputs == before.outputs
    assert before.float_type == "fp32" and after.float_type == "fp16"
    assert after.metadata["diffc.autocast"] == "fp16"
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    norms = [n for n in model.graph.node if n.op_type in FP32_OPS]
    assert norms
    for n in norms:  # scale and bias of every normalization are still float32
        assert all(inits[i].data_type == onnx.TensorProto.FLOAT for i in n.input[1:] if i in inits)


def test_converted_graph_is_not_converted_again(converted):
    """Idempotent: an fp16 graph (ours, or anyone's) is built as it is."""
    _, path = converted["unet"]
    assert T.check_precision("fp16", backend="tensorrt_rtx", graph=path)["autocast"] is None


def test_fp32_and_quantized_graphs_are_left_alone(tiny_onnx, make_graph):
    assert T.check_precision("fp32", backend="tensorrt_rtx", graph=tiny_onnx["unet"])["autocast"] is None
    assert T.check_precision("fp16", backend="tensorrt_rtx", graph=tiny_onnx["unet"])["autocast"] == "fp16"
    assert T.check_precision("int8", backend="tensorrt_rtx", graph=make_graph("int8"))["autocast"] is None


def test_shared_fp32_input_gets_one_cast(tmp_path):
    """Two Resize nodes sharing one ``scales`` constant (diffc's cleanup merges such duplicates): the converter
    casts it once per consumer under one name, which TensorRT refuses; one Cast must remain, feeding both."""
    from onnx import TensorProto, helper

    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])
    graph = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "scales"], ["a"], mode="nearest"),
         helper.make_node("Relu", ["a"], ["b"]),
         helper.make_node("Resize", ["b", "", "scales"], ["y"], mode="nearest")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 12, 12])], [scales])
    src = tmp_path / "in.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(src))
    autocast_fp16(src, tmp_path / "out" / "model.onnx")
    out = onnx.load(str(tmp_path / "out" / "model.onnx"))
    names = [o for n in out.graph.node for o in n.output]
    assert len(names) == len(set(names))
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 3)).astype(np.float32)
    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = np.maximum(x, 0).repeat(4, axis=2).repeat(4, axis=3)
    assert np.abs(got - ref).max() < 1e-2
