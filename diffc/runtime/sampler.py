"""Few-step samplers as tables: one generic update that reproduces several diffusers schedulers.

At build time :func:`diffc.exporter.sampler.compile_sampler` instantiates the pipeline's diffusers scheduler,
calls ``set_timesteps`` the way the pipeline's ``__call__`` does and "compiles" the chosen sampler into a
:class:`SamplerTables`: the fixed timesteps plus, for every step ``i``, a handful of float64 coefficients. At run
time (numpy only, no torch, no diffusers) every sampler is the same few lines::

    model_input = c_in[i] * x                                  # fed to the denoiser with timestep timesteps[i]
    x0          = x0_from_x[i] * x + x0_from_m[i] * m          # m = model output after classifier-free guidance
    if i is the first step the loop runs: prev_x0 = x0         # (see "entry" below)
    x_next      = (next_from_x[i] * x + next_from_x0[i] * x0
                   + next_from_prev_x0[i] * prev_x0 + next_from_noise[i] * noise_i)
    prev_x0     = x0

with ``x = init_noise_sigma * randn`` at the start of text-to-image. ``x0`` is always a *data* prediction (the
denoised latent), which is what lets one form serve epsilon-, v-, sample-, flow- and trigflow-predicting models
alike: the prediction type only changes ``x0_from_x``/``x0_from_m``.

Supported kinds (:data:`SAMPLERS`): ``ddim``, ``euler``, ``dpmpp_2m`` (also DPM-Solver++ on flow sigmas with a
flow-predicting model: Sana), ``lcm``, ``flow_euler`` (SD3 / FLUX.1 / FLUX.2, static or resolution-dependent
shift), ``scm`` (Sana-Sprint's trigflow consistency sampler); the diffusers class each one reproduces is listed
in :data:`diffc.exporter.sampler.KIND_CLASS`.

What a runner does besides the loop above:

* **Resolution-dependent shift** (FLUX, SD3.5 with ``use_dynamic_shifting``): tables that carry a
  :class:`DynamicShift` hold coefficients for one image sequence length only (``dynamic_shift.image_seq_len``).
  Call :meth:`SamplerTables.for_image_seq_len` with the request's sequence length (FLUX: the number of packed
  2x2 latent patches, ``(H/16) * (W/16)``; SD3: ``(H/8/patch) * (W/8/patch)``) before the loop; it recomputes
  ``mu``, the shifted sigmas and every coefficient in numpy exactly as diffusers does, and returns ``self`` for
  static tables.
* **The timestep a denoiser gets** is ``timesteps[i]`` as diffusers' scheduler holds it (``sigma * 1000`` for
  flow matching, integers for the discrete schedules, ``sin(s) / (sin(s) + cos(s))`` for ``scm``). Pipelines that
  rescale it around the model do so outside the tables: FLUX passes ``float32(timesteps[i]) / 1000``, Sana
  multiplies by the transformer's ``timestep_scale``.
* **Image-to-image** (:meth:`SamplerTables.img2img`, :meth:`SamplerTables.add_noise`, :func:`start_step`):
  ``tables, k = tables.img2img(strength)``; the loop is entered at step ``k`` with
  ``x = noise_signal[k] * x0 + noise_scale[k] * noise`` (x0: the VAE-encoded, scaled image latents; noise:
  standard normal), which is each scheduler's ``add_noise`` / ``scale_noise`` at ``timesteps[k]`` in the space
  ``step`` works in (Euler's ``x0 + sigma * noise``, not divided by anything). For most tables ``img2img``
  returns them unchanged with ``k = start_step(num_steps, strength, rule=tables.strength_rule)`` (the
  pipeline skips the first steps); LCM pipelines' tables (with :class:`LcmStrength`) are instead recomputed for
  the strength and entered at 0, as ``LatentConsistencyModelImg2ImgPipeline`` does. Tables from manifests
  written before image-to-image existed lack the two arrays; ``add_noise`` then raises a ManifestError that
  says to rebuild.
* **Entry**: at the first step a loop runs (step 0 for text-to-image, ``k`` for image-to-image) there is no
  previous x0. diffusers' multistep DPM-Solver then takes a first-order step, which is exactly the update above
  with ``prev_x0 = x0``; every other kind has ``next_from_prev_x0 = 0`` and is unaffected. :func:`step` does
  this when called with ``entry=True``.

Only numpy is imported here on purpose: this file ships in the torch-free runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffc.errors import InputError, ManifestError

__all__ = [
    "COEFF_FIELDS",
    "SAMPLERS",
    "PREDICTION_TYPES",
    "STRENGTH_RULES",
    "DynamicShift",
    "LcmStrength",
    "SamplerTables",
    "discrete_x0_coeffs",
    "flow_euler_rows",
    "lcm_rows",
    "step",
    "start_step",
    "guidance_embedding",
]

#: every sampler kind the tables can describe
SAMPLERS = ("ddim", "euler", "dpmpp_2m", "lcm", "flow_euler", "scm")

#: what the denoiser predicts; ``"flow"`` is a velocity ``v = noise - x0`` (flow matching), ``"trigflow"`` the
#: TrigFlow velocity of sCM models (Sana-Sprint), whose pipeline rescales it around the model
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow", "trigflow")

#: how diffusers' image-to-image pipelines turn ``strength`` into a start step (see :func:`start_step`)
STRENGTH_RULES = ("truncate_steps", "truncate_start")

#: version of the dict written by :meth:`SamplerTables.to_dict`. The image-to-image arrays and the dynamic shift
#: are optional keys: version-1 readers refuse them as unknown keys (asking for an upgrade), and this reader
#: accepts tables without them.
TABLES_FORMAT_VERSION = 1

#: the per-step coefficients of the generic update, in the order the compiler fills them
COEFF_FIELDS = (
    "c_in",
    "x0_from_x",
    "x0_from_m",
    "next_from_x",
    "next_from_x0",
    "next_from_prev_x0",
    "next_from_noise",
)
#: per-step arrays for image-to-image, optional (absent in artifacts built before them)
NOISE_FIELDS = ("noise_signal", "noise_scale")
_ARRAY_FIELDS = ("timesteps",) + COEFF_FIELDS

_F32 = np.float32


def _check_array(name: str, value: Any, n: int | None) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ManifestError(f"sampler table {name!r} must be a list of numbers") from None
    if arr.ndim != 1:
        raise ManifestError(f"sampler table {name!r} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ManifestError(
            f"sampler table {name!r} has {arr.shape[0]} entries but 'timesteps' has {n}: "
            "the manifest is corrupt or was edited; rebuild the artifact"
        )
    if not np.all(np.isfinite(arr)):
        raise ManifestError(f"sampler table {name!r} contains NaN or infinity")
    arr.setflags(write=False)
    return arr


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ==========================================================================================================
# Resolution-dependent shift (FLUX, SD3.5): diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps in numpy
# ==========================================================================================================
#: how ``mu`` follows from the image sequence length: ``"linear"`` is diffusers' ``calculate_shift`` (FLUX.1,
#: SD3), ``"flux2_empirical"`` its ``compute_empirical_mu`` (FLUX.2, which also depends on the step count)
MU_RULES = ("linear", "flux2_empirical")
_DYNAMIC_KEYS = ("mu_rule", "time_shift_type", "sigmas", "sigmas_dtype", "base_image_seq_len", "max_image_seq_len",
                 "base_shift", "max_shift", "shift_terminal", "num_train_timesteps", "image_seq_len")


@dataclass(frozen=True, eq=False)
class DynamicShift:
    """What FLUX-style pipelines feed ``FlowMatchEulerDiscreteScheduler.set_timesteps`` for one image size.

    ``sigmas`` are the unshifted per-step sigmas (FLUX: ``linspace(1, 1/N, N)`` as float32; SD3: diffusers'
    default ``linspace(t_max, t_min, N) / num_train_timesteps`` as float64); diffusers shifts them in that
    precision (``sigmas_dtype``) and then rounds them to float32, and so does :meth:`sigmas_for`, which is why
    the result is diffusers' bit for bit. ``image_seq_len`` is the size the owning tables' coefficients are for.
    """

    mu_rule: str
    time_shift_type: str
    sigmas: np.ndarray
    sigmas_dtype: str
    base_image_seq_len: float
    max_image_seq_len: float
    base_shift: float
    max_shift: float
    shift_terminal: float | None
    num_train_timesteps: int
    image_seq_len: int

    def __post_init__(self) -> None:
        if self.mu_rule not in MU_RULES:
            raise ManifestError(f"dynamic_shift.mu_rule {self.mu_rule!r} is unknown; valid: {', '.join(MU_RULES)}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ManifestError(f"dynamic_shift.time_shift_type {self.time_shift_type!r} must be 'exponential' or "
                                "'linear'")
        if self.sigmas_dtype not in ("float32", "float64"):
            raise ManifestError(f"dynamic_shift.sigmas_dtype {self.sigmas_dtype!r} must be 'float32' or 'float64'")
        arr = _check_array("dynamic_shift.sigmas", self.sigmas, None)
        if arr.shape[0] < 1 or np.any(arr <= 0) or np.any(arr > 1):
            raise ManifestError("dynamic_shift.sigmas must hold at least one value in (0, 1]")
        object.__setattr__(self, "sigmas", arr)
        for key in ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift"):
            v = getattr(self, key)
            if not _is_number(v) or not math.isfinite(v):
                raise ManifestError(f"dynamic_shift.{key} must be a finite number, got {v!r}")
        if self.mu_rule == "linear" and self.max_image_seq_len == self.base_image_seq_len:
            raise ManifestError("dynamic_shift.max_image_seq_len must differ from base_image_seq_len")
        st = self.shift_terminal
        if st is not None and (not _is_number(st) or not 0 <= st < 1):
            raise ManifestError(f"dynamic_shift.shift_terminal must be null or in [0, 1), got {st!r}")
        for key in ("num_train_timesteps", "image_seq_len"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ManifestError(f"dynamic_shift.{key} must be an integer >= 1, got {v!r}")
            object.__setattr__(self, key, int(v))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DynamicShift):
            return NotImplemented
        return all(np.array_equal(getattr(self, k), getattr(other, k)) if k == "sigmas"
                   else getattr(self, k) == getattr(other, k) for k in _DYNAMIC_KEYS)

    __hash__ = None  # type: ignore[assignment]

    def mu(self, image_seq_len: int) -> float:
        """diffusers' ``calculate_shift`` / ``compute_empirical_mu``, operation for operation (Python floats)."""
        if self.mu_rule == "linear":
            m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
            b = self.base_shift - m * self.base_image_seq_len
            return image_seq_len * m + b
        a1, b1 = 8.73809524e-05, 1.89833333
        a2, b2 = 0.00016927, 0.45666666
        if image_seq_len > 4300:
            return float(a2 * image_seq_len + b2)
        m_200 = a2 * image_seq_len + b2
        m_10 = a1 * image_seq_len + b1
        a = (m_200 - m_10) / 190.0
        b = m_200 - 200.0 * a
        return float(a * len(self.sigmas) + b)

    def sigmas_for(self, image_seq_len: int) -> np.ndarray:
        """The N + 1 float32 sigmas (terminal 0 appended) diffusers' ``set_timesteps(..., mu=mu)`` builds."""
        t = np.asarray(self.sigmas, dtype=np.dtype(self.sigmas_dtype))
        mu = self.mu(image_seq_len)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            if self.time_shift_type == "exponential":  # _time_shift_exponential(mu, 1.0, t)
                sig = math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
            else:  # _time_shift_linear(mu, 1.0, t)
                sig = mu / (mu + (1 / t - 1) ** 1.0)
            if self.shift_terminal:  # stretch_shift_to_terminal
                one_minus_z = 1 - sig
                scale_factor = one_minus_z[-1] / (1 - self.shift_terminal)
                sig = 1 - (one_minus_z / scale_factor)
        sig = np.asarray(sig).astype(np.float32)
        if not np.all(np.isfinite(sig)) or np.any(sig <= 0):
            raise InputError(
                f"image sequence length {image_seq_len} gives the shift mu={mu:.6g}, for which the sampler's sigmas "
                f"({sig.tolist()}) are not all positive and finite; choose another image size"
            )
        return np.concatenate([sig, np.zeros(1, np.float32)])

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _DYNAMIC_KEYS}
        d["sigmas"] = [float(v) for v in self.sigmas]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> DynamicShift:
        if not isinstance(d, dict):
            raise ManifestError(f"sampler dynamic_shift must be an object, got {type(d).__name__}")
        missing = [k for k in _DYNAMIC_KEYS if k not in d]
        extra = sorted(map(str, set(d) - set(_DYNAMIC_KEYS)))
        if missing or extra:
            problems = ([f"lacks {', '.join(missing)}"] if missing else []) + \
                ([f"has unknown keys {', '.join(extra)}"] if extra else [])
            raise ManifestError(f"sampler dynamic_shift {'; '.join(problems)}; rebuild the artifact with this diffc")
        for k in ("mu_rule", "time_shift_type", "sigmas_dtype"):
            if not isinstance(d[k], str):
                raise ManifestError(f"sampler dynamic_shift.{k} must be a string, got {d[k]!r}")
        if not isinstance(d["sigmas"], (list, tuple)) or not all(_is_number(v) for v in d["sigmas"]):
            raise ManifestError("sampler dynamic_shift.sigmas must be a list of numbers")
        return cls(**{k: d[k] for k in _DYNAMIC_KEYS})


def flow_euler_rows(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coefficients of ``FlowMatchEulerDiscreteScheduler.step`` for N + 1 sigmas (the last one the terminal 0).

    diffusers: ``x_next = x + (sigma_next - sigma) * v``. With ``x0 = x - sigma * v`` (the flow-matching data
    prediction) that is ``x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) x0``. Neither the model
    input nor the initial noise is scaled. Image-to-image (``scale_noise``): ``x = (1 - sigma) x0 + sigma noise``.
    Returns ``(rows (N, len(COEFF_FIELDS)), noise_signal, noise_scale)`` in float64.
    """
    sig = np.asarray(sigmas, dtype=np.float64)
    s, sn = sig[:-1], sig[1:]
    r = sn / s
    one, zero = np.ones_like(s), np.zeros_like(s)
    rows = np.stack([one, one, -s, r, 1.0 - r, zero, zero], axis=1)
    return rows, 1.0 - s, s.copy()


# ==========================================================================================================
# LCM image-to-image: LCMScheduler.set_timesteps(num_steps, strength=strength) in numpy
# ==========================================================================================================
def discrete_x0_coeffs(pt: str, a: float) -> tuple[float, float]:
    """x0 = cx * x + cm * m for a discrete (alpha_bar) schedule at alphas_cumprod ``a``."""
    sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
    if pt == "epsilon":  # x0 = (x - sqrt(1 - a) eps) / sqrt(a)
        return (1.0 / sa if sa > 0 else math.inf), (-sb / sa if sa > 0 else -math.inf)
    if pt == "v_prediction":  # x0 = sqrt(a) x - sqrt(1 - a) v
        return sa, -sb
    return 0.0, 1.0  # sample


def lcm_rows(timesteps, alphas: np.ndarray, pt: str, timestep_scaling: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coefficients of ``LCMScheduler.step`` at integer ``timesteps`` with ``alphas`` = alphas_cumprod there.

    diffusers: ``denoised = c_out * x0_pred + c_skip * x`` with the boundary-condition scalings
    (``get_scalings_for_boundary_condition_discrete``: ``sigma_data = 0.5``, the timestep times
    ``timestep_scaling``), folded into ``x0_from_x``/``x0_from_m`` (x0 *is* LCM's ``denoised``); then
    ``x_next = sqrt(a_next) * denoised + sqrt(1 - a_next) * noise``, except on the last step where
    ``x_next = denoised``. ``add_noise``: ``sqrt(a) x0 + sqrt(1 - a) noise``. Returns
    ``(rows, noise_signal, noise_scale)``.
    """
    n = len(timesteps)
    rows = []
    for i in range(n):
        scaled = int(timesteps[i]) * timestep_scaling
        c_skip = 0.5**2 / (scaled**2 + 0.5**2)
        c_out = scaled / (scaled**2 + 0.5**2) ** 0.5
        px, pm = discrete_x0_coeffs(pt, float(alphas[i]))
        cx, cm = c_out * px + c_skip, c_out * pm
        if i == n - 1:
            rows.append((1.0, cx, cm, 0.0, 1.0, 0.0, 0.0))
        else:
            ap = float(alphas[i + 1])
            rows.append((1.0, cx, cm, 0.0, math.sqrt(ap), 0.0, math.sqrt(1.0 - ap)))
    a = np.asarray(alphas, dtype=np.float64)
    return np.asarray(rows, dtype=np.float64).reshape(n, len(COEFF_FIELDS)), np.sqrt(a), np.sqrt(1.0 - a)


_LCM_KEYS = ("original_steps", "num_train_timesteps", "timestep_scaling", "alphas_cumprod")


@dataclass(frozen=True, eq=False)
class LcmStrength:
    """What ``LatentConsistencyModelImg2ImgPipeline`` needs to redo ``LCMScheduler.set_timesteps(N, strength=s)``.

    LCM timesteps always lie on the distillation grid ``j * k - 1`` (``k = num_train_timesteps //
    original_steps``, ``j = 1 .. original_steps``); ``alphas_cumprod`` holds the scheduler's float32
    ``alphas_cumprod`` at those ``original_steps`` timesteps, in ascending order, which is everything a schedule
    for another strength reads.
    """

    original_steps: int
    num_train_timesteps: int
    timestep_scaling: float
    alphas_cumprod: np.ndarray

    def __post_init__(self) -> None:
        for key in ("original_steps", "num_train_timesteps"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ManifestError(f"lcm_strength.{key} must be an integer >= 1, got {v!r}")
            object.__setattr__(self, key, int(v))
        if self.original_steps > self.num_train_timesteps:
            raise ManifestError("lcm_strength.original_steps must not exceed num_train_timesteps")
        if not _is_number(self.timestep_scaling) or not math.isfinite(self.timestep_scaling):
            raise ManifestError(f"lcm_strength.timestep_scaling must be a finite number, got "
                                f"{self.timestep_scaling!r}")
        arr = _check_array("lcm_strength.alphas_cumprod", self.alphas_cumprod, self.original_steps)
        if np.any(arr <= 0) or np.any(arr > 1):
            raise ManifestError("lcm_strength.alphas_cumprod must lie in (0, 1]")
        object.__setattr__(self, "alphas_cumprod", arr)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LcmStrength):
            return NotImplemented
        return all(np.array_equal(getattr(self, k), getattr(other, k)) for k in _LCM_KEYS)

    __hash__ = None  # type: ignore[assignment]

    def timesteps_for(self, num_steps: int, strength: float) -> np.ndarray:
        """``LCMScheduler.set_timesteps(num_steps, strength=strength)``'s timesteps (int64)."""
        k = self.num_train_timesteps // self.original_steps
        origin = np.asarray(list(range(1, int(self.original_steps * strength) + 1))) * k - 1
        skipping_step = len(origin) // num_steps
        if skipping_step < 1:
            raise InputError(
                f"strength {strength} leaves {len(origin)} of the LCM schedule's {self.original_steps} distillation "
                f"steps, fewer than the {num_steps} sampler steps; use a strength of at least "
                f"{num_steps / self.original_steps:.4g}"
            )
        origin = origin[::-1].copy()
        idx = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
        return origin[idx].astype(np.int64)

    def alphas_at(self, timesteps: np.ndarray) -> np.ndarray:
        k = self.num_train_timesteps // self.original_steps
        return self.alphas_cumprod[(np.asarray(timesteps, dtype=np.int64) + 1) // k - 1]

    def to_dict(self) -> dict:
        return {"original_steps": self.original_steps, "num_train_timesteps": self.num_train_timesteps,
                "timestep_scaling": float(self.timestep_scaling),
                "alphas_cumprod": [float(v) for v in self.alphas_cumprod]}

    @classmethod
    def from_dict(cls, d: Any) -> LcmStrength:
        if not isinstance(d, dict):
            raise ManifestError(f"sampler lcm_strength must be an object, got {type(d).__name__}")
        missing = [k for k in _LCM_KEYS if k not in d]
        extra = sorted(map(str, set(d) - set(_LCM_KEYS)))
        if missing or extra:
            problems = ([f"lacks {', '.join(missing)}"] if missing else []) + \
                ([f"has unknown keys {', '.join(extra)}"] if extra else [])
            raise ManifestError(f"sampler lcm_strength {'; '.join(problems)}; rebuild the artifact with this diffc")
        if not isinstance(d["alphas_cumprod"], (list, tuple)) or not all(_is_number(v) for v in d["alphas_cumprod"]):
            raise ManifestError("sampler lcm_strength.alphas_cumprod must be a list of numbers")
        return cls(**{k: d[k] for k in _LCM_KEYS})


# ==========================================================================================================
# The tables
# ==========================================================================================================
@dataclass(frozen=True, eq=False)
class SamplerTables:
    """A sampler compiled to per-step coefficients of the generic update (see the module docstring).

    All arrays are 1-D float64 of length ``num_steps`` and read-only. ``timesteps[i]`` is the value diffusers'
    scheduler gives the pipeline at step ``i`` (an integer for the discrete schedulers, ``sigma * 1000`` for
    flow matching, a float for Euler's "linspace" spacing, the trigflow ``sin/(sin+cos)`` for ``scm``).
    ``noise_signal``/``noise_scale`` (image-to-image) are ``None`` in tables read from older manifests;
    ``dynamic_shift`` is ``None`` unless the shift depends on the image size.
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
    noise_signal: np.ndarray | None = None
    noise_scale: np.ndarray | None = None
    dynamic_shift: DynamicShift | None = None
    lcm_strength: LcmStrength | None = None

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
            arr = _check_array(name, getattr(self, name), n)
            if n is None:
                n = arr.shape[0]
                if n < 1:
                    raise ManifestError("sampler tables are empty: a sampler needs at least one step")
            object.__setattr__(self, name, arr)
        if self.next_from_prev_x0[0] != 0.0:
            raise ManifestError("sampler table 'next_from_prev_x0' must be 0 at step 0 (there is no previous x0)")
        if (self.noise_signal is None) != (self.noise_scale is None):
            raise ManifestError("sampler tables 'noise_signal' and 'noise_scale' come together: give both or neither")
        for name in NOISE_FIELDS:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _check_array(name, getattr(self, name), n))
        ds = self.dynamic_shift
        if ds is not None:
            if not isinstance(ds, DynamicShift):
                raise ManifestError("sampler dynamic_shift must be a DynamicShift")
            if self.kind != "flow_euler":
                raise ManifestError(f"sampler dynamic_shift is only defined for 'flow_euler', not {self.kind!r}")
            if ds.sigmas.shape[0] != n:
                raise ManifestError(f"sampler dynamic_shift has {ds.sigmas.shape[0]} sigmas for {n} steps; "
                                    "rebuild the artifact")
        if self.lcm_strength is not None:
            if not isinstance(self.lcm_strength, LcmStrength):
                raise ManifestError("sampler lcm_strength must be an LcmStrength")
            if self.kind != "lcm":
                raise ManifestError(f"sampler lcm_strength is only defined for 'lcm', not {self.kind!r}")

    # -- derived -------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def needs_noise(self) -> bool:
        """True when some step injects fresh noise (LCM, SCM): the runtime must then pass ``noise`` to :func:`step`."""
        return bool(np.any(self.next_from_noise != 0.0))

    @property
    def has_add_noise(self) -> bool:
        """True when the tables carry the image-to-image arrays (artifacts built with this diffc)."""
        return self.noise_signal is not None

    @property
    def strength_rule(self) -> str:
        """The :func:`start_step` rule of the diffusers image-to-image pipelines for this kind of model.

        The flow-matching families' pipelines (SD3, FLUX, Sana-Sprint) round the *start* step, the UNet
        families' (SD, SDXL, LCM, ControlNet) the number of steps; see :func:`start_step`.
        """
        return "truncate_start" if self.prediction_type in ("flow", "trigflow") else "truncate_steps"

    def start_step(self, strength: float) -> int:
        """:func:`start_step` for these tables' step count and :attr:`strength_rule`."""
        return start_step(self.num_steps, strength, rule=self.strength_rule)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SamplerTables):
            return NotImplemented

        def same(a, b) -> bool:
            return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))

        return (
            self.kind == other.kind
            and self.prediction_type == other.prediction_type
            and self.init_noise_sigma == other.init_noise_sigma
            and all(np.array_equal(getattr(self, f), getattr(other, f)) for f in _ARRAY_FIELDS)
            and all(same(getattr(self, f), getattr(other, f)) for f in NOISE_FIELDS)
            and self.dynamic_shift == other.dynamic_shift
            and self.lcm_strength == other.lcm_strength
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    # -- run-time specialisation ---------------------------------------------------------------------------
    def for_image_seq_len(self, image_seq_len: int) -> SamplerTables:
        """The tables for an image of ``image_seq_len`` transformer tokens; ``self`` when the shift is static.

        Recomputes diffusers' ``mu`` for that length, the shifted float32 sigmas, the timesteps
        (``sigma * num_train_timesteps`` in float32) and every coefficient, exactly as a build for that size
        would have compiled them.
        """
        if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, (int, np.integer)) or image_seq_len < 1:
            raise InputError(f"image_seq_len must be an integer >= 1 (the number of image tokens), got "
                             f"{image_seq_len!r}")
        ds = self.dynamic_shift
        if ds is None or int(image_seq_len) == ds.image_seq_len:
            return self
        sig = ds.sigmas_for(int(image_seq_len))
        rows, signal, scale = flow_euler_rows(sig)
        timesteps = sig[:-1] * _F32(ds.num_train_timesteps)  # float32 product, as torch computes it
        return SamplerTables(
            kind=self.kind, prediction_type=self.prediction_type, timesteps=timesteps.astype(np.float64),
            init_noise_sigma=self.init_noise_sigma,
            **{name: rows[:, j] for j, name in enumerate(COEFF_FIELDS)},
            noise_signal=signal, noise_scale=scale,
            dynamic_shift=DynamicShift(**{**{k: getattr(ds, k) for k in _DYNAMIC_KEYS},
                                          "image_seq_len": int(image_seq_len)}),
        )

    def img2img(self, strength: float) -> tuple[SamplerTables, int]:
        """The tables and start step of an image-to-image call at ``strength``, as diffusers' pipeline for the
        artifact's model does it.

        Usually ``(self, self.start_step(strength))``: the pipeline skips the first steps of the text-to-image
        schedule. Tables compiled for ``LatentConsistencyModelPipeline`` carry :class:`LcmStrength`:
        ``LatentConsistencyModelImg2ImgPipeline`` instead runs all ``num_steps`` steps on a schedule drawn from
        the first ``int(original_steps * strength)`` distillation steps, so this returns those tables and 0.
        Either way: ``x = tables.add_noise(start, x0, noise)``, then steps ``start ..`` with ``entry`` at ``start``.
        Resolve the image size (:meth:`for_image_seq_len`) first.
        """
        ls = self.lcm_strength
        if ls is None:
            return self, self.start_step(strength)
        _check_strength(strength)
        ts = ls.timesteps_for(self.num_steps, strength)
        alphas = ls.alphas_at(ts)
        rows, signal, scale = lcm_rows(ts, alphas, self.prediction_type, ls.timestep_scaling)
        return SamplerTables(
            kind=self.kind, prediction_type=self.prediction_type, timesteps=ts.astype(np.float64),
            init_noise_sigma=self.init_noise_sigma, **{name: rows[:, j] for j, name in enumerate(COEFF_FIELDS)},
            noise_signal=signal, noise_scale=scale, lcm_strength=ls,
        ), 0

    def add_noise(self, i: int, x0, noise) -> np.ndarray:
        """The loop's ``x`` at step ``i`` for clean latents ``x0`` (image-to-image): diffusers' ``add_noise``.

        ``noise_signal[i] * x0 + noise_scale[i] * noise`` in ``x0``'s floating dtype. Enter the loop at step
        ``i`` with this ``x`` and ``step(..., entry=True)``. Raises :class:`~diffc.errors.ManifestError` for
        tables built before image-to-image existed.
        """
        if self.noise_signal is None or self.noise_scale is None:
            raise ManifestError(
                "this artifact's sampler tables predate image-to-image (no noise_signal / noise_scale); "
                "rebuild the artifact with this diffc to use an input image"
            )
        i = _check_index(self, i)
        x0 = np.asarray(x0)
        dtype = x0.dtype if np.issubdtype(x0.dtype, np.floating) else np.dtype(np.float32)
        x0 = x0.astype(dtype, copy=False)
        nz = np.asarray(noise, dtype=dtype)
        if nz.shape != x0.shape:
            raise InputError(f"noise shape {nz.shape} does not match the latent shape {x0.shape}")
        out = x0 * float(self.noise_signal[i])
        out += nz * float(self.noise_scale[i])
        return out

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
        for name in NOISE_FIELDS:
            if getattr(self, name) is not None:
                d[name] = [float(v) for v in getattr(self, name)]
        if self.dynamic_shift is not None:
            d["dynamic_shift"] = self.dynamic_shift.to_dict()
        if self.lcm_strength is not None:
            d["lcm_strength"] = self.lcm_strength.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SamplerTables:
        """Inverse of :meth:`to_dict`; raises :class:`~diffc.errors.ManifestError` on missing, extra or bad data.

        ``noise_signal``/``noise_scale``, ``dynamic_shift`` and ``lcm_strength`` are optional (older manifests
        lack them)."""
        if not isinstance(d, dict):
            raise ManifestError(f"sampler section of the manifest must be an object, got {type(d).__name__}")
        required = ("kind", "prediction_type", "init_noise_sigma") + _ARRAY_FIELDS
        missing = [k for k in required if k not in d]
        if missing:
            raise ManifestError(
                f"sampler section of the manifest lacks {', '.join(missing)}; rebuild the artifact with this diffc"
            )
        known = set(required) | {"version", "num_steps", "dynamic_shift", "lcm_strength"} | set(NOISE_FIELDS)
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
        for name in _ARRAY_FIELDS + tuple(k for k in NOISE_FIELDS if k in d):
            value = d[name]
            if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
                raise ManifestError(f"sampler table {name!r} must be a list of numbers")
        if not isinstance(d["kind"], str) or not isinstance(d["prediction_type"], str):
            raise ManifestError("sampler 'kind' and 'prediction_type' must be strings")
        init = d["init_noise_sigma"]
        if not _is_number(init):
            raise ManifestError(f"sampler init_noise_sigma must be a number, got {init!r}")
        dynamic = DynamicShift.from_dict(d["dynamic_shift"]) if d.get("dynamic_shift") is not None else None
        lcm = LcmStrength.from_dict(d["lcm_strength"]) if d.get("lcm_strength") is not None else None
        tables = cls(
            kind=d["kind"],
            prediction_type=d["prediction_type"],
            init_noise_sigma=float(init),
            **{name: d[name] for name in _ARRAY_FIELDS},
            **{name: d.get(name) for name in NOISE_FIELDS},
            dynamic_shift=dynamic,
            lcm_strength=lcm,
        )
        if "num_steps" in d and d["num_steps"] != tables.num_steps:
            raise ManifestError(
                f"sampler num_steps is {d['num_steps']!r} but the tables have {tables.num_steps} entries"
            )
        return tables


# ==========================================================================================================
# Run time
# ==========================================================================================================
def _check_index(tables: SamplerTables, i: Any) -> int:
    n = tables.num_steps
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= int(i) < n:
        raise InputError(f"sampler step index must be an integer in [0, {n}), got {i!r}")
    return int(i)


def step(tables: SamplerTables, i: int, x, m, prev_x0, noise=None, *, entry: bool = False
         ) -> tuple[np.ndarray, np.ndarray]:
    """Apply step ``i`` of the generic update; returns ``(x_next, x0)`` in ``x``'s floating dtype.

    ``m`` is the model output for ``c_in[i] * x`` (after classifier-free guidance), ``prev_x0`` the ``x0``
    returned by the previous step (ignored at step 0, with ``entry=True`` and wherever its coefficient is 0, so
    zeros or ``None`` are fine there), ``noise`` a standard-normal array like ``x``, required only where
    ``next_from_noise[i] != 0`` (LCM and SCM, every step but the last).

    ``entry=True`` marks the first step the loop runs when that is not step 0 (image-to-image entered at
    :func:`start_step`): there is no previous x0, and diffusers' multistep DPM-Solver takes a first-order step,
    which is the update with ``prev_x0 = x0`` (the two x0 coefficients are added up before multiplying).
    """
    i = _check_index(tables, i)
    x = np.asarray(x)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)
    x = x.astype(dtype, copy=False)
    m = np.asarray(m, dtype=dtype)
    if m.shape != x.shape:
        raise InputError(f"model output shape {m.shape} does not match the latent shape {x.shape}")

    # Python floats are "weak" scalars in numpy: multiplying keeps x's dtype (float32 stays float32).
    x0 = m * float(tables.x0_from_m[i])
    x0 += x * float(tables.x0_from_x[i])

    c_x0, c_prev = float(tables.next_from_x0[i]), float(tables.next_from_prev_x0[i])
    if entry:
        c_x0, c_prev = c_x0 + c_prev, 0.0
    x_next = x * float(tables.next_from_x[i])
    x_next += x0 * c_x0
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


def _check_strength(strength: Any) -> None:
    if not _is_number(strength) or not math.isfinite(strength) or not 0 < strength <= 1:
        raise InputError(f"strength must be a number in (0, 1] (1 = ignore the input image), got {strength!r}")


def start_step(num_steps: int, strength: float, *, rule: str = "truncate_steps") -> int:
    """The step an image-to-image loop starts at, as diffusers' pipelines compute it.

    diffusers' image-to-image pipelines call ``set_timesteps(num_steps)`` (the full schedule the tables
    hold) and then skips the first ``t_start`` steps; they differ in how ``strength`` is rounded:

    * ``"truncate_steps"`` (``StableDiffusionImg2ImgPipeline``, SDXL, ControlNet, inpainting):
      ``init = min(int(num_steps * strength),
      num_steps)``, ``t_start = max(num_steps - init, 0)`` - the number of steps run is rounded down;
    * ``"truncate_start"`` (SD3, FLUX, Sana-Sprint image-to-image and inpainting): ``init = min(num_steps *
      strength, num_steps)``, ``t_start = int(max(num_steps - init, 0))`` - the start is rounded down, so one
      more step runs whenever ``num_steps * strength`` is not an integer (4 steps at 0.6: 3 steps, not 2).

    LCM is the exception to "skip the first steps": ``LatentConsistencyModelImg2ImgPipeline`` passes
    ``strength`` into ``LCMScheduler.set_timesteps``, which picks ``num_steps`` timesteps from the first
    ``int(original_steps * strength)`` training steps - a different schedule than these tables. Entering LCM
    tables at ``start_step`` reproduces ``StableDiffusionImg2ImgPipeline`` with an ``LCMScheduler`` instead.

    Raises :class:`~diffc.errors.InputError` for a strength outside (0, 1] or one that leaves no step to run
    (diffusers raises a ValueError there too).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise InputError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if rule not in STRENGTH_RULES:
        raise InputError(f"strength rule {rule!r} is unknown; valid: {', '.join(STRENGTH_RULES)}")
    _check_strength(strength)
    n = int(num_steps)
    if rule == "truncate_steps":
        init_timestep = min(int(n * strength), n)
        t_start = max(n - init_timestep, 0)
    else:
        init_timestep = min(n * strength, n)
        t_start = int(max(n - init_timestep, 0))
    if t_start >= n:
        raise InputError(
            f"strength {strength} with {n} sampler steps leaves no step to run; use a strength of at least "
            f"{1 / n:.4g} (one step)"
        )
    return t_start


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
