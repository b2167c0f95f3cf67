"""The end-to-end benchmark's measuring half on a tiny cache-reuse artifact: one configuration in its own
process, its timings and its per-engine breakdown (the SD-1.5 runs themselves take an hour; not here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import diffc  # noqa: E402
from diffc.exporter.tiny import write_tiny_pipeline  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import end_to_end  # noqa: E402


def test_diffc_row_says_where_the_time_goes(tmp_path):
    out = diffc.build(write_tiny_pipeline(tmp_path / "sd", "sd"), "cpu-cache", tmp_path / "tiny.diffc", progress=False)
    size = json.loads((out / "manifest.json").read_text())["image"]["height"][1]
    # the warm-up loads the artifact once with the benchmark's host cache (the build filled the default one)
    env = {"DIFFC_CACHE_DIR": str(tmp_path / "cache")}
    assert end_to_end.warm_up(sys.executable, "diffc_cpu_cache", out, env) > 0
    assert any((tmp_path / "cache" / "onnxruntime").iterdir())
    row = end_to_end.measure(sys.executable, "diffc_cpu_cache", out, size, 4, 2, env)
    assert len(row["runs_s"]) == 2 and row["median_s"] > 0 and row["time_to_first_image_s"] > 0
    assert row["peak_rss_gib"] > 0
    engines = row["engine_s"]
    # 4 steps at interval 2: full UNet at steps 0 and 2, shallow at 1 and 3
    assert sorted(engines) == ["text_encoder", "unet", "unet_shallow", "vae_decoder"]
    assert all(v > 0 for v in engines.values())
    assert sum(engines.values()) <= max(row["runs_s"])  # engine time is part of each image's wall time
