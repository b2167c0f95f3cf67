"""Image quality of the demo model through diffc's runtime: does few-step sampling still draw the prompted digit?

Builds the ``demo`` artifact once (the trained digit model, ``cpu-cache`` profile), then generates "a handwritten
digit <name>" for all ten digits x ``--seeds`` seeds in every configuration (a row):

    steps {1, 2, 4, 8, 20} x sampler {ddim, dpmpp_2m} x cache {off, interval_2, interval_3} x precision {fp32, int8}

and scores each row with

* ``prompt_accuracy``: the fraction of images the judge (a CNN trained on real MNIST digits by
  tools/train_demo.py, run with numpy: benchmarks/judge) labels as the prompted digit;
* ``psnr_vs_no_cache_db`` (cache rows): mean PSNR against the cache-off images of the same sampler and step count;
* ``psnr_db``: mean PSNR (images in [0, 1]) against the *same sampler's* 20-step image of the same prompt and
  seed, fp32, cache off (the row's ``reference`` says which); null for the reference row itself;
* ``psnr_vs_fp32_db`` (rows other than fp32): mean PSNR against the fp32 artifact's image of the same prompt,
  seed, sampler, step count and cache mode -- what quantization alone changed (issue 7: >= 28 dB);
* ``latency_ms_per_image``: median wall time of one ``pipe(prompt)`` call (batch 1, classifier-free guidance
  at the artifact's default scale, text encoder + denoiser steps + VAE decoder).

Every image of a (digit, seed) pair starts from the same latents in every row, so rows differ only in the
configuration. Goals (issue 5): the 20-step reference >= 90 % prompt accuracy, 4 steps >= 85 %.

Extension point: cache modes and precisions are registries (:data:`CACHE_MODES`, :data:`PRECISIONS`). The
feature-cache issue adds ``"interval_2"``/``"interval_3"`` to ``CACHE_MODES`` (a function that configures a
loaded pipeline), the INT8 issue adds ``"int8"`` to ``PRECISIONS`` (a function that builds that artifact);
every row keeps the fp32 / cache-off reference of its sampler, and ``goals`` grows the "at most 5 points below
the same step count" checks.

    python benchmarks/quality.py --quick    # 3 seeds per digit (30 images a row), < 3 minutes
    python benchmarks/quality.py            # 10 seeds per digit (100 images a row)
    python benchmarks/quality.py --model demo-dit   # the SD3-shaped transformer demo (tools/train_demo_dit.py)

``--model demo-dit`` judges the transformer demo the same way, with what its family has: the ``flow_euler``
sampler (FlowMatchEulerDiscreteScheduler), the ``cpu-fp32`` artifact as reference, no cache modes (feature
caching is UNet-only), and an int8 row from ``cpu-int8`` when that profile builds transformers (when it refuses,
the JSON's ``not_built`` says why).

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
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import emit, machine  # noqa: E402
from judge import Judge  # noqa: E402

log = logging.getLogger("diffc.bench.quality")

STEPS = (1, 2, 4, 8, 20)
SAMPLERS = ("ddim", "dpmpp_2m")
REFERENCE_STEPS = 20
GOALS = {"reference_min_accuracy": 0.90, "four_step_min_accuracy": 0.85, "int8_min_psnr_vs_fp32_db": 28.0}


def _build_fp32(out: Path) -> Path:
    import diffc

    # cache reuse on (branch 0); the "off" cache mode runs the full UNet every step, which equals the cpu-fp32
    # profile's artifact (tests/runtime/test_cache.py checks it within 1e-6)
    return diffc.build("demo", "cpu-cache", out, progress=False)


def _build_int8(out: Path) -> Path:
    """The ``cpu-int8`` profile with ``cpu-cache``'s cache reuse (so the cache modes apply to it too): calibrated on
    the demo's own 4-step loop, quality-gated at build time against its fp32 twin."""
    import dataclasses

    import diffc
    from diffc.profiles import load_profile

    profile = dataclasses.replace(load_profile("cpu-int8"), cache=load_profile("cpu-cache").cache)
    return diffc.build("demo", profile, out, progress=False)


def _build_dit_fp32(out: Path) -> Path:
    import diffc

    return diffc.build("demo-dit", "cpu-fp32", out, progress=False)


def _build_dit_int8(out: Path) -> Path:
    import diffc

    return diffc.build("demo-dit", "cpu-int8", out, progress=False)


def _cache_interval(n: int | None) -> Callable[[Any], Callable[[], None]]:
    """Cache mode: full UNet every ``n``-th step (None: every step), shallow UNet on the others."""
    def configure(pipe) -> Callable[[], None]:
        old = pipe.cache_schedule
        pipe.set_cache_schedule(None if n is None else {"kind": "interval", "interval": n})
        return lambda: pipe.set_cache_schedule(old)

    return configure


#: precision -> builds the demo artifact at that precision into the given folder
PRECISIONS: dict[str, Callable[[Path], Path]] = {"fp32": _build_fp32, "int8": _build_int8}
#: cache mode -> configures a loaded pipeline (returns an undo function)
CACHE_MODES: dict[str, Callable[[Any], Callable[[], None]]] = {
    "off": _cache_interval(None), "interval_2": _cache_interval(2), "interval_3": _cache_interval(3)}
REFERENCE = ("fp32", "off")  # (precision, cache) of the reference rows

#: --model -> what its rows are: precisions (builders), cache modes, samplers, and the name in the JSON
MODELS: dict[str, dict[str, Any]] = {
    "demo": {"precisions": PRECISIONS, "cache_modes": CACHE_MODES, "samplers": SAMPLERS,
             "name": "demo (tools/train_demo.py: MNIST digits, 32x32)"},
    "demo-dit": {"precisions": {"fp32": _build_dit_fp32, "int8": _build_dit_int8},
                 "cache_modes": {"off": lambda pipe: (lambda: None)}, "samplers": ("flow_euler",),
                 "name": "demo-dit (tools/train_demo_dit.py: SD3-shaped flow-matching DiT, MNIST digits, 32x32)"},
}


def digit_prompt(d: int) -> str:
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    return f"a handwritten digit {names[d]}"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(1.0 / mse)


def run_row(pipe, latents: dict, guidance: float) -> tuple[np.ndarray, list[float]]:
    """Generate every (digit, seed) once; returns images (N, H, W, 3) in (digit, seed) order and call times."""
    images, times = [], []
    for (d, _), lat in latents.items():
        t0 = time.perf_counter()
        images.append(pipe(digit_prompt(d), latents=lat, guidance=guidance)[0])
        times.append(time.perf_counter() - t0)
    return np.stack(images), times


def save_grid(images: np.ndarray, per_digit: int, path: Path, scale: int = 3) -> None:
    """(10 * per_digit, H, W, 3) in (digit, seed) order -> one PNG, a row per digit, 2 px gaps."""
    from PIL import Image

    n, h, w, _ = images.shape
    gap = 2
    grid = np.full((10 * (h + gap) + gap, per_digit * (w + gap) + gap, 3), 0.25, np.float32)
    for i in range(n):
        r, c = divmod(i, per_digit)
        grid[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = images[i]
    img = Image.fromarray((grid * 255).round().astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path, optimize=True)
    log.info("wrote %s", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="demo", help="which bundled demo to judge")
    ap.add_argument("--quick", action="store_true", help="3 seeds per digit instead of 10 (under 3 minutes)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per digit (default 10, --quick 3)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the artifact's)")
    ap.add_argument("--grid", type=Path, default=None,
                    help="also save the 4-step images of the first sampler (demo: ddim, the cpu profiles' "
                         "default) as a PNG grid, one row per digit")
    ap.add_argument("--artifact", type=Path, default=None,
                    help="use this already built fp32 demo artifact instead of building one (built with the "
                         "cpu-cache profile, or the cache rows fail)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("diffc.export", "diffc.build", "diffc.passes", "diffc.engines", "diffc.runtime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    n_seeds = args.seeds or (3 if args.quick else 10)
    t_start = time.perf_counter()

    from diffc.errors import DiffcError
    from diffc.runtime import load
    from diffc.exporter.sampler import compile_sampler

    model = MODELS[args.model]
    precisions, cache_modes, samplers = model["precisions"], model["cache_modes"], model["samplers"]
    not_built: dict[str, str] = {}

    judge = Judge()
    seeds = list(range(n_seeds))
    labels = np.repeat(np.arange(10), n_seeds)
    rows: list[dict[str, Any]] = []
    refs: dict[str, np.ndarray] = {}
    fp32_images: dict[tuple[str, str, int], np.ndarray] = {}  # (cache, sampler, steps) -> the fp32 row's images
    no_cache: dict[tuple[str, str, int], np.ndarray] = {}  # (precision, sampler, steps) -> the cache-off row's images
    build_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="diffc-quality-") as work:
        for precision, make in precisions.items():
            if precision == "fp32" and args.artifact is not None:
                artifact = args.artifact
            else:
                t0 = time.perf_counter()
                log.info("building the %s %s artifact", precision, args.model)
                try:
                    artifact = make(Path(work) / f"{args.model}-{precision}.diffc")
                except DiffcError as e:
                    if precision == REFERENCE[0]:
                        raise
                    # a profile that refuses this family (or fails its quality gate) is a result, not a crash
                    log.warning("%s artifact not built: %s", precision, e)
                    not_built[precision] = f"{type(e).__name__}: {e}"
                    continue
                build_s[precision] = round(time.perf_counter() - t0, 1)
            pipe = load(artifact, progress=False)
            guidance = args.guidance if args.guidance is not None else pipe.guidance["default_scale"]
            size = pipe.image["height"][1]
            latents = {(d, s): pipe.initial_noise(s, 1, size, size) for d in range(10) for s in seeds}
            sched_cfg = pipe.manifest["build"]["scheduler_config"]
            pipeline_class = pipe.manifest.get("source", {}).get("pipeline_class")
            for cache, configure in cache_modes.items():
                undo = configure(pipe)
                # the reference (20 steps) first, so every other row can be compared with it
                for sampler in samplers:
                    for steps in sorted(STEPS, key=lambda n: n != REFERENCE_STEPS):
                        pipe.tables = compile_sampler(sampler, sched_cfg, steps, pipeline_class=pipeline_class)
                        t0 = time.perf_counter()
                        images, times = run_row(pipe, latents, guidance)
                        pred = judge.predict(images)
                        is_ref = (precision, cache) == REFERENCE and steps == REFERENCE_STEPS
                        if is_ref:
                            refs[sampler] = images
                        if precision == REFERENCE[0]:
                            fp32_images[cache, sampler, steps] = images
                        same = fp32_images.get((cache, sampler, steps)) if precision != REFERENCE[0] else None
                        if cache == "off":
                            no_cache[precision, sampler, steps] = images
                        uncached = no_cache.get((precision, sampler, steps)) if cache != "off" else None
                        ref = refs.get(sampler)
                        row = {
                            "precision": precision, "cache": cache, "sampler": sampler, "steps": steps,
                            "prompt_accuracy": round(float((pred == labels).mean()), 4),
                            "per_digit_accuracy": [round(float((pred[labels == d] == d).mean()), 3) for d in range(10)],
                            "psnr_db": None if is_ref or ref is None else round(
                                float(np.mean([psnr(a, b) for a, b in zip(images, ref)])), 2),
                            "reference": f"{sampler}, {REFERENCE_STEPS} steps, {REFERENCE[0]}, cache {REFERENCE[1]}",
                            **({} if same is None else {"psnr_vs_fp32_db": round(
                                float(np.mean([psnr(a, b) for a, b in zip(images, same)])), 2)}),
                            # cache rows: against the same precision, sampler and step count without cache reuse
                            "psnr_vs_no_cache_db": None if uncached is None else round(
                                float(np.mean([psnr(a, b) for a, b in zip(images, uncached)])), 2),
                            "latency_ms_per_image": round(1000 * statistics.median(times), 2),
                        }
                        rows.append(row)
                        if args.grid and (precision, cache, sampler, steps) == (*REFERENCE, samplers[0], 4):
                            save_grid(images, n_seeds, args.grid)
                        log.info("%-5s cache %-3s %-8s %2d steps: accuracy %.3f, PSNR %s dB, %.1f ms/image (%.0f s)",
                                 precision, cache, sampler, steps, row["prompt_accuracy"], row["psnr_db"],
                                 row["latency_ms_per_image"], time.perf_counter() - t0)
                undo()

    def acc(sampler: str, steps: int) -> float:
        return next(r["prompt_accuracy"] for r in rows if (r["precision"], r["cache"]) == REFERENCE
                    and r["sampler"] == sampler and r["steps"] == steps)

    goals = {
        **GOALS,
        "met": {
            f"{s}_reference": acc(s, REFERENCE_STEPS) >= GOALS["reference_min_accuracy"] for s in samplers
        } | {f"{s}_4_steps": acc(s, 4) >= GOALS["four_step_min_accuracy"] for s in samplers}
        | {f"int8_{s}_4_steps_psnr": next(r["psnr_vs_fp32_db"] for r in rows if r["precision"] == "int8"
                                          and r["cache"] == REFERENCE[1] and r["sampler"] == s and r["steps"] == 4)
           >= GOALS["int8_min_psnr_vs_fp32_db"] for s in samplers
           if any(r["precision"] == "int8" for r in rows)},
    }
    rows.sort(key=lambda r: (list(precisions).index(r["precision"]), list(cache_modes).index(r["cache"]),
                             samplers.index(r["sampler"]), r["steps"]))
    emit({
        "benchmark": "quality",
        "model": model["name"],
        "mode": "quick" if args.quick else "full",
        "prompt": "a handwritten digit <name>",
        "digits": 10,
        "seeds_per_digit": n_seeds,
        "images_per_row": 10 * n_seeds,
        "guidance": guidance,
        "judge": {"kind": "CNN on real MNIST digits (numpy)", "heldout_accuracy": judge.heldout_accuracy},
        "rows": rows,
        "goals": goals,
        "not_built": not_built,
        "build_s": build_s,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
