"""Image-to-image inputs as untrusted input: every bad image, strength or artifact is a typed InputError that says
what to do, raised before any engine runs (and, from the command line, before the artifact loads), with nothing
written; and the build refuses a 9-channel inpainting UNet saved as a text-to-image pipeline."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from diffc.cli import main
from diffc.errors import InputError, UnsupportedPipelineError
from diffc.runtime import load
from diffc.runtime.img2img import load_image
from diffc.runtime.pipeline import Pipeline

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def pipe(demo_cpu_artifact) -> Pipeline:
    return load(demo_cpu_artifact, progress=False)


@pytest.fixture(scope="module")
def digit(pipe) -> np.ndarray:
    """A 32x32 digit the demo drew itself, as uint8 RGB."""
    return (pipe(PROMPT, seed=1)[0] * 255).round().astype(np.uint8)


def _never_runs(pipe, monkeypatch):
    """Make every engine session fail loudly: the checks must refuse before any of them runs."""
    class Refuse:
        def run(self, *a, **k):
            raise AssertionError("an engine ran before the input was refused")

    monkeypatch.setattr(pipe, "sessions", {name: Refuse() for name in pipe.sessions})


@pytest.mark.parametrize("kwargs, message", [
    ({"strength": 0.0}, r"strength must be a number in \(0, 1\]"),
    ({"strength": -0.2}, r"strength must be a number in \(0, 1\]"),
    ({"strength": 1.5}, r"strength must be a number in \(0, 1\]"),
    ({"strength": math.nan}, r"strength must be a number in \(0, 1\]"),
    ({"strength": "0.5"}, r"strength must be a number in \(0, 1\]"),
    ({"strength": True}, r"strength must be a number in \(0, 1\]"),
    ({"strength": 0.2}, r"strength 0.2 with 4 sampler steps leaves no step to run.*0\.25"),
    ({"height": 32, "width": 64}, r"image is 32x32 \(width x height\), another aspect ratio than the requested 64x32"),
    ({"image": np.zeros((32, 32), np.int64)}, r"image has dtype int64; pass uint8 pixels or floats in \[0, 1\]"),
    ({"image": np.zeros((32, 32, 2), np.uint8)}, r"image must be an image array of shape \(height, width, 3\)"),
    ({"image": np.zeros((0, 32, 3), np.uint8)}, r"image must be an image array"),
    ({"image": np.full((32, 32, 3), 1.5, np.float32)}, r"float images must be in \[0, 1\]"),
    ({"image": np.full((32, 32, 3), np.nan, np.float32)}, r"image holds NaN or infinite values"),
    ({"image": [np.zeros((32, 32, 3), np.uint8)] * 2}, r"2 images for 1 prompts"),
    ({"image": 7}, r"image must be an image file's path, a PIL image or a numpy array"),
    ({"encoder_noise": np.zeros((1, 4, 4, 4), np.float32)}, r"encoder_noise must be a finite numpy array of shape"),
])
def test_bad_image_arguments_are_input_errors(pipe, digit, monkeypatch, kwargs, message):
    kwargs = {"image": digit, "strength": 0.5, **kwargs}
    _never_runs(pipe, monkeypatch)
    with pytest.raises(InputError, match=message):
        pipe(PROMPT, **kwargs)


def test_strength_without_image(pipe, monkeypatch):
    _never_runs(pipe, monkeypatch)
    with pytest.raises(InputError, match=r"strength is given without an image; pass image="):
        pipe(PROMPT, strength=0.5)


@pytest.mark.parametrize("content, message", [
    (b"not an image at all", r"cannot read image .* as an image .*; pass a PNG, JPEG or WebP image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, r"cannot read image .* as an image"),  # a PNG signature, cut off
])
def test_unreadable_image_files(pipe, tmp_path, monkeypatch, content, message):
    _never_runs(pipe, monkeypatch)
    path = tmp_path / "in.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        pipe(PROMPT, image=path, strength=0.5)
    with pytest.raises(InputError, match=r"does not exist"):
        pipe(PROMPT, image=tmp_path / "missing.png", strength=0.5)
    with pytest.raises(InputError, match=r"is a folder"):
        pipe(PROMPT, image=tmp_path, strength=0.5)


def test_artifact_without_vae_encoder(demo_cpu_artifact, digit, tmp_path):
    art = tmp_path / "no-encoder"
    shutil.copytree(demo_cpu_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    assert "vae_encoder" in manifest["components"]
    del manifest["components"]["vae_encoder"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    p = load(art, progress=False)
    with pytest.raises(InputError, match=r"this artifact has no vae_encoder component, so it cannot take an input "
                                         r"image; rebuild it"):
        p(PROMPT, image=digit, strength=0.5)
    assert p(PROMPT).shape == (1, 32, 32, 3)  # text-to-image still works


def test_resize_rule(pipe, digit):
    """Same aspect ratio: resized (Lanczos) to the request; no size asked: the image's own size if the artifact
    covers it (48x64 here), else the default size -- and then its aspect ratio must match."""
    big = np.asarray(Image.fromarray(digit).resize((64, 64), Image.Resampling.NEAREST))
    assert pipe(PROMPT, image=big, strength=0.5, height=32, width=32).shape == (1, 32, 32, 3)
    assert pipe(PROMPT, image=big, strength=0.5).shape == (1, 64, 64, 3)
    wide = np.zeros((48, 64, 3), np.uint8)
    assert pipe(PROMPT, image=wide, strength=0.5).shape == (1, 48, 64, 3)
    assert pipe(PROMPT, image=wide, strength=0.5, width=32).shape == (1, 24, 32, 3)  # height follows the image
    odd = np.zeros((30, 45, 3), np.uint8)  # not covered, and not the default 32x32's aspect ratio
    with pytest.raises(InputError, match=r"image is 45x30 .* crop or pad the image, or ask for a size of its aspect "
                                         r"ratio \(e.g. width 48 at height 32\)"):
        pipe(PROMPT, image=odd, strength=0.5)


def test_a_digit_in_a_redrawn_digit_out(pipe, digit, tmp_path):
    """The demo redraws its own seven: the lower the strength, the closer the result stays to the input; a path,
    a PIL image and the array give the same image; the same seed gives the same image."""
    other = pipe(PROMPT, seed=2)[0]
    path = tmp_path / "seven.png"
    Image.fromarray(digit).save(path)
    low = pipe(PROMPT, image=path, strength=0.5, seed=3)[0]
    high = pipe(PROMPT, image=digit, strength=1.0, seed=3)[0]
    x = digit.astype(np.float32) / 255
    assert np.abs(low - x).mean() < np.abs(high - x).mean()
    assert np.abs(low - x).mean() < np.abs(other - x).mean()
    assert np.array_equal(low, pipe(PROMPT, image=Image.open(path), strength=0.5, seed=3)[0])
    assert np.array_equal(low, pipe(PROMPT, image=digit, strength=0.5, seed=3)[0])
    assert not np.array_equal(low, pipe(PROMPT, image=digit, strength=0.5, seed=4)[0])


@FAST
@given(hnp.arrays(st.sampled_from([np.uint8, np.float32, np.float64, np.int16]),
                  hnp.array_shapes(min_dims=2, max_dims=3, min_side=0, max_side=6)))
def test_any_array_is_an_image_or_an_input_error(a):
    try:
        out = load_image(a)
    except InputError:
        return
    assert out.dtype == np.float32 and out.ndim == 3 and out.shape[2] == 3
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


# ----------------------------------------------------------------------------------------------- the command line


def _run(*args):
    return CliRunner().invoke(main, ["-q", *args])


@pytest.mark.parametrize("flags, message", [
    (["--image", "MISSING"], r"--image .*missing.png does not exist"),
    (["--image", "NOTIMAGE"], r"cannot read --image .* as an image"),
    (["--strength", "0.5"], r"--strength is given without --image"),
    (["--image", "GOOD", "--strength", "1.5"], r"--strength must be a number in \(0, 1\]"),
    (["--image", "GOOD", "--strength", "nan"], r"--strength must be a number in \(0, 1\]"),
])
def test_run_image_flags_are_checked_before_loading(tmp_path, flags, message):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good)
    bad.write_text("text")
    paths = {"MISSING": str(tmp_path / "missing.png"), "NOTIMAGE": str(bad), "GOOD": str(good)}
    flags = [paths.get(f, f) for f in flags]
    out = tmp_path / "out.png"
    # the artifact does not exist: the flag must be refused before diffc even looks for it
    r = _run("run", str(tmp_path / "no-artifact"), "--prompt", "x", "-o", str(out), *flags)
    assert r.exit_code == 2, r.output
    assert "error (input_error)" in r.output
    assert __import__("re").search(message, r.output), r.output
    assert not out.exists()


def test_run_image_to_image(demo_cpu_artifact, tmp_path, digit):
    src, out = tmp_path / "seven.png", tmp_path / "redrawn.png"
    Image.fromarray(digit).save(src)
    r = _run("run", str(demo_cpu_artifact), "--prompt", PROMPT, "--image", str(src), "--strength", "0.6",
             "-o", str(out))
    assert r.exit_code == 0, r.output
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)
    r = _run("run", str(demo_cpu_artifact), "--prompt", PROMPT, "--image", str(src), "--height", "32", "--width",
             "64", "-o", str(tmp_path / "wide.png"))
    assert r.exit_code == 2 and "another aspect ratio" in r.output
    assert not (tmp_path / "wide.png").exists()


# ----------------------------------------------------------------------------------------------- the build


def test_build_refuses_the_inpainting_unet(tmp_path):
    """The 9-channel inpainting UNet saved as StableDiffusionPipeline: refused at planning (--dry-run and build),
    not at `diffc run`."""
    pytest.importorskip("torch")
    from diffc.build.plan import plan
    from diffc.exporter.tiny import write_tiny_pipeline

    folder = write_tiny_pipeline(tmp_path / "pipe", "sd", seed=0)
    cfg_path = folder / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "in_channels": 9}))
    with pytest.raises(UnsupportedPipelineError, match=r"an inpainting UNet \(9 input channels: 4 latent \+ 1 mask "
                                                       r"\+ 4 masked-image latent; 4 out\).*build the model's "
                                                       r"text-to-image checkpoint"):
        plan(folder, "cpu-fp32")
    out = tmp_path / "artifact"
    r = _run("build", str(folder), "--profile", "cpu-fp32", "--out", str(out))
    assert r.exit_code == 2 and "unsupported_pipeline" in r.output, r.output
    assert not out.exists()


def test_img2img_pipeline_classes_plan(tmp_path):
    """StableDiffusionImg2ImgPipeline folders hold the same components and build (planned here: the dry run)."""
    pytest.importorskip("torch")
    from diffc.build.plan import plan
    from diffc.exporter.tiny import write_tiny_pipeline

    folder = write_tiny_pipeline(tmp_path / "pipe", "sd", seed=0)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionImg2ImgPipeline"}))
    planned = plan(folder, "cpu-fp32")
    assert list(planned["components"]) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert planned["components"]["vae_encoder"]["shape_ranges"]["image_height"] == planned["image"]["height"]
