"""The benchmark scripts on tiny inputs (the SD-1.5 runs themselves take an hour; not here): the end-to-end
benchmark's measuring half on a tiny cache-reuse artifact, the roofline script on the demo, and the page
docs/benchmarks.md generated from benchmarks/results/ by benchmarks/report.py."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import diffc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import end_to_end  # noqa: E402
import report  # noqa: E402


def test_benchmarks_page_is_generated_from_the_results():
    """docs/benchmarks.md and the README's summary table are what report.py writes from the results files
    today: a hand-edited number, a changed JSON file or a page not regenerated fails here."""
    assert report.render() == (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8"), \
        "docs/benchmarks.md is stale: run python benchmarks/report.py"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert report.with_summary(readme) == readme, "README.md's results table is stale: run python benchmarks/report.py"


def test_every_results_file_is_cited_and_every_cited_file_exists():
    cited = report.cited()
    on_disk = sorted(p.name for p in (ROOT / "benchmarks" / "results").glob("*.json"))
    assert sorted(set(cited)) == on_disk, "cite each file in benchmarks/report.py, or delete it"
    assert len(cited) == len(set(cited))
    # every results path the docs name exists (the page names them by file; the README by path or file)
    docs = (ROOT / "README.md").read_text(encoding="utf-8") + (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    named = set(re.findall(r"([\w.-]+\.json)", docs)) - {"manifest.json", "model_index.json", "export_report.json",
                                                        "build_report.json", ".diffc-output.json", "selfcheck.json"}
    assert named and named <= set(on_disk), sorted(named - set(on_disk))


def test_report_writes_where_it_is_told(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold table\n{report.README_END}\nafter\n", encoding="utf-8")
    report.main(["--out", str(tmp_path / "b.md"), "--readme", str(readme)])
    assert (tmp_path / "b.md").read_text(encoding="utf-8") == report.render()
    text = readme.read_text(encoding="utf-8")
    assert "old table" not in text and text.startswith("intro\n") and text.endswith(f"{report.README_END}\nafter\n")
    assert "\n".join(report.summary_table()) in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="lacks the lines"):
        report.main(["--out", str(tmp_path / "c.md"), "--readme", str(readme)])


def test_diffc_row_says_where_the_time_goes(tmp_path):
    pytest.importorskip("diffusers")
    from diffc.exporter.tiny import write_tiny_pipeline

    out = diffc.build(write_tiny_pipeline(tmp_path / "sd", "sd"), "cpu-cache", tmp_path / "tiny.diffc", progress=False)
    size = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["image"]["height"][1]
    # the warm-up loads the artifact once with the benchmark's host cache (the build filled the default one)
    env = {"DIFFC_CACHE_DIR": str(tmp_path / "cache")}
    assert end_to_end.warm_up(sys.executable, "diffc_cpu_cache", out, env, [size]) > 0
    assert any((tmp_path / "cache" / "onnxruntime").iterdir())
    skipped = {}
    rows = end_to_end.measure_cell(lambda c: sys.executable, ["diffc_cpu_cache", "no_such_config"],
                                   {"diffc_cpu_cache": out, "no_such_config": out}, size, 4, 2, env, skipped)
    # a failing row is said once and not run again; the other row has one image per cold process
    assert list(rows) == ["diffc_cpu_cache"] and list(skipped) == [f"no_such_config@{size}px_4steps"]
    assert "unknown config" in skipped[f"no_such_config@{size}px_4steps"]
    row = rows["diffc_cpu_cache"]
    assert len(row["runs_s"]) == len(row["first_images_s"]) == 2
    assert row["median_s"] > 0 and row["time_to_first_image_s"] > 0
    assert row["peak_rss_gib"] > 0
    engines = row["engine_s"]
    # 4 steps at interval 2: full UNet at steps 0 and 2, shallow at 1 and 3
    assert sorted(engines) == ["text_encoder", "unet", "unet_shallow", "vae_decoder"]
    assert all(v > 0 for v in engines.values())
    assert sum(engines.values()) <= max(row["runs_s"])  # engine time is part of each image's wall time


def test_genai_rows_are_skipped_with_the_reason_without_their_venv(tmp_path):
    """Without --genai-python the OpenVINO GenAI rows are not run and the JSON says how to enable them; the
    rows not asked for are left alone, and nothing is exported."""
    paths, skipped, setup_s = {}, {}, {}
    end_to_end.setup_genai(None, tmp_path / "sd15", tmp_path, ["diffc_openvino", "genai_bf16", "genai_int8"],
                           paths, skipped, setup_s)
    assert sorted(skipped) == ["genai_bf16", "genai_int8"]
    assert all("--genai-python" in why and "_genai.py" in why for why in skipped.values())
    assert paths == {} and setup_s == {} and not any(tmp_path.iterdir())
    # every genai row is a baseline: the ratios put each diffc row against it
    assert set(end_to_end.GENAI_CONFIGS) <= set(end_to_end.CONFIGS)
    assert not set(end_to_end.GENAI_CONFIGS) & set(end_to_end.DIFFC_CONFIGS)


def test_machine_names_the_diffc_source():
    import subprocess

    from _common import machine

    info = machine()
    assert info["diffc"] == diffc.__version__
    head = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode:
        assert info["diffc_commit"] is None  # not a git checkout
    else:
        assert re.fullmatch(re.escape(head.stdout.strip()) + "(-dirty)?", info["diffc_commit"])


def test_openvino_roofline_on_the_demo(demo_cpu_openvino_int8_artifact):
    """benchmarks/openvino_roofline.py on the demo's cpu-openvino-int8 artifact (with cache reuse: the run's
    shared build, tests/conftest.py): every component timed and counted, the int8 and bf16 convolution peaks
    measured, ratios for the conv/GEMM layers."""
    import subprocess

    pytest.importorskip("diffusers")
    out = demo_cpu_openvino_int8_artifact
    size = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["image"]["height"][1]
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "openvino_roofline.py"
    run = subprocess.run([sys.executable, str(script), str(out), "--size", str(size), "--runs", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert set(result["components"]) == {"text_encoder", "unet", "unet_shallow", "vae_decoder", "vae_encoder"}
    assert all(v > 0 for v in result["peak_gmac_per_s"].values())
    unet = result["components"]["unet"]
    assert unet["precision"] == "int8" and unet["gmac"]["conv"] > 0 and unet["gmac"]["attention"] > 0
    assert unet["layer_s"]["int8_conv_gemm"] > 0  # the Q/DQ convolutions ran on int8 kernels
    assert set(unet["layer_s"]) == {"int8_conv_gemm", "float_conv_gemm", "fused_subgraphs", "other"}
    assert len(unet["runs_s"]) == 1 and unet["run_s"] == unet["runs_s"][0]
    assert "unet_conv_gemm_of_int8_peak" in result["ratios"] and result["ratios"]["unet_conv_gemm_of_int8_peak"] > 0
