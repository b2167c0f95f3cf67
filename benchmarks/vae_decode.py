"""The SD-1.5 VAE decoder on the CPU: torch anchors vs diffc fp32 and diffc int8 (``[precision].vae_decoder``).

At a few sampling steps the decoder is a large share of a text-to-image generation (SD 1.5 at 256x256: ~0.6
TFLOP per image, as much as ~1.7 UNet steps with classifier-free guidance), which is why diffc can quantize it.
Builds ``AutoencoderKL`` from SD 1.5's published config (``benchmarks/_sd15.py``) with random weights from a
fixed seed (speed does not depend on weight values) and times one decode of one image at latents 32x32 and
64x64 (256x256 and 512x512 pixels):

==============================  ============================================================================
``torch_eager_fp32``            ``vae.decode`` under ``torch.inference_mode``
``torch_bf16_channels_last``    the module in bfloat16 with channels-last weights and input
``diffc_fp32``                  diffc's export of the decoder + ``run_passes(model, "vae_decoder", "onnxruntime")``
``diffc_int8``                  diffc_fp32 + diffc's quantize pass as a profile with ``vae_decoder = "int8"``
                                builds it (uint8 activations, int8 per-channel weights, conv_in / conv_out in
                                float); ranges calibrated on this benchmark's random latents, scaled as the
                                runtime scales final latents (speed does not depend on them; image quality is
                                measured on the trained demo model by ``benchmarks/quality.py``)
==============================  ============================================================================

Both onnxruntime variants use the session settings of ``benchmarks/unet_step.py``. Each variant runs in its own
process, round-robin, ``--cycles`` times; medians over all runs are reported.

``--tiny`` measures instead what ``diffc build --vae-decoder`` saves (diffc.exporter.tiny_vae): the SD VAE decoder
against a TAESD-config ``AutoencoderTiny`` decoder (diffusers' defaults *are* TAESD's config; random weights,
speed only), each exported as diffc exports it (the tiny one with the 0.18215 latent rescaling in front), on
the ``cpu-fp32`` path (onnxruntime, diffc's onnxruntime passes: ``*_ort_fp32``) and the default ``cpu`` path
(diffc's openvino passes, OpenVINO IR with fp16 weights, bf16 compute where the CPU has it: ``*_ov_bf16``),
at 512x512 (latents 64x64; ``--quick``: 256x256).

    python benchmarks/vae_decode.py [--quick] [--cycles N] [--tiny]

Prints one JSON object: median seconds per variant and size, ``ratios`` (anchor time / diffc fp32 time, and
``fp32_over_int8``), the largest difference of each variant's image from torch fp32 (on [-1, 1]; int8 is not
expected to match to fp32 precision), and the machine's details. The log goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import call_worker as _call_worker, emit, log_to_stderr, machine  # noqa: E402
from unet_step import _ort_session, median_of, samples  # noqa: E402

log = logging.getLogger("diffc.bench.vae_decode")

ANCHORS = ("torch_eager_fp32", "torch_bf16_channels_last")
SCALING = 0.18215  # SD 1.5's VAE scaling factor: the runtime decodes latents / SCALING


def latents(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1, 4, size, size)) / SCALING).astype(np.float32)


def sd15_vae():
    import diffusers
    import torch

    from _sd15 import SD15_VAE

    torch.manual_seed(0)
    return diffusers.AutoencoderKL(**SD15_VAE).eval()


# ------------------------------------------------------------------------------------------ workers


def worker_build(args) -> dict[str, Any]:
    """Export the decoder, run diffc's passes, calibrate and quantize: diffc_fp32 and diffc_int8 graphs."""
    import onnx_ir as ir
    import torch

    from diffc.exporter.contracts import SampleShape, get_contract
    from diffc.exporter.export import export_component, quiet_huggingface
    from diffc.onnx_io import load_model, save_model
    from diffc.passes import run_passes
    from diffc.passes.quantize import calibration_targets
    from diffc.profiles.schema import Backend
    from diffc.build.calibrate import RangeRecorder
    from diffc.build.quantize import quantize_graph

    quiet_huggingface()
    work = Path(args.out)
    vae = sd15_vae()
    contract = get_contract("vae_decoder", vae)
    sample = contract.make_inputs(vae, SampleShape(1, 32, 32, 77), torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    export_component(vae, contract, work / "plain" / "model.onnx", opset=21, exporter="torchscript", sample=sample)
    export_s = time.perf_counter() - t0
    model, report = run_passes(load_model(work / "plain" / "model.onnx"), "vae_decoder", "onnxruntime")
    fp32 = work / "diffc_fp32" / "model.onnx"
    save_model(model, fp32, external=True)
    del model
    keep = ("conv_in", "conv_out", "time_embedding", "skip_concat")  # cpu-int8's default [quantize].keep_float
    recorder = RangeRecorder(fp32, calibration_targets(ir.load(fp32).graph, keep_float=keep), num_steps=1,
                             cfg=False, method="percentile", percentile=99.99)
    try:
        for seed in range(3):
            recorder.run({"latent_sample": latents(args.sizes[-1], seed + 10)})
        ranges = recorder.ranges()
    finally:
        recorder.close()
    entry = quantize_graph(fp32, work / "diffc_int8" / "model.onnx", ranges, qtype="uint8", keep_float=keep,
                           backend=Backend.ONNXRUNTIME)
    return {"export_s": round(export_s, 1), "passes": [p["name"] for p in report["passes"] if p["modified"]],
            "tensors_calibrated": len(ranges), "quantize_fired": entry["fired"],
            "parameters_m": round(sum(p.numel() for p in vae.decoder.parameters()) / 1e6, 1)}


def worker_torch(args) -> dict[str, Any]:
    import torch

    from diffc.exporter.export import quiet_huggingface

    quiet_huggingface()
    vae = sd15_vae()
    times: dict[str, dict[str, list[float]]] = {a: {} for a in ANCHORS}
    with torch.inference_mode():
        if args.parity:
            np.save(args.parity, vae.decode(torch.from_numpy(latents(args.sizes[0], 1))).sample.numpy())
        for size in args.sizes:
            z = torch.from_numpy(latents(size))
            times["torch_eager_fp32"][f"{size}x{size}"] = samples(lambda: vae.decode(z), args.reps)
        vae.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
        for size in args.sizes:
            z = torch.from_numpy(latents(size)).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            times["torch_bf16_channels_last"][f"{size}x{size}"] = samples(lambda: vae.decode(z), args.reps)
    return {"times": times}


def worker_ort(args) -> dict[str, Any]:
    sess = _ort_session(args.model)
    times = {}
    for size in args.sizes:
        feed = {"latent_sample": latents(size)}
        times[f"{size}x{size}"] = samples(lambda: sess.run(None, feed), args.reps)
    if args.parity:
        np.save(args.parity, sess.run(None, {"latent_sample": latents(args.sizes[0], 1)})[0])
    return {"times": {args.name: times}}


TINY_VARIANTS = ("full_ort_fp32", "tiny_ort_fp32", "full_ov_bf16", "tiny_ov_bf16")


def worker_build_tiny(args) -> dict[str, Any]:
    """The SD VAE decoder and a TAESD-config tiny decoder, exported as diffc exports them, through diffc's passes
    for onnxruntime (``*_ort_fp32``) and for openvino + the cpu profile's engine build (``*_ov_bf16``)."""
    import diffusers
    import torch

    from diffc.engines.openvino import build_engine
    from diffc.exporter.contracts import SampleShape, get_contract
    from diffc.exporter.export import export_component, quiet_huggingface
    from diffc.exporter.tiny_vae import TinyVaeDecoder
    from diffc.onnx_io import load_model, save_model
    from diffc.passes import run_passes

    quiet_huggingface()
    work = Path(args.out)
    torch.manual_seed(0)
    modules = {"full": sd15_vae(), "tiny": TinyVaeDecoder(diffusers.AutoencoderTiny().eval(), SCALING, 0.0).eval()}
    out: dict[str, Any] = {"parameters_m": {}}
    for kind, module in modules.items():
        contract = get_contract("vae_decoder", module)
        sample = contract.make_inputs(module, SampleShape(1, 32, 32, 77), torch.Generator().manual_seed(0))
        plain = work / f"{kind}_plain" / "model.onnx"
        export_component(module, contract, plain, opset=21, exporter="torchscript", sample=sample)
        decoder = module.decoder if kind == "full" else module.tiny.decoder
        out["parameters_m"][kind] = round(sum(p.numel() for p in decoder.parameters()) / 1e6, 2)
        for target, name in (("onnxruntime", f"{kind}_ort_fp32"), ("openvino", f"{kind}_ov_bf16")):
            model, _ = run_passes(load_model(plain), "vae_decoder", target)
            graph = work / name / "model.onnx"
            save_model(model, graph, external=True)
            del model
            if target == "openvino":
                build_engine(graph, work / name / "model.xml", precision="bf16")
    return out


def worker_ov(args) -> dict[str, Any]:
    from diffc.engines.openvino import Session

    times = {}
    for size in args.sizes:
        sess = Session(args.model, precision="bf16", shapes=[(1, 4, size, size)])
        feed = {"latent_sample": latents(size)}
        times[f"{size}x{size}"] = samples(lambda: sess.run(feed), args.reps)
    return {"times": {args.name: times}}


def run_tiny(args, sizes: list[int], cycles: int, work: Path) -> dict[str, Any]:
    """``--tiny``: full vs tiny decoder, cpu-fp32 (onnxruntime) and cpu (OpenVINO bf16) paths."""
    log.info("exporting the SD-1.5 VAE decoder and a TAESD-config tiny decoder in %s", work)
    setup = call_worker("build_tiny", out=work, sizes=sizes)
    runs: dict[str, dict[str, list[list[float]]]] = {}
    for cycle in range(cycles):
        log.info("cycle %d/%d", cycle + 1, cycles)
        for name in TINY_VARIANTS:
            worker = "ov" if name.endswith("_ov_bf16") else "ort"
            model = work / name / ("model.xml" if worker == "ov" else "model.onnx")
            for variant, by_size in call_worker(worker, model=model, name=name, sizes=sizes)["times"].items():
                for size, xs in by_size.items():
                    runs.setdefault(variant, {}).setdefault(size, []).append(xs)
                log.info("%s: %s", variant, {s: round(min(x), 3) for s, x in by_size.items()})
    median = {f"{s}x{s}": {v: round(median_of(runs[v][f"{s}x{s}"]), 4) for v in runs} for s in sizes}
    return {
        "benchmark": "vae_decode", "mode": "tiny" + ("_quick" if args.quick else ""),
        "model": "SD-1.5 VAE decoder vs TAESD-config AutoencoderTiny decoder, random weights (speed only)",
        "batch": 1, "cycles": cycles, "median_s": median,
        "ratios": {size: {"full_over_tiny_cpu_fp32": round(row["full_ort_fp32"] / row["tiny_ort_fp32"], 2),
                          "full_over_tiny_cpu": round(row["full_ov_bf16"] / row["tiny_ov_bf16"], 2)}
                   for size, row in median.items()},
        "setup": setup,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
    }


WORKERS = {"build": worker_build, "torch": worker_torch, "ort": worker_ort, "build_tiny": worker_build_tiny,
           "ov": worker_ov}


def call_worker(worker: str, /, **kw) -> dict[str, Any]:
    return _call_worker(__file__, worker, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32x32 only, 1 cycle (smoke run)")
    ap.add_argument("--cycles", type=int, default=None, help="round-robin passes over the variants (default 2)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the graphs here (default: a temp dir)")
    ap.add_argument("--tiny", action="store_true", help="the SD VAE decoder vs a TAESD-config tiny decoder, "
                    "cpu-fp32 and cpu paths, 512x512 (--quick: 256x256)")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    for flag in ("--model", "--out", "--name", "--parity"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    log_to_stderr("onnxscript", "onnx_ir")
    if args.worker:
        sys.stdout.write(json.dumps(WORKERS[args.worker](args)) + "\n")
        return

    sizes = [32] if args.quick else [32, 64]
    cycles = args.cycles or (1 if args.quick else 2)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="diffc-vae-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        try:
            emit(run_tiny(args, [32] if args.quick else [64], cycles, work))
        finally:
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
        return
    try:
        log.info("exporting, passing and quantizing the SD-1.5 VAE decoder in %s", work)
        setup = call_worker("build", out=work, sizes=sizes)
        graphs = {name: work / name / "model.onnx" for name in ("diffc_fp32", "diffc_int8")}
        parity = {name: work / f"parity_{name}.npy" for name in ("torch", *graphs)}
        runs: dict[str, dict[str, list[list[float]]]] = {}
        for cycle in range(cycles):
            log.info("cycle %d/%d", cycle + 1, cycles)
            first = cycle == 0
            jobs = [("torch", {"sizes": sizes, "parity": parity["torch"] if first else None})]
            jobs += [("ort", {"model": path, "name": name, "sizes": sizes, "parity": parity[name] if first else None})
                     for name, path in graphs.items()]
            for worker, kw in jobs:
                for variant, by_size in call_worker(worker, **kw)["times"].items():
                    for size, xs in by_size.items():
                        runs.setdefault(variant, {}).setdefault(size, []).append(xs)
                    log.info("%s: %s", variant, {s: round(min(x), 3) for s, x in by_size.items()})
        ref = np.load(parity["torch"])
        max_diff = {name: round(float(np.abs(np.load(parity[name]) - ref).max()), 5) for name in graphs}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    median = {f"{s}x{s}": {v: round(median_of(runs[v][f"{s}x{s}"]), 4) for v in runs} for s in sizes}
    emit({
        "benchmark": "vae_decode", "mode": "quick" if args.quick else "full",
        "model": "SD-1.5 VAE decoder architecture, random weights", "batch": 1, "cycles": cycles,
        "median_s": median,
        "ratios": {size: {**{a: round(row[a] / row["diffc_fp32"], 3) for a in ANCHORS},
                          "fp32_over_int8": round(row["diffc_fp32"] / row["diffc_int8"], 3),
                          "torch_eager_fp32_over_int8": round(row["torch_eager_fp32"] / row["diffc_int8"], 3)}
                   for size, row in median.items()},
        "max_abs_diff_vs_torch_fp32": max_diff,
        "setup": setup,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
