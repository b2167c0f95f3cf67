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
  :class:`DynamicShift` hold coefficients for one image sequence length only; call
  :meth:`SamplerTables.for_image_seq_len` with the request's before the loop (it returns ``self`` for static
  tables). The re-derivation is in :mod:`diffc.runtime.sampler_schedules`.
* **The timestep a denoiser gets** is ``timesteps[i]`` as diffusers' scheduler holds it (``sigma * 1000`` for
  flow matching, integers for the discrete schedules, ``sin(s) / (sin(s) + cos(s))`` for ``scm``). Pipelines that
  rescale it around the model do so outside the tables: FLUX passes ``float32(timesteps[i]) / 1000``, Sana
  multiplies by the transformer's ``timestep_scale``.
* **Image-to-image**: ``tables, k = tables.img2img(strength)``, then ``x = tables.add_noise(k, x0, noise)``
  (each scheduler's ``add_noise`` / ``scale_noise`` at ``timesteps[k]``, in the space ``step`` works in) and the
  loop from step ``k``. Most tables come back unchanged with ``k`` = :func:`start_step` (the pipeline skips the
  first steps); LCM tables (with :class:`LcmStrength`) are recomputed for the strength and entered at 0, as
  ``LatentConsistencyModelImg2ImgPipeline`` does.
* **Entry**: at the first step a loop runs (step 0 for text-to-image, ``k`` for image-to-image) there is no
  previous x0. diffusers' multistep DPM-Solver then takes a first-order step, which is exactly the update above
  with ``prev_x0 = x0``; every other kind has ``next_from_prev_x0 = 0`` and is unaffected. :func:`step` does
  this when called with ``entry=True``.

Only numpy is imported here on purpose: this file ships in the torch-free runtime. It keeps the loop's arithmetic
and the table lookup; what valid tables are and their manifest form live in :mod:`diffc.runtime.sampler_format`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffc.errors import InputError, ManifestError
from diffc.runtime.sampler_format import (NOISE_FIELDS, PREDICTION_TYPES, SAMPLERS, TABLES_FORMAT_VERSION,
                                          checked_fields, tables_equal, tables_from_dict, tables_to_dict)
from diffc.runtime.sampler_schedules import (COEFF_FIELDS, DynamicShift, LcmStrength, discrete_x0_coeffs,
                                             flow_euler_rows, is_number, lcm_rows)

# The table format and the per-request schedules live in sibling modules; their public names are re-exported
# here because the build-time compiler and the tests know the sampler by this one module.
__all__ = ["COEFF_FIELDS", "NOISE_FIELDS", "PREDICTION_TYPES", "SAMPLERS", "STRENGTH_RULES", "TABLES_FORMAT_VERSION",
           "DynamicShift", "LcmStrength", "SamplerTables", "discrete_x0_coeffs", "flow_euler_rows",
           "guidance_embedding", "lcm_rows", "start_step", "step"]

#: how diffusers' image-to-image pipelines turn ``strength`` into a start step (see :func:`start_step`)
STRENGTH_RULES = ("truncate_steps", "truncate_start")

_F32 = np.float32


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
        # Validation runs here so that tables read back from a manifest are checked exactly like fresh ones.
        for name, value in checked_fields(self).items():
            object.__setattr__(self, name, value)

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
        return tables_equal(self, other)

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
        return dataclasses.replace(self, **ds.schedule_for(int(image_seq_len)))

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
        return dataclasses.replace(self, **ls.schedule_for(self.num_steps, strength, self.prediction_type)), 0

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

    # -- (de)serialisation: diffc.runtime.sampler_format ------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able form for manifest.json (exact round trip: see :mod:`diffc.runtime.sampler_format`)."""
        return tables_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SamplerTables:
        """Inverse of :meth:`to_dict`; raises :class:`~diffc.errors.ManifestError` on missing, extra or bad data."""
        return tables_from_dict(cls, d)


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
    if not is_number(strength) or not math.isfinite(strength) or not 0 < strength <= 1:
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
