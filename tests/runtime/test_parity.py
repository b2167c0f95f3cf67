"""The torch-free runtime reproduces the diffusers pipeline, image for image, for every sampler.

Same initial latents, same scheduler config, same steps, same guidance, fp32: the runtime's image (ONNX
Runtime + the sampler tables) and diffusers' image (PyTorch + its scheduler) differ by at most 1e-3 on [0, 1].
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffc.runtime import load  # noqa: E402
from diffc.exporter.sampler import compile_sampler  # noqa: E402

TOL = 1e-3
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


@pytest.fixture(scope="module")
def sd(tiny_folder, tiny_artifact):
    """(folder, cpu-fp32 artifact, 4 DDIM steps): the run's shared build (tests/conftest.py; read-only)."""
    return tiny_folder("sd"), tiny_artifact("sd", steps=4, sampler="ddim")


@pytest.fixture(scope="module")
def lcm(tiny_folder, tiny_artifact):
    """(folder, cpu-fp32 artifact, 4 LCM steps): the run's shared build, also tests/runtime/test_img2img.py's."""
    return tiny_folder("lcm"), tiny_artifact("lcm", steps=4)


def _diffusers_pipe(folder, scheduler_class=None, **scheduler_overrides):
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if scheduler_class:
        cfg = dict(pipe.scheduler.config)
        cfg.setdefault("clip_sample", False)  # PNDM never clips; see diffc.build.export
        cfg.update(scheduler_overrides)
        pipe.scheduler = getattr(diffusers, scheduler_class).from_config(cfg)
    return pipe


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
@pytest.mark.parametrize("steps", [2, 4])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd_matches_diffusers(sd, kind, steps, prediction_type):
    folder, artifact = sd
    runtime = load(artifact, progress=False)
    cfg = dict(runtime.manifest["build"]["scheduler_config"], prediction_type=prediction_type)
    runtime.tables = compile_sampler(kind, cfg, steps)
    ref_pipe = _diffusers_pipe(folder, SCHEDULERS[kind], prediction_type=prediction_type)

    noise = runtime.initial_noise(seed=3, batch=1, height=32, width=32)
    ours = runtime("a handwritten digit seven", negative_prompt="blurry", guidance=5.0, latents=noise)
    ref = ref_pipe("a handwritten digit seven", negative_prompt="blurry", guidance_scale=5.0, num_inference_steps=steps,
                   height=32, width=32, latents=torch.from_numpy(noise), output_type="np").images
    assert ours.shape == ref.shape == (1, 32, 32, 3)
    err = float(np.abs(ours - ref).max())
    assert err <= TOL, f"{kind}/{prediction_type}/{steps} steps: max |runtime - diffusers| = {err:.2e}"
    # the comparison is not vacuous: images are neither flat nor saturated
    assert ref.std() > 0.02


def test_guidance_one_skips_uncond(sd):
    """guidance <= 1 runs the cond branch only, as diffusers does (do_classifier_free_guidance is False)."""
    folder, artifact = sd
    runtime = load(artifact, progress=False)
    ref_pipe = _diffusers_pipe(folder, "DDIMScheduler")
    noise = runtime.initial_noise(seed=1, batch=2, height=32, width=32)
    prompts = ["a cat", "a handwritten digit two"]
    ours = runtime(prompts, guidance=1.0, latents=noise)
    ref = ref_pipe(prompts, guidance_scale=1.0, num_inference_steps=4, height=32, width=32,
                   latents=torch.from_numpy(noise), output_type="np").images
    assert float(np.abs(ours - ref).max()) <= TOL


def test_other_size_matches(sd):
    folder, artifact = sd
    runtime = load(artifact, progress=False)
    ref_pipe = _diffusers_pipe(folder, "DDIMScheduler")
    noise = runtime.initial_noise(seed=2, batch=1, height=48, width=64)
    ours = runtime("a dog", height=48, width=64, latents=noise)
    ref = ref_pipe("a dog", num_inference_steps=4, height=48, width=64, latents=torch.from_numpy(noise),
                   output_type="np", guidance_scale=7.5).images
    assert ours.shape == (1, 48, 64, 3)
    assert float(np.abs(ours - ref).max()) <= TOL


def test_lcm_matches_diffusers(lcm, monkeypatch):
    folder, artifact = lcm
    runtime = load(artifact, progress=False)
    assert runtime.manifest["guidance"]["mode"] == "embedded"
    ref_pipe = _diffusers_pipe(folder)
    steps = runtime.tables.num_steps
    rng = np.random.default_rng(7)
    step_noise = [rng.standard_normal((1, 4, 16, 16), dtype=np.float32) for _ in range(steps)]
    queue = [torch.from_numpy(n) for n in step_noise]

    import diffusers.schedulers.scheduling_lcm as lcm_mod

    monkeypatch.setattr(lcm_mod, "randn_tensor", lambda shape, **kw: queue.pop(0).reshape(shape))
    noise = runtime.initial_noise(seed=5, batch=1, height=32, width=32)
    ours = runtime("a handwritten digit three", guidance=8.0, latents=noise, noise=step_noise)
    ref = ref_pipe("a handwritten digit three", guidance_scale=8.0, num_inference_steps=steps, height=32, width=32,
                   latents=torch.from_numpy(noise), output_type="np").images
    assert not queue or len(queue) == 1  # diffusers draws no noise on the last step
    err = float(np.abs(ours - ref).max())
    assert err <= TOL, f"LCM: max |runtime - diffusers| = {err:.2e}"


def test_same_seed_same_image(sd):
    _, artifact = sd
    runtime = load(artifact, progress=False)
    a = runtime("a tree", seed=11)
    b = runtime("a tree", seed=11)
    c = runtime("a tree", seed=12)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
