"""Export + parity for the transformer-denoiser families (FLUX.1, SD3.5, PixArt-Sigma, Sana) from tiny configs,
the contracts' wrappers against the pipelines' own calls, and the typed refusals (variants, ``diffc build``)."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from diffc.errors import ExportError, UnsupportedPipelineError  # noqa: E402
from diffc.exporter import export_pipeline, inspect_model  # noqa: E402
from diffc.exporter import dit  # noqa: E402
from diffc.exporter.contracts import SampleShape, get_contract  # noqa: E402
from diffc.exporter.export import check_parity, export_component  # noqa: E402
from diffc.exporter.tiny_dit import PIPELINE_CLASS, build_tiny_dit_pipeline, write_tiny_dit_pipeline  # noqa: E402

EXPECTED = {
    "flux": {"text_encoder": ["input_ids"], "text_encoder_2": ["input_ids", "attention_mask"],
             "transformer": ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids",
                             "txt_ids", "guidance"],
             "vae_decoder": ["latent_sample"]},
    "sd3": {"text_encoder": ["input_ids"], "text_encoder_2": ["input_ids"],
            "text_encoder_3": ["input_ids", "attention_mask"],
            "transformer": ["sample", "timestep", "encoder_hidden_states", "pooled_projections"],
            "vae_decoder": ["latent_sample"]},
    "pixart": {"text_encoder": ["input_ids", "attention_mask"],
               "transformer": ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"],
               "vae_decoder": ["latent_sample"]},
    "sana": {"text_encoder": ["input_ids", "attention_mask"],
             "transformer": ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"],
             "vae_decoder": ["latent_sample"]},
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def exported(request, tiny_dit_onnx):
    """(kind, onnx folder, report) per family: the tiny pipeline's ``diffc export``, made once per test run and
    shared with the pass and engine tests (tests/conftest.py; read-only)."""
    kind = request.param
    onnx_dir = tiny_dit_onnx(kind)
    return kind, onnx_dir, json.loads((onnx_dir / "export_report.json").read_text())


def test_export_and_parity_at_two_shapes(exported):
    kind, onnx_dir, report = exported
    assert report["pipeline_class"] == PIPELINE_CLASS[kind]
    assert sorted(report["components"]) == sorted(EXPECTED[kind])
    for name, inputs in EXPECTED[kind].items():
        entry = report["components"][name]
        assert entry["passed"] is True, (name, entry)
        assert entry["max_abs_err"] <= entry["tolerance"]["atol"] and entry["rel_l2"] <= entry["tolerance"]["rtol_l2"]
        assert len(entry["checks"]) == 2 and entry["checks"][0]["shape"] != entry["checks"][1]["shape"]
        model = onnx.load(onnx_dir / name / "model.onnx")
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == inputs
    # the denoiser really ran at two latent sizes and two batch sizes
    shapes = [c["shape"] for c in report["components"]["transformer"]["checks"]]
    assert shapes[0]["height"] != shapes[1]["height"] and shapes[0]["batch"] != shapes[1]["batch"]
    if kind == "flux":  # packed latents and position ids: dynamic token count
        model = onnx.load(onnx_dir / "transformer" / "model.onnx", load_external_data=False)
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        assert dims["hidden_states"] == ["batch", "image_sequence", 64]
        assert dims["img_ids"] == ["image_sequence", 3] and dims["txt_ids"] == ["sequence", 3]
        assert dims["guidance"] == ["batch"]


@functools.lru_cache(maxsize=None)
def _tiny(kind: str):
    """In-memory tiny pipelines, built once per kind (the wrappers leave the modules as they found them)."""
    return build_tiny_dit_pipeline(kind, seed=0)


@pytest.mark.parametrize("kind", sorted(EXPECTED))
@pytest.mark.parametrize("which", [0, 1], ids=["native", "other_size"])
def test_wrapper_equals_the_pipelines_own_call(kind, which):
    """What a contract wraps (traceable RoPE for FLUX, size-dependent pos-embed for PixArt, the learned-sigma
    split) computes what the pipeline's own transformer call computes, at the native size (where PixArt's
    pipeline uses its stored position table) and another one (batch 2 with a padded text row)."""
    pipe = _tiny(kind)
    t = pipe.transformer
    contract = get_contract("transformer", t)
    shape = dit.sample_shapes(pipe, "transformer", 32)[which]
    inputs = contract.make_inputs(t, shape, torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = contract.wrap(t).eval()(*inputs)
        if kind == "flux":
            hs, enc, pooled, ts, img, txt, guidance = inputs
            want = t(hidden_states=hs, encoder_hidden_states=enc, pooled_projections=pooled, timestep=ts,
                     img_ids=img, txt_ids=txt, guidance=guidance, return_dict=False)[0]
        elif kind == "sd3":
            hs, ts, enc, pooled = inputs
            want = t(hidden_states=hs, encoder_hidden_states=enc, pooled_projections=pooled, timestep=ts,
                     return_dict=False)[0]
        elif kind == "pixart":
            hs, ts, enc, mask = inputs
            want = t(hs, encoder_hidden_states=enc, encoder_attention_mask=mask, timestep=ts,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
            assert want.shape[1] == 2 * hs.shape[1]  # learned sigma: the graph keeps the noise half
            want = want.chunk(2, dim=1)[0]
        else:
            hs, ts, enc, mask = inputs
            want = t(hs, encoder_hidden_states=enc, encoder_attention_mask=mask, timestep=ts, return_dict=False)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-5, rtol=0)
    if kind == "pixart":  # the stored table is back in place afterwards
        assert (t.pos_embed.height, t.pos_embed.width) == (16 // 2, 16 // 2)


def test_flux_schnell_has_no_guidance_input(tmp_path):
    pipe = build_tiny_dit_pipeline("flux", seed=1, guidance=False)
    contract = get_contract("transformer", pipe.transformer)
    assert "guidance" not in contract.input_names
    shapes = dit.sample_shapes(pipe, "transformer", 32)
    sample = contract.make_inputs(pipe.transformer, shapes[0], torch.Generator().manual_seed(0))
    path = export_component(pipe.transformer, contract, tmp_path / "model.onnx", opset=21, exporter="torchscript",
                            sample=sample)
    rows = check_parity(pipe.transformer, contract, path, shapes)
    assert all(r["passed"] for r in rows), rows


def test_half_precision_checkpoint_is_loaded_half_and_upcast_per_component(tmp_path, tiny_dit_folder):
    """A bf16 transformer stays bf16 in the loaded pipeline; only its export runs in fp32 (then it goes back)."""
    from safetensors.torch import load_file, save_file

    from diffc.exporter.export import load_dtypes, load_pipeline

    folder = shutil.copytree(tiny_dit_folder("pixart"), tmp_path / "pixart")  # changed below: a copy
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}, str(weights))
    assert dit.stored_dtype(folder / "transformer") == "BF16" and dit.stored_dtype(folder / "vae") == "F32"
    source = inspect_model(folder, purpose="export")
    assert load_dtypes(source)["transformer"] == torch.bfloat16
    pipe = load_pipeline(source)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    report = export_pipeline(folder, tmp_path / "onnx", components=["transformer"], progress=False)
    assert report["components"]["transformer"]["passed"]


def test_upcast_for_export_restores_and_refuses_over_the_limit():
    layer = torch.nn.Linear(8, 8).to(torch.float16)
    with dit.upcast_for_export(layer, "layer") as m:
        assert m.weight.dtype == torch.float32
    assert layer.weight.dtype == torch.float16
    with pytest.raises(ExportError, match="GiB in fp32"):
        with dit.upcast_for_export(layer, "layer", limit=16):
            pass
    assert layer.weight.dtype == torch.float16
    fp32 = torch.nn.Linear(4, 4)
    with dit.upcast_for_export(fp32, "fp32", limit=0) as m:  # already fp32: nothing to do, no limit applies
        assert m is fp32


def test_movedim_and_rms_norm_symbolics(tmp_path):
    """The two ops registered in diffc.exporter.symbolics export to graphs onnxruntime runs, equal to torch."""
    import onnxruntime as ort

    from diffc.exporter.symbolics import register_onnx_symbolics

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(6, eps=1e-6)

        def forward(self, x):
            y = self.norm(x.movedim(1, -1)).movedim(-1, 1)  # channels-last norm, as DC-AE does
            return y.movedim((0, 1), (2, 3))

    register_onnx_symbolics()
    x = torch.randn(2, 6, 3, 5, generator=torch.Generator().manual_seed(0))
    m = Model().eval()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        want = m(x).numpy()
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=21, dynamo=False,
                      dynamic_axes={"x": {0: "b", 2: "h"}})
    onnx.checker.check_model(onnx.load(path), full_check=True)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    x2 = torch.randn(3, 6, 4, 5)
    got2 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x2.numpy()})[0]
    np.testing.assert_allclose(got2, m(x2).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("variant", ["FluxFillPipeline", "FluxKontextPipeline", "FluxControlPipeline"])
def test_variants_get_the_typed_error_with_the_supported_list(tmp_path, variant):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": variant}))
    for purpose in ("export", "build"):
        with pytest.raises(UnsupportedPipelineError) as err:
            inspect_model(tmp_path, purpose=purpose)
        message = str(err.value)
        assert variant in message and "StableDiffusionPipeline" in message and "FluxPipeline" in message


@pytest.mark.parametrize("kind", ["flux", "sd3", "pixart"])
def test_build_accepts_the_families_and_plans_them(kind, tiny_dit_folder):
    """``diffc build`` takes every exported family now; its dry run (torch-free) shows the denoiser entry the
    manifest will hold, the guidance policy and the transformer's shape ranges (tests/runtime/test_dit_parity.py
    builds and runs them)."""
    from diffc.build.plan import plan

    folder = tiny_dit_folder(kind)
    assert inspect_model(folder).pipeline_class == PIPELINE_CLASS[kind]  # what diffc build calls
    out = plan(folder, "cpu-fp32")
    assert out["family"] == kind and out["denoiser"]["component"] == "transformer"
    ranges = out["components"]["transformer"]["shape_ranges"]
    if kind == "flux":  # 2x2-packed tokens of latents 8..32 (VAE factor 2): (h/2)(w/2)
        assert out["guidance"]["mode"] == "scale_input" and out["denoiser"]["latent_layout"] == "packed_2x2"
        assert ranges["image_sequence"] == [16, 64, 256] and ranges["sequence"] == [512] * 3
        assert ranges["batch"] == [1, 1, 4]  # no CFG batch
    else:
        assert out["guidance"]["mode"] == "cfg" and ranges["batch"] == [1, 2, 8]
        assert ranges["sequence"] == [333 if kind == "sd3" else 300] * 3


def test_tiny_pipelines_are_reproducible(tmp_path, tiny_dit_folder):
    """The same seed writes the same files: a fresh write against the run's shared one (written by this or
    another xdist worker's process)."""
    a = tiny_dit_folder("sana")
    b = write_tiny_dit_pipeline(tmp_path / "b", "sana", seed=0)
    for rel in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "tokenizer/tokenizer.json", "vae/diffusion_pytorch_model.safetensors"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    shutil.rmtree(b)
