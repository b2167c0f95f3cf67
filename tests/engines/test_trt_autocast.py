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


def _position_table_graph(path):
    """PixArt's pattern in miniature: a sin table computed in the graph from the input's height
    (``Shape -> Gather -> Cast(float) -> Range -> Mul -> Sin``), added to the activations; plus a ``Reshape`` of
    the activations by their own shape, which reads a shape tensor but is not part of the shape subgraph."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    inits = [const("axis_h", 2, np.int64), const("zero", 0.0), const("one", 1.0), const("omega", 0.37),
             const("axes", [1], np.int64)]
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "axis_h"], ["h"], name="gather"),
             helper.make_node("Cast", ["h"], ["h_f"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Range", ["zero", "h_f", "one"], ["pos"], name="range"),
             helper.make_node("Mul", ["pos", "omega"], ["angle"], name="mul"),
             helper.make_node("Sin", ["angle"], ["sin"], name="sin"),
             helper.make_node("Unsqueeze", ["sin", "axes"], ["table"], name="unsqueeze"),
             helper.make_node("Add", ["x", "table"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Reshape", ["b", "shape"], ["y"], name="reshape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "h", "w"])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    return path


def _fp16_readers(model):
    """Names of the nodes that read an fp16 value (shape inference on the converted graph)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    fp16 = {v.name for v in (*inferred.value_info, *inferred.input)
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    fp16 |= {t.name for t in inferred.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    return {n.name for n in inferred.node if any(i in fp16 for i in n.input)}


def test_shape_subgraph_is_found_by_data_flow(tmp_path):
    from diffc.engines._trt_autocast import shape_subgraph

    model = onnx.load(str(_position_table_graph(tmp_path / "in.onnx")))
    assert [n.name for n in shape_subgraph(model.graph)] == \
        ["shape", "gather", "cast", "range", "mul", "sin", "unsqueeze"]


def test_shape_subgraph_stays_fp32(tmp_path):
    """TensorRT refuses fp16 shape tensors (``ShapeHostToDeviceCopy``): every node of the shape subgraph reads
    fp32 (no fp16 round trip between them either), the activations run in fp16, and the result matches fp32."""
    src = _position_table_graph(tmp_path / "in.onnx")
    dst = tmp_path / "out" / "model.onnx"
    counts = autocast_fp16(src, dst)
    assert counts["shape_nodes"] == 7
    onnx.checker.check_model(str(dst), full_check=True)
    model = onnx.load(str(dst))
    readers = _fp16_readers(model)
    assert not readers & {"shape", "gather", "cast", "range", "mul", "sin", "unsqueeze"}
    assert {"relu", "reshape"} <= readers  # the activations are converted
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    for h, w in ((5, 3), (40, 6)):  # sin(0.37 * 39) needs fp32 angles: fp16 would be off by ~5e-3 here
        x = np.random.default_rng(h).standard_normal((1, 4, h, w)).astype(np.float32)
        np.testing.assert_allclose(new.run(None, {"x": x})[0], ref.run(None, {"x": x})[0], atol=8e-3, rtol=0)
    # deterministic: a second conversion of the same source gives the same nodes
    autocast_fp16(src, tmp_path / "again" / "model.onnx")
    assert onnx.load(str(tmp_path / "again" / "model.onnx")).graph.node == model.graph.node


@pytest.fixture(scope="module")
def pixart_transformer(tmp_path_factory, tiny_dit_onnx):
    """The tiny PixArt-Σ transformer as ``diffc build --profile rtx-fp16`` hands it to the engine build: exported
    (the run's shared export, tests/conftest.py), then through the TensorRT pass list."""
    from diffc.onnx_io import load_model, save_model
    from diffc.passes import run_passes
    from diffc.profiles import load_profile

    root = tmp_path_factory.mktemp("pixart")
    profile = load_profile("rtx-fp16")
    graph, _ = run_passes(load_model(tiny_dit_onnx("pixart") / "transformer" / "model.onnx"), "transformer",
                          profile.backend.value, **profile.passes)
    return save_model(graph, root / "passed" / "transformer" / "model.onnx")


def test_pixart_autocast_matches_fp32(pixart_transformer, tmp_path):
    """PixArt computes its sin-cos position table from the image size in the graph: that part stays fp32, and the
    whole transformer matches fp32 within fp16 error at two sizes (measured: max 1.2 % of the output's range,
    relative L2 7e-3, the same as converting without the shape subgraph kept fp32)."""
    dst = tmp_path / "fp16" / "model.onnx"
    counts = autocast_fp16(pixart_transformer, dst)
    assert counts["shape_nodes"] > 0
    onnx.checker.check_model(str(dst), full_check=True)
    model = onnx.load(str(dst), load_external_data=False)
    assert not {n.name for n in model.graph.node if n.op_type in ("Range", "Sin", "Cos") and "pos_embed" in n.name} \
        & _fp16_readers(onnx.load(str(dst)))
    ref = ort.InferenceSession(str(pixart_transformer), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for h, w in ((8, 8), (16, 12)):
        feeds = {"sample": rng.standard_normal((2, 4, h, w)).astype(np.float32),
                 "timestep": np.array([980.0, 20.0], np.float32),
                 "encoder_hidden_states": rng.standard_normal((2, 7, 32)).astype(np.float32),
                 "encoder_attention_mask": np.ones((2, 7), np.int64)}
        want, got = ref.run(None, feeds)[0], new.run(None, feeds)[0]
        assert got.dtype == np.float32 and got.shape == want.shape == (2, 4, h, w)
        assert np.abs(got - want).max() < 0.03 * np.abs(want).max()
        assert np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)) < 2e-2


def test_pixart_rtx_fp16_engine_builds(rtx, pixart_transformer, tmp_path):
    """Issue 29: TensorRT-RTX refused the fp16 PixArt graph (``ShapeHostToDeviceCopy ... output type must be
    kINT32, kINT64, kBOOL, or kFLOAT``); it builds now, ahead of time for SM89 on a GPU-less machine."""
    ranges = {"batch": [1, 2, 8], "sequence": [300, 300, 300], "height": [8, 16, 32], "width": [8, 16, 32]}
    path = tmp_path / "transformer" / T.ENGINE_FILE
    rec = T.build_engine(pixart_transformer, path, shape_ranges=ranges, precision="fp16", backend="tensorrt_rtx",
                         compute_capabilities=["SM89"], opt_level=0, no_cache=True, component="transformer")
    assert path.stat().st_size > 0 and rec["precision"] == "fp16"
    assert rec["backend_options"]["autocast"] == "fp16"
    assert rec["report"]["autocast"]["shape_nodes"] > 0


def test_conversion_version_is_in_the_cache_key():
    """An engine cached from an older fp16 conversion (fp16 shape tensors) must not be served for the same graph."""
    from diffc.engines._trt_autocast import AUTOCAST_VERSION

    common = dict(opt_level=0, workspace_bytes=None, refit=False, weight_streaming=False, compute_capabilities=["SM89"],
                  hardware_compat="none", version_compat=False, build_gpu=None)
    fp16 = T._settings("tensorrt_rtx", "1", "fp16", {"strongly_typed": True, "autocast": "fp16"}, {}, **common)
    fp32 = T._settings("tensorrt_rtx", "1", "fp32", {"strongly_typed": True, "autocast": None}, {}, **common)
    assert fp16["autocast_version"] == AUTOCAST_VERSION >= 2 and "autocast_version" not in fp32
