"""The build's memory: the up-front check (with a faked MemAvailable, never a real big build), the estimate's
inputs read from safetensors headers, the per-stage peaks in the build report."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import diffc
from diffc.build import memory
from diffc.errors import DiffcError, MemoryBudgetError
from diffc.profiles import load_profile


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """A safetensors file with zero-filled tensors of the given dtypes and shapes (the format by hand: an 8-byte
    header length, the JSON header, the data)."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = int(np.prod(shape)) * memory._DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A folder whose ``unet`` holds 3 M elements in bf16 and ``vae`` 1 M in fp32."""
    write_safetensors(tmp_path / "unet" / "diffusion_pytorch_model.safetensors",
                      {"a": ("BF16", (1000, 2000)), "b": ("BF16", (1000, 1000))})
    write_safetensors(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", {"w": ("F32", (1000, 1000))})
    return tmp_path


def test_fp32_bytes_from_headers_whatever_the_stored_dtype(checkpoint):
    sizes = memory.component_fp32_bytes(checkpoint, ["unet", "vae"])
    assert sizes == {"unet": 12_000_000, "vae": 4_000_000}  # a bf16 checkpoint is counted at its fp32 size


def test_estimate_grows_with_what_the_profile_builds(checkpoint):
    sizes = memory.component_fp32_bytes(checkpoint, ["unet", "vae"])
    plain, gated, quantized = (memory.estimate_peak(sizes, k) for k in ("plain", "gated", "quantized"))
    assert memory.BASE_BYTES + sum(sizes.values()) < plain < gated < quantized
    assert [memory.build_kind(load_profile(p)) for p in ("cpu-fp32", "cpu", "cpu-openvino-int8")] == [
        "plain", "gated", "quantized"]


def test_refuses_with_both_figures_and_what_to_do(checkpoint, monkeypatch):
    monkeypatch.delenv(memory.FORCE_ENV, raising=False)
    monkeypatch.setattr(memory, "mem_available", lambda: 1_000_000)
    monkeypatch.setattr(memory, "rss_bytes", lambda: 0)
    with pytest.raises(MemoryBudgetError) as err:
        memory.check_memory(checkpoint, ["unet", "vae"], load_profile("cpu-openvino-int8"))
    msg = str(err.value)
    need = memory.estimate_peak({"unet": 12_000_000, "vae": 4_000_000}, "quantized")
    assert f"needs about {need / 1e9:.1f} GB" in msg and "only 0.0 GB is available" in msg
    assert "unet, is 0.0 GB in fp32" in msg and "DIFFC_FORCE_MEMORY=1" in msg and "cpu-fp32" in msg
    assert isinstance(err.value, DiffcError) and err.value.code == "memory_budget"
    # forced (the argument or the environment): the same shortfall is logged and the check reports it
    for forced in ({"force": True}, {}):
        if not forced:
            monkeypatch.setenv(memory.FORCE_ENV, "1")
        entry = memory.check_memory(checkpoint, ["unet", "vae"], load_profile("cpu-openvino-int8"), **forced)
        assert entry["fits"] is False and entry["forced"] is True and entry["estimated_peak_bytes"] == need
    # with the memory there, it passes unforced
    monkeypatch.delenv(memory.FORCE_ENV)
    monkeypatch.setattr(memory, "mem_available", lambda: 64 << 30)
    assert memory.check_memory(checkpoint, ["unet", "vae"], load_profile("cpu-fp32"))["fits"] is True


def test_build_refuses_before_exporting(tmp_path, monkeypatch):
    """diffc.build stops at the memory check: nothing loaded or exported, no artifact."""
    pytest.importorskip("torch", reason="the build's export stage needs the export extra")

    def no_load(*a, **k):
        raise AssertionError("loaded the pipeline despite the memory check")

    monkeypatch.delenv(memory.FORCE_ENV, raising=False)
    monkeypatch.setattr(memory, "mem_available", lambda: 1_000_000)
    monkeypatch.setattr(memory, "rss_bytes", lambda: 0)
    monkeypatch.setattr("diffc.exporter.export.load_pipeline", no_load)
    with pytest.raises(MemoryBudgetError, match=r"needs about [\d.]+ GB of memory .* only 0.0 GB is available"):
        diffc.build("demo", "cpu-fp32", tmp_path / "big.diffc", progress=False)
    assert not (tmp_path / "big.diffc").exists() and not list(tmp_path.glob(".big.diffc.tmp-*"))


def test_stage_peaks_catch_a_stage_that_allocates():
    with memory.StageMemory(interval=0.01) as mem:
        with mem.stage("small"):
            pass
        with mem.stage("big"):
            block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
            del block
    rep = mem.report()
    assert rep["unit"] == "MiB" and set(rep["stages"]) == {"small", "big"}
    assert rep["stages"]["big"] >= rep["stages"]["small"] + 60
    assert rep["peak_rss"] >= rep["stages"]["big"]


def test_build_report_records_stage_peaks_and_the_check(demo_cpu_openvino_artifact):
    """The default (gated) profile's demo build: every stage it ran has its peak, and the check it passed."""
    report = json.loads((demo_cpu_openvino_artifact / "build_report.json").read_text())
    stages = report["memory"]["stages"]
    assert {"export", "passes", "twin", "engines", "warm_host_cache", "manifest", "gate"} <= set(stages)
    assert all(0 < v <= report["memory"]["peak_rss"] for v in stages.values())
    check = report["memory_check"]
    assert check["kind"] == "gated" and check["fits"] and set(check["fp32_bytes"]) == {"text_encoder", "unet", "vae"}
    # the torch modules were dropped before the engines, and the LoRA targets still found every weight
    targets = json.loads((demo_cpu_openvino_artifact / "manifest.json").read_text())["lora_targets"]["modules"]
    assert any(rec["at"] for comp in targets.values() for rec in comp.values())
