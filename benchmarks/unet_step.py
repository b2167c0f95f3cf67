"""One denoising step of an SD-1.5-architecture UNet on the CPU: torch and onnxruntime anchors vs diffc.

Builds ``UNet2DConditionModel`` from SD 1.5's published config (``benchmarks/_sd15.py``) with random weights
from a fixed seed (speed does not depend on weight values; no model hub is reachable here), and times one
UNet call -- batch 2 (classifier-free guidance), text length 77 -- at 32x32 and 64x64 latents:

============================  ================================================================================
``torch_eager_fp32``          the diffusers module under ``torch.inference_mode``
``torch_bf16_channels_last``  the module in bfloat16, channels-last weights and input
``ort_plain_fp32``            the exported graph in an onnxruntime session (all graph optimizations on)
``ort_sd_optimizer_fp32``     after ``onnxruntime.transformers.optimizer`` (model_type "unet", python fusions)
                              with every fusion that emits a CUDA-only op turned off (GroupNorm, SkipGroupNorm,
                              BiasSplitGelu, packed QKV / KV, BiasAdd, NhwcConv): its CPU-safe configuration
``diffc_fp32``                ``diffc.passes.run_passes(model, "unet", "onnxruntime")``, same session settings
``diffc_int8``                diffc_fp32 + diffc's quantize pass (uint8 activations, int8 per-channel weights,
                              conv_in / conv_out / time embedding in float), as ``cpu-int8`` builds it; ranges
                              calibrated on this benchmark's own inputs at three timesteps (speed does not
                              depend on them; image quality is measured on the trained demo model in
                              ``benchmarks/quality.py``)
============================  ================================================================================

All onnxruntime variants start from the same export and use the same session options. ``--extra-variants``
adds diffc with opset-23 ``Attention`` and with ``GroupNormalization``-21 (the alternatives the pass defaults
were measured against), and ``ort_naive_int8``: ``onnxruntime.quantization.quantize_static`` on the plain export
(QDQ, per-channel, Conv/MatMul/Gemm, U8S8 -- its S8S8 graph does not load in onnxruntime 1.31), the route the
quantization issue measured as no faster than fp32.

Each measurement runs in a fresh process (an SD-1.5 session holds ~5.5 GB at 64x64; processes give the
memory back), and the variants are timed round-robin, ``--cycles`` times, so that other load on the machine
spreads over all of them instead of skewing one. Medians over cycles are reported, minima alongside.

    python benchmarks/unet_step.py [--quick] [--cycles N] [--exporter torchscript|dynamo] [--extra-variants]

Prints one JSON object: median seconds per variant and size, ``ratios`` (anchor time / diffc time, and
``fp32_over_int8``: diffc fp32 time / diffc int8 time), the
machine's measured fp32 GEMM peak, the UNet's FLOPs (Conv/MatMul/Gemm of the exported graph at each shape)
and the FLOP/s each variant achieves. Everything else goes to the log (stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import call_worker as _call_worker, emit, log_to_stderr, machine  # noqa: E402

log = logging.getLogger("diffc.bench.unet_step")

BATCH, TEXT_LEN, CROSS_DIM = 2, 77, 768
ANCHORS = ("torch_eager_fp32", "torch_bf16_channels_last", "ort_plain_fp32", "ort_sd_optimizer_fp32")
#: onnxruntime transformer-optimizer fusions whose ops onnxruntime implements for CUDA only
ORT_CUDA_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_packed_qkv",
                         "enable_packed_kv", "enable_bias_add", "enable_nhwc_conv")
EXTRA_DIFFC = {"diffc_fp32_attention23": {"attention": "attention23"},
               "diffc_fp32_group_normalization": {"groupnorm": "group_normalization"}}
PARITY_SEED = 1


def feeds(latent: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((BATCH, 4, latent, latent)).astype(np.float32),
        "timestep": np.full((BATCH,), 981.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((BATCH, TEXT_LEN, CROSS_DIM)).astype(np.float32),
    }


def samples(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------------------ workers
# Each runs in its own process (``--worker NAME``) and prints one JSON object as its last stdout line.


def worker_export(args) -> dict[str, Any]:
    import torch

    from _sd15 import sd15_unet
    from diffc.exporter.contracts import SampleShape, get_contract
    from diffc.exporter.export import export_component, quiet_huggingface

    quiet_huggingface()
    unet = sd15_unet(seed=0)
    contract = get_contract("unet", unet)
    sample = contract.make_inputs(unet, SampleShape(BATCH, 64, 64, TEXT_LEN), torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    export_component(unet, contract, Path(args.out), opset=21, exporter=args.exporter, sample=sample)
    return {"export_s": round(time.perf_counter() - t0, 1),
            "parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1)}


def worker_torch(args) -> dict[str, Any]:
    import torch

    from _sd15 import sd15_unet
    from diffc.exporter.export import quiet_huggingface

    quiet_huggingface()
    unet = sd15_unet(seed=0)
    times: dict[str, dict[str, list[float]]] = {"torch_eager_fp32": {}, "torch_bf16_channels_last": {}}
    with torch.inference_mode():
        if args.parity:
            f = {k: torch.from_numpy(v) for k, v in feeds(args.sizes[0], PARITY_SEED).items()}
            ref = unet(f["sample"], f["timestep"], f["encoder_hidden_states"], return_dict=False)[0]
            np.save(args.parity, ref.numpy())
        for lat in args.sizes:
            f = {k: torch.from_numpy(v) for k, v in feeds(lat).items()}
            times["torch_eager_fp32"][f"{lat}x{lat}"] = samples(
                lambda: unet(f["sample"], f["timestep"], f["encoder_hidden_states"], return_dict=False), args.reps)
        unet.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
        for lat in args.sizes:
            f = feeds(lat)
            x = torch.from_numpy(f["sample"]).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            t = torch.from_numpy(f["timestep"])
            h = torch.from_numpy(f["encoder_hidden_states"]).to(torch.bfloat16)
            times["torch_bf16_channels_last"][f"{lat}x{lat}"] = samples(lambda: unet(x, t, h, return_dict=False),
                                                                       args.reps)
    return {"times": times, "threads": torch.get_num_threads()}


def _ort_session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def worker_ort(args) -> dict[str, Any]:
    t0 = time.perf_counter()
    sess = _ort_session(args.model)
    start = time.perf_counter() - t0
    times = {}
    for lat in args.sizes:
        f = feeds(lat)
        times[f"{lat}x{lat}"] = samples(lambda: sess.run(None, f), args.reps)
    if args.parity:
        np.save(args.parity, sess.run(None, feeds(args.sizes[0], PARITY_SEED))[0])
    return {"times": {args.name: times}, "session_s": round(start, 2)}


def worker_sd_optimizer(args) -> dict[str, Any]:
    """onnxruntime's own SD optimizer, python fusions only (opt_level 0: the session applies its own), with
    every fusion that emits a CUDA-only op disabled."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("unet")
    for flag in ORT_CUDA_ONLY_FUSIONS:
        setattr(options, flag, False)
    t0 = time.perf_counter()
    model = optimizer.optimize_model(args.model, model_type="unet", opt_level=0, optimization_options=options,
                                     use_gpu=False, only_onnxruntime=False)
    stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model.save_model_to_file(args.out, use_external_data_format=True, all_tensors_to_one_file=True)
    return {"disabled": list(ORT_CUDA_ONLY_FUSIONS), "fused": stats, "seconds": round(time.perf_counter() - t0, 1),
            "contrib_ops": _cpu_legal_contrib_ops(args.out)}


def worker_diffc(args) -> dict[str, Any]:
    from diffc.onnx_io import load_model, save_model
    from diffc.passes import run_passes

    t0 = time.perf_counter()
    model = load_model(args.model)
    out, report = run_passes(model, "unet", "onnxruntime", **json.loads(args.options))
    del model
    save_model(out, args.out, external=True)
    return {
        "options": report["options"],
        "passes": [{"name": p["name"], "seconds": p["seconds"], "fired": {k: v for k, v in p["fired"].items() if v}}
                   for p in report["passes"]],
        "nodes": [sum(report["op_counts_before"].values()), sum(report["op_counts_after"].values())],
        "seconds": round(time.perf_counter() - t0, 1),
        "contrib_ops": _cpu_legal_contrib_ops(args.out),
    }


def worker_int8(args) -> dict[str, Any]:
    """diffc's quantize pass over the diffc fp32 graph. Calibration: the graph's own fp32 activations on this
    benchmark's inputs at timesteps 981, 500 and 21 (percentile 99.99, envelope), as diffc.build.calibrate does."""
    import onnx_ir as ir

    from diffc.passes.quantize import calibration_targets
    from diffc.build.calibrate import RangeRecorder
    from diffc.build.quantize import quantize_graph
    from diffc.profiles.schema import Backend

    t0 = time.perf_counter()
    model = Path(args.model)
    targets = calibration_targets(ir.load(model).graph)
    recorder = RangeRecorder(model, targets, num_steps=3, cfg=True, method="percentile", percentile=99.99)
    try:
        for t in (981.0, 500.0, 21.0):
            f = feeds(args.sizes[-1])
            f["timestep"] = np.full((BATCH,), t, np.float32)
            recorder.run(f)
        ranges = recorder.ranges()
    finally:
        recorder.close()
    calib_s = time.perf_counter() - t0
    entry = quantize_graph(model, Path(args.out), ranges, qtype="uint8",
                           keep_float=("conv_in", "conv_out", "time_embedding"), backend=Backend.ONNXRUNTIME)
    return {"calibration_s": round(calib_s, 1), "tensors": len(ranges), "fired": entry["fired"],
            "seconds": round(time.perf_counter() - t0, 1)}


def worker_naive_int8(args) -> dict[str, Any]:
    """onnxruntime's own static quantization, run in a scratch working directory (it writes UUID-named files
    into the current one). Calibrated on one 16x16 input: speed does not depend on the ranges."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([feeds(16)])

        def get_next(self):
            return next(self._it, None)

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    src = str(Path(args.model).resolve())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="naive-int8-") as scratch:
        cwd = os.getcwd()
        os.chdir(scratch)
        try:
            quantize_static(src, str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=True,
                            op_types_to_quantize=["Conv", "MatMul", "Gemm"], use_external_data_format=True)
        finally:
            os.chdir(cwd)
    return {"seconds": round(time.perf_counter() - t0, 1)}


def _cpu_legal_contrib_ops(path: str) -> dict[str, int]:
    """The graph's contrib ops, after diffc's check that onnxruntime's CPU provider implements every one."""
    import onnx_ir as ir

    from diffc.passes.check_ops import CheckTargetOpsPass

    model = ir.load(path)  # external weights stay on disk (memory-mapped)
    CheckTargetOpsPass(target="onnxruntime")(model)
    counts: dict[str, int] = {}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            counts[f"{node.domain}::{node.op_type}"] = counts.get(f"{node.domain}::{node.op_type}", 0) + 1
    return counts


def worker_gemm(args) -> dict[str, Any]:
    """fp32 GEMM FLOP/s on large matrices: numpy (BLAS) and onnxruntime MatMul (MLAS, weights prepacked)."""
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    best: dict[str, float] = {}
    for n in (2048, 4096):
        a = rng.standard_normal((n, n)).astype(np.float32)
        b = rng.standard_normal((n, n)).astype(np.float32)
        flops = 2.0 * n ** 3
        best[f"numpy_{n}"] = flops / min(samples(lambda: a @ b, 3))
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("MatMul", ["a", "b"], ["y"])], "gemm",
            [onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [n, n])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [n, n])],
            [onnx.numpy_helper.from_array(b, "b")])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
        model.ir_version = 10
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        best[f"onnxruntime_{n}"] = flops / min(samples(lambda: sess.run(None, {"a": a}), 3))
    return {"gemm_flops": best}


WORKERS = {"export": worker_export, "torch": worker_torch, "ort": worker_ort, "sd_optimizer": worker_sd_optimizer,
           "diffc": worker_diffc, "int8": worker_int8, "naive_int8": worker_naive_int8, "gemm": worker_gemm}


def call_worker(worker: str, /, **kw) -> dict[str, Any]:
    return _call_worker(__file__, worker, **kw)


# ------------------------------------------------------------------------------------------ FLOPs


def graph_flops(path: Path, latent: int) -> int:
    """2 x MACs of every Conv, MatMul and Gemm of the exported graph, shapes inferred at this input size."""
    import onnx_ir as ir

    from diffc.passes.cleanup import CleanupPass

    model = ir.load(str(path))  # weights stay memory-mapped
    dims = {"sample": [BATCH, 4, latent, latent], "timestep": [BATCH],
            "encoder_hidden_states": [BATCH, TEXT_LEN, CROSS_DIM]}
    for value in model.graph.inputs:
        value.shape = ir.Shape(dims[value.name])
    CleanupPass()(model)  # folds the shape arithmetic, so every operand shape is static
    total = 0
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        shapes = [v.shape for v in (*node.inputs[:2], node.outputs[0])]
        if any(s is None or not all(isinstance(d, int) for d in s) for s in shapes):
            raise RuntimeError(f"cannot count the FLOPs of {node.name}: shapes {shapes} are not static")
        a, b, y = (list(s) for s in shapes)
        if node.op_type == "Conv":
            total += 2 * int(np.prod(y)) * int(np.prod(b[1:]))
        else:
            k = a[0] if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) else a[-1]
            total += 2 * int(np.prod(y)) * k
    return total


# ------------------------------------------------------------------------------------------ main


def median_of(runs: list[list[float]]) -> float:
    return statistics.median(x for run in runs for x in run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32x32 only, 2 cycles (smoke run)")
    ap.add_argument("--cycles", type=int, default=None, help="round-robin passes over the variants (default 3)")
    ap.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    ap.add_argument("--extra-variants", action="store_true",
                    help="also diffc with opset-23 Attention and with GroupNormalization-21")
    ap.add_argument("--workdir", type=Path, default=None, help="for the ~3.4 GB graphs (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the graphs in --workdir")
    # worker mode (internal)
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    for flag in ("--model", "--out", "--name", "--options", "--parity"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    log_to_stderr("onnxscript", "onnx_ir")
    if args.worker:
        sys.stdout.write(json.dumps(WORKERS[args.worker](args)) + "\n")
        return

    sizes = [32] if args.quick else [32, 64]
    cycles = args.cycles or (2 if args.quick else 3)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="diffc-unet-step-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "unet_step", "mode": "quick" if args.quick else "full",
                              "model": "SD-1.5 UNet architecture, random weights", "batch": BATCH,
                              "text_length": TEXT_LEN, "exporter": args.exporter, "cycles": cycles,
                              "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    setup: dict[str, Any] = {}
    try:
        plain = work / "plain" / "model.onnx"
        if not plain.exists():
            log.info("exporting the SD-1.5 UNet (%s exporter) to %s", args.exporter, plain)
            setup["export"] = call_worker("export", out=plain, exporter=args.exporter)
        graphs = {"ort_plain_fp32": plain, "ort_sd_optimizer_fp32": work / "ort_sd_optimizer" / "model.onnx"}
        log.info("onnxruntime SD optimizer (CPU-safe fusions)")
        result["ort_sd_optimizer"] = call_worker("sd_optimizer", model=plain, out=graphs["ort_sd_optimizer_fp32"])
        diffc_variants = {"diffc_fp32": {}, **(EXTRA_DIFFC if args.extra_variants else {})}
        result["diffc"] = {}
        for name, options in diffc_variants.items():
            log.info("diffc passes for %s %s", name, options)
            graphs[name] = work / name / "model.onnx"
            result["diffc"][name] = call_worker("diffc", model=plain, out=graphs[name], options=json.dumps(options))
        log.info("diffc int8: calibrate and quantize the diffc fp32 graph")
        graphs["diffc_int8"] = work / "diffc_int8" / "model.onnx"
        result["diffc"]["diffc_int8"] = call_worker("int8", model=graphs["diffc_fp32"], out=graphs["diffc_int8"],
                                                    sizes=sizes)
        if args.extra_variants:
            log.info("onnxruntime quantize_static (naive int8)")
            graphs["ort_naive_int8"] = work / "ort_naive_int8" / "model.onnx"
            result["ort_naive_int8"] = call_worker("naive_int8", model=plain, out=graphs["ort_naive_int8"])
        flops = {f"{s}x{s}": graph_flops(plain, s) for s in sizes}
        log.info("UNet GFLOPs per step: %s", {k: round(v / 1e9, 1) for k, v in flops.items()})

        runs: dict[str, dict[str, list[list[float]]]] = {}
        session_s: dict[str, list[float]] = {}
        gemm: dict[str, float] = {}
        parity = {name: work / f"parity_{name}.npy" for name in ("torch", *graphs)}
        for cycle in range(cycles):
            log.info("cycle %d/%d", cycle + 1, cycles)
            first = cycle == 0
            jobs: list[tuple[str, dict]] = [("torch", {"sizes": sizes, "parity": parity["torch"] if first else None})]
            jobs += [("ort", {"model": path, "name": name, "sizes": sizes,
                              "parity": parity[name] if first else None}) for name, path in graphs.items()]
            jobs.append(("gemm", {}))
            for worker, kw in jobs:
                out = call_worker(worker, **kw)
                for variant, by_size in out.get("times", {}).items():
                    for size, xs in by_size.items():
                        runs.setdefault(variant, {}).setdefault(size, []).append(xs)
                    log.info("%s: %s", variant, {s: round(min(x), 3) for s, x in by_size.items()})
                if "session_s" in out:
                    session_s.setdefault(kw["name"], []).append(out["session_s"])
                for key, value in out.get("gemm_flops", {}).items():
                    gemm[key] = max(gemm.get(key, 0.0), value)
        ref = np.load(parity["torch"])
        max_diff = {name: float(np.abs(np.load(parity[name]) - ref).max()) for name in graphs}
    finally:
        if not args.keep:
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
            else:
                for name in ("ort_sd_optimizer", "diffc_fp32", "diffc_int8", "ort_naive_int8", *EXTRA_DIFFC):
                    shutil.rmtree(work / name, ignore_errors=True)

    median = {size: {v: round(median_of(runs[v][size]), 4) for v in runs} for size in flops}
    minimum = {size: {v: round(min(x for r in runs[v][size] for x in r), 4) for v in runs} for size in flops}
    peak = max(gemm.values())
    ratios = {size: {**{a: round(row[a] / row["diffc_fp32"], 3) for a in ANCHORS},
                     "fp32_over_int8": round(row["diffc_fp32"] / row["diffc_int8"], 3),
                     **({"ort_naive_int8_over_diffc_int8": round(row["ort_naive_int8"] / row["diffc_int8"], 3)}
                        if "ort_naive_int8" in row else {})} for size, row in median.items()}
    fastest = {size: min(ANCHORS, key=lambda a: row[a]) for size, row in median.items()}
    # the int8 graph is not expected to match torch fp32 to fp32 precision: report it, it is not a parity check
    achieved = {size: {v: round(flops[size] / t / 1e9, 1) for v, t in row.items()} for size, row in median.items()}
    result.update({
        "median_s": median,
        "min_s": minimum,
        "ratios": ratios,
        "fastest_anchor": fastest,
        "diffc_speedup_over_fastest_anchor": {size: ratios[size][fastest[size]] for size in median},
        "gemm_peak_gflops": round(peak / 1e9, 1),
        "gemm_gflops": {k: round(v / 1e9, 1) for k, v in gemm.items()},
        "unet_gflops_per_step": {k: round(v / 1e9, 1) for k, v in flops.items()},
        "achieved_gflops_per_s": achieved,
        "diffc_fraction_of_gemm_peak": {size: round(achieved[size]["diffc_fp32"] * 1e9 / peak, 3) for size in median},
        "max_abs_diff_vs_torch_fp32": max_diff,
        "session_start_s": {k: round(statistics.median(v), 2) for k, v in session_s.items()},
        "setup": setup,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
    })
    emit(result)


if __name__ == "__main__":
    main()
