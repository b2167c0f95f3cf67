"""ControlNet in the build: which components, what a profile may do with them, and the manifest's ``controlnets``.

Torch-free (``diffc build --dry-run`` plans a ControlNet build from the config files). The export itself is
:mod:`diffc.exporter.controlnet`; the runtime side, and the per-step recipe a native runner follows, are
:mod:`diffc.runtime.controlnet` and docs/manifest.md.

What a profile may not do with a ControlNet, and why (refused before any export):

* int8 / fp8 (``[precision].unet`` quantized): the UNet's calibration runs the sampling loop of the fp32 twin
  without a control image, so it would never see the residual inputs' ranges; a ControlNet itself is not among the
  quantizable components either. Use a float profile.
* cache reuse (``[cache].enabled``, DeepCache): a shallow step reuses the UNet's deep features from an earlier
  step, but the ControlNet residuals change every step and enter exactly the skip connections the shallow graph
  recomputes and the deep ones it skips; the shallow graph would need its own residual inputs. Refused; so is
  dynamic step caching (``[savings.step_cache]``), whose head / tail cut has the same problem. Adaptive guidance
  (a run-time saving) works: a cond-only step feeds the ControlNets the cond rows alone.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from diffc.errors import ProfileError
from diffc.exporter.unet_blocks import control_residuals
from diffc.profiles import Profile

#: the manifest's ``controlnets.version``: how a runner applies the entry (docs/manifest.md); a runner refuses a
#: version it does not know
CONTROLNET_VERSION = 1
#: the control image's graph input
CONTROL_INPUT = "controlnet_cond"
_NAME = re.compile(r"controlnet(_[1-9][0-9]*)?")


def names(components: Iterable[str]) -> list[str]:
    """The ControlNet components among ``components``, in ControlNet order (``controlnet``, ``controlnet_1``...)."""
    found = [c for c in components if _NAME.fullmatch(c)]
    return sorted(found, key=lambda c: 0 if c == "controlnet" else int(c.rsplit("_", 1)[1]))


def check_profile(profile: Profile, components: Iterable[str]) -> None:
    """Refuse what diffc does not build with ControlNets (see the module docstring) before any export."""
    if not names(components):
        return
    where = f"profile {profile.name!r}"
    if profile.cache.enabled:
        raise ProfileError(
            f"{where} reuses cached UNet features ([cache].enabled), which does not combine with ControlNet: the "
            "shallow UNet of a cached step would need the ControlNet residuals of that step; use a profile without "
            "[cache] (cpu, cpu-fp32, cpu-openvino)")
    savings = getattr(profile, "savings", None)
    if savings is not None and savings.step_cache:
        raise ProfileError(
            f"{where} builds dynamic step caching ([savings.step_cache]), which is not built with ControlNet yet: "
            "the head / tail cut of the UNet would have to route the ControlNet residuals to both halves; leave "
            "[savings.step_cache] out (adaptive guidance works with ControlNet)")
    quantized = profile.quantized_components()
    if quantized:
        raise ProfileError(
            f"{where} quantizes {sorted(quantized)} to {sorted({p.value for p in quantized.values()})}, which diffc "
            "does not build with ControlNet yet (calibration runs the loop without control images, so the UNet's "
            "residual inputs would go uncalibrated); use a float profile (cpu, cpu-fp32, cpu-openvino, rtx-fp16)")


def control_levels(unet_cfg: dict[str, Any]) -> int:
    """The deepest level (``latent / 2**level``) of a residual: the geometry's ``control_levels``, which makes the
    shape ranges cover every residual axis (:func:`diffc.build.plan.shape_ranges`)."""
    return max(r["level"] for r in control_residuals(unet_cfg))


def add_geometry(geometry: dict[str, Any], unet_cfg: dict[str, Any], components: Iterable[str]) -> dict[str, Any]:
    """``geometry`` with ``control_levels`` when the pipeline has ControlNets (the UNet's residual inputs then
    need shape ranges down to that level)."""
    if names(components):
        geometry["control_levels"] = control_levels(unet_cfg)
    return geometry


def manifest_entry(unet_cfg: dict[str, Any], components: Iterable[str]) -> dict[str, Any] | None:
    """The manifest's ``controlnets``: None for a pipeline without ControlNet."""
    nets = names(components)
    if not nets:
        return None
    residuals = control_residuals(unet_cfg)
    return {
        "version": CONTROLNET_VERSION,
        "components": nets,
        "residuals": [{"name": r["name"], "channels": r["channels"], "level": r["level"]} for r in residuals],
        # diffusers' control image processor: VaeImageProcessor(do_convert_rgb=True, do_normalize=False)
        "control_image": {"input": CONTROL_INPUT, "size": "output", "resize": "lanczos", "channels": "rgb",
                          "range": [0.0, 1.0], "normalize": False, "cfg": "duplicate"},
        "conditioning_scale": [1.0] * len(nets),
        "guidance_start": [0.0] * len(nets),
        "guidance_end": [1.0] * len(nets),
        "guess_mode": False,
    }
