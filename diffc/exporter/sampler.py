"""Build time: compile a sampler from the pipeline's own diffusers scheduler into :class:`SamplerTables`.

:func:`compile_sampler` instantiates the diffusers class the sampler kind reproduces from the pipeline's
``scheduler_config.json`` (``ThatScheduler.from_config``, so keys the config lacks take that class's defaults -
also when the config was saved by another class: SD 1.x ships a PNDM config without ``timestep_spacing``, and
DDIM then uses "leading" while Euler uses "linspace"), calls ``set_timesteps(num_steps)`` and reads the
schedule the object built: ``timesteps``, ``alphas_cumprod``, ``final_alpha_cumprod``, ``sigmas``,
``init_noise_sigma``. Only the per-step algebra of each class's ``step`` is written here, folded into the
coefficients of the generic update that :func:`diffc.runtime.sampler.step` runs (see that module's docstring).

The schedule is therefore diffusers' float32 schedule bit for bit, and the coefficients are computed from it in
float64. What remains between a diffc trajectory and diffusers' is diffusers' own float32 arithmetic inside
``step`` (per-step scalars, and the sample cast to float32 in Euler, DPM-Solver and flow matching), ~1e-7
relative.

Kinds and the diffusers class each reproduces (:data:`KIND_CLASS`): ``ddim`` DDIMScheduler with eta=0;
``euler`` EulerDiscreteScheduler with s_churn=0; ``dpmpp_2m`` DPMSolverMultistepScheduler, "dpmsolver++",
second order (PixArt-Sigma; Sana with ``use_flow_sigmas`` and ``flow_prediction``); ``lcm`` LCMScheduler (fresh
noise per step); ``flow_euler`` FlowMatchEulerDiscreteScheduler (SD3 / SD3.5, FLUX.1, FLUX.2), static or with
the resolution-dependent shift; ``scm`` SCMScheduler (Sana-Sprint), with the pipeline's rescaling of the
model's input and output folded into the coefficients.

What a pipeline's ``__call__`` does around its scheduler matters as much as the scheduler itself, so
``compile_sampler`` takes the pipeline class (``_class_name`` of model_index.json):

* ``FluxPipeline`` passes ``sigmas = linspace(1, 1/N, N)`` and ``mu = calculate_shift(image_seq_len, ...)``;
  ``Flux2Pipeline`` / ``Flux2KleinPipeline`` the same sigmas with ``mu = compute_empirical_mu(image_seq_len,
  N)``; ``StableDiffusion3Pipeline`` the scheduler's default sigmas and, only with ``use_dynamic_shifting``,
  ``mu = calculate_shift(image_seq_len, ...)`` (:data:`FLOW_PIPELINES`). With ``use_dynamic_shifting`` the
  tables carry a :class:`~diffc.runtime.sampler.DynamicShift` and the runtime re-derives them per image size
  (:meth:`~diffc.runtime.sampler.SamplerTables.for_image_seq_len`); the numpy re-derivation is checked against
  diffusers' own ``set_timesteps`` at build time.
* ``SanaSprintPipeline`` scales the latents by ``1 / sigma_data`` and ``sqrt(tau^2 + (1 - tau)^2)`` before the
  transformer and recombines its output with the input after it; in the space ``y = latents / sigma_data``
  (which is also what the pipeline decodes at the end) all of that is linear, so it becomes ``c_in`` and
  ``x0_from_*``. The pipeline's default ``intermediate_timesteps=1.3`` is only valid for 2 steps; other step
  counts use ``linspace(max_timesteps, 0, N + 1)``, as the pipeline does when called with
  ``intermediate_timesteps=None``.
* PixArt-Sigma and Sana call ``set_timesteps(N)`` like the UNet pipelines; nothing else is needed.
* ``LatentConsistencyModelPipeline``: the tables also carry the LCM distillation grid, because its
  image-to-image pipeline draws a strength-dependent schedule from it
  (:meth:`~diffc.runtime.sampler.SamplerTables.img2img`).

Every kind also gets the image-to-image arrays ``noise_signal`` / ``noise_scale``: each scheduler's
``add_noise`` (``scale_noise`` for flow matching, ``cos(s) x0 + sin(s) noise`` for SCM) at ``timesteps[i]``.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import numpy as np

from diffc.errors import ManifestError, ProfileError
from diffc.runtime.sampler import (
    COEFF_FIELDS,
    SAMPLERS,
    DynamicShift,
    LcmStrength,
    SamplerTables,
    discrete_x0_coeffs,
    flow_euler_rows,
    lcm_rows,
)

__all__ = ["FLOW_PIPELINES", "KIND_CLASS", "SAMPLERS", "SamplerTables", "compile_sampler", "default_kind_for"]

logger = logging.getLogger(__name__)

#: sampler kind -> the diffusers scheduler class whose ``set_timesteps`` and ``step`` it reproduces
KIND_CLASS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "scm": "SCMScheduler",
}

#: pipeline class -> (the sigmas its __call__ passes to set_timesteps, how it computes mu): "flux" is
#: ``np.linspace(1.0, 1 / N, N)``, "default" the scheduler's own; "linear" is ``calculate_shift``,
#: "flux2_empirical" ``compute_empirical_mu`` (see diffc.runtime.sampler.DynamicShift)
FLOW_PIPELINES = {
    "FluxPipeline": ("flux", "linear"),
    "FluxImg2ImgPipeline": ("flux", "linear"),
    "FluxInpaintPipeline": ("flux", "linear"),
    "Flux2Pipeline": ("flux", "flux2_empirical"),
    "Flux2KleinPipeline": ("flux", "flux2_empirical"),
    "StableDiffusion3Pipeline": ("default", "linear"),
    "StableDiffusion3Img2ImgPipeline": ("default", "linear"),
    "StableDiffusion3InpaintPipeline": ("default", "linear"),
}

#: diffusers scheduler class (``_class_name`` in scheduler_config.json) -> the kind used when a profile names none
_DEFAULT_KIND = {
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "ddim",  # SD 1.x ships PNDM; DDIM shares its training schedule and is few-step friendly
    "DDPMScheduler": "ddim",  # same discrete schedule; DDPM itself needs ~1000 steps
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler",  # deterministic Euler on the same sigmas
    "LMSDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DPMSolverSinglestepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
    "SCMScheduler": "scm",
}

# diffusers raises a bare NotImplementedError naming only the value for other schedules; diffc's samplers are
# checked against these three (or trained_betas)
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def default_kind_for(scheduler_class_name: str) -> str:
    """The sampler kind used for a pipeline whose scheduler config says ``_class_name: scheduler_class_name``."""
    try:
        return _DEFAULT_KIND[scheduler_class_name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_DEFAULT_KIND))
        raise ProfileError(
            f"no default sampler for scheduler class {scheduler_class_name!r}; known classes: {known}. "
            f"Set the profile's sampler explicitly to one of: {', '.join(SAMPLERS)}"
        ) from None


def compile_sampler(kind: str, scheduler_config: dict, num_steps: int, *, pipeline_class: str | None = None,
                    image_seq_len: int | None = None) -> SamplerTables:
    """Compile sampler ``kind`` for a diffusers scheduler config and a fixed number of steps.

    ``scheduler_config`` is the dict in a pipeline's ``scheduler/scheduler_config.json`` (or an in-memory
    ``scheduler.config``) from any scheduler class. ``pipeline_class`` is the pipeline's ``_class_name``: it
    decides what the pipeline passes to ``set_timesteps`` (FLUX's own sigmas, the ``mu`` rule; see the module
    docstring) and is required for flow matching with ``use_dynamic_shifting``. ``image_seq_len`` is the image
    token count the returned coefficients are for when the shift is dynamic (default: the config's
    ``base_image_seq_len``); the runtime re-derives them for other sizes. Raises
    :class:`~diffc.errors.ProfileError` for an unknown kind, a bad step count, or a config option the sampler
    does not reproduce (the message says which key to change).
    """
    if kind not in SAMPLERS:
        raise ProfileError(f"sampler {kind!r} is unknown; valid samplers: {', '.join(SAMPLERS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ProfileError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    num_steps = int(num_steps)
    if pipeline_class is not None and not isinstance(pipeline_class, str):
        raise ProfileError(f"pipeline_class must be a pipeline class name (str) or None, got {pipeline_class!r}")
    seq_ok = isinstance(image_seq_len, (int, np.integer)) and not isinstance(image_seq_len, bool)
    if image_seq_len is not None and not (seq_ok and image_seq_len >= 1):
        raise ProfileError(f"image_seq_len must be an integer >= 1, got {image_seq_len!r}")
    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            sched = _instantiate(kind, scheduler_config)
            out = _COMPILERS[kind](sched, sched.config, num_steps, pipeline_class=pipeline_class,
                                   image_seq_len=None if image_seq_len is None else int(image_seq_len))
    except (TypeError, ValueError, KeyError, NotImplementedError) as exc:  # values diffusers cannot use
        raise ProfileError(f"scheduler config is not usable for the {kind!r} sampler: {exc}") from exc
    rows = np.asarray(out["rows"], dtype=np.float64).reshape(num_steps, len(COEFF_FIELDS))
    if not np.all(np.isfinite(rows)):
        bad = sorted({COEFF_FIELDS[j] for j in np.nonzero(~np.isfinite(rows))[1]})
        raise ProfileError(
            f"sampler {kind!r} with this scheduler config and num_steps={num_steps} has non-finite coefficients "
            f"({', '.join(bad)}). The usual cause is rescale_betas_zero_snr=true with prediction_type "
            "'epsilon': x0 is undefined at zero SNR - zero-SNR schedules need a v_prediction model"
        )
    signal = np.asarray(out["noise_signal"], dtype=np.float64)
    scale = np.asarray(out["noise_scale"], dtype=np.float64)
    if not (np.all(np.isfinite(signal)) and np.all(np.isfinite(scale))):
        raise ProfileError(f"sampler {kind!r} with this scheduler config has non-finite add-noise coefficients; "
                           "check the scheduler config")
    tables = SamplerTables(
        kind=kind,
        prediction_type=out["prediction_type"],
        timesteps=out["timesteps"],
        init_noise_sigma=float(out["init_noise_sigma"]),
        **{name: rows[:, j] for j, name in enumerate(COEFF_FIELDS)},
        noise_signal=signal,
        noise_scale=scale,
        dynamic_shift=out.get("dynamic_shift"),
        lcm_strength=out.get("lcm_strength"),
    )
    n_train = sched.config.num_train_timesteps
    if tables.prediction_type not in ("flow", "trigflow") and tables.timesteps[0] < 0.75 * (n_train - 1):
        logger.warning(
            "sampler %s with timestep_spacing %r and %d step(s) starts at timestep %g of %d although its input is "
            "pure noise (diffusers does the same), which gives noisy or washed-out images; for few-step sampling "
            "set \"timestep_spacing\": \"trailing\" in the scheduler config",
            kind, sched.config.get("timestep_spacing"), num_steps, tables.timesteps[0], n_train,
        )
    logger.debug(
        "compiled sampler %s (%s) for %d steps: timesteps=%s init_noise_sigma=%.6g",
        kind, tables.prediction_type, num_steps, tables.timesteps.tolist(), tables.init_noise_sigma,
    )
    return tables


# ==========================================================================================================
# The scheduler object and the checks on its config
# ==========================================================================================================
def _instantiate(kind: str, scheduler_config: dict):
    """``KIND_CLASS[kind].from_config(scheduler_config)``, after the checks whose failure inside diffusers would
    give a message that does not name the key to change."""
    # imported here, not at module level, so that the build's planning stage can import this module (and
    # default_kind_for) without paying for diffusers
    import diffusers

    if not isinstance(scheduler_config, dict):
        raise ProfileError(
            f"scheduler config must be a dict (the content of scheduler/scheduler_config.json), "
            f"got {type(scheduler_config).__name__}"
        )
    source_cls = scheduler_config.get("_class_name")
    if isinstance(source_cls, str) and (source_cls == "SCMScheduler") != (kind == "scm"):
        raise ProfileError(
            f"the pipeline's scheduler is {source_cls} but the sampler is {kind!r}; "
            + ("set the profile's sampler to 'scm' (Sana-Sprint's consistency sampler)" if kind != "scm" else
               "sampler 'scm' is only for SCMScheduler pipelines (Sana-Sprint)")
        )
    if isinstance(source_cls, str) and kind != "scm":
        source_is_flow = source_cls.startswith("FlowMatch")
        if source_is_flow and kind != "flow_euler":
            raise ProfileError(
                f"the pipeline's scheduler is {source_cls} (a flow-matching model) but the sampler is {kind!r}; "
                "set the profile's sampler to 'flow_euler'"
            )
        if not source_is_flow and kind == "flow_euler":
            raise ProfileError(
                f"sampler 'flow_euler' is for flow-matching models but the pipeline's scheduler is {source_cls}; "
                f"choose one of: {', '.join(k for k in SAMPLERS if k != 'flow_euler')}"
            )
    cls = getattr(diffusers, KIND_CLASS[kind])
    # what from_config will pass to __init__: the class's own keys, minus those the writing class only defaulted
    used_defaults = set(scheduler_config.get("_use_default_values") or ())
    params = inspect.signature(cls.__init__).parameters
    given = {k: v for k, v in scheduler_config.items() if k in params and k not in used_defaults}

    def value(key: str) -> Any:  # the value __init__ will see
        return given.get(key, params[key].default)

    n_train = value("num_train_timesteps")
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 2:
        raise ProfileError(f"scheduler config num_train_timesteps must be an integer >= 2, got {n_train!r}")
    trained = given.get("trained_betas")
    if trained is not None:
        if np.asarray(trained, dtype=np.float32).shape != (n_train,):
            raise ProfileError(
                f"scheduler config 'trained_betas' has {np.size(trained)} values but num_train_timesteps is "
                f"{n_train}; make them agree"
            )
    elif "beta_schedule" in given and given["beta_schedule"] not in _BETA_SCHEDULES:
        raise ProfileError(
            f"scheduler config beta_schedule {given['beta_schedule']!r} is not supported; "
            f"use one of {', '.join(map(repr, _BETA_SCHEDULES))} (or give trained_betas)"
        )
    if kind == "dpmpp_2m":
        if value("algorithm_type") not in ("dpmsolver++", "deis"):  # diffusers maps "deis" to "dpmsolver++"
            raise ProfileError(
                f"scheduler config algorithm_type {value('algorithm_type')!r} is not supported by diffc's "
                "'dpmpp_2m' sampler; set \"algorithm_type\": \"dpmsolver++\""
            )
        if value("solver_type") not in ("midpoint", "heun", "logrho", "bh1", "bh2"):  # the last 3 -> midpoint
            raise ProfileError(
                f"scheduler config solver_type {value('solver_type')!r} is not supported; use 'midpoint' or 'heun'"
            )
    if kind == "flow_euler":
        shift = value("shift")
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ProfileError(f"scheduler config shift must be a positive number, got {shift!r}")
    sched = cls.from_config(dict(scheduler_config))
    cfg = sched.config
    if "timestep_spacing" in cfg and cfg["timestep_spacing"] not in ("leading", "linspace", "trailing"):
        raise ProfileError(
            f"scheduler config timestep_spacing {cfg['timestep_spacing']!r} is not supported; "
            "use 'leading', 'linspace' or 'trailing'"
        )
    if "steps_offset" in cfg and (isinstance(cfg["steps_offset"], bool) or not isinstance(cfg["steps_offset"], int)):
        raise ProfileError(f"scheduler config steps_offset must be an integer, got {cfg['steps_offset']!r}")
    return sched


def _require_false(cfg, kind: str, *keys: str, why: str = "") -> None:
    for key in keys:
        if cfg.get(key):
            raise ProfileError(
                f"scheduler config sets {key}={cfg[key]!r}, which diffc's {kind!r} sampler does not implement"
                f"{why}; set \"{key}\": false in scheduler_config.json (or choose another sampler)"
            )


def _prediction_type(cfg, kind: str, allowed: tuple[str, ...]) -> str:
    pt = cfg["prediction_type"]
    if pt == "original_sample":  # Euler's alias for "sample"
        pt = "sample"
    if pt not in allowed:
        raise ProfileError(
            f"scheduler config prediction_type {cfg['prediction_type']!r} is not supported by the {kind!r} "
            f"sampler; supported: {', '.join(allowed)}"
        )
    return pt


def _check_num_steps(num_steps: int, n_train: int) -> None:
    if num_steps > n_train:
        raise ProfileError(
            f"num_steps={num_steps} is larger than the model's num_train_timesteps={n_train}; use fewer steps"
        )


def _check_count(t: np.ndarray, n: int, cfg, kind: str) -> None:
    # np.arange with a fractional step can yield one extra (negative) timestep, e.g. 1000/61 under "trailing";
    # diffusers then silently runs a broken schedule. Refuse it with a clear message instead.
    if t.shape[0] != n or (cfg["timestep_spacing"] == "trailing" and np.any(t < 0)):
        raise ProfileError(
            f"diffusers' {cfg['timestep_spacing']!r} timestep spacing yields {t.shape[0]} timesteps "
            f"({t.astype(np.int64).tolist()}) for num_steps={n} with the {kind!r} sampler; choose another num_steps"
        )


def _f64(value: Any) -> np.ndarray:
    """A torch tensor (or number) from the scheduler object as a float64 numpy array, without rounding."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


# ==========================================================================================================
# The samplers: each class's ``step`` as coefficients (x0 from (x, m), then x_next from (x, x0, prev_x0, noise))
# ==========================================================================================================
def _compile_ddim(sched, cfg, n: int, **_: Any) -> dict:
    """``DDIMScheduler.step`` with eta=0.

    diffusers: ``prev_sample = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps`` where ``eps`` is the model's noise
    prediction re-derived for v/sample models. Writing ``eps = (x - sqrt(a) x0) / sqrt(1 - a)`` (true for all
    three prediction types) puts it in the generic form. ``a_prev`` is read where ``step`` reads it: at
    ``t - num_train_timesteps // num_steps`` (not at the next timestep, which differs for "trailing" and
    "linspace"), and at ``final_alpha_cumprod`` when that is negative.
    """
    _require_false(cfg, "ddim", "thresholding")
    _require_false(
        cfg, "ddim", "clip_sample", why=" (DDIMScheduler clips x0 by default when the config does not say)"
    )
    pt = _prediction_type(cfg, "ddim", ("epsilon", "v_prediction", "sample"))
    n_train = cfg["num_train_timesteps"]
    _check_num_steps(n, n_train)
    sched.set_timesteps(n)
    t = sched.timesteps.numpy().astype(np.int64)
    _check_count(t, n, cfg, "ddim")
    if np.any(t >= n_train) or np.any(t < 0):
        raise ProfileError(
            f"timesteps {t.tolist()} fall outside [0, {n_train}) (steps_offset={cfg['steps_offset']}); "
            "fix steps_offset or timestep_spacing in the scheduler config"
        )
    ac = _f64(sched.alphas_cumprod)
    final_ac = float(_f64(sched.final_alpha_cumprod))
    rows = []
    for ti in t:
        prev_t = int(ti) - n_train // n
        a = float(ac[ti])
        ap = float(ac[prev_t]) if prev_t >= 0 else final_ac
        cx, cm = discrete_x0_coeffs(pt, a)
        k = math.sqrt(1.0 - ap) / math.sqrt(1.0 - a)  # eps coefficient, spread over x and x0
        rows.append((1.0, cx, cm, k, math.sqrt(ap) - k * math.sqrt(a), 0.0, 0.0))
    a = ac[t]  # add_noise: sqrt(a_t) x0 + sqrt(1 - a_t) noise
    return {"prediction_type": pt, "timesteps": t.astype(np.float64), "init_noise_sigma": 1.0, "rows": rows,
            "noise_signal": np.sqrt(a), "noise_scale": np.sqrt(1.0 - a)}


def _compile_euler(sched, cfg, n: int, **_: Any) -> dict:
    """``EulerDiscreteScheduler.step`` with s_churn=0 (so sigma_hat = sigma).

    diffusers: ``x_next = x + (x - x0) / sigma * (sigma_next - sigma)``, i.e.
    ``x_next = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * x0``; the model sees
    ``x / sqrt(sigma^2 + 1)`` (``scale_model_input``). With ``timestep_type="continuous"`` and v-prediction
    the model's timestep is ``0.25 * log(sigma)`` (diffusers' ``timesteps``).
    """
    _require_false(cfg, "euler", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
    if cfg["interpolation_type"] != "linear":
        raise ProfileError(
            f"scheduler config interpolation_type {cfg['interpolation_type']!r} is not supported by diffc's "
            "'euler' sampler; set \"interpolation_type\": \"linear\""
        )
    if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise ProfileError(
            f"scheduler config final_sigmas_type {cfg['final_sigmas_type']!r} is not supported; "
            "use 'zero' or 'sigma_min'"
        )
    pt = _prediction_type(cfg, "euler", ("epsilon", "v_prediction", "sample"))
    n_train = cfg["num_train_timesteps"]
    _check_num_steps(n, n_train)
    sched.set_timesteps(n)
    discrete = sched
    if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
        # the training timesteps the sigmas were interpolated at, for the range check below
        discrete = type(sched).from_config({**cfg, "timestep_type": "discrete"})
        discrete.set_timesteps(n)
    t = discrete.timesteps.numpy()
    _check_count(t, n, cfg, "euler")
    if np.any(t > n_train - 1) or np.any(t < 0):
        raise ProfileError(
            f"timesteps {t.tolist()} fall outside [0, {n_train - 1}] (steps_offset={cfg['steps_offset']}); "
            "fix steps_offset or timestep_spacing in the scheduler config"
        )
    sig = _f64(sched.sigmas)
    if np.any(sig[:-1] <= 0):
        raise ProfileError(f"Euler sigmas {sig.tolist()} reach 0 before the last step; check the scheduler config")
    rows = []
    for i in range(n):
        s, sn = sig[i], sig[i + 1]
        if pt == "epsilon":
            cx, cm = 1.0, -s
        elif pt == "v_prediction":
            cx, cm = 1.0 / (s * s + 1.0), -s / math.sqrt(s * s + 1.0)
        else:
            cx, cm = 0.0, 1.0
        r = sn / s
        rows.append((1.0 / math.sqrt(s * s + 1.0), cx, cm, r, 1.0 - r, 0.0, 0.0))
    # add_noise: x0 + sigma noise (the loop's x, which step() divides by sqrt(sigma^2 + 1) only for the model)
    return {"prediction_type": pt, "timesteps": _f64(sched.timesteps), "rows": rows,
            "init_noise_sigma": float(_f64(sched.init_noise_sigma)),
            "noise_signal": np.ones(n), "noise_scale": sig[:-1].copy()}


def _compile_dpmpp_2m(sched, cfg, n: int, **_: Any) -> dict:
    """``DPMSolverMultistepScheduler`` with algorithm_type "dpmsolver++", solver_order 2.

    The model output is first converted to a data prediction x0 (``convert_model_output``), with
    ``alpha_t = 1/sqrt(sigma^2+1)``, ``sigma_t = sigma * alpha_t`` (with ``use_flow_sigmas``, Sana:
    ``alpha_t = 1 - sigma``, ``sigma_t = sigma``, and a "flow_prediction" model gives ``x0 = x - sigma * v``)
    and ``lambda = log(alpha_t / sigma_t)``:

    * first order (step 0, and the final step: diffusers forces it when ``final_sigmas_type="zero"``, when
      ``euler_at_final``, or when ``lower_order_final`` and fewer than 15 steps):
      ``x_next = (sigma_t/sigma_s) x - alpha_t (exp(-h) - 1) x0`` with ``h = lambda_t - lambda_s``;
    * second order otherwise, with ``D1 = (x0 - prev_x0) / r0``, ``r0 = h_prev / h``:
      midpoint adds ``-0.5 alpha_t (exp(-h) - 1) D1``, heun adds ``alpha_t ((exp(-h) - 1)/h + 1) D1``.

    When the next sigma is 0 (the last step with final_sigmas_type "zero") ``h`` is infinite and the update
    reduces to ``x_next = x0``, which is written directly instead of evaluating ``log(0)``.
    Image-to-image (``add_noise``): ``alpha_t x0 + sigma_t noise`` at ``sigmas[i]``; the pipeline's first step
    is then first order (see ``entry`` in diffc.runtime.sampler.step).
    The kind is second order by definition: a config's ``solver_order`` is not used. diffusers' ``__init__``
    has already mapped "deis" to "dpmsolver++" and "logrho"/"bh1"/"bh2" to "midpoint" (see :func:`_instantiate`).
    """
    solver_type = cfg["solver_type"]
    if cfg["solver_order"] != 2:
        logger.info("dpmpp_2m: ignoring solver_order=%r from the scheduler config (dpmpp_2m is second order)",
                    cfg["solver_order"])
    _require_false(cfg, "dpmpp_2m", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                   "use_lu_lambdas", "thresholding")
    flow = bool(cfg["use_flow_sigmas"])
    if cfg["variance_type"] in ("learned", "learned_range"):
        # DPMSolverMultistepScheduler then keeps model_output[:, :3] (pixel-space DeepFloyd IF), which fails on
        # 4-channel latents in diffusers itself; PixArt's pipeline already drops the predicted variance
        raise ProfileError(
            f"scheduler config variance_type {cfg['variance_type']!r} makes DPMSolverMultistepScheduler keep only "
            "the first 3 channels of the model output (diffusers fails on 4-channel latents with it); latent models "
            "whose pipeline drops the predicted variance itself (PixArt) need \"variance_type\": null"
        )
    if cfg["final_sigmas_type"] not in ("zero", "sigma_min"):
        raise ProfileError(
            f"scheduler config final_sigmas_type {cfg['final_sigmas_type']!r} is not supported; "
            "use 'zero' or 'sigma_min'"
        )
    pt = _prediction_type(cfg, "dpmpp_2m", ("epsilon", "v_prediction", "sample", "flow_prediction"))
    n_train = cfg["num_train_timesteps"]
    _check_num_steps(n, n_train)
    if flow:
        shift = cfg["flow_shift"]
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ProfileError(f"scheduler config flow_shift must be a positive number, got {shift!r}")
    sched.set_timesteps(n)
    t = sched.timesteps.numpy().astype(np.int64)
    if not flow:
        _check_count(t, n, cfg, "dpmpp_2m")
    if np.any(t >= n_train) or np.any(t < 0) or len(np.unique(t)) != n:
        raise ProfileError(
            f"the 'dpmpp_2m' timesteps for num_steps={n} are {t.tolist()}: out of range or repeated; "
            "use fewer steps or check steps_offset/lambda_min_clipped"
        )
    sigmas = _f64(sched.sigmas)

    def alpha_sigma(s: float) -> tuple[float, float]:
        if flow:
            return 1.0 - s, s
        alpha = 1.0 / math.sqrt(s * s + 1.0)
        return alpha, s * alpha

    def lam(s: float) -> float:
        alpha, sg = alpha_sigma(s)
        return math.log(alpha) - math.log(sg)

    rows = []
    for i in range(n):
        s0, s_next = float(sigmas[i]), float(sigmas[i + 1])
        alpha_s0, sigma_s0 = alpha_sigma(s0)
        if pt == "epsilon":
            cx, cm = 1.0 / alpha_s0, -sigma_s0 / alpha_s0
        elif pt == "v_prediction":
            cx, cm = alpha_s0, -sigma_s0
        elif pt == "flow_prediction":  # x0 = sample - sigmas[i] * v (the raw sigma, whatever the alpha/sigma map)
            cx, cm = 1.0, -s0
        else:
            cx, cm = 0.0, 1.0
        lower_order_final = i == n - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
        )
        order = 1 if (i == 0 or lower_order_final) else 2
        if s_next == 0.0:
            if order != 1:  # unreachable with diffusers' rules (final sigma 0 forces first order)
                raise ProfileError("internal: second-order DPM-Solver step onto sigma 0")
            rows.append((1.0, cx, cm, 0.0, 1.0, 0.0, 0.0))
            continue
        alpha_t, sigma_t = alpha_sigma(s_next)
        h = lam(s_next) - lam(s0)
        a_coef = -alpha_t * math.expm1(-h)  # -alpha_t (exp(-h) - 1)
        nx = sigma_t / sigma_s0
        if order == 1:
            rows.append((1.0, cx, cm, nx, a_coef, 0.0, 0.0))
            continue
        r0 = (lam(s0) - lam(float(sigmas[i - 1]))) / h
        d1 = 0.5 * a_coef if solver_type == "midpoint" else alpha_t * (math.expm1(-h) / h + 1.0)  # D1's coefficient
        rows.append((1.0, cx, cm, nx, a_coef + d1 / r0, -d1 / r0, 0.0))
    noise = np.array([alpha_sigma(float(v)) for v in sigmas[:-1]])
    return {"prediction_type": "flow" if pt == "flow_prediction" else pt, "timesteps": t.astype(np.float64),
            "init_noise_sigma": 1.0, "rows": rows, "noise_signal": noise[:, 0], "noise_scale": noise[:, 1]}


#: pipelines whose image-to-image counterpart passes ``strength`` into ``LCMScheduler.set_timesteps``
#: (``AutoPipelineForImage2Image`` maps them to ``LatentConsistencyModelImg2ImgPipeline``)
LCM_PIPELINES = ("LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")


def _compile_lcm(sched, cfg, n: int, *, pipeline_class: str | None = None, **_: Any) -> dict:
    """``LCMScheduler`` multi-step consistency sampling: :func:`diffc.runtime.sampler.lcm_rows` on the
    scheduler's own timesteps and float32 ``alphas_cumprod``. For the LCM pipelines (:data:`LCM_PIPELINES`) the
    tables also carry the distillation grid (:class:`~diffc.runtime.sampler.LcmStrength`) that their
    image-to-image pipeline draws a strength-dependent schedule from."""
    _require_false(cfg, "lcm", "thresholding", "clip_sample")
    pt = _prediction_type(cfg, "lcm", ("epsilon", "v_prediction", "sample"))
    n_train = cfg["num_train_timesteps"]
    orig = cfg["original_inference_steps"]
    if isinstance(orig, bool) or not isinstance(orig, int) or not 1 <= orig <= n_train:
        raise ProfileError(
            f"scheduler config original_inference_steps must be an integer in [1, {n_train}], got {orig!r}"
        )
    _check_num_steps(n, n_train)
    if n > orig:
        raise ProfileError(
            f"num_steps={n} is larger than the LCM scheduler's original_inference_steps={orig}: LCM timesteps are "
            f"a subset of that grid; use num_steps <= {orig}"
        )
    sched.set_timesteps(n)
    t = sched.timesteps.numpy().astype(np.int64)
    ac = _f64(sched.alphas_cumprod)
    scaling = cfg["timestep_scaling"]
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ProfileError(f"scheduler config timestep_scaling must be a finite number, got {scaling!r}")
    rows, signal, scale = lcm_rows(t, ac[t], pt, float(scaling))
    out = {"prediction_type": pt, "timesteps": t.astype(np.float64), "init_noise_sigma": 1.0, "rows": rows,
           "noise_signal": signal, "noise_scale": scale}
    if pipeline_class in LCM_PIPELINES:
        grid = np.arange(1, orig + 1) * (n_train // orig) - 1
        out["lcm_strength"] = LcmStrength(original_steps=orig, num_train_timesteps=n_train,
                                          timestep_scaling=float(scaling), alphas_cumprod=ac[grid])
        if not np.array_equal(out["lcm_strength"].timesteps_for(n, 1.0), t):  # the grid the runtime assumes
            raise ProfileError(f"LCM timesteps {t.tolist()} are not on the distillation grid diffc re-derives "
                               "for image-to-image; report this with the scheduler config")
    return out


def _compile_flow_euler(sched, cfg, n: int, *, pipeline_class: str | None = None,
                        image_seq_len: int | None = None, **_: Any) -> dict:
    """``FlowMatchEulerDiscreteScheduler`` as the pipeline's ``__call__`` drives it (see the module docstring).

    The step itself is :func:`diffc.runtime.sampler.flow_euler_rows`. The model's timestep is diffusers'
    ``sigma * num_train_timesteps``; neither the model input nor the initial noise is scaled.
    """
    _require_false(cfg, "flow_euler", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                   "use_beta_sigmas", "stochastic_sampling")
    sigma_source, mu_rule = FLOW_PIPELINES.get(pipeline_class, ("default", None))
    dynamic = bool(cfg["use_dynamic_shifting"])
    if dynamic and mu_rule is None:
        raise ProfileError(
            "scheduler config sets use_dynamic_shifting=true (resolution-dependent shift), and how the shift follows "
            f"the image size is the pipeline's choice; pipeline class {pipeline_class!r} is not one diffc knows "
            f"({', '.join(sorted(FLOW_PIPELINES))}). Build from a pipeline folder of one of those classes, or set "
            "\"use_dynamic_shifting\": false and \"shift\" to the value for your resolution"
        )
    if dynamic and cfg["time_shift_type"] not in ("exponential", "linear"):
        raise ProfileError(f"scheduler config time_shift_type {cfg['time_shift_type']!r} must be 'exponential' or "
                           "'linear'")
    n_train = cfg["num_train_timesteps"]
    if sigma_source == "flux":  # FluxPipeline.__call__: np.linspace(1.0, 1 / N, N), float32 inside set_timesteps
        base = np.linspace(1.0, 1 / n, n)
        base_dtype = "float32"
    else:  # set_timesteps' own default, in float64 until the float32 tensor
        base = np.linspace(sched._sigma_to_t(sched.sigma_max), sched._sigma_to_t(sched.sigma_min), n) / n_train
        base_dtype = "float64"
    spec = None
    if dynamic:
        try:
            spec = _dynamic_shift(cfg, mu_rule, base, base_dtype, n_train, image_seq_len)
        except ManifestError as exc:  # the same checks a manifest gets, here about the scheduler config
            raise ProfileError(f"scheduler config: {exc}") from None
        sched.set_timesteps(n, sigmas=base if sigma_source == "flux" else None, mu=spec.mu(spec.image_seq_len))
    else:
        sched.set_timesteps(n, sigmas=base if sigma_source == "flux" else None)
    return _flow_tables(sched, n, n_train, spec)


def _dynamic_shift(cfg, mu_rule: str, base: np.ndarray, base_dtype: str, n_train: int,
                   image_seq_len: int | None) -> DynamicShift:
    """What the runtime needs to redo ``set_timesteps(sigmas=base, mu=mu(image_seq_len))`` for any size."""
    return DynamicShift(
        mu_rule=mu_rule, time_shift_type=cfg["time_shift_type"],
        sigmas=np.asarray(base, dtype=base_dtype).astype(np.float64), sigmas_dtype=base_dtype,
        base_image_seq_len=cfg["base_image_seq_len"], max_image_seq_len=cfg["max_image_seq_len"],
        base_shift=cfg["base_shift"], max_shift=cfg["max_shift"], shift_terminal=cfg["shift_terminal"] or None,
        num_train_timesteps=n_train,
        image_seq_len=image_seq_len if image_seq_len is not None else cfg["base_image_seq_len"],
    )


def _flow_tables(sched, n: int, n_train: int, spec: DynamicShift | None) -> dict:
    sig = _f64(sched.sigmas)
    if not np.all(np.isfinite(sig)):
        # e.g. shift_terminal with num_steps=1: diffusers divides 0 by 0 and samples with NaN sigmas
        raise ProfileError(
            f"flow sigmas for num_steps={n} are not finite ({sig[:-1].tolist()}); with shift_terminal use "
            "num_steps >= 2"
        )
    if np.any(sig[:-1] <= 0):
        raise ProfileError(f"flow sigmas {sig.tolist()} reach 0 before the last step; check shift/shift_terminal")
    timesteps = _f64(sched.timesteps)
    if spec is not None:
        # the runtime re-derives these for every image size: prove here, against diffusers, that it can
        ours = spec.sigmas_for(spec.image_seq_len).astype(np.float64)
        ours_t = (spec.sigmas_for(spec.image_seq_len)[:-1] * np.float32(n_train)).astype(np.float64)
        if not (np.array_equal(ours, sig) and np.array_equal(ours_t, timesteps)):
            raise ProfileError(
                "diffc's numpy re-derivation of the dynamic shift does not reproduce this diffusers version's "
                f"FlowMatchEulerDiscreteScheduler.set_timesteps (sigmas {ours.tolist()} vs {sig.tolist()}); "
                "set \"use_dynamic_shifting\": false with a fixed \"shift\", and report this"
            )
    rows, signal, scale = flow_euler_rows(sig)
    return {"prediction_type": "flow", "timesteps": timesteps, "init_noise_sigma": 1.0, "rows": rows,
            "noise_signal": signal, "noise_scale": scale, "dynamic_shift": spec}


#: SanaSprintPipeline.__call__'s defaults
_SCM_MAX_TIMESTEPS = 1.57080
_SCM_INTERMEDIATE_TIMESTEPS = 1.3


def _compile_scm(sched, cfg, n: int, **_: Any) -> dict:
    """``SCMScheduler`` (trigflow) with ``SanaSprintPipeline``'s rescaling around the transformer.

    The pipeline, at trigflow time ``s`` with ``tau = sin(s) / (sin(s) + cos(s))`` (the transformer's timestep)
    and ``k = sqrt(tau^2 + (1 - tau)^2)``: model input ``(x / sigma_data) * k``; then
    ``F = ((1 - 2 tau) * input + (1 - 2 tau + 2 tau^2) * m) / k * sigma_data``; the scheduler:
    ``x0 = cos(s) x - sin(s) F``, ``x_next = cos(t) x0 + sin(t) sigma_data z``; the image is ``x0 / sigma_data``
    of the last step. In ``y = x / sigma_data`` every one of these is linear and ``sigma_data`` cancels:
    ``c_in = k``, ``y0 = (cos(s) - sin(s) (1 - 2 tau)) y - sin(s) (1 - 2 tau + 2 tau^2) / k * m``,
    ``y_next = cos(t) y0 + sin(t) z``, ``y = randn`` at the start, and the last step's ``y_next`` (``t = 0``) is
    what the pipeline decodes. Image-to-image (SanaSprintImg2ImgPipeline): ``y = cos(s) x0 + sin(s) z``.
    """
    if cfg["prediction_type"] != "trigflow":
        raise ProfileError(f"scheduler config prediction_type {cfg['prediction_type']!r} is not supported by the "
                           "'scm' sampler; SCMScheduler supports 'trigflow'")
    sd = cfg["sigma_data"]
    if isinstance(sd, bool) or not isinstance(sd, (int, float)) or not sd > 0:
        raise ProfileError(f"scheduler config sigma_data must be a positive number, got {sd!r}")
    _check_num_steps(n, cfg["num_train_timesteps"])
    # the pipeline's default intermediate_timesteps=1.3 is refused by diffusers for any num_steps but 2
    sched.set_timesteps(n, max_timesteps=_SCM_MAX_TIMESTEPS,
                        intermediate_timesteps=_SCM_INTERMEDIATE_TIMESTEPS if n == 2 else None)
    s_all = _f64(sched.timesteps)  # n + 1 trigflow times, the last 0
    if s_all.shape[0] != n + 1 or s_all[-1] != 0.0:
        raise ProfileError(f"SCM timesteps {s_all.tolist()} for num_steps={n} do not end at 0; check the config")
    rows, taus = [], []
    for i in range(n):
        s, t = float(s_all[i]), float(s_all[i + 1])
        tau = math.sin(s) / (math.cos(s) + math.sin(s))
        k = math.sqrt(tau * tau + (1.0 - tau) ** 2)
        cx = math.cos(s) - math.sin(s) * (1.0 - 2.0 * tau)
        cm = -math.sin(s) * (1.0 - 2.0 * tau + 2.0 * tau * tau) / k
        rows.append((k, cx, cm, 0.0, math.cos(t), 0.0, math.sin(t)))
        taus.append(tau)
    s = s_all[:-1]
    return {"prediction_type": "trigflow", "timesteps": np.asarray(taus), "init_noise_sigma": 1.0, "rows": rows,
            "noise_signal": np.cos(s), "noise_scale": np.sin(s)}


_COMPILERS = {
    "ddim": _compile_ddim,
    "euler": _compile_euler,
    "dpmpp_2m": _compile_dpmpp_2m,
    "lcm": _compile_lcm,
    "flow_euler": _compile_flow_euler,
    "scm": _compile_scm,
}
