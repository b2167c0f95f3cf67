"""The TensorRT backend's TensorRT-free half: lazy import, missing-backend errors, shape profiles, precision
decisions, dry-run descriptions and the compatibility check. Runs everywhere (no TensorRT, no GPU, no torch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from diffc.engines import tensorrt as T
from diffc.engines._trt_graph import inspect_graph
from diffc.errors import ArtifactError, BackendUnavailableError, ProfileError
from diffc.profiles import load_profile
from diffc.profiles.schema import Range

HEAVY = ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings", "tensorrt_rtx_libs", "tensorrt_libs", "torch")
#: cuda-bindings' .pth file imports the empty ``cuda`` namespace at start-up; the bindings are what is heavy
HEAVY_CUDA = ("cuda.bindings", "cuda.cudart")


def test_import_is_lazy():
    """Importing the backend (and planning a build) loads no TensorRT, CUDA or torch module."""
    code = (
        "import json, sys\n"
        "import diffc.engines.tensorrt as T\n"
        "from diffc.profiles import load_profile\n"
        "T.available(); T.describe_build(load_profile('rtx-fp16'), 'unet', {'batch': [1, 2, 8]})\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)!r} "
        f"or m.startswith({HEAVY_CUDA!r}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make every TensorRT module unimportable, as on a machine without the extra."""
    for name in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings", "tensorrt_rtx_libs"):
        monkeypatch.setitem(sys.modules, name, None)  # find_spec -> None, import -> ImportError
    T._import.cache_clear()
    yield
    T._import.cache_clear()


def test_missing_backend_names_the_extra(no_tensorrt, make_graph):
    assert T.available() is None and T.available("tensorrt_rtx") is None
    with pytest.raises(BackendUnavailableError, match=r"pip install 'diffc\[tensorrt\]'"):
        T.version()
    with pytest.raises(BackendUnavailableError, match=r"pip install 'diffc\[tensorrt\]'"):
        T.build_engine(make_graph("conv"), "unused.plan", shape_ranges={}, backend="tensorrt_rtx")
    with pytest.raises(BackendUnavailableError, match=r"pip install 'diffc\[tensorrt\]'"):
        T.build_engine(make_graph("conv"), "unused.plan", shape_ranges={})  # no flavour at all
    record = {"backend": "tensorrt", "backend_version": "10.13.3.9", "backend_options": {}}
    with pytest.raises(BackendUnavailableError, match=r"diffc\[tensorrt-datacenter\]"):
        T.check_engine_compatible(record)


def test_missing_backend_is_reported_by_dry_run(no_tensorrt):
    desc = T.describe_build(load_profile("rtx-fp16"), "unet", {"batch": [1, 2, 8], "height": [8, 16, 32]})
    assert desc["installed"] is None and desc["backend"] == "tensorrt_rtx"


# ------------------------------------------------------------------------------------------- shapes


UNET_INPUTS = [{"name": "sample", "shape": ["batch", 4, "height", "width"]},
               {"name": "timestep", "shape": ["batch"]},
               {"name": "encoder_hidden_states", "shape": ["batch", "sequence", 768]}]


def _builder_ranges(profile, component, cfg=True):
    from diffc.build.plan import shape_ranges

    geometry = {"vae_scale_factor": 8, "height": (profile.height or Range(256, 512, 1024)).to_list(),
                "width": (profile.width or Range(256, 512, 1024)).to_list()}
    return shape_ranges(component, profile, geometry, cfg=cfg)


def test_unet_profile_doubles_batch_for_cfg():
    prof = load_profile("rtx-fp16")  # batch [1, 1, 4], sizes derived: [256, 512, 1024] px
    profiles = T.input_profiles(UNET_INPUTS, _builder_ranges(prof, "unet"))
    assert profiles["sample"].to_dict() == {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [8, 4, 128, 128]}
    assert profiles["timestep"].to_dict() == {"min": [1], "opt": [2], "max": [8]}
    assert profiles["encoder_hidden_states"].to_dict() == {"min": [1, 77, 768], "opt": [2, 77, 768],
                                                           "max": [8, 77, 768]}
    # the VAE decodes images, not guidance pairs: its batch is the profile's own
    vae = T.input_profiles([{"name": "latent_sample", "shape": ["batch", 4, "height", "width"]}],
                           _builder_ranges(prof, "vae_decoder"))
    assert vae["latent_sample"].to_dict()["max"] == [4, 4, 128, 128]


def test_jetson_profile_is_static():
    prof = load_profile("jetson-orin-int8")
    opts = T.options_from_profile(prof, "unet", _builder_ranges(prof, "unet"))
    assert opts["static_shapes"] is True
    profiles = T.input_profiles(UNET_INPUTS, opts["shape_ranges"], static=opts["static_shapes"])
    for p in profiles.values():
        assert p.min == p.opt == p.max
    assert profiles["sample"].opt == (2, 4, 64, 64)  # 512 px, guidance pair


def test_profile_errors_name_the_axis():
    with pytest.raises(ProfileError, match=r"'sample' axis 2 is dynamic \('height'\).*cover: batch"):
        T.input_profiles(UNET_INPUTS[:1], {"batch": [1, 1, 2], "width": [8, 8, 8]})
    with pytest.raises(ProfileError, match="min <= opt <= max"):
        T.input_profiles(UNET_INPUTS[1:2], {"batch": [4, 2, 8]})


def test_per_input_shapes_override_axes():
    p = T.input_profiles(UNET_INPUTS[1:2], {"batch": [1, 2, 8], "timestep": {"min": [1], "opt": [1], "max": [1]}})
    assert p["timestep"].to_dict() == {"min": [1], "opt": [1], "max": [1]}


# ------------------------------------------------------------------------------------------- precision


def test_precision_plans():
    assert T.check_precision("fp16", backend="tensorrt_rtx", compute_capabilities=["SM89", "SM120"]) == {
        "strongly_typed": True, "autocast": "fp16", "quantized": []}
    assert T.check_precision("fp32", backend="tensorrt_rtx")["autocast"] is None
    # datacenter TensorRT 10.x may still build weakly typed with the FP16 flag: then no autocast
    assert T.check_precision("fp16", backend="tensorrt", strongly_typed=False)["autocast"] is None


@pytest.mark.parametrize("precision, cc", [("fp8", "SM86"), ("fp8", "SM87"), ("bf16", "SM75")])
def test_precision_needs_hardware(precision, cc):
    with pytest.raises(BackendUnavailableError, match=f"{precision}.*{cc}"):
        T.check_precision(precision, backend="tensorrt_rtx", compute_capabilities=[cc], component="unet")


def test_rtx_is_strongly_typed_only():
    with pytest.raises(ProfileError, match="strongly_typed"):
        T.check_precision("fp16", backend="tensorrt_rtx", strongly_typed=False)


def test_int8_needs_a_qdq_graph(make_graph):
    """A graph without Q/DQ cannot be built int8/fp8: the error says where Q/DQ graphs come from."""
    with pytest.raises(BackendUnavailableError, match="explicitly quantized.*diffc build") as e:
        T.check_precision("int8", backend="tensorrt_rtx", graph=make_graph("conv"), component="unet",
                          profile="rtx-int8")
    assert "[precision].unet" in str(e.value) and "ModelOpt" in str(e.value)
    with pytest.raises(BackendUnavailableError, match="no fp8"):  # int8 Q/DQ is not fp8
        T.check_precision("fp8", backend="tensorrt_rtx", graph=make_graph("int8"))
    plan = T.check_precision("int8", backend="tensorrt_rtx", graph=make_graph("int8"))
    assert plan == {"strongly_typed": True, "autocast": None, "quantized": ["int8"]}
    assert T.check_precision("fp8", backend="tensorrt", graph=make_graph("fp8"))["quantized"] == ["fp8"]


def test_quantized_graph_is_not_built_as_fp16(make_graph):
    with pytest.raises(ProfileError, match=r"\[precision\].unet.*'int8'"):
        T.check_precision("fp16", backend="tensorrt_rtx", graph=make_graph("int8"), component="unet")


def test_graph_inspection(make_graph):
    info = inspect_graph(make_graph("int8"))
    assert info.quantized == {"int8"} and info.has_qdq
    assert [i["name"] for i in info.inputs] == ["x"] and info.inputs[0]["shape"] == ["batch", 4, "height", "width"]
    assert inspect_graph(make_graph("fp8")).quantized == {"fp8"}
    conv = inspect_graph(make_graph("conv"))
    assert not conv.has_qdq and conv.weight_floats == {"fp32": 8 * 4 * 3 * 3 * 4} and conv.float_type == "fp32"
    assert conv.weight_bytes == 8 * 4 * 3 * 3 * 4


@pytest.mark.parametrize("name", ["rtx-fp16", "rtx-int8", "rtx-fp8", "h100-fp8", "jetson-orin-int8"])
def test_dry_run_describes_every_component(name):
    prof = load_profile(name)
    for comp in ("text_encoder", "unet", "vae_decoder"):
        d = T.describe_build(prof, comp, _builder_ranges(prof, comp), inputs=UNET_INPUTS if comp == "unet" else None)
        assert d["backend"] == prof.backend.value and d["precision"] == prof.precision_of(comp).value
        assert d["flags"]["strongly_typed"] is True
    unet = T.describe_build(prof, "unet", _builder_ranges(prof, "unet"), inputs=UNET_INPUTS)
    if prof.precision_of("unet").value in ("int8", "fp8"):
        assert "quantize pass" in unet["graph"]
    assert unet["profiles"]["sample"]["max"][0] == (2 if name.startswith("jetson") else 2 * prof.batch.max)


# ------------------------------------------------------------------------------------------- compatibility


def _record(backend="tensorrt_rtx", version="1.7.1.116", ccs=("SM89", "SM120"), hw="none", vc=False):
    return {"backend": backend, "backend_version": version,
            "backend_options": {"compute_capabilities": list(ccs), "hardware_compat": hw, "version_compat": vc}}


def test_compatible_record_passes():
    T.check_engine_compatible(_record(), installed_version="1.7.1.116", device_cc="SM120")


def test_other_version_is_refused():
    with pytest.raises(ArtifactError, match=r"1\.7\.1\.116.*1\.8\.0\.2.*[Rr]ebuild"):
        T.check_engine_compatible(_record(), installed_version="1.8.0.2", device_cc="SM89", component="unet")


def test_other_architecture_is_refused():
    with pytest.raises(ArtifactError, match=r"SM89, SM120.*SM86.*rebuild.*compute_capabilities includes SM86"):
        T.check_engine_compatible(_record(), installed_version="1.7.1.116", device_cc="SM86")
    dc = _record("tensorrt", "10.13.3.9", ccs=["SM90"])
    with pytest.raises(ArtifactError, match="SM89.*rebuild the artifact on this GPU"):
        T.check_engine_compatible(dc, installed_version="10.13.3.9", device_cc="SM89")


def test_compatibility_modes():
    portable = _record(ccs=(), hw="ampere_plus")  # TensorRT-RTX with no listed targets
    T.check_engine_compatible(portable, installed_version="1.7.1.116", device_cc="SM86")
    with pytest.raises(ArtifactError, match="Ampere"):
        T.check_engine_compatible(portable, installed_version="1.7.1.116", device_cc="SM75")
    dc = _record("tensorrt", "10.8.0.43", ccs=["SM89"], hw="ampere_plus", vc=True)
    T.check_engine_compatible(dc, installed_version="10.13.3.9", device_cc="SM90")  # later TensorRT, other GPU
    with pytest.raises(ArtifactError, match="older"):
        T.check_engine_compatible(dc, installed_version="10.7.0.23", device_cc="SM90")
    # version compatibility is a datacenter TensorRT feature: a TensorRT-RTX record claiming it is still exact
    with pytest.raises(ArtifactError, match="only run on the version"):
        T.check_engine_compatible(_record(vc=True), installed_version="1.7.2.1", device_cc="SM89")


def test_not_a_tensorrt_record():
    with pytest.raises(ArtifactError, match="not a TensorRT flavour"):
        T.check_engine_compatible({"backend": "onnxruntime", "backend_version": "1.31.1"})
