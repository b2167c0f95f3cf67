"""Profile schema, loader and resolution against a model.

A profile is plain data. Each table is validated field by field so an error can say e.g.
``profile 'mine.toml': [sampler].steps must be an integer >= 1, got 0``. Unknown keys are errors too:
a typo must not silently fall back to a default.
"""

from __future__ import annotations

import enum
import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from diffc.errors import ProfileError

PROFILE_DIR = Path(__file__).parent


class Backend(str, enum.Enum):
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt_rtx"
    OPENVINO = "openvino"


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"


SAMPLER_KINDS = ("auto", "ddim", "euler", "dpmpp_2m", "lcm", "flow_euler")
#: TensorRT hardware-compatibility levels (``[tensorrt].hardware_compat``); TensorRT-RTX uses compute capabilities
HARDWARE_COMPAT = ("none", "ampere_plus", "same_compute_capability")
_TRT_BACKENDS = ("tensorrt", "tensorrt_rtx")
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
#: ``[onnxruntime].memory_arena``: ``denoiser`` -- the UNet's sessions keep onnxruntime arenas of their own, the
#: text encoders and VAE decoder (once per image) give their activations back after each run; ``shared`` -- every
#: session draws from one process-wide arena, held at the largest component's peak
MEMORY_ARENAS = ("denoiser", "shared")


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
    guidance: float | None = 7.5
    onnxruntime: dict[str, Any] = field(default_factory=dict)
    #: the ``[passes]`` table: options of diffc.passes.pass_list (validated there, per target)
    passes: dict[str, Any] = field(default_factory=dict)
    tensorrt: TensorRTOptions = TensorRTOptions()
    memory: MemoryBudget = MemoryBudget()
    quantize: QuantizeOptions = QuantizeOptions()
    cache: CacheOptions = CacheOptions()
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
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "<dict>") -> "Profile":
        """Inverse of :meth:`to_dict` (as stored in a manifest)."""
        toml_like = {
            "name": data["name"], "backend": data["backend"], "description": data.get("description", ""),
            "precision": data.get("precision", {}),
            "shapes": {k: data[k] for k in ("height", "width", "batch") if data.get(k) is not None},
            "sampler": {"kind": data.get("sampler", "auto"), "steps": data.get("steps", 4),
                        "guidance": data.get("guidance")},
            "onnxruntime": data.get("onnxruntime", {}),
            "passes": data.get("passes", {}),
        }
        # Older manifests have neither table; a profile that left them at their defaults round-trips without them.
        if data.get("tensorrt") and data["backend"] in _TRT_BACKENDS:
            trt = {k: v for k, v in data["tensorrt"].items() if v is not None}
            if "strongly_typed" not in trt:
                trt["strongly_typed"] = "auto"
            toml_like["tensorrt"] = trt
        if data.get("memory") and data["memory"].get("budget_mib") is not None:
            toml_like["memory"] = dict(data["memory"])
        if data.get("quantize"):
            toml_like["quantize"] = {k: v for k, v in data["quantize"].items() if v is not None}
        if data.get("cache") and data["cache"].get("enabled"):
            toml_like["cache"] = {k: v for k, v in data["cache"].items() if v is not None}
        return parse_profile(toml_like, where=where)

    def with_overrides(self, **changes) -> "Profile":
        return replace(self, **changes)


def base_component(name: str) -> str:
    """The model component an engine is built from: cache reuse's ``unet_shallow`` and the per-step-group
    quantized variants ``unet_g1``, ``unet_g2``... are all the UNet."""
    return "unet" if name == "unet_shallow" or re.fullmatch(r"unet_g[1-9][0-9]*", name) else name


def step_group_components(groups: int) -> list[str]:
    """The UNet engines of ``[quantize].step_groups`` = ``groups``: ``unet`` for the first group, then
    ``unet_g1``, ``unet_g2``..."""
    return ["unet", *(f"unet_g{g}" for g in range(1, groups))]


def _err(where: str, field_: str, msg: str) -> ProfileError:
    return ProfileError(f"profile {where}: {field_} {msg}")


def _check_keys(table: dict, allowed: set[str], where: str, prefix: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise _err(where, f"{prefix}{extra[0]}", f"is not a known field; known fields here: {sorted(allowed)}")


def _range(value: Any, where: str, field_: str, *, minimum: int = 1) -> Range:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in value)):
        raise _err(where, field_, f"must be a list of three integers [min, opt, max], got {value!r}")
    lo, opt, hi = value
    if not (minimum <= lo <= opt <= hi):
        raise _err(where, field_, f"must satisfy {minimum} <= min <= opt <= max, got {value!r}")
    return Range(lo, opt, hi)


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


def _parse_tensorrt(table: Any, backend: Backend, where: str) -> TensorRTOptions:
    p = "[tensorrt]."
    if not isinstance(table, dict):
        raise _err(where, "[tensorrt]", "must be a table")
    if table and backend.value not in _TRT_BACKENDS:
        raise _err(where, "[tensorrt]", f"applies to the tensorrt and tensorrt_rtx backends only; this profile's "
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


def _parse_passes(table: Any, backend: Backend, where: str) -> dict[str, Any]:
    """``[passes]``: names and values are checked by diffc.passes for this target, without loading the pass
    modules (profiles load in the torch- and onnxscript-free runtime)."""
    if not isinstance(table, dict):
        raise _err(where, "[passes]", "must be a table")
    from diffc.passes import resolve_options

    try:
        resolve_options(backend.value, table)
    except ProfileError as e:
        raise _err(where, "[passes]", f"is invalid: {e}") from None
    return dict(table)


def _str_list(table: dict, key: str, default: tuple, where: str, prefix: str, *, item=str) -> tuple:
    value = table.get(key, list(default))
    kind = "strings" if item is str else "integers"
    if not (isinstance(value, list) and value and all(isinstance(v, item) and not isinstance(v, bool) for v in value)):
        raise _err(where, f"{prefix}{key}", f"must be a non-empty list of {kind}, got {value!r}")
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
    if not isinstance(psnr, (int, float)) or isinstance(psnr, bool) or psnr < 0:
        raise _err(where, f"{p}min_psnr_db", f"must be a number >= 0 (0 turns the gate off), got {psnr!r}")
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
    _check_keys(data, {"name", "description", "backend", "precision", "shapes", "sampler", "onnxruntime", "passes",
                       "tensorrt", "memory", "quantize", "cache"}, where, "")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise _err(where, "name", "must be a non-empty string")
    try:
        backend = Backend(data.get("backend", "onnxruntime"))
    except ValueError:
        raise _err(where, "backend", f"must be one of {[b.value for b in Backend]}, got {data.get('backend')!r}") from None

    precision: dict[str, Precision] = {}
    prec_table = data.get("precision", {})
    if not isinstance(prec_table, dict):
        raise _err(where, "[precision]", "must be a table")
    _check_keys(prec_table, {"default", *COMPONENTS}, where, "[precision].")
    for comp, value in prec_table.items():
        try:
            precision[comp] = Precision(value)
        except ValueError:
            raise _err(where, f"[precision].{comp}",
                       f"must be one of {[p.value for p in Precision]}, got {value!r}") from None

    shapes = data.get("shapes", {})
    _check_keys(shapes, {"height", "width", "batch"}, where, "[shapes].")
    height = _range(shapes["height"], where, "[shapes].height", minimum=8) if "height" in shapes else None
    width = _range(shapes["width"], where, "[shapes].width", minimum=8) if "width" in shapes else None
    batch = _range(shapes["batch"], where, "[shapes].batch") if "batch" in shapes else Range(1, 1, 4)

    sampler = data.get("sampler", {})
    _check_keys(sampler, {"kind", "steps", "guidance"}, where, "[sampler].")
    kind = sampler.get("kind", "auto")
    if kind not in SAMPLER_KINDS:
        raise _err(where, "[sampler].kind", f"must be one of {list(SAMPLER_KINDS)}, got {kind!r}")
    steps = sampler.get("steps", 4)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1000:
        raise _err(where, "[sampler].steps", f"must be an integer from 1 to 1000, got {steps!r}")
    guidance = sampler.get("guidance", 7.5)
    if guidance is not None and (not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or guidance < 0):
        raise _err(where, "[sampler].guidance", f"must be a number >= 0, got {guidance!r}")

    if not isinstance(data.get("onnxruntime", {}), dict):
        raise _err(where, "[onnxruntime]", "must be a table")
    ort_table = {"memory_arena": "denoiser", **data.get("onnxruntime", {})}
    _check_keys(ort_table, {"intra_op_num_threads", "inter_op_num_threads", "memory_arena"}, where, "[onnxruntime].")
    for key, value in ort_table.items():
        if key == "memory_arena":
            if value not in MEMORY_ARENAS:
                raise _err(where, "[onnxruntime].memory_arena", f"must be one of {list(MEMORY_ARENAS)}, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _err(where, f"[onnxruntime].{key}", f"must be an integer >= 0, got {value!r}")

    passes = _parse_passes(data.get("passes", {}), backend, where)
    tensorrt = _parse_tensorrt(data.get("tensorrt", {}), backend, where)
    memory = _parse_memory(data.get("memory", {}), where)
    quantize = _parse_quantize(data.get("quantize", {}), where)
    cache = _parse_cache(data.get("cache", {}), where, steps)

    return Profile(
        name=name, backend=backend, description=str(data.get("description", "")), precision=precision,
        height=height, width=width, batch=batch, sampler=kind, steps=steps,
        guidance=float(guidance) if guidance is not None else None, onnxruntime=dict(ort_table), passes=passes, tensorrt=tensorrt,
        memory=memory, quantize=quantize, cache=cache, source=where,
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
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ProfileError(f"profile {path}: cannot parse TOML: {e}") from e
    return parse_profile(data, where=f"'{path.name}'")
