"""Inpainting: the torch-free runtime reproduces diffusers' StableDiffusionInpaintPipeline, image for image.

Both kinds: a 9-channel inpainting UNet (a tiny one, built from a StableDiffusionInpaintPipeline folder) and the
latent blend of a 4-channel UNet (the demo artifact every test shares, against the demo's own weights in
diffusers' inpainting pipeline). Same image, mask, strength and random draws (diffusers' torch generator drawn
here and handed to the runtime), fp32: within 1e-3 on [0, 1]. Then the mask rule against diffusers' own
``mask_processor``, the command line, and every bad input as a typed error with nothing written.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from diffc.build import build  # noqa: E402
from diffc.build.plan import plan  # noqa: E402
from diffc.cli import main  # noqa: E402
from diffc.errors import InputError, UnsupportedPipelineError  # noqa: E402
from diffc.exporter.sampler import compile_sampler  # noqa: E402
from diffc.exporter.tiny import tiny_configs, write_tiny_pipeline  # noqa: E402
from diffc.runtime import load  # noqa: E402
from diffc.runtime.inpaint import load_mask  # noqa: E402

TOL = 1e-3
PROMPT = "a handwritten digit seven"


def _inpainting_folder(root, kind: str = "sd"):
    """The tiny SD (SDXL) pipeline with a seeded 9-channel UNet, saved as the inpainting class."""
    folder = write_tiny_pipeline(root / "pipe", kind, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        unet = diffusers.UNet2DConditionModel(**dict(tiny_configs(kind)["unet"], in_channels=9))
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    cls = "StableDiffusionXLInpaintPipeline" if kind == "sdxl" else "StableDiffusionInpaintPipeline"
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": cls}))
    return folder


@pytest.fixture(scope="module")
def sd9(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpaint9")
    folder = _inpainting_folder(root)
    return folder, build(folder, "cpu-fp32", root / "artifact", steps=4, sampler="ddim", progress=False)


@pytest.fixture(scope="module")
def ref9(sd9):
    """diffusers' pipeline on the same folder, loaded once (each test sets its scheduler)."""
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(sd9[0], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def demo(demo_cpu_artifact):
    return load(demo_cpu_artifact, progress=False)


def _picture(size: int) -> np.ndarray:
    """A smooth RGB picture (uint8): a blurred random field, so the VAE sees structure."""
    small = (np.random.default_rng(0).random((4, 4, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


def _mask(size: int) -> np.ndarray:
    """White (repaint) on the right half and a block on the left; black (keep) elsewhere."""
    m = np.zeros((size, size), np.uint8)
    m[:, size // 2:] = 255
    m[size // 4:size // 2, size // 8:size // 4 + 2] = 255
    return m


def _draws(seed: int, shape, encode_image: bool):
    """diffusers' draws from one generator, in its order: the image's encoder sample (when it encodes the image),
    the noise, the masked image's encoder sample."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(shape, generator=g).numpy() if encode_image else None
    return eps, torch.randn(shape, generator=g).numpy(), torch.randn(shape, generator=g).numpy()


def _check(ours, ref, label):
    err = float(np.abs(ours - ref).max())
    assert err <= TOL, f"{label}: max |runtime - diffusers| = {err:.2e}"
    assert ref.std() > 0.02  # not vacuous: neither flat nor saturated


@pytest.mark.parametrize("kind, scheduler, strength", [("ddim", "DDIMScheduler", 1.0), ("ddim", "DDIMScheduler", 0.75),
                                                       ("euler", "EulerDiscreteScheduler", 0.5)])
def test_inpainting_unet_matches_diffusers(sd9, ref9, kind, scheduler, strength):
    """Strength 1 starts from pure noise and never encodes the image; below 1 the image is encoded and noised."""
    _, artifact = sd9
    runtime = load(artifact, progress=False)
    assert runtime.manifest["schema_version"] == 3 and runtime.manifest["latent"]["channels"] == 4
    assert [p["name"] for p in runtime.manifest["inpaint"]["sample"]] == ["latents", "mask", "masked_image_latents"]
    runtime.tables = compile_sampler(kind, runtime.manifest["build"]["scheduler_config"], 4)
    ref_pipe = ref9
    ref_pipe.scheduler = getattr(diffusers, scheduler).from_config({**ref_pipe.scheduler.config, "clip_sample": False})
    image, mask = _picture(32), _mask(32)
    eps, noise, eps_masked = _draws(3, (1, 4, 16, 16), encode_image=strength < 1)
    ours = runtime("a cat", negative_prompt="blurry", guidance=5.0, image=image, mask_image=mask, strength=strength,
                   latents=noise, encoder_noise=eps, masked_image_noise=eps_masked)
    ref = ref_pipe("a cat", negative_prompt="blurry", guidance_scale=5.0, image=Image.fromarray(image),
                   mask_image=Image.fromarray(mask), strength=strength, num_inference_steps=4,
                   generator=torch.Generator().manual_seed(3), output_type="np").images
    _check(ours, ref, f"9-channel {kind} strength {strength}")
    # the mask matters: the UNet is fed it (another mask, another image)
    other = runtime("a cat", negative_prompt="blurry", guidance=5.0, image=image, mask_image=255 - mask,
                    strength=strength, latents=noise, encoder_noise=eps, masked_image_noise=eps_masked)
    assert np.abs(other - ours).max() > 10 * TOL


def test_sdxl_inpainting_unet_matches_diffusers(tmp_path_factory):
    """StableDiffusionXLInpaintPipeline: the same rule with SDXL's added time conditions (one strength: its own
    build is the cost)."""
    root = tmp_path_factory.mktemp("inpaint-sdxl")
    folder = _inpainting_folder(root, "sdxl")
    artifact = build(folder, "cpu-fp32", root / "artifact", steps=4, progress=False)
    runtime = load(artifact, progress=False)
    assert runtime.manifest["inpaint"] and runtime.tables.kind == "euler"
    ref_pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(folder, dtype=torch.float32)
    ref_pipe.set_progress_bar_config(disable=True)
    image, mask = _picture(32), _mask(32)
    eps, noise, eps_masked = _draws(3, (1, 4, 16, 16), encode_image=True)
    ours = runtime("a red fox", negative_prompt="blurry", guidance=4.0, image=image, mask_image=mask, strength=0.75,
                   latents=noise, encoder_noise=eps, masked_image_noise=eps_masked)
    ref = ref_pipe("a red fox", negative_prompt="blurry", guidance_scale=4.0, image=Image.fromarray(image),
                   mask_image=Image.fromarray(mask), strength=0.75, num_inference_steps=4,
                   generator=torch.Generator().manual_seed(3), output_type="np").images
    _check(ours, ref, "SDXL 9-channel strength 0.75")


def test_inpainting_artifact_without_a_mask(sd9):
    """No image: a white mask and an all-black image at strength 1 (what calibration and the quality gate run,
    and what diffusers' pipeline does with a white mask); an image alone: a white mask, the image unseen.

    Not compared with diffusers here: the masked image is then exactly constant (all zeros), on which every
    GroupNorm of the VAE encoder divides rounding noise by sqrt(eps) -- PyTorch's exact zeros and onnxruntime's
    last bits give encodings 0.1 apart on the tiny VAE, an ill-conditioned input rather than a runtime rule (the
    parity tests above cover the rule with masks that leave part of the image)."""
    _, artifact = sd9
    runtime = load(artifact, progress=False)
    _, noise, eps_masked = _draws(5, (1, 4, 16, 16), encode_image=False)
    ours = runtime("a cat", guidance=5.0, latents=noise, masked_image_noise=eps_masked)
    explicit = runtime("a cat", guidance=5.0, image=np.zeros((32, 32, 3), np.uint8),
                       mask_image=np.full((32, 32), 255, np.uint8), strength=1.0, latents=noise,
                       masked_image_noise=eps_masked)
    assert np.array_equal(ours, explicit) and ours.std() > 0.02
    white = runtime("a cat", guidance=5.0, image=_picture(32), latents=noise, masked_image_noise=eps_masked)
    assert np.array_equal(white, ours)  # a white mask at strength 1: the image is not seen
    assert np.abs(runtime("a dog", guidance=5.0, latents=noise, masked_image_noise=eps_masked) - ours).max() > 10 * TOL


@pytest.fixture(scope="module")
def demo_ref():
    """The demo's weights in diffusers' inpainting pipeline."""
    from diffc.exporter.demo import build_demo_pipeline

    pipe = diffusers.StableDiffusionInpaintPipeline(**build_demo_pipeline().components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_latent_blend_matches_diffusers(demo, demo_ref, strength):
    """The demo's 4-channel UNet in StableDiffusionInpaintPipeline: diffusers' legacy blend after every step."""
    ref_pipe = demo_ref
    steps = demo.tables.num_steps
    image = (demo(PROMPT, seed=1)[0] * 255).round().astype(np.uint8)
    mask = _mask(32)
    eps, noise, _ = _draws(9, (1, 4, 8, 8), encode_image=True)
    ours = demo(PROMPT, guidance=5.0, image=image, mask_image=mask, strength=strength, latents=noise,
                encoder_noise=eps)
    ref = ref_pipe(PROMPT, guidance_scale=5.0, image=Image.fromarray(image), mask_image=Image.fromarray(mask),
                   strength=strength, num_inference_steps=steps, generator=torch.Generator().manual_seed(9),
                   output_type="np").images
    _check(ours, ref, f"latent blend strength {strength}")
    # the kept region stays the image's: closer to it than the redrawn region is
    keep = (mask == 0)[None, :, :, None].repeat(3, axis=3)
    x = image.astype(np.float32)[None] / 255
    assert np.abs(ours - x)[keep].mean() < np.abs(ours - x)[~keep].mean()


@pytest.mark.parametrize("which", ["blend", "unet"])
def test_per_row_seeds_batch_like_single_calls(demo, sd9, which):
    """A batch with one seed, image and mask per row gives each row the image its own call gives."""
    pipe = demo if which == "blend" else load(sd9[1], progress=False)
    prompts, images, masks = ["a cat", PROMPT], [_picture(32), 255 - _picture(32)], [_mask(32), 255 - _mask(32)]
    both = pipe(prompts, image=images, mask_image=masks, strength=0.75, seed=[1, 2])
    for k in range(2):
        alone = pipe(prompts[k], image=images[k], mask_image=masks[k], strength=0.75, seed=[1, 2][k])
        assert np.abs(both[k] - alone[0]).max() <= 1e-5


@pytest.mark.parametrize("mode, size", [("RGB", 64), ("L", 64), ("L", 32), ("F", 48)])
def test_mask_rule_is_diffusers_mask_processor(mode, size):
    """Resize (Lanczos in the mask's mode for images, nearest for float arrays), greyscale, binarize at 0.5."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    rng = np.random.default_rng(1)
    smooth = np.asarray(Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8))
                        .resize((size, size), Image.Resampling.BICUBIC))
    if mode == "F":
        given: object = smooth.astype(np.float32) / 255
    elif mode == "RGB":
        given = Image.fromarray(np.stack([smooth, 255 - smooth, smooth // 2], axis=-1))
    else:
        given = Image.fromarray(smooth)
    ours = load_mask(given).binary(32, 32)
    theirs = processor.preprocess(given, height=32, width=32).numpy()[0, 0]
    assert 0 < ours.mean() < 1
    assert np.array_equal(ours, theirs)


# ----------------------------------------------------------------------------------------------- the command line


def _run(*args):
    return CliRunner().invoke(main, ["-q", *args])


def test_run_inpainting_round_trip(demo_cpu_artifact, sd9, tmp_path):
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(_picture(32)).save(image)
    Image.fromarray(_mask(32)).save(mask)
    for artifact in (demo_cpu_artifact, sd9[1]):
        out = tmp_path / f"{artifact.parent.name}.png"
        r = _run("run", str(artifact), "--prompt", PROMPT, "--image", str(image), "--mask", str(mask), "-o", str(out))
        assert r.exit_code == 0, r.output
        got = np.asarray(Image.open(out))
        p = load(artifact, progress=False)
        want = (p(PROMPT, image=image, mask_image=mask)[0] * 255).round().astype(np.uint8)
        assert np.array_equal(got, want)


@pytest.mark.parametrize("flags, message", [
    (["--mask", "MASK"], r"--mask is given without --image; pass --image FILE"),
    (["--image", "IMAGE", "--mask", "MISSING"], r"--mask .*missing.png does not exist"),
    (["--image", "IMAGE", "--mask", "NOTIMAGE"], r"cannot read --mask .* as an image"),
    (["--image", "IMAGE", "--mask", "SMALL"], r"--mask is 16x16 \(width x height\) but its image is 32x32; a mask must"
                                              r" have its image's size"),
])
def test_run_mask_flags_are_checked_before_loading(tmp_path, flags, message):
    paths = {"IMAGE": tmp_path / "in.png", "MASK": tmp_path / "mask.png", "SMALL": tmp_path / "small.png",
             "MISSING": tmp_path / "missing.png", "NOTIMAGE": tmp_path / "bad.png"}
    Image.fromarray(_picture(32)).save(paths["IMAGE"])
    Image.fromarray(_mask(32)).save(paths["MASK"])
    Image.fromarray(_mask(16)).save(paths["SMALL"])
    paths["NOTIMAGE"].write_text("text")
    out = tmp_path / "out.png"
    r = _run("run", str(tmp_path / "no-artifact"), "--prompt", "x", "-o", str(out),
             *[str(paths.get(f, f)) for f in flags])
    assert r.exit_code == 2, r.output
    assert "error (input_error)" in r.output
    assert __import__("re").search(message, r.output), r.output
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- bad input


def _never_runs(pipe, monkeypatch):
    class Refuse:
        def run(self, *a, **k):
            raise AssertionError("an engine ran before the input was refused")

    monkeypatch.setattr(pipe, "sessions", {name: Refuse() for name in pipe.sessions})


@pytest.mark.parametrize("kwargs, message", [
    ({"image": None}, r"mask_image is given without an image; pass image="),
    ({"mask_image": _mask(16)}, r"mask_image is 16x16 \(width x height\) but its image is 32x32"),
    ({"mask_image": np.zeros((32, 32), np.int32)}, r"mask_image has dtype int32; pass uint8 pixels or floats"),
    ({"mask_image": np.full((32, 32), 2.0)}, r"mask_image holds values outside \[0, 1\]"),
    ({"mask_image": np.zeros((32, 32, 2), np.uint8)}, r"mask_image must be a mask array of shape \(height, width\)"),
    ({"mask_image": [_mask(32)] * 2}, r"2 masks for 1 prompts"),
    ({"mask_image": 3}, r"mask_image must be a mask file's path, a PIL image or a numpy array"),
    ({"masked_image_noise": np.zeros((1, 4, 8, 8), np.float32)}, r"masked_image_noise is given, but this artifact "
                                                                  r"inpaints by the latent blend"),
    ({"strength": 0.0}, r"strength must be a number in \(0, 1\]"),
])
def test_bad_inpainting_arguments(demo, monkeypatch, kwargs, message):
    kwargs = {"image": _picture(32), "mask_image": _mask(32), **kwargs}
    _never_runs(demo, monkeypatch)
    with pytest.raises(InputError, match=message):
        demo(PROMPT, **kwargs)


def test_unreadable_mask_file(demo, tmp_path, monkeypatch):
    _never_runs(demo, monkeypatch)
    bad = tmp_path / "mask.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(InputError, match=r"cannot read mask_image .* as an image"):
        demo(PROMPT, image=_picture(32), mask_image=bad)


def test_mask_for_an_artifact_that_cannot_inpaint(demo_cpu_artifact, tmp_path):
    art = tmp_path / "no-encoder"
    shutil.copytree(demo_cpu_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    p = load(art, progress=False)
    with pytest.raises(InputError, match=r"this artifact has no vae_encoder component, so it cannot inpaint"):
        p(PROMPT, image=_picture(32), mask_image=_mask(32))


# ----------------------------------------------------------------------------------------------- the build


def test_build_accepts_the_inpainting_class_and_refuses_it_elsewhere(sd9, tmp_path):
    """Under StableDiffusionInpaintPipeline the 9-channel UNet plans (its sample takes 9 channels); saved as
    StableDiffusionPipeline it is refused at planning with the fix named."""
    folder, _ = sd9
    planned = plan(folder, "cpu-fp32")
    assert "vae_encoder" in planned["components"]
    renamed = tmp_path / "as-txt2img"
    shutil.copytree(folder, renamed)
    index = json.loads((renamed / "model_index.json").read_text())
    (renamed / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UnsupportedPipelineError, match=r"set \"_class_name\" in model_index.json to "
                                                       r"StableDiffusionInpaintPipeline"):
        plan(renamed, "cpu-fp32")
    # the SDXL refiner's aesthetic-score time ids: refused by name, not by a shape error in the export
    (renamed / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": True}))
    with pytest.raises(UnsupportedPipelineError, match=r"requires_aesthetics_score = true"):
        plan(renamed, "cpu-fp32")


# ----------------------------------------------------------------------------------------------- the document


@pytest.mark.parametrize("which, strength", [("blend", 0.75), ("unet", 0.75), ("unet", 1.0)])
def test_manifest_doc_recipe_matches_runtime(demo_cpu_artifact, sd9, which, strength):
    """docs/manifest.md's inpainting recipe, followed with json, numpy, PIL and onnxruntime (the text conditioning
    taken from the runtime: the doc-loop test covers it), gives the runtime's image, for both kinds."""
    import onnxruntime as ort

    root = demo_cpu_artifact if which == "blend" else sd9[1]
    pipe = load(root, progress=False)
    M = json.loads((root / "manifest.json").read_text())
    S, lat = M["sampler"], M["latent"]
    assert ("inpaint" in M) == (which == "unet")
    H = W = 32
    f = lat["vae_scale_factor"]
    h, w, C = H // f, W // f, lat["channels"]
    rng = np.random.default_rng(0)
    noise, eps_1, eps_2 = (rng.standard_normal((1, C, h, w), dtype=np.float32) for _ in range(3))
    image, mask = _picture(64), Image.fromarray(np.stack([_mask(64)] * 3, axis=-1))  # resized, an RGB mask
    g, prompt = 5.0, PROMPT
    ours = pipe(prompt, guidance=g, image=image, mask_image=mask, strength=strength, height=H, width=W,
                latents=noise, encoder_noise=eps_1, masked_image_noise=eps_2 if which == "unet" else None)

    sess = {n: ort.InferenceSession(str(root / c["file"]), providers=["CPUExecutionProvider"])
            for n, c in M["components"].items() if n in ("unet", "vae_encoder", "vae_decoder")}

    def run(name, **feeds):
        return dict(zip([o.name for o in sess[name].get_outputs()], sess[name].run(None, feeds)))

    def encode(p, eps):
        out = run("vae_encoder", sample=p.astype(np.float32))
        return (out["latent_mean"] + out["latent_std"] * eps - lat["shift_factor"]) * lat["scaling_factor"]

    # the image exactly as image-to-image resizes it (the img2img doc test covers that rule)
    from diffc.runtime.img2img import fit_image

    img = 2 * fit_image(image.astype(np.float32) / 255, H, W, "image", 8).transpose(2, 0, 1)[None] - 1
    m = np.asarray(mask.resize((W, H), Image.Resampling.LANCZOS).convert("L"), np.float32) / 255
    m = (m >= 0.5).astype(np.float32)[None, None]
    n = len(S["timesteps"])
    k = n - min(int(n * strength), n)
    if strength == 1:
        x, k = noise * S["init_noise_sigma"], 0
    else:
        x0 = encode(img, eps_1)
        x = S["noise_signal"][k] * x0 + S["noise_scale"][k] * noise
    mask_l = m[:, :, (np.arange(h) * H // h)][:, :, :, (np.arange(w) * W // w)]
    if which == "unet":
        masked_latents = encode(img * (m < 0.5), eps_2)
    else:
        x0 = encode(img, eps_1)
    cond = np.concatenate([pipe.encode_text([""])[0], pipe.encode_text([prompt])[0]])
    prev_x0 = None
    for i in range(k, n):
        inp = (S["c_in"][i] * x).astype(np.float32)
        if which == "unet":
            inp = np.concatenate([inp, mask_l, masked_latents], axis=1).astype(np.float32)
        out = run("unet", sample=np.concatenate([inp, inp]), timestep=np.full(2, S["timesteps"][i], np.float32),
                  encoder_hidden_states=cond)["out_sample"]
        mu, mc = np.split(out, 2)
        model = mu + g * (mc - mu)
        pred_x0 = S["x0_from_x"][i] * x + S["x0_from_m"][i] * model
        prev_x0 = pred_x0 if i == k else prev_x0
        x = (S["next_from_x"][i] * x + S["next_from_x0"][i] * pred_x0 + S["next_from_prev_x0"][i] * prev_x0
             ).astype(np.float32)
        prev_x0 = pred_x0
        if which == "blend":
            known = S["noise_signal"][i + 1] * x0 + S["noise_scale"][i + 1] * noise if i + 1 < n else x0
            x = ((1 - mask_l) * known + mask_l * x).astype(np.float32)
    theirs = run("vae_decoder", latent_sample=(x / lat["scaling_factor"] + lat["shift_factor"]).astype(np.float32))
    theirs = np.clip(theirs["sample"] / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert np.abs(ours - theirs).max() <= 1e-4
