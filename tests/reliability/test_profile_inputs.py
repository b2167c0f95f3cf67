"""Profiles as untrusted input: a wrong type, a non-finite number or an unreadable file is a ProfileError naming
the field; any mutation of a shipped profile (as tables, or as TOML text) loads or is refused with a DiffcError."""

from __future__ import annotations

import copy
import json
import math
import tomllib

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffc.errors import DiffcError, ProfileError
from diffc.profiles import list_profiles, load_profile
from diffc.profiles.schema import Profile, parse_profile

FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SHIPPED = {name: tomllib.loads(path.read_text(encoding="utf-8")) for name, path in list_profiles().items()}


def _load_text(tmp_path, text: str | bytes):
    path = tmp_path / "mine.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return load_profile(path)


@pytest.mark.parametrize("text, field", [
    ('name = "x"\nshapes = 5', r"\[shapes\] must be a table"),
    ('name = "x"\nsampler = "ddim"', r"\[sampler\] must be a table"),
    ('name = "x"\nprecision = ["fp16"]', r"\[precision\] must be a table"),
    ('name = "x"\nonnxruntime = 1', r"\[onnxruntime\] must be a table"),
    ('name = "x"\n[sampler]\nguidance = nan', r"\[sampler\]\.guidance must be a finite number in \[0, 100\]"),
    ('name = "x"\n[sampler]\nguidance = inf', r"\[sampler\]\.guidance must be a finite number"),
    ('name = "x"\n[sampler]\nguidance = -1.0', r"\[sampler\]\.guidance"),
    ('name = "x"\n[sampler]\nguidance = "7.5"', r"\[sampler\]\.guidance"),
    ('name = "x"\n[sampler]\nsteps = 0', r"\[sampler\]\.steps must be an integer from 1 to 1000"),
    ('name = "x"\n[sampler]\nkind = ["ddim"]', r"\[sampler\]\.kind must be one of"),
    ('name = "x"\n[shapes]\nbatch = [1, 1, 100000]', r"\[shapes\]\.batch must satisfy"),
    ('name = "x"\n[shapes]\nheight = [8, 8, 1e9]', r"\[shapes\]\.height must be a list of three integers"),
    ('name = "x"\n[precision]\nunet = ["fp16"]', r"\[precision\]\.unet must be one of"),
    ('name = "x"\nbackend = {a = 1}', r"backend must be one of"),
    ('name = "x"\ndescription = 5', r"description must be a string"),
    ('name = 5', r"name must be a non-empty string"),
    ('name = "x"\n[onnxruntime]\nintra_op_num_threads = 100000', r"intra_op_num_threads must be an integer from 0"),
    ('name = "x"\n[onnxruntime]\nmemory_arena = ["shared"]', r"memory_arena must be one of"),
    ('name = "x"\n[quantize]\nmin_psnr_db = nan', r"\[quantize\]\.min_psnr_db must be a finite number"),
    ('name = "x"\n[quantize]\ncalibration_seeds = [-1]', r"calibration_seeds must be a non-empty list of integers"),
    ('name = "x"\n[quantize]\npercentile = inf', r"\[quantize\]\.percentile"),
    ('name = "x"\n[cache]\npower = nan', r"\[cache\]\.power"),
    ('name = "x"\n[passes]\ndisable = 5', r"\[passes\]\.disable must be a list"),
    ('name = "x"\n[sampler]\nsteps = 4\n[sampler.x]\ny = 1', r"\[sampler\]\.x is not a known field"),
])
def test_wrong_values_name_the_field(tmp_path, text, field):
    with pytest.raises(ProfileError, match=field):
        _load_text(tmp_path, text)


def test_unreadable_files(tmp_path):
    with pytest.raises(ProfileError, match="not UTF-8 text"):
        _load_text(tmp_path, b'name = "caf\xe9"\n')
    with pytest.raises(ProfileError, match="cannot parse TOML"):
        _load_text(tmp_path, 'name = "x"\nname = "y"\n')
    deep = 'name = "x"\nz = ' + "[" * 50_000 + "]" * 50_000
    with pytest.raises(ProfileError):  # too deep for tomllib (RecursionError) or an unknown field: both typed
        _load_text(tmp_path, deep)
    with pytest.raises(ProfileError, match="far more than a profile"):
        _load_text(tmp_path, "#" * (2 * 2**20))


def test_no_nan_reaches_a_manifest():
    """What a profile accepts, to_dict() writes as strict JSON (the builder dumps it with allow_nan=False)."""
    for name in SHIPPED:
        json.dumps(load_profile(name).to_dict(), allow_nan=False)


@pytest.mark.parametrize("data", [
    [1, 2], {"name": "x"}, {"name": "x", "backend": "tensorrt", "tensorrt": [1]}, {"name": "x", "backend": "onnxruntime", "cache": "on"},
    {"name": "x", "backend": "onnxruntime", "memory": 7}, {"name": "x", "backend": "onnxruntime", "quantize": [1]},
])
def test_from_dict_gives_typed_errors(data):
    """Profile.from_dict reads the profile recorded in a manifest: malformed ones are ProfileErrors too."""
    with pytest.raises(ProfileError):
        Profile.from_dict(data, where="manifest")


# ------------------------------------------------------------------------------------------ property-based

_LEAVES = (st.none() | st.booleans() | st.integers(-2**66, 2**66) | st.floats() | st.text(max_size=8)
           | st.sampled_from(["fp16", "int8", "ddim", "shared", "SM89", "onnxruntime", "tensorrt", "interval"]))
_VALUES = st.recursive(_LEAVES, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                       max_leaves=5)


def _slots(value, out=None) -> list[tuple]:
    out = [] if out is None else out
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out.append((value, k))
        _slots(v, out)
    return out


@st.composite
def mutated_profiles(draw):
    data = copy.deepcopy(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))])
    for _ in range(draw(st.integers(1, 3))):
        parent, key = draw(st.sampled_from(_slots(data)))
        op = draw(st.sampled_from(["delete", "replace", "retype"]))
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(_VALUES)
        else:
            old = parent[key]
            parent[key] = draw(st.sampled_from([str(old), [old], {"v": old}, True, 0, -1, math.nan, math.inf, ""]))
    return data


@FAST
@given(data=mutated_profiles())
def test_any_mutation_parses_or_is_a_profile_error(data):
    try:
        prof = parse_profile(data, where="mutated")
    except DiffcError as e:
        event(f"refused: {type(e).__name__}")
        return
    event("parsed")
    # what the builder does with an accepted profile: record it (strict JSON) and read it back
    again = Profile.from_dict(json.loads(json.dumps(prof.to_dict(), allow_nan=False)), where="mutated")
    assert again.to_dict() == prof.to_dict()


@settings(FAST, max_examples=100)
@given(name=st.sampled_from(sorted(SHIPPED)), cut=st.integers(0, 3000), insert=st.text(max_size=12))
def test_any_edited_toml_text_loads_or_is_a_profile_error(tmp_path_factory, name, cut, insert):
    text = list_profiles()[name].read_text(encoding="utf-8")
    cut = min(cut, len(text))
    try:
        _load_text(tmp_path_factory.mktemp("p", numbered=True), text[:cut] + insert + text[cut:])
    except DiffcError:
        pass
