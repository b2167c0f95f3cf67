import pytest

from diffc.errors import ProfileError
from diffc.profiles import list_profiles, load_profile
from diffc.profiles.schema import Backend, Precision, Profile, Range


def test_shipped_profiles_load():
    names = list_profiles()
    assert "cpu" in names
    for name in names:
        p = load_profile(name)
        assert p.name == name
        assert isinstance(p.backend, Backend)


def test_cpu_fp32_profile_values():
    p = load_profile("cpu-fp32")
    assert p.backend is Backend.ONNXRUNTIME
    assert p.precision_of("unet") is Precision.FP32
    assert p.batch == Range(1, 1, 4)
    assert p.height is None  # derived from the model


def test_default_cpu_profile_is_gated_openvino_bf16():
    from diffc.build.plan import gated

    p = load_profile("cpu")  # the default of diffc build: the fastest quality-gated CPU path
    assert p.backend is Backend.OPENVINO
    assert {p.precision_of(c) for c in ("text_encoder", "unet", "vae_decoder")} == {Precision.BF16}
    assert p.quantized_components() == {} and gated(p) and p.quantize.min_psnr_db >= 30
    # the old name stays an alias: same target, same gate, and says so
    alias = load_profile("cpu-openvino")
    assert alias.to_dict() | {"name": "", "description": "", "source": ""} == \
        p.to_dict() | {"name": "", "description": "", "source": ""}
    assert "alias of cpu" in alias.description
    # exact fp32 is not gated (it is what the others are gated against); quantized profiles are
    assert not gated(load_profile("cpu-fp32")) and not gated(load_profile("cpu-cache"))
    assert gated(load_profile("cpu-int8")) and gated(load_profile("cpu-openvino-int8"))


def test_openvino_profile_values():
    from diffc.passes import pass_list

    p = load_profile("cpu-openvino")
    assert p.backend is Backend.OPENVINO
    assert {p.precision_of(c) for c in ("text_encoder", "unet", "vae_decoder")} == {Precision.BF16}
    # OpenVINO fuses attention itself and reads no contrib ops
    names = [spec.name for spec in pass_list(p.backend.value, **p.passes)]
    assert "fuse_attention" not in names and "check_ops" in names
    assert Profile.from_dict(p.to_dict(), where="manifest").to_dict() | {"source": ""} == p.to_dict() | {"source": ""}
    # the int8 variant: the UNet and VAE decoder int8 (symmetric activations), the text encoder bf16
    q = load_profile("cpu-openvino-int8")
    assert q.backend is Backend.OPENVINO and q.precision_of("text_encoder") is Precision.BF16
    assert q.quantized_components() == {"unet": Precision.INT8, "vae_decoder": Precision.INT8}
    assert q.quantize.activations == "auto" and q.quantize.min_psnr_db == 28.0


def test_round_trip_through_dict():
    p = load_profile("cpu-fp32")
    q = Profile.from_dict(p.to_dict(), where="manifest")
    assert q.to_dict() | {"source": ""} == p.to_dict() | {"source": ""}


def test_onnxruntime_table_round_trips(tmp_path):
    for name in ("cpu-fp32", "cpu-int8", "cpu-cache"):
        p = load_profile(name)
        assert p.onnxruntime["memory_arena"] == "shared", name
        assert Profile.from_dict(p.to_dict(), where="manifest").onnxruntime == p.onnxruntime
    # a profile that does not say keeps what the runtime did before the field existed
    assert load_profile(_write(tmp_path, 'name = "mine"\n')).onnxruntime["memory_arena"] == "denoiser"


def test_cache_profile_round_trips_and_others_leave_it_off():
    p = load_profile("cpu-cache")
    assert p.cache.enabled and p.cache.branch == 0 and p.cache.schedule_dict() == {"kind": "interval", "interval": 2}
    q = Profile.from_dict(p.to_dict(), where="manifest")
    assert q.to_dict() | {"source": ""} == p.to_dict() | {"source": ""}
    assert not any(load_profile(n).cache.enabled for n in list_profiles() if n != "cpu-cache")


def _write(tmp_path, text):
    f = tmp_path / "mine.toml"
    f.write_text(text)
    return f


@pytest.mark.parametrize(
    "body, field",
    [
        ('name = "x"\nbackend = "vulkan"\n', "backend"),
        ('name = "x"\n[precision]\nunet = "int4"\n', "[precision].unet"),
        ('name = "x"\n[precision]\nunett = "fp32"\n', "[precision].unett"),
        ('name = "x"\n[sampler]\nsteps = 0\n', "[sampler].steps"),
        ('name = "x"\n[sampler]\nkind = "plms"\n', "[sampler].kind"),
        ('name = "x"\n[sampler]\nguidance = -1\n', "[sampler].guidance"),
        ('name = "x"\n[shapes]\nheight = [512, 256, 1024]\n', "[shapes].height"),
        ('name = "x"\n[shapes]\nwidth = [256, 512]\n', "[shapes].width"),
        ('name = "x"\nbogus = 1\n', "bogus"),
        ('name = "x"\n[cache]\nenabled = true\nbranches = 1\n', "[cache].branches"),
        ('name = "x"\n[cache]\nenabled = true\nschedule = "every"\n', "[cache].schedule"),
        ('name = "x"\n[cache]\nenabled = true\ninterval = 0\n', "[cache].interval"),
        ('name = "x"\n[cache]\nenabled = true\nbranch = -1\n', "[cache].branch"),
        ('name = "x"\n[cache]\nenabled = true\npower = 0.5\n', "[cache].power"),
        ('name = "x"\n[cache]\nenabled = true\nschedule = "mask"\nmask = [1, 2]\n', "[cache].mask"),
        ('name = "x"\n[cache]\nenabled = true\nschedule = "mask"\nmask = [1, 0]\n', "[cache].mask"),
        ('name = "x"\n[cache]\nenabled = true\nschedule = "mask"\nmask = [0, 1, 1, 1]\n', "[cache].mask"),
        ('backend = "onnxruntime"\n', "name"),
        ('name = "x"\n[onnxruntime]\nmemory_arena = "global"\n', "[onnxruntime].memory_arena"),
        ('name = "x"\n[onnxruntime]\nintra_op_num_threads = true\n', "[onnxruntime].intra_op_num_threads"),
        ('name = "x"\n[onnxruntime]\narena = "shared"\n', "[onnxruntime].arena"),
        ('name = "x"\nonnxruntime = 2\n', "[onnxruntime]"),
    ],
)
def test_bad_field_is_named(tmp_path, body, field):
    with pytest.raises(ProfileError) as e:
        load_profile(_write(tmp_path, body))
    assert field in str(e.value)
    assert "mine.toml" in str(e.value)


def test_user_file_and_unknown_name(tmp_path):
    p = load_profile(_write(tmp_path, 'name = "mine"\n[shapes]\nheight = [64, 128, 256]\n[sampler]\nsteps = 8\n'))
    assert p.height == Range(64, 128, 256) and p.steps == 8
    with pytest.raises(ProfileError, match="shipped profiles: .*cpu"):
        load_profile("no-such-profile")


def test_broken_toml(tmp_path):
    with pytest.raises(ProfileError, match="cannot parse TOML"):
        load_profile(_write(tmp_path, "name = \n"))
