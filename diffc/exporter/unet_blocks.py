"""The cache branches of a diffusers UNet (DeepCache numbering), from its config alone (torch-free).

Build-time knowledge of UNet blocks, shared by the export contract (which marks every branch's feature as an
extra output), the cache-reuse split, TensorRT's shape ranges and ``diffc build --dry-run``.

Branch numbering is DeepCache's. The down path of a diffusers UNet produces skip features ``s_0`` (conv_in's
output), then one per down layer (each resnet [+ attention] pair, and each downsampler), in order; the up
layers concatenate them in reverse (the first up layer consumes ``s_{K-1}``, the last one ``s_0``). Branch
``m`` (``0 .. K-2``) caches the main-branch tensor that is concatenated with ``s_{m+1}``: a shallow step
recomputes conv_in, the down layers up to ``s_{m+1}``, and the up path from that concatenation on. Branch 0
is DeepCache's (block 0, layer 0), the cheapest shallow step (about 23 % of the MACs of a full SD 1.5 step);
larger branches recompute more and approximate less.
"""

from __future__ import annotations

from typing import Any, Mapping

from diffc.errors import ProfileError


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


def control_residuals(unet_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The residuals a ControlNet adds to this UNet (``down_block_additional_residuals`` in order, then
    ``mid_block_additional_residual``): one per skip feature ``s_0 .. s_{K-1}`` (conv_in's output, each down
    layer's, each downsampler's), then the mid block's output. Each: ``name`` (the graph tensor between the
    ControlNet and the UNet), ``channels``, ``level`` (``latent / 2**level`` in height and width)."""
    channels = [int(c) for c in unet_cfg["block_out_channels"]]
    n = len(channels)
    layers = _per_block(unet_cfg.get("layers_per_block", 2), n)
    down = [(channels[0], 0)]
    for i in range(n):
        down += [(channels[i], i)] * layers[i]
        if i < n - 1:
            down.append((channels[i], i + 1))
    out = [{"name": f"down_block_residual_{k}", "channels": c, "level": lv} for k, (c, lv) in enumerate(down)]
    return out + [{"name": "mid_block_residual", "channels": channels[-1], "level": n - 1}]
