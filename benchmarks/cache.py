"""Feature-cache reuse (DeepCache, ``[cache]`` profiles) on an SD-1.5-architecture UNet: step and loop speed.

The UNet has SD 1.5's config with random weights (speed does not depend on weight values; no hub here). It is
exported once with every cache branch marked (torchscript), run through diffc's onnxruntime passes, and cut
by the ``cache_reuse`` passes into the full graph and one shallow graph per measured branch. All graphs run in
diffc's onnxruntime session, fp32, latent 64x64 (512x512 images), batch 2 (classifier-free guidance), text
length 77.

Reported:

* ``step_s``: median seconds of one full step and of one shallow step per branch (each after a warm-up run);
  ``ratios.shallow_over_full``: shallow / full per branch (goal: <= 0.30 at branch 0);
* ``loop_s``: the denoising loop of diffc's runtime (``Pipeline.denoise``: UNet steps, guidance and the DDIM
  update; text encoder and VAE are not part of it) at 8 and 20 steps, without cache and with the full UNet
  every 2nd / 3rd step at branch 0; ``ratios.loop_speedup``: no-cache time / cached time.

    python benchmarks/cache.py            # all 11 branches, 8- and 20-step loops (about 20-25 minutes on 2 cores)
    python benchmarks/cache.py --quick    # latent 32x32, branches 0 / 5 / 10, 8-step loops only (a few minutes)

Progress goes to the log (stderr); stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import logging
import statistics
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
    log.info("passes in %.0f s", time.perf_counter() - t0)
    return path


def cut(marked: Path, branch: int, kind: str, out: Path) -> tuple[Path, int]:
    """One cache_reuse pass over the marked graph; returns the saved graph and its node count."""
    import onnx_ir as ir

    from diffc.onnx_io import load_model, save_model
    from diffc.passes.cache_reuse import CacheFullPass, CacheShallowPass
    from diffc.runtime.cache import feature_dims, unet_branches

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


def loop_runner(sessions: dict[str, Any], branch: int, steps: int):
    """diffc's runtime loop (``Pipeline.denoise``) over the given sessions, without an artifact around it."""
    from diffc.runtime.cache import feature_name
    from diffc.runtime.pipeline import Pipeline
    from diffc.runtime.sampler import compile_sampler

    pipe = Pipeline.__new__(Pipeline)  # the loop needs sessions, tables and the cache entry; no files
    pipe.sessions, pipe.progress = sessions, False
    pipe.tables = compile_sampler("ddim", SD15_SCHEDULER, steps)
    pipe.cache = {"feature": feature_name(branch), "shallow_component": "unet_shallow",
                  "schedule": {"kind": "interval", "interval": 1}, "full_steps": [True] * steps}
    pipe.cache_schedule = None
    return pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="latent 32x32, three branches, 8-step loops only")
    ap.add_argument("--reps", type=int, default=None, help="timed runs per full step (default 3, --quick 2)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("diffc.export", "diffc.passes", "diffc.engines", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t_start = time.perf_counter()

    from diffc.engines.onnxruntime import Session
    from diffc.runtime.cache import unet_branches

    latent = 32 if args.quick else 64
    reps = args.reps or (2 if args.quick else 3)
    n_branches = len(unet_branches(SD15_UNET))
    branches = [0, n_branches // 2, n_branches - 1] if args.quick else list(range(n_branches))
    loop_steps = (8,) if args.quick else (8, 20)
    intervals = (2, 3)

    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((BATCH, 4, latent, latent), dtype=np.float32),
             "timestep": np.full((BATCH,), 500.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((BATCH, SEQUENCE, SD15_UNET["cross_attention_dim"]),
                                                          dtype=np.float32)}
    result: dict[str, Any] = {"benchmark": "cache", "mode": "quick" if args.quick else "full",
                              "model": "SD-1.5-architecture UNet, random weights, fp32, onnxruntime CPU (diffc passes)",
                              "latent": [latent, latent], "batch": BATCH, "sequence": SEQUENCE,
                              "step_s": {}, "nodes": {}, "loop_s": {}, "ratios": {}}
    with tempfile.TemporaryDirectory(prefix="diffc-bench-cache-") as work:
        work = Path(work)
        marked = export_marked(work, latent)
        # every branch's feature and the full output, from one run of the marked graph (it outputs them all);
        # one 3.4 GB session at a time
        marked_sess = Session(marked)
        features = marked_sess.run(feeds)
        del marked_sess
        full_path, result["nodes"]["full"] = cut(marked, 0, "full", work / "full")
        sess = Session(full_path)
        result["step_s"]["full"] = round(timed(lambda: sess.run(feeds, ["out_sample"]), reps), 3)
        del sess
        log.info("full step: %.2f s", result["step_s"]["full"])
        shallow_paths = {}
        ratios = {}
        for b in branches:
            path, nodes = cut(marked, b, "shallow", work / f"shallow{b}")
            shallow_paths[b] = path
            sess = Session(path)
            shallow_feeds = {**feeds, f"cache_feature_{b}": features[f"cache_feature_{b}"]}
            got = sess.run(shallow_feeds, ["out_sample"])["out_sample"]
            err = float(np.abs(got - features["out_sample"]).max())
            secs = timed(lambda: sess.run(shallow_feeds, ["out_sample"]), 1 if b else reps)
            result["step_s"][f"shallow_branch_{b}"] = round(secs, 3)
            result["nodes"][f"shallow_branch_{b}"] = nodes
            ratios[str(b)] = round(secs / result["step_s"]["full"], 3)
            log.info("branch %d: shallow %.2f s (%.3f of full), %d nodes, max |shallow - full| = %.2g", b, secs,
                     ratios[str(b)], nodes, err)
            del sess
        result["ratios"]["shallow_over_full"] = ratios
        result["ratios"]["goal_branch_0"] = {"max": 0.30, "met": ratios["0"] <= 0.30}

        # the loops at branch 0; one full-size session at a time above, two from here on
        sessions = {"unet": Session(full_path), "unet_shallow": Session(shallow_paths[0])}
        latents = np.random.default_rng(1).standard_normal((1, 4, latent, latent), dtype=np.float32)
        cond = feeds["encoder_hidden_states"]
        speedups = {}
        for steps in loop_steps:
            pipe = loop_runner(sessions, 0, steps)
            base = None
            for interval in (None, *intervals):
                pipe.set_cache_schedule(None if interval is None else {"kind": "interval", "interval": interval})
                t0 = time.perf_counter()
                pipe.denoise(latents, cond, guidance=GUIDANCE)
                secs = time.perf_counter() - t0
                key = f"{steps}_steps_" + ("no_cache" if interval is None else f"interval_{interval}")
                result["loop_s"][key] = round(secs, 2)
                if interval is None:
                    base = secs
                else:
                    speedups[key] = round(base / secs, 3)
                log.info("%s: %.1f s", key, secs)
        result["ratios"]["loop_speedup"] = speedups
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["machine"] = machine()
    emit(result)


if __name__ == "__main__":
    main()
