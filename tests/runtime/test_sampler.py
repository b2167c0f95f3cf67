"""diffc's samplers against the diffusers schedulers they reproduce (diffusers 0.42, torch CPU, float64).

The tables are compiled by diffc.exporter.sampler (from the diffusers scheduler object) and run by
diffc.runtime.sampler (numpy only).

Every trajectory test runs the same deterministic fake denoiser through a diffusers scheduler (``from_config``,
``set_timesteps``, ``scale_model_input``, ``step``) and, independently, through diffc's tables + ``step`` in
numpy, then compares timesteps, the model input at every step and the final latent.

Tolerances: diffc computes its coefficients in float64 from the float32 noise schedule the diffusers scheduler
object builds (read from it, see ``test_tables_use_the_schedulers_own_schedule``). diffusers itself computes
its per-step scalars in float32 and - for Euler, DPM-Solver and flow matching - casts the sample to float32
inside ``step``, so the two trajectories differ by float32 rounding (~6e-8 relative) accumulated over at most
20 steps. Hence rtol=atol=1e-6 on latents of order 1, scaled by the noise level for the Euler inputs (latents
start at sigma_max, ~15, up to 4096 with zero terminal SNR).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)

from diffc.errors import InputError, ManifestError, ProfileError  # noqa: E402
from diffc.exporter import sampler as C  # noqa: E402  (the compiler: build time, needs diffusers)

# diffusers' own set_timesteps calls np.array(tensor ** 0.5), which numpy 2 flags; not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SAMPLER_PY = REPO / "diffc" / "runtime" / "sampler.py"


def _load_sampler():
    try:
        import diffc.runtime.sampler as mod

        return mod
    except ImportError:  # diffc/runtime/__init__.py is owned elsewhere; load the file directly if needed
        spec = importlib.util.spec_from_file_location("diffc.runtime.sampler", SAMPLER_PY)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod


S = _load_sampler()

DIFFUSERS_CLASS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
    "flow_euler": FlowMatchEulerDiscreteScheduler,
}

# ---------------------------------------------------------------------------------------------------------
# Scheduler configs, as shipped by real pipelines (trimmed to the keys that matter)
# ---------------------------------------------------------------------------------------------------------
# SD 1.5: a PNDM config written by diffusers 0.6, without timestep_spacing -> DDIM uses "leading", Euler and
# DPM-Solver their own default "linspace".
SD15_PNDM = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# the same with an explicit "leading" spacing (newer configs, SDXL's Euler config)
SD15_LEADING = {**SD15_PNDM, "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading"}
# few-step "trailing" config (SDXL-Turbo style)
TRAILING = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}
# SD 2.1 (768, v-prediction): DDIM config
SD21_V = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}
# v-prediction with zero terminal SNR and trailing spacing (arXiv 2305.08891)
V_ZERO_SNR = {**SD21_V, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
# DDPM-style linear / cosine schedules
LINEAR_LINSPACE = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "clip_sample": False,
                   "timestep_spacing": "linspace"}
COSINE = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "clip_sample": False}
# LCM-distilled SD 1.5
LCM_CFG = {
    "_class_name": "LCMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
}
LCM_SD15 = dict(SD15_PNDM)  # an LCM-LoRA on a plain SD 1.5 pipeline: LCMScheduler defaults fill the rest
# SD3-style flow matching
FLOW_SHIFT3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLOW_DEFAULT = {"_class_name": "FlowMatchEulerDiscreteScheduler"}
FLOW_TERMINAL = {**FLOW_SHIFT3, "shift_terminal": 0.02}

# 3 does not divide 1000: it exercises DDIM's `prev_t = t - 1000 // N` (which then differs from the next
# timestep under "trailing"/"linspace") and the rounding in every spacing rule.
STEPS = (1, 2, 3, 4, 8, 20)

CASES = (
    [("ddim", name, cfg) for name, cfg in [("sd15_pndm", SD15_PNDM), ("trailing", TRAILING), ("sd21_v", SD21_V),
                                           ("v_zero_snr", V_ZERO_SNR), ("linear_linspace", LINEAR_LINSPACE),
                                           ("cosine", COSINE)]]
    + [("euler", name, cfg) for name, cfg in [("sd15_pndm", SD15_PNDM), ("sd15_leading", SD15_LEADING),
                                            ("trailing", TRAILING), ("sd21_v", SD21_V),
                                            ("v_zero_snr", V_ZERO_SNR),
                                            ("v_continuous", {**SD21_V, "timestep_type": "continuous"}),
                                            ("sigma_min", {**SD15_LEADING, "final_sigmas_type": "sigma_min"})]]
    + [("dpmpp_2m", name, cfg) for name, cfg in [("sd15_pndm", SD15_PNDM), ("sd15_leading", SD15_LEADING),
                                               ("trailing", TRAILING), ("sd21_v", SD21_V),
                                               ("v_zero_snr", V_ZERO_SNR), ("cosine", COSINE),
                                               ("heun", {**SD15_PNDM, "solver_type": "heun"}),
                                               ("sigma_min", {**SD15_PNDM, "final_sigmas_type": "sigma_min"}),
                                               ("clipped", {**COSINE, "lambda_min_clipped": -5.1})]]
    + [("lcm", name, cfg) for name, cfg in [("lcm", LCM_CFG), ("lcm_on_sd15", LCM_SD15),
                                          ("lcm_v", {**LCM_CFG, "prediction_type": "v_prediction"})]]
    + [("flow_euler", name, cfg) for name, cfg in [("shift3", FLOW_SHIFT3), ("default", FLOW_DEFAULT),
                                                 ("terminal", FLOW_TERMINAL)]]
)

SHAPE = (2, 4, 8, 8)


def fake_model_np(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for a denoiser: depends on the input and on the timestep value."""
    return np.tanh(0.5 * x) + 1e-3 * t + 0.1 * np.sin(x + 1e-2 * t)


def fake_model_torch(x, t):
    t = float(t)
    return torch.tanh(0.5 * x) + 1e-3 * t + 0.1 * torch.sin(x + 1e-2 * t)


def run_both(kind: str, cfg: dict, n: int, monkeypatch, seed: int = 0) -> dict:
    """Run diffusers and diffc side by side; returns the max discrepancies seen (relative to the latent scale)."""
    sched = DIFFUSERS_CLASS[kind].from_config(cfg)
    sched.set_timesteps(n)
    if kind == "euler" and cfg.get("rescale_betas_zero_snr"):
        # Zero terminal SNR puts sigma_max at 4096, where diffusers' float32 `dt = sigma_next - sigma` has an
        # ulp of 5e-4: its own rounding, not a sampler difference, would then dominate (~1e-5 relative).
        # Same values, float64 arithmetic.
        sched.sigmas = sched.sigmas.double()
    tables = C.compile_sampler(kind, cfg, n)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(SHAPE)

    noises = [rng.standard_normal(SHAPE) for _ in range(n)]
    if kind == "lcm":
        import diffusers.schedulers.scheduling_lcm as lcm_mod

        calls = iter(range(n))

        def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
            return torch.from_numpy(noises[next(calls)]).to(dtype)

        monkeypatch.setattr(lcm_mod, "randn_tensor", fake_randn)

    t_ref = sched.timesteps.double().numpy()
    np.testing.assert_allclose(tables.timesteps, t_ref, rtol=1e-6, atol=1e-6)
    init_ref = float(getattr(sched, "init_noise_sigma", 1.0))
    np.testing.assert_allclose(tables.init_noise_sigma, init_ref, rtol=1e-6)

    x_ref = torch.from_numpy(z) * init_ref
    x = z * tables.init_noise_sigma
    prev_x0 = np.zeros_like(x)
    err = {"input": 0.0, "final": 0.0}
    for i, t in enumerate(sched.timesteps):
        inp_ref = sched.scale_model_input(x_ref, t) if hasattr(sched, "scale_model_input") else x_ref
        inp = tables.c_in[i] * x
        scale = max(1.0, float(np.abs(inp_ref.numpy()).max()))
        np.testing.assert_allclose(inp, inp_ref.numpy(), rtol=1e-6, atol=1e-6 * scale,
                                   err_msg=f"model input at step {i}")
        err["input"] = max(err["input"], float(np.abs(inp - inp_ref.numpy()).max()) / scale)
        m_ref = fake_model_torch(inp_ref, t)
        m = fake_model_np(inp, tables.timesteps[i])
        x_ref = sched.step(m_ref, t, x_ref).prev_sample
        x, prev_x0 = S.step(tables, i, x, m, prev_x0, noise=noises[i] if tables.next_from_noise[i] else None)
        assert x.dtype == np.float64
    assert x_ref.dtype == torch.float64
    # The fake denoiser is no real one: with epsilon prediction and a low-alpha schedule (cosine, early DDIM
    # steps) it drives latents to |x| ~ 1e2..1e4, so the absolute tolerance scales with the latent's magnitude.
    scale = max(1.0, float(np.abs(x_ref.numpy()).max()))
    np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-6, atol=1e-6 * scale, err_msg="final latent")
    err["final"] = float(np.abs(x - x_ref.numpy()).max()) / scale
    return err


@pytest.mark.parametrize("kind,name,cfg", CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_trajectory_matches_diffusers(kind, name, cfg, monkeypatch):
    steps = list(STEPS)
    if name == "terminal":  # diffusers' shift_terminal stretch divides 0 by 0 for one step (NaN sigmas)
        with pytest.raises(ProfileError, match="num_steps >= 2"):
            C.compile_sampler(kind, cfg, 1)
        steps.remove(1)
    worst = {"input": 0.0, "final": 0.0}
    for n in steps:
        with monkeypatch.context() as mp:
            e = run_both(kind, cfg, n, mp)
        worst = {k: max(worst[k], e[k]) for k in worst}
    log.info("%s/%s steps=%s: max input err %.2e, max final err %.2e (relative to max(1, |latent|))",
             kind, name, steps, worst["input"], worst["final"])


def test_float32_runtime_tracks_float64():
    """The runtime runs in float32: step() must keep the dtype and stay close to the float64 result."""
    cfg = SD15_PNDM
    for kind in ("ddim", "euler", "dpmpp_2m"):
        tables = C.compile_sampler(kind, cfg, 8)
        z = np.random.default_rng(1).standard_normal(SHAPE)
        x64 = z * tables.init_noise_sigma
        x32 = x64.astype(np.float32)
        p64, p32 = np.zeros_like(x64), np.zeros_like(x32)
        for i in range(tables.num_steps):
            m64 = fake_model_np(tables.c_in[i] * x64, tables.timesteps[i])
            m32 = fake_model_np(np.float32(tables.c_in[i]) * x32, tables.timesteps[i]).astype(np.float32)
            x64, p64 = S.step(tables, i, x64, m64, p64)
            x32, p32 = S.step(tables, i, x32, m32, p32)
            assert x32.dtype == np.float32 and p32.dtype == np.float32
        np.testing.assert_allclose(x32, x64, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [SD15_PNDM, LINEAR_LINSPACE, COSINE, V_ZERO_SNR,
     {**SD21_V, "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
     {"beta_start": 0.001, "beta_end": 0.03, "num_train_timesteps": 999, "clip_sample": False}],
)
def test_tables_use_the_schedulers_own_schedule(cfg):
    """The coefficients come from the scheduler object's float32 schedule, not from a re-derivation of it."""
    pt = cfg.get("prediction_type", "epsilon")
    for n in (3, 8):
        ref = DDIMScheduler.from_config(cfg)
        ref.set_timesteps(n)
        ac = ref.alphas_cumprod.double().numpy()[ref.timesteps.numpy()]
        tables = C.compile_sampler("ddim", cfg, n)
        np.testing.assert_array_equal(tables.timesteps, ref.timesteps.double().numpy())
        # x0 = sqrt(a) x - sqrt(1 - a) v  /  (x - sqrt(1 - a) eps) / sqrt(a): exact in float64 from the same a
        expected = np.sqrt(ac) if pt == "v_prediction" else 1.0 / np.sqrt(ac)
        np.testing.assert_array_equal(tables.x0_from_x, expected)
        if pt == "epsilon":
            ref = EulerDiscreteScheduler.from_config(cfg)
            ref.set_timesteps(n)
            tables = C.compile_sampler("euler", cfg, n)
            np.testing.assert_array_equal(-tables.x0_from_m, ref.sigmas.double().numpy()[:-1])  # x0 = x - sigma eps


def test_configs_diffusers_refuses_are_profile_errors():
    """What diffusers' own __init__ / set_timesteps reject surfaces as a typed ProfileError, not a ValueError."""
    with pytest.raises(ProfileError, match="not usable for the 'dpmpp_2m' sampler.*final_sigmas_type"):
        C.compile_sampler("dpmpp_2m", {**SD15_PNDM, "algorithm_type": "deis"}, 4)  # deis needs sigma_min
    with pytest.raises(ProfileError, match="solver_type 'foo'"):
        C.compile_sampler("dpmpp_2m", {**SD15_PNDM, "solver_type": "foo"}, 4)
    with pytest.raises(ProfileError, match="shift must be a positive number"):
        C.compile_sampler("flow_euler", {**FLOW_SHIFT3, "shift": "3"}, 4)
    with pytest.raises(ProfileError, match="trained_betas"):
        C.compile_sampler("ddim", {**SD21_V, "trained_betas": [0.01] * 10}, 4)
    with pytest.raises(ProfileError, match="fall outside"):  # leading + steps_offset pushes t past 999
        C.compile_sampler("euler", {**SD21_V, "timestep_type": "continuous", "timestep_spacing": "leading",
                                    "steps_offset": 500}, 4)
    # a valid config still compiles after those (no state kept between calls)
    assert C.compile_sampler("dpmpp_2m", {**SD15_PNDM, "algorithm_type": "deis",
                                          "final_sigmas_type": "sigma_min"}, 4).num_steps == 4


def test_use_default_values_are_dropped():
    """An in-memory scheduler.config lists keys that were defaults of its class; from_config ignores them."""
    src = DDIMScheduler.from_config(SD15_PNDM).config  # timestep_spacing "leading" is a DDIM default here
    cfg = dict(src)
    assert "timestep_spacing" in cfg.get("_use_default_values", [])
    ref = EulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(4)
    tables = C.compile_sampler("euler", cfg, 4)
    np.testing.assert_allclose(tables.timesteps, ref.timesteps.double().numpy(), rtol=1e-6)


def test_guidance_embedding_matches_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    fn = LatentConsistencyModelPipeline.get_guidance_scale_embedding
    for dim in (256, 512, 7):
        for scales in ([1.0], [8.0, 8.0], [1.5, 4.0, 12.0], [8.5]):
            w = np.asarray(scales, dtype=np.float64) - 1.0
            ref = fn(None, torch.tensor(w, dtype=torch.float32), embedding_dim=dim).numpy()
            ours = S.guidance_embedding(w, dim)
            assert ours.dtype == np.float32 and ours.shape == ref.shape == (len(scales), dim)
            # torch's float32 exp (SLEEF, 1 ulp) differs from the correctly rounded one for ~1% of the
            # frequencies; multiplied by w*1000 ~ 1e4 that one ulp moves the sin/cos argument by up to ~1e-3.
            # Everything else agrees to float32 rounding.
            diff = np.abs(ours - ref)
            assert diff.max() < 1e-3
            assert np.mean(diff < 2e-7) > 0.97, np.mean(diff < 2e-7)


def test_guidance_embedding_bad_input():
    with pytest.raises(InputError, match="1-D"):
        S.guidance_embedding(np.zeros((2, 2)), 256)
    with pytest.raises(InputError, match=">= 4"):
        S.guidance_embedding(np.zeros(2), 2)


def test_tables_round_trip_json():
    for kind, cfg in [("ddim", SD15_PNDM), ("dpmpp_2m", SD21_V), ("lcm", LCM_CFG), ("flow_euler", FLOW_SHIFT3),
                      ("euler", TRAILING)]:
        tables = C.compile_sampler(kind, cfg, 4)
        d = json.loads(json.dumps(tables.to_dict()))
        back = S.SamplerTables.from_dict(d)
        assert back == tables
        assert back.num_steps == 4
        assert back.needs_noise == (kind == "lcm")
        assert all(isinstance(v, float) for v in d["c_in"])
        with pytest.raises((AttributeError, TypeError)):
            tables.kind = "euler"
        with pytest.raises(ValueError):
            tables.c_in[0] = 2.0  # read-only arrays


def test_from_dict_rejects_bad_data():
    good = C.compile_sampler("dpmpp_2m", SD15_PNDM, 4).to_dict()
    bad_cases = {
        "lacks next_from_x0": {k: v for k, v in good.items() if k != "next_from_x0"},
        "has 3 entries": {**good, "c_in": good["c_in"][:3]},
        "unknown keys": {**good, "eta": 0.0},
        "list of numbers": {**good, "x0_from_m": ["a"] * 4},
        "NaN": {**good, "x0_from_x": [float("nan")] * 4},
        "kind 'heun' is unknown": {**good, "kind": "heun"},
        "prediction_type": {**good, "prediction_type": "noise"},
        "version": {**good, "version": 99},
        "num_steps": {**good, "num_steps": 5},
        "must be 0 at step 0": {**good, "next_from_prev_x0": [1.0, 0.0, 0.0, 0.0]},
        "init_noise_sigma": {**good, "init_noise_sigma": -1.0},
    }
    for msg, d in bad_cases.items():
        with pytest.raises(ManifestError, match=msg.split("'")[0] if "'" in msg else msg):
            S.SamplerTables.from_dict(d)
    with pytest.raises(ManifestError, match="object"):
        S.SamplerTables.from_dict([1, 2])


def test_compile_rejects_bad_input():
    with pytest.raises(ProfileError, match="ddim, euler, dpmpp_2m, lcm, flow_euler"):
        C.compile_sampler("heun", SD15_PNDM, 4)
    for n in (0, -1, 2.5, True):
        with pytest.raises(ProfileError, match="num_steps"):
            C.compile_sampler("ddim", SD15_PNDM, n)
    with pytest.raises(ProfileError, match="clip_sample"):
        C.compile_sampler("ddim", {"beta_schedule": "scaled_linear"}, 4)  # DDIM clips by default
    with pytest.raises(ProfileError, match="thresholding"):
        C.compile_sampler("dpmpp_2m", {**SD15_PNDM, "thresholding": True}, 4)
    with pytest.raises(ProfileError, match="use_karras_sigmas"):
        C.compile_sampler("euler", {**SD15_PNDM, "use_karras_sigmas": True}, 4)
    with pytest.raises(ProfileError, match="use_dynamic_shifting"):
        C.compile_sampler("flow_euler", {**FLOW_SHIFT3, "use_dynamic_shifting": True}, 4)
    with pytest.raises(ProfileError, match="flow_euler"):
        C.compile_sampler("euler", FLOW_SHIFT3, 4)
    with pytest.raises(ProfileError, match="flow-matching"):
        C.compile_sampler("flow_euler", SD15_PNDM, 4)
    with pytest.raises(ProfileError, match="original_inference_steps"):
        C.compile_sampler("lcm", LCM_CFG, 51)
    with pytest.raises(ProfileError, match="algorithm_type"):
        C.compile_sampler("dpmpp_2m", {**SD15_PNDM, "algorithm_type": "sde-dpmsolver++"}, 4)
    with pytest.raises(ProfileError, match="prediction_type"):
        C.compile_sampler("euler", {**SD15_PNDM, "prediction_type": "flow_prediction"}, 4)
    with pytest.raises(ProfileError, match="beta_schedule"):
        C.compile_sampler("ddim", {**SD15_PNDM, "beta_schedule": "sigmoid"}, 4)
    with pytest.raises(ProfileError, match="non-finite"):  # x0 undefined at zero SNR for epsilon models
        C.compile_sampler("ddim", {**V_ZERO_SNR, "prediction_type": "epsilon"}, 4)
    with pytest.raises(ProfileError, match="choose another num_steps"):  # np.arange(1000, 0, -1000/61) has 62
        C.compile_sampler("ddim", TRAILING, 61)
    with pytest.raises(ProfileError, match="num_train_timesteps"):
        C.compile_sampler("ddim", SD15_PNDM, 1001)
    with pytest.raises(ProfileError, match="dict"):
        C.compile_sampler("ddim", "scaled_linear", 4)


def test_step_rejects_bad_input():
    lcm = C.compile_sampler("lcm", LCM_CFG, 4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(InputError, match="noise"):
        S.step(lcm, 0, x, x, x)
    with pytest.raises(InputError, match=r"\[0, 4\)"):
        S.step(lcm, 4, x, x, x)
    with pytest.raises(InputError, match="shape"):
        S.step(lcm, 3, x, x[:1], x)
    x_next, x0 = S.step(lcm, 3, x, x, None)  # last LCM step: no noise, no prev_x0 needed
    assert x_next.shape == SHAPE


def test_default_kind_for():
    assert C.default_kind_for("PNDMScheduler") == "ddim"
    assert C.default_kind_for("DDIMScheduler") == "ddim"
    assert C.default_kind_for("EulerDiscreteScheduler") == "euler"
    assert C.default_kind_for("EulerAncestralDiscreteScheduler") == "euler"
    assert C.default_kind_for("DPMSolverMultistepScheduler") == "dpmpp_2m"
    assert C.default_kind_for("LCMScheduler") == "lcm"
    assert C.default_kind_for("FlowMatchEulerDiscreteScheduler") == "flow_euler"
    assert C.default_kind_for("SCMScheduler") == "scm"
    with pytest.raises(ProfileError, match="PNDMScheduler"):
        C.default_kind_for("KDPM2DiscreteScheduler")


def test_runtime_module_does_not_import_torch():
    code = (
        "import importlib.util, sys\n"
        "try:\n"
        "    import diffc.runtime.sampler\n"
        "except ImportError:\n"
        f"    spec = importlib.util.spec_from_file_location('diffc.runtime.sampler', {str(SAMPLER_PY)!r})\n"
        "    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
