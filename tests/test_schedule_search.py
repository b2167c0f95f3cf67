"""Optimized step schedules (diffc.build.schedule_search): the DP against brute force, the candidates' algebra
against every searchable sampler's own tables, the search and its build stage on the demo artifact, and the
profile field."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffc.build import schedule_search as ss
from diffc.errors import ProfileError
from diffc.profiles import load_profile
from diffc.profiles.schema import Profile, parse_profile
from diffc.runtime.sampler import SamplerTables


# ------------------------------------------------------------------------------------------------ the DP itself
def _additive(cost: np.ndarray):
    """The DP's state is the accumulated path cost: the search is then exactly a shortest path with a fixed
    number of edges."""
    def advance(i, state, targets):
        return [(state + cost[i, j], state + cost[i, j]) for j in targets]
    return advance


def _brute_force(cost: np.ndarray, steps: int) -> float:
    end = cost.shape[0] - 1
    return min(sum(cost[a, b] for a, b in zip((0, *mid), (*mid, end)))
               for mid in itertools.combinations(range(1, end), steps - 1))


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8).flatmap(lambda n: st.tuples(
    st.just(n), st.integers(1, n - 1),
    st.lists(st.integers(0, 20), min_size=n * n, max_size=n * n))))
def test_dp_finds_the_cheapest_path_with_that_many_steps(case):
    n, steps, flat = case
    cost = np.asarray(flat, dtype=np.float64).reshape(n, n)
    path, total = ss.dp_search(n, steps, 0.0, _additive(cost))
    assert path[0] == 0 and path[-1] == n - 1 and len(path) == steps + 1
    assert all(b > a for a, b in zip(path, path[1:]))
    assert total == pytest.approx(sum(cost[a, b] for a, b in zip(path, path[1:])))
    assert total == pytest.approx(_brute_force(cost, steps))
    assert ss.dp_search(n, steps, 0.0, _additive(cost)) == (path, total)  # ties broken the same way every time


def test_dp_refuses_more_steps_than_points():
    with pytest.raises(ProfileError, match="cannot choose 5 step"):
        ss.dp_search(4, 5, 0.0, _additive(np.zeros((4, 4))))


# ------------------------------------------------------------------------- candidates and tables, per sampler kind
_DDIM = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "trailing",
         "num_train_timesteps": 1000}


@pytest.mark.parametrize("kind,config", [
    ("ddim", _DDIM),
    ("euler", {**_DDIM, "_class_name": "EulerDiscreteScheduler"}),
    ("dpmpp_2m", {**_DDIM, "_class_name": "DPMSolverMultistepScheduler"}),
    ("flow_euler", {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}),
])
def test_the_whole_reference_path_gives_back_the_reference_tables(kind, config):
    """The candidates' first-order (and, for dpmpp_2m, second-order) algebra is each kind's own: running every
    candidate reproduces the compiled 50-step tables."""
    from diffc.exporter.sampler import compile_sampler

    reference = compile_sampler(kind, config, ss.REFERENCE_STEPS)
    cands = ss.candidates(reference)
    rebuilt = ss.schedule_tables(cands, range(cands.count))
    for name in ("timesteps", "c_in", "x0_from_x", "x0_from_m", "next_from_x", "next_from_x0",
                 "next_from_prev_x0", "next_from_noise", "noise_signal", "noise_scale"):
        np.testing.assert_allclose(getattr(rebuilt, name), getattr(reference, name), rtol=1e-9, atol=1e-12,
                                   err_msg=name)
    assert rebuilt.init_noise_sigma == reference.init_noise_sigma
    few = ss.schedule_tables(cands, [0, 20, 41, cands.count - 1])
    assert SamplerTables.from_dict(json.loads(json.dumps(few.to_dict()))) == few  # the manifest's format as is
    np.testing.assert_array_equal(few.timesteps, reference.timesteps[[0, 20, 41]])


def test_samplers_it_cannot_serve_are_refused_with_the_reason():
    from diffc.exporter.sampler import compile_sampler

    with pytest.raises(ProfileError, match="injects fresh noise"):
        ss.check("lcm")
    with pytest.raises(ProfileError, match="from 1 to 49"):
        ss.check("ddim", steps=50)
    dynamic = compile_sampler("flow_euler", {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                             "use_dynamic_shifting": True, "num_train_timesteps": 1000}, 4,
                              pipeline_class="FluxPipeline")
    with pytest.raises(ProfileError, match="use_dynamic_shifting"):
        ss.check("flow_euler", dynamic)


# ------------------------------------------------------------------------------------------------ the profile field
def _profile(**sampler) -> dict:
    return {"name": "t", "backend": "onnxruntime", "sampler": {"kind": "ddim", "steps": 4, **sampler}}


@pytest.mark.parametrize("sampler,match", [
    ({"schedule": "fast"}, r"\[sampler\].schedule must be one of \['default', 'optimized'\]"),
    ({"schedule": 1}, r"\[sampler\].schedule must be one of"),
    ({"schedule": "optimized", "kind": "lcm"}, "distilled for its own timesteps"),
    ({"schedule": "optimized", "steps": 50}, r"\[sampler\].steps must be below 50"),
])
def test_bad_schedule_values_are_refused(sampler, match):
    with pytest.raises(ProfileError, match=match):
        parse_profile(_profile(**sampler), where="t.toml")


def test_the_field_round_trips_and_default_profiles_are_unchanged():
    optimized = parse_profile(_profile(schedule="optimized"), where="t.toml")
    assert optimized.schedule == "optimized"
    assert Profile.from_dict(optimized.to_dict()).schedule == "optimized"
    default = parse_profile(_profile(), where="t.toml")
    assert default.schedule == "default" and "schedule" not in default.to_dict()


def test_the_default_schedule_artifact_is_unchanged(demo_cpu_artifact):
    """A default-schedule build writes the scheduler's own tables and no schedule key into its manifest."""
    from diffc.exporter.sampler import compile_sampler

    manifest = json.loads((demo_cpu_artifact / "manifest.json").read_text())
    assert "schedule" not in manifest["profile"]
    tables = SamplerTables.from_dict(manifest["sampler"])
    assert tables == compile_sampler(tables.kind, manifest["build"]["scheduler_config"], tables.num_steps)


# ---------------------------------------------------------------------------- the search and its stage, on the demo
class _Recorder:
    """Wraps the denoiser session and records the timesteps it is fed."""

    def __init__(self, session, name: str):
        self.session, self.name, self.timesteps = session, name, []

    def run(self, feeds, outputs=None):
        self.timesteps.append(float(feeds[self.name][0]))
        return self.session.run(feeds, outputs)


def test_the_stage_searches_writes_the_manifest_and_a_run_uses_it(demo_cpu_artifact, tmp_path):
    """The build stage on a copy of the demo's fp32 artifact (standing for the twin): 2 steps, one calibration
    image. The chosen schedule beats the default spacing, lands in the manifest, and a run feeds exactly those
    timesteps to the denoiser."""
    from diffc.runtime import load

    twin = tmp_path / "twin.diffc"
    shutil.copytree(demo_cpu_artifact, twin)
    manifest = json.loads((twin / "manifest.json").read_text())
    from diffc.exporter.sampler import compile_sampler

    config = manifest["build"]["scheduler_config"]
    default = compile_sampler("ddim", config, 2)
    base = load_profile("cpu-fp32")
    profile = dataclasses.replace(base, steps=2, schedule="optimized", quantize=dataclasses.replace(
        base.quantize, calibration_prompts=("a handwritten digit seven",), calibration_seeds=(3,)))
    exported = SimpleNamespace(tables=default, family=None, scheduler_config=config, source=None)
    report = {}
    ss.stage(exported, profile, {}, twin, tmp_path, report, exporter="torchscript", verify_passes=False,
             progress=False)
    found = report["schedule"]
    assert found["kept"] == "optimized" and found["rmse_vs_reference"] < found["default_rmse_vs_reference"]
    assert found["timesteps"] != found["default_timesteps"] and found["timesteps"][0] == 999.0
    assert exported.tables.timesteps.tolist() == found["timesteps"]

    with load(twin, progress=False) as pipe:
        assert pipe.tables == exported.tables  # the manifest carries the chosen tables, in the usual format
        spec = pipe.denoiser
        recorder = _Recorder(pipe.sessions[spec["component"]], spec["inputs"]["timestep"])
        pipe.sessions[spec["component"]] = recorder
        image = pipe("a handwritten digit seven", seed=3)
        assert recorder.timesteps == found["timesteps"]
        assert np.isfinite(image).all()
