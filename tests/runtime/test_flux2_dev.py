"""FLUX.2 [dev] (``Flux2Pipeline``) artifacts reproduce diffusers' pipeline, image for image (issue 29).

The tiny pipeline (diffc.exporter.tiny_dit, ``flux2_dev``) has FLUX.2 [dev]'s parts: a
``Mistral3ForConditionalGeneration`` text encoder (a 4-layer language model here, conditioning on layers 1, 2, 3
as the real 40-layer one does on 10, 20, 30, and a Pixtral vision tower the text-to-image path never runs), the
Mistral chat template with FLUX.2's system message, a Flux2 transformer with the guidance embedding and
``AutoencoderKLFlux2``. It is built once with cpu-fp32 and run by the torch-free runtime against diffusers' own
call from the SAME initial latents (patchified, as ``Flux2Pipeline.prepare_latents`` takes them): the images
agree to ~1e-5 on [0, 1]. The ``cpu`` profile (OpenVINO, bf16 where the CPU has it) is held to a PSNR against
fp32, ``rtx-fp16`` builds real TensorRT-RTX engines ahead of time without a GPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffc.build import build  # noqa: E402
from diffc.build.plan import plan  # noqa: E402
from diffc.errors import InputError  # noqa: E402
from diffc.exporter import dit  # noqa: E402
from diffc.exporter.tiny_dit import write_tiny_dit_pipeline  # noqa: E402
from diffc.runtime import load  # noqa: E402

#: fp32 onnxruntime vs fp32 torch, after the VAE decoder (the issue asks 1e-3; this holds 100x tighter)
TOL = 1e-5
STEPS = 2
PROMPT = "A Red cat sitting on a table, oil painting [IMG]"
#: the tiny Mistral language model has 4 layers and conditions on 1, 2, 3 (the real one: 10, 20, 30 of 40)
TEXT_LAYERS = (1, 2, 3)
#: OpenVINO's bf16 inference (on CPUs with AVX512-BF16 / AMX; fp32 elsewhere) against fp32 onnxruntime
MIN_PSNR_DB = 30.0


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(pipeline folder, cpu-fp32 artifact), built once for the module."""
    root = tmp_path_factory.mktemp("flux2_dev")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dit, "FLUX2_DEV_TEXT_LAYERS", TEXT_LAYERS)
        folder = write_tiny_dit_pipeline(root / "pipe", "flux2_dev", seed=0, text_layers=len(TEXT_LAYERS) + 1)
        artifact = build(folder, "cpu-fp32", root / "artifact", steps=STEPS, progress=False)
    return folder, artifact


def _patchify(latents: np.ndarray) -> np.ndarray:
    """``Flux2Pipeline._patchify_latents``: [B, C, h, w] -> [B, 4C, h/2, w/2], channels (c, dy, dx)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def _compare(folder, artifact, *, height=32, width=32, seed=3, scale=4.0) -> float:
    runtime = load(artifact, progress=False)
    noise = runtime.initial_noise(seed=seed, batch=1, height=height, width=width)
    ours = runtime(PROMPT, guidance=scale, height=height, width=width, latents=noise)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=PROMPT, latents=torch.from_numpy(_patchify(noise)), text_encoder_out_layers=TEXT_LAYERS,
               num_inference_steps=STEPS, height=height, width=width, guidance_scale=scale,
               output_type="np").images
    assert ours.shape == ref.shape == (1, height, width, 3)
    assert ref.std() > 0.02  # the comparison is not vacuous: neither flat nor saturated
    return float(np.abs(ours - ref).max())


def test_dev_matches_diffusers(built):
    folder, artifact = built
    err = _compare(folder, artifact)
    assert err <= TOL, f"max |runtime - diffusers| = {err:.2e}"
    # another sequence length (another empirical mu) and another embedded guidance scale
    err = _compare(folder, artifact, height=16, width=48, seed=5, scale=2.5)
    assert err <= TOL, f"16x48, scale 2.5: max |runtime - diffusers| = {err:.2e}"


def test_dev_manifest(built):
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    folder, artifact = built
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["guidance"]["mode"] == "scale_input" and m["guidance"]["input"] == "guidance"
    assert m["denoiser"]["inputs"]["guidance"] == "guidance" and m["denoiser"]["position_ids"] == "flux2"
    assert m["denoiser"]["timestep_scale"] == 0.001
    assert m["sampler"]["dynamic_shift"]["mu_rule"] == "flux2_empirical"
    (encoder,) = m["text_encoders"]
    assert encoder["tokenizer_kind"] == "mistral_chat" and encoder["hidden_state"] == "stacked_hidden_states"
    assert encoder["chat_prefix"] == f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]"
    assert encoder["chat_suffix"] == "[/INST]" and encoder["max_length"] == 512
    # the template writes <s>; a tokenizer's own template call adds no special tokens
    assert encoder["add_special_tokens"] is False and encoder["prompt_removes"] == ["[IMG]"]
    assert encoder["padding_side"] == "left"
    # the language model alone is in the graph: no vision-tower weights in the artifact
    graph = artifact / m["components"]["text_encoder"]["file"]
    import onnx

    names = [i.name for i in onnx.load(graph, load_external_data=False).graph.initializer]
    assert names and not any("vision" in n or "projector" in n for n in names)
    # --dry-run plans the same from the config files alone
    planned = plan(folder, "cpu-fp32")
    assert planned["guidance"]["mode"] == "scale_input" and planned["family"] == "flux2"


def test_edit_mode_image_is_the_typed_error(built):
    """Flux2Pipeline's ``image=`` (reference images for editing) has no counterpart in a text-to-image artifact."""
    _, artifact = built
    runtime = load(artifact, progress=False)
    with pytest.raises(InputError, match="image"):
        runtime(PROMPT, height=32, width=32, image=np.zeros((32, 32, 3), np.float32), seed=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_chat_tokenizer_matches_transformers(tmp_path, side):
    """The runtime's chat tokenizer gives the ids and mask ``Flux2Pipeline._get_mistral_3_small_prompt_embeds``
    gets from transformers (format_input's system message and ``[IMG]`` removal, the template's own ``<s>``):
    short, empty, truncated prompts and a prompt holding a special token, with either padding side."""
    from types import SimpleNamespace

    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    from diffc.exporter.pipeline_data import flux2_dev_chat_parts, save_fast_tokenizer
    from diffc.exporter.tiny_dit import build_mistral_tokenizer
    from diffc.runtime.denoiser import ChatPromptTokenizer

    tok = build_mistral_tokenizer(padding_side=side)
    pipe = SimpleNamespace(tokenizer=tok, system_message="You are an image prompt encoder.")
    save_fast_tokenizer(pipe, tmp_path, "tokenizer", tmp_path)
    parts = flux2_dev_chat_parts(pipe, "tokenizer")
    assert parts["padding_side"] == side and parts["add_special_tokens"] is False
    length = 40
    ours = ChatPromptTokenizer(tmp_path / "tokenizer.json", length, parts["chat_prefix"], parts["chat_suffix"], side,
                               add_special_tokens=parts["add_special_tokens"], removed=parts["prompt_removes"])
    prompts = ["A Red cat, café crème", "", " ".join(["dragon riding a horse"] * 8), "a [INST] cat [IMG] dog"]
    ids, mask = ours(prompts)
    ref = tok.apply_chat_template(format_input(prompts, system_message=pipe.system_message), tokenize=True,
                                  return_dict=True, padding="max_length", truncation=True, max_length=length,
                                  add_generation_prompt=False)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    assert mask[2].all() and not mask[1].all()  # the long prompt was truncated, the empty one padded
    assert ((ids == tok.bos_token_id) & (mask == 1)).sum(axis=1).tolist() == [1] * len(prompts)  # one <s>, not two


def _build_patched(folder, profile, out):
    """``build`` with the shallow encoder's layers, as the module fixture builds."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dit, "FLUX2_DEV_TEXT_LAYERS", TEXT_LAYERS)
        return build(folder, profile, out, steps=STEPS, progress=False)


def test_cpu_openvino_build_is_close_to_fp32(built, tmp_path):
    """The default ``cpu`` profile (OpenVINO; bf16 compute where the CPU has it, gated against its fp32 twin at
    build) runs the dev artifact with the same loop: PSNR against the fp32 onnxruntime artifact's image."""
    pytest.importorskip("openvino")
    folder, fp32 = built
    art = _build_patched(folder, "cpu", tmp_path / "cpu.diffc")
    m = json.loads((art / "manifest.json").read_text())
    assert m["components"]["transformer"]["backend"] == "openvino"
    noise = load(fp32, progress=False).initial_noise(seed=3, batch=1, height=32, width=32)
    ref = load(fp32, progress=False)(PROMPT, guidance=4.0, height=32, width=32, latents=noise)
    ours = load(art, progress=False)(PROMPT, guidance=4.0, height=32, width=32, latents=noise)
    psnr = 10 * np.log10(1.0 / max(float(np.mean((ours - ref) ** 2)), 1e-12))
    assert psnr >= MIN_PSNR_DB, f"cpu (OpenVINO) vs cpu-fp32: {psnr:.1f} dB"


def test_rtx_fp16_builds_real_engines(built, tmp_path):
    """TensorRT-RTX fp16 engines for the dev artifact, built ahead of time for SM89 on this GPU-less machine (opt
    level 0, as tests/runtime/test_dit_parity.py does for the other families); they cannot run here."""
    from diffc.engines import tensorrt as trt_engine

    if trt_engine.available("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX is not installed (pip install 'diffc[tensorrt]')")
    folder, _ = built
    prof = tmp_path / "rtx.toml"
    prof.write_text('name = "rtx-fp16-o0"\nbackend = "tensorrt_rtx"\n[precision]\ndefault = "fp16"\n'
                    '[tensorrt]\ncompute_capabilities = ["SM89"]\nopt_level = 0\n')
    art = _build_patched(folder, prof, tmp_path / "rtx.diffc")
    m = json.loads((art / "manifest.json").read_text())
    assert {c["backend"] for c in m["components"].values()} == {"tensorrt_rtx"}
    transformer = m["components"]["transformer"]
    assert transformer["precision"] == "fp16" and transformer["file"].endswith(trt_engine.ENGINE_FILE)
    assert "guidance" in {t["name"] for t in transformer["inputs"]}
    assert m["components"]["text_encoder"]["shape_ranges"]["sequence"] == [512] * 3


def test_guidance_mode_follows_the_pipeline_class():
    """Flux2Pipeline feeds the scale to an embedding (none without one; never a CFG batch); Flux2KleinPipeline
    never feeds one, so a klein folder whose transformer has one is the wrong folder (ModelError)."""
    from diffc.build import families
    from diffc.errors import ModelError

    dev, klein = families.family_of("Flux2Pipeline"), families.family_of("Flux2KleinPipeline")
    assert families.guidance_mode(dev, {"guidance_embeds": True}, None)["mode"] == "scale_input"
    assert families.guidance_mode(dev, {"guidance_embeds": True}, None)["default_scale"] == 4.0
    assert families.guidance_mode(dev, {"guidance_embeds": False}, 3.5)["mode"] == "none"
    assert not families.uses_cfg(dev, {"guidance_embeds": True})
    assert families.guidance_mode(klein, {"guidance_embeds": False}, 4.0)["mode"] == "cfg"
    with pytest.raises(ModelError, match="guidance_embeds"):
        families.guidance_mode(klein, {"guidance_embeds": True}, 4.0)
