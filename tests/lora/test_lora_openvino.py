"""Run-time LoRAs on OpenVINO artifacts: the IR's constants replaced before the plugin compiles.

fp32 IR (a user profile with ``precision.default = "fp32"``): the swapped image matches diffusers' ``load_lora_weights``
+ ``fuse_lora`` within 1e-3, as the onnxruntime swap does. bf16 (the default ``cpu`` profile, weights stored fp16 in
the IR): the build records the fp16 constants (matched by the fp16-rounded fingerprint); the weights the swap hands
to OpenVINO are diffusers' fused weights within one fp16 rounding, and the image moves to diffusers' LoRA image
(bf16 compute keeps it from matching to 1e-3). Back to no LoRA: the base image bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("openvino")

from diffc.build import build  # noqa: E402
from diffc.exporter.tiny import write_tiny_pipeline  # noqa: E402
from diffc.runtime import load  # noqa: E402

STEPS = 3
SCALE = 0.8
PROMPT, NEGATIVE = "a handwritten digit seven", "blurry"
OV_FP32 = """name = "openvino-fp32"
backend = "openvino"
[precision]
default = "fp32"
[shapes]
height = [32, 32, 32]
width = [32, 32, 32]
batch = [1, 1, 2]
[sampler]
kind = "ddim"
steps = 3
guidance = 5.0
"""


@pytest.fixture(scope="module")
def case(tmp_path_factory, lora_makers):
    make_peft_lora, _ = lora_makers
    root = tmp_path_factory.mktemp("lora-ov")
    folder = write_tiny_pipeline(root / "pipe", "sd", seed=0)
    lora = make_peft_lora(folder, root / "loras" / "peft_lora.safetensors", seed=1)
    profile = root / "openvino-fp32.toml"
    profile.write_text(OV_FP32)
    options = dict(steps=STEPS, sampler="ddim", progress=False)
    return {"folder": folder, "lora": lora,
            "fp32": build(folder, profile, root / "fp32", **options),
            "bf16": build(folder, "cpu", root / "bf16", **options)}


def _run(pipe, latents):
    return pipe(PROMPT, negative_prompt=NEGATIVE, guidance=5.0, latents=latents)


def _fused(case):
    pipe = diffusers.DiffusionPipeline.from_pretrained(case["folder"], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config({**pipe.scheduler.config, "clip_sample": False})
    pipe.load_lora_weights(str(case["lora"]))
    pipe.fuse_lora(lora_scale=SCALE)
    pipe.unload_lora_weights()  # the fused weights stay; the peft wrappers go (as diffc's build does)
    return pipe


def _reference(case, latents):
    return _fused(case)(PROMPT, negative_prompt=NEGATIVE, guidance_scale=5.0, num_inference_steps=STEPS, height=32,
                        width=32, latents=torch.from_numpy(latents), output_type="np").images


def _addressable(manifest, dtype):
    return [at for mods in manifest["lora_targets"]["modules"].values() for rec in mods.values()
            for at in rec["at"] if at.get("dtype") == dtype]


def test_fp32_ir_swap_matches_diffusers_and_restores(case):
    pipe = load(case["fp32"], progress=False)
    assert pipe.manifest["components"]["unet"]["backend"] == "openvino"
    assert _addressable(pipe.manifest, "float32"), "the fp32 IR's weights must be recorded as LoRA targets"
    latents = pipe.initial_noise(seed=3, batch=1, height=32, width=32)
    base = _run(pipe, latents)
    ref = _reference(case, latents)
    assert float(np.abs(ref - base).max()) > 0.05, "the LoRA must move the image (else the test proves nothing)"
    pipe.set_loras({case["lora"]: SCALE})
    assert pipe.lora_engines >= {"unet"}
    err = float(np.abs(_run(pipe, latents) - ref).max())
    assert err <= 1e-3, f"OpenVINO fp32 run-time LoRA: max |diffc - diffusers| = {err:.2e}"
    pipe.set_loras({})
    assert np.array_equal(_run(pipe, latents), base), "back to no LoRA must restore the base image"


def test_bf16_ir_swap_matches_diffusers_fusion(case):
    from diffc.exporter.lora import weight_modules
    from diffc.runtime.lora import _read_base, plan, specs
    from diffc.runtime.manifest import artifact_path

    pipe = load(case["bf16"], progress=False)
    at = _addressable(pipe.manifest, "float16")
    assert at and all(a["file"].endswith(".bin") for a in at), "bf16 IR weights are fp16 constants in model.bin"
    # the weights handed to OpenVINO: the IR's fp16 base + the LoRA's delta, so diffusers' fused fp32 weight up to
    # the one rounding of the base weight to fp16 (half an fp16 step at the base weight's magnitude; one allowed)
    swap_plan = plan(pipe.manifest, specs({case["lora"]: SCALE}))
    fused = weight_modules(_fused(case))
    checked = 0
    for engine, items in swap_plan.per_engine.items():
        got = swap_plan.weights(pipe.root, engine, artifact_path)
        for where, (comp, module) in items:
            want = fused[comp][module].weight.detach().float().numpy()
            want = (want.reshape(want.shape[0], -1).T if where["transposed"] else want).reshape(where["dims"])
            have = got[where["initializer"]]
            base16 = _read_base(pipe.root, where, artifact_path)  # the IR's fp16 base weight
            step = np.spacing(np.abs(base16).astype(np.float16)).astype(np.float32)
            assert np.all(np.abs(have - want) <= step), \
                f"{comp}.{module}: swapped weight is more than one fp16 step from diffusers' fused weight"
            checked += 1
    assert checked >= 10
    latents = pipe.initial_noise(seed=4, batch=1, height=32, width=32)
    base = _run(pipe, latents)
    ref = _reference(case, latents)
    pipe.set_loras({case["lora"]: SCALE})
    before, after = float(np.abs(base - ref).max()), float(np.abs(_run(pipe, latents) - ref).max())
    assert after < 0.5 * before, f"bf16 swap: {before:.3g} from diffusers' LoRA image before, {after:.3g} after"
    pipe.set_loras(None)
    assert np.array_equal(_run(pipe, latents), base)
