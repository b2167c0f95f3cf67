"""The transformer families' samplers and image-to-image entry against diffusers 0.42 (torch CPU, float64).

Each test drives the diffusers scheduler the way the pipeline's ``__call__`` does (FluxPipeline's own sigmas and
``calculate_shift``, FLUX.2's ``compute_empirical_mu``, SD3's dynamic ``mu``, Sana's flow DPM-Solver,
Sana-Sprint's rescaling around the transformer, the image-to-image pipelines' ``get_timesteps`` and
``add_noise``/``scale_noise``) with a deterministic fake denoiser, and runs diffc's tables with
``diffc.runtime.sampler.step`` in numpy beside it.

Tolerances as in test_sampler.py: the schedule is diffusers' float32 schedule (the dynamic shift re-derived in
numpy is compared bit for bit), the coefficients are float64; diffusers' per-step float32 scalars leave ~1e-7
relative, so trajectories agree to rtol=atol=1e-6 relative to the latent's magnitude.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
hypothesis = pytest.importorskip("hypothesis")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    SCMScheduler,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_calculate_shift  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu  # noqa: E402
from diffusers.pipelines.sana.pipeline_sana_sprint_img2img import SanaSprintImg2ImgPipeline  # noqa: E402
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (  # noqa: E402
    StableDiffusionImg2ImgPipeline,
)
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (  # noqa: E402
    calculate_shift as sd3_calculate_shift,
)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from diffc.errors import InputError, ManifestError, ProfileError  # noqa: E402
from diffc.exporter import sampler as C  # noqa: E402
from diffc.exporter.tiny_dit import FLUX_SCHEDULER, PIXART_SCHEDULER, SANA_SCHEDULER, SD3_SCHEDULER  # noqa: E402
from diffc.runtime import sampler as S  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SHAPE = (2, 4, 6, 10)
STEPS = (1, 2, 3, 4, 8, 20)

# FLUX.1-dev (dynamic) and -schnell (static, shift 1); FLUX.2's config shifts dynamically too
FLUX_DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_SCHEDULER}
FLUX_SCHNELL = {**FLUX_DEV, "shift": 1.0, "use_dynamic_shifting": False}
FLUX2 = {**FLUX_DEV, "use_dynamic_shifting": True}
# SD3.5 (static shift 3), and a dynamic SD3 config with the linear time shift and a terminal stretch
SD35 = {"_class_name": "FlowMatchEulerDiscreteScheduler", **SD3_SCHEDULER}
SD3_DYNAMIC = {**SD35, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.16}
SD3_LINEAR_TERMINAL = {**SD3_DYNAMIC, "time_shift_type": "linear", "shift_terminal": 0.05}
# PixArt-Sigma's scheduler config (variance_type null: the pipeline drops the learned sigma itself)
PIXART = {"_class_name": "DPMSolverMultistepScheduler", **PIXART_SCHEDULER}
SANA = {"_class_name": "DPMSolverMultistepScheduler", **SANA_SCHEDULER}
SANA_SPRINT = {"_class_name": "SCMScheduler", "num_train_timesteps": 1000, "prediction_type": "trigflow",
               "sigma_data": 0.5}

#: (height, width) pairs, square and not, and the token counts the pipelines derive from them
SIZES = [(256, 256), (512, 512), (512, 768), (1024, 576), (1024, 1024), (2048, 1024), (64, 1024)]


def flux_seq_len(h: int, w: int) -> int:
    return (h // 8 // 2) * (w // 8 // 2)  # FluxImg2ImgPipeline's formula (= packed latents.shape[1])


def sd3_seq_len(h: int, w: int) -> int:
    return (h // 8 // 2) * (w // 8 // 2)  # latent // patch_size (2)


def fake_np(x, t):
    return np.tanh(0.5 * x) + 1e-3 * t + 0.1 * np.sin(x + 1e-2 * t)


def fake_torch(x, t):
    t = float(t)
    return torch.tanh(0.5 * x) + 1e-3 * t + 0.1 * torch.sin(x + 1e-2 * t)


def close(ours, ref, what: str) -> None:
    ref = ref.numpy() if hasattr(ref, "numpy") else ref
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6 * scale, err_msg=what)


def reference_flow_schedule(cfg: dict, n: int, pipeline_class: str, seq_len: int):
    """The scheduler after the pipeline's set_timesteps for this image size."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    c = sched.config
    if pipeline_class == "FluxPipeline":
        mu = flux_calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                  c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sched.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    elif pipeline_class in ("Flux2Pipeline", "Flux2KleinPipeline"):
        sched.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n), mu=compute_empirical_mu(seq_len, n))
    else:  # StableDiffusion3Pipeline
        kw = {}
        if c.get("use_dynamic_shifting", None):
            kw["mu"] = sd3_calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                           c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        sched.set_timesteps(n, **kw)
    sched.set_begin_index(0)
    return sched


def run_flow(tables: S.SamplerTables, sched, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(SHAPE)
    x_ref, x = torch.from_numpy(z), z.copy()
    prev = None
    for i, t in enumerate(sched.timesteps):
        m_ref = fake_torch(x_ref, t)
        m = fake_np(tables.c_in[i] * x, tables.timesteps[i])
        x_ref = sched.step(m_ref, t, x_ref).prev_sample
        x, prev = S.step(tables, i, x, m, prev)
    close(x, x_ref, "final latent")


# ---------------------------------------------------------------------------------------------------------
# Flow matching Euler: FLUX.1, FLUX.2, SD3 / SD3.5, static and dynamic
# ---------------------------------------------------------------------------------------------------------
FLOW_CASES = [
    ("FluxPipeline", "flux_dev", FLUX_DEV, flux_seq_len),
    ("FluxPipeline", "flux_schnell", FLUX_SCHNELL, flux_seq_len),
    ("Flux2KleinPipeline", "flux2", FLUX2, flux_seq_len),
    ("StableDiffusion3Pipeline", "sd35", SD35, sd3_seq_len),
    ("StableDiffusion3Pipeline", "sd3_dynamic", SD3_DYNAMIC, sd3_seq_len),
    ("StableDiffusion3Pipeline", "sd3_linear_terminal", SD3_LINEAR_TERMINAL, sd3_seq_len),
]


@pytest.mark.parametrize("pipeline_class,name,cfg,seq_len_of", FLOW_CASES, ids=[c[1] for c in FLOW_CASES])
def test_flow_pipelines_match_diffusers_at_every_size(pipeline_class, name, cfg, seq_len_of):
    for n in STEPS:
        if cfg.get("shift_terminal") and n == 1:
            continue  # diffusers' stretch divides 0 by 0 for one step (refused, see test_sampler.py)
        built = C.compile_sampler("flow_euler", cfg, n, pipeline_class=pipeline_class, image_seq_len=4096)
        assert (built.dynamic_shift is not None) == bool(cfg.get("use_dynamic_shifting"))
        for h, w in SIZES:
            seq = seq_len_of(h, w)
            tables = built.for_image_seq_len(seq)
            sched = reference_flow_schedule(cfg, n, pipeline_class, seq)
            # the schedule is diffusers' bit for bit, at every size
            np.testing.assert_array_equal(tables.timesteps, sched.timesteps.double().numpy())
            np.testing.assert_array_equal(-tables.x0_from_m, sched.sigmas.double().numpy()[:-1])
            np.testing.assert_array_equal(tables.noise_scale, sched.sigmas.double().numpy()[:-1])
            if tables.dynamic_shift is not None:  # the same as a build for that size
                assert tables == C.compile_sampler("flow_euler", cfg, n, pipeline_class=pipeline_class,
                                                   image_seq_len=seq)
            run_flow(tables, sched)


@settings(max_examples=40, deadline=None)
@given(seq=st.integers(1, 65536), n=st.integers(1, 12), which=st.sampled_from(["FluxPipeline", "Flux2Pipeline",
                                                                                "StableDiffusion3Pipeline"]))
def test_dynamic_shift_is_diffusers_for_any_seq_len(seq, n, which):
    cfg = SD3_DYNAMIC if which == "StableDiffusion3Pipeline" else FLUX_DEV
    tables = C.compile_sampler("flow_euler", cfg, n, pipeline_class=which).for_image_seq_len(seq)
    sched = reference_flow_schedule(cfg, n, which, seq)
    np.testing.assert_array_equal(-tables.x0_from_m, sched.sigmas.double().numpy()[:-1])
    np.testing.assert_array_equal(tables.timesteps, sched.timesteps.double().numpy())


def test_static_tables_ignore_the_size_and_dynamic_ones_round_trip():
    static = C.compile_sampler("flow_euler", SD35, 4, pipeline_class="StableDiffusion3Pipeline")
    assert static.dynamic_shift is None and static.for_image_seq_len(9999) is static
    dyn = C.compile_sampler("flow_euler", FLUX_DEV, 4, pipeline_class="FluxPipeline", image_seq_len=1024)
    assert dyn.dynamic_shift.image_seq_len == 1024 and dyn.for_image_seq_len(1024) is dyn
    other = dyn.for_image_seq_len(4096)
    assert other.dynamic_shift.image_seq_len == 4096 and not np.array_equal(other.timesteps, dyn.timesteps)
    assert other.for_image_seq_len(1024) == dyn  # re-resolving goes back exactly
    back = S.SamplerTables.from_dict(json.loads(json.dumps(other.to_dict())))
    assert back == other and back.dynamic_shift == other.dynamic_shift
    for bad in (0, -5, 2.0, True, None):
        with pytest.raises(InputError, match="image_seq_len"):
            dyn.for_image_seq_len(bad)


def test_flux_static_uses_the_pipelines_sigmas():
    """FluxPipeline passes linspace(1, 1/N, N) even without dynamic shifting; the scheduler default differs."""
    flux = C.compile_sampler("flow_euler", FLUX_SCHNELL, 4, pipeline_class="FluxPipeline")
    np.testing.assert_allclose(-flux.x0_from_m, [1.0, 0.75, 0.5, 0.25], rtol=1e-7)
    plain = C.compile_sampler("flow_euler", FLUX_SCHNELL, 4)
    assert not np.allclose(plain.timesteps, flux.timesteps)


def test_flow_bad_input():
    with pytest.raises(ProfileError, match="use_dynamic_shifting.*FluxPipeline"):
        C.compile_sampler("flow_euler", FLUX_DEV, 4)
    with pytest.raises(ProfileError, match="use_dynamic_shifting"):
        C.compile_sampler("flow_euler", FLUX_DEV, 4, pipeline_class="StableDiffusionPipeline")
    with pytest.raises(ProfileError, match="pipeline_class"):
        C.compile_sampler("flow_euler", FLUX_DEV, 4, pipeline_class=3)
    with pytest.raises(ProfileError, match="image_seq_len"):
        C.compile_sampler("flow_euler", FLUX_DEV, 4, pipeline_class="FluxPipeline", image_seq_len=0)
    d = C.compile_sampler("flow_euler", FLUX_DEV, 4, pipeline_class="FluxPipeline").to_dict()
    for key, value, msg in [("mu_rule", "cubic", "mu_rule"), ("sigmas", [0.5] * 3, "3 sigmas for 4 steps"),
                            ("sigmas", [1.5] * 4, r"\(0, 1\]"), ("image_seq_len", 0, "image_seq_len"),
                            ("extra", 1, "unknown keys extra"), ("sigmas_dtype", "float16", "sigmas_dtype")]:
        bad = {**d, "dynamic_shift": {**d["dynamic_shift"], key: value}}
        with pytest.raises(ManifestError, match=msg):
            S.SamplerTables.from_dict(bad)
    lacking = {**d, "dynamic_shift": {k: v for k, v in d["dynamic_shift"].items() if k != "base_shift"}}
    with pytest.raises(ManifestError, match="lacks base_shift"):
        S.SamplerTables.from_dict(lacking)
    with pytest.raises(ManifestError, match="only defined for 'flow_euler'"):
        S.SamplerTables.from_dict({**C.compile_sampler("ddim", {"clip_sample": False}, 4).to_dict(),
                                   "dynamic_shift": d["dynamic_shift"]})
    # a linear time shift with a negative mu (tiny image, steep slope) is refused at run time, not NaN
    steep = {**SD3_DYNAMIC, "time_shift_type": "linear", "base_shift": -5.0, "max_shift": 1.0}
    t = C.compile_sampler("flow_euler", steep, 4, pipeline_class="StableDiffusion3Pipeline", image_seq_len=4096)
    with pytest.raises(InputError, match="choose another image size"):
        t.for_image_seq_len(16)


# ---------------------------------------------------------------------------------------------------------
# DPM-Solver++ 2M: PixArt-Sigma (epsilon) and Sana (flow sigmas, flow prediction)
# ---------------------------------------------------------------------------------------------------------
DPM_CASES = [("pixart", PIXART), ("sana", SANA), ("sana_shift1", {**SANA, "flow_shift": 1.0}),
             ("sana_shift6", {**SANA, "flow_shift": 6.0}), ("sana_heun", {**SANA, "solver_type": "heun"}),
             ("sana_no_lower_final", {**SANA, "lower_order_final": False, "final_sigmas_type": "sigma_min"})]


@pytest.mark.parametrize("name,cfg", DPM_CASES, ids=[c[0] for c in DPM_CASES])
def test_dpm_solver_pipelines_match_diffusers(name, cfg):
    for n in STEPS:
        sched = DPMSolverMultistepScheduler.from_config(cfg)
        sched.set_timesteps(n)
        tables = C.compile_sampler("dpmpp_2m", cfg, n, pipeline_class="SanaPipeline")
        assert tables.prediction_type == ("flow" if name.startswith("sana") else "epsilon")
        np.testing.assert_array_equal(tables.timesteps, sched.timesteps.double().numpy())
        z = np.random.default_rng(n).standard_normal(SHAPE)
        x_ref, x, prev = torch.from_numpy(z) * sched.init_noise_sigma, z * tables.init_noise_sigma, None
        for i, t in enumerate(sched.timesteps):
            x_ref = sched.step(fake_torch(x_ref, t), t, x_ref).prev_sample
            x, prev = S.step(tables, i, x, fake_np(x, tables.timesteps[i]), prev)
        close(x, x_ref, f"{name} steps={n}")


def test_learned_variance_is_refused_with_the_reason():
    with pytest.raises(ProfileError, match="\"variance_type\": null"):
        C.compile_sampler("dpmpp_2m", {**PIXART, "variance_type": "learned_range"}, 4)


# ---------------------------------------------------------------------------------------------------------
# Sana-Sprint: SCMScheduler with the pipeline's rescaling around the transformer
# ---------------------------------------------------------------------------------------------------------
def _patch_scm_noise(monkeypatch, noises):
    import diffusers.schedulers.scheduling_scm as scm_mod

    calls = iter(range(len(noises)))
    monkeypatch.setattr(scm_mod, "randn_tensor", lambda shape, **kw: torch.from_numpy(noises[next(calls)]))


def _scm_pipeline_step(sched, t, latents, sd):
    """SanaSprintPipeline.__call__'s loop body, with the fake transformer; returns (latents, denoised)."""
    timestep = t.expand(latents.shape[0])
    tau = torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))
    tau_e = tau.view(-1, 1, 1, 1)
    lmi = latents / sd * torch.sqrt(tau_e**2 + (1 - tau_e) ** 2)
    m = fake_torch(lmi, tau[0])
    pred = ((1 - 2 * tau_e) * lmi + (1 - 2 * tau_e + 2 * tau_e**2) * m) / torch.sqrt(tau_e**2 + (1 - tau_e) ** 2)
    pred = pred * sd
    return (*sched.step(pred, timestep, latents, return_dict=False), lmi, tau[0])


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_scm_matches_sana_sprint_pipeline(n, sigma_data, monkeypatch):
    cfg = {**SANA_SPRINT, "sigma_data": sigma_data}
    tables = C.compile_sampler("scm", cfg, n, pipeline_class="SanaSprintPipeline")
    assert tables.kind == "scm" and tables.needs_noise == (n > 1)
    rng = np.random.default_rng(7)
    z = rng.standard_normal(SHAPE)
    noises = [rng.standard_normal(SHAPE) for _ in range(n)]
    _patch_scm_noise(monkeypatch, noises)
    sched = SCMScheduler.from_config(cfg)
    sched.set_timesteps(n, max_timesteps=1.57080, intermediate_timesteps=1.3 if n == 2 else None)
    sched.set_begin_index(0)
    latents, y, prev = torch.from_numpy(z) * sigma_data, z * tables.init_noise_sigma, None
    for i, t in enumerate(sched.timesteps[:-1]):
        latents, denoised, lmi, tau = _scm_pipeline_step(sched, t, latents, sigma_data)
        np.testing.assert_allclose(tables.timesteps[i], float(tau), rtol=1e-6)
        close(tables.c_in[i] * y, lmi, f"model input at step {i}")
        y, prev = S.step(tables, i, y, fake_np(tables.c_in[i] * y, tables.timesteps[i]), prev, noise=noises[i])
    close(y, denoised / sigma_data, "decoded latent")  # the pipeline decodes denoised / sigma_data


def test_scm_bad_input():
    with pytest.raises(ProfileError, match="'scm'"):
        C.compile_sampler("dpmpp_2m", SANA_SPRINT, 2)
    with pytest.raises(ProfileError, match="SCMScheduler"):
        C.compile_sampler("scm", SANA, 2)
    with pytest.raises(ProfileError, match="trigflow"):
        C.compile_sampler("scm", {**SANA_SPRINT, "prediction_type": "epsilon"}, 2)
    assert C.default_kind_for("SCMScheduler") == "scm"


# ---------------------------------------------------------------------------------------------------------
# Image-to-image: start step, add_noise, entry into the table
# ---------------------------------------------------------------------------------------------------------
class _FakeSched:
    order = 1

    def __init__(self, n):
        self.timesteps = torch.arange(n)

    def set_begin_index(self, i):
        self.begin = i


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), strength=st.floats(0.0, 1.0, allow_nan=False))
def test_start_step_matches_diffusers_get_timesteps(n, strength):
    for pipe_cls, rule in ((StableDiffusionImg2ImgPipeline, "truncate_steps"),
                           (FluxImg2ImgPipeline, "truncate_start"), (SanaSprintImg2ImgPipeline, "truncate_start")):
        fake = SimpleNamespace(scheduler=_FakeSched(n))
        _, steps = pipe_cls.get_timesteps(fake, n, strength, "cpu")
        if steps < 1 or strength == 0:  # diffusers raises ValueError later ("number of pipeline steps ... < 1")
            with pytest.raises(InputError, match="strength"):
                S.start_step(n, strength, rule=rule)
        else:
            assert S.start_step(n, strength, rule=rule) == n - steps == fake.scheduler.begin


def test_start_step_bad_input():
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(InputError, match=r"\(0, 1\]"):
            S.start_step(4, bad)
    with pytest.raises(InputError, match="rule"):
        S.start_step(4, 0.5, rule="round")
    with pytest.raises(InputError, match="num_steps"):
        S.start_step(0, 0.5)
    assert S.start_step(4, 0.6) == 2 and S.start_step(4, 0.6, rule="truncate_start") == 1


SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "clip_sample": False}
TRAILING = {**SD15, "timestep_spacing": "trailing"}
LCM = {**SD15, "_class_name": "LCMScheduler", "original_inference_steps": 50, "set_alpha_to_one": True,
       "timestep_spacing": "leading"}

IMG2IMG_CASES = [
    ("ddim", "sd15", SD15, None, DDIMScheduler),
    ("euler", "trailing", TRAILING, None, EulerDiscreteScheduler),
    ("euler", "sd15", SD15, None, EulerDiscreteScheduler),
    ("dpmpp_2m", "sd15", SD15, None, DPMSolverMultistepScheduler),
    ("dpmpp_2m", "sana", SANA, None, DPMSolverMultistepScheduler),
    ("lcm", "lcm", LCM, None, LCMScheduler),
    ("flow_euler", "sd35", SD35, "StableDiffusion3Pipeline", FlowMatchEulerDiscreteScheduler),
    ("flow_euler", "flux_dev", FLUX_DEV, "FluxPipeline", FlowMatchEulerDiscreteScheduler),
]


@pytest.mark.parametrize("kind,name,cfg,pipeline_class,cls", IMG2IMG_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in IMG2IMG_CASES])
def test_img2img_entry_matches_diffusers(kind, name, cfg, pipeline_class, cls, monkeypatch):
    """add_noise at the start step, then the rest of the table entered with entry=True, against the scheduler
    as the image-to-image pipeline drives it (get_timesteps -> set_begin_index -> add_noise -> loop)."""
    flow = kind == "flow_euler"
    # Sana has no image-to-image pipeline in diffusers; its tables follow the flow families' rounding
    flow_rule = flow or name == "sana"
    pipe_cls = FluxImg2ImgPipeline if flow_rule else StableDiffusionImg2ImgPipeline
    seq = flux_seq_len(512, 768)
    for n in (3, 4, 8):
        for strength in (0.3, 0.5, 0.6, 0.75, 1.0):
            if flow:
                sched = reference_flow_schedule(cfg, n, pipeline_class, seq)
            else:
                sched = cls.from_config(cfg)
                sched.set_timesteps(n)
            timesteps, steps = pipe_cls.get_timesteps(SimpleNamespace(scheduler=sched), n, strength, "cpu")
            if steps < 1:  # diffusers refuses these (see test_start_step_matches_diffusers_get_timesteps)
                continue
            tables = C.compile_sampler(kind, cfg, n, pipeline_class=pipeline_class).for_image_seq_len(seq)
            k = tables.start_step(strength)
            assert k == n - steps and tables.strength_rule == ("truncate_start" if flow_rule else "truncate_steps")
            rng = np.random.default_rng(n)
            x0, nz = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
            noises = [rng.standard_normal(SHAPE) for _ in range(n)]
            if kind == "lcm":
                import diffusers.schedulers.scheduling_lcm as lcm_mod

                it = iter(noises[k:])
                monkeypatch.setattr(lcm_mod, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(it)))
            t0 = timesteps[:1]
            if flow:
                x_ref = sched.scale_noise(torch.from_numpy(x0), t0, torch.from_numpy(nz))
            else:
                x_ref = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(nz), t0)
            x = tables.add_noise(k, x0, nz)
            close(x, x_ref, f"{name}: noised latent at step {k}")
            prev = None
            for i, t in zip(range(k, n), timesteps):
                inp_ref = sched.scale_model_input(x_ref, t) if hasattr(sched, "scale_model_input") else x_ref
                close(tables.c_in[i] * x, inp_ref, f"{name}: model input at step {i}")
                x_ref = sched.step(fake_torch(inp_ref, t), t, x_ref).prev_sample
                x, prev = S.step(tables, i, x, fake_np(tables.c_in[i] * x, tables.timesteps[i]), prev,
                                 noise=noises[i], entry=i == k)
            close(x, x_ref, f"{name} steps={n} strength={strength}: final latent")


def test_img2img_entry_matters_for_dpm_solver():
    """Without entry=True a DPM-Solver table entered mid-way would mix in a zero 'previous x0'."""
    tables = C.compile_sampler("dpmpp_2m", SD15, 8)
    k = tables.start_step(0.5)
    assert tables.next_from_prev_x0[k] != 0.0
    x = np.ones(SHAPE)
    a, _ = S.step(tables, k, x, 0.5 * x, np.zeros(SHAPE), entry=True)
    b, _ = S.step(tables, k, x, 0.5 * x, np.zeros(SHAPE))
    assert not np.allclose(a, b)


@pytest.mark.parametrize("n", [2, 4])
def test_scm_img2img_matches_sana_sprint_img2img(n, monkeypatch):
    """SanaSprintImg2ImgPipeline: latents = (cos(s) x0 + sin(s) z) * sigma_data, in diffc's y = x / sigma_data."""
    cfg, sd = SANA_SPRINT, SANA_SPRINT["sigma_data"]
    tables = C.compile_sampler("scm", cfg, n)
    for strength in (0.5, 0.8, 1.0):
        sched = SCMScheduler.from_config(cfg)
        sched.set_timesteps(n, max_timesteps=1.57080, intermediate_timesteps=1.3 if n == 2 else None)
        timesteps, steps = SanaSprintImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sched), n, strength, "cpu")
        k = tables.start_step(strength)
        assert k == n - steps
        rng = np.random.default_rng(3)
        x0, nz = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
        noises = [rng.standard_normal(SHAPE) for _ in range(n)]
        _patch_scm_noise(monkeypatch, noises[k:])
        s = timesteps[:1]
        latents = torch.cos(s) * torch.from_numpy(x0) * sd + torch.sin(s) * torch.from_numpy(nz) * sd
        y = tables.add_noise(k, x0, nz)
        close(y, latents / sd, "noised latent")
        prev = None
        for i, t in zip(range(k, n), timesteps[:-1]):
            latents, denoised, _, _ = _scm_pipeline_step(sched, t, latents, sd)
            y, prev = S.step(tables, i, y, fake_np(tables.c_in[i] * y, tables.timesteps[i]), prev,
                             noise=noises[i], entry=i == k)
        close(y, denoised / sd, f"strength={strength}: decoded latent")


def test_add_noise_needs_the_new_tables():
    d = C.compile_sampler("euler", SD15, 4).to_dict()
    assert len(d["noise_signal"]) == len(d["noise_scale"]) == 4
    old = {k: v for k, v in d.items() if k not in ("noise_signal", "noise_scale")}  # a manifest from before
    tables = S.SamplerTables.from_dict(old)
    assert not tables.has_add_noise and tables.needs_noise is False
    with pytest.raises(ManifestError, match="rebuild"):
        tables.add_noise(0, np.zeros(SHAPE), np.zeros(SHAPE))
    with pytest.raises(ManifestError, match="both or neither"):
        S.SamplerTables.from_dict({k: v for k, v in d.items() if k != "noise_scale"})
    with pytest.raises(ManifestError, match="noise_signal"):
        S.SamplerTables.from_dict({**d, "noise_signal": [1.0, math.inf, 1.0, 1.0]})
    new = S.SamplerTables.from_dict(d)
    with pytest.raises(InputError, match="shape"):
        new.add_noise(0, np.zeros(SHAPE), np.zeros((1, 4)))
    with pytest.raises(InputError, match=r"\[0, 4\)"):
        new.add_noise(4, np.zeros(SHAPE), np.zeros(SHAPE))
    out = new.add_noise(1, np.zeros(SHAPE, np.float32), np.ones(SHAPE))
    assert out.dtype == np.float32


def test_every_kind_round_trips_with_the_new_keys():
    for kind, cfg, pc in [("ddim", SD15, None), ("euler", SD15, None), ("dpmpp_2m", SANA, "SanaPipeline"),
                          ("lcm", LCM, None), ("flow_euler", FLUX_DEV, "FluxPipeline"), ("scm", SANA_SPRINT, None)]:
        tables = C.compile_sampler(kind, cfg, 4, pipeline_class=pc)
        assert tables.has_add_noise
        assert S.SamplerTables.from_dict(json.loads(json.dumps(tables.to_dict()))) == tables


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_lcm_img2img_matches_lcm_img2img_pipeline(pt, monkeypatch):
    """LatentConsistencyModelImg2ImgPipeline: set_timesteps(N, strength=s) -> add_noise at timesteps[0] -> all N
    steps. Tables built for LatentConsistencyModelPipeline re-derive that schedule per strength."""
    import diffusers.schedulers.scheduling_lcm as lcm_mod

    cfg = {**LCM, "prediction_type": pt}
    for n in (2, 4, 6):
        tables = C.compile_sampler("lcm", cfg, n, pipeline_class="LatentConsistencyModelPipeline")
        assert tables.lcm_strength is not None
        assert S.SamplerTables.from_dict(json.loads(json.dumps(tables.to_dict()))) == tables
        for strength in (0.2, 0.45, 0.7, 1.0):
            sched = LCMScheduler.from_config(cfg)
            sched.set_timesteps(n, strength=strength)
            run, k = tables.img2img(strength)
            assert k == 0 and run.num_steps == n
            np.testing.assert_array_equal(run.timesteps, sched.timesteps.double().numpy())
            rng = np.random.default_rng(n)
            x0, nz = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
            noises = [rng.standard_normal(SHAPE) for _ in range(n)]
            it = iter(noises)
            monkeypatch.setattr(lcm_mod, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(it)))
            x_ref = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(nz), sched.timesteps[:1])
            x, prev = run.add_noise(0, x0, nz), None
            close(x, x_ref, "noised latent")
            for i, t in enumerate(sched.timesteps):
                x_ref = sched.step(fake_torch(x_ref, t), t, x_ref).prev_sample
                x, prev = S.step(run, i, x, fake_np(x, run.timesteps[i]), prev, noise=noises[i], entry=i == 0)
            close(x, x_ref, f"steps={n} strength={strength}: final latent")
    # strength 1 is the text-to-image schedule; too little strength for the step count is refused like diffusers
    assert tables.img2img(1.0)[0] == tables
    with pytest.raises(InputError, match="at least 0.12"):
        tables.img2img(0.1)  # int(50 * 0.1) = 5 distillation steps for 6 sampler steps
    # an LCM-LoRA on a plain SD pipeline gets StableDiffusionImg2ImgPipeline's rule: skip the first steps
    plain = C.compile_sampler("lcm", cfg, 4, pipeline_class="StableDiffusionPipeline")
    assert plain.lcm_strength is None and plain.img2img(0.5) == (plain, 2)
    with pytest.raises(ManifestError, match="only defined for 'lcm'"):
        S.SamplerTables.from_dict({**C.compile_sampler("ddim", SD15, 4).to_dict(),
                                   "lcm_strength": tables.to_dict()["lcm_strength"]})
    with pytest.raises(ManifestError, match="alphas_cumprod"):
        S.SamplerTables.from_dict({**tables.to_dict(), "lcm_strength": {**tables.to_dict()["lcm_strength"],
                                                                        "alphas_cumprod": [0.5] * 3}})


def test_float32_runtime_tracks_float64_for_the_new_samplers():
    """The runtime runs in float32: the flow DPM-Solver, SCM and the per-size FLUX tables keep the dtype and stay
    close to the float64 trajectory."""
    cases = [("dpmpp_2m", SANA, None, 8), ("scm", SANA_SPRINT, None, 4),
             ("flow_euler", FLUX_DEV, "FluxPipeline", 8), ("dpmpp_2m", PIXART, None, 8)]
    for kind, cfg, pc, n in cases:
        tables = C.compile_sampler(kind, cfg, n, pipeline_class=pc).for_image_seq_len(1536)
        rng = np.random.default_rng(1)
        x64 = rng.standard_normal(SHAPE) * tables.init_noise_sigma
        noises = [rng.standard_normal(SHAPE) for _ in range(n)]
        x32, p64, p32 = x64.astype(np.float32), None, None
        for i in range(n):
            m64 = fake_np(tables.c_in[i] * x64, tables.timesteps[i])
            m32 = fake_np(np.float32(tables.c_in[i]) * x32, tables.timesteps[i]).astype(np.float32)
            x64, p64 = S.step(tables, i, x64, m64, p64, noise=noises[i])
            x32, p32 = S.step(tables, i, x32, m32, p32, noise=noises[i].astype(np.float32))
            assert x32.dtype == np.float32
        np.testing.assert_allclose(x32, x64, rtol=1e-5, atol=1e-4, err_msg=kind)  # |x| reaches ~1e2 (fake model)
