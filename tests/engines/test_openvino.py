"""The OpenVINO backend (cpu-openvino, cpu-openvino-int8): OpenVINO IR converted at build time, compiled by its
CPU plugin for the shapes the session is run with.

Checked component by component against the onnxruntime artifact of the same profile (fp32: the same numbers;
bf16: close, and really bf16 where the CPU has bf16 instructions), end to end by the image, and for int8 by
the kernels OpenVINO runs and the build's quality gate."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'diffc[openvino]')")
jsonschema = pytest.importorskip("jsonschema")

import diffc  # noqa: E402
from diffc.engines import openvino as ov_engine  # noqa: E402
from diffc.errors import BackendUnavailableError, InputError, ProfileError  # noqa: E402
from diffc.profiles import load_profile  # noqa: E402
from diffc.profiles.schema import Precision  # noqa: E402
from diffc.runtime import load  # noqa: E402
from diffc.runtime.pipeline import opt_shapes  # noqa: E402

PROMPT = "a handwritten digit seven"
SCHEMA = Path(diffc.__file__).parent / "runtime" / "manifest.schema.json"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, demo_cpu_openvino_artifact, demo_cpu_cache_artifact):
    """The demo with cache reuse (cpu-cache's [cache] table) built three ways: cpu (OpenVINO bf16) and cpu-cache
    (onnxruntime fp32), the run's shared builds (tests/conftest.py; read them only), and cpu with fp32
    precision, built here."""
    fp32 = dataclasses.replace(load_profile("cpu"), name="ov-fp32-cache", cache=load_profile("cpu-cache").cache,
                               precision={"default": Precision.FP32})
    return {"bf16": demo_cpu_openvino_artifact,
            "fp32": diffc.build("demo", fp32, tmp_path_factory.mktemp("ov") / "fp32.diffc", progress=False),
            "ort": demo_cpu_cache_artifact}


@pytest.fixture(scope="module")
def pipes(artifacts):
    """Each artifact loaded once, for the tests that only run it (the cache test changes its pipeline: it loads
    its own)."""
    return {k: load(v, progress=False) for k, v in artifacts.items()}


def _feeds(pipe, name: str) -> dict[str, np.ndarray]:
    """Random inputs for a demo component (batch 2, 16x16 latents); the shallow UNet's cached feature is what the
    full UNet of ``pipe`` emits for the same inputs."""
    rng = np.random.default_rng(0)
    if name == "text_encoder":
        return {"input_ids": rng.integers(0, 1000, (2, 77)).astype(np.int64)}
    if name == "vae_decoder":
        return {"latent_sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32)}
    feeds = {"sample": rng.standard_normal((2, 4, 16, 16)).astype(np.float32),
             "timestep": np.array([999.0, 1.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    if name == "unet_shallow":
        feature = pipe.cache["feature"]
        feeds[feature] = pipe.sessions["unet"].run(feeds, [feature])[feature]
    return feeds


def test_manifest_and_files(artifacts):
    for precision in ("bf16", "fp32"):
        art = artifacts[precision]
        m = json.loads((art / "manifest.json").read_text())
        jsonschema.validate(m, json.loads(SCHEMA.read_text()))
        assert m["profile"]["backend"] == "openvino" and "openvino" in m["build"]["versions"]
        for name, c in m["components"].items():
            assert c["backend"] == "openvino" and c["precision"] == precision, name
            assert sorted(c["files"]) == [f"{name}/model.bin", f"{name}/model.xml"] and c["file"].endswith(".xml")
    # bf16 components keep fp16 weights: half the bytes of the fp32 build's
    size = {p: (artifacts[p] / "unet" / "model.bin").stat().st_size for p in ("bf16", "fp32")}
    assert 0.45 < size["bf16"] / size["fp32"] < 0.55, size


@pytest.mark.parametrize("name", ["text_encoder", "unet", "unet_shallow", "vae_decoder"])
def test_components_match_onnxruntime(pipes, name):
    """OpenVINO fp32 gives onnxruntime's numbers for each component; bf16 stays close (and differs where the CPU
    computes in bf16, so the precision really reaches the plugin)."""
    feeds = _feeds(pipes["ort"], name)
    ref = pipes["ort"].sessions[name].run(feeds)
    fp32 = pipes["fp32"].sessions[name].run(feeds)
    bf16 = pipes["bf16"].sessions[name].run(feeds)
    assert fp32.keys() == bf16.keys() == ref.keys()
    for out, r in ref.items():
        scale = float(np.abs(r).max()) or 1.0
        assert np.abs(fp32[out] - r).max() <= 1e-4 * scale, out
        rel = float(np.linalg.norm(bf16[out] - r) / (np.linalg.norm(r) or 1.0))
        assert rel < 0.05, (out, rel)
        if ov_engine.native_bf16() and r.dtype == np.float32:
            assert rel > 0, out


def _mapped_rss_kib(path: Path) -> int | None:
    """Resident KiB of this process's mappings of ``path`` (None: no such mapping)."""
    target, rss, inside = str(path.resolve()), None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and fields[0][0] in "0123456789abcdef" and ":" in fields[3]:
                inside = len(fields) >= 6 and " ".join(fields[5:]) == target
            elif inside and fields[0] == "Rss:":
                rss = (rss or 0) + int(fields[1])
    return rss


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_session_compiles_per_shape_and_drops_weight_pages(artifacts, pipes, monkeypatch):
    """A session compiles for the shapes it is run with (again when they change, close to onnxruntime at each),
    and once compiled keeps none of the IR's weights file resident (bf16: the plugin reads every weight into
    its packed bf16 copy; fp32 reads some in place, which come back on use); without that drop the file's pages
    would be resident (so the check can fail)."""
    path = artifacts["bf16"] / "unet" / "model.xml"
    weights = path.with_suffix(".bin")
    feeds = _feeds(pipes["ort"], "unet")
    session = ov_engine.Session(path, precision="bf16")
    for batch in (2, 1, 2):
        part = {k: v[:batch] for k, v in feeds.items()}
        out, ref = session.run(part)["out_sample"], pipes["ort"].sessions["unet"].run(part)["out_sample"]
        assert out.shape[0] == batch and np.linalg.norm(out - ref) < 0.05 * np.linalg.norm(ref)
        assert session._shapes[0][0] == batch
        assert _mapped_rss_kib(weights) == 0
    # shapes the graph cannot take are refused, and the session still runs the ones it can afterwards
    with pytest.raises(InputError, match="do not fit the graph"):
        session.run({**feeds, "sample": feeds["sample"][:, :, 0]})
    assert session.run(feeds)["out_sample"].shape == feeds["sample"].shape
    del session
    monkeypatch.setattr(ov_engine, "_drop_file_pages", lambda path: 0)
    kept = ov_engine.Session(path, precision="bf16")
    kept.run(feeds)
    assert _mapped_rss_kib(weights) > 0


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_host_cache_imports_the_compiled_model(artifacts, pipes, tmp_path, monkeypatch, caplog):
    """With a cache key, a compiled model goes into the host cache; the next session with the same key, shapes
    and options imports it (without reading the IR; the same numbers; the blob's pages dropped like the IR's).
    Other shapes or another key are other entries; a damaged entry is compiled again and replaced; with the
    cache off nothing is written."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFC_CACHE_DIR", str(cache))
    path = artifacts["bf16"] / "unet" / "model.xml"
    feeds = _feeds(pipes["ort"], "unet")
    names = pipes["bf16"].sessions["unet"].input_names
    shapes = [feeds[n].shape for n in names]

    def entries():
        return sorted(p.parent for p in (cache / "openvino").glob("*/complete"))

    first = ov_engine.Session(path, precision="bf16", shapes=shapes, cache_key="k")
    ref = first.run(feeds)
    assert not first.from_cache and len(entries()) == 1
    entry = entries()[0]
    second = ov_engine.Session(path, precision="bf16", shapes=shapes, cache_key="k")
    assert second.from_cache and second._model is None
    assert (second.input_names, second.output_names) == (first.input_names, first.output_names)
    assert _mapped_rss_kib(entry / "model.blob") == 0
    out = second.run(feeds)
    assert out.keys() == ref.keys() and all(np.array_equal(out[k], ref[k]) for k in ref)
    # another batch: compiled (reading the IR now) into an entry of its own
    part = {k: v[:1] for k, v in feeds.items()}
    assert second.run(part)["out_sample"].shape[0] == 1 and not second.from_cache and len(entries()) == 2
    assert not ov_engine.Session(path, precision="bf16", shapes=shapes, cache_key="other").from_cache
    assert len(entries()) == 3
    # a damaged blob: a warning, a compile, the entry written again
    (entry / "model.blob").write_bytes(b"not a compiled model")
    with caplog.at_level("WARNING", logger="diffc.engines.openvino"):
        again = ov_engine.Session(path, precision="bf16", shapes=shapes, cache_key="k")
    assert not again.from_cache and "cannot be used" in caplog.text
    assert np.array_equal(again.run(feeds)["out_sample"], ref["out_sample"])
    assert ov_engine.Session(path, precision="bf16", shapes=shapes, cache_key="k").from_cache
    # through the runtime: a second load imports every component
    load(artifacts["bf16"], progress=False)
    assert all(s.from_cache for s in load(artifacts["bf16"], progress=False).sessions.values())
    monkeypatch.setenv("DIFFC_CACHE_DIR", "off")
    shutil.rmtree(cache)
    assert not ov_engine.Session(path, precision="bf16", shapes=shapes, cache_key="k").from_cache
    assert not cache.exists()


def test_load_compiles_for_the_opt_shapes(artifacts):
    """Loading compiles every OpenVINO component for the profile's opt shapes (default size and batch): an image
    at the default size compiles nothing again."""
    pipe = load(artifacts["bf16"], progress=False)
    compiled = {name: session._compiled for name, session in pipe.sessions.items()}
    for name, session in pipe.sessions.items():
        assert session._shapes == tuple(opt_shapes(pipe.manifest["components"][name])), name
    pipe(PROMPT, seed=0)
    assert all(pipe.sessions[name]._compiled is c for name, c in compiled.items())
    # told another size at load (diffc run --height/--width), it compiles for that one instead
    size = pipe.image["height"][2]
    assert size != pipe.image["height"][1]
    other = load(artifacts["bf16"], progress=False, height=size, width=size)
    latent = size // other.latent["vae_scale_factor"]
    assert other.sessions["unet"]._shapes[0][2:] == other.sessions["vae_decoder"]._shapes[0][2:] == (latent, latent)
    compiled = {name: session._compiled for name, session in other.sessions.items()}
    assert other(PROMPT, seed=0, height=size, width=size).shape == (1, size, size, 3)
    assert all(other.sessions[name]._compiled is c for name, c in compiled.items())


def test_image_matches_onnxruntime(pipes):
    images = {k: pipe(PROMPT, seed=0) for k, pipe in pipes.items()}
    assert images["bf16"].shape == images["ort"].shape == (1, 32, 32, 3)
    assert np.abs(images["fp32"] - images["ort"]).max() < 1e-3
    psnr = 10 * np.log10(1.0 / max(float(np.mean((images["bf16"] - images["ort"]) ** 2)), 1e-12))
    assert psnr > 30, psnr


def test_cache_reuse_runs_the_shallow_unet(artifacts):
    pipe = load(artifacts["bf16"], progress=False)
    calls = []
    shallow = pipe.sessions["unet_shallow"]
    real = shallow.run
    shallow.run = lambda feeds, outputs=None: calls.append(1) or real(feeds, outputs)
    cached = pipe(PROMPT, seed=0)
    shallow_steps = pipe.full_steps().count(False)
    assert len(calls) == shallow_steps > 0
    pipe.set_cache_schedule(None)  # the full UNet on every step: the shallow one is not called again
    full = pipe(PROMPT, seed=0)
    assert len(calls) == shallow_steps
    assert np.isfinite(cached).all() and not np.array_equal(cached, full)


@pytest.fixture(scope="module")
def int8_artifact(demo_cpu_openvino_int8_artifact):
    """The demo built with cpu-openvino-int8 and cpu-cache's [cache] table: calibration, Q/DQ, OpenVINO IR, and
    the quality gate on the artifact itself (the run's shared build, tests/conftest.py: read it only)."""
    return demo_cpu_openvino_int8_artifact


def _runtime_precisions(session, layer: str) -> set[str]:
    """The precisions OpenVINO's compiled model runs ``layer`` nodes in (its runtime model's rt_info)."""
    found = set()
    for op in session._compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == layer:
            found.add(info["runtimePrecision"].astype(str))
    return found


def test_int8_build_runs_int8_kernels_and_passes_its_gate(int8_artifact, pipes, demo_host_cache, monkeypatch):
    """cpu-openvino-int8: the UNet pair and the VAE decoder are Q/DQ graphs that OpenVINO runs with int8
    convolutions and GEMMs; the text encoder stays bf16; the build's quality gate ran on the artifact itself;
    the image stays close to the fp32 onnxruntime artifact's."""
    m = json.loads((int8_artifact / "manifest.json").read_text())
    jsonschema.validate(m, json.loads(SCHEMA.read_text()))
    assert {n: c["precision"] for n, c in m["components"].items()} == {
        "text_encoder": "bf16", "unet": "int8", "unet_shallow": "int8", "vae_decoder": "int8", "vae_encoder": "bf16"}
    report = json.loads((int8_artifact / "build_report.json").read_text())
    gate = report["quality_gate"]
    assert gate["passed"] and gate["evaluated_with"] == "artifact" and gate["psnr_db_mean"] >= 28.0
    assert report["components"]["unet"]["quantization"]["activations"] == "int8"
    # the build compiled every component for the default shapes into this host's cache: loading imports them
    # (the cache that build used: under xdist another worker may have built the shared artifact)
    monkeypatch.setenv("DIFFC_CACHE_DIR", str(demo_host_cache(int8_artifact)))
    pipe = load(int8_artifact, progress=False)
    assert all(s.from_cache for s in pipe.sessions.values()) and report["timings"]["host_cache_s"] > 0
    image = pipe(PROMPT, seed=0)
    ref = pipes["ort"](PROMPT, seed=0)
    psnr = 10 * np.log10(1.0 / max(float(np.mean((image - ref) ** 2)), 1e-12))
    assert 20 < psnr < 80, psnr  # close, and not the fp32 image (the int8 graphs really ran)
    for name in ("unet", "unet_shallow", "vae_decoder"):
        assert _runtime_precisions(pipe.sessions[name], "Convolution") & {"u8", "i8"}, name
    assert _runtime_precisions(pipe.sessions["unet"], "FullyConnected") & {"u8", "i8"}
    assert not _runtime_precisions(pipe.sessions["text_encoder"], "FullyConnected") & {"u8", "i8"}


def test_runtime_does_not_import_torch(artifacts):
    code = (
        "import sys\nfrom diffc.runtime import load\n"
        f"img = load({str(artifacts['bf16'])!r}, progress=False)('a cat', seed=1)\n"
        "assert img.shape[-1] == 3\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'onnxruntime.transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_refusals(artifacts, tmp_path, monkeypatch):
    fp16 = tmp_path / "ov-fp16.toml"
    fp16.write_text('name = "ov-fp16"\nbackend = "openvino"\n[precision]\nunet = "fp16"\n')
    with pytest.raises(BackendUnavailableError, match="the openvino backend builds fp32, bf16, int8"):
        diffc.build("demo", fp16, tmp_path / "a", progress=False)
    fp8 = tmp_path / "ov-fp8.toml"
    fp8.write_text('name = "ov-fp8"\nbackend = "openvino"\n[precision]\nunet = "fp8"\n')
    with pytest.raises(BackendUnavailableError, match="fp8"):
        diffc.build("demo", fp8, tmp_path / "a", progress=False)
    mha = tmp_path / "ov-mha.toml"
    mha.write_text('name = "ov-mha"\nbackend = "openvino"\n[passes]\nattention = "mha"\n')
    with pytest.raises(ProfileError, match="attention = .mha. is not available for openvino"):
        diffc.build("demo", mha, tmp_path / "b", progress=False)
    with pytest.raises(InputError, match="fp16"):
        ov_engine.Session(artifacts["bf16"] / "unet" / "model.xml", precision="fp16")
    monkeypatch.setattr(ov_engine, "available", lambda: None)
    with pytest.raises(BackendUnavailableError, match=r"diffc\[openvino\]"):
        diffc.build("demo", "cpu-openvino", tmp_path / "c", progress=False)
    assert not any(tmp_path.glob("[abc]"))
