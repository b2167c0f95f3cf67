"""The sampler section of manifest.json: what valid tables are, and their JSON form.

:class:`~diffc.runtime.sampler.SamplerTables` checks every field through :func:`checked_fields` when it is
constructed, so tables read back from a manifest (:func:`tables_from_dict`) are held to exactly the rules fresh
ones from the build-time compiler are. Python's json writes floats with ``repr``, so :func:`tables_to_dict` and
:func:`tables_from_dict` round-trip every coefficient exactly: the runtime runs the numbers the build compiled.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from diffc.errors import ManifestError
from diffc.runtime.sampler_schedules import COEFF_FIELDS, DynamicShift, LcmStrength, check_array, is_number

__all__ = ["NOISE_FIELDS", "PREDICTION_TYPES", "SAMPLERS", "TABLES_FORMAT_VERSION", "checked_fields",
           "tables_equal", "tables_from_dict", "tables_to_dict"]

#: every sampler kind the tables can describe
SAMPLERS = ("ddim", "euler", "dpmpp_2m", "lcm", "flow_euler", "scm")

#: what the denoiser predicts; ``"flow"`` is a velocity ``v = noise - x0`` (flow matching), ``"trigflow"`` the
#: TrigFlow velocity of sCM models (Sana-Sprint), whose pipeline rescales it around the model
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow", "trigflow")

#: version of the dict written by :func:`tables_to_dict`. The image-to-image arrays and the dynamic shift are
#: optional keys: version-1 readers refuse them as unknown keys (asking for an upgrade), and this reader accepts
#: tables without them.
TABLES_FORMAT_VERSION = 1

#: per-step arrays for image-to-image, optional (absent in artifacts built before them)
NOISE_FIELDS = ("noise_signal", "noise_scale")
ARRAY_FIELDS = ("timesteps",) + COEFF_FIELDS


def checked_fields(t: Any) -> dict[str, Any]:
    """The normalised values of ``t``'s number fields (float ``init_noise_sigma``, read-only float64 arrays),
    or a :class:`~diffc.errors.ManifestError` naming the first field that breaks a rule of the format."""
    if t.kind not in SAMPLERS:
        raise ManifestError(f"sampler kind {t.kind!r} is unknown; valid kinds: {', '.join(SAMPLERS)}")
    if t.prediction_type not in PREDICTION_TYPES:
        raise ManifestError(
            f"sampler prediction_type {t.prediction_type!r} is unknown; valid: {', '.join(PREDICTION_TYPES)}"
        )
    try:
        sigma0 = float(t.init_noise_sigma)
    except (TypeError, ValueError):
        raise ManifestError(f"sampler init_noise_sigma must be a number, got {t.init_noise_sigma!r}") from None
    if not math.isfinite(sigma0) or sigma0 <= 0:
        raise ManifestError(f"sampler init_noise_sigma must be a finite positive number, got {sigma0!r}")
    out: dict[str, Any] = {"init_noise_sigma": sigma0}
    n = None
    for name in ARRAY_FIELDS:
        out[name] = check_array(name, getattr(t, name), n)
        if n is None:
            n = out[name].shape[0]
            if n < 1:
                raise ManifestError("sampler tables are empty: a sampler needs at least one step")
    if out["next_from_prev_x0"][0] != 0.0:
        raise ManifestError("sampler table 'next_from_prev_x0' must be 0 at step 0 (there is no previous x0)")
    if (t.noise_signal is None) != (t.noise_scale is None):
        raise ManifestError("sampler tables 'noise_signal' and 'noise_scale' come together: give both or neither")
    for name in NOISE_FIELDS:
        if getattr(t, name) is not None:
            out[name] = check_array(name, getattr(t, name), n)
    ds = t.dynamic_shift
    if ds is not None:
        if not isinstance(ds, DynamicShift):
            raise ManifestError("sampler dynamic_shift must be a DynamicShift")
        if t.kind != "flow_euler":
            raise ManifestError(f"sampler dynamic_shift is only defined for 'flow_euler', not {t.kind!r}")
        if ds.sigmas.shape[0] != n:
            raise ManifestError(f"sampler dynamic_shift has {ds.sigmas.shape[0]} sigmas for {n} steps; "
                                "rebuild the artifact")
    if t.lcm_strength is not None:
        if not isinstance(t.lcm_strength, LcmStrength):
            raise ManifestError("sampler lcm_strength must be an LcmStrength")
        if t.kind != "lcm":
            raise ManifestError(f"sampler lcm_strength is only defined for 'lcm', not {t.kind!r}")
    return out


def tables_equal(a: Any, b: Any) -> bool:
    """Field-by-field equality of two tables (arrays compared by value; absent optional arrays equal only each
    other): what "tables equal" means in the build's and the tests' parity checks."""

    def same(x, y) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))

    return (
        a.kind == b.kind
        and a.prediction_type == b.prediction_type
        and a.init_noise_sigma == b.init_noise_sigma
        and all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ARRAY_FIELDS)
        and all(same(getattr(a, f), getattr(b, f)) for f in NOISE_FIELDS)
        and a.dynamic_shift == b.dynamic_shift
        and a.lcm_strength == b.lcm_strength
    )


def tables_to_dict(t: Any) -> dict:
    """JSON-able form of tables ``t`` for manifest.json."""
    d: dict[str, Any] = {
        "version": TABLES_FORMAT_VERSION,
        "kind": t.kind,
        "prediction_type": t.prediction_type,
        "num_steps": t.num_steps,
        "init_noise_sigma": float(t.init_noise_sigma),
    }
    for name in ARRAY_FIELDS:
        d[name] = [float(v) for v in getattr(t, name)]
    for name in NOISE_FIELDS:
        if getattr(t, name) is not None:
            d[name] = [float(v) for v in getattr(t, name)]
    if t.dynamic_shift is not None:
        d["dynamic_shift"] = t.dynamic_shift.to_dict()
    if t.lcm_strength is not None:
        d["lcm_strength"] = t.lcm_strength.to_dict()
    return d


def tables_from_dict(cls: type, d: Any) -> Any:
    """Inverse of :func:`tables_to_dict`, constructing ``cls`` (SamplerTables); raises
    :class:`~diffc.errors.ManifestError` on missing, extra or bad data.

    ``noise_signal``/``noise_scale``, ``dynamic_shift`` and ``lcm_strength`` are optional (older manifests lack
    them)."""
    if not isinstance(d, dict):
        raise ManifestError(f"sampler section of the manifest must be an object, got {type(d).__name__}")
    required = ("kind", "prediction_type", "init_noise_sigma") + ARRAY_FIELDS
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
    for name in ARRAY_FIELDS + tuple(k for k in NOISE_FIELDS if k in d):
        value = d[name]
        if not isinstance(value, (list, tuple)) or not all(is_number(v) for v in value):
            raise ManifestError(f"sampler table {name!r} must be a list of numbers")
    if not isinstance(d["kind"], str) or not isinstance(d["prediction_type"], str):
        raise ManifestError("sampler 'kind' and 'prediction_type' must be strings")
    init = d["init_noise_sigma"]
    if not is_number(init):
        raise ManifestError(f"sampler init_noise_sigma must be a number, got {init!r}")
    dynamic = DynamicShift.from_dict(d["dynamic_shift"]) if d.get("dynamic_shift") is not None else None
    lcm = LcmStrength.from_dict(d["lcm_strength"]) if d.get("lcm_strength") is not None else None
    tables = cls(
        kind=d["kind"],
        prediction_type=d["prediction_type"],
        init_noise_sigma=float(init),
        **{name: d[name] for name in ARRAY_FIELDS},
        **{name: d.get(name) for name in NOISE_FIELDS},
        dynamic_shift=dynamic,
        lcm_strength=lcm,
    )
    if "num_steps" in d and d["num_steps"] != tables.num_steps:
        raise ManifestError(
            f"sampler num_steps is {d['num_steps']!r} but the tables have {tables.num_steps} entries"
        )
    return tables
