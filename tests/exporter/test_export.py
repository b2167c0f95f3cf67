"""Export + parity for tiny SD-1.x, SDXL and LCM pipelines, and the typed errors of a bad model folder."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffc.errors import (  # noqa: E402
    MissingComponentError,
    ModelError,
    OutputExistsError,
    ParityError,
    UnsupportedPipelineError,
)
from diffc.exporter import export_pipeline, inspect_model  # noqa: E402
from diffc.exporter.tiny import write_tiny_pipeline  # noqa: E402

EXPECTED = {
    "sd": ["text_encoder", "unet", "vae_decoder", "vae_encoder"],
    "sdxl": ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"],
    "lcm": ["text_encoder", "unet", "vae_decoder", "vae_encoder"],
}
UNET_INPUTS = {
    "sd": ["sample", "timestep", "encoder_hidden_states"],
    "sdxl": ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
    "lcm": ["sample", "timestep", "encoder_hidden_states", "timestep_cond"],
}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {kind: write_tiny_pipeline(root / kind, kind, seed=0) for kind in EXPECTED}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_export_and_parity(pipelines, tmp_path, kind):
    out = tmp_path / "onnx"
    report = export_pipeline(pipelines[kind], out, progress=False)
    assert sorted(report["components"]) == sorted(EXPECTED[kind])
    on_disk = json.loads((out / "export_report.json").read_text())
    assert on_disk["source"]["sha256"] and len(on_disk["source"]["sha256"]) == 64
    for name in EXPECTED[kind]:
        entry = on_disk["components"][name]
        assert entry["passed"] is True
        assert entry["max_abs_err"] <= entry["tolerance"]["atol"]
        assert entry["rel_l2"] <= entry["tolerance"]["rtol_l2"]
        assert len(entry["checks"]) == 2  # two different shapes
        assert entry["checks"][0]["shape"] != entry["checks"][1]["shape"]
        model = onnx.load(out / name / "model.onnx")
        assert model.ir_version <= 10  # readable by onnxruntime (opset 21 needs IR 10)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
        files = sorted(p.name for p in (out / name).iterdir())
        assert files in (["model.onnx"], ["model.onnx", "model.onnx.data"])
    unet = onnx.load(out / "unet" / "model.onnx")
    assert [i.name for i in unet.graph.input] == UNET_INPUTS[kind]
    timestep = unet.graph.input[1].type.tensor_type.shape.dim
    assert [d.dim_param for d in timestep] == ["batch"]  # the timestep has a batch axis


@pytest.mark.parametrize("sample_size,blocks,expected", [
    (16, 2, ((16, 16), (18, 20))),  # tiny: native size, one downsampling step up
    (64, 4, ((32, 32), (40, 48))),  # SD 1.5: capped at PARITY_MAX_LATENT
    (128, 4, ((32, 32), (40, 48))),  # SDXL
    ([96, 64], 3, ((32, 32), (36, 40))),  # non-square sample_size: its first side
])
def test_parity_shapes_are_capped(sample_size, blocks, expected):
    from types import SimpleNamespace

    from diffc.exporter.export import PARITY_MAX_LATENT, sample_shapes

    config = SimpleNamespace(sample_size=sample_size, block_out_channels=[8] * blocks)
    pipe = SimpleNamespace(unet=SimpleNamespace(config=config), tokenizer=SimpleNamespace(model_max_length=77))
    for name in ("unet", "vae_decoder"):
        first, second = sample_shapes(pipe, name)
        assert ((first.height, first.width), (second.height, second.width)) == expected
        assert (first.batch, second.batch) == (1, 2) and first.height <= PARITY_MAX_LATENT
    text = sample_shapes(pipe, "text_encoder")
    assert [s.sequence for s in text] == [77, 19]


def test_graphs_traced_at_the_capped_shape_hold_at_native_size(pipelines, tmp_path, monkeypatch):
    """Real models are traced and checked at PARITY_MAX_LATENT, then run at their native size: a tiny pipeline
    exported under a cap of 8 (below its native 16) matches PyTorch at 16x16 and 18x20 too."""
    import diffc.exporter.export as E
    from diffc.exporter.contracts import get_contract

    monkeypatch.setattr(E, "PARITY_MAX_LATENT", 8)
    report = export_pipeline(pipelines["sd"], tmp_path / "onnx", components=["unet", "vae_decoder"], progress=False)
    assert report["components"]["unet"]["checks"][0]["shape"]["height"] == 8
    monkeypatch.undo()
    pipe = E.load_pipeline(inspect_model(pipelines["sd"]))
    for name in ("unet", "vae_decoder"):
        module = E.component_module(pipe, name)
        shapes = E.sample_shapes(pipe, name)
        assert (shapes[0].height, shapes[1].height, shapes[1].width) == (16, 18, 20)
        rows = E.check_parity(module, get_contract(name, module), tmp_path / "onnx" / name / "model.onnx", shapes)
        assert all(r["passed"] for r in rows), rows


def test_dynamo_exporter(pipelines, tmp_path):
    report = export_pipeline(pipelines["sd"], tmp_path / "onnx", exporter="dynamo", components=["text_encoder", "unet"],
                             progress=False)
    assert all(c["passed"] for c in report["components"].values())


def test_large_weights_use_one_data_file(tmp_path, monkeypatch):
    """Above the size threshold a component gets exactly one external data file, never one per tensor."""
    import diffc.onnx_io as onnx_io

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1024)
    folder = write_tiny_pipeline(tmp_path / "p", "sd")
    export_pipeline(folder, tmp_path / "onnx", components=["vae_decoder"], progress=False)
    files = sorted(p.name for p in (tmp_path / "onnx" / "vae_decoder").iterdir())
    assert files == ["model.onnx", "model.onnx.data"]


def test_parity_failure_is_typed_and_leaves_nothing(pipelines, tmp_path, monkeypatch):
    import diffc.exporter.export as ex

    real = ex.check_parity

    def strict(module, contract, path, shapes, seed=0):
        from dataclasses import replace

        return real(module, replace(contract, atol=0.0, rtol_l2=0.0), path, shapes, seed)

    monkeypatch.setattr(ex, "check_parity", strict)
    out = tmp_path / "onnx"
    with pytest.raises(ParityError, match="beyond tolerance"):
        export_pipeline(pipelines["sd"], out, components=["vae_decoder"], progress=False)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx")]  # no temp folder left behind


def test_no_model_index(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        inspect_model(tmp_path / "m")
    with pytest.raises(ModelError, match="does not exist"):
        inspect_model(tmp_path / "nope")


def test_missing_component(pipelines, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(pipelines["sd"], folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(MissingComponentError, match="'vae'"):
        export_pipeline(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unsupported_pipeline(pipelines, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(pipelines["sd"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableVideoDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedPipelineError) as e:
        inspect_model(folder)
    assert "StableDiffusionPipeline" in str(e.value) and "StableVideoDiffusionPipeline" in str(e.value)


def test_output_exists(pipelines, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        export_pipeline(pipelines["sd"], out, components=["vae_decoder"], progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only what diffc wrote: this folder holds the user's file
    with pytest.raises(OutputExistsError, match="did not write"):
        export_pipeline(pipelines["sd"], out, components=["vae_decoder"], force=True, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"
    export_pipeline(pipelines["sd"], fresh, components=["vae_decoder"], progress=False)
    (fresh / "vae_decoder" / "stale.txt").write_text("from the last export")
    export_pipeline(pipelines["sd"], fresh, components=["vae_decoder"], force=True, progress=False)
    assert not (fresh / "vae_decoder" / "stale.txt").exists() and (fresh / "vae_decoder" / "model.onnx").is_file()
