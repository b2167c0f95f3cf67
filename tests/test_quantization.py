"""int8 builds end to end: calibration from the real loop, the Q/DQ graph onnxruntime fuses, the quality gate,
and the refusals (fp8 on the CPU, a component diffc does not quantize)."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import onnx
import pytest

pytest.importorskip("torch")

import diffc  # noqa: E402
from diffc.errors import BackendUnavailableError, ProfileError, QualityGateError  # noqa: E402
from diffc.profiles import load_profile  # noqa: E402
from diffc.profiles.schema import Backend, Precision, parse_profile  # noqa: E402


@pytest.fixture(scope="module")
def int8_demo(demo_cpu_int8_artifact):
    """``diffc build demo --profile cpu-int8``: the trained demo model, quality gate included (shared by the run,
    tests/conftest.py: read only)."""
    return demo_cpu_int8_artifact


def test_manifest_and_report(int8_demo):
    manifest = json.loads((int8_demo / "manifest.json").read_text())
    assert manifest["components"]["unet"]["precision"] == "int8"
    assert manifest["components"]["vae_decoder"]["precision"] == "int8"
    assert manifest["components"]["text_encoder"]["precision"] == "fp32"
    assert manifest["profile"]["quantize"]["min_psnr_db"] == 28.0
    report = json.loads((int8_demo / "build_report.json").read_text())
    gate = report["quality_gate"]
    assert gate["passed"] and gate["psnr_db_mean"] >= 28.0 and gate["evaluated_with"] == "artifact"
    assert gate["images"] == 6 and len(gate["rows"]) == 6
    q = report["components"]["unet"]["quantization"]
    assert q["activations"] == "uint8" and q["keep_float"] == ["conv_in", "conv_out", "time_embedding", "skip_concat"]
    calib = q["calibration"]
    # the real loop: 4 prompts x 2 seeds, 4 steps each, CFG on (both halves recorded)
    assert calib["images"] == 8 and calib["steps"] == 4 and calib["calls"] == 32 and calib["cfg_halves"]
    some = next(iter(calib["tensors"].values()))
    assert len(some["steps"]) == 4 and len(some["cfg_halves"]["uncond"]) == 4
    lo, hi = some["range"]
    assert lo <= min(s[0] for s in some["steps"]) and hi >= max(s[1] for s in some["steps"])
    # the decoder, recorded in the same loop: once per image, on the final latents (no CFG halves)
    vae = report["components"]["vae_decoder"]["quantization"]["calibration"]
    assert vae["images"] == 8 and vae["calls"] == 8 and not vae["cfg_halves"] and vae["tensors_recorded"] > 10
    assert report["components"]["vae_decoder"]["passes"]["passes"][-1]["fired"]["conv"] > 10
    fired = report["components"]["unet"]["passes"]["passes"][-1]
    assert fired["name"] == "quantize" and fired["fired"]["conv"] > 10 and fired["fired"]["matmul"] > 10
    assert [p["name"] for p in report["pass_order"]][-1] == "quantize"
    # the fp32 twin ran no passes of its own: same pass order, so it took this build's passed graphs
    assert report["reference_build"]["passes_reused"] is True and not report["passes_reused"]
    # the calibration scratch graph is gone, and nothing but the artifact's own files is in it
    assert not list(int8_demo.rglob("*.calibration.onnx"))


def test_engine_runs_integer_kernels(int8_demo):
    """The saved engine is what onnxruntime fused: integer kernels, and no float Conv inside the UNet body."""
    graph = onnx.load(str(int8_demo / "unet" / "model.onnx"), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops["QLinearConv"] > 10 and ops["MatMulIntegerToFloat"] > 10
    assert ops["Conv"] + ops["FusedConv"] == 2 + 4  # conv_in, conv_out and the 4 skip_concat shortcuts: float
    assert ops["MultiHeadAttention"] > 0  # attention stays fused (and float)
    vae = collections.Counter(n.op_type for n in onnx.load(str(int8_demo / "vae_decoder" / "model.onnx"),
                                                            load_external_data=False).graph.node)
    assert vae["QLinearConv"] > 10 and vae["Conv"] + vae["FusedConv"] == 2  # conv_in and conv_out stay float


def _tiny_profile(**quantize):
    prof = load_profile("cpu-int8")
    q = dataclasses.replace(prof.quantize, calibration_prompts=("a red square",), calibration_seeds=(0,),
                            gate_prompts=("a blue circle",), gate_seeds=(0,), **quantize)
    return dataclasses.replace(prof, quantize=q, steps=2)


def test_quality_gate_fails_the_build(tmp_path):
    from diffc.exporter.tiny import write_tiny_pipeline

    model = write_tiny_pipeline(tmp_path / "sd", "sd")
    out = tmp_path / "tiny-int8.diffc"
    with pytest.raises(QualityGateError, match=r"mean PSNR .* \(needs >= 99\)"):
        diffc.build(model, _tiny_profile(min_psnr_db=99.0), out, progress=False)
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_the_default_bf16_profile_is_gated_too(tmp_path, demo_cpu_openvino_artifact, tiny_folder):
    """``cpu`` (OpenVINO bf16, nothing quantized) builds the fp32 twin and is gated against it like int8: the
    figure lands in the build report (the run's shared ``cpu`` demo, tests/conftest.py); below the threshold the
    build fails, names cpu-fp32, writes nothing."""
    from diffc.build.plan import plan

    gate = plan("demo", "cpu")["quality_gate"]
    assert gate["images"] == 3 and gate["min_psnr_db"] == load_profile("cpu").quantize.min_psnr_db
    assert "quality_gate" not in plan("demo", "cpu-fp32")
    report = json.loads((demo_cpu_openvino_artifact / "build_report.json").read_text())
    assert report["quality_gate"]["passed"] and report["quality_gate"]["images"] == gate["images"]
    assert report["quality_gate"]["psnr_db_mean"] >= gate["min_psnr_db"] and "reference_build" in report
    components = json.loads((demo_cpu_openvino_artifact / "manifest.json").read_text())["components"]
    assert {c["backend"] for c in components.values()} == {"openvino"}
    # below the threshold: the run's tiny pipeline (read only), one gate image, 2 steps (the cheapest build that
    # reaches the gate)
    model = tiny_folder("sd")
    q = dataclasses.replace(load_profile("cpu").quantize, gate_prompts=("a blue circle",), gate_seeds=(0,))
    prof = dataclasses.replace(load_profile("cpu"), quantize=q, steps=2)
    strict = dataclasses.replace(prof, quantize=dataclasses.replace(q, min_psnr_db=999.0))
    with pytest.raises(QualityGateError, match=r"reduced-precision artifact .* \(needs >= 999\).*cpu-fp32"):
        diffc.build(model, strict, tmp_path / "strict.diffc", progress=False)
    assert not (tmp_path / "strict.diffc").exists() and not list(tmp_path.glob("*.tmp*"))


def test_fp8_on_the_cpu_is_refused():
    prof = parse_profile({"name": "cpu-fp8", "backend": "onnxruntime", "precision": {"unet": "fp8"}}, where="t")
    with pytest.raises(BackendUnavailableError, match=r"no FP8 kernels.*rtx-fp8.*h100-fp8|h100-fp8.*rtx-fp8"):
        diffc.build("demo", prof, "/nonexistent/never-written", progress=False)


def test_the_text_encoder_is_not_quantized():
    prof = parse_profile({"name": "x", "backend": "onnxruntime", "precision": {"text_encoder": "int8"}}, where="t")
    with pytest.raises(ProfileError, match=r"\[precision\].text_encoder = 'int8'.*quantizes only \['unet', 'vae_decoder'\]"):
        diffc.build("demo", prof, "/nonexistent/never-written", progress=False)


def test_quantize_table_is_validated():
    base = {"name": "x", "backend": "onnxruntime"}
    with pytest.raises(ProfileError, match=r"\[quantize\].method"):
        parse_profile({**base, "quantize": {"method": "entropyy"}}, where="t")
    with pytest.raises(ProfileError, match=r"\[quantize\].keep_float"):
        parse_profile({**base, "quantize": {"keep_float": ["conv_inn"]}}, where="t")
    with pytest.raises(ProfileError, match=r"\[quantize\].calibration_seeds"):
        parse_profile({**base, "quantize": {"calibration_seeds": []}}, where="t")
    with pytest.raises(ProfileError, match=r"\[quantize\].typo"):
        parse_profile({**base, "quantize": {"typo": 1}}, where="t")
    prof = load_profile("cpu-int8")
    assert prof.backend is Backend.ONNXRUNTIME and prof.quantized_components() == {"unet": Precision.INT8,
                                                                                   "vae_decoder": Precision.INT8}
    again = type(prof).from_dict(json.loads(json.dumps(prof.to_dict())))
    assert again.quantize == prof.quantize


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tensorrt_builds_from_calibrated_qdq_graphs(tmp_path, precision):
    """rtx-int8 / rtx-fp8 on the tiny pipeline: real TensorRT-RTX engines from the Q/DQ graph (no GPU needed to
    build); int8 is gated on the CPU through the s8 Q/DQ graph, fp8 cannot run here and says so."""
    from diffc.engines import tensorrt as T
    from diffc.exporter.tiny import write_tiny_pipeline

    if T.available("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX is not installed (pip install 'diffc[tensorrt]')")
    # int8 also with two step groups: a second UNet engine, gated on the CPU with the variants in place
    prof = _tiny_profile(min_psnr_db=20.0, step_groups=2 if precision == "int8" else 1)
    trt = load_profile(f"rtx-{precision}")
    prof = dataclasses.replace(trt, quantize=dataclasses.replace(prof.quantize, activations="auto"), steps=2,
                               tensorrt=dataclasses.replace(trt.tensorrt, opt_level=0, compute_capabilities=("SM89",)))
    out = diffc.build(write_tiny_pipeline(tmp_path / "sd", "sd"), prof, tmp_path / f"tiny-{precision}.diffc",
                      progress=False, no_cache=True)
    manifest = json.loads((out / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    assert unet["precision"] == precision and unet["backend_options"]["quantized"] == [precision]
    assert unet["backend_options"]["strongly_typed"] is True
    assert manifest["components"]["vae_decoder"]["precision"] == "fp16"
    report = json.loads((out / "build_report.json").read_text())
    assert report["components"]["unet"]["quantization"]["activations"] == precision  # symmetric int8 / e4m3
    fired = report["components"]["unet"]["passes"]["passes"][-1]["fired"]
    assert fired["conv_output"] == 0 and fired["int32_bias"] == 0  # TensorRT's form: inputs only, float bias
    # the fp32 onnxruntime twin needs onnxruntime's passes, not TensorRT's: it ran its own
    assert report["reference_build"]["passes_reused"] is False
    gate = report["quality_gate"]
    if precision == "int8":
        assert gate["evaluated_with"].startswith("onnxruntime") and gate["passed"]
        g1 = manifest["components"]["unet_g1"]
        assert g1["precision"] == "int8" and g1["backend_options"]["quantized"] == ["int8"]
        assert g1["backend_options"]["engine_sha256"] != unet["backend_options"]["engine_sha256"] and manifest["step_variants"]["steps"] == [0, 1]
    else:
        assert "FP8" in gate["skipped"]


def test_dry_run_shows_the_quantization_plan():
    from diffc.build.plan import plan

    unet = plan("demo", "cpu-int8")["components"]["unet"]
    assert unet["precision"] == "int8" and unet["quantization"]["activations"] == "uint8"
    assert unet["quantization"]["calibration"]["images"] == 8 and unet["quantization"]["quality_gate"]["images"] == 6
    vae = plan("demo", "cpu-int8")["components"]["vae_decoder"]["quantization"]
    assert vae["step_groups"] == 1 and vae["calibration"]["records"] == "the final latents of each image"
    assert "quantization" not in plan("demo", "cpu-int8")["components"]["text_encoder"]
    prof = parse_profile({"name": "cpu-fp8", "backend": "onnxruntime", "precision": {"unet": "fp8"}}, where="t")
    with pytest.raises(BackendUnavailableError, match="no FP8 kernels"):
        plan("demo", prof)


def test_int8_with_cache_reuse(tmp_path):
    """int8 + cache: calibration runs the full UNet at every step, both UNet graphs are quantized from it and
    share one weights file, and the manifest says int8 for both."""
    import onnx

    from diffc.exporter.tiny import write_tiny_pipeline

    prof = dataclasses.replace(_tiny_profile(min_psnr_db=15.0), cache=load_profile("cpu-cache").cache)
    out = diffc.build(write_tiny_pipeline(tmp_path / "sd", "sd"), prof, tmp_path / "tiny.diffc", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cache"]["full_steps"] == [True, False]
    for name in ("unet", "unet_shallow"):
        comp = manifest["components"][name]
        assert comp["precision"] == "int8" and "unet/weights.data" in comp["files"]
        ops = collections.Counter(n.op_type for n in onnx.load(str(out / comp["file"]), load_external_data=False).graph.node)
        assert ops["QLinearConv"] > 0
    report = json.loads((out / "build_report.json").read_text())
    assert report["reference_build"]["passes_reused"] is True  # the twin took both split UNet graphs as they were
    calib = report["components"]["unet"]["quantization"]
    assert calib["calibration"]["calls"] == 2  # 1 image x 2 steps, full UNet at both
    assert calib["unet_shallow_pass"]["fired"]["conv"] > 0
    image = diffc.load(out, progress=False)("a red square", seed=0)
    assert image.shape[-1] == 3 and float(image.std()) > 0


def test_step_groups_and_bounds():
    from diffc.build.calibrate import step_groups, timestep_bounds
    from diffc.runtime.pipeline import unet_for_timestep

    assert step_groups(4, 1) == [[0, 1, 2, 3]]
    assert step_groups(5, 2) == [[0, 1, 2], [3, 4]]
    assert step_groups(4, 4) == [[0], [1], [2], [3]]
    assert timestep_bounds([999, 749, 499, 249], [[0, 1], [2, 3]]) == [624.0]
    variants = {"components": ["unet", "unet_g1", "unet_g2"], "timestep_bounds": [700.0, 300.0]}
    assert [unet_for_timestep(variants, t) for t in (999, 700, 699.9, 301, 300, 0)] == [
        "unet", "unet", "unet_g1", "unet_g1", "unet_g1", "unet_g2"]
    assert unet_for_timestep(None, 500) == "unet"


def test_range_recorder_envelopes_per_step_group(tmp_path):
    """ranges(steps) is the envelope over just those steps (and both CFG halves)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from diffc.build.calibrate import RangeRecorder

    graph = helper.make_graph([helper.make_node("Relu", ["sample"], ["h"]), helper.make_node("Identity", ["h"], ["out_sample"])],
                              "g", [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", 3])],
                              [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["b", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.save(model, str(tmp_path / "m.onnx"))
    rec = RangeRecorder(tmp_path / "m.onnx", ["h"], num_steps=3, cfg=True, method="minmax", percentile=100.0)
    for scale in (8.0, 4.0, 1.0):  # one call per step, batch 2 = uncond + cond
        rec.run({"sample": np.array([[0, 1, scale / 2], [0, 0, scale]], np.float32)})
    rec.close()
    assert rec.ranges()["h"] == (0.0, 8.0)
    assert rec.ranges([0])["h"] == (0.0, 8.0) and rec.ranges([1, 2])["h"] == (0.0, 4.0)
    assert rec.ranges([2])["h"] == (0.0, 1.0)
    assert rec.report()["per_step_group_candidates"] == ["h"]  # spread 8 / 1 >= 4


def test_step_groups_are_checked_before_any_work():
    prof = load_profile("cpu-int8")
    with pytest.raises(ProfileError, match=r"\[quantize\].step_groups"):
        parse_profile({"name": "x", "backend": "onnxruntime", "quantize": {"step_groups": 0}}, where="t")
    too_many = dataclasses.replace(prof, quantize=dataclasses.replace(prof.quantize, step_groups=5))
    with pytest.raises(ProfileError, match="step_groups = 5 is more than the 4 sampling steps"):
        diffc.build("demo", too_many, "/nonexistent/never-written", progress=False)
    with_cache = dataclasses.replace(too_many, quantize=dataclasses.replace(prof.quantize, step_groups=2),
                                     cache=load_profile("cpu-cache").cache)
    with pytest.raises(ProfileError, match="does not combine with cache reuse"):
        diffc.build("demo", with_cache, "/nonexistent/never-written", progress=False)


def test_per_step_group_variants(tmp_path, monkeypatch):
    """step_groups = 2: two int8 UNets with scales from their own steps, chosen per step by timestep."""
    import numpy as np
    import onnx

    from diffc.exporter.tiny import write_tiny_pipeline
    from diffc.runtime.manifest import read_manifest
    from diffc.exporter.sampler import compile_sampler

    jsonschema = pytest.importorskip("jsonschema")
    prof = _tiny_profile(min_psnr_db=15.0, step_groups=2)
    out = diffc.build(write_tiny_pipeline(tmp_path / "sd", "sd"), prof, tmp_path / "tiny.diffc", progress=False)
    manifest = read_manifest(out)
    schema = json.loads((Path(diffc.__file__).parent / "runtime" / "manifest.schema.json").read_text())
    jsonschema.validate(manifest, schema)
    variants = manifest["step_variants"]
    timesteps = manifest["sampler"]["timesteps"]
    assert variants["components"] == ["unet", "unet_g1"] and variants["steps"] == [0, 1]
    assert timesteps[1] < variants["timestep_bounds"][0] < timesteps[0]
    assert manifest["components"]["unet_g1"]["precision"] == "int8"
    assert manifest["components"]["unet_g1"]["shape_ranges"] == manifest["components"]["unet"]["shape_ranges"]
    report = json.loads((out / "build_report.json").read_text())
    q = report["components"]["unet"]["quantization"]
    assert [g["steps"] for g in q["calibration"]["step_groups"]] == [[0], [1]]
    assert q["unet_g1_pass"]["fired"]["conv"] > 0 and report["quality_gate"]["passed"]

    def input_scales(name):  # the activation scales the int8 convs read: per group, from its own ranges
        g = onnx.load(str(out / manifest["components"][name]["file"]))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.graph.initializer}
        return [float(inits[n.input[1]]) for n in g.graph.node if n.op_type == "QLinearConv"]

    assert input_scales("unet") and len(input_scales("unet")) == len(input_scales("unet_g1"))
    assert input_scales("unet") != input_scales("unet_g1")

    pipe = diffc.load(out, progress=False)
    calls = []
    for name in ("unet", "unet_g1"):
        sess = pipe.sessions[name]

        def spy(feeds, outputs=None, _run=sess.run, _name=name):
            calls.append((_name, float(feeds["timestep"][0])))
            return _run(feeds, outputs)

        monkeypatch.setattr(sess, "run", spy)
    image = pipe("a red square", seed=0)
    assert [c[0] for c in calls] == ["unet", "unet_g1"] and float(np.std(image)) > 0
    # another step count: the variant follows the timestep, not the step index
    calls.clear()
    pipe.tables = compile_sampler(manifest["sampler"]["kind"], manifest["build"]["scheduler_config"], 6)
    pipe("a red square", seed=0)
    bound = variants["timestep_bounds"][0]
    assert [c[0] for c in calls] == ["unet" if t >= bound else "unet_g1" for _, t in calls]
    assert {c[0] for c in calls} == {"unet", "unet_g1"}
