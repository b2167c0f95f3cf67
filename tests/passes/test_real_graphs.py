"""The passes on real tiny-SD UNet and CLIP text-encoder graphs from both torch exporters: every attention
block fused (the CLIP ones with their causal mask), nothing CUDA-only emitted, outputs within 1e-4 of the
unpassed graph, and a second run changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffc.passes import run_passes  # noqa: E402

CASES = [(e, c) for e in ("torchscript", "dynamo") for c in ("unet", "text_encoder")]
TOLERANCE = 1e-4


def feed_sets(kit, component):
    if component == "unet":
        small = kit.unet_feeds(1)
        small = {"sample": small["sample"][:1, :, :12, :8], "timestep": small["timestep"][:1],
                 "encoder_hidden_states": small["encoder_hidden_states"][:1, :9]}
        return [kit.unet_feeds(0), small]
    return [kit.text_feeds(0), kit.text_feeds(1, length=12)]


def max_err(kit, a, b, feeds):
    return max(float(np.abs(x - y).max()) for x, y in zip(kit.run(a, feeds), kit.run(b, feeds)))


@pytest.mark.parametrize("exporter, component", CASES)
@pytest.mark.parametrize("attention", ["mha", "attention23"])
def test_onnxruntime_passes_fuse_every_attention(kit, tiny_graph, exporter, component, attention):
    model, meta = tiny_graph(exporter, component)
    out, report = run_passes(model, component, "onnxruntime", verify=True, attention=attention)
    fired = next(p["fired"] for p in report["passes"] if p["name"] == "fuse_attention")
    fused_op = "com.microsoft::MultiHeadAttention" if attention == "mha" else "Attention"
    assert sum(fired.values()) == meta["attention_blocks"] > 0
    assert report["op_counts_after"].get(fused_op) == meta["attention_blocks"]
    assert "Softmax" not in report["op_counts_after"]
    if component == "text_encoder":  # CLIP's causal mask becomes the kernel's causal mode
        assert fired["causal_self_attention"] == meta["attention_blocks"]
        assert not {"Trilu", "IsNaN"} & set(report["op_counts_after"])
    else:
        assert fired["self_attention"] == fired["cross_attention"] == meta["attention_blocks"] // 2
        assert report["op_counts_after"].get("InstanceNormalization") == 21  # CPU's faster GroupNorm form
    for feeds in feed_sets(kit, component):
        assert max_err(kit, model, out, feeds) <= TOLERANCE
    if attention == "mha":
        _, again = run_passes(out, component, "onnxruntime", attention=attention)
        assert [p["name"] for p in again["passes"] if p["modified"]] == []


@pytest.mark.parametrize("exporter, component", CASES)
def test_tensorrt_passes_keep_attention_decomposed(kit, tiny_graph, exporter, component):
    model, meta = tiny_graph(exporter, component)
    out, report = run_passes(model, component, "tensorrt", verify=True)
    after = report["op_counts_after"]
    assert not [op for op in after if "::" in op]  # ONNX-domain ops only
    assert after.get("Softmax") == meta["attention_blocks"]
    if component == "unet":
        assert after.get("GroupNormalization") == 21 and "InstanceNormalization" not in after
    assert max_err(kit, model, out, feed_sets(kit, component)[0]) <= TOLERANCE
