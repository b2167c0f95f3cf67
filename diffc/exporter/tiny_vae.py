"""A tiny VAE decoder in place of the pipeline's own: diffusers' ``AutoencoderTiny`` (TAESD-style), ``--vae-decoder``.

The VAE decoder is a large share of a fast image (SD 1.5 at 512 px, int8 + cache on CPU: 1.12 of 4.50 s); TAESD
decodes the same latents with a few plain convolutions. ``diffc build MODEL --vae-decoder FOLDER`` exports the
tiny model's *decoder* as the artifact's ``vae_decoder``; everything else comes from MODEL, including the full
VAE's *encoder* (image-to-image, inpainting), because TAESD's encoder is a lower-quality approximation of the
posterior mean with its own scaling story, while the full encoder is what the model was trained on.

**Latent scaling.** With ``pipe.vae = AutoencoderTiny(...)`` diffusers' pipelines decode
``latents / tiny.config.scaling_factor`` (SD, SDXL, PixArt: no shift), or ``latents / scaling_factor +
shift_factor`` where the pipeline shifts (SD3, FLUX: their full VAE configs have a ``shift_factor``). TAESD's
``scaling_factor`` is 1.0: it takes the *denoiser's* latents. ``latent_magnitude`` / ``latent_shift`` only map
latents to [0, 1] for storage as images (``scale_latents``); decoding never uses them. The artifact's runtime
(and a native runner) keeps decoding as the manifest's ``latent`` section says, for the full VAE
(``z = latents / scaling_factor + shift_factor``), and the graph exported here undoes that first, so the
decoder's input means the same in every artifact and the encoder's scaling stays right:
``tiny_input = (z - vae.shift) * vae.scaling / tiny.scaling (+ tiny.shift)``, one Mul/Add folded into the graph
(and none when the factors are 1 and 0, as for the demo).

The bundled ``demo-tiny`` (``diffc/assets/demo_tiny_vae/``) is distilled from the demo's VAE by
``tools/distill_tiny_vae.py``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffc._fs import sha256_file
from diffc.errors import ModelError, UnsupportedPipelineError

log = logging.getLogger("diffc.export")

#: the demo's distilled tiny VAE (tools/distill_tiny_vae.py), fp16 safetensors + config.json
DEMO_TINY_VAE = Path(__file__).resolve().parent.parent / "assets" / "demo_tiny_vae"
#: names that mean a bundled tiny decoder, not a folder
BUNDLED_DECODERS = {"demo-tiny": DEMO_TINY_VAE}
#: the model each bundled decoder was distilled for: another model's latents of the same shape would decode to noise
BUNDLED_FOR = {"demo-tiny": "demo"}
TINY_CLASS = "AutoencoderTiny"
#: the weight files diffusers' from_pretrained reads, in its order of preference
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
#: where the loaded decoder hangs on the diffusers pipeline (diffc.exporter.export.component_module reads it)
ATTRIBUTE = "diffc_tiny_vae_decoder"


@dataclass(frozen=True)
class TinyDecoderSource:
    """A checked ``AutoencoderTiny`` folder, before torch loads it."""

    name: str  # what the user passed: a folder, or a bundled name
    path: Path
    config: dict[str, Any]
    weights: Path

    @property
    def latent_channels(self) -> int:
        return int(self.config.get("latent_channels", 4))

    @property
    def scale_factor(self) -> int:
        """Pixels per latent: the decoder upsamples between its levels (diffusers' DecoderTiny)."""
        levels = len(self.config.get("decoder_block_out_channels", (64, 64, 64, 64)))
        return int(self.config.get("upsampling_scaling_factor", 2)) ** (levels - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.config.get("scaling_factor", 1.0))

    @property
    def shift_factor(self) -> float:
        return float(self.config.get("shift_factor") or 0.0)


def inspect(spec: str | Path, model: str | Path | None = None) -> TinyDecoderSource:
    """``spec`` (a bundled name such as ``demo-tiny``, or a folder saved by ``AutoencoderTiny.save_pretrained``)
    checked from its files alone, so a wrong folder is refused before the pipeline loads; a bundled decoder only
    for the ``model`` it was distilled for."""
    name = str(spec)
    if model is not None and name in BUNDLED_FOR and str(model) != BUNDLED_FOR[name]:
        raise ModelError(f"--vae-decoder {name} was distilled from the {BUNDLED_FOR[name]!r} model's VAE and decodes "
                         f"only its latents, not {str(model)!r}'s; build {BUNDLED_FOR[name]!r} with it, or pass "
                         "an AutoencoderTiny trained for this model")
    path = BUNDLED_DECODERS.get(name, Path(spec))
    hint = (f"pass a folder saved by diffusers' AutoencoderTiny.save_pretrained() (config.json + "
            f"{WEIGHT_FILES[0]}, e.g. madebyollin/taesd for SD 1.x/2.x latents), or one of {sorted(BUNDLED_DECODERS)}")
    if not path.is_dir():
        if name in BUNDLED_DECODERS:
            raise ModelError(f"the bundled tiny decoder {name!r} is missing ({path}); restore "
                             "diffc/assets/demo_tiny_vae "
                             "from the repository, or distil it with `python tools/distill_tiny_vae.py`")
        raise ModelError(f"--vae-decoder {name}: no such folder; {hint}")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"--vae-decoder {name}: {path} has no config.json, so it is not a diffusers model folder; "
                         f"{hint}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"--vae-decoder {name}: cannot read {cfg_path}: {e}; {hint}") from None
    if not isinstance(config, dict) or config.get("_class_name") != TINY_CLASS:
        got = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise ModelError(f"--vae-decoder {name}: {cfg_path} describes a {got!r}, not an {TINY_CLASS}; {hint}. A "
                         "full AutoencoderKL is already the pipeline's own vae")
    for key, kind in (("latent_channels", int), ("upsampling_scaling_factor", int),
                      ("decoder_block_out_channels", list), ("scaling_factor", (int, float))):
        if key in config and (not isinstance(config[key], kind) or isinstance(config[key], bool)):
            raise ModelError(f"--vae-decoder {name}: {cfg_path}: {key} is {config[key]!r}; {hint}")
    if "scaling_factor" in config and not config["scaling_factor"] > 0:
        raise ModelError(f"--vae-decoder {name}: {cfg_path}: scaling_factor must be > 0, got "
                         f"{config['scaling_factor']}; {hint}")
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise ModelError(f"--vae-decoder {name}: {path} has a config but no weights ({' or '.join(WEIGHT_FILES)}); "
                         f"{hint}")
    return TinyDecoderSource(name=name, path=path, config=config, weights=weights)


def check_compatible(tiny: TinyDecoderSource, *, latent_channels: int, vae_scale_factor: int,
                     vae_config: dict[str, Any], pipeline_class: str) -> None:
    """Refuse a tiny decoder that cannot decode this pipeline's latents: another channel count (an SD TAESD,
    4 channels, for FLUX's 16), another upsampling factor, or a pipeline whose VAE is not an AutoencoderKL."""
    vae_class = vae_config.get("_class_name") or "AutoencoderKL"
    if vae_class != "AutoencoderKL":
        raise UnsupportedPipelineError(
            f"--vae-decoder: {pipeline_class}'s VAE is a {vae_class}, whose latents no {TINY_CLASS} decodes the way "
            "diffc can fold in; build without --vae-decoder")
    if tiny.latent_channels != latent_channels:
        raise ModelError(
            f"--vae-decoder {tiny.name}: the tiny VAE decodes {tiny.latent_channels}-channel latents but "
            f"{pipeline_class}'s denoiser makes {latent_channels}-channel ones; pass the tiny VAE trained for this "
            "model family (TAESD for SD 1.x/2.x, TAESDXL for SDXL, TAESD3 for SD3, TAEF1 for FLUX.1)")
    if tiny.scale_factor != vae_scale_factor:
        raise ModelError(
            f"--vae-decoder {tiny.name}: the tiny decoder upsamples latents {tiny.scale_factor}x but the pipeline's "
            f"VAE {vae_scale_factor}x, so the image would have the wrong size; pass the tiny VAE trained for this model")


def latent_affine(tiny: TinyDecoderSource, vae_config: dict[str, Any]) -> tuple[float, float]:
    """``(a, b)`` with ``tiny_input = a * z + b`` for the runtime's ``z = latents / vae.scaling + vae.shift``
    (see the module docstring: the tiny decoder takes ``latents / tiny.scaling (+ tiny.shift)`` in diffusers)."""
    vae_scaling = float(vae_config.get("scaling_factor") or 1.0)
    vae_shift = vae_config.get("shift_factor")
    shifted = vae_shift is not None  # the pipelines that shift are those whose VAE config has a shift_factor
    a = vae_scaling / tiny.scaling_factor
    b = -float(vae_shift or 0.0) * a + (tiny.shift_factor if shifted else 0.0)
    return a, b


class TinyVaeDecoder(torch.nn.Module):
    """The tiny decoder behind the ``vae_decoder`` contract: ``decode(z)`` as ``AutoencoderKL.decode`` is called
    (unscaled latents in, an image in [-1, 1] out), with the latent rescaling of :func:`latent_affine` in front."""

    def __init__(self, tiny: torch.nn.Module, a: float, b: float):
        super().__init__()
        self.tiny = tiny
        self.a, self.b = a, b
        self.config = tiny.config  # latent_channels: the contract's sample inputs

    def decode(self, latent_sample, return_dict: bool = False):
        x = latent_sample
        if self.a != 1.0:
            x = x * self.a
        if self.b != 0.0:
            x = x + self.b
        return (self.tiny.decode(x, return_dict=False)[0],)


def load(tiny: TinyDecoderSource) -> torch.nn.Module:
    """The ``AutoencoderTiny`` in fp32, eval mode."""
    from diffusers import AutoencoderTiny

    try:
        model = AutoencoderTiny.from_pretrained(str(tiny.path), torch_dtype=torch.float32)
    except Exception as e:  # diffusers raises many types for a broken folder
        raise ModelError(f"--vae-decoder {tiny.name}: diffusers could not load {tiny.path} as an {TINY_CLASS}: {e}; "
                         "re-save it with AutoencoderTiny.save_pretrained()") from e
    return model.eval()


def attach(pipe, tiny: TinyDecoderSource, *, latent_channels: int, vae_scale_factor: int,
           pipeline_class: str) -> dict[str, Any]:
    """Check ``tiny`` against ``pipe`` (:func:`check_compatible`), load it and hang it on ``pipe`` as the
    ``vae_decoder`` to export (the pipeline's own VAE stays, for its encoder and its config). Returns the
    manifest's record of the decoder (``source.vae_decoder``)."""
    vae_config = {**dict(pipe.vae.config), "_class_name": type(pipe.vae).__name__}
    check_compatible(tiny, latent_channels=latent_channels, vae_scale_factor=vae_scale_factor,
                     vae_config=vae_config, pipeline_class=pipeline_class)
    a, b = latent_affine(tiny, vae_config)
    setattr(pipe, ATTRIBUTE, TinyVaeDecoder(load(tiny), a, b).eval())
    log.info("vae_decoder: %s from %s (latents x %.6g %+.6g before decoding)", TINY_CLASS, tiny.path, a, b)
    return record(tiny, a, b)


def record(tiny: TinyDecoderSource, a: float, b: float) -> dict[str, Any]:
    return {"model": tiny.name, "class": TINY_CLASS, "weights": tiny.weights.name,
            "sha256": sha256_file(tiny.weights), "scaling_factor": tiny.scaling_factor,
            "shift_factor": tiny.shift_factor, "input_scale": a, "input_shift": b}


def attached(pipe) -> torch.nn.Module | None:
    """The tiny decoder :func:`attach` hung on ``pipe``, if any."""
    return getattr(pipe, ATTRIBUTE, None)
