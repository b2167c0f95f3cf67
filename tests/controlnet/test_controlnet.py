"""ControlNet end to end: a tiny ``StableDiffusionControlNetPipeline`` folder with two ControlNets (saved as
diffusers' MultiControlNetModel: ``controlnet``, ``controlnet_1``) built once with cpu-fp32; its images against
diffusers' with the same latents, with one ControlNet on (against diffusers' single-ControlNet pipeline) and both,
the CLI, OpenVINO on its graphs, and the refusals (build and run). One build keeps the module's cost to one
artifact; a one-ControlNet folder is planned and refused here, not built."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the ControlNet tests build artifacts: the export extra")
diffusers = pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

import diffc  # noqa: E402
from diffc.build.plan import plan  # noqa: E402
from diffc.cli import main  # noqa: E402
from diffc.errors import InputError, ProfileError  # noqa: E402
from diffc.exporter.tiny import write_tiny_controlnet_pipeline  # noqa: E402
from diffc.runtime import controlnet  # noqa: E402

TOL = 1e-3
PROMPT = "a handwritten digit seven"
STEPS = 2  # with the windows below: each ControlNet runs on one of the two steps
#: ControlNet pipeline's scheduler as diffc's ``ddim`` sampler runs it (PNDM never clips; see diffc.build.export)
SAMPLER = "ddim"


def _build(tmp_path_factory, controlnets: int):
    root = tmp_path_factory.mktemp(f"controlnet{controlnets}")
    folder = write_tiny_controlnet_pipeline(root / "pipe", controlnets=controlnets, seed=0)
    artifact = diffc.build(folder, "cpu-fp32", root / "artifact", steps=STEPS, sampler=SAMPLER, progress=False)
    return folder, artifact


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _build(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def one_folder(tmp_path_factory):
    """A one-ControlNet folder (a plain ControlNetModel in ``controlnet``), not built."""
    return write_tiny_controlnet_pipeline(tmp_path_factory.mktemp("controlnet1") / "pipe", controlnets=1, seed=0)


def _diffusers(folder, only: int | None = None):
    """diffusers' pipeline of ``folder`` on diffc's sampler; ``only``: with that ControlNet alone (a plain
    ControlNetModel, as a one-ControlNet folder loads)."""
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(folder, dtype=torch.float32)
    if only is not None:
        single = {**pipe.components, "controlnet": pipe.controlnet.nets[only]}
        pipe = diffusers.StableDiffusionControlNetPipeline(**single)
    pipe.set_progress_bar_config(disable=True)
    cfg = dict(pipe.scheduler.config)
    cfg.setdefault("clip_sample", False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(cfg)
    return pipe


def _control(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((32, 32, 3)).astype(np.float32)


def _latents(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 16, 16)).astype(np.float32)


def test_one_controlnet_matches_diffusers(two):
    """ControlNet 0 at scale 0.8 and ControlNet 1 at scale 0 (never run) is diffusers' one-ControlNet pipeline."""
    folder, artifact = two
    pipe = diffc.load(artifact, progress=False)
    image, lat = _control(0), _latents()
    ours = pipe(PROMPT, control_image=[image, _control(9)], controlnet_scale=[0.8, 0.0], latents=lat, guidance=7.5)
    ref_pipe = _diffusers(folder, only=0)
    ref = ref_pipe(PROMPT, image=image[None], controlnet_conditioning_scale=0.8, num_inference_steps=STEPS,
                   guidance_scale=7.5, latents=torch.from_numpy(lat), output_type="np").images
    assert ours.shape == ref.shape == (1, 32, 32, 3)
    err = float(np.abs(ours - ref).max())
    assert err <= TOL, f"max |diffc - diffusers| = {err:.2e}"
    # not vacuous: the ControlNet changes the image, and without a control image its residuals are zero
    plain = pipe(PROMPT, latents=lat, guidance=7.5)
    assert float(np.abs(plain - ours).max()) > 0.02
    ref_off = ref_pipe(PROMPT, image=image[None], controlnet_conditioning_scale=0.0, num_inference_steps=STEPS,
                       guidance_scale=7.5, latents=torch.from_numpy(lat), output_type="np").images
    assert float(np.abs(plain - ref_off).max()) <= TOL


def test_two_controlnets_match_diffusers(two):
    """Two ControlNets, each with its own scale and guidance window (diffusers' controlnet_keep), guidance <= 1
    (no uncond half: the control images are not duplicated) and CFG."""
    folder, artifact = two
    pipe, ref_pipe = diffc.load(artifact, progress=False), _diffusers(folder)
    images, lat = [_control(1), _control(2)], _latents(4)
    window = dict(control_guidance_start=[0.0, 0.25], control_guidance_end=[0.75, 1.0])
    for guidance in (1.0, 6.0):
        ours = pipe(PROMPT, control_image=images, controlnet_scale=[0.7, 1.3], latents=lat, guidance=guidance,
                    **window)
        ref = ref_pipe(PROMPT, image=[im[None] for im in images], controlnet_conditioning_scale=[0.7, 1.3],
                       num_inference_steps=STEPS, guidance_scale=guidance, latents=torch.from_numpy(lat),
                       output_type="np", **window).images
        err = float(np.abs(ours - ref).max())
        assert err <= TOL, f"guidance {guidance}: max |diffc - diffusers| = {err:.2e}"


def test_manifest_entry(two):
    m = json.loads((two[1] / "manifest.json").read_text())
    entry, nets = m["controlnets"], ["controlnet", "controlnet_1"]
    assert m["schema_version"] == 3 and entry["version"] == 1 and entry["components"] == nets
    assert entry["conditioning_scale"] == [1.0, 1.0] and entry["guess_mode"] is False
    assert (entry["guidance_start"], entry["guidance_end"]) == ([0.0, 0.0], [1.0, 1.0])
    assert entry["control_image"] == {"input": "controlnet_cond", "size": "output", "resize": "lanczos",
                                      "channels": "rgb", "range": [0.0, 1.0], "normalize": False, "cfg": "duplicate"}
    residuals = [r["name"] for r in entry["residuals"]]
    # the tiny UNet: conv_in, block 0 (a layer, a downsampler), block 1 (a layer), then mid
    assert residuals == [f"down_block_residual_{k}" for k in range(4)] + ["mid_block_residual"]
    assert [t["name"] for t in m["components"]["unet"]["inputs"]][-5:] == residuals
    for net in nets:
        assert [t["name"] for t in m["components"][net]["outputs"]] == residuals
        assert m["components"][net]["shape_ranges"]["image_height"] == m["image"]["height"]


def test_cli_round_trip(two, tmp_path):
    """--control-image once per ControlNet, --control-scale once for all: the image the Python call gives."""
    _, artifact = two
    edges, noise = tmp_path / "edges.png", tmp_path / "noise.png"
    Image.fromarray((controlnet.gate_image(32, 32) * 255).astype(np.uint8)).save(edges)
    Image.fromarray((_control(5) * 255).astype(np.uint8)).save(noise)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(main, ["run", str(artifact), "--prompt", PROMPT, "--seed", "5", "--control-image",
                                       str(edges), "--control-image", str(noise), "--control-scale", "0.8",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    want = diffc.load(artifact, progress=False)(PROMPT, seed=5, control_image=[edges, noise], controlnet_scale=0.8)
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert np.abs(got - want[0]).max() <= 1 / 255 + 1e-6
    plain = diffc.load(artifact, progress=False)(PROMPT, seed=5)
    assert np.abs(plain - want).max() > 0.02


def test_bad_inputs_refused(two, tmp_path):
    _, artifact = two
    pipe = diffc.load(artifact, progress=False)
    image = _control(0)
    both = [image, image]
    with pytest.raises(InputError, match="image-to-image with a ControlNet"):
        pipe(PROMPT, image=image, control_image=both)
    with pytest.raises(InputError, match="without control_image"):
        pipe(PROMPT, controlnet_scale=0.5)
    with pytest.raises(InputError, match="below control_guidance_end"):
        pipe(PROMPT, control_image=both, control_guidance_start=0.6, control_guidance_end=0.4)
    with pytest.raises(InputError, match="controlnet_scale must be a number"):
        pipe(PROMPT, control_image=both, controlnet_scale=float("nan"))
    with pytest.raises(InputError, match="another aspect ratio"):
        pipe(PROMPT, control_image=[np.zeros((32, 48, 3), np.float32), image], height=32, width=32)
    # several ControlNets: one image per ControlNet, one scale for all or one per ControlNet
    with pytest.raises(InputError, match="has 2 ControlNets"):
        pipe(PROMPT, control_image=image)
    with pytest.raises(InputError, match="3 values of controlnet_scale for 2"):
        pipe(PROMPT, control_image=both, controlnet_scale=[1.0, 1.0, 1.0])
    # an artifact without ControlNet takes no control image
    plain = SimpleNamespace(manifest={k: v for k, v in pipe.manifest.items() if k != "controlnets"})
    with pytest.raises(InputError, match="has no ControlNet"):
        controlnet.prepare(plain, image, None, None, None, 1, None, None)
    # the CLI: an unreadable control image is refused before the artifact loads, and nothing is written
    bad, out = tmp_path / "bad.png", tmp_path / "out.png"
    bad.write_text("not an image")
    result = CliRunner().invoke(main, ["run", str(artifact), "--prompt", PROMPT, "--control-image", str(bad),
                                       "--out", str(out)])
    assert result.exit_code != 0 and "cannot read --control-image" in result.output and not out.exists()
    result = CliRunner().invoke(main, ["run", str(artifact), "--prompt", PROMPT, "--control-scale", "0.5",
                                       "--out", str(out)])
    assert result.exit_code != 0 and "without --control-image" in result.output and not out.exists()


def test_build_refuses_int8_and_cache(one_folder, tmp_path):
    """Before any export: the UNet's int8 calibration would never see the residual inputs, and a cached shallow
    step would need the residuals of its step. A one-ControlNet folder plans its one ControlNet."""
    folder = tmp_path / "pipe"
    shutil.copytree(one_folder, folder)
    for profile, match in (("cpu-int8", "does not build with ControlNet"), ("cpu-cache", "does not combine")):
        with pytest.raises(ProfileError, match=match):
            diffc.build(folder, profile, tmp_path / profile, progress=False)
        assert not (tmp_path / profile).exists()
        with pytest.raises(ProfileError, match=match):
            plan(folder, profile)
    planned = plan(folder, "cpu-fp32")
    assert list(planned["components"]) == ["text_encoder", "unet", "controlnet", "vae_decoder", "vae_encoder"]
    assert planned["components"]["unet"]["shape_ranges"]["height_div2"] == [4, 8, 16]


def test_openvino_runs_the_controlnet_graphs(two):
    """OpenVINO runs the ControlNet and the residual-input UNet graphs as onnxruntime does, at a non-square size
    other than the default (every residual axis dynamic). A full `cpu` (OpenVINO bf16) build is the same graphs
    after OpenVINO's pass list, quality-gated with the ControlNet on."""
    pytest.importorskip("openvino")
    from diffc.engines.onnxruntime import Session as OrtSession
    from diffc.engines.openvino import Session as OvSession

    artifact = two[1]
    m = json.loads((artifact / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    h, w = 12, 8
    dims = {"batch": 2, "sequence": 77, "height": h, "width": w, "height_div2": h // 2, "width_div2": w // 2,
            "image_height": 2 * h, "image_width": 2 * w}

    def feed(tensor):
        shape = [d if isinstance(d, int) else dims[d] for d in tensor["shape"]]
        if tensor["name"] == "timestep":
            return np.full(shape, 500.0, np.float32)
        return rng.standard_normal(shape).astype(np.float32)

    for name in ("controlnet", "unet"):
        comp = m["components"][name]
        feeds = {t["name"]: feed(t) for t in comp["inputs"]}
        want = OrtSession(artifact / comp["file"]).run(feeds)
        got = OvSession(artifact / comp["file"], precision="fp32").run(feeds)
        for out, ref in want.items():
            assert got[out].shape == ref.shape
            assert float(np.abs(got[out] - ref).max()) <= 1e-4, f"{name}.{out}"
