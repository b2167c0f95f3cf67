"""The runtime's call arguments as untrusted input: every bad one is an InputError before any engine runs, and any
combination of arguments gives images or a DiffcError (hypothesis), on the shared demo artifact."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffc.errors import DiffcError, InputError
from diffc.runtime import load
from diffc.runtime.pipeline import GUIDANCE_MODES, Pipeline

FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def pipe(demo_cpu_artifact) -> Pipeline:
    return load(demo_cpu_artifact, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"guidance": math.nan}, r"guidance must be a finite number from 0 to 100"),
    ({"guidance": math.inf}, r"guidance must be a finite number"),
    ({"guidance": -0.5}, r"guidance must be a finite number"),
    ({"guidance": 101}, r"guidance must be a finite number"),
    ({"guidance": "7"}, r"guidance must be a finite number"),
    ({"height": 0}, r"height must be a positive number of pixels"),
    ({"width": -32}, r"width must be a positive number of pixels"),
    ({"height": 32.0}, r"height must be a positive number of pixels"),
    ({"height": 8}, r"height 8 is outside this artifact's range"),
    ({"seed": -1}, r"seed must be an integer from 0 to 2\*\*64 - 1"),
    ({"seed": 2**64}, r"seed must be an integer"),
    ({"seed": 1.5}, r"seed must be an integer"),
    ({"seed": True}, r"seed must be an integer"),
    ({"prompt": 5}, r"prompt must be a string or a list of strings"),
    ({"prompt": ["a", None]}, r"prompt must be a string or a list of strings"),
    ({"prompt": b"a cat"}, r"prompt must be a string or a list of strings"),
    ({"prompt": "caf\udce9"}, r"prompt 'caf\\udce9' is not valid text"),
    ({"prompt": []}, r"0 prompts is outside this artifact's batch range \[1, 4\]"),
    ({"prompt": ["a"] * 5}, r"5 prompts is outside this artifact's batch range"),
    ({"negative_prompt": ["a", "b"]}, r"2 negative prompts for 1 prompts"),
    ({"negative_prompt": 3}, r"negative_prompt must be a string"),
    ({"latents": np.zeros((1, 4, 4, 4), np.float32)}, r"latents must be a finite numpy array of shape \(1, 4, 8, 8\)"),
    ({"latents": np.full((1, 4, 8, 8), np.nan, np.float32)}, r"latents must be a finite numpy array"),
    ({"noise": [np.zeros((1, 4, 8, 8))]}, r"noise must hold 4 arrays"),
])
def test_bad_arguments_are_input_errors(pipe, kwargs, message):
    kwargs = {"prompt": "a handwritten digit", **kwargs}
    with pytest.raises(InputError, match=message):
        pipe(kwargs.pop("prompt"), **kwargs)


def test_accepted_on_purpose(pipe):
    """Documented choices: guidance in [0, 1] runs unguided (as diffusers), so it equals 1; the largest seed and
    numpy integers work; a str negative prompt applies to every prompt."""
    base = pipe("a digit", guidance=1.0, seed=7)
    assert np.array_equal(pipe("a digit", guidance=0.0, seed=7), base)
    assert np.array_equal(pipe("a digit", guidance=0.5, seed=np.int64(7)), base)
    assert np.isfinite(pipe("a digit", seed=2**64 - 1, guidance=100)).all()
    assert pipe(["a", "b"], negative_prompt="blurry", height=np.int32(32)).shape == (2, 32, 32, 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": -1}, r"threads must be an integer from 0 \(the profile's setting\) to"),
    ({"threads": 100_000}, r"threads must be an integer from 0"),
    ({"threads": 1.5}, r"threads must be an integer"),
    ({"height": 0}, r"height must be a positive number of pixels"),
])
def test_bad_load_arguments(demo_cpu_artifact, kwargs, message):
    with pytest.raises(InputError, match=message):
        load(demo_cpu_artifact, progress=False, **kwargs)


@pytest.mark.parametrize("schedule", ["interval", 2, ["interval"]])
def test_cache_schedule_must_be_a_dict(pipe, schedule):
    with pytest.raises(InputError, match="a cache schedule is a dict"):
        pipe.set_cache_schedule(schedule)


def test_unknown_guidance_mode_in_memory(pipe, monkeypatch):
    """read_manifest refuses an unknown mode; a manifest changed after loading still cannot run unguided."""
    monkeypatch.setitem(pipe.guidance, "mode", "weird")
    assert "weird" not in GUIDANCE_MODES
    with pytest.raises(DiffcError, match="guidance mode 'weird' is unknown"):
        pipe("a digit")


_TEXT = st.text(max_size=12) | st.sampled_from(["", "\0", "7" * 300, "a handwritten digit"])
_ANY = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.binary(max_size=4)
        | st.sampled_from(["a \udcff b", "32", [1], {"a": 1}, np.float32(7.5), np.int64(32)]))


_SIZES = st.none() | st.sampled_from([16, 24, 32, 40, 48, 56, 64])


@settings(FAST, max_examples=25)
@given(prompt=_TEXT | st.lists(_TEXT, min_size=1, max_size=4), negative=st.none() | _TEXT,
       seed=st.none() | st.integers(0, 2**64 - 1), guidance=st.none() | st.floats(0, 100) | st.integers(0, 100),
       height=_SIZES, width=_SIZES)
def test_any_valid_arguments_generate_finite_images(pipe, prompt, negative, seed, guidance, height, width):
    images = pipe(prompt, negative_prompt=negative, seed=seed, guidance=guidance, height=height, width=width)
    batch = 1 if isinstance(prompt, str) else len(prompt)
    assert images.shape == (batch, height or pipe.default_size[0], width or pipe.default_size[1], 3)
    assert np.isfinite(images).all()


@FAST
@given(prompt=_TEXT | st.lists(_TEXT, max_size=5) | _ANY, negative=st.none() | _TEXT | _ANY,
       seed=st.none() | st.integers(-2**65, 2**65) | _ANY,
       guidance=st.none() | st.floats() | st.integers(-5, 200) | _ANY,
       height=_SIZES | st.sampled_from([0, 8, 20, 72]) | _ANY, width=_SIZES | st.sampled_from([-8, 12, 128]) | _ANY)
def test_any_arguments_give_images_or_a_typed_error(pipe, prompt, negative, seed, guidance, height, width):
    try:
        images = pipe(prompt, negative_prompt=negative, seed=seed, guidance=guidance, height=height, width=width)
    except DiffcError as e:
        event(f"refused: {str(e)[:30]}")
        return
    event("generated")
    assert images.ndim == 4 and images.shape[-1] == 3 and np.isfinite(images).all()
    assert images.shape[1:3] == (height or pipe.default_size[0], width or pipe.default_size[1])


def test_c_api_arguments(pipe, demo_cpu_artifact):
    """diffc.h: guidance <= 0 means the default, but NaN (which compares false with everything) is refused; a
    negative thread count from C is an INPUT status, not a crash."""
    from diffc.runtime import capi

    for bad in (math.nan, math.inf):
        with pytest.raises(InputError, match="guidance must be a finite number") as e:
            capi.generate(pipe, "a digit", None, 0, bad, 0, 0)
        assert capi.status_of(e.value) == capi.INPUT
    rgb, h, w = capi.generate(pipe, "a digit", None, 0, -1.0, 0, 0)  # <= 0: the artifact's default guidance
    assert (h, w) == pipe.default_size and len(rgb) == h * w * 3
    with pytest.raises(InputError, match="threads must be an integer") as e:
        capi.open_pipeline(str(demo_cpu_artifact), -1, "cpu", True)
    assert capi.status_of(e.value) == capi.INPUT
