"""diffc.passes public API: pass lists per target, printing, run_passes reports, typed option errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffc.errors import DiffcError, ProfileError
from diffc.passes import PassOptionError, format_pass_list, pass_list, run_passes

GRAPH = """
agraph (float[N, 16] x) => (float[N, 16] y) {
    i = Identity(x)
    s = Sigmoid(i)
    y = Mul(i, s)
}
"""


def names(specs):
    return [s.name for s in specs]


def test_pass_lists_per_target():
    ort = pass_list("onnxruntime")
    assert names(ort) == ["cleanup", "legalize_norms", "fuse_attention", "check_ops"]
    assert ort[2].options == {"kind": "mha"} and ort[1].options["groupnorm"] == "instance_norm"
    for target in ("tensorrt", "tensorrt_rtx"):
        trt = pass_list(target)
        assert names(trt) == ["cleanup", "legalize_norms", "check_ops"]  # TensorRT fuses attention itself
        assert trt[1].options["groupnorm"] == "group_normalization" and not trt[1].options["quick_gelu"]
    assert names(pass_list("onnxruntime", disable=["fuse_attention"])) == ["cleanup", "legalize_norms", "check_ops"]
    assert pass_list("onnxruntime", attention="attention23")[2].options == {"kind": "attention23"}


def test_format_pass_list_is_numbered_and_names_options():
    text = format_pass_list(pass_list("onnxruntime"))
    lines = text.splitlines()
    assert [line.split()[:2] for line in lines] == [["1.", "cleanup"], ["2.", "legalize_norms"],
                                                    ["3.", "fuse_attention"], ["4.", "check_ops"]]
    assert "kind='mha'" in lines[2] and "#" in lines[0]
    assert format_pass_list([]) == "(no passes)"


@pytest.mark.parametrize("target, options, field", [
    ("cuda", {}, "target"),
    ("onnxruntime", {"atention": "mha"}, "atention"),
    ("onnxruntime", {"attention": "flash"}, "attention"),
    ("onnxruntime", {"groupnorm": "GroupNorm"}, "groupnorm"),
    ("onnxruntime", {"layernorm": "yes"}, "layernorm"),
    ("onnxruntime", {"disable": ["fuse_atention"]}, "disable"),
    ("onnxruntime", {"disable": "cleanup"}, "disable"),
    ("tensorrt", {"attention": "mha"}, "attention"),
    ("tensorrt", {"quick_gelu": True}, "quick_gelu"),
])
def test_bad_options_raise_typed_errors(target, options, field):
    with pytest.raises(PassOptionError, match=field) as err:
        pass_list(target, **options)
    assert isinstance(err.value, ProfileError) and isinstance(err.value, DiffcError)


def test_run_passes_report_and_purity(kit):
    model = kit.parse(GRAPH)
    before = model.SerializeToString()
    out, report = run_passes(model, "unet", "onnxruntime", verify=True)
    assert model.SerializeToString() == before  # the input is not modified
    assert [p["name"] for p in report["passes"]] == ["cleanup", "legalize_norms", "fuse_attention", "check_ops"]
    by_name = {p["name"]: p for p in report["passes"]}
    assert by_name["legalize_norms"]["fired"]["silu"] == 1 and by_name["legalize_norms"]["modified"]
    assert not by_name["fuse_attention"]["modified"] and not by_name["check_ops"]["modified"]
    assert all(p["seconds"] >= 0 for p in report["passes"])
    assert report["op_counts_before"] == {"Identity": 1, "Mul": 1, "Sigmoid": 1}
    assert report["op_counts_after"] == {"com.microsoft::QuickGelu": 1}
    assert report["component"] == "unet" and report["options"]["attention"] == "mha"
    json.dumps(report)  # the build report is JSON
    kit.check(out)
    feeds = {"x": np.linspace(-6, 6, 48, dtype=np.float32).reshape(3, 16)}
    kit.assert_same(model, out, feeds)
    again, report2 = run_passes(out, "unet", "onnxruntime")
    assert not any(p["modified"] for p in report2["passes"])


def test_run_passes_rejects_bad_component(kit):
    with pytest.raises(PassOptionError, match="component"):
        run_passes(kit.parse(GRAPH), "", "onnxruntime")


def test_profile_pass_list_holds_the_stage_passes():
    """The cache split and quantization are entries of the one ordered list (with their options), after the
    graph passes; a plain profile has neither, and the stage passes cannot be run by run_passes."""
    from diffc.passes import STAGE_PASSES, profile_pass_list
    from diffc.profiles import load_profile

    assert names(profile_pass_list(load_profile("cpu-fp32"))) == names(pass_list("onnxruntime"))
    cache = profile_pass_list(load_profile("cpu-cache"))
    assert names(cache)[-1] == "cache_split" and cache[-1].options == {"branch": 0}
    int8 = profile_pass_list(load_profile("cpu-int8"))
    assert names(int8)[-1] == "quantize"
    assert int8[-1].options["activations"] == {"unet": "uint8", "vae_decoder": "uint8"}
    assert int8[-1].to_dict()["options"]["keep_float"] == ["conv_in", "conv_out", "time_embedding", "skip_concat"]
    fp8 = profile_pass_list(load_profile("rtx-fp8"))
    assert fp8[-1].options["activations"] == {"unet": "fp8"} and not fp8[-1].options["output_qdq"]
    assert set(STAGE_PASSES) == {"cache_split", "quantize"}
    with pytest.raises(PassOptionError, match="runs in its build stage"):
        int8[-1].create()


def test_cli_prints_the_stage_passes():
    from click.testing import CliRunner

    from diffc.cli import main

    r = CliRunner().invoke(main, ["passes", "--profile", "cpu-int8"])
    assert r.exit_code == 0, r.output
    assert [line.split()[1] for line in r.output.strip().splitlines()][-1] == "quantize"
    assert "activations={'unet': 'uint8', 'vae_decoder': 'uint8'}" in r.output


def test_errors_inside_the_pass_manager_stay_typed(kit, monkeypatch):
    """A pass or a verification step that refuses the graph raises diffc's PassError naming it, not the pass
    manager's wrapper."""
    from diffc.passes import PassError, _base

    cuda_only = kit.parse("""
    agraph (float[1, 8, 4, 4] x, float[8] g, float[8] b) => (float[1, 8, 4, 4] y) {
        y = com.microsoft.GroupNorm<groups = 2, epsilon = 0.00001, activation = 0>(x, g, b)
    }""")
    with pytest.raises(PassError, match="onnxruntime target cannot run: com.microsoft::GroupNorm"):
        run_passes(cuda_only, "unet", "onnxruntime")

    def broken(model, *, after):
        raise PassError(f"the graph is invalid after pass {after!r}: test")

    monkeypatch.setattr(_base, "verify", broken)
    with pytest.raises(PassError, match="after pass 'input'"):
        run_passes(kit.parse(GRAPH), "unet", "onnxruntime", verify=True)


def test_one_ir_model_from_load_to_save(kit, tmp_path):
    """The build's stages hold one onnx_ir model: the graph passes run on it in place, and save_ir_model writes
    it with its lazily read weights inline, leaving the model reading them from the file it was loaded from."""
    import onnx
    import onnx_ir as ir

    from diffc.onnx_io import save_ir_model
    from diffc.passes import run_pass_list

    source = kit.parse("""
    agraph (float[N, 16] x) => (float[N, 16] y) {
        i = Identity(x)
        s = Sigmoid(i)
        y = Mul(i, s)
    }
    """)
    w = onnx.numpy_helper.from_array(np.linspace(-1, 1, 256, dtype=np.float32).reshape(16, 16), "w")
    source.graph.initializer.append(w)
    source.graph.node.append(onnx.helper.make_node("MatMul", ["y", "w"], ["z"]))
    source.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["N", 16]))
    onnx.save_model(source, str(tmp_path / "in.onnx"), save_as_external_data=True, location="in.onnx.data",
                    size_threshold=0)
    model = ir.load(tmp_path / "in.onnx")
    report = run_pass_list(model, "unet", "onnxruntime")
    assert next(p for p in report["passes"] if p["name"] == "legalize_norms")["fired"]["silu"] == 1
    assert report["op_counts_after"] == {"MatMul": 1, "com.microsoft::QuickGelu": 1}
    out = save_ir_model(model, tmp_path / "out" / "model.onnx")
    assert not (tmp_path / "out" / "model.onnx.data").exists()  # small weights inline, as save_model does
    assert isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    saved = onnx.load(str(out))
    assert saved.ir_version <= 10 and saved.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT
    feeds = {"x": np.linspace(-6, 6, 48, dtype=np.float32).reshape(3, 16)}
    kit.assert_same(onnx.load(str(tmp_path / "in.onnx")), saved, feeds)


def test_the_backend_decides_not_its_name(monkeypatch):
    """Which [passes] options are legal, the int8 activation encoding, the Q/DQ form and the quality gate's
    evaluator are the registered backend's attributes: a backend that says it runs contrib ops and uint8 gets
    them, whatever it is called."""
    import dataclasses

    from diffc import engines
    from diffc.build.plan import gated
    from diffc.passes import activation_type, profile_pass_list, resolve_options
    from diffc.profiles import load_profile

    ov = load_profile("cpu-openvino-int8")
    assert activation_type(ov, "int8") == "int8" and gated(ov)
    with pytest.raises(PassOptionError, match="not available for openvino"):
        resolve_options("openvino", {"attention": "mha"})
    with pytest.raises(ProfileError, match="needs zero points"):
        activation_type(dataclasses.replace(ov, quantize=dataclasses.replace(ov.quantize, activations="uint8")),
                        "int8")

    class LikeOnnxruntime(type(engines.get_backend("openvino"))):
        contrib_ops = True
        int8_activations = ("uint8", "int8")
        qdq_form = {"output_qdq": True, "int32_bias": True}
        runs_on_build_host = False

    monkeypatch.setitem(engines._REGISTRY, "openvino", LikeOnnxruntime())
    assert resolve_options("openvino", {"attention": "mha"})["attention"] == "mha"
    assert activation_type(ov, "int8") == "uint8"
    assert profile_pass_list(ov)[-1].options["output_qdq"] is True
    plain = load_profile("cpu")  # OpenVINO bf16: gated only where the build machine runs the engines
    assert not gated(plain)
