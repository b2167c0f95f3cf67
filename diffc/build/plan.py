"""Stage 1, plan: what a build will make, decided from the profile and the components' config.json alone.

Everything here is torch-free and backend-free, so ``diffc build --dry-run`` (:func:`plan`) runs in the
runtime install, and a build refuses a profile it cannot satisfy (:func:`check_profile`) before the minutes
of export: pixel-size ranges checked against what the UNet and VAE can tile, per-component shape ranges as
the sampling loop will feed them, the cache-reuse plan, the components in build order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from diffc.engines import get_backend
from diffc.errors import BackendUnavailableError, ProfileError
from diffc.passes import activation_type
from diffc.profiles import Profile, list_profiles, load_profile
from diffc.names import base_component, step_group_components
from diffc.profiles.schema import Precision, Range
from diffc.exporter.source import check_unet_channels
from diffc.exporter.unet_blocks import branch_info, feature_dims, unet_branches
from diffc.runtime.cache import full_steps
from diffc.build import controlnet, families

#: components the text-to-image loop runs, in build order (a pipeline has a ``unet`` or a ``transformer``)
TXT2IMG_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder")
#: the denoiser components: the UNet, or a DiT family's transformer (diffc.build.families)
DENOISERS = ("unet", families.TRANSFORMER)
#: built after the loop's components when the pipeline has them: the VAE encoder takes an input image to latents
#: (image-to-image, :mod:`diffc.runtime.img2img`)
IMAGE_INPUT_COMPONENTS = ("vae_encoder",)
#: the token length every CLIP text encoder of a supported pipeline is fed
SEQUENCE = 77
#: components diffc can quantize: the denoiser, where most of the time goes, and the VAE decoder, which takes
#: a large share of a few-step generation (SD 1.5 at 256x256: ~0.6 TFLOP per image, as much as ~1.7 UNet steps
#: with CFG); the text encoder runs once per prompt on 77 tokens and is not worth its error
QUANTIZABLE = ("unet", "vae_decoder")
#: what int8 builds for a transformer denoiser: the backends whose gate runs here (onnxruntime and OpenVINO run the
#: int8 artifact itself, TensorRT-RTX's Q/DQ graph runs on onnxruntime's CPU kernels); fp8 Q/DQ has no CPU kernels,
#: so a transformer's fp8 build could not be gated on this machine and is refused
TRANSFORMER_QUANTIZED = (Precision.INT8,)


def for_denoiser(profile: Profile, denoiser: str) -> Profile:
    """``profile`` as the build of a pipeline whose denoiser is ``denoiser`` reads it: a profile's
    ``[precision].unet`` is the denoiser's precision whichever architecture it is, so one profile (cpu-int8,
    rtx-int8...) builds the UNet and every transformer family, and the transformer's engine, manifest entry and
    quantization all see the same precision."""
    if denoiser == "unet" or denoiser in profile.precision or "unet" not in profile.precision:
        return profile
    return dataclasses.replace(profile, precision={**profile.precision, denoiser: profile.precision["unet"]})


def quantized_components(profile: Profile, components, denoiser: str = "unet") -> dict[str, Precision]:
    """``{component: precision}`` the build quantizes among ``components`` (the denoiser's precision is the
    profile's ``[precision].unet``: :func:`for_denoiser`)."""
    return for_denoiser(profile, denoiser).quantized_components(tuple(components))


#: reduced float precisions the build gates against the fp32 twin when the build machine runs them (backends
#: that ``runs_on_build_host``): OpenVINO's bf16 (the default ``cpu`` profile); a GPU profile's fp16 engine cannot
#: run here
REDUCED_FLOATS = (Precision.BF16, Precision.FP16)


def gated(profile: Profile) -> bool:
    """Whether a build of ``profile`` builds the fp32 onnxruntime twin and gates the artifact against it: int8 /
    fp8 components (calibrated on the twin too), or bf16 / fp16 compute on a CPU backend, whose error against
    exact fp32 is as much a property of the model as int8's is -- the default profile must not ship an
    artifact that drifted from what the model draws."""
    if profile.quantized_components():
        return True
    return get_backend(profile.backend).runs_on_build_host and any(
        profile.precision_of(c) in REDUCED_FLOATS for c in ("default", *TXT2IMG_COMPONENTS))


def resolve_profile(profile: str | Path | Profile, *, steps: int | None = None,
                    sampler: str | None = None) -> Profile:
    """The profile a build runs with: loaded (typed errors), with the command line's overrides applied."""
    prof = load_profile(profile)
    if steps is not None or sampler is not None:
        prof = prof.with_overrides(steps=steps or prof.steps, sampler=sampler or prof.sampler)
    return prof


def check_profile(profile: Profile, graphs: dict[str, Path] | None = None) -> dict[str, Precision]:
    """Refuse what the profile's target cannot build before any work (a backend that is not installed, a
    precision it lacks, a component diffc does not quantize); with ``graphs`` (after the passes) also what needs
    the graphs themselves (TensorRT int8 / fp8 without Q/DQ). Returns ``{component: precision}`` to quantize."""
    quantized = check_quantization(profile)
    get_backend(profile.backend).check_profile(profile, graphs)
    from diffc.build import step_cache

    step_cache.check(profile)  # [savings.step_cache] with [cache], int8, a backend it is not built for: refused
    return quantized


def fp8_profiles() -> list[str]:
    """Shipped profiles that build fp8 (for error messages)."""
    out = []
    for name in list_profiles():
        prof = load_profile(name)
        if any(p is Precision.FP8 for p in prof.precision.values()):
            out.append(name)
    return out


def check_quantization(profile: Profile) -> dict[str, Precision]:
    """Refuse what cannot be quantized before any work; return ``{component: precision}`` to quantize."""
    wanted = profile.quantized_components()
    for comp, prec in wanted.items():
        if prec is Precision.FP8 and not get_backend(profile.backend).fp8_kernels:
            raise BackendUnavailableError(
                f"profile {profile.name!r} asks for fp8 ({comp}), but the {profile.backend.value} backend has no FP8 "
                f"kernels (FP8 Q/DQ does not run there); use a TensorRT profile for fp8 ({', '.join(fp8_profiles())}), "
                "or int8 (cpu-int8) on the CPU")
        if comp not in QUANTIZABLE:
            raise ProfileError(
                f"profile {profile.name!r}: [precision].{comp} = {prec.value!r}, but diffc quantizes only "
                f"{list(QUANTIZABLE)} (the denoiser, where the sampling time goes); set {comp} to fp32 or fp16")
    groups = profile.quantize.step_groups
    if wanted and groups > 1:
        if groups > profile.steps:
            raise ProfileError(f"profile {profile.name!r}: [quantize].step_groups = {groups} is more than the "
                               f"{profile.steps} sampling steps; use at most {profile.steps} groups")
        if profile.cache.enabled:
            raise ProfileError(f"profile {profile.name!r}: [quantize].step_groups > 1 does not combine with cache "
                               "reuse ([cache].enabled) yet; use one of them, or step_groups = 1 with the cache")
    return wanted


def describe_quantization(profile: Profile, precision: Precision, component: str = "unet") -> dict[str, Any]:
    """What a build will do to quantize a component (for ``diffc build --dry-run``)."""
    q = profile.quantize
    groups = q.step_groups if component == "unet" else 1
    calls = f"{profile.steps} steps" if component in DENOISERS else "the final latents of each image"
    return {"activations": activation_type(profile, precision), "keep_float": list(q.keep_float),
            "step_groups": groups,
            **({"step_group_engines": step_group_components(groups)} if groups > 1 else {}),
            "calibration": {"method": q.method, "percentile": q.percentile,
                            "images": len(q.calibration_prompts) * len(q.calibration_seeds), "records": calls,
                            "runs": "the fp32 onnxruntime twin of this artifact, built in the work folder"},
            "quality_gate": {"images": len(q.gate_prompts) * len(q.gate_seeds), "min_psnr_db": q.min_psnr_db,
                             "max_abs_error": q.max_abs_error}}


def _round_to(v: int, m: int) -> int:
    return max(m, (v // m) * m)


def _size_ranges(profile: Profile, derived: Range, multiple: int, why: str) -> dict[str, list[int]]:
    """``height`` / ``width`` ranges: the profile's ``[shapes]`` or ``derived``, each value a multiple of ``multiple``
    (``why`` says what makes it one)."""
    out = {}
    for key in ("height", "width"):
        rng = getattr(profile, key) or derived
        bad = [v for v in rng.to_list() if v % multiple]
        if bad:
            raise ProfileError(f"profile {profile.source or profile.name}: [shapes].{key} values {bad} are not "
                               f"multiples of {multiple} ({why})")
        out[key] = rng.to_list()
    return out


def geometry_from_configs(unet_cfg: dict[str, Any], vae_cfg: dict[str, Any], profile: Profile,
                          pipeline_class: str | None = None) -> dict[str, Any]:
    """Pixel size ranges from the UNet's and VAE's config.json, checked against what they can tile: every size a
    multiple of the VAE factor x the UNet's downsampling. Without ``[shapes]`` in the profile: half, one and
    two times the model's native size. A UNet that does not map latents to latents is refused, unless it is an
    inpainting UNet of an inpainting ``pipeline_class``."""
    check_unet_channels(unet_cfg, pipeline_class)
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    unet_mult = 2 ** (len(unet_cfg["block_out_channels"]) - 1)
    multiple = vae_factor * unet_mult
    sample = unet_cfg["sample_size"]
    native = int(sample[0] if isinstance(sample, (list, tuple)) else sample) * vae_factor
    native = _round_to(native, multiple)
    derived = Range(_round_to(native // 2, multiple), native, native * 2)
    out = {"vae_scale_factor": vae_factor, "multiple_of": multiple}
    out.update(_size_ranges(profile, derived, multiple, f"VAE factor {vae_factor} x UNet downsampling {unet_mult}"))
    return out


def check_transformer_profile(profile: Profile, family: families.Family) -> None:
    """Refuse, before any export, what diffc does not build for a transformer denoiser yet: cache reuse (its
    split is written for the UNet's skip connections), fp8 (its gate cannot run on this machine:
    :data:`TRANSFORMER_QUANTIZED`) and per-step-group int8 variants (the runtime picks ``unet_g1``... by name).
    int8 builds: calibrated in the fp32 twin's loop and gated as for the UNet."""
    where = f"profile {profile.name!r}"
    if profile.cache.enabled:
        raise ProfileError(f"{where} reuses cached UNet features ([cache].enabled), which diffc does not build for "
                           f"transformer denoisers ({family.name}); use cpu, cpu-fp32 or cpu-openvino")
    quantized = quantized_components(profile, (families.TRANSFORMER, "vae_decoder"), families.TRANSFORMER)
    refused = {c: p for c, p in quantized.items() if p not in TRANSFORMER_QUANTIZED}
    if refused:
        raise ProfileError(f"{where} quantizes {sorted(refused)} to {sorted({p.value for p in refused.values()})}"
                           f", which diffc does not build for transformer denoisers ({family.name}) yet (no CPU "
                           "kernels to gate it with); use an int8 profile (cpu-int8, cpu-openvino-int8, rtx-int8) or "
                           "a float one (cpu, cpu-fp32, cpu-openvino, rtx-fp16)")
    if quantized and profile.quantize.step_groups > 1:
        raise ProfileError(f"{where}: [quantize].step_groups = {profile.quantize.step_groups}, but per-step-group "
                           f"variants are built for the UNet only, not for transformer denoisers ({family.name}) yet; "
                           "set step_groups = 1")


def transformer_geometry(family: families.Family, transformer_cfg: dict[str, Any], vae_cfg: dict[str, Any],
                         profile: Profile) -> dict[str, Any]:
    """:func:`geometry_from_configs` for a transformer family: every size a multiple of the VAE factor x the
    transformer's patch (FLUX: its 2x2 packing), and the text length each component is fed."""
    vae_factor = families.vae_scale_factor(vae_cfg)
    patch = families.patch_size(family, transformer_cfg)
    multiple = vae_factor * patch
    native = _round_to(families.native_latent(transformer_cfg, vae_cfg) * vae_factor, multiple)
    derived = Range(_round_to(native // 2, multiple), native, native * 2)
    out: dict[str, Any] = {"vae_scale_factor": vae_factor, "multiple_of": multiple, "patch": patch,
                           "packed": family.latent_layout == "packed_2x2",
                           "sequence": {e.component: e.max_length for e in family.encoders}}
    out["sequence"][families.TRANSFORMER] = families.text_sequence(family)
    out.update(_size_ranges(profile, derived, multiple, f"VAE factor {vae_factor} x transformer patch {patch}"))
    return out


def shape_ranges(component: str, profile: Profile, geometry: dict[str, Any], *, cfg: bool,
                 feature_level: int | None = None) -> dict[str, list[int]]:
    """[min, opt, max] per dynamic axis of one component, as the loop will feed it.

    Classifier-free guidance runs uncond and cond in one denoiser batch, so the UNet's batch range doubles
    (its minimum stays 1: guidance <= 1 skips the uncond half). ``unet_shallow`` (cache reuse) takes the UNet's
    inputs plus the cached feature, ``latent / 2**feature_level`` in height and width.
    """
    f = geometry["vae_scale_factor"]
    b = profile.batch
    # also unet_shallow and the step-group variants unet_g1...
    unet = base_component(component) in DENOISERS
    batch = [b.min, 2 * b.opt, 2 * b.max] if (cfg and unet and profile.guidance) else b.to_list()
    ranges: dict[str, list[int]] = {"batch": batch}
    if component.startswith("text_encoder") or unet:
        seq = geometry.get("sequence", {}).get(base_component(component), SEQUENCE)
        ranges["sequence"] = list(seq) if isinstance(seq, (list, tuple)) else [seq] * 3
    if geometry.get("packed") and unet:
        # FLUX's transformer takes 2x2-packed tokens: (h/2)(w/2) of them, no height / width axes
        p = geometry["patch"]
        ranges["image_sequence"] = [(h // f // p) * (w // f // p) for h, w in zip(geometry["height"],
                                                                                   geometry["width"])]
    elif unet or component == "vae_decoder":
        ranges["height"] = [v // f for v in geometry["height"]]
        ranges["width"] = [v // f for v in geometry["width"]]
    elif component == "vae_encoder":
        ranges["image_height"], ranges["image_width"] = list(geometry["height"]), list(geometry["width"])
    if component == "unet_shallow" and feature_level:
        for axis, name in zip(("height", "width"), feature_dims(feature_level)):
            ranges[name] = [max(1, v // 2 ** feature_level) for v in ranges[axis]]
    if controlnet.names([component]):
        # a ControlNet takes the UNet's latents and text, and the control image at the output's pixel size
        ranges.update(shape_ranges("unet", profile, geometry, cfg=cfg))
        ranges["image_height"], ranges["image_width"] = list(geometry["height"]), list(geometry["width"])
    if unet and geometry.get("control_levels"):  # the UNet's ControlNet residual inputs, latent / 2**level
        for level in range(1, geometry["control_levels"] + 1):
            for axis, name in zip(("height", "width"), feature_dims(level)):
                ranges[name] = [max(1, v // 2 ** level) for v in ranges[axis]]
    return ranges


def uses_cfg(unet_cfg: dict[str, Any]) -> bool:
    """Whether the loop runs classifier-free guidance batches (a guidance-embedded UNet does not)."""
    return unet_cfg.get("time_cond_proj_dim") is None


def cache_plan(unet_cfg: dict[str, Any], profile: Profile) -> dict[str, Any] | None:
    """The manifest's ``cache`` entry (without the split's node counts) when the profile enables cache reuse:
    the branch checked against the UNet (typed error naming the valid range), its feature, and the per-step
    full/shallow mask precomputed from the schedule. None when ``[cache].enabled`` is false."""
    if not profile.cache.enabled:
        return None
    info = branch_info(unet_cfg, profile.cache.branch, where=f"profile {profile.source or profile.name}: "
                                                             "[cache].branch")
    schedule = profile.cache.schedule_dict()
    return {"branch": info["branch"], "feature": info["feature"], "level": info["level"],
            "channels": info["channels"], "branches": len(unet_branches(unet_cfg)),
            "full_component": "unet", "shallow_component": "unet_shallow",
            "schedule": schedule, "full_steps": full_steps(schedule, profile.steps)}


def build_components(present, cache: dict[str, Any] | None) -> list[str]:
    """The components to build, in order: the loop's, plus ``unet_shallow`` after ``unet`` with cache reuse."""
    out: list[str] = []
    for name in (c for c in TXT2IMG_COMPONENTS + IMAGE_INPUT_COMPONENTS if c in present):
        out.append(name)
        if name == "unet" and cache is not None:
            out.append("unet_shallow")
        if name == "unet":
            out.extend(controlnet.names(present))  # each ControlNet of a ControlNet pipeline (diffc.build.controlnet)
    return out


def describe_component(profile: Profile, name: str, ranges: dict[str, list[int]]) -> dict[str, Any]:
    """One component's entry in :func:`plan`: the backend's own build description (TensorRT: its flags and
    optimization profiles; the others: backend, precision and shape ranges)."""
    return get_backend(profile.backend).describe_build(profile, name, ranges)


def plan(model: str | Path, profile: str | Path | Profile = "cpu", *, steps: int | None = None,
         sampler: str | None = None) -> dict[str, Any]:
    """What :func:`diffc.build` would build (components, precisions, shape ranges, backend flags), without
    exporting or building anything: no torch, no backend needed (``diffc build --dry-run``). Raises the errors a
    build would raise before exporting (bad profile field, precision the targets cannot run)."""
    from diffc.exporter.source import inspect_model

    prof = resolve_profile(profile, steps=steps, sampler=sampler)
    quantized = check_quantization(prof)
    from diffc.build import step_cache

    step_cache.check(prof)  # the refusals a build makes first ([savings.step_cache] with [cache], int8, ...)
    if str(model) == "demo":
        from diffc.exporter.demo import demo_configs

        configs = demo_configs()
        unet_cfg, vae_cfg, present = configs["unet"], configs["vae"], ("text_encoder", "unet", "vae_decoder",
                                                                         "vae_encoder")
    else:
        if str(model) == "demo-dit":  # the bundled transformer demo: plan from its configs (no weights, no torch)
            import tempfile

            from diffc.exporter.demo_dit import write_demo_dit_configs

            with tempfile.TemporaryDirectory(prefix="diffc-demo-dit-plan-") as tmp:
                source = inspect_model(write_demo_dit_configs(tmp))
                return _plan_transformer(model, prof, source, families.family_of(source.pipeline_class))
        source = inspect_model(model)
        family = families.family_of(source.pipeline_class)
        if family is not None:
            return _plan_transformer(model, prof, source, family)
        unet_cfg, vae_cfg, present = source.config("unet"), source.config("vae"), source.components
    geometry = geometry_from_configs(unet_cfg, vae_cfg, prof, None if str(model) == "demo" else source.pipeline_class)
    controlnet.check_profile(prof, present)
    controlnet.add_geometry(geometry, unet_cfg, present)
    out: dict[str, Any] = {"model": str(model), "profile": prof.name, "backend": prof.backend.value,
                           "image": {k: geometry[k] for k in ("height", "width")}, "batch": prof.batch.to_list(),
                           "components": {}}
    cache = cache_plan(unet_cfg, prof)
    if cache is not None:
        out["cache"] = cache
    if gated(prof) and not quantized:
        q = prof.quantize
        out["quality_gate"] = {"images": len(q.gate_prompts) * len(q.gate_seeds), "min_psnr_db": q.min_psnr_db,
                               "max_abs_error": q.max_abs_error,
                               "against": "the fp32 onnxruntime twin of this artifact, built in the work folder"}
    for name in build_components(present, cache):
        ranges = shape_ranges(name, prof, geometry, cfg=uses_cfg(unet_cfg),
                              feature_level=cache["level"] if cache else None)
        out["components"][name] = describe_component(prof, name, ranges)
        if name in quantized:
            out["components"][name]["quantization"] = describe_quantization(prof, quantized[name], name)
    return out


def _plan_transformer(model: str | Path, prof: Profile, source, family: families.Family) -> dict[str, Any]:
    """:func:`plan` for a transformer pipeline: the refusals a build makes first, the geometry, the family's
    denoiser entry and every component's build. (Sana's Gemma-2 length with its instruction is known only to
    the tokenizer, so the plan shows ``max_sequence_length`` there; the build uses the exact count.)"""
    check_transformer_profile(prof, family)
    prof = for_denoiser(prof, families.TRANSFORMER)
    tcfg, vae_cfg = source.config(families.TRANSFORMER), source.config("vae")
    geometry = transformer_geometry(family, tcfg, vae_cfg, prof)
    out: dict[str, Any] = {"model": str(model), "profile": prof.name, "backend": prof.backend.value,
                           "family": family.name, "image": {k: geometry[k] for k in ("height", "width")},
                           "batch": prof.batch.to_list(), "denoiser": families.denoiser_entry(family, tcfg),
                           "guidance": families.guidance_mode(family, tcfg, prof.guidance, source.model_index),
                           "components": {}}
    quantized = quantized_components(prof, source.components, families.TRANSFORMER)
    if gated(prof) and not quantized:
        q = prof.quantize
        out["quality_gate"] = {"images": len(q.gate_prompts) * len(q.gate_seeds), "min_psnr_db": q.min_psnr_db,
                               "max_abs_error": q.max_abs_error,
                               "against": "the fp32 onnxruntime twin of this artifact, built in the work folder"}
    for name in build_components(source.components, None):
        ranges = shape_ranges(name, prof, geometry, cfg=families.uses_cfg(family, tcfg, source.model_index))
        out["components"][name] = describe_component(prof, name, ranges)
        if name in quantized:
            out["components"][name]["quantization"] = describe_quantization(prof, quantized[name], name)
    return out
