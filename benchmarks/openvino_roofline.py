"""How close an OpenVINO artifact's components run to this CPU's convolution peak.

For each component of ARTIFACT (built with `cpu-openvino` or `cpu-openvino-int8`), at one image size: the
multiply-adds of its Convolution and MatMul nodes (from the static shapes), one timed run with OpenVINO's
per-layer counters, and the time by layer kind: int8 convolutions / GEMMs, bf16 ones, fused subgraphs
(attention, element-wise), the rest. Beside them, the peak of the same kernels measured on one large 3x3
convolution (256 -> 256 channels at 128x128), int8 (Q/DQ) and bf16 (fastest of 5 runs; components: of --runs). `ratios.<component>_conv_gemm_of_<kind>_peak`
= multiply-adds per second of its convolutions and linear layers / that peak; near 1.0 they cannot get faster
without doing less work. Attention (MatMuls of two activations) runs in fused subgraphs, reported apart.

    python benchmarks/openvino_roofline.py ARTIFACT [--size 512] [--runs 3]

Prints one JSON object. Needs the openvino extra; the artifact is compiled here (OpenVINO's host cache is
not used, so the per-layer counters are on).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, sig  # noqa: E402


def conv_peak(core, precision: str) -> float:
    """Multiply-adds per second of one 256 -> 256, 3x3 convolution at 128x128 (int8: Q/DQ on its input and
    weights, as diffc's quantize pass writes it), from OpenVINO's counters (best of 5 runs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c, hw = 256, 128
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((c, c, 3, 3)) * 0.02).astype(np.float32)
    nodes, inits, x = [], [], "x"
    if precision == "int8":
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
                  numpy_helper.from_array(np.array(0, np.int8), "xz"),
                  numpy_helper.from_array(np.round(w / 1e-3).clip(-127, 127).astype(np.int8), "wq"),
                  numpy_helper.from_array(np.full(c, 1e-3, np.float32), "ws"),
                  numpy_helper.from_array(np.zeros(c, np.int8), "wz")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                  helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=0)]
        x = "xd"
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    nodes.append(helper.make_node("Conv", [x, "w"], ["y"], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, f"{tmp}/conv.onnx")
        compiled = core.compile_model(core.read_model(f"{tmp}/conv.onnx"), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "bf16", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    feed = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    request.infer({"x": feed})
    best = min(_conv_seconds(request, feed) for _ in range(5))
    return hw * hw * c * c * 9 / best


def _conv_seconds(request, feed) -> float:
    request.infer({"x": feed})
    return sum(p.real_time.total_seconds() for p in request.profiling_info if p.node_type == "Convolution")


def _from_constants(output, depth: int = 8) -> bool:
    """Whether a value is computed from constants only (a layer's weights, through their Convert / dequantize
    / reshape chain) rather than from the model's inputs (attention's keys and values)."""
    node = output.get_node()
    if node.get_type_name() == "Constant":
        return True
    if node.get_type_name() == "Parameter" or depth == 0 or node.get_input_size() == 0:
        return False
    return all(_from_constants(i.get_source_output(), depth - 1) for i in node.inputs())


def multiply_adds(model) -> dict[str, float]:
    """Multiply-adds of a reshaped (static) OpenVINO model's Convolution nodes, of its MatMuls with weights
    (linear layers) and of its MatMuls of two activations (attention)."""
    out = {"conv": 0.0, "linear": 0.0, "attention": 0.0}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Convolution":
            weights = list(op.input(1).get_shape())
            out["conv"] += float(np.prod(list(op.get_output_shape(0)))) * float(np.prod(weights[1:]))
        elif kind == "MatMul":
            a = list(op.input(0).get_shape())
            k = a[-2] if op.get_transpose_a() else a[-1]
            which = "linear" if _from_constants(op.input(1).get_source_output()) else "attention"
            out[which] += float(np.prod(list(op.get_output_shape(0)))) * k
    return out


#: how OpenVINO's per-layer times are grouped
LAYER_KINDS = ("int8_conv_gemm", "float_conv_gemm", "fused_subgraphs", "other")


def layer_kind(node_type: str, exec_type: str) -> str:
    if node_type in ("Convolution", "FullyConnected", "FullyConnectedQuantizedLegacy", "MatMul"):
        return "int8_conv_gemm" if exec_type.lower().endswith("_i8") else "float_conv_gemm"
    if node_type == "Subgraph":
        return "fused_subgraphs"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (default 512)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per component; the fastest is reported")
    args = ap.parse_args()
    import openvino as ov

    from diffc.runtime.manifest import read_manifest
    from diffc.runtime.pipeline import opt_shapes

    manifest = read_manifest(args.artifact)
    core = ov.Core()
    peak = {p: conv_peak(core, p) for p in ("int8", "bf16")}
    latent = args.size // manifest["latent"]["vae_scale_factor"]
    rng = np.random.default_rng(0)
    components, ratios = {}, {}
    for name, c in manifest["components"].items():
        if c["backend"] != "openvino":
            sys.exit(f"{name} is a {c['backend']} component: this script measures OpenVINO artifacts")
        model = core.read_model(str(args.artifact / c["file"]))
        names = [p.get_any_name() for p in model.inputs]
        shapes = opt_shapes(c, {"height": latent, "width": latent, "image_height": args.size,
                                "image_width": args.size})  # the vae_encoder's axes are in pixels
        model.reshape(dict(zip(names, shapes)))
        macs = multiply_adds(model)
        t0 = time.perf_counter()
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16" if c["precision"] != "fp32"
                                                     else "f32", "PERF_COUNT": True})
        compile_s = time.perf_counter() - t0
        request = compiled.create_infer_request()
        feeds = [rng.integers(0, 1000, s).astype(np.int64) if p.get_element_type().is_integral()
                 else rng.standard_normal(s).astype(np.float32) for p, s in zip(model.inputs, shapes)]
        request.infer(feeds)  # the first run allocates
        runs = []  # this machine's speed drifts from second to second: the fastest of --runs
        for _ in range(args.runs):
            t0 = time.perf_counter()
            request.infer(feeds)
            by_kind = dict.fromkeys(LAYER_KINDS, 0.0)
            for p in request.profiling_info:
                by_kind[layer_kind(p.node_type, p.exec_type)] += p.real_time.total_seconds()
            runs.append((time.perf_counter() - t0, by_kind))
        run_s, by_kind = min(runs, key=lambda r: r[0])
        conv_gemm_s = by_kind["int8_conv_gemm"] + by_kind["float_conv_gemm"]
        components[name] = {"precision": c["precision"], "shapes": [list(s) for s in shapes],
                            "compile_s": round(compile_s, 2), "run_s": sig(run_s),
                            "runs_s": [sig(r[0]) for r in runs],
                            "gmac": {k: sig(v / 1e9) for k, v in macs.items()},
                            "layer_s": {k: sig(v) for k, v in sorted(by_kind.items())}}
        if conv_gemm_s > 0:
            # the convolutions and linear layers run on conv / GEMM kernels; attention's MatMuls run inside
            # OpenVINO's fused subgraphs (with the softmax and element-wise ops), so they are reported apart
            # (the peak is the component's own precision's, not whichever kernel happened to take longer)
            kernel = "int8" if c["precision"] == "int8" else "bf16"
            achieved = (macs["conv"] + macs["linear"]) / conv_gemm_s
            components[name]["conv_gemm_gmac_per_s"] = sig(achieved / 1e9)
            ratios[f"{name}_conv_gemm_of_{kernel}_peak"] = sig(achieved / peak[kernel])
        if macs["attention"] and by_kind["fused_subgraphs"]:
            components[name]["attention_and_fused_gmac_per_s"] = sig(macs["attention"] / by_kind["fused_subgraphs"] / 1e9)
    emit({"benchmark": "openvino_roofline", "artifact": str(args.artifact), "size": args.size,
          "openvino": ov.get_version(), "peak_gmac_per_s": {k: round(v / 1e9) for k, v in peak.items()},
          "components": components, "ratios": ratios,
          "machine": {**machine(), "openvino_cpu": core.get_property("CPU", "FULL_DEVICE_NAME"),
                      "capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))}})


if __name__ == "__main__":
    main()
