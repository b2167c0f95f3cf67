"""cache_reuse: the full / shallow split of a cache-marked UNet.

Inline graphs check the mechanics (what stays, what goes, idempotence, the errors); the tiny diffusers UNets
(SD and SDXL, both exporters where the exporter can export them) check every branch depth against a PyTorch
reference: the diffusers UNet with the branch tensor *replaced* by a cached feature through a forward hook,
which is exactly what a shallow step must compute. The feature comes from another sample and timestep, as in
a real cached step, so a shallow graph that still computed its own deep half would fail.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from diffc.passes import PassError
from diffc.passes.cache_reuse import CacheFullPass, CacheShallowPass, split
from diffc.exporter.unet_blocks import feature_dims, unet_branches

MARKED = """
agraph (float[2,3] x, float[2,3] unused) => (float[2,3] out_sample, float[2,3] cache_feature_0,
                                             float[2,3] cache_feature_1) {
    skip = Relu(x)
    deep = Sigmoid(skip)
    cache_feature_1 = Tanh(deep)
    up = Exp(cache_feature_1)
    cache_feature_0 = Add(up, skip)
    out_sample = Mul(cache_feature_0, skip)
}
"""


@pytest.fixture
def marked(kit):
    return kit.parse(MARKED)


def feeds():
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((2, 3)).astype(np.float32), "unused": np.zeros((2, 3), np.float32)}


def test_full_keeps_the_chosen_mark(kit, marked):
    out, inst = kit.contract(lambda: CacheFullPass(0), marked, feeds())
    assert [o.name for o in out.graph.output] == ["out_sample", "cache_feature_0"]
    assert inst.fired == {"marks_dropped": 1, "nodes_removed": 0, "initializers_removed": 0}
    assert kit.ops(out) == kit.ops(marked)  # cache_feature_1 is still computed on the way


def test_shallow_cuts_the_deep_half(kit, marked):
    instance = CacheShallowPass(0)
    out, result = kit.apply(instance, marked)
    assert result.modified and instance.fired["cut"] == 1 and instance.fired["nodes_removed"] == 4
    kit.check(out)
    assert kit.ops(out) == ["Relu", "Mul"]
    # the UNet's inputs stay (even one nothing uses), the feature is appended
    assert [i.name for i in out.graph.input] == ["x", "unused", "cache_feature_0"]
    assert [o.name for o in out.graph.output] == ["out_sample"]
    f = feeds()
    cached = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    (got,) = kit.run(out, {**f, "cache_feature_0": cached})
    np.testing.assert_allclose(got, cached * np.maximum(f["x"], 0), rtol=1e-6)
    again, second = kit.apply(CacheShallowPass(0), out)
    assert not second.modified and kit.ops(again) == kit.ops(out)


def test_split_reports_node_counts(marked):
    full, shallow, rep = split(ir.serde.deserialize_model(marked), 1, dims=("batch", None))
    full, shallow = ir.serde.serialize_model(full), ir.serde.serialize_model(shallow)
    assert rep["nodes"] == {"marked": 6, "full": 6, "shallow": 4}
    assert rep["shallow_fraction"] == round(4 / 6, 4)
    dims = [d.dim_param or d.dim_value for d in shallow.graph.input[-1].type.tensor_type.shape.dim]
    assert dims == ["batch", 3]
    assert [o.name for o in full.graph.output] == ["out_sample", "cache_feature_1"]


def test_unmarked_graph_and_bad_branch_are_refused(kit, marked):
    plain = kit.parse("agraph (float[2] x) => (float[2] out_sample) { out_sample = Relu(x) }")
    for pass_obj in (CacheFullPass(0), CacheShallowPass(0)):
        with pytest.raises(PassError, match="no cache_feature"):
            kit.apply(pass_obj, plain)
    with pytest.raises(PassError, match="branches 0 to 1"):
        kit.apply(CacheShallowPass(2), marked)
    with pytest.raises(PassError, match="branches 0 to 1"):
        kit.apply(CacheFullPass(-1), marked)


# ------------------------------------------------------------------------------ tiny diffusers UNets

# SDXL + dynamo is left out: torch's dynamic_axes -> dynamic_shapes conversion fails on the UNet wrapper's
# variadic SDXL inputs (text_embeds, time_ids) with or without cache marks; diffc exports SDXL with torchscript.
CASES = [("sd", "torchscript"), ("sd", "dynamo"), ("sdxl", "torchscript")]


@pytest.fixture(scope="module")
def tiny_unets(tmp_path_factory):
    pytest.importorskip("torch")
    from diffc.exporter.export import component_module, load_pipeline
    from diffc.exporter.source import inspect_model
    from diffc.exporter.tiny import write_tiny_pipeline

    root = tmp_path_factory.mktemp("cache-unets")
    return {kind: component_module(load_pipeline(inspect_model(write_tiny_pipeline(root / kind, kind))), "unet")
            for kind in ("sd", "sdxl")}


def _export_marked(unet, exporter: str, path):
    import torch

    from diffc.exporter.contracts import SampleShape, get_contract
    from diffc.exporter.export import DEFAULT_OPSET, export_component

    contract = get_contract("unet", unet, cache_marks=True)
    sample = contract.make_inputs(unet, SampleShape(1, 16, 16, 77), torch.Generator().manual_seed(0))
    return onnx.load(str(export_component(unet, contract, path, opset=DEFAULT_OPSET, exporter=exporter,
                                          sample=sample))), contract


def _torch_with_feature(unet, contract, inputs, branch: dict, feature):
    """The diffusers UNet with the branch tensor replaced by ``feature`` (forward hooks): the shallow reference."""
    import torch

    block = unet.up_blocks[branch["up_block"]]
    value = torch.from_numpy(feature)
    if branch["layer"] == 0:
        handle = block.register_forward_pre_hook(
            lambda m, args, kwargs: (args, {**kwargs, "hidden_states": value}) if not args
            else ((value, *args[1:]), kwargs), with_kwargs=True)
    else:
        layers = getattr(block, "attentions", None) or block.resnets
        handle = layers[branch["layer"] - 1].register_forward_hook(
            lambda m, args, out: (value, *out[1:]) if isinstance(out, tuple) else value)
    try:
        with torch.no_grad():
            return contract.wrap(unet).eval()(*inputs)[0].numpy()
    finally:
        handle.remove()


@pytest.mark.parametrize("kind,exporter", CASES)
def test_every_branch_matches_pytorch(kind, exporter, tiny_unets, tmp_path, kit):
    import torch

    from diffc.exporter.contracts import SampleShape

    unet = tiny_unets[kind]
    marked, contract = _export_marked(unet, exporter, tmp_path / "unet.onnx")
    branches = unet_branches(dict(unet.config))
    assert {o.name for o in marked.graph.output} == {"out_sample", *(b["feature"] for b in branches)}
    shape = SampleShape(2, 16, 20, 77)
    now = contract.make_inputs(unet, shape, torch.Generator().manual_seed(1))
    before = contract.make_inputs(unet, shape, torch.Generator().manual_seed(2))  # an earlier, full step
    names = contract.input_names
    features = dict(zip([o.name for o in marked.graph.output],
                        kit.run(marked, {n: t.numpy() for n, t in zip(names, before)})))
    full_now = kit.run(marked, {n: t.numpy() for n, t in zip(names, now)})[0]
    for b in branches:
        full, shallow, rep = split(ir.serde.deserialize_model(marked), b["branch"],
                                   dims=("batch", None, *feature_dims(b["level"])))
        shallow = ir.serde.serialize_model(shallow)
        kit.check(shallow)
        assert rep["nodes"]["shallow"] < rep["nodes"]["full"]
        feature = features[b["feature"]]
        assert feature.shape == (2, b["channels"], 16 >> b["level"], 20 >> b["level"])
        (got,) = kit.run(shallow, {**{n: t.numpy() for n, t in zip(names, now)}, b["feature"]: feature})
        ref = _torch_with_feature(unet, contract, now, b, feature)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"{kind} {exporter} branch {b['branch']}")
        # and the cached feature matters: the shallow step is not the full step on the new inputs
        assert np.abs(got - full_now).max() > 1e-3
