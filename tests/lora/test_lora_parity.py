"""LoRA'd images match diffusers' ``load_lora_weights`` + ``fuse_lora``, fused at build and swapped at run time.

For the SD 1.x and SDXL tiny pipelines: one base artifact, one artifact with the LoRA fused at build (SD: the peft
file at 0.7; SDXL: its kohya copy at 1.3), and the base artifact with the LoRA applied at run
time (both layouts, both scales). Same latents, same DDIM tables, fp32: every image is within 1e-3 of diffusers'
on [0, 1]; the LoRA changes the image by far more than that; going back to no LoRA gives the base image bit for
bit.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffc.build import build  # noqa: E402
from diffc.exporter.tiny import write_tiny_pipeline  # noqa: E402
from diffc.runtime import load  # noqa: E402

pytestmark = pytest.mark.slow  # four tiny-pipeline builds

TOL = 1e-3
SCALES = (0.7, 1.3)
STEPS = 3
PROMPT, NEGATIVE = "a handwritten digit seven", "blurry"
#: diffc sampler and the diffusers scheduler it reproduces, per pipeline kind (the tiny configs' own families)
SAMPLERS = {"sd": ("ddim", "DDIMScheduler"), "sdxl": ("euler", "EulerDiscreteScheduler")}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def case(request, tmp_path_factory, lora_makers):
    make_peft_lora, kohya_copy = lora_makers
    kind = request.param
    root = tmp_path_factory.mktemp(f"lora-{kind}")
    folder = write_tiny_pipeline(root / "pipe", kind, seed=0)
    peft_file = make_peft_lora(folder, root / "loras" / "peft_lora.safetensors", seed=1)
    kohya_file = kohya_copy(peft_file, root / "loras" / "kohya_lora.safetensors", sdxl=kind == "sdxl")
    files = {SCALES[0]: peft_file, SCALES[1]: kohya_file}
    options = dict(steps=STEPS, sampler=SAMPLERS[kind][0], progress=False)
    base = build(folder, "cpu-fp32", root / "base", **options)
    # one build-time fusion per pipeline kind (suite time): SD fuses the peft file at 0.7, SDXL the kohya copy at
    # 1.3; both layouts and both scales still run at run time on both kinds
    s = SCALES[0] if kind == "sd" else SCALES[1]
    fused = {s: build(folder, "cpu-fp32", root / f"fused-{s}", loras=[(files[s], s)], **options)}
    return {"kind": kind, "folder": folder, "peft": peft_file, "kohya": kohya_file, "base": base, "fused": fused}


def _reference(case, latents, lora=None, scale=1.0):
    pipe = diffusers.DiffusionPipeline.from_pretrained(case["folder"], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scheduler = getattr(diffusers, SAMPLERS[case["kind"]][1])
    pipe.scheduler = scheduler.from_config({**pipe.scheduler.config, "clip_sample": False})
    if lora is not None:
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora(lora_scale=scale)
    return pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, num_inference_steps=STEPS, height=32, width=32,
                latents=torch.from_numpy(latents), output_type="np").images


def _run(pipe, latents):
    return pipe(PROMPT, negative_prompt=NEGATIVE, guidance=5.0, latents=latents)


def test_build_and_run_time_loras_match_diffusers(case):
    base = load(case["base"], progress=False)
    latents = base.initial_noise(seed=3, batch=1, height=32, width=32)
    base_image = _run(base, latents)
    assert float(np.abs(base_image - _reference(case, latents)).max()) <= TOL

    for scale in SCALES:
        ref = _reference(case, latents, case["peft"], scale)
        # not vacuous: the LoRA moves the image far beyond the tolerance
        assert float(np.abs(ref - base_image).max()) > 50 * TOL

        if scale in case["fused"]:
            fused = load(case["fused"][scale], progress=False)
            assert fused.manifest["loras"][0]["scale"] == scale
            err = float(np.abs(_run(fused, latents) - ref).max())
            assert err <= TOL, f"{case['kind']} build-time LoRA at {scale}: max |diffc - diffusers| = {err:.2e}"

        for layout in ("peft", "kohya"):
            base.set_loras({case[layout]: scale})
            err = float(np.abs(_run(base, latents) - ref).max())
            assert err <= TOL, f"{case['kind']} run-time {layout} LoRA at {scale}: max |diffc - diffusers| = {err:.2e}"

    base.set_loras({})
    assert base.loras == [] and base.lora_engines == set()
    assert np.array_equal(_run(base, latents), base_image), "swapping back to no LoRA must restore the base image"


def test_two_loras_add_up_and_load_takes_loras(case):
    """Two LoRAs at once are summed (0.7 + 0.6 of one LoRA = 1.3 of it), and load(loras=) is set_loras."""
    latents = np.random.default_rng(5).standard_normal((1, 4, 16, 16), dtype=np.float32)
    one = load(case["base"], progress=False, loras={case["peft"]: 1.3})
    two = load(case["base"], progress=False, loras={case["peft"]: 0.7, case["kohya"]: 0.6})
    assert [lo["scale"] for lo in two.loras] == [0.7, 0.6]
    assert float(np.abs(_run(one, latents) - _run(two, latents)).max()) <= TOL
