"""Few-step samplers compiled to tables: one generic update that reproduces several diffusers schedulers.

At build time :func:`compile_sampler` reads a diffusers ``scheduler_config.json`` and "compiles" the chosen
sampler into a :class:`SamplerTables`: the fixed timesteps plus, for every step ``i``, a handful of float64
coefficients. At run time (numpy only, no torch, no diffusers) every sampler is the same few lines::

    model_input = c_in[i] * x                                  # fed to the denoiser with timestep timesteps[i]
    x0          = x0_from_x[i] * x + x0_from_m[i] * m          # m = model output after classifier-free guidance
    x_next      = (next_from_x[i] * x + next_from_x0[i] * x0
                   + next_from_prev_x0[i] * prev_x0 + next_from_noise[i] * noise_i)
    prev_x0     = x0

with ``x = init_noise_sigma * randn`` at the start and ``prev_x0 = 0`` at step 0. ``x0`` is always a *data*
prediction (the denoised latent), which is what lets one form serve epsilon-, v-, sample- and flow-predicting
models alike: the prediction type only changes ``x0_from_x``/``x0_from_m``.

Why the tables reproduce diffusers to ~1e-7 rather than ~1e-5: the schedulers build their noise schedule in
float32 torch (``torch.linspace(..., dtype=float32)``, ``torch.cumprod``) and a different rounding of those
1000-entry tables moves ``alphas_cumprod`` by a few 1e-6 relative. This module emulates ``betas`` and
``alphas_cumprod`` bit for bit (see :func:`_torch_linspace_f32`, :func:`_torch_cumprod_f32`), then computes
every coefficient from them in float64. Values diffusers derives with a float32 ``sqrt`` (the sigma tables,
the zero-terminal-SNR rescale) agree to 1 ulp: torch's vectorised float32 sqrt is not correctly rounded and is
not worth emulating. What remains is diffusers' own float32 arithmetic inside ``step`` (per-step scalars, and
the sample cast to float32 in Euler, DPM-Solver and flow matching), i.e. ~1e-7 relative. DDIM and flow
matching agree to ~1e-16 once those float32 scalars are taken out.

Supported kinds (:data:`SAMPLERS`) and the diffusers class each one reproduces (diffusers 0.42):

* ``"ddim"``        - ``DDIMScheduler`` with ``eta=0``.
* ``"euler"``       - ``EulerDiscreteScheduler`` with ``s_churn=0`` (deterministic).
* ``"dpmpp_2m"``    - ``DPMSolverMultistepScheduler``, ``algorithm_type="dpmsolver++"``, second order.
* ``"lcm"``         - ``LCMScheduler`` (multi-step consistency sampling, needs fresh noise per step).
* ``"flow_euler"``  - ``FlowMatchEulerDiscreteScheduler`` (static shift).

Only numpy is imported here on purpose: this file ships in the torch-free runtime.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffc.errors import InputError, ManifestError, ProfileError

__all__ = [
    "SAMPLERS",
    "PREDICTION_TYPES",
    "SamplerTables",
    "compile_sampler",
    "step",
    "default_kind_for",
    "guidance_embedding",
]

logger = logging.getLogger(__name__)

#: every sampler kind :func:`compile_sampler` knows
SAMPLERS = ("ddim", "euler", "dpmpp_2m", "lcm", "flow_euler")

#: what the denoiser predicts; ``"flow"`` is a velocity ``v = noise - x0`` (flow matching)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

#: version of the dict written by :meth:`SamplerTables.to_dict`
TABLES_FORMAT_VERSION = 1

_COEFF_FIELDS = (
    "c_in",
    "x0_from_x",
    "x0_from_m",
    "next_from_x",
    "next_from_x0",
    "next_from_prev_x0",
    "next_from_noise",
)
_ARRAY_FIELDS = ("timesteps",) + _COEFF_FIELDS

_F32 = np.float32

# ----------------------------------------------------------------------------------------------------------
# Which diffusers scheduler class each kind reproduces, and that class's __init__ defaults (diffusers 0.42).
# A key missing from the scheduler config takes the default of the class the kind reproduces - exactly what
# ``ThatScheduler.from_config(config)`` does, even when the config was saved by another class (SD 1.x ships a
# PNDMScheduler config without ``timestep_spacing``: DDIM then uses "leading" but Euler uses "linspace").
# ----------------------------------------------------------------------------------------------------------
_KIND_CLASS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}

_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    "EulerDiscreteScheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    },
    "DPMSolverMultistepScheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    },
    "LCMScheduler": {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    },
    "FlowMatchEulerDiscreteScheduler": {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    },
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
}


# ==========================================================================================================
# The tables
# ==========================================================================================================
@dataclass(frozen=True, eq=False)
class SamplerTables:
    """A sampler compiled to per-step coefficients of the generic update (see the module docstring).

    All arrays are 1-D float64 of length ``num_steps`` and read-only. ``timesteps[i]`` is the value to feed to
    the denoiser's ``timestep`` input at step ``i`` (an integer for the discrete schedulers, ``sigma * 1000``
    for flow matching, a float for Euler's "linspace" spacing).
    """

    kind: str
    prediction_type: str
    timesteps: np.ndarray
    init_noise_sigma: float
    c_in: np.ndarray
    x0_from_x: np.ndarray
    x0_from_m: np.ndarray
    next_from_x: np.ndarray
    next_from_x0: np.ndarray
    next_from_prev_x0: np.ndarray
    next_from_noise: np.ndarray

    def __post_init__(self) -> None:
        # Validation lives here so that tables read back from a manifest are checked exactly like fresh ones.
        if self.kind not in SAMPLERS:
            raise ManifestError(f"sampler kind {self.kind!r} is unknown; valid kinds: {', '.join(SAMPLERS)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ManifestError(
                f"sampler prediction_type {self.prediction_type!r} is unknown; "
                f"valid: {', '.join(PREDICTION_TYPES)}"
            )
        try:
            sigma0 = float(self.init_noise_sigma)
        except (TypeError, ValueError):
            raise ManifestError(f"sampler init_noise_sigma must be a number, got {self.init_noise_sigma!r}") from None
        if not math.isfinite(sigma0) or sigma0 <= 0:
            raise ManifestError(f"sampler init_noise_sigma must be a finite positive number, got {sigma0!r}")
        object.__setattr__(self, "init_noise_sigma", sigma0)
        n = None
        for name in _ARRAY_FIELDS:
            value = getattr(self, name)
            try:
                arr = np.array(value, dtype=np.float64)
            except (TypeError, ValueError):
                raise ManifestError(f"sampler table {name!r} must be a list of numbers") from None
            if arr.ndim != 1:
                raise ManifestError(f"sampler table {name!r} must be 1-D, got shape {arr.shape}")
            if n is None:
                n = arr.shape[0]
                if n < 1:
                    raise ManifestError("sampler tables are empty: a sampler needs at least one step")
            elif arr.shape[0] != n:
                raise ManifestError(
                    f"sampler table {name!r} has {arr.shape[0]} entries but 'timesteps' has {n}: "
                    "the manifest is corrupt or was edited; rebuild the artifact"
                )
            if not np.all(np.isfinite(arr)):
                raise ManifestError(f"sampler table {name!r} contains NaN or infinity")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        if self.next_from_prev_x0[0] != 0.0:
            raise ManifestError("sampler table 'next_from_prev_x0' must be 0 at step 0 (there is no previous x0)")

    # -- derived -------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def needs_noise(self) -> bool:
        """True when some step injects fresh noise (LCM): the runtime must then pass ``noise`` to :func:`step`."""
        return bool(np.any(self.next_from_noise != 0.0))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SamplerTables):
            return NotImplemented
        return (
            self.kind == other.kind
            and self.prediction_type == other.prediction_type
            and self.init_noise_sigma == other.init_noise_sigma
            and all(np.array_equal(getattr(self, f), getattr(other, f)) for f in _ARRAY_FIELDS)
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    # -- (de)serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able form for manifest.json. Python's json writes floats with ``repr``, so it round-trips exactly."""
        d: dict[str, Any] = {
            "version": TABLES_FORMAT_VERSION,
            "kind": self.kind,
            "prediction_type": self.prediction_type,
            "num_steps": self.num_steps,
            "init_noise_sigma": float(self.init_noise_sigma),
        }
        for name in _ARRAY_FIELDS:
            d[name] = [float(v) for v in getattr(self, name)]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SamplerTables:
        """Inverse of :meth:`to_dict`; raises :class:`~diffc.errors.ManifestError` on missing, extra or bad data."""
        if not isinstance(d, dict):
            raise ManifestError(f"sampler section of the manifest must be an object, got {type(d).__name__}")
        required = ("kind", "prediction_type", "init_noise_sigma") + _ARRAY_FIELDS
        missing = [k for k in required if k not in d]
        if missing:
            raise ManifestError(
                f"sampler section of the manifest lacks {', '.join(missing)}; rebuild the artifact with this diffc"
            )
        known = set(required) | {"version", "num_steps"}
        extra = sorted(set(d) - known)
        if extra:
            raise ManifestError(
                f"sampler section of the manifest has unknown keys {', '.join(map(str, extra))}; "
                "it was written by a different diffc version - rebuild the artifact or upgrade diffc"
            )
        version = d.get("version", TABLES_FORMAT_VERSION)
        if version != TABLES_FORMAT_VERSION:
            raise ManifestError(
                f"sampler tables format version {version!r} is not supported (this diffc reads "
                f"{TABLES_FORMAT_VERSION}); rebuild the artifact or upgrade diffc"
            )
        for name in _ARRAY_FIELDS:
            value = d[name]
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            ):
                raise ManifestError(f"sampler table {name!r} must be a list of numbers")
        if not isinstance(d["kind"], str) or not isinstance(d["prediction_type"], str):
            raise ManifestError("sampler 'kind' and 'prediction_type' must be strings")
        init = d["init_noise_sigma"]
        if not isinstance(init, (int, float)) or isinstance(init, bool):
            raise ManifestError(f"sampler init_noise_sigma must be a number, got {init!r}")
        tables = cls(
            kind=d["kind"],
            prediction_type=d["prediction_type"],
            init_noise_sigma=float(init),
            **{name: d[name] for name in _ARRAY_FIELDS},
        )
        if "num_steps" in d and d["num_steps"] != tables.num_steps:
            raise ManifestError(
                f"sampler num_steps is {d['num_steps']!r} but the tables have {tables.num_steps} entries"
            )
        return tables


# ==========================================================================================================
# Run time
# ==========================================================================================================
def step(tables: SamplerTables, i: int, x, m, prev_x0, noise=None) -> tuple[np.ndarray, np.ndarray]:
    """Apply step ``i`` of the generic update; returns ``(x_next, x0)`` in ``x``'s floating dtype.

    ``m`` is the model output for ``c_in[i] * x`` (after classifier-free guidance), ``prev_x0`` the ``x0``
    returned by the previous step (ignored at step 0 and wherever its coefficient is 0, so zeros or ``None``
    are fine there), ``noise`` a standard-normal array like ``x``, required only where
    ``next_from_noise[i] != 0`` (LCM, every step but the last).
    """
    n = tables.num_steps
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < n:
        raise InputError(f"sampler step index must be an integer in [0, {n}), got {i!r}")
    i = int(i)
    x = np.asarray(x)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)
    x = x.astype(dtype, copy=False)
    m = np.asarray(m, dtype=dtype)
    if m.shape != x.shape:
        raise InputError(f"model output shape {m.shape} does not match the latent shape {x.shape}")

    # Python floats are "weak" scalars in numpy: multiplying keeps x's dtype (float32 stays float32).
    x0 = m * float(tables.x0_from_m[i])
    x0 += x * float(tables.x0_from_x[i])

    x_next = x * float(tables.next_from_x[i])
    x_next += x0 * float(tables.next_from_x0[i])
    c_prev = float(tables.next_from_prev_x0[i])
    if c_prev != 0.0:
        if prev_x0 is None:
            raise InputError(f"sampler step {i} needs the previous step's x0 but prev_x0 is None")
        prev = np.asarray(prev_x0, dtype=dtype)
        if prev.shape != x.shape:
            raise InputError(f"prev_x0 shape {prev.shape} does not match the latent shape {x.shape}")
        x_next += prev * c_prev
    c_noise = float(tables.next_from_noise[i])
    if c_noise != 0.0:
        if noise is None:
            raise InputError(
                f"sampler {tables.kind!r} injects fresh noise at step {i}: pass a standard-normal array as noise"
            )
        nz = np.asarray(noise, dtype=dtype)
        if nz.shape != x.shape:
            raise InputError(f"noise shape {nz.shape} does not match the latent shape {x.shape}")
        x_next += nz * c_noise
    return x_next, x0


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """Numpy port of diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``.

    ``w`` is ``(B,)`` of ``guidance_scale - 1``; returns float32 ``(B, dim)`` for the UNet's ``timestep_cond``.
    diffusers computes it in float32 torch; the arguments of sin/cos reach ~1e4 (``w * 1000`` times a
    frequency), where one float32 ulp is ~1e-3, so a plain float64 evaluation would differ from it by up to
    ~1e-3. We therefore round every intermediate to float32 at the same points torch does and evaluate each
    transcendental function in float64 before rounding (correctly rounded). That reproduces torch's CPU result
    to float32 rounding for ~99% of the entries; the rest, where torch's float32 ``exp`` is itself 1 ulp off,
    differ by up to ~1e-3 - the precision the embedding has anyway (GPU kernels differ just as much).
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 4:
        # half_dim - 1 is a divisor: dim < 4 gives NaN in diffusers too
        raise InputError(f"guidance embedding dimension must be an integer >= 4, got {dim!r}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 1:
        raise InputError(f"guidance embedding input must be 1-D (one guidance value per batch item), got {w.shape}")
    dim = int(dim)
    w = w * _F32(1000.0)
    half = dim // 2
    c = _F32(np.log(np.float64(_F32(10000.0))))  # torch.log(torch.tensor(10000.0))
    c = _F32(c / _F32(half - 1))
    freqs = np.arange(half, dtype=np.float32) * -c  # float32 product
    freqs = np.exp(freqs.astype(np.float64)).astype(np.float32)
    args = (w[:, None] * freqs[None, :]).astype(np.float64)  # float32 product, then evaluated in float64
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1).astype(np.float32)
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb


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


# ==========================================================================================================
# Compile time: diffusers' float32 noise schedule, emulated bit for bit
# ==========================================================================================================
def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    torch computes ``step = (end - start) / (steps - 1)`` in float32 and fills the first half as
    ``start + step * i`` and the second half as ``end - step * (steps - 1 - i)`` with a fused multiply-add.
    ``step * i`` is exact in float64 (24-bit times <=31-bit integer), so float64 then one rounding = the FMA.
    ``np.linspace(...).astype(float32)`` differs from it in ~30% of the entries.
    """
    s = _F32(start)
    e = _F32(end)
    if steps == 1:
        return np.array([s], dtype=np.float32)
    delta = _F32(_F32(e - s) / _F32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    half = steps // 2
    out = np.empty(steps, dtype=np.float64)
    out[:half] = np.float64(s) + np.float64(delta) * idx[:half]
    out[half:] = np.float64(e) - np.float64(delta) * (steps - 1 - idx[half:])
    return out.astype(np.float32)


def _torch_cumprod_f32(a: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 CPU tensor: torch accumulates in double and rounds each output to float32."""
    return np.cumprod(a.astype(np.float64)).astype(np.float32)


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers ``betas_for_alpha_bar`` (cosine, "squaredcos_cap_v2"): Python floats, then float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=np.float32
    )


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers ``rescale_zero_terminal_snr`` (arXiv 2305.08891, Algorithm 1) with torch's float32 rounding."""
    alphas = _F32(1.0) - betas
    abar_sqrt = np.sqrt(_torch_cumprod_f32(alphas))
    s0 = abar_sqrt[0]
    s_t = abar_sqrt[-1]
    abar_sqrt = abar_sqrt - s_t
    abar_sqrt = abar_sqrt * _F32(s0 / _F32(s0 - s_t))
    abar = abar_sqrt * abar_sqrt
    alphas = np.concatenate([abar[0:1], abar[1:] / abar[:-1]])
    return (_F32(1.0) - alphas).astype(np.float32)


def _alphas_cumprod(cfg: dict, patch_zero_snr_terminal: bool) -> np.ndarray:
    """The float32 ``alphas_cumprod`` a diffusers discrete scheduler builds in ``__init__``.

    ``patch_zero_snr_terminal``: Euler and DPM-Solver replace the last entry by 2**-24 when rescaling to zero
    terminal SNR (so that sigma stays finite); DDIM and LCM keep the exact 0.
    """
    n = cfg["num_train_timesteps"]
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float32)
        if betas.ndim != 1 or betas.shape[0] != n:
            raise ProfileError(
                f"scheduler config 'trained_betas' has {betas.size} values but num_train_timesteps is {n}; "
                "make them agree"
            )
    elif cfg["beta_schedule"] == "linear":
        betas = _torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":
        b = _torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n)
        betas = b * b
    elif cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(n)
    else:
        raise ProfileError(
            f"scheduler config beta_schedule {cfg['beta_schedule']!r} is not supported; "
            "use one of 'linear', 'scaled_linear', 'squaredcos_cap_v2' (or give trained_betas)"
        )
    if cfg.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    ac = _torch_cumprod_f32(_F32(1.0) - betas)
    if cfg.get("rescale_betas_zero_snr") and patch_zero_snr_terminal:
        ac[-1] = _F32(2.0**-24)
    return ac


def _sigma_table_f32(ac: np.ndarray) -> np.ndarray:
    """``((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`` in float32, as Euler/DPM-Solver compute it."""
    return np.sqrt((_F32(1.0) - ac) / ac).astype(np.float32)


# ==========================================================================================================
# Compile time: config handling
# ==========================================================================================================
def _sigmas_at(ac: np.ndarray, t: np.ndarray, final_sigmas_type: str) -> np.ndarray:
    """float32 sigmas at (possibly fractional) timesteps ``t``, plus the final sigma, as Euler and DPM compute them."""
    table = _sigma_table_f32(ac)
    sig = np.interp(t, np.arange(0, len(table)), table)
    if final_sigmas_type == "sigma_min":
        last = float(_sigma_table_f32(ac[:1])[0])
    elif final_sigmas_type == "zero":
        last = 0.0
    else:
        raise ProfileError(
            f"scheduler config final_sigmas_type {final_sigmas_type!r} is not supported; use 'zero' or 'sigma_min'"
        )
    return np.concatenate([sig, [last]]).astype(np.float32)


def _resolve_config(kind: str, scheduler_config: dict) -> dict:
    """Fill the keys the kind's diffusers class reads, the way ``ThatScheduler.from_config(cfg)`` would.

    Keys listed in ``_use_default_values`` (present in in-memory ``scheduler.config`` dicts) were defaults of
    the class that wrote them, and diffusers drops them so the target class uses its own defaults; so do we.
    """
    if not isinstance(scheduler_config, dict):
        raise ProfileError(
            f"scheduler config must be a dict (the content of scheduler/scheduler_config.json), "
            f"got {type(scheduler_config).__name__}"
        )
    used_defaults = set(scheduler_config.get("_use_default_values") or ())
    cls = _KIND_CLASS[kind]
    cfg = dict(_CLASS_DEFAULTS[cls])
    for key in cfg:
        if key in scheduler_config and key not in used_defaults:
            cfg[key] = scheduler_config[key]

    source_cls = scheduler_config.get("_class_name")
    if isinstance(source_cls, str):
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

    n_train = cfg["num_train_timesteps"]
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 2:
        raise ProfileError(f"scheduler config num_train_timesteps must be an integer >= 2, got {n_train!r}")
    if "timestep_spacing" in cfg and cfg["timestep_spacing"] not in ("leading", "linspace", "trailing"):
        raise ProfileError(
            f"scheduler config timestep_spacing {cfg['timestep_spacing']!r} is not supported; "
            "use 'leading', 'linspace' or 'trailing'"
        )
    if "steps_offset" in cfg and (isinstance(cfg["steps_offset"], bool) or not isinstance(cfg["steps_offset"], int)):
        raise ProfileError(f"scheduler config steps_offset must be an integer, got {cfg['steps_offset']!r}")
    return cfg


def _require_false(cfg: dict, kind: str, *keys: str, why: str = "") -> None:
    for key in keys:
        if cfg.get(key):
            raise ProfileError(
                f"scheduler config sets {key}={cfg[key]!r}, which diffc's {kind!r} sampler does not implement"
                f"{why}; set \"{key}\": false in scheduler_config.json (or choose another sampler)"
            )


def _prediction_type(cfg: dict, kind: str, allowed: tuple[str, ...]) -> str:
    pt = cfg["prediction_type"]
    if pt == "original_sample":  # Euler's alias for "sample"
        pt = "sample"
    if pt not in allowed:
        raise ProfileError(
            f"scheduler config prediction_type {cfg['prediction_type']!r} is not supported by the {kind!r} "
            f"sampler; supported: {', '.join(allowed)}"
        )
    return pt


def _spaced_timesteps(spacing: str, n_train: int, n: int, steps_offset: int, kind: str) -> np.ndarray:
    """DDIM's / Euler's ``set_timesteps`` spacing (float64 values; callers cast as their class does)."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n)[::-1].copy()  # DDIM rounds it, Euler keeps it fractional
    if spacing == "leading":
        ratio = n_train // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float64) + steps_offset
    # trailing
    ratio = n_train / n
    t = np.round(np.arange(n_train, 0, -ratio)) - 1
    _check_count(t, n, "trailing", kind)
    return t


def _check_count(t: np.ndarray, n: int, spacing: str, kind: str) -> None:
    # np.arange with a fractional step can yield one extra (negative) timestep, e.g. 1000/61; diffusers then
    # silently runs a broken schedule. Refuse it with a clear message instead.
    if t.shape[0] != n or np.any(t < 0):
        raise ProfileError(
            f"diffusers' {spacing!r} timestep spacing yields {t.shape[0]} timesteps ({t.astype(np.int64).tolist()}) "
            f"for num_steps={n} with the {kind!r} sampler; choose another num_steps"
        )


def _check_num_steps(num_steps: int, n_train: int) -> None:
    if num_steps > n_train:
        raise ProfileError(
            f"num_steps={num_steps} is larger than the model's num_train_timesteps={n_train}; use fewer steps"
        )


# ==========================================================================================================
# Compile time: the samplers
# ==========================================================================================================
def _eps_x0_coeffs(pt: str, a: float) -> tuple[float, float]:
    """x0 = cx * x + cm * m for a discrete (alpha_bar) schedule at alphas_cumprod ``a``."""
    sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
    if pt == "epsilon":  # x0 = (x - sqrt(1 - a) eps) / sqrt(a)
        return (1.0 / sa if sa > 0 else math.inf), (-sb / sa if sa > 0 else -math.inf)
    if pt == "v_prediction":  # x0 = sqrt(a) x - sqrt(1 - a) v
        return sa, -sb
    return 0.0, 1.0  # sample


def _compile_ddim(cfg: dict, n: int) -> dict:
    """``DDIMScheduler.step`` with eta=0.

    diffusers: ``prev_sample = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps`` where ``eps`` is the model's noise
    prediction re-derived for v/sample models. Writing ``eps = (x - sqrt(a) x0) / sqrt(1 - a)`` (true for all
    three prediction types) puts it in the generic form. Two diffusers details reproduced on purpose:
    ``a_prev`` is read at ``t - num_train_timesteps // num_steps`` (not at the next timestep, which differs for
    "trailing"/"linspace" spacings), and a negative previous timestep uses ``final_alpha_cumprod`` (1 when
    ``set_alpha_to_one`` else ``alphas_cumprod[0]``).
    """
    _require_false(cfg, "ddim", "thresholding")
    _require_false(
        cfg, "ddim", "clip_sample", why=" (DDIMScheduler clips x0 by default when the config does not say)"
    )
    pt = _prediction_type(cfg, "ddim", ("epsilon", "v_prediction", "sample"))
    n_train = cfg["num_train_timesteps"]
    _check_num_steps(n, n_train)
    ac = _alphas_cumprod(cfg, patch_zero_snr_terminal=False).astype(np.float64)
    final_ac = 1.0 if cfg["set_alpha_to_one"] else float(ac[0])

    t = _spaced_timesteps(cfg["timestep_spacing"], n_train, n, cfg["steps_offset"], "ddim")
    if cfg["timestep_spacing"] == "linspace":
        t = t.round()
    t = t.astype(np.int64)
    if np.any(t >= n_train) or np.any(t < 0):
        raise ProfileError(
            f"timesteps {t.tolist()} fall outside [0, {n_train}) (steps_offset={cfg['steps_offset']}); "
            "fix steps_offset or timestep_spacing in the scheduler config"
        )
    rows = []
    for ti in t:
        prev_t = int(ti) - n_train // n
        a = float(ac[ti])
        ap = float(ac[prev_t]) if prev_t >= 0 else final_ac
        cx, cm = _eps_x0_coeffs(pt, a)
        sb = math.sqrt(1.0 - a)
        k = math.sqrt(1.0 - ap) / sb  # eps coefficient, spread over x and x0
        rows.append((1.0, cx, cm, k, math.sqrt(ap) - k * math.sqrt(a), 0.0, 0.0))
    return {"prediction_type": pt, "timesteps": t.astype(np.float64), "init_noise_sigma": 1.0, "rows": rows}


def _euler_sigmas(cfg: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``EulerDiscreteScheduler.set_timesteps``: float32 timesteps, float32 sigmas (with the final one)."""
    n_train = cfg["num_train_timesteps"]
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        t = np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].copy()
    else:
        t = _spaced_timesteps(spacing, n_train, n, 0, "euler").astype(np.float32)
        if spacing == "leading":
            t += _F32(cfg["steps_offset"])
    if np.any(t > n_train - 1) or np.any(t < 0):
        raise ProfileError(
            f"timesteps {t.tolist()} fall outside [0, {n_train - 1}] (steps_offset={cfg['steps_offset']}); "
            "fix steps_offset or timestep_spacing in the scheduler config"
        )
    ac = _alphas_cumprod(cfg, patch_zero_snr_terminal=True)
    sigmas = _sigmas_at(ac, t, cfg["final_sigmas_type"])
    return t, sigmas


def _compile_euler(cfg: dict, n: int) -> dict:
    """``EulerDiscreteScheduler.step`` with s_churn=0 (so sigma_hat = sigma).

    diffusers: ``x_next = x + (x - x0) / sigma * (sigma_next - sigma)``, i.e.
    ``x_next = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * x0``; the model sees
    ``x / sqrt(sigma^2 + 1)`` (``scale_model_input``). ``init_noise_sigma`` is ``max(sigmas)`` for
    "linspace"/"trailing" and ``sqrt(max(sigmas)^2 + 1)`` for "leading", as diffusers' property computes it.
    With ``timestep_type="continuous"`` and v-prediction the model's timestep is ``0.25 * log(sigma)``.
    """
    if cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"] or cfg["use_beta_sigmas"]:
        raise ProfileError(
            "scheduler config enables use_karras_sigmas/use_exponential_sigmas/use_beta_sigmas, which diffc's "
            "'euler' sampler does not implement; set them to false in scheduler_config.json"
        )
    if cfg["interpolation_type"] != "linear":
        raise ProfileError(
            f"scheduler config interpolation_type {cfg['interpolation_type']!r} is not supported by diffc's "
            "'euler' sampler; set \"interpolation_type\": \"linear\""
        )
    pt = _prediction_type(cfg, "euler", ("epsilon", "v_prediction", "sample"))
    _check_num_steps(n, cfg["num_train_timesteps"])
    t32, sigmas = _euler_sigmas(cfg, n)
    if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
        # torch.Tensor([0.25 * sigma.log() ...]): float32 log, float32 product
        timesteps = (_F32(0.25) * np.log(sigmas[:-1].astype(np.float64)).astype(np.float32)).astype(np.float64)
    else:
        timesteps = t32.astype(np.float64)
    sig = sigmas.astype(np.float64)
    if np.any(sig[:-1] <= 0):
        raise ProfileError(f"Euler sigmas {sig.tolist()} reach 0 before the last step; check the scheduler config")
    max_sigma = float(sig.max())
    init = max_sigma if cfg["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(max_sigma**2 + 1.0)
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
    return {"prediction_type": pt, "timesteps": timesteps, "init_noise_sigma": init, "rows": rows}


def _compile_dpmpp_2m(cfg: dict, n: int) -> dict:
    """``DPMSolverMultistepScheduler`` with algorithm_type "dpmsolver++", solver_order 2.

    The model output is first converted to a data prediction x0 (``convert_model_output``), with
    ``alpha_t = 1/sqrt(sigma^2+1)``, ``sigma_t = sigma * alpha_t`` and ``lambda = log(alpha_t / sigma_t)``:

    * first order (step 0, and the final step: diffusers forces it when ``final_sigmas_type="zero"``, when
      ``euler_at_final``, or when ``lower_order_final`` and fewer than 15 steps):
      ``x_next = (sigma_t/sigma_s) x - alpha_t (exp(-h) - 1) x0`` with ``h = lambda_t - lambda_s``;
    * second order otherwise, with ``D1 = (x0 - prev_x0) / r0``, ``r0 = h_prev / h``:
      midpoint adds ``-0.5 alpha_t (exp(-h) - 1) D1``, heun adds ``alpha_t ((exp(-h) - 1)/h + 1) D1``.

    When the next sigma is 0 (the last step with final_sigmas_type "zero") ``h`` is infinite and the update
    reduces to ``x_next = x0``, which is written directly instead of evaluating ``log(0)``.
    The kind is second order by definition: a config's ``solver_order`` is not used.
    """
    algo = cfg["algorithm_type"]
    if algo == "deis":  # diffusers maps it to dpmsolver++
        algo = "dpmsolver++"
    if algo != "dpmsolver++":
        raise ProfileError(
            f"scheduler config algorithm_type {cfg['algorithm_type']!r} is not supported by diffc's 'dpmpp_2m' "
            "sampler; set \"algorithm_type\": \"dpmsolver++\""
        )
    solver_type = cfg["solver_type"]
    if solver_type in ("logrho", "bh1", "bh2"):  # diffusers maps these to midpoint
        solver_type = "midpoint"
    if solver_type not in ("midpoint", "heun"):
        raise ProfileError(
            f"scheduler config solver_type {cfg['solver_type']!r} is not supported; use 'midpoint' or 'heun'"
        )
    if cfg["solver_order"] != 2:
        logger.info("dpmpp_2m: ignoring solver_order=%r from the scheduler config (dpmpp_2m is second order)",
                    cfg["solver_order"])
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                "use_flow_sigmas", "thresholding"):
        _require_false(cfg, "dpmpp_2m", key)
    if cfg["variance_type"] in ("learned", "learned_range"):
        raise ProfileError(
            f"scheduler config variance_type {cfg['variance_type']!r} (a model that also predicts its variance) "
            "is not supported by diffc's samplers"
        )
    pt = _prediction_type(cfg, "dpmpp_2m", ("epsilon", "v_prediction", "sample"))
    n_train = cfg["num_train_timesteps"]
    _check_num_steps(n, n_train)
    ac = _alphas_cumprod(cfg, patch_zero_snr_terminal=True)

    # set_timesteps: lambda_min_clipped trims the high-noise end (torch.searchsorted on the flipped lambdas)
    lam32 = (
        np.log(np.sqrt(ac).astype(np.float64)).astype(np.float32)
        - np.log(np.sqrt(_F32(1.0) - ac).astype(np.float64)).astype(np.float32)
    )
    clipped_idx = int(np.searchsorted(lam32[::-1], cfg["lambda_min_clipped"], side="left"))
    last_t = n_train - clipped_idx
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        t = np.linspace(0, last_t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last_t // (n + 1)
        t = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg["steps_offset"]
    else:
        ratio = n_train / n
        t = np.arange(last_t, 0, -ratio).round().astype(np.int64) - 1
        _check_count(t, n, "trailing", "dpmpp_2m")
    if np.any(t >= n_train) or np.any(t < 0) or len(np.unique(t)) != n:
        raise ProfileError(
            f"the 'dpmpp_2m' timesteps for num_steps={n} are {t.tolist()}: out of range or repeated; "
            "use fewer steps or check steps_offset/lambda_min_clipped"
        )
    sigmas = _sigmas_at(ac, t, cfg["final_sigmas_type"]).astype(np.float64)

    def alpha_sigma(s: float) -> tuple[float, float]:
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
        else:
            cx, cm = 0.0, 1.0
        lower_order_final = i == n - 1 and (
            cfg["euler_at_final"]
            or (cfg["lower_order_final"] and n < 15)
            or cfg["final_sigmas_type"] == "zero"
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
        h_0 = lam(s0) - lam(float(sigmas[i - 1]))
        r0 = h_0 / h
        if solver_type == "midpoint":
            d1 = 0.5 * a_coef  # coefficient of D1
        else:
            d1 = alpha_t * (math.expm1(-h) / h + 1.0)
        rows.append((1.0, cx, cm, nx, a_coef + d1 / r0, -d1 / r0, 0.0))
    return {"prediction_type": pt, "timesteps": t.astype(np.float64), "init_noise_sigma": 1.0, "rows": rows}


def _compile_lcm(cfg: dict, n: int) -> dict:
    """``LCMScheduler`` multi-step consistency sampling.

    diffusers: ``denoised = c_out * x0_pred + c_skip * x`` with the boundary-condition scalings
    ``c_skip = 0.25 / (s^2 + 0.25)``, ``c_out = s / sqrt(s^2 + 0.25)``, ``s = timestep * timestep_scaling``
    (sigma_data = 0.5), folded here into ``x0_from_x``/``x0_from_m`` (x0 *is* LCM's ``denoised``). Then
    ``x_next = sqrt(a_prev) * denoised + sqrt(1 - a_prev) * noise`` with ``a_prev`` at the next timestep,
    except on the last step where ``x_next = denoised`` (no noise). Timesteps: the ``original_inference_steps``
    distillation grid ``k*i - 1`` (``k = num_train_timesteps // original_inference_steps``), reversed, then
    ``num_steps`` of them picked at ``floor(linspace(0, len, num_steps, endpoint=False))``.
    """
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
    k = n_train // orig
    origin = (np.arange(1, orig + 1) * k - 1)[::-1].copy()
    idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    t = origin[idx].astype(np.int64)
    ac = _alphas_cumprod(cfg, patch_zero_snr_terminal=False).astype(np.float64)
    scaling = float(cfg["timestep_scaling"])
    rows = []
    for i in range(n):
        ti = int(t[i])
        last = i == n - 1
        a = float(ac[ti])
        ap = float(ac[int(t[i + 1])]) if not last else a
        sc = ti * scaling
        c_skip = 0.25 / (sc * sc + 0.25)
        c_out = sc / math.sqrt(sc * sc + 0.25)
        px, pm = _eps_x0_coeffs(pt, a)
        cx, cm = c_out * px + c_skip, c_out * pm
        if last:
            rows.append((1.0, cx, cm, 0.0, 1.0, 0.0, 0.0))
        else:
            rows.append((1.0, cx, cm, 0.0, math.sqrt(ap), 0.0, math.sqrt(1.0 - ap)))
    return {"prediction_type": pt, "timesteps": t.astype(np.float64), "init_noise_sigma": 1.0, "rows": rows}


def _compile_flow_euler(cfg: dict, n: int) -> dict:
    """``FlowMatchEulerDiscreteScheduler`` with a static shift.

    diffusers: ``x_next = x + (sigma_next - sigma) * v``. With ``x0 = x - sigma * v`` (the flow-matching data
    prediction) that is ``x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) x0``. Sigmas reproduce
    ``set_timesteps``: a float64 linspace between ``sigma_max * T`` and ``sigma_min * T`` - where
    ``sigma_min`` is the *already shifted* float32 ``__init__`` value - divided by T, shifted (again)
    ``shift * s / (1 + (shift - 1) * s)``, optionally stretched to ``shift_terminal``, rounded to float32; the
    model's timestep is ``sigma * T`` in float32. The model input is not scaled and the initial noise is not
    scaled (no ``init_noise_sigma``).
    """
    if cfg["use_dynamic_shifting"]:
        raise ProfileError(
            "scheduler config sets use_dynamic_shifting=true (resolution-dependent shift, e.g. Flux/SD3.5); "
            "diffc's 'flow_euler' sampler compiles one fixed shift - set \"use_dynamic_shifting\": false and "
            "\"shift\" to the value for your resolution"
        )
    for key in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "stochastic_sampling"):
        _require_false(cfg, "flow_euler", key)
    n_train = cfg["num_train_timesteps"]
    shift = cfg["shift"]
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
        raise ProfileError(f"scheduler config shift must be a positive number, got {shift!r}")
    shift = float(shift)
    # __init__ (float32 torch): sigma_max = shifted(1) = 1, sigma_min = shifted(1 / T)
    s_lo = _F32(_F32(1.0) / _F32(n_train))
    sigma_min = float(_F32(_F32(_F32(shift) * s_lo) / _F32(_F32(1.0) + _F32(_F32(shift - 1.0) * s_lo))))
    sigma_max = float(_F32(_F32(shift) / _F32(_F32(1.0) + _F32(shift - 1.0))))
    ts = np.linspace(sigma_max * n_train, sigma_min * n_train, n)
    s = ts / n_train
    s = shift * s / (1 + (shift - 1) * s)
    if cfg["shift_terminal"]:
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - cfg["shift_terminal"]))
    if not np.all(np.isfinite(s)):
        # e.g. shift_terminal with num_steps=1: diffusers divides 0 by 0 and samples with NaN sigmas
        raise ProfileError(
            f"flow sigmas for num_steps={n} are not finite ({s.tolist()}); with shift_terminal use num_steps >= 2"
        )
    s32 = s.astype(np.float32)
    timesteps = (s32 * _F32(n_train)).astype(np.float64)
    sig = np.concatenate([s32, np.zeros(1, np.float32)]).astype(np.float64)
    if np.any(sig[:-1] <= 0):
        raise ProfileError(f"flow sigmas {sig.tolist()} reach 0 before the last step; check shift/shift_terminal")
    rows = []
    for i in range(n):
        r = sig[i + 1] / sig[i]
        rows.append((1.0, 1.0, -sig[i], r, 1.0 - r, 0.0, 0.0))
    return {"prediction_type": "flow", "timesteps": timesteps, "init_noise_sigma": 1.0, "rows": rows}


_COMPILERS = {
    "ddim": _compile_ddim,
    "euler": _compile_euler,
    "dpmpp_2m": _compile_dpmpp_2m,
    "lcm": _compile_lcm,
    "flow_euler": _compile_flow_euler,
}


def compile_sampler(kind: str, scheduler_config: dict, num_steps: int) -> SamplerTables:
    """Compile sampler ``kind`` for a diffusers scheduler config and a fixed number of steps.

    ``scheduler_config`` is the dict in a pipeline's ``scheduler/scheduler_config.json`` - from any scheduler
    class: keys the kind's diffusers class does not have are ignored, keys it has but the config lacks take
    that class's defaults (see :func:`_resolve_config`). Raises :class:`~diffc.errors.ProfileError` for an
    unknown kind, a bad step count, or a config option the sampler does not reproduce (the message says
    which key to change).
    """
    if kind not in SAMPLERS:
        raise ProfileError(f"sampler {kind!r} is unknown; valid samplers: {', '.join(SAMPLERS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ProfileError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    num_steps = int(num_steps)
    cfg = _resolve_config(kind, scheduler_config)
    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out = _COMPILERS[kind](cfg, num_steps)
    except (TypeError, ValueError, KeyError) as exc:  # malformed config values (strings for numbers, ...)
        raise ProfileError(f"scheduler config is not usable for the {kind!r} sampler: {exc}") from exc
    rows = np.asarray(out["rows"], dtype=np.float64).reshape(num_steps, len(_COEFF_FIELDS))
    if not np.all(np.isfinite(rows)):
        bad = sorted({_COEFF_FIELDS[j] for j in np.nonzero(~np.isfinite(rows))[1]})
        raise ProfileError(
            f"sampler {kind!r} with this scheduler config and num_steps={num_steps} has non-finite coefficients "
            f"({', '.join(bad)}). The usual cause is rescale_betas_zero_snr=true with prediction_type "
            "'epsilon': x0 is undefined at zero SNR - zero-SNR schedules need a v_prediction model"
        )
    tables = SamplerTables(
        kind=kind,
        prediction_type=out["prediction_type"],
        timesteps=out["timesteps"],
        init_noise_sigma=float(out["init_noise_sigma"]),
        **{name: rows[:, j] for j, name in enumerate(_COEFF_FIELDS)},
    )
    n_train = cfg["num_train_timesteps"]
    if kind != "flow_euler" and tables.timesteps[0] < 0.75 * (n_train - 1):
        logger.warning(
            "sampler %s with timestep_spacing %r and %d step(s) starts at timestep %g of %d although its input is "
            "pure noise (diffusers does the same), which gives noisy or washed-out images; for few-step sampling "
            "set \"timestep_spacing\": \"trailing\" in the scheduler config",
            kind, cfg.get("timestep_spacing"), num_steps, tables.timesteps[0], n_train,
        )
    logger.debug(
        "compiled sampler %s (%s) for %d steps: timesteps=%s init_noise_sigma=%.6g",
        kind, tables.prediction_type, num_steps, tables.timesteps.tolist(), tables.init_noise_sigma,
    )
    return tables
