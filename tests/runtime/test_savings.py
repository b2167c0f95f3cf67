"""Training-free savings (diffc.runtime.savings): adaptive guidance, extrapolation of the cached feature, the
manifest / profile / run-time settings, and the per-step trace that shows what was evaluated.

The pipeline tests run the shared 4-step ``cpu-cache`` demo artifact (full UNet on steps 0 and 2): a setting
that never fires must give the no-savings image bit for bit, and a plain replay of the rules documented in
docs/manifest.md ("Savings") against the trace's recorded metrics must make the runtime's decisions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffc.errors import InputError, ManifestError, ProfileError
from diffc.profiles import load_profile
from diffc.profiles.schema import Profile
from diffc.runtime.savings import (MAX_ORDER, History, Savings, cosine_rows, extrapolate, extrapolation_weights,
                                   replay_dynamic)

PROMPT = "a handwritten digit seven"

# ------------------------------------------------------------------------------------------ extrapolation


@settings(max_examples=60, deadline=None)
@given(order=st.integers(0, MAX_ORDER),
       times=st.lists(st.integers(0, 1000), min_size=MAX_ORDER + 1, max_size=MAX_ORDER + 1, unique=True),
       target=st.integers(-200, 1200),
       coefs=st.lists(st.floats(-3, 3), min_size=MAX_ORDER + 1, max_size=MAX_ORDER + 1))
def test_extrapolate_is_exact_on_polynomials_of_its_order(order, times, target, coefs):
    """Degree-``order`` polynomials in time (of any step sizes, the target inside or past the points) come back
    exactly: that is what order k means. Times are scaled to [0, 1] so the float64 comparison is well posed."""
    ts = [v / 1000 for v in sorted(times, reverse=True)][-(order + 1):]  # descending, as sampler timesteps run
    t = target / 1000

    def poly(x):
        return sum(c * x ** p for p, c in enumerate(coefs[:order + 1]))

    values = [np.full((2, 3), poly(x), np.float64) for x in ts]
    got = extrapolate(values, ts, t, order)
    scale = max(1.0, max(abs(c) for c in coefs)) * 100
    np.testing.assert_allclose(got, np.full((2, 3), poly(t)), atol=1e-7 * scale, rtol=1e-7)


def test_uniform_weights_are_adams_bashforth_coefficients():
    assert extrapolation_weights([3.0, 2.0], 1.0).tolist() == pytest.approx([-1, 2])
    assert extrapolation_weights([0.0, 1.0, 2.0], 3.0).tolist() == pytest.approx([1, -3, 3])
    assert extrapolation_weights([0.0, 1.0, 2.0, 3.0], 4.0).tolist() == pytest.approx([-1, 4, -6, 4])
    with pytest.raises(ValueError, match="distinct"):
        extrapolation_weights([1.0, 1.0], 2.0)


def test_history_lowers_the_order_until_enough_values_are_cached():
    h = History(order=2)
    h.push(np.float32([1.0]), 900)
    v, used = h.at(800)
    assert used == 0 and v is h.values[-1]  # order 0: the cached value itself
    h.push(np.float32([2.0]), 800)
    assert h.at(700)[1] == 1 and h.at(700)[0] == pytest.approx([3.0])
    for k, t in enumerate((700, 600)):
        h.push(np.float32([3.0 + k]), t)
    assert len(h.values) == 3 and h.times == [800, 700, 600] and h.at(500) == (pytest.approx([5.0]), 2)


def test_cond_only_steps_hold_the_last_guidance_difference():
    """Rows with a scale guide with the last both-halves step's m_cond - m_uncond; a row with NaN (scale <= 1)
    takes m_cond; nothing cached yet (from_step 0) takes m_cond."""
    rng = np.random.default_rng(0)
    g = np.array([3.0, np.nan], np.float32).reshape(2, 1, 1, 1)
    run = Savings().with_overrides(guidance_from_step=1).start(4, True, images=2)
    both = rng.standard_normal((4, 1, 2, 2)).astype(np.float32)
    first, _ = run.guide(0, both, g)
    u, c = both[:2], both[2:]
    np.testing.assert_allclose(first, np.concatenate([u[:1] + 3 * (c[:1] - u[:1]), c[1:]]), rtol=1e-6)
    cond = rng.standard_normal((2, 1, 2, 2)).astype(np.float32)
    assert run.cond_only(1) and not run.cond_only(0)
    out, metrics = run.guide(1, cond, g)
    assert metrics == {}
    np.testing.assert_allclose(out, np.concatenate([cond[:1] + 2 * (c[:1] - u[:1]), cond[1:]]), rtol=1e-6)
    fresh = Savings().with_overrides(guidance_from_step=0).start(4, True, images=2)
    assert fresh.guide(0, cond, g)[0] is cond


def test_start_refuses_a_static_batch_engine_and_ignores_unguided_calls():
    s = Savings().with_overrides(guidance_from_step=2)
    with pytest.raises(InputError, match="static batch"):
        s.start(4, True, images=1, min_rows=2)  # a TensorRT static-shape engine built for 2 rows
    assert not s.start(4, False, images=1, min_rows=2).cond_only(3)  # no CFG in this call: nothing to drop
    assert s.start(4, True, images=2, min_rows=2).cond_only(2)


def test_cosine_rows():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], np.float32)
    b = np.array([[0.0, 2.0], [2.0, 2.0], [1.0, 0.0]], np.float32)
    assert cosine_rows(a, b).tolist() == pytest.approx([0.0, 1.0, 1.0])


# ------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("overrides, match", [
    ({"guidance_from_step": -1}, "guidance_from_step"),
    ({"guidance_from_step": 1.5}, "guidance_from_step"),
    ({"guidance_threshold": 1.5}, "guidance_threshold"),
    ({"guidance_threshold": float("nan")}, "guidance_threshold"),
    ({"guidance_from_step": 2, "guidance_threshold": 0.9}, "not both"),
    ({"adaptive_guidance": "static"}, "guidance_from_step"),
    ({"adaptive_guidance": "sometimes"}, "adaptive_guidance"),
    ({"adaptive_guidance": "off", "guidance_from_step": 2}, "neither"),
    ({"extrapolation_order": 4}, "extrapolation_order"),
    ({"extrapolation_order": True}, "extrapolation_order"),
    ({"cache_threshold": 0.1}, "not a savings setting"),
])
def test_bad_overrides_are_input_errors(overrides, match):
    with pytest.raises(InputError, match=match):
        Savings().with_overrides(**overrides)


def test_overrides_switch_modes():
    s = Savings.from_dict({"version": 1, "adaptive_guidance": {"mode": "dynamic", "threshold": 0.99}})
    assert s.with_overrides(guidance_from_step=3).adaptive_guidance.to_dict() == {"mode": "static", "from_step": 3}
    assert s.with_overrides(adaptive_guidance="off").adaptive_guidance.mode == "off"
    assert s.with_overrides(adaptive_guidance="dynamic") == s
    assert s.with_overrides(extrapolation_order=2).to_dict()["extrapolation"] == {"order": 2}


@pytest.mark.parametrize("section, match", [
    ({"version": 2}, "newer"),
    ({"version": 1, "adaptive_guidance": {"mode": "static"}}, "from_step"),
    ({"version": 1, "adaptive_guidance": {"mode": "dynamic", "threshold": 0.9, "from_step": 2}}, "from_step"),
    ({"version": 1, "extrapolation": {"order": 7}}, "order"),
    ({"version": 1, "guidance": {}}, "not a savings setting"),
])
def test_bad_sections_are_manifest_errors(section, match):
    with pytest.raises(ManifestError, match=match):
        Savings.from_dict(section)


def _profile(**savings) -> Profile:
    d = load_profile("cpu-cache").to_dict()
    d["savings"] = savings
    return Profile.from_dict(d)


def test_profile_savings_round_trip_into_the_manifest_section():
    p = _profile(adaptive_guidance="dynamic", guidance_threshold=0.995, extrapolation_order=2)
    assert Profile.from_dict(p.to_dict()) == p
    section = p.savings.manifest_section()
    assert section == {"version": 1, "adaptive_guidance": {"mode": "dynamic", "threshold": 0.995},
                       "extrapolation": {"order": 2}}
    assert Savings.from_dict(section).to_dict() == section
    assert "savings" not in load_profile("cpu-cache").to_dict()  # no [savings]: the manifest's profile as before


@pytest.mark.parametrize("table, match", [
    ({"adaptive_guidance": "static"}, "guidance_from_step"),
    ({"adaptive_guidance": "static", "guidance_from_step": 5}, "guidance_from_step"),  # past the 4 steps
    ({"adaptive_guidance": "dynamic", "guidance_threshold": 2.0}, "guidance_threshold"),
    ({"guidance_threshold": 0.9}, "goes with"),
    ({"extrapolation_order": 4}, "extrapolation_order"),
    ({"order": 1}, "not a known field"),
])
def test_bad_profile_tables_are_profile_errors(table, match):
    with pytest.raises(ProfileError, match=match):
        _profile(**table)


def test_profiles_refuse_combinations_that_cannot_work():
    fp32 = load_profile("cpu-fp32").to_dict()
    with pytest.raises(ProfileError, match="nothing is cached"):
        Profile.from_dict({**fp32, "savings": {"extrapolation_order": 1}})
    with pytest.raises(ProfileError, match="classifier-free guidance"):
        Profile.from_dict({**fp32, "guidance": None, "savings": {"adaptive_guidance": "static",
                                                                  "guidance_from_step": 2}})
    trt = load_profile("rtx-fp16").to_dict()
    trt["tensorrt"]["static_shapes"] = True
    with pytest.raises(ProfileError, match="static"):
        Profile.from_dict({**trt, "savings": {"adaptive_guidance": "dynamic", "guidance_threshold": 0.99}})
    from diffc.build.manifest import savings

    p = _profile(adaptive_guidance="static", guidance_from_step=2)
    with pytest.raises(ProfileError, match="embedded"):
        savings(p, {"mode": "embedded"})  # LCM: nothing to drop
    assert savings(p, {"mode": "cfg"})["adaptive_guidance"] == {"mode": "static", "from_step": 2}


# ------------------------------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def pipe(demo_cpu_cache_artifact):
    from diffc.runtime import load

    return load(demo_cpu_cache_artifact, progress=False)


@pytest.fixture(scope="module")
def plain(pipe):
    """The no-savings image of a two-prompt call, and its trace."""
    pipe.set_savings()
    images = pipe([PROMPT, "a handwritten digit zero"], seed=3)
    return images, pipe.last_trace


def test_trace_counts_full_and_shallow_steps_and_rows(plain):
    _, trace = plain
    assert [(r.evaluation, r.rows, r.cond_only) for r in trace.steps] == \
        [("full", 4, False), ("shallow", 4, False), ("full", 4, False), ("shallow", 4, False)]
    assert trace.counts() == {"steps": 4, "full": 2, "shallow": 2, "head": 0, "cond_only": 0, "batch_rows": 16}


def test_settings_that_never_fire_reproduce_the_image_exactly(pipe, plain):
    images, _ = plain
    for overrides in ({"guidance_from_step": 4}, {"guidance_threshold": 1.0}, {"extrapolation_order": 0}):
        pipe.set_savings(**overrides)
        out = pipe([PROMPT, "a handwritten digit zero"], seed=3)
        assert np.array_equal(out, images), overrides
        assert pipe.last_trace.counts()["batch_rows"] == 16
        if "guidance_threshold" in overrides:  # compared on every step, never reached
            assert all(0 < r.metrics["cosine"] < 1 for r in pipe.last_trace.steps)


def test_static_cond_only_steps_halve_the_rows(pipe, plain):
    pipe.set_savings(guidance_from_step=2)
    out = pipe([PROMPT, "a handwritten digit zero"], seed=3)
    trace = pipe.last_trace
    assert [(r.rows, r.cond_only) for r in trace.steps] == [(4, False), (4, False), (2, True), (2, True)]
    assert trace.counts()["batch_rows"] == 12 and trace.counts()["cond_only"] == 2
    assert not np.array_equal(out, plain[0]) and np.isfinite(out).all()


def test_all_cond_only_is_the_unguided_image(pipe):
    """From step 0 on, every step takes m_cond from the cond half alone (no guidance difference to hold yet):
    exactly what guidance 1 computes (same rows, same conditioning), so the half-batch feeds are the right half."""
    pipe.set_savings(guidance_from_step=0)
    out = pipe(PROMPT, seed=5)
    assert pipe.last_trace.counts()["batch_rows"] == 4
    pipe.set_savings()
    assert np.array_equal(out, pipe(PROMPT, seed=5, guidance=1.0))


def test_dynamic_decisions_replay_from_the_trace(pipe):
    prompts = [PROMPT, "a handwritten digit zero"]
    pipe.set_savings(guidance_threshold=1.0)
    pipe(prompts, seed=3)
    cosines = [r.metrics["cosine"] for r in pipe.last_trace.steps]
    threshold = float(np.nextafter(cosines[1], -1))  # fires at step 1: steps 2 and 3 run cond-only
    assert cosines[0] < threshold
    pipe.set_savings(guidance_threshold=threshold)
    pipe(prompts, seed=3)
    trace = pipe.last_trace
    recorded = [r.metrics.get("cosine") for r in trace.steps]
    assert [r.cond_only for r in trace.steps] == replay_dynamic(recorded, threshold) == [False, False, True, True]
    assert recorded[:2] == cosines[:2] and recorded[2:] == [None, None]  # the same loop until it fired
    assert trace.counts()["batch_rows"] == 4 + 4 + 2 + 2


class _Spy:
    """Records what a session was fed and what it returned."""

    def __init__(self, session):
        self.session, self.calls = session, []

    def run(self, feeds, outputs=None):
        out = self.session.run(feeds, outputs)
        self.calls.append((feeds, out))
        return out


def test_extrapolated_feature_follows_the_documented_rule(pipe):
    """Full steps 0 and 1, shallow steps 2 and 3: each shallow step is fed the line through the features of steps 0
    and 1 (order 2 asked, 1 possible with two cached), evaluated at its own timestep -- recomputed here from the
    documented formula."""
    pipe.set_cache_schedule({"kind": "mask", "mask": [1, 1, 0, 0]})
    sessions = dict(pipe.sessions)
    full, shallow = _Spy(sessions["unet"]), _Spy(sessions[pipe.cache["shallow_component"]])
    pipe.sessions.update({"unet": full, pipe.cache["shallow_component"]: shallow})
    try:
        pipe.set_savings(extrapolation_order=2)
        out = pipe(PROMPT, seed=3)
        assert [(r.evaluation, r.extrapolation_order) for r in pipe.last_trace.steps] == \
            [("full", 0), ("full", 0), ("shallow", 1), ("shallow", 1)]
        name, ts = pipe.cache["feature"], [float(v) for v in pipe.tables.timesteps]
        f0, f1 = (np.float64(out_[name]) for _, out_ in full.calls)
        for (feeds, _), t in zip(shallow.calls, ts[2:]):
            line = (t - ts[1]) / (ts[0] - ts[1]) * f0 + (t - ts[0]) / (ts[1] - ts[0]) * f1
            np.testing.assert_allclose(feeds[name], line, rtol=1e-5, atol=1e-5 * np.abs(line).max())
        pipe.set_savings()
        assert not np.array_equal(out, pipe(PROMPT, seed=3)) and np.isfinite(out).all()
    finally:
        pipe.sessions.update(sessions)
        pipe.set_cache_schedule(pipe.cache["schedule"])
        pipe.set_savings()


def test_set_savings_refuses_what_the_artifact_cannot_run(pipe):
    with pytest.raises(InputError, match="past the loop"):
        pipe.set_savings(guidance_from_step=5)
    with pytest.raises(InputError, match="not a savings setting"):
        pipe.set_savings(threshold=0.5)
    saved = pipe.guidance
    try:
        pipe.guidance = {**saved, "mode": "embedded"}
        with pytest.raises(InputError, match="embedded"):
            pipe.set_savings(guidance_threshold=0.99)
    finally:
        pipe.guidance = saved
    assert pipe.savings == Savings()


def test_manifest_savings_section_is_checked(demo_cpu_cache_artifact, tmp_path):
    """The schema and read_manifest's checks refuse a bad ``savings`` section (only manifest.json is needed)."""
    from diffc.runtime import read_manifest

    good = json.loads((demo_cpu_cache_artifact / "manifest.json").read_text())
    cases = [
        ({"version": 1, "adaptive_guidance": {"mode": "static", "from_step": 9}}, "past the 4 sampler steps"),
        ({"version": 1, "adaptive_guidance": {"mode": "dynamic", "threshold": 1.5}}, "adaptive_guidance"),
        ({"version": 1, "extrapolation": {"order": 1, "kind": "ab"}}, "extrapolation"),
        ({"version": 1, "surprise": 1}, "surprise"),
        ({"version": 3}, "newer diffc"),
    ]
    for section, match in cases:
        shutil.rmtree(tmp_path / "a", ignore_errors=True)
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "manifest.json").write_text(json.dumps({**good, "savings": section}))
        with pytest.raises(ManifestError, match=match):
            read_manifest(tmp_path / "a")
    no_cache = {k: v for k, v in good.items() if k != "cache"}
    (tmp_path / "a" / "manifest.json").write_text(json.dumps({**no_cache, "savings": {
        "version": 1, "extrapolation": {"order": 1}}}))
    with pytest.raises(ManifestError, match="nothing is cached"):
        read_manifest(tmp_path / "a")
    ok = {"version": 1, "adaptive_guidance": {"mode": "static", "from_step": 2}, "extrapolation": {"order": 1}}
    (tmp_path / "a" / "manifest.json").write_text(json.dumps({**good, "savings": ok}))
    assert read_manifest(tmp_path / "a")["savings"] == ok


def test_run_checks_savings_flags_before_loading(tmp_path):
    from click.testing import CliRunner

    from diffc.cli import main

    r = CliRunner().invoke(main, ["-q", "run", str(tmp_path / "missing.diffc"), "--prompt", "x", "--out",
                                  str(tmp_path / "x.png"), "--guidance-threshold", "3"])
    assert r.exit_code == 2 and "guidance_threshold" in r.output and "missing.diffc" not in r.output
