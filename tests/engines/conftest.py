"""Shared fixtures for the engine tests: the tiny SD pipeline exported once per test session (per xdist worker),
small inline ONNX graphs, and the skips: TensorRT-RTX missing, no GPU."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffc.engines import tensorrt as trt_engine

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
#: per-axis ranges as diffc.build.plan.shape_ranges makes them for the tiny pipeline (VAE factor 2, 16x16 latents)
#: and the default batch [1, 1, 4]; the UNet's batch is doubled for classifier-free guidance
TINY_RANGES = {
    "text_encoder": {"batch": [1, 1, 4], "sequence": [77, 77, 77]},
    "unet": {"batch": [1, 2, 8], "sequence": [77, 77, 77], "height": [8, 16, 32], "width": [8, 16, 32]},
    "vae_decoder": {"batch": [1, 1, 4], "height": [8, 16, 32], "width": [8, 16, 32]},
}


@pytest.fixture(scope="session")
def tiny_ranges():
    return {k: {a: list(r) for a, r in v.items()} for k, v in TINY_RANGES.items()}


@pytest.fixture(scope="session")
def rtx():
    """TensorRT-RTX must be importable (CI installs the extra; elsewhere these tests are skipped)."""
    if trt_engine.available("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX is not installed (pip install 'diffc[tensorrt]')")
    return trt_engine._import("tensorrt_rtx")


@pytest.fixture(scope="session")
def gpu():
    from diffc.engines._trt_cuda import device_compute_capability

    cc = device_compute_capability()
    if cc is None:
        pytest.skip("needs a GPU")
    return cc


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, _read_only_shared):
    """The tiny SD pipeline's text encoder, UNet and VAE decoder as ONNX (opset 21), exported once per test run
    (the xdist workers share it: tests/conftest.py); read it only."""
    pytest.importorskip("torch")

    def make(out):
        from diffc.exporter import export_pipeline
        from diffc.exporter.tiny import write_tiny_pipeline

        folder = write_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "sd", "sd")
        export_pipeline(folder, out, components=list(COMPONENTS), progress=False)

    root = _read_only_shared("engines-tiny-sd-onnx", "onnx", make)
    return {c: root / c / "model.onnx" for c in COMPONENTS}


def _save(nodes, inputs, outputs, inits, path, opset=21):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def make_graph(tmp_path):
    """Factory of small graphs by kind: conv (fp32), attention23 (fp32 / fp16), int8 (Q/DQ Conv), fp8 (Q/DQ MatMul)."""
    rng = np.random.default_rng(0)

    def make(kind: str, dtype: str = "fp32"):
        path = tmp_path / f"{kind}-{dtype}.onnx"
        x4 = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, "height", "width"])]
        y8 = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, "height", "width"])]
        if kind == "conv":
            w = numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "W")
            return _save([helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                          helper.make_node("Relu", ["c"], ["y"])], x4, y8, [w], path)
        if kind == "attention23":
            t = TensorProto.FLOAT if dtype == "fp32" else TensorProto.FLOAT16
            io = [helper.make_tensor_value_info(n, t, ["batch", "sequence", 64]) for n in "qkv"]
            return _save([helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=4, kv_num_heads=4)], io,
                         [helper.make_tensor_value_info("y", t, ["batch", "sequence", 64])], [], path, opset=23)
        if kind == "int8":
            w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
            inits = [numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
                     numpy_helper.from_array(np.array(0, np.int8), "xz"),
                     numpy_helper.from_array(np.round(w / 0.02).clip(-127, 127).astype(np.int8), "Wq"),
                     numpy_helper.from_array(np.array(0.02, np.float32), "ws"),
                     numpy_helper.from_array(np.array(0, np.int8), "wz")]
            nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                     helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                     helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["Wd"]),
                     helper.make_node("Conv", ["xd", "Wd"], ["y"], pads=[1, 1, 1, 1])]
            return _save(nodes, x4, y8, inits, path)
        if kind == "fp8":
            inits = [numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
                     helper.make_tensor("xz", TensorProto.FLOAT8E4M3FN, [], [0.0]),
                     numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
                     numpy_helper.from_array(np.array(0.02, np.float32), "ws"),
                     helper.make_tensor("wz", TensorProto.FLOAT8E4M3FN, [], [0.0])]
            nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                     helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                     helper.make_node("QuantizeLinear", ["W", "ws", "wz"], ["Wq"]),
                     helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["Wd"]),
                     helper.make_node("MatMul", ["xd", "Wd"], ["y"])]
            x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "sequence", 64]) for n in "xy")
            return _save(nodes, [x], [y], inits, path)
        raise ValueError(kind)

    return make
