"""Image-to-image: the torch-free runtime reproduces diffusers' img2img pipelines, image for image.

Same input image, same scheduler config and steps, same strength, same random draws (diffusers' torch generator
drawn here and handed to the runtime as ``encoder_noise`` / ``latents`` / ``noise``), fp32: the runtime's image
and diffusers' differ by at most 1e-3 on [0, 1], for SD 1.x (three samplers), SDXL and LCM, at two strengths.
The SD and SDXL artifacts are built from folders saved as the img2img pipeline classes; the LCM one from a
text-to-image folder (any artifact with a ``vae_encoder`` does image-to-image).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from diffc.build import build  # noqa: E402
from diffc.exporter.sampler import compile_sampler  # noqa: E402
from diffc.exporter.tiny import write_tiny_pipeline  # noqa: E402
from diffc.runtime import load  # noqa: E402

TOL = 1e-3
LATENT = (1, 4, 16, 16)  # the tiny pipelines: 32x32 pixels, VAE factor 2
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
#: with 4 steps: start at step 2 (2 steps run) and at step 1 (3 steps run)
STRENGTHS = (0.5, 0.75)


def _as_class(folder, cls: str):
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": cls}))
    return folder


def _artifact(tmp_path_factory, kind: str, cls: str | None, **options):
    root = tmp_path_factory.mktemp(kind)
    folder = write_tiny_pipeline(root / "pipe", kind, seed=0)
    if cls:
        _as_class(folder, cls)
    return folder, build(folder, "cpu-fp32", root / "artifact", steps=4, progress=False, **options)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return _artifact(tmp_path_factory, "sd", "StableDiffusionImg2ImgPipeline", sampler="ddim")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _artifact(tmp_path_factory, "sdxl", "StableDiffusionXLImg2ImgPipeline")


@pytest.fixture(scope="module")
def lcm(tiny_folder, tiny_artifact):
    """The text-to-image LCM pipeline as it is (img2img runs from the same artifact): the run's shared build,
    also tests/runtime/test_parity.py's (tests/conftest.py; read-only)."""
    return tiny_folder("lcm"), tiny_artifact("lcm", steps=4)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A smooth 32x32 RGB picture (uint8): a blurred random field, so the VAE sees structure, not white noise."""
    rng = np.random.default_rng(0)
    small = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((32, 32), Image.Resampling.BICUBIC))


def _draws(seed: int, steps: int = 0):
    """diffusers' draws from one torch generator, in its order: the VAE sample's eps, the added noise, then the
    injected noise of each step that takes one (LCM)."""
    g = torch.Generator().manual_seed(seed)
    eps, noise = torch.randn(LATENT, generator=g), torch.randn(LATENT, generator=g)
    return eps.numpy(), noise.numpy(), [torch.randn(LATENT, generator=g).numpy() for _ in range(steps)]


def _check(ours, ref, label):
    assert ours.shape == ref.shape == (1, 32, 32, 3)
    err = float(np.abs(ours - ref).max())
    assert err <= TOL, f"{label}: max |runtime - diffusers| = {err:.2e}"
    assert ref.std() > 0.02  # not vacuous: neither flat nor saturated


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
@pytest.mark.parametrize("strength", STRENGTHS)
def test_sd_img2img_matches_diffusers(sd, image, kind, strength):
    folder, artifact = sd
    runtime = load(artifact, progress=False)
    assert runtime.manifest["source"]["pipeline_class"] == "StableDiffusionImg2ImgPipeline"
    runtime.tables = compile_sampler(kind, runtime.manifest["build"]["scheduler_config"], 4)
    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, dtype=torch.float32)
    cfg = dict(ref_pipe.scheduler.config)
    cfg.setdefault("clip_sample", False)  # PNDM never clips; see diffc.build.export
    ref_pipe.scheduler = getattr(diffusers, SCHEDULERS[kind]).from_config(cfg)
    ref_pipe.set_progress_bar_config(disable=True)

    eps, noise, _ = _draws(3)
    ours = runtime("a handwritten digit seven", negative_prompt="blurry", guidance=5.0, image=image,
                   strength=strength, latents=noise, encoder_noise=eps)
    ref = ref_pipe("a handwritten digit seven", negative_prompt="blurry", guidance_scale=5.0,
                   image=Image.fromarray(image), strength=strength, num_inference_steps=4,
                   generator=torch.Generator().manual_seed(3), output_type="np").images
    _check(ours, ref, f"SD {kind} strength {strength}")
    # the input image matters (the comparison does not only check the denoiser)
    other = runtime("a handwritten digit seven", negative_prompt="blurry", guidance=5.0, image=255 - image,
                    strength=strength, latents=noise, encoder_noise=eps)
    assert np.abs(other - ours).max() > 10 * TOL


@pytest.mark.parametrize("strength", STRENGTHS)
def test_sdxl_img2img_matches_diffusers(sdxl, image, strength):
    folder, artifact = sdxl
    runtime = load(artifact, progress=False)
    assert runtime.tables.kind == "euler"
    ref_pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, dtype=torch.float32)
    ref_pipe.set_progress_bar_config(disable=True)
    eps, noise, _ = _draws(5)
    ours = runtime("a red fox", negative_prompt="blurry", guidance=4.0, image=image, strength=strength,
                   latents=noise, encoder_noise=eps)
    ref = ref_pipe("a red fox", negative_prompt="blurry", guidance_scale=4.0, image=Image.fromarray(image),
                   strength=strength, num_inference_steps=4, generator=torch.Generator().manual_seed(5),
                   output_type="np").images
    _check(ours, ref, f"SDXL strength {strength}")


@pytest.mark.parametrize("strength", STRENGTHS)
def test_lcm_img2img_matches_diffusers(lcm, image, strength):
    """LatentConsistencyModelImg2ImgPipeline left to itself picks a strength-dependent schedule of its own
    (LCMScheduler.set_timesteps(strength=...)), not the text-to-image one; given the artifact's timesteps it
    truncates them by strength exactly as StableDiffusionImg2ImgPipeline does, which is what diffc runs."""
    folder, artifact = lcm
    runtime = load(artifact, progress=False)
    assert runtime.manifest["guidance"]["mode"] == "embedded"
    n = runtime.tables.num_steps
    start = runtime.tables.start_step(strength)
    ref_pipe = diffusers.LatentConsistencyModelImg2ImgPipeline.from_pretrained(folder, dtype=torch.float32)
    ref_pipe.set_progress_bar_config(disable=True)

    # diffusers draws injected noise on every step it runs; the last step's never reaches the decoded x0
    eps, noise, injected = _draws(7, steps=n - start)
    step_noise = [np.zeros(LATENT, np.float32)] * start + injected[:-1] + [np.zeros(LATENT, np.float32)]
    ours = runtime("a handwritten digit three", guidance=8.0, image=image, strength=strength, latents=noise,
                   encoder_noise=eps, noise=step_noise)
    ref = ref_pipe("a handwritten digit three", guidance_scale=8.0, image=Image.fromarray(image), strength=strength,
                   timesteps=[int(t) for t in runtime.tables.timesteps], generator=torch.Generator().manual_seed(7),
                   output_type="np").images
    assert ref_pipe.scheduler.timesteps.tolist() == runtime.tables.timesteps[start:].tolist()
    _check(ours, ref, f"LCM strength {strength}")


def test_per_row_seeds_batch_like_single_calls(sd, image):
    """A batch with one seed per row gives each row the image its own call gives (how a server batches)."""
    _, artifact = sd
    runtime = load(artifact, progress=False)
    prompts = ["a cat", "a handwritten digit two"]
    both = runtime(prompts, image=[image, 255 - image], strength=0.75, seed=[1, 2])
    for k in range(2):
        alone = runtime(prompts[k], image=[image, 255 - image][k], strength=0.75, seed=[1, 2][k])
        assert np.abs(both[k] - alone[0]).max() <= 1e-5


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_manifest_doc_recipe_matches_runtime(demo_cpu_artifact, tmp_path, image, sampler):
    """docs/manifest.md's image-to-image recipe, followed with json, numpy and onnxruntime (the text conditioning
    taken from the runtime: the doc-loop test covers it), gives the runtime's image. dpmpp_2m checks the entry
    rule (prev_x0 = x0 at step k)."""
    import shutil

    import onnxruntime as ort

    root = tmp_path / "a"
    shutil.copytree(demo_cpu_artifact, root)
    M = json.loads((root / "manifest.json").read_text())
    M["sampler"] = compile_sampler(sampler, M["build"]["scheduler_config"], 4).to_dict()
    (root / "manifest.json").write_text(json.dumps(M))
    pipe = load(root, progress=False)
    s, g, prompt = 0.75, 5.0, "a handwritten digit eight"
    rng = np.random.default_rng(0)
    noise, eps = (rng.standard_normal((1, 4, 8, 8), dtype=np.float32) for _ in range(2))
    ours = pipe(prompt, guidance=g, image=image, strength=s, latents=noise, encoder_noise=eps)

    S, lat = M["sampler"], M["latent"]
    sess = {n: ort.InferenceSession(str(root / c["file"]), providers=["CPUExecutionProvider"])
            for n, c in M["components"].items() if n in ("unet", "vae_encoder", "vae_decoder")}

    def run(name, **feeds):
        return dict(zip([o.name for o in sess[name].get_outputs()], sess[name].run(None, feeds)))

    n = len(S["timesteps"])
    k = n - min(int(n * s), n)
    img = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.LANCZOS), np.float32) / 255
    out = run("vae_encoder", sample=(2 * img - 1).transpose(2, 0, 1)[None].astype(np.float32))
    x0 = (out["latent_mean"] + out["latent_std"] * eps - lat["shift_factor"]) * lat["scaling_factor"]
    x = (S["noise_signal"][k] * x0 + S["noise_scale"][k] * noise).astype(np.float32)
    cond = np.concatenate([pipe.encode_text([""])[0], pipe.encode_text([prompt])[0]])
    prev_x0 = None
    for i in range(k, n):
        inp = (S["c_in"][i] * x).astype(np.float32)
        m = run("unet", sample=np.concatenate([inp, inp]), timestep=np.full(2, S["timesteps"][i], np.float32),
                encoder_hidden_states=cond)["out_sample"]
        mu, mc = np.split(m, 2)
        m = mu + g * (mc - mu)
        x0 = S["x0_from_x"][i] * x + S["x0_from_m"][i] * m
        prev_x0 = x0 if i == k else prev_x0
        x = (S["next_from_x"][i] * x + S["next_from_x0"][i] * x0 + S["next_from_prev_x0"][i] * prev_x0
             ).astype(np.float32)
        prev_x0 = x0
    theirs = run("vae_decoder", latent_sample=(x / lat["scaling_factor"] + lat["shift_factor"]).astype(np.float32))
    theirs = np.clip(theirs["sample"] / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert np.abs(ours - theirs).max() <= 1e-4
