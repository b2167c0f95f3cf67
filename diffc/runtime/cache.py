"""Feature-cache reuse (DeepCache) as data: which UNet tensor is cached, and on which steps it is recomputed.

Two pure, torch-free functions the builder, ``--dry-run`` and the runtime share:

* :func:`unet_branches` reads a ``UNet2DConditionModel`` config and lists the cache branches it has, with the
  cached feature's channels and resolution level (the TensorRT shape ranges and the export marks use them).
* :func:`full_steps` turns a cache schedule into a per-step mask (``True``: run the full UNet and refresh the
  cache; ``False``: run the shallow UNet on the cached feature). The builder writes the mask into the
  manifest, so a runner follows it without knowing any schedule.

Branch numbering is DeepCache's. The down path of a diffusers UNet produces skip features ``s_0`` (conv_in's
output), then one per down layer (each resnet [+ attention] pair, and each downsampler), in order; the up
layers concatenate them in reverse (the first up layer consumes ``s_{K-1}``, the last one ``s_0``). Branch
``m`` (``0 .. K-2``) caches the main-branch tensor that is concatenated with ``s_{m+1}``: a shallow step
recomputes conv_in, the down layers up to ``s_{m+1}``, and the up path from that concatenation on. Branch 0
is DeepCache's (block 0, layer 0), the cheapest shallow step (about 23 % of the MACs of a full SD 1.5 step);
larger branches recompute more and approximate less.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from diffc.errors import ProfileError

SCHEDULE_KINDS = ("interval", "nonuniform", "mask")
#: DeepCache's non-uniform schedule: starting exponent of the power law (the paper's experiments use 1.2-1.5)
DEFAULT_POWER = 1.4


def feature_name(branch: int) -> str:
    return f"cache_feature_{branch}"


def feature_dims(level: int) -> tuple[str, str]:
    """Symbolic names of a level-``level`` feature's spatial axes (level 0 is the latent's own size)."""
    if level == 0:
        return "height", "width"
    return f"height_div{2 ** level}", f"width_div{2 ** level}"


def _per_block(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n


def unet_branches(unet_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The cache branches of a UNet2DConditionModel config, ordered by branch index.

    Each: ``branch``, ``feature`` (graph name), ``up_block`` / ``layer`` (the up layer whose concatenation it
    feeds), ``skip`` (the skip feature it is concatenated with, ``branch + 1``), ``level`` (the feature is
    ``latent / 2**level`` in height and width), ``channels``.
    """
    channels = [int(c) for c in unet_cfg["block_out_channels"]]
    n = len(channels)
    layers = _per_block(unet_cfg.get("layers_per_block", 2), n)
    # conv_in, then per down block its layers and (all but the last block) a downsampler
    skips = 1 + sum(layers[i] + (1 if i < n - 1 else 0) for i in range(n))
    rev_channels, rev_layers = channels[::-1], layers[::-1]
    branches = []
    u = 0  # up layer index over all up blocks
    for i in range(n):
        for j in range(rev_layers[i] + 1):
            skip = skips - 1 - u
            u += 1
            if skip == 0:
                continue  # the last up layer: caching its input would leave nothing to reuse
            if j == 0:
                c = channels[-1] if i == 0 else rev_channels[i - 1]
            else:
                c = rev_channels[i]
            branches.append({"branch": skip - 1, "feature": feature_name(skip - 1), "up_block": i, "layer": j,
                             "skip": skip, "level": n - 1 - i, "channels": c})
    return sorted(branches, key=lambda b: b["branch"])


def branch_info(unet_cfg: Mapping[str, Any], branch: int, *, where: str = "[cache].branch") -> dict[str, Any]:
    """:func:`unet_branches`'s entry for ``branch``; a typed error naming the valid range otherwise."""
    branches = unet_branches(unet_cfg)
    if not isinstance(branch, int) or isinstance(branch, bool) or not 0 <= branch < len(branches):
        raise ProfileError(f"{where} = {branch!r} does not exist in this UNet: it has branches 0 to "
                           f"{len(branches) - 1} (0 is the shallowest and fastest); pick one in that range")
    return branches[branch]


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
