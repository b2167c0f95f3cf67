"""Shared helpers of the pass tests: inline graphs, running them in onnxruntime, checking them, and real tiny
UNet / CLIP text-encoder graphs from both torch exporters (exported once per test run, shared by xdist
workers through a file lock)."""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest

ort = pytest.importorskip("onnxruntime")
ir = pytest.importorskip("onnx_ir")
pytest.importorskip("onnxscript")

HEADER = '<ir_version: 10, opset_import: ["" : 21, "com.microsoft" : 1]>'


def parse(text: str) -> onnx.ModelProto:
    """An ONNX-text graph (``agraph (float[2,3] x) => (float[2,3] y) { ... }``) as a checked ModelProto."""
    model = onnx.parser.parse_model(HEADER + "\n" + text)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # level "basic": onnxruntime's own fusions must not blur what the passes did (or failed to do)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def apply(pass_obj, model: onnx.ModelProto):
    """Run one pass on a copy of ``model``; returns (new ModelProto, PassResult)."""
    ir_model = ir.serde.deserialize_model(model)
    result = pass_obj(ir_model)
    return ir.serde.serialize_model(result.model), result


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def assert_same(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray], atol: float = 1e-5) -> None:
    for x, y in zip(run(a, feeds), run(b, feeds)):
        assert x.shape == y.shape
        np.testing.assert_allclose(y, x, atol=atol, rtol=0)


def assert_pass_contract(pass_factory, model: onnx.ModelProto, feeds: dict[str, np.ndarray], atol: float = 1e-5):
    """What every firing pass must satisfy: modified, checker-clean, numerically equal, idempotent.
    Returns the new model and the pass instance (its ``fired`` counts)."""
    instance = pass_factory()
    out, result = apply(instance, model)
    assert result.modified
    assert any(v > 0 for v in instance.fired.values())
    check(out)
    assert_same(model, out, feeds, atol)
    again, second = apply(pass_factory(), out)
    assert not second.modified
    assert ops(again) == ops(out)
    return out, instance


# ------------------------------------------------------------------------------ real tiny graphs

EXPORTERS = ("torchscript", "dynamo")
COMPONENTS = ("unet", "text_encoder")


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive lock on ``path``'s export across xdist workers (POSIX; elsewhere each worker exports)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_suffix(".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _export(exporter: str, component: str, dest: Path) -> dict:
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention
    from transformers.models.clip.modeling_clip import CLIPAttention

    from diffc.exporter.contracts import SampleShape, get_contract
    from diffc.exporter.export import export_component
    from diffc.exporter.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd", seed=0)
    module = getattr(pipe, component).eval()
    contract = get_contract(component, module)
    sample = contract.make_inputs(module, SampleShape(1, 16, 16, 77), torch.Generator().manual_seed(0))
    export_component(module, contract, dest, opset=21, exporter=exporter, sample=sample)
    attention_cls = Attention if component == "unet" else CLIPAttention
    meta = {"attention_blocks": sum(isinstance(m, attention_cls) for m in module.modules())}
    dest.with_suffix(".json").write_text(json.dumps(meta))
    return meta


@pytest.fixture(scope="session")
def tiny_graph(tmp_path_factory):
    """``tiny_graph(exporter, component) -> (ModelProto, {"attention_blocks": n})``, exported once per run."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if root.name.startswith("popen-gw") else root  # shared between xdist workers

    def get(exporter: str, component: str):
        dest = root / "diffc-pass-graphs" / f"{exporter}_{component}.onnx"
        with _locked(dest):
            if dest.is_file() and dest.with_suffix(".json").is_file():
                meta = json.loads(dest.with_suffix(".json").read_text())
            else:
                meta = _export(exporter, component, dest)
        return onnx.load(str(dest)), meta

    return get


def unet_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
            "timestep": np.array([10.0, 700.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}


def text_feeds(seed: int = 0, length: int = 77) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 49406, (2, length))
    ids[:, 0], ids[:, -1] = 49406, 49407
    return {"input_ids": ids.astype(np.int64)}


@pytest.fixture(scope="session")
def kit():
    """The helpers above as one object: pytest's importlib import mode lets no test module import conftest."""
    return types.SimpleNamespace(parse=parse, run=run, check=check, apply=apply, ops=ops, assert_same=assert_same,
                                 contract=assert_pass_contract, unet_feeds=unet_feeds, text_feeds=text_feeds)
