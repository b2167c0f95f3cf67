"""The trained transformer demo ``demo-dit`` (diffc.exporter.demo_dit): shipped weights, the diffusers folder,
``diffc export demo-dit`` with parity, and digits that diffusers' own SD3 pipeline draws from it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from diffc.errors import ModelError, OutputExistsError  # noqa: E402
from diffc.exporter import demo, demo_dit, export_pipeline, inspect_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WEIGHT_BUDGET_BYTES = 15_000_000  # issue 29 item 6: 15 MB of fp16 safetensors at most, shared demo files included


def load_judge():
    spec = importlib.util.spec_from_file_location("diffc_judge", REPO / "benchmarks" / "judge" / "judge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Judge()


def _vocab() -> int:
    return len(demo_dit.load_t5_tokenizer())


@pytest.fixture(scope="module")
def pipe():
    p = demo_dit.build_demo_dit_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def test_shipped_weights_load_with_the_expected_shapes(pipe):
    from safetensors import safe_open

    for name in demo_dit.DEMO_DIT_FILES:
        with safe_open(str(demo_dit.DEMO_DIT_WEIGHTS / f"{name}.safetensors"), "pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}, name  # stored fp16 ...
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert all(p.dtype == torch.float32 for p in getattr(pipe, name).parameters()), name  # ... loaded fp32
    t = pipe.transformer.config
    assert (t.patch_size, t.in_channels, t.out_channels, t.num_layers) == (2, 4, 4, 4)
    assert t.joint_attention_dim == pipe.text_encoder_3.config.d_model == 64
    # SD3 pads CLIP-L + CLIP-G states to T5's width and concatenates their projections into the pooled input
    assert pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size <= t.joint_attention_dim
    assert (pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
            == t.pooled_projection_dim)
    assert pipe.transformer.pos_embed.proj.weight.shape == (96, 4, 2, 2)
    assert pipe.text_encoder_3.shared.weight.shape == (_vocab(), 64)
    # trained, not the seeded initialisation; the shared parts are the demo's own
    fresh = demo_dit.build_demo_dit_modules(_vocab())
    assert not torch.equal(fresh["transformer"].proj_out.weight, pipe.transformer.proj_out.weight)
    mods = demo.load_demo_weights(demo.build_demo_modules())
    assert torch.equal(mods["vae"].decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)
    emb = mods["text_encoder"].get_input_embeddings().weight
    assert torch.equal(emb, pipe.text_encoder.get_input_embeddings().weight)
    assert torch.equal(emb, pipe.text_encoder_2.get_input_embeddings().weight)


def test_shipped_weights_fit_the_budget():
    own = sorted(demo_dit.DEMO_DIT_WEIGHTS.glob("*.safetensors"))
    assert [f.stem for f in own] == sorted(demo_dit.DEMO_DIT_FILES)
    shared = [demo.DEMO_WEIGHTS / f"{n}.safetensors" for n in demo_dit.SHARED_DEMO_FILES]
    assert sum(f.stat().st_size for f in own + shared) <= WEIGHT_BUDGET_BYTES


def test_training_record_matches_the_configs_and_the_demo_files():
    record = json.loads((demo_dit.DEMO_DIT_WEIGHTS / "training.json").read_text())
    modules = demo_dit.build_demo_dit_modules(_vocab())
    assert record["params"] == {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
    assert record["demo_weights_sha256"] == demo_dit.shared_demo_hashes()
    assert record["scheduler"] == demo_dit.DEMO_DIT_SCHEDULER


def test_other_demo_weights_are_refused(tmp_path):
    """The transformer learnt the demo VAE's latents and CLIP's states: a retrained demo must not pair with it."""
    other = tmp_path / "demo_weights"
    shutil.copytree(demo.DEMO_WEIGHTS, other)
    from safetensors.torch import load_file, save_file

    state = load_file(str(other / "vae.safetensors"))
    key = next(iter(state))
    state[key] = state[key] + 1
    save_file(state, str(other / "vae.safetensors"))
    with pytest.raises(ModelError, match="vae.safetensors changed.*train_demo_dit.py"):
        demo_dit.load_demo_dit_weights(demo_dit.build_demo_dit_modules(_vocab()), demo_weights=other)


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="train_demo_dit.py"):
        demo_dit.load_demo_dit_weights(demo_dit.build_demo_dit_modules(_vocab()), tmp_path)
    monkeypatch.setattr(demo_dit, "DEMO_DIT_WEIGHTS", tmp_path / "nothing-here")
    with pytest.raises(ModelError, match="train_demo_dit.py"):
        demo_dit.write_demo_dit_pipeline(tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(OutputExistsError):
        demo_dit.write_demo_dit_pipeline(tmp_path / "full")


def test_written_folder_loads_in_diffusers(tmp_path):
    folder = demo_dit.write_demo_dit_pipeline(tmp_path / "demo-dit")
    source = inspect_model(folder, purpose="export")
    assert source.pipeline_class == "StableDiffusion3Pipeline"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = diffusers.DiffusionPipeline.from_pretrained(folder)
    assert type(loaded).__name__ == "StableDiffusion3Pipeline"
    assert type(loaded.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    for key, value in demo_dit.DEMO_DIT_SCHEDULER.items():
        assert loaded.scheduler.config[key] == value, key
    assert loaded.vae_scale_factor == demo.VAE_SCALE_FACTOR and loaded.vae.config.shift_factor == 0.0
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.pad_token == "<|endoftext|>"
    assert (folder / "tokenizer_3" / "tokenizer.json").read_bytes() == (
        demo_dit.DEMO_DIT_WEIGHTS / "tokenizer_3" / "tokenizer.json").read_bytes()
    assert loaded.tokenizer_3("a handwritten digit seven").input_ids[-1] == 1  # </s>, as T5 ends a prompt
    loaded.set_progress_bar_config(disable=True)
    out = loaded(demo.demo_prompt(3), num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


EXPECTED_INPUTS = {
    "text_encoder": ["input_ids"], "text_encoder_2": ["input_ids"], "text_encoder_3": ["input_ids", "attention_mask"],
    "transformer": ["sample", "timestep", "encoder_hidden_states", "pooled_projections"],
    "vae_decoder": ["latent_sample"],
}


def test_export_demo_dit_has_parity(tmp_path):
    """``diffc export demo-dit``: the bundled name resolves like ``demo``, every graph matches PyTorch."""
    report = export_pipeline("demo-dit", tmp_path / "onnx", progress=False)
    assert report["pipeline_class"] == "StableDiffusion3Pipeline"
    assert sorted(report["components"]) == sorted(EXPECTED_INPUTS)
    for name, inputs in EXPECTED_INPUTS.items():
        entry = report["components"][name]
        assert entry["passed"] is True, (name, entry)
        assert entry["max_abs_err"] <= entry["tolerance"]["atol"]
        model = onnx.load(tmp_path / "onnx" / name / "model.onnx")
        assert [i.name for i in model.graph.input] == inputs


# Measured (docs/demo.md): diffusers' own 4-step call at demo_dit.GUIDANCE draws the prompted digit for 85 of 100
# (digit, seed) pairs; it never draws a five, so the best possible here is 18/20. A model that ignores its prompt
# scores ~2/20. 16/20 leaves room for one more borderline digit and still fails a model that lost two more.
MIN_CORRECT = 16
# Through diffc's runtime (its own initial noise, seeds 0-1): 15/20 measured (both fives read as threes, both nines
# as sevens, one six as an eight; docs/demo.md: 0.82 over 100 images). 13/20 allows two more borderline digits.
MIN_CORRECT_RUNTIME = 13


def test_diffusers_draws_the_prompted_digits_in_four_steps(pipe):
    digits = np.repeat(np.arange(10), 2)
    seeds = np.tile([0, 1], 10)
    latents = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    with torch.no_grad():
        images = pipe(prompt=[demo.demo_prompt(int(d)) for d in digits], latents=latents, num_inference_steps=4,
                      guidance_scale=demo_dit.GUIDANCE, height=32, width=32, output_type="np").images
    assert images.shape == (20, 32, 32, 3)
    pred = load_judge().predict(np.asarray(images, np.float32))
    correct = int((pred == digits).sum())
    assert correct >= MIN_CORRECT, f"only {correct}/20 digits drawn as prompted: {pred.tolist()}"


@pytest.mark.slow
def test_built_demo_dit_draws_the_prompted_digits(tmp_path):
    """``diffc build demo-dit`` (cpu-fp32) and the torch-free runtime, 4 Euler steps at demo_dit.GUIDANCE."""
    import diffc
    from diffc.runtime import load

    artifact = diffc.build("demo-dit", "cpu-fp32", tmp_path / "demo-dit.diffc", progress=False)
    pipe = load(artifact, progress=False)
    assert pipe.tables.num_steps == 4 and pipe.tables.kind == "flow_euler"
    digits = np.repeat(np.arange(10), 2)
    seeds = np.tile([0, 1], 10)
    images = np.concatenate([pipe(demo.demo_prompt(int(d)), seed=int(s), guidance=demo_dit.GUIDANCE)
                             for d, s in zip(digits, seeds)])
    assert images.shape == (20, 32, 32, 3)
    pred = load_judge().predict(images)
    correct = int((pred == digits).sum())
    assert correct >= MIN_CORRECT_RUNTIME, f"only {correct}/20 digits drawn as prompted: {pred.tolist()}"
