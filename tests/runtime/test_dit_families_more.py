"""FLUX.2 [klein] and Sana-Sprint artifacts reproduce their diffusers pipelines, image for image (issue 29).

Each tiny pipeline (diffc.exporter.tiny_dit) is built once with the cpu-fp32 profile and run by the torch-free
runtime; diffusers' own pipeline call gets the SAME initial latents (FLUX.2 [klein]: patchified 2x2, as
``Flux2KleinPipeline.prepare_latents`` takes them) and, for Sana-Sprint's SCM sampler, the same injected noise.
The images must agree to ~1e-5 on [0, 1] (fp32 onnxruntime against fp32 torch). FLUX.2's schedule shift depends
on the image sequence length and the step count (``compute_empirical_mu``), so klein is also compared at a
non-square size. FLUX.2 [dev] (``Flux2Pipeline``, Mistral-3 text encoder) is tests/runtime/test_flux2_dev.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffc.build import build  # noqa: E402
from diffc.build.plan import plan  # noqa: E402
from diffc.exporter import dit  # noqa: E402
from diffc.exporter.tiny_dit import write_tiny_dit_pipeline  # noqa: E402
from diffc.runtime import load  # noqa: E402

#: fp32 onnxruntime vs fp32 torch, after the VAE decoder
TOL = 1e-5
PROMPT = "A Red cat sitting on a table, oil painting"
#: kind -> steps the artifact is built for (Sana-Sprint: 2, the step count its intermediate timestep is for)
STEPS = {"flux2_klein": 2, "sana_sprint": 2}
#: klein's Qwen3 here has 4 layers and conditions on 1, 2, 3 (the real pipeline: 9, 18, 27 of 36; the tiny
#: fixture's default 28-layer encoder costs seven times the export and graph cleanup, for the same code path)
TEXT_LAYERS = (1, 2, 3)


@pytest.fixture(scope="module", params=sorted(STEPS))
def built(request, tmp_path_factory):
    """(kind, pipeline folder, cpu-fp32 artifact), one module-scoped build per family."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    with pytest.MonkeyPatch.context() as patch:
        if kind == "flux2_klein":
            patch.setattr(dit, "FLUX2_TEXT_LAYERS", TEXT_LAYERS)
        folder = write_tiny_dit_pipeline(root / "pipe", kind, seed=0, text_layers=len(TEXT_LAYERS) + 1)
        artifact = build(folder, "cpu-fp32", root / "artifact", steps=STEPS[kind], progress=False)
    return kind, folder, artifact


def _patchify(latents: np.ndarray) -> np.ndarray:
    """``Flux2Pipeline._patchify_latents``: [B, C, h, w] -> [B, 4C, h/2, w/2], channels (c, dy, dx)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def _compare(kind, folder, artifact, monkeypatch, *, height=32, width=32, seed=3, scale=4.0) -> float:
    runtime = load(artifact, progress=False)
    noise = runtime.initial_noise(seed=seed, batch=1, height=height, width=width)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=STEPS[kind], height=height, width=width, output_type="np",
                  guidance_scale=scale)
    if kind == "flux2_klein":
        ours = runtime(PROMPT, guidance=scale, height=height, width=width, latents=noise)
        ref = pipe(prompt=PROMPT, latents=torch.from_numpy(_patchify(noise)), text_encoder_out_layers=TEXT_LAYERS,
                   **kwargs).images
    else:
        # SCM injects fresh noise before every step but the last: the same draws on both sides
        rng = np.random.default_rng(seed + 100)
        step_noise = [rng.standard_normal(noise.shape, dtype=np.float32) for _ in range(STEPS[kind])]
        queue = [torch.from_numpy(n) for n in step_noise]
        import diffusers.schedulers.scheduling_scm as scm_mod

        # SCMScheduler.step draws randn_tensor(...) * sigma_data; the runtime's noise is in units of sigma_data
        monkeypatch.setattr(scm_mod, "randn_tensor", lambda shape, **kw: queue.pop(0).reshape(shape))
        ours = runtime(PROMPT, guidance=scale, height=height, width=width, latents=noise, noise=step_noise)
        ref = pipe(PROMPT, latents=torch.from_numpy(noise), use_resolution_binning=False, **kwargs).images
        assert not queue  # one draw per step (the last one's is multiplied by sin(0) = 0)
    assert ours.shape == ref.shape == (1, height, width, 3)
    assert ref.std() > 0.02  # the comparison is not vacuous: neither flat nor saturated
    return float(np.abs(ours - ref).max())


def test_family_matches_diffusers(built, monkeypatch):
    kind, folder, artifact = built
    err = _compare(kind, folder, artifact, monkeypatch)
    assert err <= TOL, f"{kind}: max |runtime - diffusers| = {err:.2e}"
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["guidance"]["mode"] == {"flux2_klein": "cfg", "sana_sprint": "scale_input"}[kind]
    assert m["sampler"]["kind"] == {"flux2_klein": "flow_euler", "sana_sprint": "scm"}[kind]
    # klein feeds sigma (t / 1000); Sana-Sprint the SCM timestep as is, whatever its config's timestep_scale
    assert m["denoiser"]["timestep_scale"] == {"flux2_klein": 0.001, "sana_sprint": 1.0}[kind]


def test_other_size_and_scale(built, monkeypatch):
    """klein at a non-square size (another sequence length: another ``mu``); Sana-Sprint at another embedded
    guidance scale (the graph multiplies it by guidance_embeds_scale)."""
    kind, folder, artifact = built
    if kind == "flux2_klein":
        err = _compare(kind, folder, artifact, monkeypatch, height=16, width=48, seed=5, scale=2.5)
    else:
        err = _compare(kind, folder, artifact, monkeypatch, seed=5, scale=1.5)
    assert err <= TOL, f"{kind}: max |runtime - diffusers| = {err:.2e}"


def test_klein_manifest_and_distilled_plan(built, tmp_path):
    kind, folder, artifact = built
    if kind != "flux2_klein":
        pytest.skip("FLUX.2 [klein] only")
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["denoiser"]["position_ids"] == "flux2" and m["denoiser"]["latent_layout"] == "packed_2x2"
    assert m["latent"]["channels"] == 32 and m["latent"]["scaling_factor"] == 1.0
    encoder = m["text_encoders"][0]
    assert encoder["tokenizer_kind"] == "qwen_chat" and encoder["hidden_state"] == "stacked_hidden_states"
    assert encoder["chat_prefix"] == "<|im_start|>user\n"
    assert encoder["chat_suffix"] == "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert m["sampler"]["dynamic_shift"]["mu_rule"] == "flux2_empirical"
    # a step-distilled klein (model_index.json is_distilled) runs no CFG batch, as the pipeline ignores its scale
    distilled = shutil.copytree(folder, tmp_path / "distilled")
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    assert plan(distilled, "cpu-fp32")["guidance"]["mode"] == "none"
    assert plan(folder, "cpu-fp32")["guidance"]["mode"] == "cfg"


@pytest.mark.parametrize("side", ["right", "left"])
def test_chat_tokenizer_matches_transformers(tmp_path, side):
    """The runtime's chat tokenizer (tokenizers only, the template rendered at build time) gives the ids and mask
    ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` gets from transformers: short, empty (CFG's negative) and
    truncated prompts, with either padding side."""
    from types import SimpleNamespace

    from diffc.exporter.pipeline_data import chat_template_parts
    from diffc.exporter.tiny_dit import build_qwen2_tokenizer
    from diffc.runtime.denoiser import ChatPromptTokenizer

    tok = build_qwen2_tokenizer()
    tok.padding_side = side
    tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": tok.pad_token}))
    parts = chat_template_parts(SimpleNamespace(tokenizer=tok), "tokenizer")
    assert parts["padding_side"] == side
    ours = ChatPromptTokenizer(tmp_path / "tokenizer.json", 24, parts["chat_prefix"], parts["chat_suffix"], side)
    prompts = ["A Red cat, café crème", "", " ".join(["dragon riding a horse"] * 8)]
    ids, mask = ours(prompts)
    for i, prompt in enumerate(prompts):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)
        ref = tok(text, padding="max_length", truncation=True, max_length=24)
        np.testing.assert_array_equal(ids[i], ref["input_ids"], err_msg=prompt)
        np.testing.assert_array_equal(mask[i], ref["attention_mask"], err_msg=prompt)
    assert mask[2].all() and not mask[1].all()  # the long prompt was truncated, the empty one padded
