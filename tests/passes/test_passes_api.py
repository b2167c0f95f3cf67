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
