"""Names and limits of the artifact contract, shared by the runtime, the engines and the profiles.

The runtime owns these (they are what an artifact and a run may say), and the profiles that steer a build check
against them. They live in this leaf module, which imports nothing from diffc, so that the runtime does not
import :mod:`diffc.profiles` (which imports the runtime's cache schedules): no import cycle between the two.
"""

from __future__ import annotations

import os
import re

#: ``[onnxruntime].memory_arena``: ``denoiser`` -- the UNet's sessions keep onnxruntime arenas of their own, the
#: text encoders and VAE decoder (once per image) give their activations back after each run; ``shared`` -- every
#: session draws from one process-wide arena, held at the largest component's peak
MEMORY_ARENAS = ("denoiser", "shared")
#: the largest guidance scale a profile, a manifest or a call may ask for: beyond a few tens every pixel saturates,
#: and past float32's range the guided prediction becomes inf / NaN (an all-black image)
GUIDANCE_MAX = 100.0
#: seeds are integers from 0 to 2**64 - 1, the C API's ``uint64_t``, so a seed means the same image from C and Python
SEED_MAX = 2**64 - 1


def max_threads() -> int:
    """The most intra-op threads a run may ask for here: 4 per logical CPU. onnxruntime starts every thread it is
    told to, with its own buffers, so an unchecked ``--threads 100000`` grows until the out-of-memory killer
    ends the process."""
    return 4 * (os.cpu_count() or 1)


def base_component(name: str) -> str:
    """The model component an engine is built from: cache reuse's ``unet_shallow`` and the per-step-group
    quantized variants ``unet_g1``, ``unet_g2``... are all the UNet; the dynamic step cache's ``<denoiser>_head`` /
    ``<denoiser>_tail`` are their denoiser."""
    head_tail = re.fullmatch(r"(unet|transformer)_(head|tail)", name)
    if head_tail:
        return head_tail.group(1)
    return "unet" if name == "unet_shallow" or re.fullmatch(r"unet_g[1-9][0-9]*", name) else name


def step_group_components(groups: int) -> list[str]:
    """The UNet engines of ``[quantize].step_groups`` = ``groups``: ``unet`` for the first group, then
    ``unet_g1``, ``unet_g2``..."""
    return ["unet", *(f"unet_g{g}" for g in range(1, groups))]
