"""The schedules the torch-free runtime re-derives per request, and the coefficient rows they share with the build.

Most sampler tables are fixed at build time (:mod:`diffc.exporter.sampler`). Two kinds of request change the
schedule itself, so the runtime recomputes it in numpy, exactly as diffusers' scheduler would:

* **Resolution-dependent shift** (FLUX, SD3.5 with ``use_dynamic_shifting``): :class:`DynamicShift` holds what
  ``FlowMatchEulerDiscreteScheduler.set_timesteps`` reads besides the image size, and
  :meth:`~diffc.runtime.sampler.SamplerTables.for_image_seq_len` turns it into the tables for one image sequence
  length (FLUX: the number of packed 2x2 latent patches, ``(H/16) * (W/16)``; SD3: ``(H/8/patch) * (W/8/patch)``)
  with :func:`flow_euler_rows`.
* **LCM image-to-image**: :class:`LcmStrength` holds the distillation grid ``LCMScheduler.set_timesteps(N,
  strength=s)`` draws from; :meth:`~diffc.runtime.sampler.SamplerTables.img2img` turns it into tables with
  :func:`lcm_rows`.

The build-time compiler calls the same row functions, so a table compiled for one size and one re-derived for it
are the same numbers. Both value classes validate themselves on construction: they are read back from manifests.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffc.errors import InputError, ManifestError

__all__ = ["COEFF_FIELDS", "DynamicShift", "LcmStrength", "discrete_x0_coeffs", "flow_euler_rows", "lcm_rows"]

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


def check_array(name: str, value: Any, n: int | None) -> np.ndarray:
    """``value`` as a read-only 1-D float64 array of finite numbers (``n`` of them, when given), else ManifestError."""
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


def is_number(v: Any) -> bool:
    """A JSON number: int or float, not bool (json reads ``true`` as a bool, which is an int in Python)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_keys(section: str, d: Any, keys: tuple[str, ...]) -> None:
    """Refuse a manifest object that is not a dict with exactly ``keys``, naming what is missing and what is extra."""
    if not isinstance(d, dict):
        raise ManifestError(f"sampler {section} must be an object, got {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    extra = sorted(map(str, set(d) - set(keys)))
    if missing or extra:
        problems = ([f"lacks {', '.join(missing)}"] if missing else []) + \
            ([f"has unknown keys {', '.join(extra)}"] if extra else [])
        raise ManifestError(f"sampler {section} {'; '.join(problems)}; rebuild the artifact with this diffc")


def table_fields(timesteps: np.ndarray, rows: np.ndarray, noise_signal: np.ndarray, noise_scale: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """The per-step SamplerTables fields of a re-derived schedule: its timesteps, the columns of ``rows`` (one a
    name of :data:`COEFF_FIELDS`) and the image-to-image arrays."""
    return {"timesteps": np.asarray(timesteps, dtype=np.float64),
            **{name: rows[:, j] for j, name in enumerate(COEFF_FIELDS)},
            "noise_signal": noise_signal, "noise_scale": noise_scale}


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
        arr = check_array("dynamic_shift.sigmas", self.sigmas, None)
        if arr.shape[0] < 1 or np.any(arr <= 0) or np.any(arr > 1):
            raise ManifestError("dynamic_shift.sigmas must hold at least one value in (0, 1]")
        object.__setattr__(self, "sigmas", arr)
        for key in ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift"):
            v = getattr(self, key)
            if not is_number(v) or not math.isfinite(v):
                raise ManifestError(f"dynamic_shift.{key} must be a finite number, got {v!r}")
        if self.mu_rule == "linear" and self.max_image_seq_len == self.base_image_seq_len:
            raise ManifestError("dynamic_shift.max_image_seq_len must differ from base_image_seq_len")
        st = self.shift_terminal
        if st is not None and (not is_number(st) or not 0 <= st < 1):
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

    def schedule_for(self, image_seq_len: int) -> dict[str, Any]:
        """The SamplerTables fields for ``image_seq_len``: the shifted sigmas' coefficients, the timesteps
        (``sigma * num_train_timesteps`` as a float32 product, as torch computes it) and this shift at that size."""
        sig = self.sigmas_for(image_seq_len)
        rows, signal, scale = flow_euler_rows(sig)
        timesteps = sig[:-1] * np.float32(self.num_train_timesteps)
        return {**table_fields(timesteps.astype(np.float64), rows, signal, scale),
                "dynamic_shift": dataclasses.replace(self, image_seq_len=int(image_seq_len))}

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _DYNAMIC_KEYS}
        d["sigmas"] = [float(v) for v in self.sigmas]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> DynamicShift:
        check_keys("dynamic_shift", d, _DYNAMIC_KEYS)
        for k in ("mu_rule", "time_shift_type", "sigmas_dtype"):
            if not isinstance(d[k], str):
                raise ManifestError(f"sampler dynamic_shift.{k} must be a string, got {d[k]!r}")
        if not isinstance(d["sigmas"], (list, tuple)) or not all(is_number(v) for v in d["sigmas"]):
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
        if not is_number(self.timestep_scaling) or not math.isfinite(self.timestep_scaling):
            raise ManifestError(f"lcm_strength.timestep_scaling must be a finite number, got "
                                f"{self.timestep_scaling!r}")
        arr = check_array("lcm_strength.alphas_cumprod", self.alphas_cumprod, self.original_steps)
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

    def schedule_for(self, num_steps: int, strength: float, prediction_type: str) -> dict[str, np.ndarray]:
        """The SamplerTables fields of ``LCMScheduler.set_timesteps(num_steps, strength=strength)``."""
        ts = self.timesteps_for(num_steps, strength)
        rows, signal, scale = lcm_rows(ts, self.alphas_at(ts), prediction_type, self.timestep_scaling)
        return table_fields(ts.astype(np.float64), rows, signal, scale)

    def to_dict(self) -> dict:
        return {"original_steps": self.original_steps, "num_train_timesteps": self.num_train_timesteps,
                "timestep_scaling": float(self.timestep_scaling),
                "alphas_cumprod": [float(v) for v in self.alphas_cumprod]}

    @classmethod
    def from_dict(cls, d: Any) -> LcmStrength:
        check_keys("lcm_strength", d, _LCM_KEYS)
        if not isinstance(d["alphas_cumprod"], (list, tuple)) or not all(is_number(v) for v in d["alphas_cumprod"]):
            raise ManifestError("sampler lcm_strength.alphas_cumprod must be a list of numbers")
        return cls(**{k: d[k] for k in _LCM_KEYS})
