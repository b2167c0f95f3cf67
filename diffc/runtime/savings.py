"""Training-free step savings decided by the manifest: adaptive guidance and extrapolation of cached values.

The manifest's ``savings`` section (docs/manifest.md, "Savings") says which savings an artifact runs; a caller
may override each setting per pipeline (:meth:`diffc.runtime.pipeline.Pipeline.set_savings`, ``diffc run
--guidance-from-step`` ...). Everything here is numpy and plain data, so that a native runner can follow the same
rules from the document alone:

* **Adaptive guidance** (``adaptive_guidance``): from some step on, classifier-free guidance runs the conditional
  half of the denoiser batch only (B rows instead of 2B). ``static``: from step ``from_step`` on. ``dynamic``: from
  the step after the first one at which the cosine similarity of the uncond and cond predictions reaches
  ``threshold`` for every guided row of the batch. A cond-only step guides with the last guidance difference
  it computed: ``m_cond + (g - 1) * (m_cond - m_uncond)`` of the last step that ran both halves (measured better
  than ``m_cond`` alone, AdaptiveDiffusion's choice: :meth:`GuidanceRun.guide`).
* **Extrapolation** (``extrapolation.order`` = k): a value cached at earlier steps and reused at a later one
  (DeepCache's feature on shallow steps, the dynamic step cache's tail contribution on head-only steps) is
  extrapolated to the current timestep from its last k + 1 cached values by :func:`extrapolate`, instead of
  being reused as it is (k = 0).
* ``step_cache``: dynamic step caching (head / tail split), specified by its own module; kept here as data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from diffc.errors import DiffcError, InputError, ManifestError

__all__ = ["AG_MODES", "MAX_ORDER", "SAVINGS_VERSION", "AdaptiveGuidance", "GuidanceRun", "History", "Savings",
           "cond_feeds", "cond_half", "cosine_rows", "extrapolate", "extrapolation_weights", "replay_dynamic"]

#: the version of the manifest's ``savings`` section this runtime reads
SAVINGS_VERSION = 1
#: the highest extrapolation order (AB-Cache's results use 1-3; higher orders amplify the cache's error)
MAX_ORDER = 3
#: ``adaptive_guidance.mode``
AG_MODES = ("off", "static", "dynamic")
#: the ``set_savings`` keywords this module knows, and what each sets
OVERRIDES = {
    "adaptive_guidance": "'off', 'static' or 'dynamic' (with guidance_from_step / guidance_threshold)",
    "guidance_from_step": "an integer >= 0: steps from it on run the conditional half only (mode 'static')",
    "guidance_threshold": "a number in [-1, 1]: cond-only once the cosine of the two halves reaches it ('dynamic')",
    "extrapolation_order": f"an integer from 0 (reuse as is) to {MAX_ORDER}",
    "step_cache_threshold": "a number >= 0: the dynamic step cache's threshold (0: every step runs the whole denoiser)",
    "step_cache": "'off': run the whole denoiser on every step, without the dynamic step cache's head",
}


# ------------------------------------------------------------------------------------------ extrapolation


def extrapolation_weights(times: Sequence[float], t: float) -> np.ndarray:
    """The weights ``w`` of ``value(t) ~= sum_j w[j] * values[j]``: the Lagrange polynomial through the points
    ``(times[j], values[j])`` evaluated at ``t``, in float64.

    On a uniform grid with ``t`` one step past the last time these are the Adams-Bashforth-style extrapolation
    coefficients AB-Cache uses ((2, -1) for order 1, (3, -3, 1) for order 2, ...); with the sampler's own,
    non-uniform timesteps they are the same rule for the actual step sizes, and exact for any polynomial in time of
    degree < ``len(times)``."""
    ts = np.asarray(times, np.float64)
    if ts.ndim != 1 or ts.size == 0 or not np.isfinite(ts).all() or not math.isfinite(t):
        raise ValueError(f"extrapolation needs finite times, got {list(times)!r} and t = {t!r}")
    if np.unique(ts).size != ts.size:
        raise ValueError(f"extrapolation times must be distinct, got {ts.tolist()}")
    w = np.ones(ts.size, np.float64)
    for j in range(ts.size):
        for m in range(ts.size):
            if m != j:
                w[j] *= (t - ts[m]) / (ts[j] - ts[m])
    return w


def extrapolate(values: Sequence[np.ndarray], times: Sequence[float], t: float, order: int) -> np.ndarray:
    """``values`` (oldest first, cached at ``times``) extrapolated to time ``t`` with order ``order``.

    Order k uses the last ``k + 1`` values: the degree-k polynomial in time through them, evaluated at ``t``
    (:func:`extrapolation_weights`). Fewer values cached than that (the first reuses after step 0) lower the order
    to ``len(values) - 1``; order 0 returns ``values[-1]`` itself (reuse as is). The sum runs in float64 and is cast
    back to the values' dtype. Times are whatever axis the caller steps on; diffc passes the sampler's timesteps."""
    if not isinstance(order, (int, np.integer)) or isinstance(order, bool) or not 0 <= order <= MAX_ORDER:
        raise ValueError(f"extrapolation order must be an integer from 0 to {MAX_ORDER}, got {order!r}")
    if len(values) == 0 or len(values) != len(times):
        raise ValueError(f"extrapolation needs as many times as values (at least one), got {len(values)} values and "
                         f"{len(times)} times")
    k = min(int(order), len(values) - 1)
    if k == 0:
        return values[-1]
    w = extrapolation_weights(list(times)[-(k + 1):], t)
    vs = list(values)[-(k + 1):]
    out = np.zeros(np.shape(vs[-1]), np.float64)
    for wj, vj in zip(w, vs):
        out += wj * np.asarray(vj, np.float64)
    return out.astype(np.asarray(vs[-1]).dtype, copy=False)


@dataclass
class History:
    """The last ``order + 1`` values of one cached quantity and the times they were cached at, for
    :func:`extrapolate` (one per call and per cached quantity: no value ever crosses into another call)."""

    order: int
    values: list[np.ndarray] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    def push(self, value: np.ndarray, time: float) -> None:
        self.values.append(value)
        self.times.append(float(time))
        keep = self.order + 1
        del self.values[:-keep], self.times[:-keep]

    def at(self, time: float) -> tuple[np.ndarray, int]:
        """The value extrapolated to ``time`` and the order actually used (lower while few values are cached)."""
        used = min(self.order, len(self.values) - 1)
        return extrapolate(self.values, self.times, time, used), used

    def map(self, fn) -> None:
        """Apply ``fn`` to every cached value (e.g. keep the conditional half once guidance goes cond-only)."""
        self.values = [fn(v) for v in self.values]

    def __bool__(self) -> bool:
        return bool(self.values)


# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class AdaptiveGuidance:
    """``mode`` ``off``; ``static`` (steps >= ``from_step`` are cond-only); ``dynamic`` (cond-only after the first
    step whose cosine reaches ``threshold``)."""

    mode: str = "off"
    from_step: int | None = None
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.mode == "static":
            return {"mode": "static", "from_step": self.from_step}
        if self.mode == "dynamic":
            return {"mode": "dynamic", "threshold": self.threshold}
        return {"mode": "off"}


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and math.isfinite(v)


def _adaptive_guidance(value: Any, err: type[DiffcError], where: str) -> AdaptiveGuidance:
    if not isinstance(value, Mapping):
        raise err(f"{where} must be a table such as {{mode = \"static\", from_step = 3}}, got {value!r}")
    mode = value.get("mode", "off")
    allowed = {"off": {"mode"}, "static": {"mode", "from_step"}, "dynamic": {"mode", "threshold"}}
    if mode not in AG_MODES:
        raise err(f"{where}.mode must be one of {list(AG_MODES)}, got {mode!r}")
    extra = sorted(set(value) - allowed[mode])
    if extra:
        raise err(f"{where}.{extra[0]} does not go with mode {mode!r}; mode {mode!r} takes {sorted(allowed[mode])}")
    if mode == "static":
        s = value.get("from_step")
        if not _is_int(s) or s < 0:
            raise err(f"{where}.from_step must be an integer >= 0 (steps from it on run the conditional half only; "
                      f"the step count: never), got {s!r}")
        return AdaptiveGuidance("static", from_step=int(s))
    if mode == "dynamic":
        x = value.get("threshold")
        if not _is_number(x) or not -1.0 <= x <= 1.0:
            raise err(f"{where}.threshold must be a cosine similarity in [-1, 1] (e.g. 0.995), got {x!r}")
        return AdaptiveGuidance("dynamic", threshold=float(x))
    return AdaptiveGuidance()


def _order(value: Any, err: type[DiffcError], where: str) -> int:
    if not _is_int(value) or not 0 <= value <= MAX_ORDER:
        raise err(f"{where} must be an integer from 0 (reuse the cached value as is) to {MAX_ORDER}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Savings:
    """What one call saves: adaptive guidance, the extrapolation order of reused values, and the dynamic step
    cache's settings (``step_cache``: the manifest's table, as data; None: off)."""

    adaptive_guidance: AdaptiveGuidance = AdaptiveGuidance()
    extrapolation_order: int = 0
    step_cache: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, section: Any, *, err: type[DiffcError] = ManifestError, where: str = "savings") -> "Savings":
        """The manifest's ``savings`` section (None: no savings). ``err``: the error type of a bad section
        (:class:`ManifestError` for a manifest; the profile's parser passes :class:`ProfileError`)."""
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise err(f"{where} must be an object, got {section!r}")
        version = section.get("version", SAVINGS_VERSION)
        if not _is_int(version) or version < 1:
            raise err(f"{where}.version must be an integer >= 1, got {version!r}")
        if version > SAVINGS_VERSION:
            raise err(f"{where}.version {version} is newer than this runtime reads ({SAVINGS_VERSION}); upgrade diffc")
        extra = sorted(set(section) - {"version", "adaptive_guidance", "extrapolation", "step_cache"})
        if extra:
            raise err(f"{where}.{extra[0]} is not a savings setting; known: adaptive_guidance, extrapolation, "
                      "step_cache")
        ag = _adaptive_guidance(section.get("adaptive_guidance", {}), err, f"{where}.adaptive_guidance")
        ex = section.get("extrapolation", {})
        if not isinstance(ex, Mapping) or sorted(set(ex) - {"order"}):
            raise err(f"{where}.extrapolation must be a table with one key, order, got {ex!r}")
        order = _order(ex.get("order", 0), err, f"{where}.extrapolation.order")
        step_cache = section.get("step_cache")
        if step_cache is not None and not isinstance(step_cache, Mapping):
            raise err(f"{where}.step_cache must be a table, got {step_cache!r}")
        return cls(ag, order, None if step_cache is None else dict(step_cache))

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``savings`` section."""
        out: dict[str, Any] = {"version": SAVINGS_VERSION, "adaptive_guidance": self.adaptive_guidance.to_dict(),
                               "extrapolation": {"order": self.extrapolation_order}}
        if self.step_cache is not None:
            out["step_cache"] = dict(self.step_cache)
        return out

    @property
    def active(self) -> bool:
        return self.adaptive_guidance.mode != "off" or self.extrapolation_order > 0 or self.step_cache is not None

    def with_overrides(self, **overrides: Any) -> "Savings":
        """These settings with run-time overrides (:data:`OVERRIDES`); a bad one is an :class:`InputError` naming
        it. ``guidance_from_step`` switches adaptive guidance to ``static``, ``guidance_threshold`` to ``dynamic``;
        ``adaptive_guidance="off"`` turns it off. None for a keyword means "leave it"."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(overrides) - set(OVERRIDES))
        if unknown:
            raise InputError(f"{unknown[0]!r} is not a savings setting; known: "
                             + "; ".join(f"{k}: {v}" for k, v in OVERRIDES.items()))
        out = self
        ag = overrides.get("adaptive_guidance")
        s, x = overrides.get("guidance_from_step"), overrides.get("guidance_threshold")
        if ag is not None and ag not in AG_MODES:
            raise InputError(f"adaptive_guidance must be one of {list(AG_MODES)}, got {ag!r}")
        if s is not None and x is not None:
            raise InputError("give guidance_from_step (static adaptive guidance) or guidance_threshold (dynamic), "
                             "not both")
        if ag == "off" and (s is not None or x is not None):
            raise InputError("adaptive_guidance='off' takes neither guidance_from_step nor guidance_threshold")
        if s is not None or ag == "static" and x is None:
            if ag == "dynamic":
                raise InputError("adaptive_guidance='dynamic' takes guidance_threshold, not guidance_from_step")
            s = self.adaptive_guidance.from_step if s is None else s
            if not _is_int(s) or s < 0:
                raise InputError(f"guidance_from_step must be an integer >= 0 (steps from it on run the conditional "
                                 f"half only; the step count: never), got {s!r}")
            out = replace(out, adaptive_guidance=AdaptiveGuidance("static", from_step=int(s)))
        elif x is not None or ag == "dynamic":
            if ag == "static":
                raise InputError("adaptive_guidance='static' takes guidance_from_step, not guidance_threshold")
            x = self.adaptive_guidance.threshold if x is None else x
            if not _is_number(x) or not -1.0 <= x <= 1.0:
                raise InputError(f"guidance_threshold must be a cosine similarity in [-1, 1] (e.g. 0.995), got {x!r}")
            out = replace(out, adaptive_guidance=AdaptiveGuidance("dynamic", threshold=float(x)))
        elif ag == "off":
            out = replace(out, adaptive_guidance=AdaptiveGuidance())
        if "extrapolation_order" in overrides:
            out = replace(out, extrapolation_order=_order(overrides["extrapolation_order"], InputError,
                                                          "extrapolation_order"))
        if "step_cache" in overrides or "step_cache_threshold" in overrides:  # diffc.runtime.step_cache
            from diffc.runtime.step_cache import with_overrides

            out = replace(out, step_cache=with_overrides(out.step_cache, overrides.get("step_cache"),
                                                         overrides.get("step_cache_threshold")))
        return out

    def check_steps(self, steps: int) -> None:
        """Refuse a static ``from_step`` beyond the loop (``from_step == steps``: never cond-only, allowed)."""
        s = self.adaptive_guidance.from_step
        if self.adaptive_guidance.mode == "static" and s is not None and s > steps:
            raise InputError(f"guidance_from_step {s} is past the loop's {steps} steps; give 0 .. {steps} ({steps}: "
                             "never cond-only)")

    def start(self, steps: int, guided: bool, images: int, min_rows: int = 1) -> "GuidanceRun":
        """The per-call state of adaptive guidance (``guided``: the call runs classifier-free guidance on ``images``
        rows per half). ``min_rows``: the fewest batch rows the denoiser engine takes; a static-batch engine (a
        TensorRT engine built with ``static_shapes``) that needs the full 2B cannot run a cond-only step, which is
        refused here rather than inside the backend."""
        self.check_steps(steps)
        rule = self.adaptive_guidance if guided else AdaptiveGuidance()
        if rule.mode != "off" and images < min_rows:
            raise InputError(f"adaptive guidance runs the conditional half alone ({images} batch rows), but this "
                             f"artifact's denoiser engine takes at least {min_rows} rows (static batch); turn it off "
                             "(set_savings(adaptive_guidance='off')) or rebuild without [tensorrt].static_shapes")
        return GuidanceRun(rule, steps)


# ------------------------------------------------------------------------------------------ the rule


def cosine_rows(m_uncond: np.ndarray, m_cond: np.ndarray) -> np.ndarray:
    """Per row, the cosine similarity of the flattened uncond and cond predictions, in float64, clipped to [-1, 1]
    (1 when either is all zeros: nothing left to guide)."""
    u = np.asarray(m_uncond, np.float64).reshape(m_uncond.shape[0], -1)
    c = np.asarray(m_cond, np.float64).reshape(m_cond.shape[0], -1)
    num = np.einsum("ij,ij->i", u, c)
    den = np.linalg.norm(u, axis=1) * np.linalg.norm(c, axis=1)
    cos = np.divide(num, den, out=np.ones_like(num), where=den > 0)
    return np.clip(cos, -1.0, 1.0)


class GuidanceRun:
    """Adaptive guidance over one call: which steps are cond-only, and the guided prediction of each step.

    Monotone by design: once a step is cond-only every later step is too (the loop never needs the uncond half
    back, so the batch only shrinks)."""

    def __init__(self, rule: AdaptiveGuidance, steps: int):
        self.rule = rule
        self.steps = steps
        self._cond_only_from = rule.from_step if rule.mode == "static" else None
        #: ``m_cond - m_uncond`` of the last step that ran both halves (None before the first)
        self._difference: np.ndarray | None = None

    def cond_only(self, i: int) -> bool:
        """Whether step ``i`` runs the conditional half alone."""
        return self._cond_only_from is not None and i >= self._cond_only_from

    def guide(self, i: int, m: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """Step ``i``'s guided prediction from the denoiser output ``m`` and the per-row scales ``g`` ([B, 1, 1, 1],
        NaN: that row takes ``m_cond``), and the metrics the rule compared (``{"cosine": c}``, the minimum over
        the guided rows, on dynamic steps that ran both halves). ``m``: [uncond; cond] (2B rows), or the cond
        half alone (B rows) on a cond-only step.

        A cond-only step keeps the guidance of the last step that ran both halves: ``m_cond + (g - 1) * D`` with
        ``D`` that step's ``m_cond - m_uncond`` (``m_cond`` alone before any such step, and for NaN rows). On the
        20-step demo this holds 3 dB more than ``m_cond`` alone (AdaptiveDiffusion's choice) at the same saving
        (cond-only from step 15: 31.4 dB against 28.3 dB vs no savings). Extrapolating ``D`` instead of holding it
        is not robust: order 1 gains about 1 dB from steps 14-15 but loses 5 dB from step 10; order 2 loses
        everywhere (26.3 dB from step 15)."""
        if self.cond_only(i):
            if self._difference is None:
                return m, {}
            return m + np.nan_to_num(g - 1, nan=0.0) * self._difference, {}
        m_uncond, m_cond = np.split(m, 2)
        self._difference = m_cond - m_uncond
        guided = m_uncond + np.nan_to_num(g, nan=1.0) * (m_cond - m_uncond)
        out = np.where(np.isnan(g), m_cond, guided)
        metrics: dict[str, float] = {}
        if self.rule.mode == "dynamic":
            rows = ~np.isnan(np.asarray(g).reshape(-1))
            if rows.any():
                cos = float(cosine_rows(m_uncond[rows], m_cond[rows]).min())
                metrics["cosine"] = cos
                if cos >= self.rule.threshold:
                    self._cond_only_from = i + 1
        return out, metrics


def cond_feeds(feeder: Any) -> Any:
    """A copy of a :class:`~diffc.runtime.denoiser.Feeds` for the conditional half alone: every per-call input
    batched along rows (text states, pooled, mask, SDXL's ``text_embeds`` / ``time_ids``) keeps its second half;
    the position ids (``image_ids`` / ``text_ids``, not batched) stay."""
    out = copy.copy(feeder)
    unbatched = {feeder.inputs.get("image_ids"), feeder.inputs.get("text_ids")} - {None}
    half = feeder.batch // 2
    out.fixed = {k: v if k in unbatched or np.ndim(v) == 0 or np.shape(v)[0] != feeder.batch else v[half:]
                 for k, v in feeder.fixed.items()}
    out.batch = feeder.batch - half
    return out


def cond_half(a: np.ndarray) -> np.ndarray:
    """The conditional (second) half of a [uncond; cond] batch."""
    return a[a.shape[0] // 2:]


def replay_dynamic(cosines: Sequence[float | None], threshold: float) -> list[bool]:
    """The documented dynamic rule in plain Python: per step, cond-only or not, from each step's recorded cosine
    (None where the step did not compare). What a native runner must reproduce; the tests hold the runtime to it."""
    out, fired = [], False
    for c in cosines:
        out.append(fired)
        if not fired and c is not None and c >= threshold:
            fired = True
    return out
