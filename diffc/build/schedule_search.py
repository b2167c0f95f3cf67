"""Optimized step schedules (``[sampler].schedule = "optimized"``): the profile's few timesteps chosen at build by
dynamic programming against a many-step reference trajectory of the artifact's own loop.

Why: a few-step sampler on diffusers' default spacing ("trailing", "leading", linspace sigmas) spends its steps
where the spacing rule puts them, not where the model's trajectory bends. OSS (Pei et al., "Optimal Stepsize for
Diffusion Sampling", 2025) chooses them instead: run the sampler with :data:`REFERENCE_STEPS` steps (the
teacher), take its timesteps (plus the end point) as the candidates, and find the ``K``-step path through them
whose student states stay closest to the teacher's. The DP (:func:`dp_search`): ``best[k][j]`` is the student
state reached at candidate ``j`` after ``k`` steps by the predecessor ``i`` that minimizes the distance of that
state to the teacher's state at ``j``; each ``(k - 1, i)`` costs one denoiser evaluation (on every calibration
image at once), so the search costs about ``K * (N - K)`` evaluations per image instead of the ``C(N, K - 1)``
paths a brute force would run.

The student step of the search is the first-order (DDIM / Euler / DPM-Solver++(1)) update between any two
candidates, which all four searchable kinds share once written with the candidates' ``x = signal * x0 + scale *
noise`` coefficients (the tables' ``noise_signal`` / ``noise_scale``)::

    x_j = (scale_j / scale_i) x_i + (signal_j - signal_i * scale_j / scale_i) x0(x_i, t_i)

``ddim``, ``euler`` and ``flow_euler`` run exactly that update at run time. ``dpmpp_2m`` runs its own second-order
update on the chosen timesteps (first order on the first and last step, as diffusers does for few steps), so its
search optimizes the first-order path; the build compares the result with the default spacing through the real
loop either way, and keeps the default when the search did not beat it (the report says which it kept).

The result is ordinary sampler tables (:class:`~diffc.runtime.sampler.SamplerTables`, format unchanged): the
runtime runs an optimized artifact with the same loop as any other. ``lcm`` / ``scm`` (consistency samplers that
inject fresh noise and are distilled for their own timesteps) and tables with a resolution-dependent shift (which
the runtime re-derives per image size) are refused with the reason.

Every denoiser evaluation goes through the artifact's own :class:`~diffc.runtime.pipeline.Pipeline` call (text
encoders, classifier-free guidance, engines), with one-step tables that make the loop return ``x0`` instead of a
decoded image (:class:`LoopEvaluator`), so the search sees exactly what a run computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from diffc.errors import ProfileError
from diffc.profiles.schema import SCHEDULE_REFERENCE_STEPS as REFERENCE_STEPS
from diffc.runtime.sampler import SamplerTables

__all__ = ["REFERENCE_STEPS", "SEARCHABLE", "Candidates", "LoopEvaluator", "ScheduleResult", "candidates",
           "check", "dp_search", "optimize", "schedule_tables", "search", "stage"]

log = logging.getLogger("diffc.build")

#: the sampler kinds whose steps an optimized schedule can place (deterministic ODE samplers)
SEARCHABLE = ("ddim", "euler", "dpmpp_2m", "flow_euler")


def check(kind: str, tables: SamplerTables | None = None, steps: int | None = None) -> None:
    """Refuse, with the reason, a sampler (or compiled tables) an optimized schedule cannot serve."""
    if kind not in SEARCHABLE:
        raise ProfileError(
            f"[sampler].schedule = \"optimized\" searches the timesteps of deterministic samplers "
            f"({', '.join(SEARCHABLE)}); {kind!r} injects fresh noise every step and is distilled for its own "
            "timesteps, so a schedule searched against a many-step trajectory does not apply. Set [sampler].schedule "
            "= \"default\" or choose one of those samplers")
    if steps is not None and not 1 <= steps < REFERENCE_STEPS:
        raise ProfileError(f"[sampler].schedule = \"optimized\" chooses fewer steps than its {REFERENCE_STEPS}-step "
                           f"reference; [sampler].steps = {steps} must be from 1 to {REFERENCE_STEPS - 1}")
    if tables is not None and tables.dynamic_shift is not None:
        raise ProfileError(
            "[sampler].schedule = \"optimized\" is not available with a resolution-dependent shift "
            "(use_dynamic_shifting): the runtime re-derives those timesteps for every image size. Set "
            "\"use_dynamic_shifting\": false with a fixed \"shift\" in the scheduler config, or use the default "
            "schedule")
    if tables is not None and not tables.has_add_noise:
        raise ProfileError("the sampler tables carry no noise_signal / noise_scale, which the schedule search "
                           "needs; this is a bug in diffc, please report it")


# ==========================================================================================================
# The candidates and the DP
# ==========================================================================================================
@dataclasses.dataclass(frozen=True)
class Candidates:
    """The reference's timesteps and the end point (``N + 1`` points): what the model is fed at each (``c_in``,
    ``timesteps``, the x0 coefficients; none at the end point) and where the sampler's state sits
    (``x = signal * x0 + scale * noise``)."""

    kind: str
    prediction_type: str
    init_noise_sigma: float
    timesteps: np.ndarray  # N
    c_in: np.ndarray  # N
    x0_from_x: np.ndarray  # N
    x0_from_m: np.ndarray  # N
    signal: np.ndarray  # N + 1
    scale: np.ndarray  # N + 1

    @property
    def count(self) -> int:
        return len(self.signal)

    def first_order(self, i: int, j: int) -> tuple[float, float]:
        """(coefficient of x, coefficient of x0) of the first-order step from candidate ``i`` to ``j``."""
        nx = float(self.scale[j] / self.scale[i])
        return nx, float(self.signal[j] - nx * self.signal[i])


def candidates(reference: SamplerTables) -> Candidates:
    """The candidates of a reference's tables. The end point is read off its last row: with ``nx`` the row's
    coefficient of ``x`` and ``nx0`` the sum of its x0 coefficients, ``scale_end = nx * scale_last`` and
    ``signal_end = nx0 + nx * signal_last`` (true of every first-order row and of DPM-Solver++(2M)'s)."""
    check(reference.kind, reference)
    signal = np.asarray(reference.noise_signal, np.float64)
    scale = np.asarray(reference.noise_scale, np.float64)
    nx = float(reference.next_from_x[-1])
    nx0 = float(reference.next_from_x0[-1] + reference.next_from_prev_x0[-1])
    if not np.all(scale > 0):
        raise ProfileError(f"the {reference.num_steps}-step reference reaches noise scale 0 before its last step; "
                           "check the scheduler config")
    return Candidates(
        kind=reference.kind, prediction_type=reference.prediction_type,
        init_noise_sigma=float(reference.init_noise_sigma),
        timesteps=np.asarray(reference.timesteps, np.float64), c_in=np.asarray(reference.c_in, np.float64),
        x0_from_x=np.asarray(reference.x0_from_x, np.float64), x0_from_m=np.asarray(reference.x0_from_m, np.float64),
        signal=np.append(signal, nx0 + nx * signal[-1]), scale=np.append(scale, nx * scale[-1]))


def dp_search(n_points: int, steps: int, start: Any,
              advance: Callable[[int, Any, list[int]], Sequence[tuple[Any, float]]]) -> tuple[list[int], float]:
    """The ``steps``-step path ``0 = p_0 < p_1 < ... < p_steps = n_points - 1`` chosen by OSS's recursion.

    ``advance(i, state, targets)`` steps the state at point ``i`` to each of ``targets`` (all > ``i``) and returns
    ``(state_j, cost_j)`` per target, ``cost_j`` the distance of ``state_j`` to the reference at ``j``. The DP
    keeps, per ``(k, j)``, the state of the predecessor with the smallest cost (ties: the smallest predecessor,
    so the result is deterministic); ``advance`` is called once per reachable ``(k - 1, i)``. When the state is
    the path's accumulated cost (``advance`` adds an edge cost), this is exactly the cheapest path with
    ``steps`` edges. Returns the path and its cost at the end point."""
    if steps < 1 or n_points < steps + 1:
        raise ProfileError(f"cannot choose {steps} step(s) among {n_points - 1} reference steps")
    end = n_points - 1
    layer: dict[int, tuple[float, Any]] = {0: (0.0, start)}
    parents: list[dict[int, int]] = []
    for k in range(1, steps + 1):
        top = end if k == steps else end - (steps - k)
        nxt: dict[int, tuple[float, Any]] = {}
        back: dict[int, int] = {}
        for i in sorted(layer):
            targets = [end] if k == steps else list(range(i + 1, top + 1))
            if not targets:
                continue
            for j, (state_j, cost_j) in zip(targets, advance(i, layer[i][1], targets)):
                if j not in nxt or cost_j < nxt[j][0]:
                    nxt[j] = (float(cost_j), state_j)
                    back[j] = i
        layer = nxt
        parents.append(back)
    path = [end]
    for back in reversed(parents):
        path.append(back[path[-1]])
    return path[::-1], layer[end][0]


def schedule_tables(cands: Candidates, path: Sequence[int], *, solver_type: str = "midpoint") -> SamplerTables:
    """Sampler tables that run the candidates ``path[:-1]`` (the last point is the end point) with the candidates'
    kind: the first-order update for ``ddim`` / ``euler`` / ``flow_euler``, and for ``dpmpp_2m`` DPM-Solver++(2M)
    (``solver_type`` "midpoint" or "heun", as diffusers) with first-order first and last steps."""
    path = [int(p) for p in path]
    if path[-1] != cands.count - 1 or path[0] != 0 or any(b <= a for a, b in zip(path, path[1:])):
        raise ProfileError(f"schedule path {path} must rise from 0 to the end point {cands.count - 1}")
    n = len(path) - 1
    idx = np.asarray(path[:-1])
    lam = None
    if cands.kind == "dpmpp_2m":  # log-SNR; infinite at a zero-scale end point or a zero-SNR start (first order)
        with np.errstate(divide="ignore"):
            lam = np.log(cands.signal) - np.log(cands.scale)
    nx_, nx0_, nprev_ = [], [], []
    for k, (i, j) in enumerate(zip(path[:-1], path[1:])):
        nx, nx0 = cands.first_order(i, j)
        prev = 0.0
        if lam is not None and 0 < k < n - 1 and cands.scale[j] > 0:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                h = float(lam[j] - lam[i])
                r0 = float(lam[i] - lam[path[k - 1]]) / h
                if math.isfinite(r0) and r0 > 0 and math.isfinite(h):
                    d1 = 0.5 * nx0 if solver_type == "midpoint" else cands.signal[j] * (math.expm1(-h) / h + 1.0)
                    nx0, prev = nx0 + d1 / r0, -d1 / r0
        nx_.append(nx)
        nx0_.append(nx0)
        nprev_.append(prev)
    return SamplerTables(
        kind=cands.kind, prediction_type=cands.prediction_type, timesteps=cands.timesteps[idx],
        init_noise_sigma=cands.init_noise_sigma, c_in=cands.c_in[idx], x0_from_x=cands.x0_from_x[idx],
        x0_from_m=cands.x0_from_m[idx], next_from_x=np.asarray(nx_), next_from_x0=np.asarray(nx0_),
        next_from_prev_x0=np.asarray(nprev_), next_from_noise=np.zeros(n),
        noise_signal=cands.signal[idx], noise_scale=cands.scale[idx])


# ==========================================================================================================
# Evaluating the model through the artifact's own loop
# ==========================================================================================================
class LoopEvaluator:
    """``x0`` of the artifact's denoiser at candidate ``i`` for states ``x`` (one per image), computed by the
    loaded :class:`~diffc.runtime.pipeline.Pipeline` itself: a call with one-step tables whose update is
    ``x_next = x0`` and with the VAE decode bypassed returns exactly the ``x0`` the loop would step with
    (conditioning, guidance and engines as at run time). Calls are chunked to the artifact's batch range;
    :attr:`evaluations` counts denoiser calls per image."""

    def __init__(self, pipe: Any, prompts: Sequence[str], guidance: float | None = None):
        self.pipe, self.prompts, self.guidance = pipe, list(prompts), guidance
        self.chunk = int(pipe.image["batch"][2])
        self.evaluations = 0

    @contextlib.contextmanager
    def latents_out(self, tables: SamplerTables) -> Iterator[None]:
        """While inside: the pipeline runs ``tables``, its calls return final latents, and cache reuse and step
        savings (if the artifact has them) are off, so every step runs the whole denoiser on both CFG halves: the
        schedule is searched for the loop itself, not for one savings setting."""
        pipe = self.pipe
        old_tables, old_schedule = pipe.tables, getattr(pipe, "cache_schedule", None)
        old_savings = getattr(pipe, "savings", None)
        pipe.tables = tables
        pipe.decode = lambda latents: latents  # instance attribute: shadows Pipeline.decode for these calls only
        if getattr(pipe, "cache", None):
            pipe.set_cache_schedule(None)
        if getattr(old_savings, "active", False):  # diffc.runtime.savings
            pipe.set_savings(adaptive_guidance="off", extrapolation_order=0,
                             **({"step_cache": "off"} if old_savings.step_cache is not None else {}))
        try:
            yield
        finally:
            del pipe.decode
            pipe.tables = old_tables
            if getattr(pipe, "cache", None):
                pipe.set_cache_schedule(old_schedule)
            if old_savings is not None:
                pipe.savings = old_savings

    def run(self, tables: SamplerTables, latents: np.ndarray) -> np.ndarray:
        """The loop with ``tables`` from ``latents`` (standard normal, one per prompt): the final latents."""
        out = []
        with self.latents_out(tables):
            for a in range(0, len(self.prompts), self.chunk):
                out.append(self.pipe(self.prompts[a:a + self.chunk], latents=latents[a:a + self.chunk],
                                     guidance=self.guidance))
        return np.concatenate(out).astype(np.float32)

    def __call__(self, cands: Candidates, i: int, x: np.ndarray) -> np.ndarray:
        one = SamplerTables(kind=cands.kind, prediction_type=cands.prediction_type,
                            timesteps=cands.timesteps[i:i + 1], init_noise_sigma=1.0, c_in=cands.c_in[i:i + 1],
                            x0_from_x=cands.x0_from_x[i:i + 1], x0_from_m=cands.x0_from_m[i:i + 1],
                            next_from_x=np.zeros(1), next_from_x0=np.ones(1), next_from_prev_x0=np.zeros(1),
                            next_from_noise=np.zeros(1))
        self.evaluations += 1
        return self.run(one, x)


# ==========================================================================================================
# The search
# ==========================================================================================================
@dataclasses.dataclass
class ScheduleResult:
    """What the search chose and how it compares with the default spacing, both run through the real loop:
    ``*_rmse`` is the root-mean-square difference of the final latents from the reference's, over all images."""

    tables: SamplerTables
    kept: str  # "optimized" or "default"
    timesteps: list[float]
    default_timesteps: list[float]
    path: list[int]
    rmse: float
    default_rmse: float
    images: int
    evaluations_per_image: int
    seconds: float

    def report(self) -> dict[str, Any]:
        return {"kept": self.kept, "reference_steps": REFERENCE_STEPS, "timesteps": self.timesteps,
                "default_timesteps": self.default_timesteps, "candidates": self.path[:-1],
                "rmse_vs_reference": round(self.rmse, 6), "default_rmse_vs_reference": round(self.default_rmse, 6),
                "images": self.images, "evaluations_per_image": self.evaluations_per_image,
                "seconds": round(self.seconds, 2)}


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def search(evaluate: Callable[[Candidates, int, np.ndarray], np.ndarray], reference: SamplerTables, steps: int,
           x_start: np.ndarray, *, solver_type: str = "midpoint") -> tuple[SamplerTables, list[int], float]:
    """The DP search: the reference trajectory from ``x_start`` (already scaled by ``init_noise_sigma``), then
    :func:`dp_search` with the first-order student. ``evaluate(cands, i, x)`` is the model's ``x0`` at candidate
    ``i``. Returns (tables, path, the DP's mean squared error at the end point)."""
    check(reference.kind, reference, steps)
    cands = candidates(reference)
    # the teacher: the reference tables' own update, with x0 from the model (no noise: checked above)
    xs, x, prev = [x_start.astype(np.float32)], x_start.astype(np.float32), None
    for i in range(reference.num_steps):
        x0 = evaluate(cands, i, x)
        c_x0, c_prev = float(reference.next_from_x0[i]), float(reference.next_from_prev_x0[i])
        if prev is None:
            c_x0, c_prev = c_x0 + c_prev, 0.0
        x = x * float(reference.next_from_x[i]) + x0 * c_x0 + (prev * c_prev if c_prev else 0.0)
        prev = x0
        xs.append(x.astype(np.float32))

    def advance(i: int, state: np.ndarray, targets: list[int]) -> list[tuple[np.ndarray, float]]:
        x0 = evaluate(cands, i, state)
        out = []
        for j in targets:
            nx, nx0 = cands.first_order(i, j)
            xj = (state * nx + x0 * nx0).astype(np.float32)
            out.append((xj, _mse(xj, xs[j])))
        return out

    path, cost = dp_search(cands.count, steps, xs[0], advance)
    return schedule_tables(cands, path, solver_type=solver_type), path, cost


def optimize(pipe: Any, reference: SamplerTables, default: SamplerTables, prompts: Sequence[str],
             seeds: Sequence[int], *, guidance: float | None = None, solver_type: str = "midpoint") -> ScheduleResult:
    """Search ``default.num_steps`` timesteps for the loaded artifact ``pipe`` against ``reference`` (its sampler
    compiled for :data:`REFERENCE_STEPS` steps) over ``prompts`` x ``seeds`` (latents drawn as a call with that
    seed draws them). Compares the result with ``default`` through the real loop and keeps the better one."""
    t0 = time.perf_counter()
    jobs = [(p, s) for p in prompts for s in seeds]
    if not jobs:
        raise ProfileError("the schedule search needs at least one calibration prompt and seed "
                           "([quantize].calibration_prompts / calibration_seeds)")
    h, w = pipe.default_size
    latents = np.concatenate([pipe.initial_noise(s, 1, h, w) for _, s in jobs])
    evaluator = LoopEvaluator(pipe, [p for p, _ in jobs], guidance)
    x_start = latents * np.float32(reference.init_noise_sigma)
    tables, path, _ = search(evaluator, reference, default.num_steps, x_start, solver_type=solver_type)
    evaluations = evaluator.evaluations
    target = evaluator.run(reference, latents)
    rmse = math.sqrt(_mse(evaluator.run(tables, latents), target))
    default_rmse = math.sqrt(_mse(evaluator.run(default, latents), target))
    kept = "optimized" if rmse <= default_rmse else "default"
    return ScheduleResult(
        tables=tables if kept == "optimized" else default, kept=kept,
        timesteps=[round(float(t), 4) for t in tables.timesteps],
        default_timesteps=[round(float(t), 4) for t in default.timesteps], path=path, rmse=rmse,
        default_rmse=default_rmse, images=len(jobs), evaluations_per_image=evaluations,
        seconds=time.perf_counter() - t0)


# ==========================================================================================================
# The build stage
# ==========================================================================================================
def stage(exported: Any, profile: Any, graphs: dict[str, Path], reference_artifact: Path | None, work: Path,
          report: dict[str, Any], *, exporter: str, verify_passes: bool, progress: bool) -> None:
    """``[sampler].schedule = "optimized"``: search the schedule in the fp32 twin's loop (the gated profiles' own
    twin, else one assembled for the search), then put the chosen tables in ``exported.tables`` (what the
    manifest, calibration and the quality gate use) and in the twin's manifest. Records ``schedule`` in
    ``report``."""
    from diffc.build import twin
    from diffc.exporter.sampler import compile_sampler
    from diffc.runtime.pipeline import Pipeline

    tables = exported.tables
    check(tables.kind, tables, tables.num_steps)
    artifact = reference_artifact
    if artifact is None:
        log.info("schedule search: assembling the fp32 onnxruntime artifact it runs in")
        scratch = {"components": report["components"]}  # twin.build reads the passes' entries, records its own
        artifact = twin.build(exported, profile, graphs, scratch, work, exporter=exporter,
                              verify_passes=verify_passes, progress=progress)
    kw = {} if exported.family is None else {"pipeline_class": exported.source.pipeline_class}
    reference = compile_sampler(tables.kind, exported.scheduler_config, REFERENCE_STEPS, **kw)
    solver = exported.scheduler_config.get("solver_type", "midpoint")
    pipe = Pipeline(artifact, progress=False, cache=False, verify=False)
    try:
        result = optimize(pipe, reference, tables, profile.quantize.calibration_prompts,
                          profile.quantize.calibration_seeds, solver_type="heun" if solver == "heun" else "midpoint")
    finally:
        pipe.close()
    log.info("optimized schedule (%s, %d steps): timesteps %s (default spacing %s); final-latent RMSE vs the "
             "%d-step reference %.5f (default spacing %.5f) over %d calibration images, %d evaluations each, "
             "%.1f s; kept the %s schedule", tables.kind, tables.num_steps, result.timesteps,
             result.default_timesteps, REFERENCE_STEPS, result.rmse, result.default_rmse, result.images,
             result.evaluations_per_image, result.seconds, result.kept)
    report["schedule"] = result.report()
    exported.tables = result.tables
    if reference_artifact is not None:  # calibration and the gate run the twin: it must run the same schedule
        path = reference_artifact / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["sampler"] = result.tables.to_dict()
        path.write_text(json.dumps(manifest, indent=2, allow_nan=False))
