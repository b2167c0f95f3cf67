"""One transformer-denoiser step on the CPU: torch fp32 / bf16 against diffc's CPU profiles.

Issue 29 item 7. Two models with random weights from a fixed seed (speed does not depend on weight values; no
model hub is reachable here):

``pixart``  ``PixArtTransformer2DModel`` with PixArt-Sigma-XL-2-1024-MS's transformer config (28 layers, 16 heads
            x 72, caption_channels 4096, sample_size 128, patch 2, in 4 / out 8: ~611 M parameters); CFG batch 2
            and PixArt-Sigma's 300 T5 tokens with their attention mask, at 512 px (64x64 latents) and 1024 px.
``flux``    ``FluxTransformer2DModel`` at FLUX.1-dev's width (hidden 3072 = 24 heads x 128,
            joint_attention_dim 4096, pooled 768, guidance embedding) with 2 double + 4 single blocks (~1.3 B
            parameters); batch 1 (guidance-embedded: no CFG batch), 512 T5 tokens, 512 px (32x32 packed latents).

Variants, each timed in its own fresh process, round-robin over ``--cycles`` so that other load on the machine
spreads over all of them:

===========================  ========================================================================================
``torch_fp32``               the diffusers module (through diffc's export wrapper: the denoiser graph alone, the
                             learned-sigma half dropped as the pipeline does) under ``torch.inference_mode``
``torch_bf16``               the same in bfloat16 (weights and float inputs)
``diffc_cpu``                the ``cpu`` profile's denoiser: diffc's OpenVINO graph passes, the OpenVINO IR
                             ``diffc build`` writes (fp16 weights), a :class:`diffc.engines.openvino.Session` with
                             bf16 inference precision compiled for the benchmark's static shapes. ``cpu-openvino`` is
                             an alias of ``cpu`` (same backend, passes and precision), so it is measured once
``diffc_cpu_fp32``           the ``cpu-fp32`` profile's denoiser: diffc's onnxruntime passes, a
                             :class:`diffc.engines.onnxruntime.Session`
``diffc_cpu_openvino_int8``  ``--int8``: ``cpu-openvino-int8``'s denoiser: the ``diffc_cpu`` graph calibrated
                             (percentile 99.99 over three timesteps of this benchmark's inputs, through
                             :class:`diffc.build.calibrate.RangeRecorder`) and quantized by
                             :func:`diffc.build.quantize.quantize_graph` with the profile's keep_float, int8 session
===========================  ========================================================================================

The diffc graphs come from :func:`diffc.exporter.export.export_component` (the transformer alone) and the
profile's own passes, not from ``diffc.build`` on a pipeline folder: the build's quality gate would run the
whole pipeline in fp32 and bf16 at this size, which does not fit a 2-core machine in benchmark time. The JSON
says so (``diffc_graphs``).

    python benchmarks/dit_step.py [--models pixart,flux] [--sizes 512,1024] [--cycles N] [--reps N] [--int8]

Prints one JSON object: median seconds per variant, model and size, and ``ratios_vs_torch_bf16``: torch bf16's
time over each variant's (above 1: faster than torch bf16), plus ``int8_over_cpu`` (diffc_cpu time / int8
time). The log goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import call_worker, emit, log_to_stderr, machine, sig  # noqa: E402

log = logging.getLogger("diffc.bench.dit_step")

SEED = 0
#: PixArt-alpha/PixArt-Sigma-XL-2-1024-MS/transformer/config.json
PIXART_CONFIG = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                     dropout=0.0, norm_num_groups=32, cross_attention_dim=1152, attention_bias=True,
                     sample_size=128, patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                     upcast_attention=False, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                     interpolation_scale=None, use_additional_conditions=False, caption_channels=4096,
                     attention_type="default")
#: FLUX.1-dev's transformer width, 2 double + 4 single blocks
FLUX_CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=4,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
MODELS = {
    # batch (CFG for PixArt), text tokens (the pipeline's max_sequence_length), sizes the issue asks for
    "pixart": {"batch": 2, "text": 300, "sizes": (512, 1024)},
    "flux": {"batch": 1, "text": 512, "sizes": (512,)},
}
VAE_FACTOR = 8
VARIANTS = ("torch_fp32", "torch_bf16", "diffc_cpu", "diffc_cpu_fp32", "diffc_cpu_openvino_int8")
BASELINE = "torch_bf16"
CALIBRATION_TIMESTEPS = (981.0, 500.0, 21.0)


def build_module(model: str):
    """The random-weight transformer, fp32, eval mode."""
    import torch
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

    from diffc.exporter.export import quiet_huggingface

    quiet_huggingface()
    torch.manual_seed(SEED)
    cls, cfg = (PixArtTransformer2DModel, PIXART_CONFIG) if model == "pixart" else (FluxTransformer2DModel,
                                                                                   FLUX_CONFIG)
    return cls(**cfg).eval()


def sample_shape(model: str, size: int):
    from diffc.exporter.contracts import SampleShape

    m = MODELS[model]
    latent = size // VAE_FACTOR
    return SampleShape(m["batch"], latent, latent, m["text"])


def samples(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _load_feeds(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# ------------------------------------------------------------------------------------------ workers
# Each runs in its own process (``--worker NAME``) and prints one JSON object as its last stdout line.


def worker_export(args) -> dict[str, Any]:
    """Export the transformer (fp32, TorchScript, opset 21) and write each size's feeds as .npz."""
    import torch

    from diffc.exporter.contracts import get_contract
    from diffc.exporter.export import DEFAULT_OPSET, export_component

    module = build_module(args.model)
    contract = get_contract("transformer", module)
    work = Path(args.work)
    for size in args.sizes:
        inputs = contract.make_inputs(module, sample_shape(args.model, size), torch.Generator().manual_seed(SEED))
        np.savez(work / f"feeds_{size}.npz", **{n: t.numpy() for n, t in zip(contract.input_names, inputs)})
    sample = contract.make_inputs(module, sample_shape(args.model, min(args.sizes)),
                                  torch.Generator().manual_seed(SEED))
    t0 = time.perf_counter()
    export_component(module, contract, work / "export" / "model.onnx", opset=DEFAULT_OPSET, exporter="torchscript",
                     sample=sample)
    return {"export_s": round(time.perf_counter() - t0, 1),
            "parameters_m": round(sum(p.numel() for p in module.parameters()) / 1e6, 1),
            "inputs": contract.input_names}


def worker_passes(args) -> dict[str, Any]:
    """The profile's graph passes over the export, as ``diffc build`` runs them; OpenVINO profiles also get
    their IR (``build_engine``)."""
    from diffc.engines import openvino as ov_engine
    from diffc.onnx_io import load_model, save_model
    from diffc.passes import run_passes
    from diffc.profiles.schema import load_profile

    profile = load_profile(args.profile)
    t0 = time.perf_counter()
    graph, report = run_passes(load_model(Path(args.model_path)), "transformer", profile.backend.value,
                               **profile.passes)
    out = Path(args.out)
    save_model(graph, out)
    del graph
    result: dict[str, Any] = {
        "passes_s": round(time.perf_counter() - t0, 1),
        "fired": {p["name"]: {k: v for k, v in p["fired"].items() if v} for p in report["passes"] if p["modified"]},
        "nodes": [sum(report["op_counts_before"].values()), sum(report["op_counts_after"].values())]}
    if profile.backend.value == "openvino":
        t1 = time.perf_counter()
        ov_engine.build_engine(out, out.with_name("model.xml"), precision="bf16")
        result["ir_s"] = round(time.perf_counter() - t1, 1)
    return result


def worker_int8(args) -> dict[str, Any]:
    """cpu-openvino-int8's quantization of the OpenVINO-passed graph: calibrate, Q/DQ, IR."""
    import onnx_ir as ir

    from diffc.build.calibrate import RangeRecorder
    from diffc.build.plan import check_transformer_profile
    from diffc.build.families import family_of
    from diffc.build.quantize import quantize_graph
    from diffc.engines import openvino as ov_engine
    from diffc.errors import ProfileError
    from diffc.passes import activation_type
    from diffc.passes.quantize import calibration_targets
    from diffc.profiles.schema import Backend, Precision, load_profile

    profile = load_profile("cpu-openvino-int8")
    family = family_of("PixArtSigmaPipeline" if args.model == "pixart" else "FluxPipeline")
    try:
        check_transformer_profile(profile, family)  # what diffc build checks before it exports anything
    except ProfileError as e:
        return {"refused": str(e)}
    opts = profile.quantize
    t0 = time.perf_counter()
    model = Path(args.model_path)
    targets = calibration_targets(ir.load(model).graph, keep_float=opts.keep_float, output_ranges=False)
    cfg = MODELS[args.model]["batch"] == 2
    recorder = RangeRecorder(model, targets, num_steps=len(CALIBRATION_TIMESTEPS), cfg=cfg, method=opts.method,
                             percentile=opts.percentile)
    try:
        feeds = _load_feeds(args.feeds)
        for t in CALIBRATION_TIMESTEPS:
            f = dict(feeds)
            f["timestep"] = np.full_like(feeds["timestep"], t if args.model == "pixart" else t / 1000.0)
            recorder.run(f)
        ranges = recorder.ranges()
    finally:
        recorder.close()
    calib_s = time.perf_counter() - t0
    out = Path(args.out)
    entry = quantize_graph(model, out, ranges, qtype=activation_type(profile, Precision.INT8),
                           keep_float=opts.keep_float, backend=Backend.OPENVINO)
    ov_engine.build_engine(out, out.with_name("model.xml"), precision="int8")
    return {"calibration_s": round(calib_s, 1), "tensors": len(ranges), "fired": entry["fired"],
            "seconds": round(time.perf_counter() - t0, 1)}


def worker_torch(args) -> dict[str, Any]:
    import torch

    from diffc.exporter.contracts import get_contract

    module = build_module(args.model)
    wrapped = get_contract("transformer", module).wrap(module).eval()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    wrapped.to(dtype)
    times = {}
    with torch.inference_mode():
        for size in args.sizes:
            feeds = _load_feeds(str(Path(args.work) / f"feeds_{size}.npz"))
            inputs = [torch.from_numpy(v).to(dtype) if v.dtype == np.float32 and name not in ("img_ids", "txt_ids")
                      else torch.from_numpy(v) for name, v in feeds.items()]
            times[str(size)] = samples(lambda: wrapped(*inputs), args.reps)
    return {"times": times, "threads": torch.get_num_threads()}


def worker_session(args) -> dict[str, Any]:
    """diffc's own session class for the backend: OpenVINO (bf16 / int8) or onnxruntime (fp32)."""
    t0 = time.perf_counter()
    times, opened = {}, None
    for size in args.sizes:
        feeds = _load_feeds(str(Path(args.work) / f"feeds_{size}.npz"))
        t1 = time.perf_counter()
        if args.precision in ("bf16", "int8"):
            from diffc.engines.openvino import Session

            sess = Session(args.model_path, precision=args.precision, shapes=[v.shape for v in feeds.values()])
        else:
            from diffc.engines.onnxruntime import Session

            sess = Session(args.model_path) if opened is None else opened
            opened = sess
        compile_s = time.perf_counter() - t1
        times[str(size)] = samples(lambda: sess.run(feeds), args.reps)
        log.info("%s %s px: compile %.1f s, step %s", args.precision, size, compile_s, times[str(size)])
    return {"times": times, "total_s": round(time.perf_counter() - t0, 1)}


WORKERS = {"export": worker_export, "passes": worker_passes, "int8": worker_int8, "torch": worker_torch,
           "session": worker_session}


# ------------------------------------------------------------------------------------------ driver


def run_model(model: str, sizes: list[int], args, scratch: Path) -> dict[str, Any]:
    work = scratch / model
    work.mkdir(parents=True, exist_ok=True)
    me = Path(__file__)
    info: dict[str, Any] = {"config": PIXART_CONFIG if model == "pixart" else FLUX_CONFIG,
                            "batch": MODELS[model]["batch"], "text_tokens": MODELS[model]["text"]}
    log.info("%s: export", model)
    info["export"] = call_worker(me, "export", model=model, sizes=sizes, work=work)
    exported = work / "export" / "model.onnx"
    graphs = {"diffc_cpu": (work / "openvino" / "model.onnx", "cpu"),
              "diffc_cpu_fp32": (work / "onnxruntime" / "model.onnx", "cpu-fp32")}
    for variant, (path, profile) in graphs.items():
        log.info("%s: %s passes", model, profile)
        path.parent.mkdir(parents=True, exist_ok=True)
        info[f"{variant}_build"] = call_worker(me, "passes", model_path=exported, profile=profile, out=path)
        log.info("%s: %s", model, info[f"{variant}_build"])
    shutil.rmtree(exported.parent, ignore_errors=True)  # keep the scratch disk use down
    variants = ["torch_fp32", "torch_bf16", "diffc_cpu", "diffc_cpu_fp32"]
    if args.int8:
        log.info("%s: cpu-openvino-int8 calibration and quantization", model)
        int8_path = work / "int8" / "model.onnx"
        int8_path.parent.mkdir(parents=True, exist_ok=True)
        built = call_worker(me, "int8", model=model, model_path=graphs["diffc_cpu"][0],
                            feeds=work / f"feeds_{max(sizes)}.npz", out=int8_path)
        if "refused" in built:
            info["diffc_cpu_openvino_int8"] = f"refused: {built['refused']}"
        else:
            info["diffc_cpu_openvino_int8_build"] = built
            variants.append("diffc_cpu_openvino_int8")
    else:
        info["diffc_cpu_openvino_int8"] = "not run (--int8 not given)"
    calls = {
        "torch_fp32": dict(worker="torch", dtype="fp32"),
        "torch_bf16": dict(worker="torch", dtype="bf16"),
        "diffc_cpu": dict(worker="session", precision="bf16", model_path=work / "openvino" / "model.xml"),
        "diffc_cpu_fp32": dict(worker="session", precision="fp32", model_path=work / "onnxruntime" / "model.onnx"),
        "diffc_cpu_openvino_int8": dict(worker="session", precision="int8", model_path=work / "int8" / "model.xml"),
    }
    raw: dict[str, dict[str, list[float]]] = {v: {str(s): [] for s in sizes} for v in variants}
    for cycle in range(args.cycles):
        for variant in variants:
            kw = dict(calls[variant])
            worker = kw.pop("worker")
            log.info("%s: cycle %d, %s", model, cycle + 1, variant)
            got = call_worker(me, worker, model=model, sizes=sizes, work=work, reps=args.reps, **kw)
            log.info("%s: %s seconds %s", model, variant, got["times"])
            for size, ts in got["times"].items():
                raw[variant][size].extend(ts)
    seconds = {v: {s: sig(statistics.median(ts)) for s, ts in by.items()} for v, by in raw.items()}
    info["seconds"] = seconds
    info["min_seconds"] = {v: {s: sig(min(ts)) for s, ts in by.items()} for v, by in raw.items()}
    info["ratios_vs_torch_bf16"] = {v: {s: sig(seconds[BASELINE][s] / seconds[v][s]) for s in seconds[v]}
                                    for v in variants}
    if "diffc_cpu_openvino_int8" in seconds:
        info["int8_over_cpu"] = {s: sig(seconds["diffc_cpu"][s] / seconds["diffc_cpu_openvino_int8"][s])
                                 for s in seconds["diffc_cpu"]}
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=sorted(WORKERS))
    ap.add_argument("--models", default="pixart,flux")
    ap.add_argument("--model")
    ap.add_argument("--sizes", default=None, help="pixel sizes, comma-separated (default: each model's own)")
    ap.add_argument("--cycles", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2, help="timed calls per process after one warm-up call")
    ap.add_argument("--int8", action="store_true", help="also build and time cpu-openvino-int8's denoiser")
    ap.add_argument("--out", help="also write the JSON here")
    for key in ("work", "profile", "model-path", "feeds", "dtype", "precision"):
        ap.add_argument(f"--{key}")
    args = ap.parse_args()
    if args.sizes is not None:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        sys.stdout.write(json.dumps(WORKERS[args.worker](args)) + "\n")
        return
    log_to_stderr("diffusers", "torch", "diffc.export", "diffc.passes", "diffc.engines")
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    result: dict[str, Any] = {
        "benchmark": "dit_step",
        "what": "one transformer call (the denoiser graph alone), random weights, median seconds per variant; "
                "ratios are torch_bf16 seconds / variant seconds",
        "diffc_graphs": "export_component + the profile's graph passes + the build's OpenVINO IR, timed through "
                        "diffc's engine sessions; not diffc.build on a pipeline folder (its fp32-vs-bf16 quality "
                        "gate over the whole pipeline does not fit a 2-core machine at this size)",
        "cpu_openvino": "alias of the cpu profile (same OpenVINO backend, passes and bf16 precision): measured "
                        "once, as diffc_cpu",
        "cycles": args.cycles, "reps_per_process": args.reps, "models": {}}
    scratch = Path(tempfile.mkdtemp(prefix="diffc-dit-step-"))
    try:
        for model in models:
            sizes = args.sizes or list(MODELS[model]["sizes"])
            result["models"][model] = run_model(model, sizes, args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["machine"] = machine()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    emit(result)


if __name__ == "__main__":
    main()
