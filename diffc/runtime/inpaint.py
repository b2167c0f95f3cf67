"""Inpainting: redraw the white part of a mask, keep the rest of the image.

Two kinds, as diffusers' ``StableDiffusionInpaintPipeline`` / ``StableDiffusionXLInpaintPipeline`` (0.42) run
them, chosen by the artifact's UNet:

* **an inpainting UNet** (9 input channels; the manifest's ``inpaint`` entry): every step the UNet's ``sample``
  is the scaled latents, the mask at latent resolution and the masked image's latents, concatenated along the
  channels in that order (:meth:`Inpainting.unet_input`);
* **the latent blend** (any other UNet artifact with a ``vae_encoder``): after each step the region to keep is
  replaced by the image's latents noised to the next step's timestep with the call's initial noise, and by the
  clean image latents after the last step (:meth:`Inpainting.blend`; diffusers' legacy inpainting).

The inputs, as the pipeline prepares them:

1. the image as for image-to-image (:mod:`diffc.runtime.img2img`: resized with Lanczos to the output size, mapped
   to [-1, 1]);
2. the mask as diffusers' ``mask_processor`` (``VaeImageProcessor(do_normalize=False, do_binarize=True,
   do_convert_grayscale=True)``): a file, PIL image or uint8 array is resized in its own mode with Lanczos, then
   converted to grayscale (PIL ``"L"``), divided by 255 and binarized (``>= 0.5`` -> 1: repaint); a float array
   in [0, 1] is resized by nearest neighbour (``torch.nn.functional.interpolate``'s default) and binarized;
3. ``masked_image = image * (mask < 0.5)`` (the repainted region becomes 0, mid-grey), encoded by the
   ``vae_encoder`` as a seeded sample, scaled like the image latents; the mask goes to latent resolution by
   nearest neighbour (the pixel at ``floor(i * H / h)``);
4. strength: default 1.0 (the pipeline's; SDXL: 0.9999, StableDiffusionXLInpaintPipeline's). At 1.0 the loop
   starts from pure noise (``x * init_noise_sigma``, as text-to-image) and the image enters only through the
   mask inputs / the blend; below it, as image-to-image.

Called without an image, an inpainting artifact draws a new image: the mask is all ones and the masked image all
zeros, which is diffusers' pipeline with a white mask at strength 1 (the image is then unused) -- so the build's
calibration and quality gate run the artifact as they run any other.

Random streams: the initial noise from ``seed`` (``latents=``), the image's encoder sample from ``seed + 2``
(``encoder_noise=``), the masked image's from ``seed + 3`` (``masked_image_noise=``), one stream per row with
per-row seeds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from diffc.errors import InputError
from diffc.runtime import img2img

__all__ = ["DEFAULT_STRENGTH", "MASKED_IMAGE_SEED_OFFSET", "SAMPLE_LAYOUT", "Inpainting", "InpaintInput",
           "check_mask_args", "is_inpainting", "load_mask", "manifest_entry", "prepare"]

#: ``strength`` when a mask is given without one: StableDiffusionInpaintPipeline's default
DEFAULT_STRENGTH = 1.0
#: StableDiffusionXLInpaintPipeline's default (just below 1: the image is encoded and the first step skipped)
SDXL_DEFAULT_STRENGTH = 0.9999
#: offset of the masked image's encoder-sample stream from the call's seed (seed + 2: the image's)
MASKED_IMAGE_SEED_OFFSET = 3
#: an inpainting UNet's ``sample``, in channel order
SAMPLE_LAYOUT = ("latents", "mask", "masked_image_latents")
#: the mask value from which a pixel is repainted (VaeImageProcessor.binarize)
THRESHOLD = 0.5


def manifest_entry(unet_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's ``inpaint`` entry for a UNet config: the sample layout of an inpainting UNet (input channels
    = 2 x output + 1), None for a UNet that takes latents alone."""
    out_ch = int(unet_cfg.get("out_channels") or 4)
    if int(unet_cfg.get("in_channels") or 4) != 2 * out_ch + 1:
        return None
    return {"sample": [{"name": "latents", "channels": out_ch}, {"name": "mask", "channels": 1},
                       {"name": "masked_image_latents", "channels": out_ch}]}


def is_inpainting(manifest: dict[str, Any]) -> bool:
    """Whether the artifact's UNet takes the mask inputs (and so needs them on every call)."""
    return bool(manifest.get("inpaint"))


# ------------------------------------------------------------------------------------------------ the mask


@dataclass(frozen=True)
class _Mask:
    """A mask as given: a PIL image (resized in its own mode, then greyscale) or a float array in [0, 1]."""

    pil: Image.Image | None
    array: np.ndarray | None  # float32 (H, W)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)"""
        return (self.pil.height, self.pil.width) if self.pil is not None else self.array.shape

    def binary(self, height: int, width: int) -> np.ndarray:
        """float32 (height, width): 1 where the image is repainted, 0 where it is kept."""
        if self.pil is not None:
            im = self.pil
            if im.size != (width, height):
                im = im.resize((width, height), resample=Image.Resampling.LANCZOS)
            a = np.asarray(im.convert("L"), dtype=np.float32) / np.float32(255.0)
        else:
            a = _nearest(self.array, height, width)
        return (a >= THRESHOLD).astype(np.float32)


def _nearest(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """``torch.nn.functional.interpolate(mode="nearest")`` on the last two axes: source index
    ``floor(i * in / out)``."""
    rows = np.minimum((np.arange(height) * (a.shape[-2] / height)).astype(np.int64), a.shape[-2] - 1)
    cols = np.minimum((np.arange(width) * (a.shape[-1] / width)).astype(np.int64), a.shape[-1] - 1)
    return a[..., rows[:, None], cols[None, :]]


def load_mask(mask: Any, where: str = "mask_image") -> _Mask:
    """A path, a PIL image or a numpy array -> a mask; :class:`InputError` if it cannot be one.

    Arrays: ``(H, W)`` / ``(H, W, 1)`` / ``(H, W, 3)``, uint8 (taken as an image) or float in [0, 1]."""
    if isinstance(mask, (str, os.PathLike)):
        return _Mask(img2img.open_image_file(mask, where, "mask (white: repaint, black: keep)"), None)
    if isinstance(mask, Image.Image):
        return _Mask(mask, None)
    if isinstance(mask, np.ndarray):
        a = mask[:, :, 0] if mask.ndim == 3 and mask.shape[2] == 1 else mask
        ok_shape = (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) and a.shape[0] >= 1 and a.shape[1] >= 1
        if not ok_shape:
            raise InputError(f"{where} must be a mask array of shape (height, width) (or (height, width, 3)), got "
                             f"shape {mask.shape}")
        if a.dtype == np.uint8:
            return _Mask(Image.fromarray(np.ascontiguousarray(a)), None)
        if not np.issubdtype(a.dtype, np.floating):
            raise InputError(f"{where} has dtype {a.dtype}; pass uint8 pixels or floats in [0, 1]")
        if a.ndim == 3:
            raise InputError(f"{where} is a float array of shape {mask.shape}; pass a float mask of shape (height, "
                             "width), or uint8 pixels")
        a = a.astype(np.float32)
        if not np.isfinite(a).all() or float(a.min()) < 0.0 or float(a.max()) > 1.0:
            raise InputError(f"{where} holds values outside [0, 1] (or NaN); float masks are in [0, 1] (1: repaint)")
        return _Mask(None, a)
    raise InputError(f"{where} must be a mask file's path, a PIL image or a numpy array (height, width), got "
                     f"{type(mask).__name__}")


def _masks(mask: Any, batch: int) -> list[_Mask]:
    """One mask for every prompt, or one per prompt (a list: an array is always one mask)."""
    if isinstance(mask, Sequence) and not isinstance(mask, (str, bytes, bytearray)):
        items: list[Any] = list(mask)
    else:
        return [load_mask(mask)]
    if len(items) not in (1, batch):
        raise InputError(f"{len(items)} masks for {batch} prompts; give one mask for all or one per prompt")
    return [load_mask(m, f"mask_image[{k}]") for k, m in enumerate(items)]


def _check_sizes(masks: list[_Mask], sizes: Sequence[tuple[int, int]], flag: str = "mask_image") -> None:
    """Each mask has the size of the image it goes with (one mask for several images: each of them)."""
    for k, size in enumerate(sizes):
        m = masks[k if len(masks) > 1 else 0]
        if tuple(m.size) != tuple(size):
            (mh, mw), (ih, iw) = m.size, size
            which = flag if len(masks) == 1 else f"{flag}[{k}]"
            raise InputError(f"{which} is {mw}x{mh} (width x height) but its image is {iw}x{ih}; a mask must have "
                             "its image's size (white: repaint, black: keep): resize the mask to the image")


def check_mask_args(image: Any, mask: Any) -> None:
    """What ``diffc run`` checks before the artifact loads: an image to go with ``--mask``, a mask that can be
    read, of the image's size."""
    if image is None:
        raise InputError("--mask is given without --image; pass --image FILE (the picture to inpaint) with it, or "
                         "leave --mask out")
    m = load_mask(mask, "--mask")
    _check_sizes([m], [img2img.load_image(image, "--image").shape[:2]], "--mask")


# ------------------------------------------------------------------------------------------------ the call


@dataclass
class Inpainting:
    """What the loop does per step for one inpainting call (:meth:`~diffc.runtime.pipeline.Pipeline.denoise`)."""

    mask: np.ndarray  # float32 (1 or B, 1, h, w): 1 = repaint
    #: inpainting UNet: the masked image's latents (B, C, h, w), concatenated to every step's sample
    masked_latents: np.ndarray | None = None
    #: latent blend: the image's clean latents (B, C, h, w), the initial noise (B, C, h, w), the tables
    image_latents: np.ndarray | None = None
    noise: np.ndarray | None = None
    tables: Any = None

    def unet_input(self, model_in: np.ndarray) -> np.ndarray:
        """The UNet's sample: the scaled latents (B rows, before a CFG batch doubles them), the mask and the masked
        image's latents; the latents alone for the blend."""
        if self.masked_latents is None:
            return model_in
        b = model_in.shape[0]
        mask = np.broadcast_to(self.mask, (b, *self.mask.shape[1:]))
        return np.concatenate([model_in, mask, self.masked_latents], axis=1).astype(np.float32)

    def blend(self, i: int, x: np.ndarray) -> np.ndarray:
        """After step ``i``: the kept region replaced by the image latents noised to step ``i + 1`` (after the last
        step: the clean latents). The identity with an inpainting UNet."""
        if self.image_latents is None:
            return x
        if i + 1 < self.tables.num_steps:
            known = self.tables.add_noise(i + 1, self.image_latents, self.noise)
        else:
            known = self.image_latents
        return ((1 - self.mask) * known + self.mask * x).astype(np.float32)


@dataclass
class InpaintInput:
    """A checked inpainting request (or an inpainting artifact's call without one: ``image`` None)."""

    image: img2img.ImageInput | None
    mask: np.ndarray  # float32 (1 or B, 1, H, W) at the output size, binary
    unet: bool  # the UNet takes the mask inputs (else: the latent blend)
    masked_image_noise: np.ndarray | None = None

    @property
    def height(self) -> int:
        return self.mask.shape[-2]

    @property
    def width(self) -> int:
        return self.mask.shape[-1]

    def start(self, pipe: Any, noise: np.ndarray, seed: Any, per_row_seed: bool
              ) -> tuple[np.ndarray, int | None, Inpainting]:
        """(the loop's initial state, its start step -- None: from step 0 scaled by ``init_noise_sigma`` --, the
        per-step inputs) for standard-normal ``noise`` (B, C, h, w)."""
        shape = noise.shape
        h, w = shape[-2:]
        tables = pipe.tables_for(h, w)
        init = self.image
        strength_max = init is None or init.strength == 1.0
        x0 = None
        if init is not None and (not self.unet or not strength_max):
            eps = init.encoder_noise if init.encoder_noise is not None else \
                img2img.draw_encoder_noise(seed, per_row_seed, shape)
            x0 = img2img.encode(pipe, init.pixels, eps, shape)
        # StableDiffusionInpaintPipeline.prepare_latents: strength 1 starts from pure noise, not add_noise(x0)
        latents, start = (noise, None) if strength_max else \
            (np.asarray(tables.add_noise(init.start, x0, noise.astype(np.float32)), np.float32), init.start)
        mask = _nearest(self.mask, h, w)  # prepare_mask_latents: interpolate to the latent size
        if not self.unet:
            return latents, start, Inpainting(mask=mask, image_latents=x0, noise=noise.astype(np.float32),
                                              tables=tables)
        pixels = init.pixels if init is not None else np.zeros((1, 3, *self.mask.shape[-2:]), np.float32)
        masked = (pixels * (self.mask < THRESHOLD)).astype(np.float32)
        eps = self.masked_image_noise if self.masked_image_noise is not None else \
            img2img.draw_encoder_noise(seed, per_row_seed, shape, MASKED_IMAGE_SEED_OFFSET)
        return latents, start, Inpainting(mask=mask, masked_latents=img2img.encode(pipe, masked, eps, shape))


def _check_artifact(pipe: Any) -> None:
    """The artifact can inpaint: a UNet (the transformer families' inpainting pipelines are not built) and a
    ``vae_encoder``."""
    denoiser = pipe.manifest.get("denoiser")
    if denoiser:
        raise InputError(f"this artifact's denoiser is a {denoiser.get('family', 'transformer')} transformer, which "
                         "diffc does not inpaint with; inpaint with a Stable Diffusion artifact (built from "
                         "StableDiffusionInpaintPipeline, or any SD 1.x / 2.x / SDXL artifact by the latent blend), "
                         "or leave the mask out")
    try:
        img2img.check_encoder(pipe.manifest)
    except InputError:
        raise InputError(f"this artifact has no {img2img.ENCODER} component, so it cannot inpaint (the image and the "
                         "masked image are encoded); rebuild it with this diffc from a pipeline folder whose vae has "
                         "an encoder, or leave the mask out") from None


def prepare(pipe: Any, image: Any, mask: Any, strength: Any, batch: int, height: int | None, width: int | None,
            encoder_noise: np.ndarray | None = None, masked_image_noise: np.ndarray | None = None
            ) -> InpaintInput:
    """Check an inpainting request before any engine runs: an artifact that can inpaint, an image with the mask
    (an inpainting artifact also takes an image alone -- a white mask -- or neither -- text-to-image), masks of
    their images' size, and the image-to-image checks (:func:`diffc.runtime.img2img.prepare`)."""
    unet = is_inpainting(pipe.manifest)
    if mask is not None and image is None:
        raise InputError("mask_image is given without an image; pass image= (diffc run --image FILE) with the mask "
                         "(white: repaint, black: keep), or leave the mask out")
    if mask is not None or unet:
        _check_artifact(pipe)
    masks = _masks(mask, batch) if mask is not None else None
    init = None
    if image is not None:
        if strength is None:  # the diffusers pipeline's default: SDXL artifacts take the added time conditions
            sdxl = "text_embeds" in (pipe.manifest.get("added_conditions") or {})
            strength = SDXL_DEFAULT_STRENGTH if sdxl else DEFAULT_STRENGTH
        init = img2img.prepare(pipe, image, strength, batch, height, width, encoder_noise)
        height, width = init.height, init.width
    elif strength is not None:
        raise InputError("strength is given without an image; pass image= (diffc run --image FILE) for "
                         "image-to-image or inpainting, or leave strength out")
    else:
        height = pipe.default_size[0] if height is None else height
        width = pipe.default_size[1] if width is None else width
        pipe.check_size(height, width)
    if masks is not None:
        _check_sizes(masks, init.sizes)
        binary = np.stack([m.binary(height, width) for m in masks])[:, None]
    else:
        binary = np.ones((1, 1, height, width), np.float32)  # a white mask: everything is drawn anew
    f = pipe.latent["vae_scale_factor"]
    shape = (batch, pipe.latent["channels"], height // f, width // f)
    if masked_image_noise is not None and (not isinstance(masked_image_noise, np.ndarray)
                                           or masked_image_noise.shape != shape
                                           or not np.isfinite(masked_image_noise).all()):
        raise InputError(f"masked_image_noise must be a finite numpy array of shape {shape}, "
                         f"got {getattr(masked_image_noise, 'shape', type(masked_image_noise).__name__)}")
    if masked_image_noise is not None and not unet:
        raise InputError("masked_image_noise is given, but this artifact inpaints by the latent blend (its UNet takes "
                         "no masked image); leave masked_image_noise out")
    return InpaintInput(image=init, mask=np.ascontiguousarray(binary, dtype=np.float32), unet=unet,
                        masked_image_noise=masked_image_noise)
