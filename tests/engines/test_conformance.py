"""One conformance suite for every backend behind diffc.engines' protocol: the same checks, each backend that can
run here (onnxruntime, OpenVINO; TensorRT-RTX builds without a GPU, its sessions are skipped with the reason).

Per backend: it registers itself and answers the protocol; it builds a small graph into a manifest entry whose
digests are the files'; its sessions refuse a missing input with InputError, agree with onnxruntime within the
backend's own tolerance, reuse their host cache entry, and make a damaged entry again; an entry waits for its
gate (the runtime's hash check) and a closed gate leaves nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from diffc._fs import sha256_file
from diffc.engines import Backend, SessionOptions, backend_names, get_backend
from diffc.engines.host_cache import RECORD, PublishGate
from diffc.errors import BackendUnavailableError, InputError
from diffc.profiles import load_profile

#: backend -> the profile whose precision it builds here
PROFILES = {"onnxruntime": "cpu-fp32", "openvino": "cpu-openvino", "tensorrt_rtx": "rtx-fp16", "tensorrt": "h100-fp8"}
COMPONENT = "vae_decoder"
RANGES = {"batch": [1, 1, 2], "height": [8, 8, 16], "width": [8, 8, 16]}


def _backend(name: str) -> Backend:
    backend = get_backend(name)
    if backend.available() is None:
        pytest.skip(f"{name} is not installed here")
    return backend


def _needs_gpu(name: str) -> None:
    if name.startswith("tensorrt"):
        from diffc.engines._trt_cuda import device_compute_capability

        if device_compute_capability() is None:
            pytest.skip(f"{name} sessions run on an NVIDIA GPU and none is visible (its build is checked here)")


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    """latent_sample (batch, 4, h, w) and a per-channel ``shift`` -> Conv 3x3 + shift + GELU-ish tanh -> sample:
    weights over 1 KiB (so onnxruntime's cache keeps them in a data file), two inputs (to leave one out)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((16, 4, 3, 3)) * 0.2).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "B")
    nodes = [helper.make_node("Conv", ["latent_sample", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "shift"], ["s"]),
             helper.make_node("Tanh", ["s"], ["sample"])]
    inputs = [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["batch", 4, "height", "width"]),
              helper.make_tensor_value_info("shift", TensorProto.FLOAT, [1, 16, 1, 1])]
    outputs = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 16, "height", "width"])]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, [w, b]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path_factory.mktemp("conformance") / "model.onnx"
    onnx.save(model, str(path))
    return path


def _feeds(batch: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"latent_sample": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32),
            "shift": rng.standard_normal((1, 16, 1, 1)).astype(np.float32)}


@pytest.fixture(scope="module")
def reference(graph) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return sess.run(["sample"], _feeds())[0]


_built: dict[str, tuple] = {}


def _build(name: str, graph: Path, root: Path):
    """Build once per backend per run (TensorRT-RTX builds take seconds)."""
    if name not in _built:
        backend = _backend(name)
        profile = load_profile(PROFILES[name])
        backend.check_profile(profile)
        artifact = root / name
        built = backend.build_engine(COMPONENT, graph, artifact, profile=profile, shape_ranges=RANGES)
        _built[name] = (backend, profile, artifact, built)
    return _built[name]


@pytest.fixture(scope="module")
def build_root(tmp_path_factory) -> Path:
    _built.clear()
    return tmp_path_factory.mktemp("built")


BACKENDS = ["onnxruntime", "openvino", "tensorrt_rtx"]


def test_every_backend_is_registered_and_answers_the_protocol():
    assert set(backend_names()) >= {"onnxruntime", "openvino", "tensorrt", "tensorrt_rtx"}
    vocab = set(get_backend("onnxruntime").pass_defaults)
    for name in backend_names():
        backend = get_backend(name)
        assert isinstance(backend, Backend) and backend.name == name
        assert set(backend.pass_defaults) == vocab, name
        assert backend.tolerance("fp32") > 0
    with pytest.raises(BackendUnavailableError, match="no 'cuda' backend"):
        get_backend("cuda")


def test_importing_the_registry_loads_no_backend():
    import subprocess
    import sys

    code = ("import sys, diffc.engines, diffc.runtime; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('onnxruntime', 'openvino', 'tensorrt_rtx', 'tensorrt', 'torch') "
            "or m in ('diffc.engines.openvino', 'diffc.engines.tensorrt')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", BACKENDS)
def test_build_records_the_files_it_wrote(name, graph, build_root):
    _, profile, artifact, built = _build(name, graph, build_root)
    m = built.manifest
    assert m["backend"] == name and m["precision"] == profile.precision_of(COMPONENT).value
    assert m["file"] in m["files"] and all(f.startswith(f"{COMPONENT}/") for f in m["files"])
    assert {f: sha256_file(artifact / f) for f in m["files"]} == m["files"]
    assert [i["name"] for i in m["inputs"]] == ["latent_sample", "shift"]
    assert [o["name"] for o in m["outputs"]] == ["sample"] and m["shape_ranges"] == RANGES
    assert built.report["engine_bytes"] == sum((artifact / f).stat().st_size for f in m["files"])


@pytest.mark.parametrize("name", BACKENDS)
def test_session_checks_feeds_and_matches_onnxruntime(name, graph, build_root, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFC_CACHE_DIR", "off")
    backend, _, artifact, built = _build(name, graph, build_root)
    _needs_gpu(name)
    m = built.manifest
    session = backend.open_session(COMPONENT, m, artifact / m["file"], SessionOptions())
    assert session.input_names == ["latent_sample", "shift"] and session.output_names == ["sample"]
    with pytest.raises(InputError, match="missing inputs \\['shift'\\]"):
        session.run({"latent_sample": _feeds()["latent_sample"]})
    out = session.run(_feeds())["sample"]
    rel = np.linalg.norm(out - reference) / np.linalg.norm(reference)
    assert out.shape == reference.shape and rel <= backend.tolerance(m["precision"]), rel


def _entries(cache: Path, name: str) -> list[Path]:
    return sorted(p.parent for p in (cache / name).rglob(RECORD))


@pytest.mark.parametrize("name", BACKENDS)
def test_host_cache_entry_reused_and_damaged_entry_rebuilt(name, graph, build_root, reference, tmp_path,
                                                           monkeypatch, caplog):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFC_CACHE_DIR", str(cache))
    backend, _, artifact, built = _build(name, graph, build_root)
    _needs_gpu(name)
    if name.startswith("tensorrt"):
        pytest.skip("TensorRT keeps no per-session entry (its build cache: test_tensorrt_build_cache_*)")
    m = built.manifest
    key = "|".join(m["files"][f] for f in sorted(m["files"]))

    def open_():
        return backend.open_session(COMPONENT, m, artifact / m["file"], SessionOptions(cache_key=key))

    first = open_()
    assert not first.from_cache and len(_entries(cache, name)) == 1
    second = open_()
    assert second.from_cache and len(_entries(cache, name)) == 1
    assert np.array_equal(second.run(_feeds())["sample"], first.run(_feeds())["sample"])
    # damage the entry's largest file, same size: its integrity record no longer matches
    entry = _entries(cache, name)[0]
    largest = max((f for f in entry.iterdir() if f.name != RECORD), key=lambda f: f.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        third = open_()
    assert not third.from_cache and "does not match its sha256" in caplog.text
    out = third.run(_feeds())["sample"]
    assert np.linalg.norm(out - reference) / np.linalg.norm(reference) <= backend.tolerance(m["precision"])
    assert open_().from_cache and len(_entries(cache, name)) == 1


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_entry_waits_for_its_gate(name, graph, build_root, tmp_path, monkeypatch):
    """A session's entry is published when its gate opens (the files verified), never when it closes."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFC_CACHE_DIR", str(cache))
    backend, _, artifact, built = _build(name, graph, build_root)
    m = built.manifest
    for verdict, left in (("close", 0), ("open", 1)):
        gate = PublishGate()
        backend.open_session(COMPONENT, m, artifact / m["file"], SessionOptions(cache_key="k", gate=gate))
        assert _entries(cache, name) == [] and len(list((cache / name).iterdir())) == 1  # the held folder
        getattr(gate, verdict)()
        assert len(_entries(cache, name)) == left and len(list((cache / name).iterdir())) == left


def test_tensorrt_build_cache_reused_and_damaged_entry_rebuilt(graph, tmp_path, monkeypatch, caplog):
    """TensorRT's host cache holds built engines (keyed by the graph's own content hash and every setting)."""
    backend = _backend("tensorrt_rtx")
    monkeypatch.setenv("DIFFC_CACHE_DIR", str(tmp_path / "cache"))
    profile = load_profile(PROFILES["tensorrt_rtx"])

    def build(i):
        return backend.build_engine(COMPONENT, graph, tmp_path / f"a{i}", profile=profile, shape_ranges=RANGES)

    assert build(0).report["tensorrt"]["cache"] == "miss"
    assert build(1).report["tensorrt"]["cache"] == "hit"
    entry, = _entries(tmp_path / "cache" / "tensorrt", "tensorrt_rtx")
    plan = entry / "model.plan"
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.unlink()  # the artifacts hard-link the same inode: a new file, as damage on disk would look
    plan.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = build(2)
    assert again.report["tensorrt"]["cache"] == "miss" and "does not match its sha256" in caplog.text
    assert sha256_file(tmp_path / "a2" / again.manifest["file"]) == again.manifest["files"][again.manifest["file"]]
    assert build(3).report["tensorrt"]["cache"] == "hit"


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_a_group_of_graphs_from_one_model(name, graph, tmp_path, monkeypatch):
    """Two graphs cut from one model (the cache-reuse UNet pair) build into one folder where the backend can share
    their weights (onnxruntime: ``<folder>/weights.data`` holds each tensor once), each its own folder elsewhere;
    either way every session computes what its graph does."""
    import onnxruntime as ort

    monkeypatch.setenv("DIFFC_CACHE_DIR", "off")
    backend = _backend(name)
    profile = load_profile(PROFILES[name])
    model = onnx.load(str(graph))
    model.graph.node[2].op_type = "Sigmoid"  # the same weights, another head
    other = tmp_path / "other.onnx"
    onnx.save(model, str(other))
    built = backend.build_engine_group({"unet": graph, "unet_shallow": other}, tmp_path / "art", "unet",
                                       profile=profile, shape_ranges={"unet": RANGES, "unet_shallow": RANGES})
    files = {n: sorted(b.manifest["files"]) for n, b in built.items()}
    if name == "onnxruntime":
        assert files == {"unet": ["unet/model.onnx", "unet/weights.data"],
                         "unet_shallow": ["unet/shallow.onnx", "unet/weights.data"]}
        weights = (tmp_path / "art" / "unet" / "weights.data").stat().st_size
        conv = 16 * 4 * 9 * 4  # bytes of the conv weight (the bias stays inline: under 1 KiB)
        assert conv <= weights < 2 * conv  # the shared weight once, not twice
    else:
        assert {f.split("/")[0] for fs in files.values() for f in fs} == {"unet", "unet_shallow"}
    for comp, src in (("unet", graph), ("unet_shallow", other)):
        m = built[comp].manifest
        assert {f: sha256_file(tmp_path / "art" / f) for f in m["files"]} == m["files"]
        out = backend.open_session(comp, m, tmp_path / "art" / m["file"], SessionOptions()).run(_feeds())["sample"]
        want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(["sample"], _feeds())[0]
        assert np.linalg.norm(out - want) / np.linalg.norm(want) <= backend.tolerance(m["precision"])
