"""Feature-cache reuse (DeepCache) at run time: on which steps the full UNet runs and refreshes the cache.

:func:`full_steps` turns a cache schedule into a per-step mask (``True``: run the full UNet and refresh the
cache; ``False``: run the shallow UNet on the cached feature). The build writes the mask into the manifest, so a
runner follows it without knowing any schedule; the runtime recomputes it only when asked for another schedule
(``diffc run --cache-interval``). Which UNet tensor is cached (the branches of a UNet, numbered as DeepCache
does) is build-time knowledge: :mod:`diffc.exporter.unet_blocks`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from diffc.errors import ProfileError

SCHEDULE_KINDS = ("interval", "nonuniform", "mask")
#: DeepCache's non-uniform schedule: starting exponent of the power law (the paper's experiments use 1.2-1.5)
DEFAULT_POWER = 1.4


def _power_center(steps: int, n_full: int, center: int, power: float) -> list[int] | None:
    """DeepCache's non-uniform 1:N schedule (``sample_from_quad_center`` in its DDPM code), in real arithmetic.

    Points spread uniformly on a power-``1/power`` scale around ``center`` and mapped back with the power
    law are dense near ``center`` and sparse towards both ends: full steps cluster where the features change
    fastest. Step 0 is always full. The exponent shrinks by 0.02 until exactly ``n_full`` distinct steps come
    out (as DeepCache does); None if it reaches 1 first. DeepCache raises a negative base to a fractional
    power, which Python makes complex; this is the signed real version of the same curve.
    """
    def signed_pow(x: float, p: float) -> float:
        return math.copysign(abs(x) ** p, x)

    p = power
    while p > 1.0:
        lo, hi = signed_pow(-center, 1 / p), signed_pow(steps - center, 1 / p)
        xs = [lo + (hi - lo) * k / n_full for k in range(n_full + 1)]
        picked = sorted({int(signed_pow(x, p)) for x in xs})[1:-1]  # drop the ends (-center and steps - center)
        indices = sorted({0} | {v + center for v in picked if 0 < v + center < steps})
        if len(indices) == n_full:
            return indices
        p -= 0.02
    return None


def full_steps(schedule: Mapping[str, Any], steps: int) -> list[bool]:
    """The per-step mask of ``schedule`` for a ``steps``-step loop; step 0 is always full.

    ``schedule``: ``{"kind": "interval", "interval": N}`` (full every N-th step), ``{"kind": "nonuniform",
    "interval": N, "power": p, "center": c}`` (as many full steps as interval N, DeepCache's power law around
    step ``c``, default ``steps // 2``) or ``{"kind": "mask", "mask": [1, 0, 1, ...]}`` (one entry per step).
    """
    kind = schedule.get("kind")
    if kind not in SCHEDULE_KINDS:
        raise ProfileError(f"[cache].schedule must be one of {list(SCHEDULE_KINDS)}, got {kind!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ProfileError(f"a cache schedule needs a step count >= 1, got {steps!r}")
    if kind == "mask":
        mask = [bool(v) for v in schedule.get("mask") or ()]
        if len(mask) != steps:
            raise ProfileError(f"[cache].mask has {len(mask)} entries but the loop has {steps} steps; give one "
                               "entry per step (1 = full UNet, 0 = reuse the cache)")
        if not mask[0]:
            raise ProfileError("[cache].mask must start with 1: the first step has no cached feature to reuse")
        return mask
    interval = schedule.get("interval")
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise ProfileError(f"[cache].interval must be an integer >= 1, got {interval!r}")
    uniform = [i % interval == 0 for i in range(steps)]
    if kind == "interval" or interval == 1:
        return uniform
    n_full = math.ceil(steps / interval)
    center = schedule.get("center")
    center = steps // 2 if center is None else center
    if not isinstance(center, int) or isinstance(center, bool) or not 0 <= center < steps:
        raise ProfileError(f"[cache].center must be a step index from 0 to {steps - 1}, got {center!r}")
    power = float(schedule.get("power", DEFAULT_POWER))
    indices = _power_center(steps, n_full, center, power)
    if indices is None:  # too few steps for the power law to place n_full distinct steps: uniform is the limit
        return uniform
    chosen = set(indices)
    return [i in chosen for i in range(steps)]


def schedule_summary(mask: Sequence[bool]) -> str:
    """``"F.F.F."``-style picture of a mask, for logs and ``diffc inspect``."""
    return "".join("F" if m else "." for m in mask)
