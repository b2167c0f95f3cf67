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

**Savings rows** (issue 31; ``--savings on`` by default, ``only`` skips the grid above): on the fp32 artifact,
per technique and setting, at 8 and 20 steps of the first sampler -- ``optimized_schedule`` (the build's DP search,
diffc.build.schedule_search, run on the loaded artifact with digit prompts as its calibration set, at 4 and 8
steps; 2-10 in the full run, every sampler), ``adaptive_guidance`` (static / dynamic), ``deepcache`` and
``deepcache_extrapolation`` (DeepCache intervals with Adams-Bashforth-style extrapolation orders), ``step_cache``
(an artifact built with ``[savings.step_cache]``, thresholds and orders overridden per call). Each row: prompt
accuracy and its change against no savings, ``psnr_vs_no_savings_db`` (same sampler and step count, default
schedule, no savings), ``psnr_vs_20_steps_db``, what the denoiser evaluated per image (``Pipeline.last_trace``
counts; ``full_evaluations_per_image`` counts whole-denoiser steps, a conditional-only one as half),
``batch_rows_per_image`` and latency. ``savings.goals`` says which of the issue's goals each technique meets;
a technique this diffc cannot build is listed in ``not_built``. The rows are drawn as ``--plot`` (default
docs/savings.png: PSNR vs the 20-step image over full evaluations, one series per technique). The savings rows
take a few minutes on their own on an idle 2-core machine (``--quick --savings only``).

**LoRA rows** (issue 33; ``--lora NAME:SCALE``, repeatable, e.g. ``--lora demo-bold:0.5 --lora demo-bold:1.0``): on
the fp32 artifact, with the first sampler at 4 and 20 steps, the images without a LoRA and with each one applied
at run time (``Pipeline.set_loras``): prompt accuracy (is the LoRA'd digit still the prompted one?), the stroke
statistics of :func:`stroke_stats` (ink fraction, mean stroke width: what ``demo-bold`` thickens) and the PSNR
against the images without it. ``--lora-only`` skips the grid and the savings rows
(``python benchmarks/quality.py --lora demo-bold:0.5 --lora demo-bold:1.0 --lora-only``: a few minutes).

**Tiny VAE decoder** (issue 30; ``--vae-decoder demo-tiny`` or an AutoencoderTiny folder, instead of everything
above): the demo built with and without ``--vae-decoder``, ``cpu-fp32`` (onnxruntime) and the default ``cpu``
(OpenVINO); per profile the decoder's median ms per image (``Pipeline.decode`` of one image's final latents), and
on cpu-fp32 for the first sampler at 4 and 20 steps: prompt accuracy with each decoder, and the PSNR of the tiny
decoder's final images against the full decoder's (same latents, same loop).

Progress goes to the log (stderr); stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

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


def stroke_stats(images: np.ndarray) -> dict[str, float]:
    """How thick the digits are drawn (what the ``demo-bold`` LoRA changes), over images (N, H, W[, 3]) in [0, 1]:
    ``ink_fraction``, the share of pixels brighter than 0.5, and ``stroke_width_px``, twice the ink area over its
    boundary (ink pixels with a 4-neighbour that is not ink): a stroke of width w and length L has area w L and
    two edges of L pixels each, so this reads w (for w >= 2) without a skeleton. Means over the images."""
    grey = images.mean(-1) if images.ndim == 4 else images
    ink = grey > 0.5
    pad = np.pad(ink, ((0, 0), (1, 1), (1, 1)))
    inner = pad[:, :-2, 1:-1] & pad[:, 2:, 1:-1] & pad[:, 1:-1, :-2] & pad[:, 1:-1, 2:]
    area, edge = ink.sum((1, 2)), (ink & ~inner).sum((1, 2))
    width = 2.0 * area[edge > 0] / edge[edge > 0]
    return {"ink_fraction": float(ink.mean()), "stroke_width_px": float(width.mean()) if width.size else 0.0}


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


# ==========================================================================================================
# Savings rows (issue 31): per technique and setting, quality against the same loop without savings and against
# the 20-step image, and what the denoiser evaluated (Pipeline.last_trace)
# ==========================================================================================================
#: step counts the savings rows run at: the issue's goals are stated at 20 and at 8 steps
SAVINGS_STEPS = (8, 20)
#: step counts of the optimized-schedule rows (their saving is steps: each is also compared with the 20-step image)
SCHEDULE_STEPS = {"quick": (4, 8), "full": (2, 4, 8, 10)}
#: the prompts and seeds the schedule search runs on, standing for a profile's [quantize].calibration_prompts /
#: calibration_seeds: digits, as the demo is prompted, with seeds the judged images (0, 1, ...) do not use
SCHEDULE_CALIBRATION = {"quick": (("a handwritten digit two", "a handwritten digit seven"), (1000,)),
                        "full": (tuple(digit_prompt(d) for d in (0, 2, 5, 7)), (1000, 1001))}
#: settings per technique, (quick, full)
GUIDANCE_SETTINGS = {"quick": ({"guidance_threshold": 0.995}, {"from_three_quarters": True}),
                     "full": ({"guidance_threshold": 0.98}, {"guidance_threshold": 0.99}, {"guidance_threshold": 0.995},
                              {"guidance_threshold": 0.999}, {"from_half": True}, {"from_three_quarters": True})}
DEEPCACHE_SETTINGS = {"quick": ((3, 0), (3, 2)), "full": tuple((n, k) for n in (2, 3) for k in (0, 1, 2))}
STEP_CACHE_SETTINGS = {"quick": ((0.2, 0), (0.3, 2)),
                       "full": tuple((x, k) for x in (0.05, 0.1, 0.2, 0.3, 0.5) for k in (0, 2))}
SAVINGS_GOALS = {"min_psnr_vs_no_savings_db": 30.0, "evaluations_ratio_at_20_steps": 2.0,
                 "evaluations_ratio_at_8_steps": 1.5, "adaptive_guidance_min_row_saving": 0.20}


#: step counts of the LoRA rows (first sampler)
LORA_STEPS = (4, 20)


def lora_rows(pipe, loras: Sequence[str], sampler: str, compile_sampler, judge, labels: np.ndarray, latents: dict,
              guidance: float) -> list[dict[str, Any]]:
    """One row per (LoRA ``NAME:SCALE`` or none, step count): accuracy, stroke statistics, PSNR vs no LoRA."""
    from diffc.runtime.lora import parse_spec

    out = []
    cfg, cls = pipe.manifest["build"]["scheduler_config"], pipe.manifest.get("source", {}).get("pipeline_class")
    for steps in LORA_STEPS:
        pipe.tables = compile_sampler(sampler, cfg, steps, pipeline_class=cls)
        base = None
        for text in (None, *loras):
            t0 = time.perf_counter()
            pipe.set_loras(None if text is None else dict([parse_spec(text)]))
            swap_s = time.perf_counter() - t0
            images, times = run_row(pipe, latents, guidance)
            base = images if text is None else base
            pred = judge.predict(images)
            row = {"lora": text, "sampler": sampler, "steps": steps,
                   "prompt_accuracy": round(float((pred == labels).mean()), 4),
                   **{k: round(v, 4) for k, v in stroke_stats(images).items()},
                   "psnr_vs_no_lora_db": None if text is None else round(
                       float(np.mean([psnr(a, b) for a, b in zip(images, base)])), 2),
                   "set_loras_s": round(swap_s, 3), "latency_ms_per_image": round(1000 * statistics.median(times), 2)}
            out.append(row)
            log.info("LoRA %-16s %-8s %2d steps: accuracy %.3f, ink %.3f, stroke width %.2f px, PSNR vs none %s dB",
                     text, sampler, steps, row["prompt_accuracy"], row["ink_fraction"], row["stroke_width_px"],
                     row["psnr_vs_no_lora_db"])
    pipe.set_loras(None)
    return out


#: --vae-decoder: the profiles built with and without the tiny decoder (decode time), the first is judged
VAE_DECODER_PROFILES = ("cpu-fp32", "cpu")
VAE_DECODER_STEPS = (4, 20)


def vae_decoder_section(model: str, vae_decoder: str, work: Path, judge, seeds: Sequence[int],
                        guidance: float | None) -> dict[str, Any]:
    """The ``--vae-decoder`` rows: decode time per profile, and the judged images of both decoders (cpu-fp32)."""
    import diffc
    from diffc.exporter.sampler import compile_sampler
    from diffc.runtime import load

    labels = np.repeat(np.arange(10), len(seeds))
    decode_ms: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    build_s: dict[str, float] = {}
    for profile in VAE_DECODER_PROFILES:
        pipes = {}
        for decoder in ("full", "tiny"):
            t0 = time.perf_counter()
            log.info("building %s (%s, %s decoder)", model, profile, decoder)
            pipes[decoder] = load(diffc.build(model, profile, work / f"{profile}-{decoder}.diffc", progress=False,
                                              vae_decoder=vae_decoder if decoder == "tiny" else None),
                                  progress=False)
            build_s[f"{profile}_{decoder}"] = round(time.perf_counter() - t0, 1)
        size = pipes["full"].image["height"][1]
        f = pipes["full"].latent["vae_scale_factor"]
        final = np.random.default_rng(0).standard_normal((1, pipes["full"].latent["channels"], size // f, size // f),
                                                         dtype=np.float32)
        for decoder, pipe in pipes.items():
            pipe.decode(final)  # warm-up (OpenVINO compiles for the shape)
            times = []
            for _ in range(50):
                t0 = time.perf_counter()
                pipe.decode(final)
                times.append(time.perf_counter() - t0)
            decode_ms.setdefault(profile, {})[decoder] = round(1000 * statistics.median(times), 3)
        decode_ms[profile]["full_over_tiny"] = round(decode_ms[profile]["full"] / decode_ms[profile]["tiny"], 2)
        log.info("%s decode: %s", profile, decode_ms[profile])
        if profile != VAE_DECODER_PROFILES[0]:
            continue
        scale = guidance if guidance is not None else pipes["full"].guidance["default_scale"]
        latents = {(d, s): pipes["full"].initial_noise(s, 1, size, size) for d in range(10) for s in seeds}
        cfg = pipes["full"].manifest["build"]["scheduler_config"]
        cls = pipes["full"].manifest["source"]["pipeline_class"]
        for steps in VAE_DECODER_STEPS:
            images = {}
            for decoder, pipe in pipes.items():
                pipe.tables = compile_sampler(SAMPLERS[0], cfg, steps, pipeline_class=cls)
                images[decoder], _ = run_row(pipe, latents, scale)
            acc = {k: round(float((judge.predict(v) == labels).mean()), 4) for k, v in images.items()}
            rows.append({"profile": profile, "sampler": SAMPLERS[0], "steps": steps,
                         "prompt_accuracy_full": acc["full"], "prompt_accuracy_tiny": acc["tiny"],
                         "psnr_tiny_vs_full_db": round(float(np.mean(
                             [psnr(a, b) for a, b in zip(images["tiny"], images["full"])])), 2)})
            log.info("%s %d steps: %s", SAMPLERS[0], steps, rows[-1])
        del latents
    return {"vae_decoder": vae_decoder, "decode_ms_per_image": decode_ms, "rows": rows, "build_s": build_s}


def _build_step_cache(model: str, out: Path) -> Path:
    """``cpu-fp32`` with ``[savings.step_cache]`` (threshold 0.1; the rows override it per call)."""
    import diffc
    from diffc.profiles import load_profile
    from diffc.profiles.schema import Profile

    base = load_profile("cpu-fp32").to_dict()
    profile = Profile.from_dict({**base, "name": "cpu-fp32-step-cache",
                                 "savings": {"step_cache": {"threshold": 0.1}}}, where="quality.py")
    return diffc.build(model, profile, out, progress=False)


def run_traced(pipe, latents: dict, guidance: float) -> tuple[np.ndarray, list[float], dict[str, float]]:
    """:func:`run_row`, plus what the denoiser evaluated per image (``Pipeline.last_trace``, averaged):
    ``full_evaluations`` counts the steps that ran the whole denoiser, a conditional-only one as half (it ran
    half the rows); shallow (DeepCache) and head-only (step cache) steps are not counted."""
    images, times, counts = [], [], []
    for (d, _), lat in latents.items():
        t0 = time.perf_counter()
        images.append(pipe(digit_prompt(d), latents=lat, guidance=guidance)[0])
        times.append(time.perf_counter() - t0)
        trace = pipe.last_trace
        c = dict(trace.counts())
        widest = max((r.rows for r in trace.steps), default=1)
        widest = max(widest, 2 * trace.images if guidance > 1.0 and pipe.guidance["mode"] == "cfg" else widest)
        c["full_evaluations"] = sum(r.rows / widest for r in trace.steps if r.evaluation == "full")
        counts.append(c)
    mean = {k: round(float(np.mean([c[k] for c in counts])), 3) for k in counts[0]}
    return np.stack(images), times, mean


class SavingsRows:
    """Collects the savings rows of one artifact: the no-savings baseline per (sampler, steps) first, then each
    technique's rows against it."""

    def __init__(self, judge, labels: np.ndarray, latents: dict, guidance: float):
        self.judge, self.labels, self.latents, self.guidance = judge, labels, latents, guidance
        self.rows: list[dict[str, Any]] = []
        self.baseline: dict[tuple[str, int], tuple[np.ndarray, dict[str, Any]]] = {}

    def measure(self, pipe, technique: str, setting: str, sampler: str, steps: int,
                **extra: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        images, times, counts = run_traced(pipe, self.latents, self.guidance)
        pred = self.judge.predict(images)
        accuracy = float((pred == self.labels).mean())
        if technique == "none":
            self.baseline[sampler, steps] = (images, {"accuracy": accuracy, **counts})
        base_images, base = self.baseline[sampler, steps]
        ref = self.baseline.get((sampler, REFERENCE_STEPS))
        same_as_ref = technique == "none" and steps == REFERENCE_STEPS
        row = {
            "technique": technique, "setting": setting, "sampler": sampler, "steps": steps,
            "prompt_accuracy": round(accuracy, 4),
            "accuracy_vs_no_savings": round(accuracy - base["accuracy"], 4),
            "psnr_vs_no_savings_db": None if technique == "none" else round(
                float(np.mean([psnr(a, b) for a, b in zip(images, base_images)])), 2),
            "psnr_vs_20_steps_db": None if same_as_ref or ref is None else round(
                float(np.mean([psnr(a, b) for a, b in zip(images, ref[0])])), 2),
            "evaluations_per_image": counts,
            "full_evaluations_per_image": counts["full_evaluations"],
            "evaluations_ratio": round(base["full_evaluations"] / max(counts["full_evaluations"], 1e-9), 3),
            "batch_rows_per_image": counts["batch_rows"],
            "batch_row_saving": round(1.0 - counts["batch_rows"] / base["batch_rows"], 4),
            "latency_ms_per_image": round(1000 * statistics.median(times), 2),
            **extra,
        }
        self.rows.append(row)
        log.info("savings %-18s %-22s %-8s %2d steps: accuracy %.3f, PSNR %s dB vs no savings, %s vs 20 steps, "
                 "%.2f full evaluations, %.1f batch rows per image (%.0f s)", technique, setting, sampler, steps,
                 accuracy, row["psnr_vs_no_savings_db"], row["psnr_vs_20_steps_db"], counts["full_evaluations"],
                 counts["batch_rows"], time.perf_counter() - t0)
        return row


def savings_section(pipe, samplers: Sequence[str], compile_sampler, mode: str, rows: SavingsRows,
                    not_built: dict[str, str], step_cache_pipe=None) -> None:
    """Every savings row of the fp32 artifact ``pipe`` (and of ``step_cache_pipe``, the step-cache build)."""
    from diffc.build import schedule_search
    from diffc.errors import DiffcError

    sched_cfg = pipe.manifest["build"]["scheduler_config"]
    pipeline_class = pipe.manifest.get("source", {}).get("pipeline_class")

    def tables(sampler: str, steps: int):
        return compile_sampler(sampler, sched_cfg, steps, pipeline_class=pipeline_class)

    if pipe.cache:
        pipe.set_cache_schedule(None)
    has_savings = hasattr(pipe, "set_savings")
    schedule_samplers = samplers if mode == "full" else samplers[:1]
    # the no-savings baseline, the 20-step reference first
    for sampler in schedule_samplers:
        savings_steps = SAVINGS_STEPS if sampler == samplers[0] else ()
        for steps in sorted({REFERENCE_STEPS, *savings_steps, *SCHEDULE_STEPS[mode]}, reverse=True):
            pipe.tables = tables(sampler, steps)
            rows.measure(pipe, "none", "default schedule", sampler, steps)

    # optimized step schedules: the DP search against the 50-step reference (diffc.build.schedule_search)
    prompts, seeds = SCHEDULE_CALIBRATION[mode]
    for sampler in schedule_samplers:
        reference = tables(sampler, schedule_search.REFERENCE_STEPS)
        for steps in SCHEDULE_STEPS[mode]:
            pipe.tables = tables(sampler, steps)
            try:
                found = schedule_search.optimize(pipe, reference, pipe.tables, prompts, seeds,
                                                 solver_type=sched_cfg.get("solver_type", "midpoint"))
            except DiffcError as e:
                not_built[f"optimized_schedule_{sampler}"] = f"{type(e).__name__}: {e}"
                break
            pipe.tables = schedule_search.schedule_tables(schedule_search.candidates(reference), found.path,
                                                          solver_type=sched_cfg.get("solver_type", "midpoint"))
            rows.measure(pipe, "optimized_schedule", f"DP vs {schedule_search.REFERENCE_STEPS} steps", sampler,
                         steps, search=found.report())

    sampler = samplers[0]
    if not has_savings:
        not_built["adaptive_guidance"] = "this diffc has no Pipeline.set_savings (diffc.runtime.savings)"
    elif pipe.guidance["mode"] != "cfg":
        not_built["adaptive_guidance"] = f"the artifact guides with mode {pipe.guidance['mode']!r}, not cfg"
    else:
        for steps in SAVINGS_STEPS:
            pipe.tables = tables(sampler, steps)
            for s in GUIDANCE_SETTINGS[mode]:
                if "guidance_threshold" in s:
                    kw, setting = s, f"dynamic, cosine >= {s['guidance_threshold']}"
                else:
                    at = steps // 2 if s.get("from_half") else (3 * steps) // 4
                    kw, setting = {"guidance_from_step": at}, f"static, from step {at}"
                pipe.set_savings(**kw)
                try:
                    rows.measure(pipe, "adaptive_guidance", setting, sampler, steps)
                finally:
                    pipe.set_savings()

    if not pipe.cache:
        not_built["deepcache_extrapolation"] = "the artifact has no DeepCache split (build it with cpu-cache)"
    else:
        for steps in SAVINGS_STEPS:
            pipe.tables = tables(sampler, steps)
            for interval, order in DEEPCACHE_SETTINGS[mode]:
                pipe.set_cache_schedule({"kind": "interval", "interval": interval})
                try:
                    if order and not has_savings:
                        not_built["deepcache_extrapolation"] = "this diffc has no Pipeline.set_savings"
                        continue
                    if has_savings:
                        pipe.set_savings(extrapolation_order=order)
                    rows.measure(pipe, "deepcache" if order == 0 else "deepcache_extrapolation",
                                 f"interval {interval}, order {order}", sampler, steps)
                finally:
                    pipe.set_cache_schedule(None)
                    if has_savings:
                        pipe.set_savings()

    if step_cache_pipe is not None:
        sc = step_cache_pipe
        for steps in SAVINGS_STEPS:
            sc.tables = tables(sampler, steps)
            for threshold, order in STEP_CACHE_SETTINGS[mode]:
                sc.set_savings(step_cache_threshold=threshold, extrapolation_order=order)
                try:
                    rows.measure(sc, "step_cache", f"threshold {threshold}, order {order}", sampler, steps)
                finally:
                    sc.set_savings()


def savings_goals(rows: list[dict[str, Any]], images: int) -> dict[str, Any]:
    """Which of the issue's goals each technique meets, with the row that meets it (its best: fewest full
    evaluations, then highest PSNR). "Accuracy unchanged": at most one image of the row's fewer judged right
    than without savings."""
    g = SAVINGS_GOALS
    tol = 1.0 / images + 1e-9

    def ok(r: dict[str, Any]) -> bool:
        return r["psnr_vs_no_savings_db"] is not None and r["psnr_vs_no_savings_db"] >= g["min_psnr_vs_no_savings_db"] \
            and r["accuracy_vs_no_savings"] >= -tol

    def best(cands: list[dict[str, Any]], key) -> dict[str, Any] | None:
        cands = sorted(cands, key=key)
        return None if not cands else {k: cands[0][k] for k in (
            "technique", "setting", "sampler", "steps", "prompt_accuracy", "accuracy_vs_no_savings",
            "psnr_vs_no_savings_db", "psnr_vs_20_steps_db", "full_evaluations_per_image", "evaluations_ratio",
            "batch_rows_per_image", "batch_row_saving")}

    out: dict[str, Any] = {**g, "accuracy_tolerance": round(tol, 4), "per_technique": {}}
    for tech in sorted({r["technique"] for r in rows} - {"none"}):
        mine = [r for r in rows if r["technique"] == tech]
        entry: dict[str, Any] = {}
        # a schedule keeps one evaluation per step: its saving is the step count (vs_20_step_default below)
        for steps, ratio in () if tech == "optimized_schedule" else (
                (20, g["evaluations_ratio_at_20_steps"]), (8, g["evaluations_ratio_at_8_steps"])):
            hit = [r for r in mine if r["steps"] == steps and ok(r) and r["evaluations_ratio"] >= ratio]
            entry[f"{steps}_steps"] = {"met": bool(hit), "row": best(hit or [r for r in mine if r["steps"] == steps
                                                                             and ok(r)],
                                                                     lambda r: (-r["evaluations_ratio"],
                                                                                -r["psnr_vs_no_savings_db"]))}
        if tech == "adaptive_guidance":
            hit = [r for r in mine if ok(r) and r["batch_row_saving"] >= g["adaptive_guidance_min_row_saving"]]
            entry["batch_rows"] = {"met": bool(hit), "row": best(hit or [r for r in mine if ok(r)],
                                                                 lambda r: (-r["batch_row_saving"],
                                                                            -r["psnr_vs_no_savings_db"]))}
        if tech == "optimized_schedule":
            # its saving is steps: the fewest steps whose image stays >= 30 dB from the default 20-step one
            base20 = next((r["prompt_accuracy"] for r in rows if r["technique"] == "none"
                           and r["steps"] == REFERENCE_STEPS and r["sampler"] == mine[0]["sampler"]), None)
            close = [r for r in mine if r["psnr_vs_20_steps_db"] is not None
                     and r["psnr_vs_20_steps_db"] >= g["min_psnr_vs_no_savings_db"]
                     and base20 is not None and r["prompt_accuracy"] >= base20 - tol]
            fewest = min((r["steps"] for r in close), default=None)
            entry["vs_20_step_default"] = {
                "met": fewest is not None and REFERENCE_STEPS / fewest >= g["evaluations_ratio_at_20_steps"],
                "evaluations_ratio": None if fewest is None else round(REFERENCE_STEPS / fewest, 3),
                "row": best(close, lambda r: (r["steps"], -r["psnr_vs_20_steps_db"]))}
        out["per_technique"][tech] = entry
    return out


def plot_savings(rows: list[dict[str, Any]], path: Path, model: str) -> str | None:
    """docs/savings.png: PSNR against the 20-step image over full denoiser evaluations per image, one series per
    technique (the no-savings series is the default schedule's step counts). Returns why it was not drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'diffc[bench]')"
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    markers = dict(zip(["none", "optimized_schedule", "adaptive_guidance", "deepcache", "deepcache_extrapolation",
                        "step_cache"], "osD^v*"))
    for tech in dict.fromkeys(r["technique"] for r in rows):
        pts = sorted((r["full_evaluations_per_image"], r["psnr_vs_20_steps_db"]) for r in rows
                     if r["technique"] == tech and r["psnr_vs_20_steps_db"] is not None
                     and r["sampler"] == rows[0]["sampler"])
        if not pts:
            continue
        xs, ys = zip(*pts)
        label = "no savings (default schedule)" if tech == "none" else tech.replace("_", " ")
        ax.plot(xs, ys, marker=markers.get(tech, "x"), linestyle="-" if tech in ("none", "optimized_schedule")
                else "", label=label)
    ax.axhline(30.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylim(top=min(ax.get_ylim()[1], 50.0))  # rows identical to no savings sit far above; what matters is 30
    ax.set_xlabel("full denoiser evaluations per image (cond-only = 1/2; shallow / head-only steps not counted)")
    ax.set_ylabel("PSNR vs the 20-step image (dB)")
    ax.set_title(f"{model}, {rows[0]['sampler']}: quality against denoiser evaluations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    log.info("wrote %s", path)
    return None


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
    ap.add_argument("--savings", choices=("on", "off", "only"), default="on",
                    help="the savings rows (issue 31) on the fp32 artifact: with the grid (on), not (off), or "
                         "instead of the precision x cache grid (only)")
    ap.add_argument("--plot", type=Path, default=HERE.parent / "docs" / "savings.png",
                    help="where the savings rows' quality / evaluations plot goes (default: docs/savings.png)")
    ap.add_argument("--lora", action="append", default=[], metavar="NAME:SCALE",
                    help="LoRA rows: apply this LoRA (a bundled name such as demo-bold, or a file) at run time on the "
                         "fp32 artifact; repeatable")
    ap.add_argument("--lora-only", action="store_true", help="only the LoRA rows (no grid, no savings rows)")
    ap.add_argument("--vae-decoder", default=None, metavar="NAME|FOLDER",
                    help="instead of the rows above: the demo with and without this tiny decoder (demo-tiny, or an "
                         "AutoencoderTiny folder): decode time, prompt accuracy, PSNR against the full decoder")
    args = ap.parse_args()
    if args.lora_only and not args.lora:
        ap.error("--lora-only needs at least one --lora NAME:SCALE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("diffc.export", "diffc.build", "diffc.passes", "diffc.engines", "diffc.runtime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    n_seeds = args.seeds or (3 if args.quick else 10)
    t_start = time.perf_counter()
    if args.vae_decoder is not None:
        with tempfile.TemporaryDirectory(prefix="diffc-quality-") as work:
            judge = Judge()
            section = vae_decoder_section(args.model, args.vae_decoder, Path(work), judge, range(n_seeds),
                                          args.guidance)
        emit({"benchmark": "quality", "model": MODELS[args.model]["name"], "mode": ("quick" if args.quick else "full")
              + ", tiny VAE decoder", "prompt": "a handwritten digit <name>", "seeds_per_digit": n_seeds,
              "images_per_row": 10 * n_seeds, "judge": {"kind": "CNN on real MNIST digits (numpy)",
                                                         "heldout_accuracy": judge.heldout_accuracy},
              "tiny_vae_decoder": section, "wall_s": round(time.perf_counter() - t_start, 1), "machine": machine()})
        return

    from diffc.errors import DiffcError
    from diffc.runtime import load
    from diffc.exporter.sampler import compile_sampler
    from diffc.profiles.schema import Profile

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
    savings = lora = None
    mode = "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory(prefix="diffc-quality-") as work:
        for precision, make in precisions.items():
            if (args.savings == "only" or args.lora_only) and precision != REFERENCE[0]:
                continue
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
            if args.lora and precision == REFERENCE[0]:
                lora = lora_rows(pipe, args.lora, samplers[0], compile_sampler, judge, labels, latents, guidance)
            for cache, configure in (cache_modes.items() if args.savings != "only" and not args.lora_only else ()):
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
            if args.savings != "off" and not args.lora_only and precision == REFERENCE[0]:
                step_cache_pipe = None
                if "savings" not in {f.name for f in dataclasses.fields(Profile)}:
                    not_built["step_cache"] = "this diffc has no [savings] profile table"
                else:
                    t0 = time.perf_counter()
                    try:
                        step_cache_pipe = load(_build_step_cache(args.model, Path(work) / f"{args.model}-sc.diffc"),
                                               progress=False)
                        build_s["step_cache"] = round(time.perf_counter() - t0, 1)
                    except Exception as e:  # noqa: BLE001 - a technique that does not build is a result, not a crash
                        log.warning("step-cache artifact not built: %s", e)
                        not_built["step_cache"] = f"{type(e).__name__}: {e}"
                srows = SavingsRows(judge, labels, latents, guidance)
                savings_section(pipe, samplers, compile_sampler, mode, srows, not_built, step_cache_pipe)
                savings = {"rows": srows.rows, "goals": savings_goals(srows.rows, 10 * n_seeds),
                           "plot_not_drawn": plot_savings(srows.rows, args.plot, args.model)}

    def acc(sampler: str, steps: int) -> float:
        return next(r["prompt_accuracy"] for r in rows if (r["precision"], r["cache"]) == REFERENCE
                    and r["sampler"] == sampler and r["steps"] == steps)

    goals = None if not rows else {
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
        "mode": mode + ("" if args.savings != "only" else ", savings rows only"),
        "prompt": "a handwritten digit <name>",
        "digits": 10,
        "seeds_per_digit": n_seeds,
        "images_per_row": 10 * n_seeds,
        "guidance": guidance,
        "judge": {"kind": "CNN on real MNIST digits (numpy)", "heldout_accuracy": judge.heldout_accuracy},
        "rows": rows,
        "goals": goals,
        **({} if savings is None else {"savings": savings}),
        **({} if lora is None else {"lora": lora}),
        "not_built": not_built,
        "build_s": build_s,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
