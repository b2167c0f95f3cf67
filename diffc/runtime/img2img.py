"""Image-to-image: an input image, encoded by the artifact's ``vae_encoder``, noised to the strength's start step.

Any artifact whose manifest has a ``vae_encoder`` component does it; nothing here knows the model family. What
diffusers' ``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionXLImg2ImgPipeline`` do, and so what this does:

1. the image, RGB in [0, 1], is resized to the requested size (Lanczos, as diffusers' ``VaeImageProcessor``)
   and mapped to [-1, 1];
2. the VAE encoder gives the latent distribution's ``mean`` and ``std``; the latents are a seeded sample
   ``mean + std * eps`` (``retrieve_latents``' default ``sample_mode="sample"``), then
   ``x0 = (sample - shift_factor) * scaling_factor`` (the manifest's ``latent``);
3. the sampler tables, compiled for ``num_steps``, are entered at ``start = tables.start_step(strength)``
   (the UNet families' pipelines: ``num_steps - min(int(num_steps * strength), num_steps)``; the flow-matching
   ones round the start instead, :attr:`~diffc.runtime.sampler.SamplerTables.strength_rule`; a strength that
   leaves no step is refused), and the loop starts from
   ``x = tables.add_noise(start, x0, noise)``: the sampler's own forward-noising rule at that step, in the
   space its update works in;
4. steps ``start .. num_steps - 1`` run as in text-to-image.

Resizing rule: an image whose aspect ratio is within 1% of the requested size's is resized to it; any other is
refused (an :class:`InputError` that suggests a size of the image's aspect ratio) rather than stretched or
cropped behind the caller's back. Without a requested size, the image's own size is used when the artifact
covers it, else the artifact's default size.

Random streams: ``noise`` is the standard-normal draw a text-to-image call with the same seed starts from (the
pipeline's ``latents``); ``eps`` comes from ``seed + 2`` (``seed + 1`` is the injected-noise stream of LCM),
one stream per row with per-row seeds. ``latents=`` and ``encoder_noise=`` replace them, so a test can feed
diffusers' torch draws.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffc.errors import InputError, ManifestError

__all__ = ["ENCODER", "DEFAULT_STRENGTH", "ImageInput", "check_encoder", "check_image_args", "check_strength",
           "check_strength_value", "fit_image", "image_batch", "load_image", "output_size", "prepare"]

#: the component that turns an image into latents
ENCODER = "vae_encoder"
#: ``strength`` when an image is given without one: diffusers' StableDiffusionImg2ImgPipeline default
DEFAULT_STRENGTH = 0.8
#: relative aspect-ratio difference up to which an image is resized to the requested size instead of refused
ASPECT_TOLERANCE = 0.01
#: offset of the encoder-sample stream from the call's seed (seed + 1: LCM's injected noise)
ENCODER_SEED_OFFSET = 2
_ENCODER_IO = ({"sample"}, {"latent_mean", "latent_std"})


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def check_strength_value(strength: Any, label: str = "strength") -> float:
    """A number in (0, 1]: how much of the image is redrawn."""
    if not _is_number(strength) or not math.isfinite(strength) or not 0.0 < strength <= 1.0:
        raise InputError(f"{label} must be a number in (0, 1] (how much of the image is redrawn: 1 = all of it), "
                         f"got {strength!r}")
    return float(strength)


def check_image_args(image: Any, strength: Any) -> None:
    """What ``diffc run`` checks before the artifact loads: an image to go with ``--strength``, one that can be
    read, and a strength in (0, 1]."""
    if image is None:
        raise InputError("--strength is given without --image; pass --image FILE for image-to-image, or leave "
                         "--strength out")
    load_image(image, "--image")
    if strength is not None:
        check_strength_value(strength, "--strength")


def check_strength(strength: Any, tables: Any) -> tuple[float, int]:
    """``strength`` in (0, 1] -> (strength, the step of ``tables`` image-to-image starts at). A strength so small
    that no step would run (diffusers: ``int(num_steps * strength) == 0``) is refused too."""
    strength = check_strength_value(strength)
    return strength, int(tables.start_step(strength))  # InputError when no step is left to run


def _from_array(a: np.ndarray, where: str) -> np.ndarray:
    """An (H, W, 3) / (H, W, 4) / (H, W) array, uint8 or float in [0, 1] -> float32 (H, W, 3) in [0, 1]."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"{where} must be an image array of shape (height, width, 3) (or (height, width) grey, "
                         f"(height, width, 4) RGBA), got shape {a.shape}")
    if a.dtype == np.uint8:
        out = a.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(a.dtype, np.floating):
        out = a.astype(np.float32)
        if not np.isfinite(out).all():
            raise InputError(f"{where} holds NaN or infinite values; pass pixel values in [0, 1]")
        lo, hi = float(out.min()), float(out.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(f"{where} holds values from {lo:g} to {hi:g}; float images must be in [0, 1] "
                             "(divide uint8 pixels by 255, or pass the uint8 array itself)")
    else:
        raise InputError(f"{where} has dtype {a.dtype}; pass uint8 pixels or floats in [0, 1]")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out[:, :, :3])  # RGBA: the colour, as PIL's convert("RGB") keeps it


def open_image_file(value: str | os.PathLike, where: str, what: str = "image") -> Image.Image:
    """The image file at ``value``, fully read (a PIL image); an :class:`InputError` naming ``where`` and saying to
    pass a PNG, JPEG or WebP ``what`` (e.g. ``"mask (white: repaint, black: keep)"``) if it cannot be one."""
    path = Path(value)
    if "\0" in str(path):
        raise InputError(f"{where} path {str(path)!r} holds a NUL byte; pass an image file's path")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise InputError(f"{where} {path} does not exist; pass the path of a PNG, JPEG or WebP {what}") from None
    except IsADirectoryError:
        raise InputError(f"{where} {path} is a folder; pass the path of a PNG, JPEG or WebP {what}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read {where} {path} as an image ({e}); pass a PNG, JPEG or WebP {what}") from None


def load_image(image: Any, where: str = "image") -> np.ndarray:
    """A path, a PIL image or a numpy array -> float32 ``(H, W, 3)`` RGB in [0, 1]; InputError if unreadable."""
    if isinstance(image, (str, os.PathLike)):
        return _from_array(np.asarray(open_image_file(image, where).convert("RGB")), f"{where} {image}")
    if isinstance(image, Image.Image):
        return _from_array(np.asarray(image.convert("RGB")), where)
    if isinstance(image, np.ndarray):
        return _from_array(image, where)
    raise InputError(f"{where} must be an image file's path, a PIL image or a numpy array (height, width, 3), "
                     f"got {type(image).__name__}")


def image_batch(image: Any, batch: int) -> list[np.ndarray]:
    """``image`` as loaded images (:func:`load_image`) for ``batch`` prompts: one image for every prompt, or one
    per prompt (a list, or a (B, H, W, 3) array); any other count is refused. Public because every image input
    of a call (the init image here, ControlNet's condition images) takes the same forms."""
    if isinstance(image, np.ndarray) and image.ndim == 4:
        items: list[Any] = list(image)
    elif isinstance(image, Sequence) and not isinstance(image, (str, bytes, bytearray)):
        items = list(image)
    else:
        return [load_image(image)]
    if len(items) not in (1, batch):
        raise InputError(f"{len(items)} images for {batch} prompts; give one image for all or one per prompt")
    return [load_image(im, f"image[{k}]") for k, im in enumerate(items)]


def _covered(pipe: Any, h: int, w: int) -> bool:
    img = pipe.image
    return all(lo <= v <= hi and v % img["multiple_of"] == 0
               for v, (lo, _, hi) in ((h, img["height"]), (w, img["width"])))


def output_size(pipe: Any, image: np.ndarray, height: int | None, width: int | None) -> tuple[int, int]:
    """The output size for a call given ``image``: as asked, the other side following the image's aspect ratio,
    or the image's own when the artifact covers it (else the artifact's default). Shared with ControlNet, whose
    condition image sets the size the same way an init image does."""
    ih, iw = image.shape[:2]
    mult = pipe.image["multiple_of"]
    if height is None and width is None:
        return (ih, iw) if _covered(pipe, ih, iw) else pipe.default_size
    if height is None:
        height = max(mult, round(width * ih / iw / mult) * mult)
    if width is None:
        width = max(mult, round(height * iw / ih / mult) * mult)
    return height, width


def fit_image(image: np.ndarray, height: int, width: int, where: str, mult: int) -> np.ndarray:
    """``image`` resized to (height, width) with Lanczos when the aspect ratio agrees (within
    :data:`ASPECT_TOLERANCE`); refused otherwise, naming ``where`` and a size of the image's ratio (a multiple of
    ``mult``). Every image a call takes (init image, ControlNet condition, stream frame) goes through it, so they
    are resized alike and never stretched or cropped."""
    ih, iw = image.shape[:2]
    if (ih, iw) == (height, width):
        return image
    want, have = height / width, ih / iw
    if abs(have - want) > ASPECT_TOLERANCE * want:
        suggest = max(mult, round(height * iw / ih / mult) * mult)
        raise InputError(f"{where} is {iw}x{ih} (width x height), another aspect ratio than the requested "
                         f"{width}x{height}; diffc resizes only images of the requested aspect ratio (within 1%) and "
                         f"never stretches or crops: crop or pad the image, or ask for a size of its aspect ratio "
                         f"(e.g. width {suggest} at height {height})")
    # Pillow's Lanczos, per channel in float ("F" mode), as diffusers' VaeImageProcessor resizes PIL images
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c]), mode="F")
                           .resize((width, height), resample=Image.Resampling.LANCZOS)) for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)


def check_encoder(manifest: dict[str, Any]) -> None:
    """The artifact can do image-to-image: it has a ``vae_encoder`` recording the tensors used here."""
    comp = manifest["components"].get(ENCODER)
    family = (manifest.get("denoiser") or {}).get("family")
    if comp is None and family is not None:
        # a rebuild would not help: diffc builds the transformer families text-to-image only
        raise InputError(f"this {family} artifact is text-to-image: diffc does not build input-image modes of the "
                         "transformer families (image-to-image, FLUX.2's reference-image editing through "
                         "Flux2Pipeline's image=); generate without image / --image")
    if comp is None:
        raise InputError(f"this artifact has no {ENCODER} component, so it cannot take an input image; rebuild it "
                         "with this diffc from a pipeline folder whose vae has an encoder (every Stable Diffusion "
                         "folder does), or generate without image / --image")
    have_in = {t["name"] for t in comp["inputs"]}
    have_out = {t["name"] for t in comp["outputs"]}
    if not _ENCODER_IO[0] <= have_in or not _ENCODER_IO[1] <= have_out:
        raise ManifestError(f"component {ENCODER!r} records inputs {sorted(have_in)} and outputs {sorted(have_out)}; "
                            f"image-to-image feeds {sorted(_ENCODER_IO[0])} and reads {sorted(_ENCODER_IO[1])}: "
                            "rebuild the artifact with this diffc")


@dataclass
class ImageInput:
    """A checked image-to-image request: the images at the output size, the strength and its start step."""

    pixels: np.ndarray  # float32 (1 or B, 3, H, W) in [-1, 1]
    height: int
    width: int
    strength: float
    start: int
    encoder_noise: np.ndarray | None = None  # (B, C, h, w); None: drawn from the seed
    #: each input image's own (height, width), before it was fitted (inpainting: its mask must have that size)
    sizes: tuple[tuple[int, int], ...] = ()

    def start_latents(self, pipe: Any, noise: np.ndarray, seed: Any, per_row_seed: bool) -> np.ndarray:
        """The loop's state at step :attr:`start`: the encoded image, noised by the sampler's rule with the
        standard-normal ``noise`` (B, C, h, w)."""
        shape = noise.shape
        encoder_noise = self.encoder_noise
        if encoder_noise is None:
            encoder_noise = draw_encoder_noise(seed, per_row_seed, shape)
        x0 = encode(pipe, self.pixels, encoder_noise, shape)
        tables = pipe.tables_for(*shape[-2:])  # FLUX's tables depend on the size; the others are the built ones
        return np.asarray(tables.add_noise(self.start, x0.astype(np.float32), noise.astype(np.float32)),
                          dtype=np.float32)


def encode(pipe: Any, pixels: np.ndarray, eps: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Pixels (1 or B, 3, H, W) in [-1, 1] -> the loop's clean latents ``x0`` (B, C, h, w): the encoder's seeded
    sample ``mean + std * eps`` (one encoded image broadcast over the rows), shifted and scaled."""
    out = pipe.sessions[ENCODER].run({"sample": pixels}, ["latent_mean", "latent_std"])
    mean, std = out["latent_mean"], out["latent_std"]
    if mean.shape[1:] != shape[1:] or std.shape != mean.shape:
        raise ManifestError(f"the {ENCODER} gives latents of shape {mean.shape}, the loop needs {shape}; "
                            "rebuild the artifact")
    lat = pipe.latent
    sample = mean + std * eps.astype(np.float32)
    x0 = (sample - np.float32(lat.get("shift_factor", 0.0))) * np.float32(lat["scaling_factor"])
    return np.ascontiguousarray(np.broadcast_to(x0, shape), dtype=np.float32)


def draw_encoder_noise(seed: Any, per_row_seed: bool, shape: tuple[int, ...], offset: int = ENCODER_SEED_OFFSET
                       ) -> np.ndarray:
    """The standard-normal draw of an encoder sample: from ``seed + offset``, or one stream per row."""
    if per_row_seed:
        return np.concatenate([np.random.default_rng(None if s is None else s + offset)
                               .standard_normal((1, *shape[1:]), dtype=np.float32) for s in seed])
    rng = np.random.default_rng(None if seed is None else seed + offset)
    return rng.standard_normal(shape, dtype=np.float32)


def prepare(pipe: Any, image: Any, strength: Any, batch: int, height: int | None, width: int | None,
            encoder_noise: np.ndarray | None = None) -> ImageInput:
    """Check an image-to-image request before any engine runs: the artifact has an encoder, the strength leaves
    a step to run, the images load and fit the output size (which the artifact must cover), ``encoder_noise``
    (if given) has the latents' shape."""
    if image is None:
        raise InputError("strength is given without an image; pass image= (diffc run --image FILE) for "
                         "image-to-image, or leave strength out")
    check_encoder(pipe.manifest)
    if not pipe.tables.has_add_noise:
        raise ManifestError("this artifact's sampler tables carry no add-noise coefficients (noise_signal, "
                            "noise_scale), which image-to-image enters the loop with; rebuild the artifact with this "
                            "diffc")
    strength, start = check_strength(DEFAULT_STRENGTH if strength is None else strength, pipe.tables)
    images = image_batch(image, batch)
    height, width = output_size(pipe, images[0], height, width)
    pipe.check_size(height, width)
    mult = pipe.image["multiple_of"]
    fitted = [fit_image(im, height, width, "image" if len(images) == 1 else f"image[{k}]", mult)
              for k, im in enumerate(images)]
    pixels = np.stack(fitted).transpose(0, 3, 1, 2) * np.float32(2.0) - np.float32(1.0)
    f = pipe.latent["vae_scale_factor"]
    shape = (batch, pipe.latent["channels"], height // f, width // f)
    if encoder_noise is not None and (not isinstance(encoder_noise, np.ndarray) or encoder_noise.shape != shape
                                      or not np.isfinite(encoder_noise).all()):
        raise InputError(f"encoder_noise must be a finite numpy array of shape {shape}, "
                         f"got {getattr(encoder_noise, 'shape', type(encoder_noise).__name__)}")
    return ImageInput(pixels=np.ascontiguousarray(pixels, dtype=np.float32), height=height, width=width,
                      strength=strength, start=start, encoder_noise=encoder_noise,
                      sizes=tuple(im.shape[:2] for im in images))
