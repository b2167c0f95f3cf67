"""Feature-cache reuse (DeepCache, ``[cache]`` profiles) on an SD-1.5-architecture UNet: step and loop speed.

The UNet has SD 1.5's config with random weights (speed does not depend on weight values; no hub here). It is
exported once with every cache branch marked (torchscript), run through diffc's onnxruntime passes, and cut
by the ``cache_reuse`` passes into the full graph and one shallow graph per measured branch. All graphs run in
diffc's onnxruntime session, fp32, latent 64x64 (512x512 images), batch 2 (classifier-free guidance), text
length 77.

Reported:

* ``step_s``: median seconds of one full step and of one shallow step per branch (each after a warm-up run; each
  measurement in a fresh process that holds one UNet session, so the SD-1.5 graphs never pile up in memory);
  ``ratios.shallow_over_full``: shallow / full per branch (goal: <= 0.30 at branch 0);
* ``loop_s``: the denoising loop of diffc's runtime (``Pipeline.denoise``: UNet steps, guidance and the DDIM
  update; text encoder and VAE are not part of it) at 8 and 20 steps, without cache and with the full UNet
  every 2nd / 3rd step at branch 0; ``ratios.loop_speedup``: no-cache time / cached time. The loop worker
  interleaves its configurations (and a full and a branch-0 shallow step) round by round and reports medians,
  so that load from other processes shifts them alike.

    python benchmarks/cache.py            # all 11 branches, 8- and 20-step loops (about 25 minutes on 2 cores)
    python benchmarks/cache.py --quick    # latent 32x32, branches 0 / 5 / 10, 8-step loops only (a few minutes)

Progress goes to the log (stderr); stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import emit, machine  # noqa: E402
from _sd15 import SD15_SCHEDULER, SD15_UNET, sd15_unet  # noqa: E402

log = logging.getLogger("diffc.bench.cache")

BATCH = 2  # classifier-free guidance: uncond + cond
SEQUENCE = 77
GUIDANCE = 7.5


def export_marked(work: Path, latent: int) -> Path:
    """SD-1.5 UNet -> ONNX with every cache branch marked -> diffc's onnxruntime passes. Returns the graph."""
    import torch

    from diffc.exporter.contracts import SampleShape, get_contract
    from diffc.exporter.export import DEFAULT_OPSET, export_component
    from diffc.onnx_io import load_model, save_model
    from diffc.passes import run_passes

    unet = sd15_unet()
    contract = get_contract("unet", unet, cache_marks=True)
    sample = contract.make_inputs(unet, SampleShape(1, latent, latent, SEQUENCE), torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    raw = export_component(unet, contract, work / "marked" / "model.onnx", opset=DEFAULT_OPSET,
                           exporter="torchscript", sample=sample)
    del unet
    log.info("exported in %.0f s", time.perf_counter() - t0)
    t0 = time.perf_counter()
    graph, _ = run_passes(load_model(raw), "unet", "onnxruntime")
    path = save_model(graph, work / "passed" / "model.onnx")
    shutil.rmtree(raw.parent)
    log.info("passes in %.0f s", time.perf_counter() - t0)
    return path


def cut(marked: Path, branch: int, kind: str, out: Path) -> tuple[Path, int]:
    """One cache_reuse pass over the marked graph; returns the saved graph and its node count."""
    import onnx_ir as ir

    from diffc.onnx_io import load_model, save_model
    from diffc.passes.cache_reuse import CacheFullPass, CacheShallowPass
    from diffc.exporter.unet_blocks import feature_dims, unet_branches

    level = unet_branches(SD15_UNET)[branch]["level"]
    model = ir.serde.deserialize_model(load_model(marked))
    (CacheFullPass(branch) if kind == "full" else
     CacheShallowPass(branch, dims=("batch", None, *feature_dims(level))))(model)
    proto = ir.serde.serialize_model(model)
    del model
    return save_model(proto, out / "model.onnx"), len(proto.graph.node)


def timed(fn, reps: int) -> float:
    fn()  # warm-up: first-run allocations
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def feeds_for(latent: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((BATCH, 4, latent, latent), dtype=np.float32),
            "timestep": np.full((BATCH,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((BATCH, SEQUENCE, SD15_UNET["cross_attention_dim"]),
                                                         dtype=np.float32)}


def loop_runner(sessions: dict[str, Any], branch: int, steps: int):
    """diffc's runtime loop (``Pipeline.denoise``) over the given sessions, without an artifact around it."""
    from diffc.exporter.unet_blocks import feature_name
    from diffc.runtime.pipeline import Pipeline
    from diffc.exporter.sampler import compile_sampler

    pipe = Pipeline.__new__(Pipeline)  # the loop needs sessions, tables and the cache entry; no files
    pipe.sessions, pipe.progress, pipe.manifest = sessions, False, {}
    pipe.tables = compile_sampler("ddim", SD15_SCHEDULER, steps)
    pipe.cache = {"feature": feature_name(branch), "shallow_component": "unet_shallow",
                  "schedule": {"kind": "interval", "interval": 1}, "full_steps": [True] * steps}
    pipe.cache_schedule = None
    return pipe


def worker(args) -> dict[str, Any]:
    """One measurement in a fresh process, so that at most two multi-GB sessions are ever alive."""
    from diffc.engines.onnxruntime import Session
    from diffc.exporter.unet_blocks import unet_branches

    work, latent = Path(args.workdir), args.latent
    feeds = feeds_for(latent)
    if args.worker == "step":
        b = args.branch
        path, nodes = cut(work / "passed" / "model.onnx", b, args.kind, work / f"{args.kind}{b}")
        if args.kind == "shallow":
            info = unet_branches(SD15_UNET)[b]
            size = latent >> info["level"]
            feeds[info["feature"]] = np.random.default_rng(1).standard_normal(
                (BATCH, info["channels"], size, size), dtype=np.float32)  # speed does not depend on its values
        sess = Session(path)
        secs = timed(lambda: sess.run(feeds, ["out_sample"]), args.reps)
        del sess
        if b != 0:  # disk: only branch 0's graphs are needed again (by the loop worker)
            shutil.rmtree(path.parent)
        return {"seconds": secs, "nodes": nodes}
    # loop: the full graph and branch 0's shallow graph, cut by earlier step workers
    sessions = {"unet": Session(work / "full0" / "model.onnx"),
                "unet_shallow": Session(work / "shallow0" / "model.onnx")}
    latents = np.random.default_rng(1).standard_normal((1, 4, latent, latent), dtype=np.float32)
    pipe = loop_runner(sessions, 0, args.steps)
    shallow_feeds = {**feeds, "cache_feature_0": sessions["unet"].run(feeds, ["cache_feature_0"])["cache_feature_0"]}
    steps = {"full": lambda: sessions["unet"].run(feeds, ["out_sample"]),
             "shallow_branch_0": lambda: sessions["unet_shallow"].run(shallow_feeds, ["out_sample"])}
    for fn in steps.values():
        fn()  # warm-up
    # Rounds that interleave every configuration, medians over rounds: load from other processes on the machine
    # then shifts all of them alike instead of biasing one.
    times: dict[str, list[float]] = {}
    for _ in range(args.reps):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times.setdefault(f"step_{name}", []).append(time.perf_counter() - t0)
        for interval in (None, 2, 3):
            pipe.set_cache_schedule(None if interval is None else {"kind": "interval", "interval": interval})
            t0 = time.perf_counter()
            pipe.denoise(latents, feeds["encoder_hidden_states"], guidance=GUIDANCE)
            times.setdefault("no_cache" if interval is None else f"interval_{interval}", []).append(
                time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run_worker(work: Path, latent: int, **opts: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--workdir", str(work), "--latent", str(latent)]
    for k, v in opts.items():
        cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {opts} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="latent 32x32, three branches, 8-step loops only")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per step (default 3, --quick 2)")
    ap.add_argument("--worker", choices=["step", "loop"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--latent", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--branch", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="shallow", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("diffc.export", "diffc.passes", "diffc.engines", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    t_start = time.perf_counter()

    from diffc.exporter.unet_blocks import unet_branches

    latent = 32 if args.quick else 64
    reps = args.reps or (2 if args.quick else 3)
    n_branches = len(unet_branches(SD15_UNET))
    branches = [0, n_branches // 2, n_branches - 1] if args.quick else list(range(n_branches))
    loop_steps = (8,) if args.quick else (8, 20)
    loop_reps = 2 if args.quick else 1
    result: dict[str, Any] = {"benchmark": "cache", "mode": "quick" if args.quick else "full",
                              "model": "SD-1.5-architecture UNet, random weights, fp32, onnxruntime CPU (diffc passes)",
                              "latent": [latent, latent], "batch": BATCH, "sequence": SEQUENCE,
                              "step_s": {}, "nodes": {}, "loop_s": {}, "ratios": {}}
    with tempfile.TemporaryDirectory(prefix="diffc-bench-cache-") as work:
        work = Path(work)
        export_marked(work, latent)
        full = run_worker(work, latent, worker="step", kind="full", branch=0, reps=reps)
        result["step_s"]["full"], result["nodes"]["full"] = round(full["seconds"], 3), full["nodes"]
        log.info("full step: %.2f s", full["seconds"])
        ratios = {}
        for b in branches:
            got = run_worker(work, latent, worker="step", kind="shallow", branch=b, reps=reps if b == 0 else 1)
            result["step_s"][f"shallow_branch_{b}"] = round(got["seconds"], 3)
            result["nodes"][f"shallow_branch_{b}"] = got["nodes"]
            ratios[str(b)] = round(got["seconds"] / full["seconds"], 3)
            log.info("branch %d: shallow %.2f s (%.3f of full), %d nodes", b, got["seconds"], ratios[str(b)],
                     got["nodes"])
        result["ratios"]["shallow_over_full"] = ratios
        result["ratios"]["goal_branch_0"] = {"max": 0.30, "met": ratios["0"] <= 0.30}
        speedups = {}
        for steps in loop_steps:
            got = run_worker(work, latent, worker="loop", steps=steps, reps=loop_reps)
            step_full, step_shallow = got.pop("step_full"), got.pop("step_shallow_branch_0")
            result["step_s"][f"interleaved_with_{steps}_step_loops"] = {
                "full": round(step_full, 3), "shallow_branch_0": round(step_shallow, 3)}
            result["ratios"][f"shallow_over_full_branch_0_interleaved_{steps}"] = round(step_shallow / step_full, 3)
            for mode, secs in got.items():
                key = f"{steps}_steps_{mode}"
                result["loop_s"][key] = round(secs, 2)
                if mode != "no_cache":
                    speedups[key] = round(got["no_cache"] / secs, 3)
                log.info("%s: %.1f s", key, secs)
        result["ratios"]["loop_speedup"] = speedups
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["machine"] = machine()
    emit(result)


if __name__ == "__main__":
    main()
