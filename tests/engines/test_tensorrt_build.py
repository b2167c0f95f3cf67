"""Real TensorRT-RTX engines for the tiny SD pipeline, built ahead of time for SM89 on this (GPU-less) machine:
every component in fp32 and fp16, the build cache, the manifest record, ops that cannot build, Q/DQ graphs.

Skipped when TensorRT-RTX is not installed (CI installs the ``tensorrt`` extra). Builds use optimization level 0
and are shared across the module: the whole file takes well under a minute on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import diffc
from diffc._fs import sha256_file
from diffc.engines import tensorrt as T
from diffc.errors import ArtifactError, BackendUnavailableError, ProfileError
from diffc.profiles import load_profile

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
BUILD = {"backend": "tensorrt_rtx", "compute_capabilities": ["SM89"], "opt_level": 0}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trt-cache")


@pytest.fixture(scope="module")
def engines(rtx, tiny_onnx, tiny_ranges, cache_dir, tmp_path_factory):
    """{(component, precision): (engine path, record)} for every component in fp32 and fp16."""
    out = tmp_path_factory.mktemp("engines")
    built = {}
    for precision in ("fp32", "fp16"):
        for comp in COMPONENTS:
            path = out / precision / comp / T.ENGINE_FILE
            rec = T.build_engine(tiny_onnx[comp], path, shape_ranges=tiny_ranges[comp], precision=precision,
                                 cache_dir=cache_dir, component=comp, **BUILD)
            built[comp, precision] = (path, rec)
    return built


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("comp", COMPONENTS)
def test_every_component_builds(engines, rtx, comp, precision):
    path, rec = engines[comp, precision]
    assert rec["report"]["cache"] == "miss"
    assert path.stat().st_size == rec["report"]["engine_bytes"] > 100_000
    opts = rec["backend_options"]
    assert opts["engine_sha256"] == sha256_file(path)
    assert rec["backend"] == "tensorrt_rtx" and rec["backend_version"] == rtx.__version__
    assert opts["compute_capabilities"] == ["SM89"] and opts["hardware_compat"] == "none"
    assert opts["strongly_typed"] is True
    assert opts["autocast"] == ("fp16" if precision == "fp16" else None)
    # fp32 I/O whatever the precision: the runtime feeds float32 (and int64 token ids)
    assert {i["dtype"] for i in rec["inputs"]} <= {"float32", "int64"}
    assert {o["dtype"] for o in rec["outputs"]} == {"float32"}
    insp = rec["report"]["inspector"]
    assert insp["source"] == "build_log" and insp["network_layers"] > 100
    assert insp["myelin_regions"] >= 1 and insp["activation_bytes"] > 0
    # every tiny component has attention (CLIP self-attention, UNet transformer blocks, the VAE mid block)
    assert insp["fused_attention"] is True


def test_fp16_engines_are_smaller(engines):
    for comp in COMPONENTS:
        assert engines[comp, "fp16"][1]["report"]["engine_bytes"] < engines[comp, "fp32"][1]["report"]["engine_bytes"]


def test_unet_profile(engines):
    """The UNet's optimization profile: CFG-doubled batch, latent sizes, static channel and sequence dims."""
    _, rec = engines["unet", "fp16"]
    (profile,) = rec["backend_options"]["profiles"]
    assert profile["sample"] == {"min": [1, 4, 8, 8], "opt": [2, 4, 16, 16], "max": [8, 4, 32, 32]}
    assert profile["timestep"] == {"min": [1], "opt": [2], "max": [8]}
    assert profile["encoder_hidden_states"] == {"min": [1, 77, 32], "opt": [2, 77, 32], "max": [8, 77, 32]}
    assert [i["name"] for i in rec["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert rec["inputs"][0]["shape"] == ["batch", 4, "height", "width"]


def test_record_validates_as_manifest_component(engines):
    """What the build writes from the record is a valid manifest component (schema_version 1)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(diffc.__file__).parent / "runtime" / "manifest.schema.json").read_text())
    path, rec = engines["unet", "fp16"]
    entry = T.manifest_entry(rec, "unet")
    jsonschema.validate(entry, {"$defs": schema["$defs"], "$ref": "#/$defs/component"})
    assert "report" not in entry and entry["backend_options"]["profiles"]
    assert entry["file"] == "unet/model.plan" and entry["files"] == {"unet/model.plan": sha256_file(path)}


def test_cache_hit_does_not_build(engines, tiny_onnx, tiny_ranges, cache_dir, tmp_path, monkeypatch):
    calls = []
    real = T._build_plan
    monkeypatch.setattr(T, "_build_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(shape_ranges=tiny_ranges["vae_decoder"], precision="fp16", cache_dir=cache_dir,
              component="vae_decoder", **BUILD)

    rec = T.build_engine(tiny_onnx["vae_decoder"], tmp_path / "a" / T.ENGINE_FILE, **kw)
    assert calls == [] and rec["report"]["cache"] == "hit"
    built = engines["vae_decoder", "fp16"][1]
    assert sha256_file(tmp_path / "a" / T.ENGINE_FILE) == built["backend_options"]["engine_sha256"]
    assert rec["backend_options"] == built["backend_options"]

    rec = T.build_engine(tiny_onnx["vae_decoder"], tmp_path / "b" / T.ENGINE_FILE, no_cache=True, **kw)
    assert calls == [1] and rec["report"]["cache"] == "rebuilt"


def test_cache_key_covers_graph_and_flags(rtx, tiny_onnx, tiny_ranges, cache_dir, tmp_path, monkeypatch):
    calls = []
    real = T._build_plan
    monkeypatch.setattr(T, "_build_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(shape_ranges=tiny_ranges["vae_decoder"], precision="fp16", cache_dir=cache_dir, component="vae_decoder")
    base = T.build_engine(tiny_onnx["vae_decoder"], tmp_path / "0.plan", **kw, **BUILD)
    assert base["report"]["cache"] == "hit" and calls == []
    keys = {base["backend_options"]["cache_key"]}
    for change in ({"opt_level": 1}, {"compute_capabilities": ["SM89", "SM120"]}, {"static_shapes": True}):
        rec = T.build_engine(tiny_onnx["vae_decoder"], tmp_path / f"{len(keys)}.plan", **kw, **{**BUILD, **change})
        assert rec["report"]["cache"] == "miss", change
        keys.add(rec["backend_options"]["cache_key"])
    assert len(keys) == 4 and len(calls) == 3
    # the graph bytes are part of the key: same settings, one changed weight -> rebuilt
    import onnx

    model = onnx.load(str(tiny_onnx["vae_decoder"]))
    init = next(t for t in model.graph.initializer if t.raw_data)
    init.raw_data = bytes([init.raw_data[0] ^ 1]) + init.raw_data[1:]
    edited = tmp_path / "edited" / "model.onnx"
    edited.parent.mkdir()
    onnx.save(model, str(edited))
    rec = T.build_engine(edited, tmp_path / "edited.plan", **kw, **BUILD)
    assert rec["report"]["cache"] == "miss" and rec["backend_options"]["cache_key"] not in keys


def test_two_compute_capabilities(rtx, make_graph, tmp_path):
    ranges = {"batch": [1, 1, 2], "height": [8, 8, 16], "width": [8, 8, 16]}
    rec = T.build_engine(make_graph("conv"), tmp_path / "m.plan", shape_ranges=ranges, backend="tensorrt_rtx",
                         compute_capabilities=["SM89", "SM120"], opt_level=0, cache_dir=tmp_path / "c")
    assert rec["backend_options"]["compute_capabilities"] == ["SM89", "SM120"]
    assert rec["report"]["inspector"]["fused_attention"] is False  # a conv has no attention to find
    T.check_engine_compatible(rec, device_cc="SM120")
    with pytest.raises(ArtifactError, match="(?i)rebuild"):
        T.check_engine_compatible(rec, device_cc="SM86")
    with pytest.raises(ArtifactError, match="(?i)rebuild"):
        T.check_engine_compatible(dict(rec, backend_version="1.0.0.0"), device_cc="SM89")


def test_attention23_needs_fp16(rtx, make_graph, tmp_path):
    """ONNX Attention (opset 23) has no fp32 kernel in TensorRT-RTX; the error says what to do. fp16 builds."""
    ranges = {"batch": [1, 2, 4], "sequence": [16, 77, 256]}
    with pytest.raises(T.EngineBuildError, match="fp16"):
        T.build_engine(make_graph("attention23", "fp32"), tmp_path / "a32.plan", shape_ranges=ranges,
                       cache_dir=tmp_path, backend="tensorrt_rtx", compute_capabilities=["SM89"], opt_level=0)
    rec = T.build_engine(make_graph("attention23", "fp16"), tmp_path / "a16.plan", shape_ranges=ranges,
                         cache_dir=tmp_path, backend="tensorrt_rtx", compute_capabilities=["SM89"], opt_level=0)
    assert rec["report"]["inspector"]["fused_attention"] is True
    assert rec["inputs"][0]["dtype"] == "float16" and rec["backend_options"]["autocast"] is None


@pytest.mark.parametrize("kind, cc", [("int8", "SM89"), ("fp8", "SM89"), ("int8", "SM120")])
def test_qdq_graphs_build_strongly_typed(rtx, make_graph, tmp_path, kind, cc):
    ranges = {"batch": [1, 1, 2], "height": [8, 16, 32], "width": [8, 16, 32], "sequence": [16, 77, 128]}
    rec = T.build_engine(make_graph(kind), tmp_path / "q.plan", shape_ranges=ranges, precision=kind,
                         backend="tensorrt_rtx", compute_capabilities=[cc], opt_level=0, cache_dir=tmp_path)
    assert rec["backend_options"]["quantized"] == [kind] and rec["backend_options"]["strongly_typed"] is True
    assert rec["precision"] == kind


@pytest.mark.parametrize("name", ["rtx-int8", "rtx-fp8"])
def test_quantized_profiles_refuse_an_unquantized_graph(rtx, tiny_onnx, tiny_ranges, tmp_path, name):
    prof = load_profile(name)
    opts = T.options_from_profile(prof, "unet", tiny_ranges["unet"])
    with pytest.raises(BackendUnavailableError, match="no int8|no fp8"):
        T.build_engine(tiny_onnx["unet"], tmp_path / "u.plan", cache_dir=tmp_path, **opts)
    # the profile's other components are fp16 and build
    opts = T.options_from_profile(prof, "vae_decoder", tiny_ranges["vae_decoder"])
    rec = T.build_engine(tiny_onnx["vae_decoder"], tmp_path / "v.plan", cache_dir=tmp_path, **{**opts, "opt_level": 0})
    assert rec["precision"] == "fp16" and rec["backend_options"]["compute_capabilities"] == ["SM89", "SM120"]


def test_memory_budget(rtx, tiny_onnx, tiny_ranges, tmp_path):
    kw = dict(shape_ranges=tiny_ranges["vae_decoder"], precision="fp32", cache_dir=tmp_path,
              component="vae_decoder", **BUILD)
    with pytest.raises(ProfileError, match=r"\[memory\]\.budget_mib"):
        T.build_engine(tiny_onnx["vae_decoder"], tmp_path / "u.plan", memory_budget_bytes=1 << 20, **kw)  # 1.6 MB
    rec = T.build_engine(tiny_onnx["vae_decoder"], tmp_path / "u.plan", memory_budget_bytes=2 << 30, **kw)
    assert rec["backend_options"]["workspace_bytes"] == (2 << 30) - rec["report"]["weights_bytes_estimate"]
    assert rec["report"]["fits_memory_budget"] is True
    with pytest.raises(T.EngineBuildError, match="workspace_mib"):  # no kernel fits a 1 KiB workspace
        T.build_engine(tiny_onnx["vae_decoder"], tmp_path / "w.plan", workspace_bytes=1024, **kw)


def test_rtx_refuses_datacenter_options(rtx, make_graph, tmp_path):
    for bad in ({"hardware_compat": "ampere_plus"}, {"version_compat": True}):
        with pytest.raises(ProfileError, match="datacenter TensorRT"):
            T.build_engine(make_graph("conv"), tmp_path / "m.plan", shape_ranges={}, backend="tensorrt_rtx", **bad)


def test_refit_needs_a_gpu_to_build(rtx, make_graph, tmp_path):
    from diffc.engines._trt_cuda import device_compute_capability

    if device_compute_capability() is not None:
        pytest.skip("a GPU is present: refittable engines build here")
    with pytest.raises(BackendUnavailableError, match="need a GPU"):
        T.build_engine(make_graph("conv"), tmp_path / "m.plan", shape_ranges={"batch": [1, 1, 1], "height": [8, 8, 8],
                                                                              "width": [8, 8, 8]},
                       backend="tensorrt_rtx", compute_capabilities=["SM89"], refit=True)


def test_weight_streaming_builds(rtx, make_graph, tmp_path):
    rec = T.build_engine(make_graph("conv"), tmp_path / "m.plan", shape_ranges={"batch": [1, 1, 1], "height": [8, 8, 8],
                                                                                "width": [8, 8, 8]},
                         backend="tensorrt_rtx", compute_capabilities=["SM89"], opt_level=0, weight_streaming=True,
                         cache_dir=tmp_path)
    assert rec["backend_options"]["weight_streaming"] is True


def test_session_needs_a_gpu(engines):
    """Without a GPU the runtime refuses with a typed error before touching the engine."""
    from diffc.engines._trt_cuda import device_compute_capability

    if device_compute_capability() is not None:
        pytest.skip("a GPU is present (tests/engines/test_tensorrt_session.py runs the engines)")
    path, rec = engines["vae_decoder", "fp32"]
    with pytest.raises(BackendUnavailableError, match="GPU"):
        T.Session(path, record=rec)


def test_cache_reuse_builds_both_unet_engines(rtx, tmp_path):
    """A cache-enabled TensorRT-RTX fp16 build of the demo (rtx-fp16 with [cache], at opt level 0): every
    component becomes an engine, the full and the shallow UNet both, the shallow one with a shape profile for
    the cached feature derived from the UNet's geometry. (The demo VAE is also the regression case for a Resize
    scales constant shared by two upsamplers, which the fp16 autocast once cast twice under one name.)"""
    prof = tmp_path / "rtx-cache.toml"
    prof.write_text('name = "rtx-cache"\nbackend = "tensorrt_rtx"\n[precision]\ndefault = "fp16"\n'
                    '[tensorrt]\ncompute_capabilities = ["SM89"]\nopt_level = 0\n'
                    '[cache]\nenabled = true\nbranch = 1\ninterval = 2\n')
    art = diffc.build("demo", prof, tmp_path / "rtx-cache.diffc", progress=False)
    m = json.loads((art / "manifest.json").read_text())
    assert {c["precision"] for c in m["components"].values()} == {"fp16"}
    assert {c["backend"] for c in m["components"].values()} == {"tensorrt_rtx"}
    assert m["cache"]["branch"] == 1 and m["cache"]["level"] == 1
    full, shallow = m["components"]["unet"], m["components"]["unet_shallow"]
    for comp in (full, shallow):
        assert comp["backend"] == "tensorrt_rtx" and comp["file"].endswith(T.ENGINE_FILE)
        assert sha256_file(art / comp["file"]) == comp["backend_options"]["engine_sha256"]
    assert "cache_feature_1" in [o["name"] for o in full["outputs"]]
    # demo: 32 px native -> latent 8 (VAE factor 4), range [4, 8, 16]; the level-1 feature is half of that
    feature = shallow["backend_options"]["profiles"][0]["cache_feature_1"]
    assert feature["opt"] == [2, 96, 4, 4] and feature["min"][2:] == [2, 2] and feature["max"][2:] == [8, 8]
    assert shallow["shape_ranges"]["height_div2"] == [2, 4, 8]
