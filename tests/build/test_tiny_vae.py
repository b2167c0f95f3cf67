"""``diffc build --vae-decoder``: a diffusers ``AutoencoderTiny`` replaces the VAE's decoder (diffc.exporter.tiny_vae).

The artifact's image must be diffusers' own with ``vae=AutoencoderTiny(...)`` (same initial latents, 1e-3 on
[0, 1]): the pipeline divides the latents by the tiny VAE's scaling_factor (1.0), not the full VAE's 0.18215,
and diffc folds that difference into the decoder graph while the manifest's ``latent`` stays the full VAE's
(its encoder is kept for image-to-image).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffc._fs import sha256_file  # noqa: E402
from diffc.errors import ModelError, UnsupportedPipelineError  # noqa: E402
from diffc.exporter import tiny_vae  # noqa: E402
from diffc.runtime import load  # noqa: E402

TOL = 1e-3
PROMPT = "a handwritten digit seven"


def _tiny_autoencoder(seed: int = 0, **config):
    """A random AutoencoderTiny for the tiny SD pipeline (factor 2, 4 latent channels), with its output conv's
    bias at 0.5 so that the image sits mid-range (a fresh ReLU decoder's output is ~0: clipped flat to black)."""
    cfg = dict(encoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1), decoder_block_out_channels=(8, 8),
               num_decoder_blocks=(1, 1), latent_channels=4)
    cfg.update(config)
    torch.manual_seed(seed)
    model = diffusers.AutoencoderTiny(**cfg)
    with torch.no_grad():
        model.decoder.layers[-1].bias.fill_(0.5)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("taesd") / "taesd"
    _tiny_autoencoder().save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def built(tiny_folder, tiny_vae_folder, tmp_path_factory):
    """(pipeline folder, tiny VAE folder, cpu-fp32 artifact with the tiny decoder, 2 steps)."""
    from diffc.build import build

    folder = tiny_folder("sd")
    out = tmp_path_factory.mktemp("tiny-vae-artifact") / "artifact.diffc"
    build(folder, "cpu-fp32", out, steps=2, sampler="ddim", progress=False, vae_decoder=tiny_vae_folder)
    return folder, tiny_vae_folder, out


def _diffusers_image(folder, noise, vae=None):
    kwargs = {} if vae is None else {"vae": vae}
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config({**pipe.scheduler.config, "clip_sample": False})
    return pipe(PROMPT, guidance_scale=5.0, num_inference_steps=2, height=32, width=32,
                latents=torch.from_numpy(noise), output_type="np").images


def test_image_matches_diffusers_with_autoencoder_tiny(built):
    folder, taesd, artifact = built
    runtime = load(artifact, progress=False)
    noise = runtime.initial_noise(seed=3, batch=1, height=32, width=32)
    ours = runtime(PROMPT, guidance=5.0, latents=noise)
    ref = _diffusers_image(folder, noise, vae=diffusers.AutoencoderTiny.from_pretrained(str(taesd)).eval())
    assert ours.shape == ref.shape == (1, 32, 32, 3)
    err = float(np.abs(ours - ref).max())
    assert err <= TOL, f"max |runtime - diffusers with AutoencoderTiny| = {err:.2e}"
    assert ref.std() > 0.02  # not flat: the comparison can fail
    # and the tiny decoder really decoded: the full VAE's image of the same latents is another picture
    full = _diffusers_image(folder, noise)
    assert float(np.abs(full - ref).max()) > 0.1


def test_manifest_records_the_decoder(built):
    _, taesd, artifact = built
    manifest = json.loads((artifact / "manifest.json").read_text())
    record = manifest["source"]["vae_decoder"]
    assert record["class"] == "AutoencoderTiny"
    assert record["sha256"] == sha256_file(taesd / record["weights"])
    assert record["scaling_factor"] == 1.0 and record["input_shift"] == 0.0
    assert record["input_scale"] == pytest.approx(0.18215)  # the full VAE's factor, undone in the graph
    assert manifest["latent"]["scaling_factor"] == pytest.approx(0.18215)  # the encoder's scaling is unchanged
    assert "vae_encoder" in manifest["components"]  # the full VAE's encoder stays


def test_not_an_autoencoder_tiny_is_refused(tiny_folder, tmp_path):
    folder = tiny_folder("sd")
    with pytest.raises(ModelError, match="AutoencoderKL.*not an AutoencoderTiny"):
        tiny_vae.inspect(folder / "vae")
    with pytest.raises(ModelError, match="no such folder"):
        tiny_vae.inspect(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        tiny_vae.inspect(tmp_path / "empty")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(ModelError, match="no weights"):
        tiny_vae.inspect(tmp_path / "noweights")
    # through the build, before any export
    from diffc.build import build

    with pytest.raises(ModelError, match="not an AutoencoderTiny"):
        build(folder, "cpu-fp32", tmp_path / "out.diffc", progress=False, vae_decoder=folder / "vae")
    assert not (tmp_path / "out.diffc").exists()


def test_incompatible_latents_are_refused(tmp_path):
    sd_taesd = tmp_path / "taesd"
    _tiny_autoencoder(decoder_block_out_channels=(8,) * 4, num_decoder_blocks=(1,) * 4,
                      encoder_block_out_channels=(8,) * 4, num_encoder_blocks=(1,) * 4).save_pretrained(str(sd_taesd))
    tiny = tiny_vae.inspect(sd_taesd)
    sd_vae = {"_class_name": "AutoencoderKL", "scaling_factor": 0.18215}
    tiny_vae.check_compatible(tiny, latent_channels=4, vae_scale_factor=8, vae_config=sd_vae,
                              pipeline_class="StableDiffusionPipeline")  # SD latents: fine
    flux_vae = {"_class_name": "AutoencoderKL", "scaling_factor": 0.3611, "shift_factor": 0.1159}
    with pytest.raises(ModelError, match="4-channel latents but FluxPipeline's denoiser makes 16-channel.*TAEF1"):
        tiny_vae.check_compatible(tiny, latent_channels=16, vae_scale_factor=8, vae_config=flux_vae,
                                  pipeline_class="FluxPipeline")
    with pytest.raises(ModelError, match="upsamples latents 8x but the pipeline's VAE 2x"):
        tiny_vae.check_compatible(tiny, latent_channels=4, vae_scale_factor=2, vae_config=sd_vae,
                                  pipeline_class="StableDiffusionPipeline")
    with pytest.raises(UnsupportedPipelineError, match="AutoencoderDC"):
        tiny_vae.check_compatible(tiny, latent_channels=4, vae_scale_factor=8,
                                  vae_config={"_class_name": "AutoencoderDC"}, pipeline_class="SanaPipeline")


def test_latent_affine_follows_the_pipelines():
    """SD: the tiny decoder takes latents / 1.0 (no shift, even if the tiny config has one); FLUX-style VAEs with
    a shift_factor: latents / tiny.scaling + tiny.shift, from the runtime's z = latents / vae.scaling + vae.shift."""
    tiny = tiny_vae.TinyDecoderSource("t", tiny_vae.DEMO_TINY_VAE, {"scaling_factor": 1.0, "shift_factor": 0.25},
                                      tiny_vae.DEMO_TINY_VAE)
    assert tiny_vae.latent_affine(tiny, {"scaling_factor": 0.18215, "shift_factor": None}) == (0.18215, 0.0)
    a, b = tiny_vae.latent_affine(tiny, {"scaling_factor": 0.5, "shift_factor": 0.1})
    z = 3.0  # latents = (z - 0.1) * 0.5 = 1.45 -> tiny input 1.45 / 1.0 + 0.25
    assert a * z + b == pytest.approx(1.7)


def test_bundled_demo_tiny_decodes_demo_latents():
    from diffc.exporter.demo import LATENT_CHANNELS, VAE_SCALE_FACTOR

    tiny = tiny_vae.inspect("demo-tiny")
    tiny_vae.check_compatible(tiny, latent_channels=LATENT_CHANNELS, vae_scale_factor=VAE_SCALE_FACTOR,
                              vae_config={"_class_name": "AutoencoderKL", "scaling_factor": 1.0},
                              pipeline_class="StableDiffusionPipeline")
    assert tiny.weights.stat().st_size < 1_000_000  # shipped in the wheel
    model = tiny_vae.load(tiny)
    with torch.no_grad():
        img = model.decode(torch.zeros(1, LATENT_CHANNELS, 8, 8)).sample
    assert img.shape == (1, 3, 32, 32)
    with pytest.raises(ModelError, match="distilled from the 'demo' model's VAE"):
        tiny_vae.inspect("demo-tiny", "demo-dit")
