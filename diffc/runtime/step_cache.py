"""Dynamic step caching at run time: every step runs the denoiser's head; the tail runs only when the head's
decision tensor has moved enough since the last full step.

The artifact holds the denoiser cut in two (diffc.passes.step_cache): the head (embeddings + the first block)
returns the tensors the rest reads and ``step_cache_decision``; the tail takes them and returns the denoiser's
output. The manifest's ``savings.step_cache`` names both and the rule's threshold (docs/manifest.md, "Dynamic step
caching"). The rule, per call (steps ``s0 .. N-1``; ``d_i`` the decision tensor at step ``i``, the whole denoiser
batch: both halves under classifier-free guidance):

* ``rel_l1(i) = mean|d_i - d_{i-1}| / mean|d_{i-1}|`` (float64), for every step after the call's first;
* ``acc`` sums ``rel_l1`` over the steps since the last full step (the full step's own included);
* step ``i`` is **full** (tail runs, ``acc`` resets to 0 after the comparison) when it is the call's first step,
  its last step, or ``acc >= threshold``; otherwise it is **head-only**: the tail's result is reused.

What is reused is the last full step's denoiser output (the prediction ``m``, before guidance), extrapolated to
the step's timestep from the last ``order + 1`` full steps' outputs with :func:`diffc.runtime.savings.extrapolate`
when ``savings.extrapolation.order`` > 0. The prediction and not a residual: a UNet's first block changes the
resolution, so "output minus first block" is not defined there, and one rule for both kinds of denoiser keeps the
document short. The last step is always full because its prediction becomes the image with nothing after it to
correct a reused one. Threshold 0 never skips (``acc >= 0``): every step runs head + tail, which the build checks
against the whole denoiser.

numpy only: this ships in the torch-free runtime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from diffc.errors import DiffcError, ManifestError
from diffc.runtime.savings import History

__all__ = ["METRICS", "StepCacheRun", "check_entry", "rel_l1", "replay", "start", "with_overrides"]

#: the decision rules this runtime knows (``savings.step_cache.metric``)
METRICS = ("rel_l1",)
#: the largest threshold a profile, manifest or call may ask for: the accumulated relative change rarely passes a
#: few units even over a whole call, so a larger one only means "never run the tail" (a broken image)
MAX_THRESHOLD = 10.0
_KEYS = {"head_component", "tail_component", "decision", "cut", "threshold", "metric", "head_fraction"}


def check_threshold(value: Any, err: type[DiffcError], where: str) -> float:
    """A threshold: a finite number from 0 (never skip) to :data:`MAX_THRESHOLD`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or not 0.0 <= float(value) <= MAX_THRESHOLD:
        raise err(f"{where} must be a number from 0 (every step runs the whole denoiser) to {MAX_THRESHOLD:g}, "
                  f"e.g. 0.1; got {value!r}")
    return float(value)


def check_entry(entry: Mapping[str, Any], components: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``savings.step_cache`` checked against its ``components`` (:class:`ManifestError`)."""
    where = "savings.step_cache"
    missing = sorted(_KEYS - {"head_fraction"} - set(entry))
    if missing:
        raise ManifestError(f"{where} lacks {missing}; rebuild the artifact with this diffc")
    extra = sorted(set(entry) - _KEYS)
    if extra:
        raise ManifestError(f"{where}.{extra[0]} is unknown to this runtime; upgrade diffc or rebuild the artifact")
    if entry["metric"] not in METRICS:
        raise ManifestError(f"{where}.metric {entry['metric']!r} is unknown to this runtime (it knows {list(METRICS)});"
                            " upgrade diffc or rebuild the artifact")
    for key in ("head_component", "tail_component"):
        if entry[key] not in components:
            raise ManifestError(f"{where}.{key} names {entry[key]!r}, which is not among the components; the "
                                "manifest is damaged: rebuild the artifact")
    cut = entry["cut"]
    if not isinstance(cut, list) or not cut or not all(isinstance(c, str) for c in cut):
        raise ManifestError(f"{where}.cut must list the tensors the tail takes from the head, got {cut!r}")
    check_threshold(entry["threshold"], ManifestError, f"{where}.threshold")
    return dict(entry)


def rel_l1(current: np.ndarray, previous: np.ndarray) -> float:
    """``mean|current - previous| / mean|previous|`` in float64 (0 when both are all zeros, inf when only the
    previous one is)."""
    a, b = np.asarray(current, np.float64), np.asarray(previous, np.float64)
    num, den = float(np.abs(a - b).mean()), float(np.abs(b).mean())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def replay(changes: Sequence[float | None], threshold: float) -> list[bool]:
    """The documented rule in plain Python: per step of one call, True when it runs the tail. ``changes[k]``:
    the ``rel_l1`` of the call's k-th step against the step before (None for the first). What a native runner must
    reproduce; the tests hold the runtime's trace to it."""
    full, acc = [], 0.0
    last = len(changes) - 1
    for k, r in enumerate(changes):
        if k == 0 or r is None:
            full.append(True)
            acc = 0.0
            continue
        acc += r
        run = k == last or acc >= threshold
        full.append(run)
        if run:
            acc = 0.0
    return full


class StepCacheRun:
    """The step cache over one call: which steps run the tail, the reused prediction on the others."""

    def __init__(self, entry: Mapping[str, Any], threshold: float, sessions: Mapping[str, Any], output: str,
                 order: int, first: int, last: int):
        self.head = sessions[entry["head_component"]]
        self.tail = sessions[entry["tail_component"]]
        self.decision, self.cut, self.output = entry["decision"], list(entry["cut"]), output
        self.threshold = threshold
        self.first, self.last = first, last
        self.history = History(order)
        self.previous: np.ndarray | None = None
        self.acc = 0.0

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        """Apply ``fn`` to every batch-shaped value kept between steps (the conditional half, once adaptive
        guidance drops the uncond half)."""
        self.history.map(fn)
        if self.previous is not None:
            self.previous = fn(self.previous)

    def evaluate(self, i: int, feeds: dict[str, np.ndarray], time: float,
                 to_latents: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, str, dict[str, float], int]:
        """Step ``i``: ``(m, evaluation, metrics, order)``: the prediction in latent layout (``to_latents`` turns
        the tail's output into it), ``"full"`` or ``"head"``, ``{"rel_l1": acc}`` (the accumulated change the
        rule compared; none on the call's first step) and the extrapolation order applied to a reused ``m``."""
        names = [self.decision, *[c for c in self.cut if c != self.decision]]
        out = self.head.run(feeds, names)
        d = out[self.decision]
        metrics: dict[str, float] = {}
        full = i == self.first or self.previous is None
        if not full:
            self.acc += rel_l1(d, self.previous)
            metrics["rel_l1"] = self.acc
            full = i == self.last or self.acc >= self.threshold
        self.previous = d
        if not full:
            m, order = self.history.at(time)
            return m, "head", metrics, order
        self.acc = 0.0
        m = to_latents(self.tail.run({**feeds, **{c: out[c] for c in self.cut}}, [self.output])[self.output])
        self.history.push(m, time)
        return m, "full", metrics, 0


def with_overrides(entry: Mapping[str, Any] | None, mode: Any, threshold: Any) -> dict[str, Any] | None:
    """The manifest's ``savings.step_cache`` with ``set_savings``' overrides: ``step_cache="off"`` (None: leave it)
    and ``step_cache_threshold`` (None: leave it). :class:`InputError` for a bad one, or for any on an artifact
    built without the step cache."""
    from diffc.errors import InputError

    if mode is not None and mode != "off":
        raise InputError(f"step_cache takes 'off' (the artifact's threshold applies otherwise), got {mode!r}")
    if entry is None and mode == "off" and threshold is None:
        return None
    if entry is None:
        raise InputError("this artifact was built without dynamic step caching; rebuild it with a profile that has a "
                         "[savings.step_cache] table (threshold = 0.1)")
    if mode == "off":
        if threshold is not None:
            raise InputError("give step_cache='off' or step_cache_threshold, not both")
        return None
    if threshold is None:
        return dict(entry)
    return {**entry, "threshold": check_threshold(threshold, InputError, "step_cache_threshold")}


def start(savings: Any, manifest: Mapping[str, Any], sessions: Mapping[str, Any], output: str, first: int,
          last: int) -> StepCacheRun | None:
    """The step cache of one call over steps ``first .. last`` (None when the call's savings have none):
    ``savings`` a :class:`diffc.runtime.savings.Savings`, ``output`` the denoiser's output name."""
    if savings.step_cache is None:
        return None
    entry = check_entry(savings.step_cache, manifest["components"])
    return StepCacheRun(entry, float(entry["threshold"]), sessions, output, savings.extrapolation_order, first, last)
