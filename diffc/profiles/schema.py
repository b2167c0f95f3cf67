"""Profile schema, loader and resolution against a model.

A profile is plain data. Each table is validated field by field so an error can say e.g.
``profile 'mine.toml': [sampler].steps must be an integer >= 1, got 0``. Unknown keys are errors too:
a typo must not silently fall back to a default.
"""

from __future__ import annotations

import enum
import math
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from diffc.engines import backend_names, get_backend
from diffc.errors import ProfileError
# the artifact contract's names and limits, defined where the runtime imports them without importing profiles
from diffc.names import (  # noqa: F401 (re-exported for profile users)
    GUIDANCE_MAX,
    MEMORY_ARENAS,
    SEED_MAX,
    base_component,
    max_threads,
    step_group_components,
)

PROFILE_DIR = Path(__file__).parent


class Backend(str, enum.Enum):
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt_rtx"
    OPENVINO = "openvino"
    ONNXRUNTIME_CUDA = "onnxruntime_cuda"  # onnxruntime's CUDA execution provider (cuda-fp16, cuda-fp32)


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"


SAMPLER_KINDS = ("auto", "ddim", "euler", "dpmpp_2m", "lcm", "flow_euler", "scm")
#: ``[sampler].schedule``: ``default`` the scheduler's own spacing; ``optimized`` timesteps searched at build against
#: a :data:`SCHEDULE_REFERENCE_STEPS`-step reference trajectory (diffc.build.schedule_search)
SCHEDULES = ("default", "optimized")
SCHEDULE_REFERENCE_STEPS = 50
#: TensorRT hardware-compatibility levels (``[tensorrt].hardware_compat``); TensorRT-RTX uses compute capabilities
HARDWARE_COMPAT = ("none", "ampere_plus", "same_compute_capability")
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
#: a profile's thread counts are machine-independent; the runtime checks a request against its own machine
#: (:func:`max_threads`)
MAX_PROFILE_THREADS = 1024
#: the largest image side and batch a profile may ask for: far beyond any diffusion model's range, and small
#: enough that the shapes derived from them stay int32 (TensorRT's dimensions) and a typo such as 10**9 is caught
MAX_PIXELS = 16384
MAX_BATCH = 1024
#: a profile is a few kB; a larger file is not one (and is refused before it is parsed)
MAX_PROFILE_BYTES = 1 * 2**20


@dataclass(frozen=True)
class Range:
    """``min <= opt <= max``: backend-neutral, like Polygraphy's Profile; TensorRT converts it at the edge."""

    min: int
    opt: int
    max: int

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]

    def contains(self, v: int) -> bool:
        return self.min <= v <= self.max


@dataclass(frozen=True)
class TensorRTOptions:
    """The ``[tensorrt]`` table: how TensorRT / TensorRT-RTX engines are built (ignored by other backends).

    ``compute_capabilities`` means two things, because the two flavours build differently. TensorRT-RTX compiles
    ahead of time for the listed targets (``"SM89"``, ``"SM120"`` ...) on any machine, GPU or not; empty means
    its default portable set (Ampere and later). Datacenter TensorRT autotunes on the GPU it builds on, so an
    engine is for that GPU's architecture: the list names the architectures the profile is for, and a build on
    another GPU is refused (unless ``hardware_compat`` widens what the engine runs on).
    """

    compute_capabilities: tuple[str, ...] = ()
    opt_level: int = 3  # builder optimization level, 0 (fast build) .. 5 (slow build, fastest engine)
    strongly_typed: bool | None = None  # None ("auto"): decided from the graph and the TensorRT version
    static_shapes: bool = False  # every profile collapses to its opt shape (min = opt = max)
    refit: bool = False
    weight_streaming: bool = False
    hardware_compat: str = "none"  # tensorrt only: none | ampere_plus | same_compute_capability
    version_compat: bool = False  # tensorrt only: the engine also runs on later TensorRT versions
    timing_cache: bool = True  # tensorrt only: keep autotuning results between builds (TensorRT-RTX: no-op)
    cuda_graph: bool = True  # runtime: replay each input shape as a CUDA graph
    workspace_mib: int | None = None  # builder workspace pool; None: derived from [memory].budget_mib


@dataclass(frozen=True)
class MemoryBudget:
    """The ``[memory]`` table. ``budget_mib``: device memory one engine may use at run time (weights plus
    activations), for targets such as an 8 GB Jetson whose GPU shares memory with the OS. TensorRT derives its
    builder workspace limit from it and refuses a component whose weights alone exceed it."""

    budget_mib: int | None = None


#: what calibration runs by default: varied captions, so the activation ranges cover more than one kind of image
DEFAULT_CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dusk",
    "a handwritten digit three",
    "a close-up photo of a red fox in the snow",
)
#: the quality gate's prompts: not the calibration ones, so the gate measures what calibration did not see
DEFAULT_GATE_PROMPTS = (
    "a bowl of fruit on a wooden table",
    "a handwritten digit seven",
    "a portrait of an old sailor, oil painting",
)
CALIBRATION_METHODS = ("percentile", "minmax")
ACTIVATION_TYPES = ("auto", "uint8", "int8")


@dataclass(frozen=True)
class QuantizeOptions:
    """The ``[quantize]`` table: how int8 / fp8 components are calibrated, quantized and quality-gated.

    Calibration runs the artifact's own fp32 sampling loop (onnxruntime, CPU) over ``calibration_prompts`` x
    ``calibration_seeds`` and records every quantized tensor's range at every step, both CFG halves.
    ``method``: ``percentile`` clips each call's range to the ``percentile``-th / (100 - p)-th percentile
    (outliers would otherwise stretch the 8-bit grid), ``minmax`` keeps it whole; the range used is the
    envelope over all calls. ``keep_float``: layer roles left in float (see diffc.passes.quantize).
    ``activations``: ``auto`` is uint8 on onnxruntime (x86 VNNI multiplies u8 x s8) and int8 on TensorRT
    (symmetric only). The gate compares final images with the fp32 artifact's on ``gate_prompts`` x
    ``gate_seeds`` and fails the build when their mean PSNR is below ``min_psnr_db`` (or an image's max
    absolute error is above ``max_abs_error``, if set).
    ``step_groups``: 1 (one static scale per tensor, from all steps) or N > 1: the steps are cut into N
    contiguous groups, each gets its own scales from its own steps' ranges and its own UNet engine
    (``unet``, ``unet_g1``, ...); the manifest's ``step_variants`` says which engine runs at which timestep.
    For a model whose activations change too much over the loop for one scale (the build report lists such
    tensors as ``per_step_group_candidates``).
    """

    method: str = "percentile"
    percentile: float = 99.99
    calibration_prompts: tuple[str, ...] = DEFAULT_CALIBRATION_PROMPTS
    calibration_seeds: tuple[int, ...] = (0, 1)
    keep_float: tuple[str, ...] = ("conv_in", "conv_out", "time_embedding", "skip_concat")
    activations: str = "auto"
    gate_prompts: tuple[str, ...] = DEFAULT_GATE_PROMPTS
    gate_seeds: tuple[int, ...] = (100, 101)
    min_psnr_db: float = 28.0
    max_abs_error: float | None = None
    step_groups: int = 1


@dataclass(frozen=True)
class CacheOptions:
    """The ``[cache]`` table: DeepCache-style feature reuse (diffc.runtime.cache, docs/manifest.md).

    ``branch``: which UNet tensor is cached (0 = shallowest, cheapest shallow step; the build checks it against
    the UNet). ``schedule``: ``"interval"`` (full UNet every ``interval``-th step), ``"nonuniform"`` (as many full
    steps as ``interval`` gives, placed by DeepCache's power law around step ``center`` with exponent
    ``power``) or ``"mask"`` (``mask``: one 1/0 per step, 1 = full). Step 0 is always full.
    """

    enabled: bool = False
    branch: int = 0
    schedule: str = "interval"
    interval: int = 2
    mask: tuple[int, ...] = ()
    power: float = 1.4
    center: int | None = None  # None: steps // 2

    def schedule_dict(self) -> dict[str, Any]:
        """The schedule as diffc.runtime.cache.full_steps takes it (and the manifest records it)."""
        if self.schedule == "mask":
            return {"kind": "mask", "mask": list(self.mask)}
        if self.schedule == "nonuniform":
            return {"kind": "nonuniform", "interval": self.interval, "power": self.power, "center": self.center}
        return {"kind": "interval", "interval": self.interval}


@dataclass(frozen=True)
class SavingsOptions:
    """The ``[savings]`` table: training-free step savings written into the manifest's ``savings`` section
    (diffc.runtime.savings, docs/manifest.md "Savings"); ``diffc run`` overrides each one.

    ``adaptive_guidance``: ``"off"``, ``"static"`` (steps >= ``guidance_from_step`` run the conditional half of
    classifier-free guidance only) or ``"dynamic"`` (cond-only after the first step whose uncond / cond cosine
    similarity reaches ``guidance_threshold``). ``extrapolation_order``: 0 reuses a cached value as it is; 1-3
    extrapolates it from the last k + 1 cached values (needs ``[cache]`` or ``[savings.step_cache]``).
    ``step_cache``: dynamic step caching's table (diffc.runtime.savings; empty: off).
    """

    adaptive_guidance: str = "off"
    guidance_from_step: int | None = None
    guidance_threshold: float | None = None
    extrapolation_order: int = 0
    step_cache: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.adaptive_guidance != "off" or self.extrapolation_order > 0 or bool(self.step_cache)

    def manifest_section(self) -> dict[str, Any] | None:
        """The manifest's ``savings`` section (None: no savings)."""
        if not self.active:
            return None
        ag: dict[str, Any] = {"mode": self.adaptive_guidance}
        if self.adaptive_guidance == "static":
            ag["from_step"] = self.guidance_from_step
        elif self.adaptive_guidance == "dynamic":
            ag["threshold"] = self.guidance_threshold
        from diffc.runtime.savings import SAVINGS_VERSION

        out = {"version": SAVINGS_VERSION, "adaptive_guidance": ag,
               "extrapolation": {"order": self.extrapolation_order}}
        if self.step_cache:
            out["step_cache"] = dict(self.step_cache)
        return out


@dataclass(frozen=True)
class Profile:
    name: str
    backend: Backend
    description: str = ""
    precision: dict[str, Precision] = field(default_factory=dict)  # component -> precision; "default" key too
    height: Range | None = None  # pixels; None = derive from the model
    width: Range | None = None
    batch: Range = Range(1, 1, 4)
    sampler: str = "auto"
    steps: int = 4
    schedule: str = "default"
    guidance: float | None = 7.5
    onnxruntime: dict[str, Any] = field(default_factory=dict)
    #: the ``[passes]`` table: options of diffc.passes.pass_list (validated there, per target)
    passes: dict[str, Any] = field(default_factory=dict)
    tensorrt: TensorRTOptions = TensorRTOptions()
    memory: MemoryBudget = MemoryBudget()
    quantize: QuantizeOptions = QuantizeOptions()
    cache: CacheOptions = CacheOptions()
    savings: SavingsOptions = SavingsOptions()
    source: str = ""  # where it was loaded from

    def precision_of(self, component: str) -> Precision:
        component = base_component(component)
        return self.precision.get(component, self.precision.get("default", Precision.FP32))

    def quantized_components(self, components: tuple[str, ...] = COMPONENTS) -> dict[str, Precision]:
        """The components this profile builds in int8 or fp8 (they need calibration and Q/DQ graphs)."""
        return {c: self.precision_of(c) for c in components
                if self.precision_of(c) in (Precision.INT8, Precision.FP8)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["backend"] = self.backend.value
        d["precision"] = {k: v.value for k, v in self.precision.items()}
        for key in ("height", "width", "batch"):
            d[key] = getattr(self, key).to_list() if getattr(self, key) is not None else None
        d["tensorrt"]["compute_capabilities"] = list(self.tensorrt.compute_capabilities)
        d["quantize"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["quantize"].items()}
        d["cache"]["mask"] = list(self.cache.mask)
        if not self.savings.active:  # manifests of builds without savings stay as they were before the table
            del d["savings"]
        if self.schedule == "default":  # manifests of default-schedule builds stay as they were before the field
            del d["schedule"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "<dict>") -> "Profile":
        """Inverse of :meth:`to_dict` (as stored in a manifest); a malformed dict is a :class:`ProfileError`."""
        if not isinstance(data, dict):
            raise ProfileError(f"profile {where}: must be an object of profile fields, got {type(data).__name__}")
        toml_like = {
            "name": data.get("name"), "backend": data.get("backend"), "description": data.get("description", ""),
            "precision": data.get("precision", {}),
            "shapes": {k: data[k] for k in ("height", "width", "batch") if data.get(k) is not None},
            "sampler": {"kind": data.get("sampler", "auto"), "steps": data.get("steps", 4),
                        "guidance": data.get("guidance"),
                        **({"schedule": data["schedule"]} if "schedule" in data else {})},
            "onnxruntime": data.get("onnxruntime", {}),
            "passes": data.get("passes", {}),
        }
        # Older manifests have neither table; a profile that left them at their defaults round-trips without them.
        # A table that is not one goes to parse_profile as it is, which names it.
        def table(key: str) -> Any:
            value = data.get(key)
            return {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value

        if data.get("tensorrt") and _takes_tensorrt_table(data.get("backend")):
            trt = table("tensorrt")
            if isinstance(trt, dict) and "strongly_typed" not in trt:
                trt["strongly_typed"] = "auto"
            toml_like["tensorrt"] = trt
        if data.get("memory") and (not isinstance(data["memory"], dict) or data["memory"].get("budget_mib") is not None):
            toml_like["memory"] = table("memory")
        if data.get("quantize"):
            toml_like["quantize"] = table("quantize")
        if data.get("cache") and (not isinstance(data["cache"], dict) or data["cache"].get("enabled")):
            toml_like["cache"] = table("cache")
        if data.get("savings"):
            toml_like["savings"] = table("savings")
        return parse_profile(toml_like, where=where)

    def with_overrides(self, **changes) -> "Profile":
        return replace(self, **changes)


def _err(where: str, field_: str, msg: str) -> ProfileError:
    return ProfileError(f"profile {where}: {field_} {msg}")


def _check_keys(table: dict, allowed: set[str], where: str, prefix: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise _err(where, f"{prefix}{extra[0]}", f"is not a known field; known fields here: {sorted(allowed)}")


def _range(value: Any, where: str, field_: str, *, minimum: int = 1, maximum: int) -> Range:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in value)):
        raise _err(where, field_, f"must be a list of three integers [min, opt, max], got {_short(value)}")
    lo, opt, hi = value
    if not (minimum <= lo <= opt <= hi <= maximum):
        raise _err(where, field_, f"must satisfy {minimum} <= min <= opt <= max <= {maximum}, got {value!r}")
    return Range(lo, opt, hi)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _table(data: dict, key: str, where: str) -> dict:
    """``data[key]`` as a TOML table (absent: empty); ``shapes = 5`` names the field instead of crashing on it."""
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise _err(where, f"[{key}]", f"must be a table ([{key}] with key = value lines), got {_short(value)}")
    return value


def _number(table: dict, key: str, default: float | None, where: str, prefix: str, *, lo: float, hi: float,
            lo_open: bool = False) -> float | None:
    """A finite float in [lo, hi] (``(lo, hi]`` with ``lo_open``); TOML's ``nan`` and ``inf`` are refused by name."""
    value = table.get(key, default)
    if value is None:
        return None
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not (lo < value if lo_open else lo <= value) or value > hi):
        bound = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise _err(where, f"{prefix}{key}", f"must be a finite number in {bound}, got {_short(value)}")
    return float(value)


def _bool(table: dict, key: str, default: bool, where: str, prefix: str) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise _err(where, f"{prefix}{key}", f"must be true or false, got {value!r}")
    return value


def _opt_int(table: dict, key: str, where: str, prefix: str, *, lo: int, hi: int | None = None) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise _err(where, f"{prefix}{key}", f"must be an integer {bound}, got {value!r}")
    return value


def _takes_tensorrt_table(backend: Any) -> bool:
    """Whether the ``[tensorrt]`` table applies to ``backend`` (a name; anything else: no), as the backend says
    (``tensorrt_options``, :mod:`diffc.engines`): asking imports diffc's module for it, never TensorRT."""
    return isinstance(backend, str) and backend in backend_names() and get_backend(backend).tensorrt_options


def _parse_tensorrt(table: Any, backend: Backend, where: str) -> TensorRTOptions:
    p = "[tensorrt]."
    if not isinstance(table, dict):
        raise _err(where, "[tensorrt]", "must be a table")
    if table and not _takes_tensorrt_table(backend.value):
        takers = " and ".join(n for n in backend_names() if _takes_tensorrt_table(n))
        raise _err(where, "[tensorrt]", f"applies to the {takers} backends only; this profile's "
                                        f"backend is {backend.value!r}")
    _check_keys(table, {f.name for f in TensorRTOptions.__dataclass_fields__.values()}, where, p)
    ccs = table.get("compute_capabilities", [])
    if not (isinstance(ccs, list) and all(isinstance(c, str) and len(c) > 2 and c[:2] == "SM" and c[2:].isdigit()
                                          for c in ccs)):
        raise _err(where, f"{p}compute_capabilities",
                   f"must be a list of strings like \"SM89\" (SM + major + minor), got {ccs!r}")
    if len(set(ccs)) != len(ccs):
        raise _err(where, f"{p}compute_capabilities", f"lists a compute capability twice: {ccs!r}")
    typed = table.get("strongly_typed", "auto")
    if typed not in ("auto", True, False):
        raise _err(where, f"{p}strongly_typed", f"must be \"auto\", true or false, got {typed!r}")
    hw = table.get("hardware_compat", "none")
    if hw not in HARDWARE_COMPAT:
        raise _err(where, f"{p}hardware_compat", f"must be one of {list(HARDWARE_COMPAT)}, got {hw!r}")
    opts = TensorRTOptions(
        compute_capabilities=tuple(ccs),
        opt_level=_opt_int(table, "opt_level", where, p, lo=0, hi=5) if "opt_level" in table else 3,
        strongly_typed=None if typed == "auto" else typed,
        static_shapes=_bool(table, "static_shapes", False, where, p),
        refit=_bool(table, "refit", False, where, p),
        weight_streaming=_bool(table, "weight_streaming", False, where, p),
        hardware_compat=hw,
        version_compat=_bool(table, "version_compat", False, where, p),
        timing_cache=_bool(table, "timing_cache", True, where, p),
        cuda_graph=_bool(table, "cuda_graph", True, where, p),
        workspace_mib=_opt_int(table, "workspace_mib", where, p, lo=1),
    )
    if backend is Backend.TENSORRT_RTX:
        # TensorRT-RTX has neither: its portability is the compute-capability list, and it ships no lean runtime.
        if opts.hardware_compat != "none":
            raise _err(where, f"{p}hardware_compat", "is a datacenter TensorRT setting; TensorRT-RTX engines run on "
                                                     "the GPUs listed in [tensorrt].compute_capabilities")
        if opts.version_compat:
            raise _err(where, f"{p}version_compat", "is not available with TensorRT-RTX (its engines only run on "
                                                    "the release that built them); set it to false")
        if opts.strongly_typed is False:
            raise _err(where, f"{p}strongly_typed", "cannot be false with TensorRT-RTX, which builds strongly "
                                                    "typed networks only; use \"auto\"")
    return opts


def _parse_memory(table: Any, where: str) -> MemoryBudget:
    if not isinstance(table, dict):
        raise _err(where, "[memory]", "must be a table")
    _check_keys(table, {"budget_mib"}, where, "[memory].")
    return MemoryBudget(budget_mib=_opt_int(table, "budget_mib", where, "[memory].", lo=64))


def _parse_cache(table: Any, where: str, steps: int) -> CacheOptions:
    from diffc.runtime.cache import SCHEDULE_KINDS, full_steps

    p = "[cache]."
    if not isinstance(table, dict):
        raise _err(where, "[cache]", "must be a table")
    _check_keys(table, {f.name for f in CacheOptions.__dataclass_fields__.values()}, where, p)
    schedule = table.get("schedule", "interval")
    if schedule not in SCHEDULE_KINDS:
        raise _err(where, f"{p}schedule", f"must be one of {list(SCHEDULE_KINDS)}, got {schedule!r}")
    mask = table.get("mask", [])
    if not (isinstance(mask, list) and all(v in (0, 1) for v in mask)):  # True/False compare equal to 1/0
        raise _err(where, f"{p}mask", f"must be a list of 1 (full UNet) and 0 (reuse the cache), got {mask!r}")
    if schedule == "mask" and not mask:
        raise _err(where, f"{p}mask", "is required with schedule = \"mask\": one 1/0 per step")
    power = table.get("power", 1.4)
    if not isinstance(power, (int, float)) or isinstance(power, bool) or not 1.0 < power <= 4.0:
        raise _err(where, f"{p}power", f"must be a number in (1, 4], got {power!r}")
    opts = CacheOptions(
        enabled=_bool(table, "enabled", False, where, p),
        branch=_opt_int(table, "branch", where, p, lo=0) if "branch" in table else 0,
        schedule=schedule,
        interval=_opt_int(table, "interval", where, p, lo=1) if "interval" in table else 2,
        mask=tuple(int(v) for v in mask),
        power=float(power),
        center=_opt_int(table, "center", where, p, lo=0),
    )
    if opts.enabled:
        try:  # the schedule must produce a mask for this profile's step count (mask length, center in range)
            full_steps(opts.schedule_dict(), steps)
        except ProfileError as e:
            raise _err(where, "[cache]", f"does not fit [sampler].steps = {steps}: {e}") from None
    return opts


def _parse_savings(table: Any, where: str, *, steps: int, backend: Backend, cache: CacheOptions,
                   tensorrt: TensorRTOptions, guidance: float | None) -> SavingsOptions:
    """``[savings]``, and what it cannot combine with: adaptive guidance needs classifier-free guidance (a
    guidance scale) and a denoiser that accepts half the batch (not a static-shape TensorRT engine);
    extrapolation needs a cached value (``[cache]`` or ``[savings.step_cache]``)."""
    from diffc.runtime.savings import AG_MODES, MAX_ORDER

    p = "[savings]."
    if not isinstance(table, dict):
        raise _err(where, "[savings]", "must be a table")
    _check_keys(table, {f.name for f in SavingsOptions.__dataclass_fields__.values()}, where, p)
    mode = table.get("adaptive_guidance", "off")
    if mode not in AG_MODES:
        raise _err(where, f"{p}adaptive_guidance", f"must be one of {list(AG_MODES)}, got {_short(mode)}")
    from_step = _opt_int(table, "guidance_from_step", where, p, lo=0, hi=steps)
    threshold = _number(table, "guidance_threshold", None, where, p, lo=-1.0, hi=1.0)
    needs = {"static": ("guidance_from_step", from_step), "dynamic": ("guidance_threshold", threshold)}
    for m, (key, value) in needs.items():
        if mode == m and value is None:
            raise _err(where, f"{p}{key}", f"is required with adaptive_guidance = \"{m}\"")
        if mode != m and value is not None:
            raise _err(where, f"{p}{key}", f"goes with adaptive_guidance = \"{m}\", not {mode!r}")
    order = _opt_int(table, "extrapolation_order", where, p, lo=0, hi=MAX_ORDER) or 0
    step_cache = table.get("step_cache", {})
    if not isinstance(step_cache, dict):
        raise _err(where, f"{p}step_cache", f"must be a table ([savings.step_cache]), got {_short(step_cache)}")
    step_cache = _parse_step_cache(step_cache, where)
    opts = SavingsOptions(mode, from_step, threshold, order, dict(step_cache))
    if mode != "off" and guidance is None:
        raise _err(where, f"{p}adaptive_guidance", "needs classifier-free guidance, and [sampler].guidance is unset")
    if mode != "off" and _takes_tensorrt_table(backend.value) and tensorrt.static_shapes:
        raise _err(where, f"{p}adaptive_guidance", "runs the conditional half alone (half the denoiser batch), which "
                   "a static-shape TensorRT engine ([tensorrt].static_shapes = true) cannot take; turn one of them off")
    if order > 0 and not cache.enabled and not step_cache:
        raise _err(where, f"{p}extrapolation_order", "extrapolates cached values, but nothing is cached: enable "
                   "[cache] (DeepCache reuse) or [savings.step_cache]")
    return opts


def _parse_step_cache(table: dict, where: str) -> dict[str, Any]:
    """``[savings.step_cache]`` (diffc.runtime.step_cache): ``threshold`` (required; 0 never skips the tail) and
    ``metric`` (``"rel_l1"``: the accumulated relative L1 change of the first block's output). Empty: off."""
    from diffc.runtime.step_cache import METRICS, check_threshold

    if not table:
        return {}
    p = "[savings.step_cache]."
    _check_keys(table, {"threshold", "metric"}, where, p)
    if "threshold" not in table:
        raise _err(where, f"{p}threshold", "is required (e.g. 0.1; 0: every step runs the whole denoiser)")
    threshold = check_threshold(table["threshold"], ProfileError, f"profile {where}: {p}threshold")
    metric = table.get("metric", "rel_l1")
    if metric not in METRICS:
        hint = " (TeaCache's rescaled modulated-input rule is not built: see docs/manifest.md)" \
            if metric == "teacache" else ""
        raise _err(where, f"{p}metric", f"must be one of {list(METRICS)}{hint}, got {_short(metric)}")
    return {"threshold": threshold, "metric": metric}


def _parse_passes(table: Any, backend: Backend, where: str) -> dict[str, Any]:
    """``[passes]``: names and values are checked by diffc.passes for this target, without loading the pass
    modules (profiles load in the torch- and onnxscript-free runtime)."""
    if not isinstance(table, dict):
        raise _err(where, "[passes]", "must be a table")
    if "disable" in table and not isinstance(table["disable"], list):
        raise _err(where, "[passes].disable", f"must be a list of pass names, got {_short(table['disable'])}")
    from diffc.passes import resolve_options

    try:
        resolve_options(backend.value, table)
    except ProfileError as e:
        raise _err(where, "[passes]", f"is invalid: {e}") from None
    return dict(table)


def _str_list(table: dict, key: str, default: tuple, where: str, prefix: str, *, item=str) -> tuple:
    """A non-empty list of prompts (UTF-8 text) or of seeds (0 to 2**64 - 1, as the runtime takes them)."""
    value = table.get(key, list(default))
    kind = "strings" if item is str else "integers from 0 to 2**64 - 1 (seeds)"
    if not (isinstance(value, list) and value and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
            and (item is str or all(0 <= v <= SEED_MAX for v in value))):
        raise _err(where, f"{prefix}{key}", f"must be a non-empty list of {kind}, got {_short(value)}")
    for v in value if item is str else ():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise _err(where, f"{prefix}{key}", f"holds {_short(v)}, which is not UTF-8 text") from None
    return tuple(value)


def _parse_quantize(table: Any, where: str) -> QuantizeOptions:
    p = "[quantize]."
    if not isinstance(table, dict):
        raise _err(where, "[quantize]", "must be a table")
    _check_keys(table, {f.name for f in QuantizeOptions.__dataclass_fields__.values()}, where, p)
    d = QuantizeOptions()
    method = table.get("method", d.method)
    if method not in CALIBRATION_METHODS:
        raise _err(where, f"{p}method", f"must be one of {list(CALIBRATION_METHODS)}, got {method!r}")
    pct = table.get("percentile", d.percentile)
    if not isinstance(pct, (int, float)) or isinstance(pct, bool) or not 50.0 < pct <= 100.0:
        raise _err(where, f"{p}percentile", f"must be a number in (50, 100], got {pct!r}")
    acts = table.get("activations", d.activations)
    if acts not in ACTIVATION_TYPES:
        raise _err(where, f"{p}activations", f"must be one of {list(ACTIVATION_TYPES)}, got {acts!r}")
    keep = table.get("keep_float", list(d.keep_float))
    from diffc.passes import QUANTIZE_ROLES

    if not isinstance(keep, list) or any(r not in QUANTIZE_ROLES for r in keep):
        raise _err(where, f"{p}keep_float", f"must be a list of layer roles from {list(QUANTIZE_ROLES)}, got {keep!r}")
    psnr = table.get("min_psnr_db", d.min_psnr_db)
    if not isinstance(psnr, (int, float)) or isinstance(psnr, bool) or not 0 <= psnr <= 1000:
        raise _err(where, f"{p}min_psnr_db", f"must be a finite number of dB from 0 (0 turns the gate off) to 1000, "
                                             f"got {_short(psnr)}")
    max_err = table.get("max_abs_error")
    if max_err is not None and (not isinstance(max_err, (int, float)) or isinstance(max_err, bool)
                                or not 0 < max_err <= 1):
        raise _err(where, f"{p}max_abs_error", f"must be a number in (0, 1] (images are in [0, 1]), got {max_err!r}")
    return QuantizeOptions(
        method=method, percentile=float(pct),
        calibration_prompts=_str_list(table, "calibration_prompts", d.calibration_prompts, where, p),
        calibration_seeds=_str_list(table, "calibration_seeds", d.calibration_seeds, where, p, item=int),
        keep_float=tuple(keep), activations=acts,
        gate_prompts=_str_list(table, "gate_prompts", d.gate_prompts, where, p),
        gate_seeds=_str_list(table, "gate_seeds", d.gate_seeds, where, p, item=int),
        min_psnr_db=float(psnr), max_abs_error=None if max_err is None else float(max_err),
        step_groups=_opt_int(table, "step_groups", where, p, lo=1) if "step_groups" in table else 1,
    )


def parse_profile(data: dict[str, Any], *, where: str) -> Profile:
    """A profile from its TOML tables (or :meth:`Profile.to_dict`'s form). Every value is checked for type, range
    and finiteness (TOML has ``nan`` and ``inf``), so any input gives a :class:`Profile` or a
    :class:`ProfileError` naming the field."""
    if not isinstance(data, dict):
        raise ProfileError(f"profile {where}: must be a TOML document of tables, got {type(data).__name__}")
    _check_keys(data, {"name", "description", "backend", "precision", "shapes", "sampler", "onnxruntime", "passes",
                       "tensorrt", "memory", "quantize", "cache", "savings"}, where, "")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise _err(where, "name", "must be a non-empty string")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _err(where, "description", f"must be a string, got {_short(description)}")
    backend_value = data.get("backend", "onnxruntime")
    if backend_value not in [b.value for b in Backend]:
        raise _err(where, "backend", f"must be one of {[b.value for b in Backend]}, got {_short(backend_value)}")
    backend = Backend(backend_value)

    precision: dict[str, Precision] = {}
    prec_table = _table(data, "precision", where)
    _check_keys(prec_table, {"default", *COMPONENTS}, where, "[precision].")
    for comp, value in prec_table.items():
        if value not in [p.value for p in Precision]:
            raise _err(where, f"[precision].{comp}", f"must be one of {[p.value for p in Precision]}, got "
                                                     f"{_short(value)}")
        precision[comp] = Precision(value)

    shapes = _table(data, "shapes", where)
    _check_keys(shapes, {"height", "width", "batch"}, where, "[shapes].")
    height = _range(shapes["height"], where, "[shapes].height", minimum=8, maximum=MAX_PIXELS) \
        if "height" in shapes else None
    width = _range(shapes["width"], where, "[shapes].width", minimum=8, maximum=MAX_PIXELS) \
        if "width" in shapes else None
    batch = _range(shapes["batch"], where, "[shapes].batch", maximum=MAX_BATCH) if "batch" in shapes \
        else Range(1, 1, 4)

    sampler = _table(data, "sampler", where)
    _check_keys(sampler, {"kind", "steps", "guidance", "schedule"}, where, "[sampler].")
    kind = sampler.get("kind", "auto")
    if not isinstance(kind, str) or kind not in SAMPLER_KINDS:
        raise _err(where, "[sampler].kind", f"must be one of {list(SAMPLER_KINDS)}, got {_short(kind)}")
    steps = sampler.get("steps", 4)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1000:
        raise _err(where, "[sampler].steps", f"must be an integer from 1 to 1000, got {_short(steps)}")
    schedule = sampler.get("schedule", "default")
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise _err(where, "[sampler].schedule", f"must be one of {list(SCHEDULES)}, got {_short(schedule)}")
    if schedule == "optimized" and kind in ("lcm", "scm"):
        raise _err(where, "[sampler].schedule", f"'optimized' searches deterministic samplers' timesteps; {kind!r} "
                   "injects fresh noise and is distilled for its own timesteps: use 'default'")
    if schedule == "optimized" and steps >= SCHEDULE_REFERENCE_STEPS:
        raise _err(where, "[sampler].steps", f"must be below {SCHEDULE_REFERENCE_STEPS} (the optimized schedule's "
                   f"reference step count) with schedule = 'optimized', got {steps}")
    # None only from Profile.from_dict (TOML has no null): the model's own default
    guidance = _number(sampler, "guidance", 7.5, where, "[sampler].", lo=0.0, hi=GUIDANCE_MAX)

    ort_table = {"memory_arena": "denoiser", **_table(data, "onnxruntime", where)}
    _check_keys(ort_table, {"intra_op_num_threads", "inter_op_num_threads", "memory_arena"}, where, "[onnxruntime].")
    for key, value in ort_table.items():
        if key == "memory_arena":
            if not isinstance(value, str) or value not in MEMORY_ARENAS:
                raise _err(where, "[onnxruntime].memory_arena", f"must be one of {list(MEMORY_ARENAS)}, got "
                                                                f"{_short(value)}")
        elif not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_PROFILE_THREADS:
            raise _err(where, f"[onnxruntime].{key}", f"must be an integer from 0 (onnxruntime picks) to "
                                                      f"{MAX_PROFILE_THREADS}, got {_short(value)}")

    passes = _parse_passes(data.get("passes", {}), backend, where)
    tensorrt = _parse_tensorrt(data.get("tensorrt", {}), backend, where)
    memory = _parse_memory(data.get("memory", {}), where)
    quantize = _parse_quantize(data.get("quantize", {}), where)
    cache = _parse_cache(data.get("cache", {}), where, steps)
    savings = _parse_savings(data.get("savings", {}), where, steps=steps, backend=backend, cache=cache,
                             tensorrt=tensorrt, guidance=guidance)

    return Profile(
        name=name, backend=backend, description=description, precision=precision,
        height=height, width=width, batch=batch, sampler=kind, steps=steps, schedule=schedule,
        guidance=guidance, onnxruntime=dict(ort_table), passes=passes, tensorrt=tensorrt, memory=memory,
        quantize=quantize, cache=cache, savings=savings, source=where,
    )


def list_profiles() -> dict[str, Path]:
    """Shipped profiles by name."""
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.toml"))}


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a shipped profile by name, or a user's TOML file by path."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    shipped = list_profiles()
    path = Path(name_or_path)
    if str(name_or_path) in shipped:
        path = shipped[str(name_or_path)]
    elif not path.is_file():
        raise ProfileError(
            f"no profile named {str(name_or_path)!r}; shipped profiles: {', '.join(shipped)} "
            "(or pass the path of a .toml file)"
        )
    try:
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise ProfileError(f"profile {path} is {path.stat().st_size // 1024} kB, far more than a profile (a few "
                               "kB); pass the path of a profile .toml file")
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ProfileError(f"profile {path}: is not UTF-8 text (byte {e.start}); TOML files are UTF-8, save it as "
                           "UTF-8") from None
    except RecursionError:
        raise ProfileError(f"profile {path}: nests arrays or tables too deeply to be a profile") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"profile {path}: cannot parse TOML: {e}") from e
    return parse_profile(data, where=f"'{path.name}'")
