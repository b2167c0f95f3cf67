"""The TensorRT profiles shipped with diffc, and the [tensorrt] / [memory] tables: values, round trip, and every bad
field named in its error."""

import pytest

from diffc.errors import ProfileError
from diffc.profiles import list_profiles, load_profile
from diffc.profiles.schema import Backend, MemoryBudget, Precision, Profile, Range, TensorRTOptions

TRT_PROFILES = ("rtx-fp16", "rtx-int8", "rtx-fp8", "h100-fp8", "jetson-orin-int8")


def test_shipped():
    assert set(TRT_PROFILES) <= set(list_profiles())


@pytest.mark.parametrize("name", TRT_PROFILES)
def test_round_trip(name):
    p = load_profile(name)
    q = Profile.from_dict(p.to_dict(), where="manifest")
    assert q.to_dict() | {"source": ""} == p.to_dict() | {"source": ""}
    assert q.tensorrt == p.tensorrt and q.memory == p.memory


def test_rtx_profiles():
    fp16 = load_profile("rtx-fp16")
    assert fp16.backend is Backend.TENSORRT_RTX
    assert fp16.tensorrt.compute_capabilities == ("SM89", "SM120")
    assert {c: fp16.precision_of(c) for c in ("text_encoder", "unet", "vae_decoder")} == dict.fromkeys(
        ("text_encoder", "unet", "vae_decoder"), Precision.FP16)
    assert load_profile("rtx-int8").precision_of("unet") is Precision.INT8
    fp8 = load_profile("rtx-fp8")
    assert fp8.precision_of("unet") is Precision.FP8 and fp8.precision_of("vae_decoder") is Precision.FP16
    # FP8 GEMMs need Ada or later: no Ampere target in an fp8 profile
    assert all(int(cc[2:]) >= 89 for cc in fp8.tensorrt.compute_capabilities)


def test_datacenter_profiles():
    h100 = load_profile("h100-fp8")
    assert h100.backend is Backend.TENSORRT and h100.tensorrt.compute_capabilities == ("SM90",)
    assert h100.precision_of("unet") is Precision.FP8 and h100.tensorrt.timing_cache
    orin = load_profile("jetson-orin-int8")
    assert orin.backend is Backend.TENSORRT and orin.tensorrt.compute_capabilities == ("SM87",)
    assert orin.tensorrt.static_shapes and orin.batch == Range(1, 1, 1)
    assert orin.height == orin.width == Range(512, 512, 512)
    assert orin.precision_of("unet") is Precision.INT8
    assert orin.memory.budget_mib is not None and orin.memory.budget_mib <= 8192 // 2  # an 8 GB board, shared


def test_defaults_for_other_profiles():
    cpu = load_profile("cpu-fp32")
    assert cpu.tensorrt == TensorRTOptions() and cpu.memory == MemoryBudget()


def _write(tmp_path, text):
    f = tmp_path / "mine.toml"
    f.write_text(text)
    return f


RTX = 'name = "x"\nbackend = "tensorrt_rtx"\n'
DC = 'name = "x"\nbackend = "tensorrt"\n'


@pytest.mark.parametrize(
    "body, field",
    [
        (RTX + '[tensorrt]\ncompute_capabilities = ["sm89"]\n', "[tensorrt].compute_capabilities"),
        (RTX + '[tensorrt]\ncompute_capabilities = "SM89"\n', "[tensorrt].compute_capabilities"),
        (RTX + '[tensorrt]\ncompute_capabilities = ["SM89", "SM89"]\n', "[tensorrt].compute_capabilities"),
        (RTX + "[tensorrt]\nopt_level = 7\n", "[tensorrt].opt_level"),
        (RTX + '[tensorrt]\nstrongly_typed = "yes"\n', "[tensorrt].strongly_typed"),
        (RTX + "[tensorrt]\nstrongly_typed = false\n", "[tensorrt].strongly_typed"),
        (RTX + '[tensorrt]\nhardware_compat = "ampere_plus"\n', "[tensorrt].hardware_compat"),
        (RTX + "[tensorrt]\nversion_compat = true\n", "[tensorrt].version_compat"),
        (DC + '[tensorrt]\nhardware_compat = "turing_plus"\n', "[tensorrt].hardware_compat"),
        (DC + "[tensorrt]\nrefit = 1\n", "[tensorrt].refit"),
        (DC + "[tensorrt]\nworkspace_mib = 0\n", "[tensorrt].workspace_mib"),
        (DC + "[tensorrt]\nwrokspace_mib = 64\n", "[tensorrt].wrokspace_mib"),
        (DC + "[memory]\nbudget_mib = 10\n", "[memory].budget_mib"),
        (DC + '[memory]\nbudget = "6GiB"\n', "[memory].budget"),
        ('name = "x"\n[tensorrt]\nopt_level = 3\n', "[tensorrt]"),  # onnxruntime profile with a TensorRT table
    ],
)
def test_bad_field_is_named(tmp_path, body, field):
    with pytest.raises(ProfileError) as e:
        load_profile(_write(tmp_path, body))
    assert field in str(e.value) and "mine.toml" in str(e.value)


def test_user_profile(tmp_path):
    p = load_profile(_write(tmp_path, DC + '[tensorrt]\ncompute_capabilities = ["SM89"]\nhardware_compat = '
                                           '"ampere_plus"\nversion_compat = true\nstrongly_typed = false\n'
                                           "workspace_mib = 2048\n[memory]\nbudget_mib = 6144\n"))
    assert p.tensorrt == TensorRTOptions(compute_capabilities=("SM89",), hardware_compat="ampere_plus",
                                         version_compat=True, strongly_typed=False, workspace_mib=2048)
    assert p.memory.budget_mib == 6144
    assert Profile.from_dict(p.to_dict(), where="m").tensorrt == p.tensorrt
