"""Calibration from the loop: the ranges INT8 / FP8 Q/DQ are inserted with, recorded in the artifact's own loop.

Calibration does not feed the denoiser random tensors or a dataset's latents: it runs the fp32 reference
artifact's real loop (tokenizer, text encoder, sampler tables, classifier-free guidance, the profile's step
count; :mod:`diffc.build.twin` builds it) with the denoiser replaced by :class:`RangeRecorder`, an
instrumented copy of the very graph that will be quantized. Every quantized tensor's range is recorded per
denoising step and per CFG half, because a UNet's activations at the first (pure noise) step and the last
differ, and the uncond half differs from the cond one.

Range choice (``[quantize].method``): ``percentile`` takes, per call and CFG half, the ``p``-th and
``(100 - p)``-th percentiles (exact for tensors up to 2**20 elements, else on an evenly strided sample of that
size), ``minmax`` the extremes; the range quantized with is the envelope over all calls, so no step's bulk is
clipped. Tensors whose per-step ranges differ by more than :data:`SPREAD_FLAG` x are listed in the report as
candidates for per-step-group scales.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from tqdm.auto import tqdm

from diffc.build.memory import release
from diffc.engines.onnxruntime import Session
from diffc.profiles.schema import QuantizeOptions
from diffc.runtime.pipeline import Pipeline

log = logging.getLogger("diffc.quantization")

#: a tensor whose largest per-step range is this many times its smallest is flagged in the report
SPREAD_FLAG = 4.0
_SAMPLE = 1 << 20


def step_groups(num_steps: int, groups: int) -> list[list[int]]:
    """Steps ``0 .. num_steps - 1`` cut into ``groups`` contiguous groups, as equal as possible (earlier groups
    take the remainder): the steps each per-step-group variant is calibrated on."""
    return [[int(i) for i in part] for part in np.array_split(np.arange(num_steps), groups)]


def timestep_bounds(timesteps: Sequence[float], groups: Sequence[Sequence[int]]) -> list[float]:
    """One bound between each pair of neighbouring groups: the midpoint of the last timestep of a group and the
    first of the next. The runtime runs variant ``g`` = how many bounds lie above the step's timestep, so the
    choice depends on the timestep, not on the step index, and holds for any step count."""
    return [round((float(timesteps[a[-1]]) + float(timesteps[b[0]])) / 2, 4) for a, b in zip(groups, groups[1:])]


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
    target tensors)): the denoiser's ranges per step and CFG half, the VAE decoder's from the final latents it
    decodes. The denoiser is the one the reference's manifest names (``unet``, or a DiT family's
    ``transformer``: its ``denoiser`` section). Returns, per component, (ranges per step group -- one dict
    unless it is the UNet and ``options.step_groups`` > 1 --, report)."""
    pipe = Pipeline(reference, progress=False, cache=False)
    denoiser = pipe.denoiser["component"]
    cfg = pipe.guidance["mode"] == "cfg" and float(pipe.guidance["default_scale"]) > 1.0
    steps = pipe.tables.num_steps
    recorders: dict[str, RangeRecorder] = {}
    if getattr(pipe, "cache", None):
        pipe.set_cache_schedule(None)  # the full UNet at every step: every step's ranges, for both graphs
        # never run now: its session would only hold a second copy of the UNet's weights
        pipe.sessions[pipe.cache["shallow_component"]] = None
    jobs = [(p, s) for p in options.calibration_prompts for s in options.calibration_seeds]
    try:
        for name in graphs:  # the recorders stand in for these: their own sessions go first (one copy at a time)
            pipe.sessions[name] = None
        release()
        for name, (graph, targets) in graphs.items():
            per_step = name == denoiser  # called once per step, on the CFG batch; the decoder once per image
            recorders[name] = RangeRecorder(graph, targets, num_steps=steps if per_step else 1,
                                            cfg=cfg and per_step, method=options.method,
                                            percentile=options.percentile)
            pipe.sessions[name] = recorders[name]
        for prompt, seed in tqdm(jobs, desc="calibration", unit="image", disable=not progress):
            pipe(prompt, seed=seed)
        out = {}
        for name, recorder in recorders.items():
            # per-step-group variants are the UNet's (the runtime selects unet_g1...); any other: every call
            groups = step_groups(steps, options.step_groups) if name == "unet" else [list(range(recorder.num_steps))]
            ranges = [recorder.ranges(g) for g in groups]
            report = {"method": options.method, "percentile": options.percentile, "images": len(jobs),
                      "steps": steps, "calls": recorder.calls, "cfg_halves": recorder.cfg,
                      "tensors_recorded": len(ranges[0]), **recorder.report()}
            if len(groups) > 1:
                report["step_groups"] = [{"steps": g, "timesteps": [float(pipe.tables.timesteps[i]) for i in g]}
                                         for g in groups]
            out[name] = (ranges, report)
            log.info("calibration of %s: %d tensors over %d images%s", name, len(ranges[0]), len(jobs),
                     f" x {steps} steps" + (" x 2 CFG halves" if recorder.cfg else "") if name == denoiser else "")
    finally:
        for recorder in recorders.values():
            recorder.close()
        pipe.close()  # before the caller builds the quantized graphs: no session outlives calibration
        release()
    return out
