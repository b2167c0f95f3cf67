"""The build runs the profile's passes, reports them, and the passed artifact matches the unpassed one."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

import diffc  # noqa: E402
from diffc.build.report import format_build_report  # noqa: E402
from diffc.passes import PASS_NAMES  # noqa: E402


def _profile(tmp_path, name, passes: str) -> str:
    f = tmp_path / f"{name}.toml"
    f.write_text(f'name = "{name}"\nbackend = "onnxruntime"\n[sampler]\nsteps = 4\n{passes}')
    return str(f)


@pytest.fixture(scope="module")
def builds(tmp_path_factory, demo_cpu_artifact):
    root = tmp_path_factory.mktemp("builds")
    off = _profile(root, "nopasses", "[passes]\ndisable = " + json.dumps(list(PASS_NAMES)) + "\n")
    return {
        "passes": demo_cpu_artifact,  # built with verify_passes=True, shared by the run (tests/conftest.py)
        "none": diffc.build("demo", off, root / "without.diffc", progress=False),
    }


def test_passes_keep_the_image(builds):
    with_p, without = (diffc.load(builds[k], progress=False) for k in ("passes", "none"))
    for prompt, seed in (("a handwritten digit seven", 0), ("a handwritten digit two", 3)):
        a = with_p(prompt, seed=seed, negative_prompt="blurry")
        b = without(prompt, seed=seed, negative_prompt="blurry")
        assert np.abs(a - b).max() <= 1e-4


def test_build_report_lists_passes(builds):
    report = json.loads((builds["passes"] / "build_report.json").read_text())
    assert [p["name"] for p in report["pass_order"]] == list(PASS_NAMES)
    unet = report["components"]["unet"]["passes"]
    assert [p["name"] for p in unet["passes"]] == list(PASS_NAMES)
    assert unet["op_counts_after"].get("com.microsoft::MultiHeadAttention", 0) > 0
    assert unet["op_counts_after"].get("Softmax", 0) == 0
    assert sum(unet["op_counts_after"].values()) < sum(unet["op_counts_before"].values())
    text = format_build_report(report)
    assert "fuse_attention" in text and "unet:" in text
    off = json.loads((builds["none"] / "build_report.json").read_text())
    assert off["pass_order"] == [] and off["components"]["unet"]["passes"]["passes"] == []


def test_cli_passes_command():
    from click.testing import CliRunner

    from diffc.cli import main

    r = CliRunner().invoke(main, ["passes", "--profile", "cpu-fp32"])
    assert r.exit_code == 0, r.output
    assert [line.split()[1] for line in r.output.strip().splitlines()] == list(PASS_NAMES)


def test_parity_after_passes_is_checked(builds):
    report = json.loads((builds["passes"] / "build_report.json").read_text())
    for name in ("text_encoder", "unet", "vae_decoder"):
        after = report["components"][name]["parity_after_passes"]
        assert after["passed"] and after["max_abs_err"] < 1e-4
    manifest = json.loads((builds["passes"] / "manifest.json").read_text())
    assert [p["name"] for p in manifest["build"]["passes"]] == list(PASS_NAMES)  # the build can be repeated


def test_broken_pass_fails_the_build(tmp_path, monkeypatch):
    """A pass that changes the numbers is caught by the parity check after passes, and nothing is written."""
    import onnx_ir as ir

    from diffc.build import passes as stage
    from diffc.errors import ParityError

    real = stage.run_pass_list

    def corrupting(model, component, target, **kw):
        rep = real(model, component, target, **kw)  # in place on the stage's onnx_ir model
        if component == "vae_decoder":  # scale the first float weight: a silent numeric bug
            value = next(v for v in model.graph.initializers.values()
                         if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT
                         and v.const_value.size > 1)
            value.const_value = ir.tensor(value.const_value.numpy() * 1.5, name=value.name)
        return rep

    monkeypatch.setattr(stage, "run_pass_list", corrupting)
    with pytest.raises(ParityError, match="vae_decoder differs from PyTorch after the graph passes"):
        diffc.build("demo", "cpu-fp32", tmp_path / "bad.diffc", progress=False)
    assert not (tmp_path / "bad.diffc").exists()


def test_too_little_disk_fails_before_exporting(tmp_path, monkeypatch):
    """A build that cannot fit on the disk stops with a typed error before exporting, and writes nothing."""
    import shutil
    from collections import namedtuple

    from diffc.build import export as stage
    from diffc.errors import DiskSpaceError

    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")

    def tight(path):
        total, used, _ = real(path)
        return usage(total, used, 1_000_000)  # 1 MB free: less than the demo's fp32 weights

    def no_export(*a, **k):
        raise AssertionError("exported despite the disk check")

    monkeypatch.setattr(shutil, "disk_usage", tight)
    monkeypatch.setattr("diffc.exporter.export.export_pipeline_to", no_export)
    with pytest.raises(DiskSpaceError, match=r"needs about [\d.]+ MB of disk .* has 1.0 MB free; .*TMPDIR"):
        diffc.build("demo", "cpu-int8", tmp_path / "big.diffc", progress=False)
    assert not (tmp_path / "big.diffc").exists() and not list(tmp_path.glob(".big.diffc.tmp-*"))
    # with the disk's real free space the same check passes, and the build reports what it checked
    monkeypatch.undo()
    checked = stage.check_disk(4_000_000, tmp_path, tmp_path)
    assert checked["need_bytes"] == 16_000_000 and checked["free_bytes"] > checked["need_bytes"]


def test_manifest_records_the_source_hash(builds, tmp_path):
    """The manifest's ``source.sha256`` is the model folder's content hash, the one the export report records
    (it was once the hash of nothing: e3b0c442...)."""
    import hashlib

    from diffc._fs import folder_hash
    from diffc.exporter.demo import write_demo_pipeline

    manifest = json.loads((builds["passes"] / "manifest.json").read_text())
    export = json.loads((builds["passes"] / "export_report.json").read_text())
    digest = manifest["source"]["sha256"]
    assert digest == export["source"]["sha256"] != hashlib.sha256(b"").hexdigest()
    assert digest == folder_hash(write_demo_pipeline(tmp_path / "demo"))


def test_reports_are_strict_json(builds):
    """No bare NaN / Infinity in anything the build writes (Python's json writes them by default)."""
    def refuse(name):
        raise ValueError(f"{name} in the file")

    for name in ("manifest.json", "build_report.json", "export_report.json"):
        json.loads((builds["passes"] / name).read_text(), parse_constant=refuse)


def test_json_writer_refuses_nan(tmp_path):
    import math

    from diffc.build.report import write_json
    from diffc.errors import DiffcError

    with pytest.raises(DiffcError, match=r"components\.unet\.rows\[1\] is not a finite number"):
        write_json(tmp_path / "r.json", {"components": {"unet": {"rows": [1.0, math.nan]}}})
    assert not (tmp_path / "r.json").exists()
    write_json(tmp_path / "r.json", {"psnr_db": math.inf}, infinities=True)
    assert json.loads((tmp_path / "r.json").read_text()) == {"psnr_db": "inf"}
