"""Few-step samplers as tables: one generic update that reproduces several diffusers schedulers.

At build time :func:`diffc.exporter.sampler.compile_sampler` instantiates the pipeline's diffusers scheduler,
calls ``set_timesteps`` and "compiles" the chosen sampler into a :class:`SamplerTables`: the fixed timesteps
plus, for every step ``i``, a handful of float64 coefficients. At run time (numpy only, no torch, no diffusers)
every sampler is the same few lines::

    model_input = c_in[i] * x                                  # fed to the denoiser with timestep timesteps[i]
    x0          = x0_from_x[i] * x + x0_from_m[i] * m          # m = model output after classifier-free guidance
    x_next      = (next_from_x[i] * x + next_from_x0[i] * x0
                   + next_from_prev_x0[i] * prev_x0 + next_from_noise[i] * noise_i)
    prev_x0     = x0

with ``x = init_noise_sigma * randn`` at the start and ``prev_x0 = 0`` at step 0. ``x0`` is always a *data*
prediction (the denoised latent), which is what lets one form serve epsilon-, v-, sample- and flow-predicting
models alike: the prediction type only changes ``x0_from_x``/``x0_from_m``.

Supported kinds (:data:`SAMPLERS`): ``ddim``, ``euler``, ``dpmpp_2m``, ``lcm``, ``flow_euler``; the diffusers
class each one reproduces is listed in :data:`diffc.exporter.sampler.KIND_CLASS`.

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
    "SamplerTables",
    "step",
    "guidance_embedding",
]

#: every sampler kind the tables can describe
SAMPLERS = ("ddim", "euler", "dpmpp_2m", "lcm", "flow_euler")

#: what the denoiser predicts; ``"flow"`` is a velocity ``v = noise - x0`` (flow matching)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

#: version of the dict written by :meth:`SamplerTables.to_dict`
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
_ARRAY_FIELDS = ("timesteps",) + COEFF_FIELDS

_F32 = np.float32


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
