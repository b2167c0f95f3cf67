"""Tiny diffusers pipelines (diffc.exporter.tiny): loadable by diffusers, runnable, byte-for-byte reproducible."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from diffc import _fs

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffc.errors import ModelError, OutputExistsError  # noqa: E402
from diffc.exporter import tiny  # noqa: E402
from diffc.exporter.demo import DEMO_WEIGHTS, write_demo_pipeline  # noqa: E402
from diffc.runtime.tokenizer import PromptTokenizer  # noqa: E402

EXPECTED = {
    "sd": ("StableDiffusionPipeline", "PNDMScheduler",
           {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"}),
    "sdxl": ("StableDiffusionXLPipeline", "EulerDiscreteScheduler",
             {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
              "model_index.json"}),
    "lcm": ("LatentConsistencyModelPipeline", "LCMScheduler",
            {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"}),
}


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def load(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Each kind written twice (same seed) and once with another seed."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for kind in tiny.PIPELINE_KINDS:
        out[kind] = (tiny.write_tiny_pipeline(root / f"{kind}-a", kind, seed=0),
                     tiny.write_tiny_pipeline(root / f"{kind}-b", kind, seed=0),
                     tiny.write_tiny_pipeline(root / f"{kind}-seed1", kind, seed=1))
    return out


@pytest.mark.parametrize("kind", tiny.PIPELINE_KINDS)
def test_folder_layout(written, kind):
    folder = written[kind][0]
    cls, sched, entries = EXPECTED[kind]
    assert {p.name for p in folder.iterdir()} == entries | {_fs.OWNER_FILE}  # the mark that diffc wrote it
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == cls and index["scheduler"] == ["diffusers", sched]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "text_encoder" / "model.safetensors").is_file()
    for tok in (e for e in entries if e.startswith("tokenizer")):
        assert {p.name for p in (folder / tok).iterdir()} == set(tiny._TOKENIZER_FILES)
    assert (folder / "tokenizer" / "tokenizer.json").read_bytes() == (
        tiny.CLIP_TOKENIZER_ASSETS / "tokenizer.json").read_bytes()
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert unet["sample_size"] == tiny.SAMPLE_SIZE and vae["latent_channels"] == unet["in_channels"] == 4
    assert 2 ** (len(vae["block_out_channels"]) - 1) == tiny.VAE_SCALE_FACTOR == 2
    if kind == "sd":
        s = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert (s["beta_schedule"], s["beta_start"], s["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
        assert s["steps_offset"] == 1 and s["skip_prk_steps"] is True and s["set_alpha_to_one"] is False
    if kind == "lcm":
        assert unet["time_cond_proj_dim"] == 32
    if kind == "sdxl":
        te2 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
        te1 = json.loads((folder / "text_encoder" / "config.json").read_text())
        assert unet["addition_embed_type"] == "text_time"
        assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
        assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + te2[
            "projection_dim"]


@pytest.mark.parametrize("kind", tiny.PIPELINE_KINDS)
def test_diffusers_loads_and_runs(written, kind):
    pipe = load(written[kind][0])
    assert type(pipe).__name__ == EXPECTED[kind][0]
    assert type(pipe.scheduler).__name__ == EXPECTED[kind][1]
    size = tiny.NATIVE_SIZE
    out = pipe(["a photo of a cat"], num_inference_steps=2, height=size, width=size, output_type="np",
               generator=torch.Generator().manual_seed(0))
    img = out.images
    assert img.shape == (1, size, size, 3)
    assert np.isfinite(img).all()
    assert ((img > 0) & (img < 1)).mean() > 0.9, "random weights saturate the image: parity checks would be vacuous"
    # same generator -> same image (nothing nondeterministic in the tiny models)
    again = pipe(["a photo of a cat"], num_inference_steps=2, height=size, width=size, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(img, again)


@pytest.mark.parametrize("kind", tiny.PIPELINE_KINDS)
def test_reproducible_bytes(written, kind):
    a, b, other = (file_hashes(p) for p in written[kind])
    assert a == b  # every file, weights and configs
    weights = [k for k in a if k.endswith(".safetensors")]
    assert len(weights) == (4 if kind == "sdxl" else 3)
    assert all(a[k] != other[k] for k in weights), "seed must change every component's weights"


def test_sdxl_tokenizer_2_pads_with_bang(written):
    folder = written["sdxl"][0]
    pipe = load(folder)
    assert pipe.tokenizer.pad_token_id == 49407 and pipe.tokenizer_2.pad_token_id == 0
    prompts = ["a photo of a cat", "wow! so cool!!", "! !! !!!"]
    for tok_name, pad in (("tokenizer", 49407), ("tokenizer_2", 0)):
        hf = getattr(pipe, tok_name)
        want = hf(prompts, padding="max_length", max_length=77, truncation=True).input_ids
        runtime = PromptTokenizer(folder / tok_name / "tokenizer.json")
        assert runtime.pad_id == pad
        assert runtime(prompts).tolist() == want


def test_weights_argument_swaps_in_saved_weights(written, tmp_path):
    seed1 = written["sd"][2]
    weights = tiny.save_component_weights(seed1, tmp_path / "weights")
    assert {p.name for p in weights.iterdir()} == {"unet.safetensors", "vae.safetensors", "text_encoder.safetensors"}
    swapped = tiny.write_tiny_pipeline(tmp_path / "swapped", "sd", seed=0, weights=weights)
    assert file_hashes(swapped) == file_hashes(seed1)  # seed 0's random init fully replaced
    (weights / "vae.safetensors").unlink()
    with pytest.raises(ModelError, match="vae.safetensors"):
        tiny.write_tiny_pipeline(tmp_path / "incomplete", "sd", weights=weights)
    with pytest.raises(ModelError, match="same kind"):  # sd weights do not fit the sdxl UNet
        tiny.write_tiny_pipeline(tmp_path / "wrong-kind", "sdxl", weights=tiny.save_component_weights(
            seed1, tmp_path / "w2"))
    assert not (tmp_path / "incomplete").exists() and not (tmp_path / "wrong-kind").exists()


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="sdxl"):
        tiny.write_tiny_pipeline(tmp_path / "x", "flux")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        tiny.write_tiny_pipeline(tmp_path / "busy", "sd")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    with pytest.raises(ModelError, match="does not exist"):
        tiny.write_tiny_pipeline(tmp_path / "y", "sd", weights=tmp_path / "no-such-weights")


def test_demo_pipeline(written, tmp_path):
    (tmp_path / "demo").mkdir()  # an existing empty folder is fine
    folder = write_demo_pipeline(tmp_path / "demo")
    assert folder == tmp_path / "demo"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    if not DEMO_WEIGHTS.is_dir():
        assert file_hashes(folder) == file_hashes(written["sd"][0])
