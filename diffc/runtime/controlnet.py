"""ControlNet at run time: the control images checked and prepared, and each step's residuals for the UNet.

An artifact built from a ``StableDiffusionControlNetPipeline`` folder has a ``controlnets`` manifest entry
(:func:`diffc.build.controlnet.manifest_entry`, docs/manifest.md) and a UNet with one input per residual. What
diffusers' pipeline does, and so what :class:`ControlInput` does per step ``i`` of ``N``:

1. each control image, RGB in [0, 1] (diffusers' control image processor: ``do_normalize=False``), is resized to
   the output size (Lanczos; the same aspect-ratio rule as image-to-image: :mod:`diffc.runtime.img2img`);
   one image for every prompt or one per prompt; under classifier-free guidance the rows are duplicated for the
   uncond and the cond half (``torch.cat([image] * 2)``), as the latents are;
2. ControlNet ``k`` runs when ``guidance_start[k] <= i / N`` and ``(i + 1) / N <= guidance_end[k]`` (diffusers'
   ``controlnet_keep``) and its scale is not 0, on the UNet's own ``sample``, ``timestep`` and
   ``encoder_hidden_states`` (and SDXL's added conditions) plus its control image;
3. the UNet gets, per residual, ``sum_k scale[k] * residual_k`` over the ControlNets that ran (zeros when none
   did: a step outside every window runs the UNet as the plain model).

Without a control image the ControlNets are off for the whole call: the UNet gets zero residuals, which is the
base model's text-to-image (the build's quality gate runs this way). Image-to-image together with a control image
(``StableDiffusionControlNetImg2ImgPipeline``) is not supported yet and is refused.

numpy only: this ships in the torch-free runtime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffc.errors import InputError, ManifestError
from diffc.runtime import img2img

__all__ = ["CONTROLNET_VERSION", "ControlInput", "check_args", "check_manifest_entry", "off", "prepare"]

#: the ``controlnets.version`` this runtime applies
CONTROLNET_VERSION = 1
#: largest conditioning scale accepted (diffusers' typical range is 0 - 2)
MAX_SCALE = 100.0
_UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")


def check_manifest_entry(m: dict[str, Any]) -> None:
    """What the schema cannot say about ``controlnets``: a version this runtime applies, components that exist
    and record the tensors the loop feeds and reads, one scale / start / end per ControlNet."""
    entry = m["controlnets"]
    if entry["version"] > CONTROLNET_VERSION:
        raise ManifestError(f"controlnets.version {entry['version']} was written by a newer diffc (this runtime "
                            f"applies {CONTROLNET_VERSION}); upgrade diffc")
    comps = m["components"]
    nets = entry["components"]
    for key in ("conditioning_scale", "guidance_start", "guidance_end"):
        if len(entry[key]) != len(nets):
            raise ManifestError(f"controlnets.{key} has {len(entry[key])} values for {len(nets)} ControlNets")
    names = {r["name"] for r in entry["residuals"]}
    feeds = {entry["control_image"]["input"], *_UNET_INPUTS}
    for name in nets:
        if name not in comps:
            raise ManifestError(f"controlnets.components names {name!r}, which is not among the components "
                                f"{sorted(comps)}")
        have_in = {t["name"] for t in comps[name]["inputs"]}
        have_out = {t["name"] for t in comps[name]["outputs"]}
        if not feeds <= have_in or not names <= have_out:
            raise ManifestError(f"component {name!r} records inputs {sorted(have_in)} and outputs {sorted(have_out)}; "
                                f"the runtime feeds {sorted(feeds)} and reads {sorted(names)}")
    if m.get("denoiser") is not None or "unet" not in comps:
        raise ManifestError("controlnets is set but the denoiser is not a UNet; diffc builds ControlNets for UNet "
                            "pipelines only")
    unet_in = {t["name"] for t in comps["unet"]["inputs"]}
    if not names <= unet_in:
        raise ManifestError(f"the unet takes no ControlNet residual input(s) {sorted(names - unet_in)}")


def _scale_list(value: Any, n: int, label: str, lo: float, hi: float) -> list[float] | None:
    """None, one number for every ControlNet, or a list of ``n``."""
    if value is None:
        return None
    many = isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)
    items = list(value) if many else [value] * n
    if len(items) != n:
        raise InputError(f"{len(items)} values of {label} for {n} ControlNet(s); give one for all or one per "
                         "ControlNet")
    out = []
    for v in items:
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        if not ok or not math.isfinite(v) or not lo <= v <= hi:
            raise InputError(f"{label} must be a number from {lo:g} to {hi:g} (or a list, one per ControlNet), "
                             f"got {v!r}")
        out.append(float(v))
    return out


def check_args(control_images: Sequence[Any], scales: Sequence[float]) -> None:
    """What ``diffc run`` checks before the artifact loads: the control images can be read, the scales are in
    range and come with an image."""
    if scales and not control_images:
        raise InputError("--control-scale is given without --control-image; pass --control-image FILE (one per "
                         "ControlNet), or leave --control-scale out")
    for k, path in enumerate(control_images):
        img2img.load_image(path, "--control-image" if len(control_images) == 1 else f"--control-image #{k + 1}")
    if len(scales) > 1 and len(scales) != len(control_images):
        raise InputError(f"{len(scales)} --control-scale values for {len(control_images)} --control-image files; "
                         "give one scale for all or one per control image")
    _scale_list(list(scales), len(scales), "--control-scale", 0.0, MAX_SCALE)


@dataclass
class ControlInput:
    """A checked ControlNet request for one call: per ControlNet its images ((1 or B, 3, H, W) in [0, 1]; None
    when the call gives none), scale and guidance window."""

    components: list[str]
    inputs: dict[str, list[str]]  # ControlNet -> the graph inputs it takes
    residuals: list[dict[str, Any]]
    control_input: str
    batch: int
    images: list[np.ndarray] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    start: list[float] = field(default_factory=list)
    end: list[float] = field(default_factory=list)
    height: int | None = None
    width: int | None = None

    def step_scales(self, i: int, n: int) -> list[float]:
        """Each ControlNet's scale at step ``i`` of ``n``: 0 outside its window (diffusers' ``controlnet_keep``)."""
        if not self.images:
            return [0.0] * len(self.components)
        return [0.0 if (i / n < s or (i + 1) / n > e) else scale
                for scale, s, e in zip(self.scales, self.start, self.end)]

    def _rows(self, k: int, rows: int) -> np.ndarray:
        """ControlNet ``k``'s image for ``rows`` denoiser rows: one per prompt, twice under CFG (uncond, cond)."""
        img = self.images[k]
        if img.shape[0] != self.batch:
            img = np.repeat(img, self.batch, axis=0)
        return img if rows == self.batch else np.concatenate([img] * (rows // self.batch))

    def residual_feeds(self, sessions: dict[str, Any], feeds: dict[str, np.ndarray], i: int,
                       n: int) -> dict[str, np.ndarray]:
        """The UNet's residual inputs at step ``i`` of ``n``, for the UNet ``feeds`` of that step."""
        sample = feeds["sample"]
        rows, h, w = sample.shape[0], sample.shape[-2], sample.shape[-1]
        names = [r["name"] for r in self.residuals]
        total: dict[str, np.ndarray] | None = None
        for k, scale in enumerate(self.step_scales(i, n)):
            if scale == 0.0:
                continue  # outside its window (or off): its residuals would be multiplied by 0
            name = self.components[k]
            run_feeds = {x: feeds[x] for x in self.inputs[name] if x != self.control_input}
            run_feeds[self.control_input] = self._rows(k, rows)
            out = sessions[name].run(run_feeds, names)
            if total is None:
                total = {r: out[r] * np.float32(scale) for r in names}
            else:
                for r in names:
                    total[r] += out[r] * np.float32(scale)
        if total is None:
            total = {r["name"]: np.zeros((rows, r["channels"], h >> r["level"], w >> r["level"]), np.float32)
                     for r in self.residuals}
        return total


def off(pipe: Any, batch: int = 1) -> ControlInput | None:
    """The ControlNets of ``pipe``'s artifact switched off (zero residuals); None for an artifact without."""
    entry = pipe.manifest.get("controlnets")
    if entry is None:
        return None
    comps = pipe.manifest["components"]
    return ControlInput(components=list(entry["components"]),
                        inputs={c: [t["name"] for t in comps[c]["inputs"]] for c in entry["components"]},
                        residuals=list(entry["residuals"]), control_input=entry["control_image"]["input"], batch=batch)


def _per_net(control_image: Any, n: int) -> list[Any]:
    """The control image argument as one item per ControlNet (each an image, or a list with one per prompt)."""
    if n == 1:
        return [control_image]
    if not isinstance(control_image, (list, tuple)) or len(control_image) != n:
        got = len(control_image) if isinstance(control_image, (list, tuple)) else 1
        raise InputError(f"this artifact has {n} ControlNets, so control_image must be a list of {n} (one per "
                         f"ControlNet, in the order of the manifest's controlnets.components; diffc run: "
                         f"--control-image once per ControlNet); got {got}")
    return list(control_image)


def prepare(pipe: Any, control_image: Any, scale: Any, start: Any, end: Any, batch: int, height: int | None,
            width: int | None, *, image_to_image: bool = False) -> ControlInput | None:
    """Check a call's ControlNet arguments before any engine runs. None for an artifact without ControlNet (where
    any of them is an :class:`InputError`); else the :class:`ControlInput` of the call, whose ``height`` /
    ``width`` is the output size (the first control image's when the call asks for none)."""
    entry = pipe.manifest.get("controlnets")
    given = [a for a, v in (("control_image", control_image), ("controlnet_scale", scale),
                            ("control_guidance_start", start), ("control_guidance_end", end)) if v is not None]
    if entry is None:
        if given:
            raise InputError(f"this artifact has no ControlNet, so it takes no {given[0]}; build one from a "
                             "StableDiffusionControlNetPipeline folder, or generate without --control-image")
        return None
    control = off(pipe, batch)
    if control_image is None:
        if given:
            raise InputError(f"{given[0]} is given without control_image; pass control_image (diffc run "
                             "--control-image FILE), or leave it out")
        return control
    if image_to_image:
        raise InputError("image-to-image with a ControlNet (StableDiffusionControlNetImg2ImgPipeline) is not supported "
                         "yet; pass either image (--image) or control_image (--control-image)")
    n = len(control.components)
    control.scales = _scale_list(scale, n, "controlnet_scale", 0.0, MAX_SCALE) or list(entry["conditioning_scale"])
    control.start = _scale_list(start, n, "control_guidance_start", 0.0, 1.0) or list(entry["guidance_start"])
    control.end = _scale_list(end, n, "control_guidance_end", 0.0, 1.0) or list(entry["guidance_end"])
    for k, (s, e) in enumerate(zip(control.start, control.end)):
        if s >= e:
            raise InputError(f"control_guidance_start ({s:g}) must be below control_guidance_end ({e:g}) for "
                             f"ControlNet {k}")
    items = [img2img.image_batch(item, batch) for item in _per_net(control_image, n)]
    height, width = img2img.output_size(pipe, items[0][0], height, width)
    pipe.check_size(height, width)
    mult = pipe.image["multiple_of"]
    for k, images in enumerate(items):
        fitted = [img2img.fit_image(im, height, width, f"control image {k}" + (f"[{j}]" if len(images) > 1 else ""),
                                    mult) for j, im in enumerate(images)]
        control.images.append(np.ascontiguousarray(np.stack(fitted).transpose(0, 3, 1, 2), dtype=np.float32))
    control.height, control.width = height, width
    return control


def gate_image(height: int, width: int) -> np.ndarray:
    """A fixed control image, (height, width, 3) float32 in [0, 1]: white edges (a circle and a cross) on black, like
    the canny maps ControlNets are commonly fed. The build's quality gate runs a ControlNet artifact with it, so the
    ControlNets' reduced-precision error is gated with the rest."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cy, cx, r = (height - 1) / 2, (width - 1) / 2, min(height, width) / 3
    ring = np.abs(np.hypot(y - cy, x - cx) - r) < max(1.0, min(height, width) / 32)
    cross = (np.abs(y - cy) < 1.0) | (np.abs(x - cx) < 1.0)
    return np.repeat((ring | cross).astype(np.float32)[:, :, None], 3, axis=2)


def gate_inputs(pipe: Any) -> dict[str, Any]:
    """The extra call arguments of the quality gate for ``pipe``'s artifact: every ControlNet fed
    :func:`gate_image` at the default size; nothing for an artifact without ControlNet."""
    entry = pipe.manifest.get("controlnets")
    if entry is None:
        return {}
    image = gate_image(*pipe.default_size)
    n = len(entry["components"])
    return {"control_image": image if n == 1 else [image] * n}
