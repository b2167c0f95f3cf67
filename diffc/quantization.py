"""INT8 / FP8 for ``diffc build``: calibration from the artifact's own sampling loop, and the quality gate.

Calibration does not feed the denoiser random tensors or a dataset's latents: it runs the fp32 reference
artifact's real loop (tokenizer, text encoder, sampler tables, classifier-free guidance, the profile's step
count) with the denoiser replaced by :class:`RangeRecorder`, an instrumented copy of the very graph that will
be quantized. Every quantized tensor's range is recorded per denoising step and per CFG half, because a UNet's
activations at the first (pure noise) step and the last differ, and the uncond half differs from the cond one.

Range choice (``[quantize].method``): ``percentile`` takes, per call and CFG half, the ``p``-th and
``(100 - p)``-th percentiles (exact for tensors up to 2**20 elements, else on an evenly strided sample of that
size), ``minmax`` the extremes; the range quantized with is the envelope over all calls, so no step's bulk is
clipped. Tensors whose per-step ranges differ by more than :data:`SPREAD_FLAG` x are listed in the report as
candidates for per-step-group scales.

The gate compares final images of the quantized artifact with the fp32 reference on fixed prompts and seeds
(mean PSNR over the images, each on [0, 1]; the worst image's PSNR and the max absolute error are reported,
the latter gated too when the profile sets ``max_abs_error``) and raises :class:`~diffc.errors.QualityGateError` below the
profile's threshold.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from diffc.errors import BackendUnavailableError, ProfileError, QualityGateError
from diffc.profiles.schema import (
    Backend,
    Precision,
    Profile,
    QuantizeOptions,
    list_profiles,
    load_profile,
    step_group_components,
)

log = logging.getLogger("diffc.quantization")

#: components diffc can quantize: the denoiser, where most of the time goes, and the VAE decoder, which takes
#: a large share of a few-step generation (SD 1.5 at 256x256: ~0.6 TFLOP per image, as much as ~1.7 UNet steps
#: with CFG); the text encoder runs once per prompt on 77 tokens and is not worth its error
QUANTIZABLE = ("unet", "vae_decoder")
#: a tensor whose largest per-step range is this many times its smallest is flagged in the report
SPREAD_FLAG = 4.0
_SAMPLE = 1 << 20


def fp8_profiles() -> list[str]:
    """Shipped profiles that build fp8 (for error messages)."""
    out = []
    for name in list_profiles():
        prof = load_profile(name)
        if any(p is Precision.FP8 for p in prof.precision.values()):
            out.append(name)
    return out


def check_quantization(profile: Profile) -> dict[str, Precision]:
    """Refuse what cannot be quantized before any work; return ``{component: precision}`` to quantize."""
    wanted = profile.quantized_components()
    for comp, prec in wanted.items():
        if prec is Precision.FP8 and profile.backend is Backend.ONNXRUNTIME:
            raise BackendUnavailableError(
                f"profile {profile.name!r} asks for fp8 ({comp}), but onnxruntime's CPU provider has no FP8 kernels "
                f"(FP8 Q/DQ does not run there); use a TensorRT profile for fp8 ({', '.join(fp8_profiles())}), or "
                "int8 (cpu-int8) on the CPU")
        if comp not in QUANTIZABLE:
            raise ProfileError(
                f"profile {profile.name!r}: [precision].{comp} = {prec.value!r}, but diffc quantizes only "
                f"{list(QUANTIZABLE)} (the denoiser, where the sampling time goes); set {comp} to fp32 or fp16")
    groups = profile.quantize.step_groups
    if wanted and groups > 1:
        if groups > profile.steps:
            raise ProfileError(f"profile {profile.name!r}: [quantize].step_groups = {groups} is more than the "
                               f"{profile.steps} sampling steps; use at most {profile.steps} groups")
        if profile.cache.enabled:
            raise ProfileError(f"profile {profile.name!r}: [quantize].step_groups > 1 does not combine with cache "
                               "reuse ([cache].enabled) yet; use one of them, or step_groups = 1 with the cache")
    return wanted


def activation_type(profile: Profile, precision: Precision) -> str:
    """The Q/DQ encoding of activations: fp8, or int8 signedness per target (see diffc.passes.quantize)."""
    if precision is Precision.FP8:
        return "fp8"
    acts = profile.quantize.activations
    if acts == "auto":
        return "uint8" if profile.backend is Backend.ONNXRUNTIME else "int8"
    if acts == "uint8" and profile.backend is not Backend.ONNXRUNTIME:
        raise ProfileError(f"profile {profile.name!r}: [quantize].activations = 'uint8' needs zero points, which "
                           f"{profile.backend.value} does not support; use 'int8' or 'auto'")
    return acts


def step_groups(num_steps: int, groups: int) -> list[list[int]]:
    """Steps ``0 .. num_steps - 1`` cut into ``groups`` contiguous groups, as equal as possible (earlier groups
    take the remainder): the steps each per-step-group variant is calibrated on."""
    return [[int(i) for i in part] for part in np.array_split(np.arange(num_steps), groups)]


def timestep_bounds(timesteps: Sequence[float], groups: Sequence[Sequence[int]]) -> list[float]:
    """One bound between each pair of neighbouring groups: the midpoint of the last timestep of a group and the
    first of the next. The runtime runs variant ``g`` = how many bounds lie above the step's timestep, so the
    choice depends on the timestep, not on the step index, and holds for any step count."""
    return [round((float(timesteps[a[-1]]) + float(timesteps[b[0]])) / 2, 4) for a, b in zip(groups, groups[1:])]


def describe(profile: Profile, precision: Precision, component: str = "unet") -> dict[str, Any]:
    """What a build will do to quantize a component (for ``diffc build --dry-run``)."""
    q = profile.quantize
    groups = q.step_groups if component == "unet" else 1
    calls = f"{profile.steps} steps" if component == "unet" else "the final latents of each image"
    return {"activations": activation_type(profile, precision), "keep_float": list(q.keep_float),
            "step_groups": groups,
            **({"step_group_engines": step_group_components(groups)} if groups > 1 else {}),
            "calibration": {"method": q.method, "percentile": q.percentile,
                            "images": len(q.calibration_prompts) * len(q.calibration_seeds), "records": calls,
                            "runs": "the fp32 onnxruntime twin of this artifact, built in the work folder"},
            "quality_gate": {"images": len(q.gate_prompts) * len(q.gate_seeds), "min_psnr_db": q.min_psnr_db,
                             "max_abs_error": q.max_abs_error}}


def reference_profile(profile: Profile) -> Profile:
    """The fp32 onnxruntime twin of ``profile``: same shapes, sampler, guidance and cache reuse, what
    calibration runs and the gate compares against."""
    from dataclasses import replace

    from diffc.profiles.schema import MemoryBudget, TensorRTOptions

    return replace(profile, name=f"{profile.name}-fp32-reference", backend=Backend.ONNXRUNTIME,
                   precision={"default": Precision.FP32}, passes={}, tensorrt=TensorRTOptions(),
                   memory=MemoryBudget())


def _range(x: np.ndarray, method: str, pct: float) -> tuple[float, float]:
    flat = x.reshape(-1)
    if method == "minmax" or pct >= 100.0:
        return float(flat.min()), float(flat.max())
    if flat.size > _SAMPLE:
        flat = flat[:: -(-flat.size // _SAMPLE)]
    n = flat.size
    k_lo, k_hi = int(math.floor((1 - pct / 100) * (n - 1))), int(math.ceil(pct / 100 * (n - 1)))
    part = np.partition(flat, (k_lo, k_hi))
    return float(part[k_lo]), float(part[k_hi])


class RangeRecorder:
    """Stands in for the denoiser session in the runtime loop: runs ``model_path`` (the graph to be quantized,
    fp32) with ``targets`` as extra outputs and records their ranges per step and CFG half."""

    def __init__(self, model_path: Path, targets: Sequence[str], *, num_steps: int, cfg: bool, method: str,
                 percentile: float, threads: int = 0):
        import onnx

        from diffc.engines.onnxruntime import Session

        self.targets = list(targets)
        self.num_steps, self.cfg, self.method, self.percentile = num_steps, cfg, method, percentile
        proto = onnx.load(str(model_path), load_external_data=False)
        self.outputs = [o.name for o in proto.graph.output]  # returned to the loop (out_sample, a cache feature)
        present = set(self.outputs)
        for name in self.targets:
            if name not in present:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        # next to the graph, so a relative external-data path still resolves
        self._path = model_path.with_name(model_path.stem + ".calibration.onnx")
        onnx.save(proto, str(self._path))
        self._session = Session(self._path, threads=threads)
        self.calls = 0
        halves = 2 if cfg else 1
        self.lo = np.full((len(self.targets), num_steps, halves), np.inf)
        self.hi = np.full((len(self.targets), num_steps, halves), -np.inf)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        out = self._session.run(feeds, [*self.outputs, *(t for t in self.targets if t not in self.outputs)])
        step = self.calls % self.num_steps
        self.calls += 1
        for i, name in enumerate(self.targets):
            x = out[name]
            parts = np.split(x, 2) if self.cfg and x.shape and x.shape[0] % 2 == 0 else [x]
            for h, part in enumerate(parts):
                lo, hi = _range(part, self.method, self.percentile)
                self.lo[i, step, h] = min(self.lo[i, step, h], lo)
                self.hi[i, step, h] = max(self.hi[i, step, h], hi)
        return {name: out[name] for name in self.outputs}

    def close(self) -> None:
        self._session = None
        self._path.unlink(missing_ok=True)

    def ranges(self, steps: Sequence[int] | None = None) -> dict[str, tuple[float, float]]:
        """Per tensor, the envelope of its recorded ranges over ``steps`` (default: every step) and CFG halves."""
        sel = slice(None) if steps is None else list(steps)
        lo = np.nanmin(np.where(np.isinf(self.lo[:, sel]), np.nan, self.lo[:, sel]), axis=(1, 2))
        hi = np.nanmax(np.where(np.isinf(self.hi[:, sel]), np.nan, self.hi[:, sel]), axis=(1, 2))
        return {n: (float(a), float(b)) for n, a, b in zip(self.targets, lo, hi) if np.isfinite(a) and np.isfinite(b)}

    def report(self) -> dict[str, Any]:
        """Per tensor: the range used, per step ``[lo, hi]`` (envelope over CFG halves and images), per step
        and half when CFG ran, and the spread (largest / smallest per-step absolute max)."""
        tensors: dict[str, Any] = {}
        flagged = []
        for i, name in enumerate(self.targets):
            lo, hi = self.lo[i], self.hi[i]
            if not np.isfinite(lo).all():
                continue
            amax = np.maximum(np.abs(lo), np.abs(hi)).max(axis=1)
            spread = float(amax.max() / max(amax.min(), 1e-12))
            entry = {"range": [float(lo.min()), float(hi.max())],
                     "steps": [[round(float(a), 5), round(float(b), 5)] for a, b in zip(lo.min(1), hi.max(1))],
                     "spread": round(spread, 3)}
            if self.cfg:
                entry["cfg_halves"] = {half: [[round(float(a), 5), round(float(b), 5)] for a, b in zip(lo[:, h], hi[:, h])]
                                       for h, half in enumerate(("uncond", "cond"))}
            tensors[name] = entry
            if spread >= SPREAD_FLAG:
                flagged.append(name)
        return {"tensors": tensors, "per_step_group_candidates": flagged, "spread_flag": SPREAD_FLAG}


def calibrate(reference: Path, graphs: dict[str, tuple[Path, Sequence[str]]], options: QuantizeOptions, *,
              progress: bool = True) -> dict[str, tuple[list[dict[str, tuple[float, float]]], dict[str, Any]]]:
    """Run the reference artifact's loop over the calibration prompts and seeds once, with a
    :class:`RangeRecorder` in the place of every component in ``graphs`` (component -> (graph to quantize, its
    target tensors)): the UNet's ranges per step and CFG half, the VAE decoder's from the final latents it
    decodes. Returns, per component, (ranges per step group -- one dict unless it is the UNet and
    ``options.step_groups`` > 1 --, report)."""
    from diffc.runtime.pipeline import Pipeline

    pipe = Pipeline(reference, progress=False, cache=False)
    cfg = pipe.guidance["mode"] == "cfg" and float(pipe.guidance["default_scale"]) > 1.0
    steps = pipe.tables.num_steps
    recorders: dict[str, RangeRecorder] = {}
    if getattr(pipe, "cache", None):
        pipe.set_cache_schedule(None)  # the full UNet at every step: every step's ranges, for both graphs
    jobs = [(p, s) for p in options.calibration_prompts for s in options.calibration_seeds]
    try:
        for name, (graph, targets) in graphs.items():
            denoiser = name == "unet"  # called once per step, on the CFG batch; the decoder once per image
            recorders[name] = RangeRecorder(graph, targets, num_steps=steps if denoiser else 1,
                                            cfg=cfg and denoiser, method=options.method,
                                            percentile=options.percentile)
            pipe.sessions[name] = recorders[name]
        for prompt, seed in tqdm(jobs, desc="calibration", unit="image", disable=not progress):
            pipe(prompt, seed=seed)
        out = {}
        for name, recorder in recorders.items():
            groups = step_groups(steps, options.step_groups) if name == "unet" else [[0]]
            ranges = [recorder.ranges(g) for g in groups]
            report = {"method": options.method, "percentile": options.percentile, "images": len(jobs),
                      "steps": steps, "calls": recorder.calls, "cfg_halves": recorder.cfg,
                      "tensors_recorded": len(ranges[0]), **recorder.report()}
            if len(groups) > 1:
                report["step_groups"] = [{"steps": g, "timesteps": [float(pipe.tables.timesteps[i]) for i in g]}
                                         for g in groups]
            out[name] = (ranges, report)
            log.info("calibration of %s: %d tensors over %d images%s", name, len(ranges[0]), len(jobs),
                     f" x {steps} steps" + (" x 2 CFG halves" if recorder.cfg else "") if name == "unet" else "")
    finally:
        for recorder in recorders.values():
            recorder.close()
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def quality_gate(reference: Path, candidate: Path | None, options: QuantizeOptions, *,
                 replace: dict[str, Path] | None = None, step_variants: dict[str, Any] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Final images of ``candidate`` (an artifact) -- or of the reference with its quantized graphs swapped in
    from ``replace`` (component -> graph; ``step_variants`` as the artifact's manifest has it), run with
    onnxruntime (for engines this machine cannot run) -- against ``reference``.
    Raises :class:`QualityGateError` when below the thresholds; returns the numbers otherwise."""
    from diffc.engines.onnxruntime import Session
    from diffc.runtime.pipeline import Pipeline

    ref = Pipeline(reference, progress=False, cache=False)
    if candidate is not None:
        cand = Pipeline(candidate, progress=False, cache=False)
    else:
        cand = Pipeline(reference, progress=False, cache=False)
        for name, graph in (replace or {}).items():
            cand.sessions[name] = Session(graph)
        if step_variants:
            cand.manifest = {**cand.manifest, "step_variants": step_variants}
    rows = []
    jobs = [(p, s) for p in options.gate_prompts for s in options.gate_seeds]
    for prompt, seed in tqdm(jobs, desc="quality gate", unit="image", disable=not progress):
        a, b = ref(prompt, seed=seed), cand(prompt, seed=seed)
        rows.append({"prompt": prompt, "seed": seed, "psnr_db": round(_psnr(a, b), 3),
                     "max_abs_error": round(float(np.abs(a - b).max()), 5)})
    worst_psnr = min(r["psnr_db"] for r in rows)
    mean_psnr = round(float(np.mean([min(r["psnr_db"], 99.0) for r in rows])), 3)
    worst_err = max(r["max_abs_error"] for r in rows)
    passed = mean_psnr >= options.min_psnr_db and (options.max_abs_error is None
                                                   or worst_err <= options.max_abs_error)
    report = {"images": len(rows), "psnr_db_mean": mean_psnr, "psnr_db_min": worst_psnr,
              "max_abs_error": worst_err, "min_psnr_db": options.min_psnr_db,
              "max_abs_error_allowed": options.max_abs_error, "passed": passed, "rows": rows,
              "evaluated_with": "artifact" if candidate is not None else "onnxruntime (CPU) on the Q/DQ graph"}
    log.info("quality gate: PSNR mean %.2f dB (threshold %.1f), min %.2f dB, max abs error %.4f -> %s", mean_psnr,
             options.min_psnr_db, worst_psnr, worst_err, "pass" if passed else "FAIL")
    if not passed:
        raise QualityGateError(
            f"the quantized artifact is below the quality gate: mean PSNR {mean_psnr:.2f} dB vs fp32 (needs >= "
            f"{options.min_psnr_db:g}), max abs error {worst_err:.4f}"
            + (f" (allowed {options.max_abs_error:g})" if options.max_abs_error is not None else "")
            + ". Keep more layers in float ([quantize].keep_float, e.g. add \"output_block\"), "
              "calibrate on more prompts, or lower [quantize].min_psnr_db if that quality is acceptable")
    return report


def quantize_graph(graph: Path, out: Path, ranges: dict[str, tuple[float, float]], *, qtype: str,
                   keep_float: Sequence[str], backend: Backend) -> dict[str, Any]:
    """Insert Q/DQ into the graph at ``graph`` and save it at ``out``; returns the pass report entry."""
    import time

    import onnx_ir as ir

    from diffc.onnx_io import load_model, save_model
    from diffc.passes._base import op_counts
    from diffc.passes.quantize import QuantizePass

    model = ir.serde.deserialize_model(load_model(graph))
    ort_form = backend is Backend.ONNXRUNTIME
    qpass = QuantizePass(qtype=qtype, ranges=ranges, keep_float=keep_float, output_qdq=ort_form,
                         int32_bias=ort_form)
    before = op_counts(model)
    t0 = time.perf_counter()
    result = qpass(model)
    seconds = time.perf_counter() - t0
    proto = ir.serde.serialize_model(result.model)
    save_model(proto, out)
    return {"name": "quantize", "fired": dict(qpass.fired), "modified": bool(result.modified),
            "seconds": round(seconds, 4), "options": {"qtype": qtype, "keep_float": list(keep_float),
                                                      "output_qdq": ort_form, "int32_bias": ort_form},
            "op_counts_before": before, "op_counts_after": op_counts(proto)}

