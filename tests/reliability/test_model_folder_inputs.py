"""A diffusers model folder as untrusted input: model_index.json and the configs diffc reads without torch give a
ModelError naming the file (and the field), whatever they hold. Torch-free, like ``diffc build --dry-run``."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffc.errors import DiffcError, MissingComponentError, ModelError, UnsupportedPipelineError
from diffc.exporter.source import inspect_model

FAST = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.32.0",
         "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
         "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
         "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None]}
CONFIGS = {
    "unet": {"block_out_channels": [32, 64], "sample_size": 8, "in_channels": 4, "layers_per_block": 1,
             "time_cond_proj_dim": None, "addition_embed_type": None},
    "vae": {"block_out_channels": [32, 64], "latent_channels": 4, "scaling_factor": 0.18215, "shift_factor": None},
    "scheduler": {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000},
}


def _folder(tmp_path, index=INDEX, configs=CONFIGS, *, raw_index: bytes | None = None):
    root = tmp_path / "model"
    for folder in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for folder, cfg in configs.items():
        name = "scheduler_config.json" if folder == "scheduler" else "config.json"
        (root / folder / name).write_text(json.dumps(cfg))
    (root / "model_index.json").write_bytes(raw_index if raw_index is not None else json.dumps(index).encode())
    return root


def test_a_valid_folder_reads(tmp_path):
    source = inspect_model(_folder(tmp_path))
    assert source.config("unet")["sample_size"] == 8 and source.scheduler_config["_class_name"] == "DDIMScheduler"


@pytest.mark.parametrize("raw, error, message", [
    (b"[1, 2]", ModelError, "holds a JSON list, not an object"),
    (b'"StableDiffusionPipeline"', ModelError, "holds a JSON str"),
    (b'{"_class_name": "StableDiffusionPipeline\xff"}', ModelError, "not UTF-8 text"),
    (b"\xff\xfe{\x00}\x00", ModelError, "not UTF-8 text"),
    (b"{", ModelError, "cannot read"),
    (b'{"_class_name": NaN}', ModelError, "NaN is not a JSON number"),
    (b"[" * 100_000 + b"]" * 100_000, ModelError, "nested too deeply"),
    (b'{"_class_name": ["StableDiffusionPipeline"]}', ModelError, r"_class_name: \['StableDiffusionPipeline'\] is not"),
    (b'{"_diffusers_version": "0.32"}', ModelError, "'_class_name' is a required property"),
    (b'{"_class_name": "StableVideoDiffusionPipeline"}', UnsupportedPipelineError, "not supported"),
])
def test_bad_model_index(tmp_path, raw, error, message):
    with pytest.raises(error, match=message):
        inspect_model(_folder(tmp_path, raw_index=raw))


@pytest.mark.parametrize("entry", ["x", 5, [None, None], ["diffusers"], None])
def test_component_entries(tmp_path, entry):
    with pytest.raises(DiffcError, match="unet"):
        inspect_model(_folder(tmp_path, {**INDEX, "unet": entry}))


def test_missing_component_names_it(tmp_path):
    with pytest.raises(MissingComponentError, match="'vae'"):
        inspect_model(_folder(tmp_path, {k: v for k, v in INDEX.items() if k != "vae"}))


@pytest.mark.parametrize("folder, change, message", [
    ("unet", {"block_out_channels": "32,64"}, r"unet/config.json: block_out_channels: '32,64' is not of type"),
    ("unet", {"block_out_channels": []}, r"block_out_channels: \[\] should be non-empty"),
    ("unet", {"sample_size": "8"}, r"sample_size"),
    ("unet", {"sample_size": None}, r"sample_size"),
    ("unet", {"time_cond_proj_dim": "256"}, r"time_cond_proj_dim"),
    ("vae", {"block_out_channels": {"a": 1}}, r"vae/config.json: block_out_channels"),
    ("vae", {"scaling_factor": 0}, r"scaling_factor: 0 is less than or equal to the minimum"),
    ("scheduler", {"_class_name": 5}, r"scheduler_config.json: _class_name: 5 is not of type 'string'"),
    ("scheduler", {"beta_start": -1.0}, r"beta_start: -1.0 is less than or equal to the minimum of 0"),
    ("scheduler", {"beta_end": 1.5}, r"beta_end: 1.5 is greater than or equal to the maximum of 1"),
    ("scheduler", {"num_train_timesteps": "1000"}, r"num_train_timesteps: '1000' is not of type 'integer'"),
])
def test_wrong_typed_config_fields(tmp_path, folder, change, message):
    configs = {**CONFIGS, folder: {**CONFIGS[folder], **change}}
    source = inspect_model(_folder(tmp_path, configs=configs))
    with pytest.raises(ModelError, match=message):
        source.config(folder)


def test_config_that_is_a_list_or_not_utf8(tmp_path):
    root = _folder(tmp_path)
    source = inspect_model(root)
    (root / "unet" / "config.json").write_text("[]")
    with pytest.raises(ModelError, match="holds a JSON list"):
        source.config("unet")
    (root / "vae" / "config.json").write_bytes(b'{"block_out_channels": [32], "x": "\xe9"}')
    with pytest.raises(ModelError, match="not UTF-8"):
        source.config("vae")


def test_dry_run_reports_a_bad_config_as_a_typed_error(tmp_path):
    from click.testing import CliRunner

    from diffc.cli import main

    root = _folder(tmp_path, configs={**CONFIGS, "unet": {**CONFIGS["unet"], "block_out_channels": 5}})
    r = CliRunner().invoke(main, ["build", str(root), "--dry-run"])
    assert r.exit_code == 2 and r.output.startswith("error (model_error): "), r.output


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=6)


@FAST
@given(index=st.dictionaries(st.sampled_from([*INDEX, "x"]), _JSON, max_size=6),
       unet=st.dictionaries(st.sampled_from([*CONFIGS["unet"], "x"]), _JSON, max_size=6))
def test_any_model_index_and_unet_config_read_or_refused(tmp_path_factory, index, unet):
    root = _folder(tmp_path_factory.mktemp("f", numbered=True), {**INDEX, **index},
                   {**CONFIGS, "unet": {**CONFIGS["unet"], **unet}})
    try:
        source = inspect_model(root)
        cfg = source.config("unet")
        source.scheduler_config
    except DiffcError:
        return
    # what the torch-free build plan computes from a config that was accepted
    assert 2 ** (len(cfg["block_out_channels"]) - 1) >= 1
    sample = cfg["sample_size"]
    int(sample[0] if isinstance(sample, list) else sample)
