"""int8 builds of the transformer denoisers (issue 29, items 4-5): the int8 profiles quantize a DiT family's
``transformer`` (the profile's ``[precision].unet`` is the denoiser's precision, whichever architecture),
calibrated in the fp32 twin's real loop and gated against it, as for the UNet.

One tiny-family build per profile, to keep the module short: PixArt-Sigma (CFG batches, AdaLN-single) on
``cpu-int8``, FLUX.1-dev (packed latents, guidance embedding, no CFG batch) on ``cpu-openvino-int8``, and FLUX on
``rtx-int8`` where TensorRT-RTX is installed (engines built ahead of time for SM89, the gate on the Q/DQ graph with
onnxruntime). Each test logs its gate PSNR and the transformer's Q/DQ counts.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("sentencepiece")  # the tiny T5 tokenizers are trained when the pipeline is written

from diffc.build import build  # noqa: E402
from diffc.build.plan import plan  # noqa: E402
from diffc.errors import ProfileError  # noqa: E402
from diffc.runtime import load  # noqa: E402

log = logging.getLogger("diffc.tests")
STEPS = 4
PROMPT = "a red cat on a table"


@pytest.fixture(scope="module")
def pipelines(tiny_dit_folder):
    """kind -> the tiny pipeline folder, written once per test run (tests/conftest.py; read-only)."""
    return tiny_dit_folder


def _check_int8(artifact, kind: str, profile: str, *, evaluated_with: str) -> dict:
    """The build report's gate passed on the images it says, the transformer is an int8 Q/DQ graph with the
    calibration of every step, and the manifest records it int8."""
    report = json.loads((artifact / "build_report.json").read_text())
    gate = report["quality_gate"]
    assert gate["passed"] is True and gate["evaluated_with"] == evaluated_with
    assert gate["psnr_db_mean"] >= gate["min_psnr_db"] == 28.0
    comp = report["components"]["transformer"]
    quant = comp["quantization"]
    assert quant["precision"] == "int8"
    calib = quant["calibration"]
    assert calib["steps"] == STEPS and calib["tensors_recorded"] > 0
    # every step of every calibration image went through the recorder
    assert calib["calls"] == calib["images"] * STEPS
    ops = comp["passes"]["op_counts_after"]
    q, dq = ops.get("QuantizeLinear", 0), ops.get("DequantizeLinear", 0)
    assert q > 0 and dq > q  # activations once each, weights and (onnxruntime) outputs besides
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["components"]["transformer"]["precision"] == "int8"
    assert "step_variants" not in manifest  # one transformer for every step
    log.info("%s %s: gate PSNR mean %.2f dB (min %.2f), transformer Q/DQ %d/%d", kind, profile,
             gate["psnr_db_mean"], gate["psnr_db_min"], q, dq)
    return report


@pytest.mark.slow
@pytest.mark.parametrize("kind, profile", [("pixart", "cpu-int8"), ("flux", "cpu-openvino-int8")])
def test_int8_profile_builds_a_gated_transformer_that_runs(pipelines, tmp_path, kind, profile):
    folder = pipelines(kind)
    dry = plan(folder, profile)
    assert dry["components"]["transformer"]["quantization"]["calibration"]["records"] == f"{STEPS} steps"
    art = build(folder, profile, tmp_path / "art.diffc", progress=False)
    report = _check_int8(art, kind, profile, evaluated_with="artifact")
    assert report["components"]["vae_decoder"]["quantization"]["precision"] == "int8"
    if kind == "pixart":  # classifier-free guidance: both halves recorded
        assert report["components"]["transformer"]["quantization"]["calibration"]["cfg_halves"] is True
    pipe = load(art)
    img = pipe(PROMPT, seed=5)
    assert img.shape[-1] == 3 and np.isfinite(img).all() and 0.0 <= img.min() and img.max() <= 1.0
    assert img.std() > 0.01  # an image, not a constant


@pytest.mark.slow
def test_rtx_int8_builds_transformer_engines_gated_on_the_qdq_graph(pipelines, tmp_path):
    from diffc.engines import tensorrt as trt_engine

    if trt_engine.available("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX is not installed (pip install 'diffc[tensorrt]')")
    prof = tmp_path / "rtx-int8-o0.toml"
    prof.write_text('name = "rtx-int8-o0"\nbackend = "tensorrt_rtx"\n[precision]\ndefault = "fp16"\nunet = "int8"\n'
                    '[sampler]\nsteps = 4\n[tensorrt]\ncompute_capabilities = ["SM89"]\nopt_level = 0\n')
    art = build(pipelines("flux"), prof, tmp_path / "rtx.diffc", progress=False)
    _check_int8(art, "flux", "rtx-int8", evaluated_with="onnxruntime (CPU) on the Q/DQ graph")
    entry = json.loads((art / "manifest.json").read_text())["components"]["transformer"]
    assert entry["backend"] == "tensorrt_rtx" and entry["file"].endswith(trt_engine.ENGINE_FILE)


def test_fp8_and_step_groups_are_refused_naming_the_transformer(pipelines, tmp_path):
    folder = pipelines("pixart")
    with pytest.raises(ProfileError, match=r"quantizes \['transformer'\] to \['fp8'\].*transformer denoisers"):
        plan(folder, "rtx-fp8")
    prof = tmp_path / "groups.toml"
    prof.write_text('name = "int8-groups"\nbackend = "onnxruntime"\n[precision]\nunet = "int8"\n'
                    '[sampler]\nsteps = 4\n[quantize]\nstep_groups = 2\n')
    with pytest.raises(ProfileError, match="step_groups = 2.*transformer denoisers"):
        plan(folder, prof)
    with pytest.raises(ProfileError, match="step_groups = 2"):
        build(folder, prof, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
