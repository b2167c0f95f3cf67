"""Stage 8, manifest: the typed writer of ``manifest.json``, the counterpart of :mod:`diffc.runtime.manifest`.

Every field the runtime reads is a field of :class:`Manifest`, filled from the other stages' results
(:func:`compose`). :meth:`Manifest.write` writes strict JSON (no bare ``NaN``, ever) and reads the file back
with the runtime's own reader (its JSON schema and consistency checks): a build cannot produce an artifact
its runtime would refuse. docs/manifest.md describes the fields.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata as md
from pathlib import Path
from typing import Any

from diffc import __version__
from diffc.build import controlnet, families
from diffc.build.export import Exported
from diffc.build.report import write_json
from diffc.engines import get_backend
from diffc.errors import ManifestError
from diffc.profiles import Profile
from diffc.names import step_group_components
from diffc.runtime.inpaint import manifest_entry as inpaint_entry
from diffc.runtime.manifest import MANIFEST_NAME, read_manifest, written_schema_version

#: packages whose versions a manifest records (what a rebuild needs to reproduce the build)
VERSIONED = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy")


#: fields left out of the file when None
OPTIONAL = ("step_variants", "cache", "denoiser", "loras", "lora_targets", "inpaint", "controlnets", "savings")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class Manifest:
    """``manifest.json`` as data; the field order is the file's."""

    source: dict[str, Any]
    profile: dict[str, Any]
    build: dict[str, Any]
    components: dict[str, Any]
    text_encoders: list[dict[str, Any]]
    added_conditions: dict[str, Any]
    latent: dict[str, Any]
    image: dict[str, Any]
    guidance: dict[str, Any]
    sampler: dict[str, Any]
    step_variants: dict[str, Any] | None = None
    cache: dict[str, Any] | None = None
    #: a transformer family's denoiser section (diffc.build.families.denoiser_entry); None: the UNet
    denoiser: dict[str, Any] | None = None
    #: LoRAs fused at build and where each LoRA-addressable weight lives in the engines (diffc.build.lora)
    loras: list[dict[str, Any]] | None = None
    lora_targets: dict[str, Any] | None = None
    #: an inpainting UNet's sample layout (diffc.runtime.inpaint.manifest_entry); None: the UNet takes latents alone
    inpaint: dict[str, Any] | None = None
    #: the ControlNets and how the loop feeds their residuals to the UNet (diffc.build.controlnet.manifest_entry)
    controlnets: dict[str, Any] | None = None
    #: training-free step savings (the profile's [savings]; diffc.runtime.savings); None: none
    savings: dict[str, Any] | None = None
    #: None: the oldest schema that holds the fields used (diffc.runtime.manifest.written_schema_version)
    schema_version: int | None = None
    diffc_version: str = __version__
    created: str = dataclasses.field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        head = {"schema_version": self.schema_version, "diffc_version": self.diffc_version, "created": self.created}
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in head}
        body = {k: v for k, v in body.items() if v is not None or k not in OPTIONAL}
        if head["schema_version"] is None:
            head["schema_version"] = written_schema_version(body)
        return {**head, **body}

    def write(self, artifact: Path) -> Path:
        """Write ``artifact/manifest.json`` and check it with the runtime's reader."""
        path = write_json(artifact / MANIFEST_NAME, self.to_dict())
        try:
            read_manifest(artifact)
        except ManifestError as e:
            raise ManifestError(f"diffc wrote a manifest its own runtime refuses ({e}); this is a bug in diffc, "
                                "please report it with the profile") from e
        return path


def versions(profile: Profile | None = None) -> dict[str, str]:
    """Installed versions of the packages the build ran with, and of the target backend."""
    out = {}
    for pkg in VERSIONED:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if profile is not None:
        backend = get_backend(profile.backend)
        out.setdefault(backend.name, backend.version())
    return out


def guidance(exported: Exported, profile: Profile) -> dict[str, Any]:
    """The guidance policy: embedded in the UNet (LCM-style ``timestep_cond``), none, or classifier-free; a
    transformer family's as :func:`diffc.build.families.guidance_mode` says."""
    unet_cfg = exported.unet_config
    if exported.family is not None:
        return families.guidance_mode(exported.family, unet_cfg, profile.guidance, exported.source.model_index)
    if unet_cfg.get("time_cond_proj_dim") is not None:
        return {"mode": "embedded", "default_scale": profile.guidance if profile.guidance is not None else 8.5,
                "embedding_dim": int(unet_cfg["time_cond_proj_dim"]), "input": "timestep_cond"}
    if profile.guidance is None:
        return {"mode": "none", "default_scale": 1.0}
    is_sdxl = "text_encoder_2" in exported.source.components
    return {"mode": "cfg", "default_scale": profile.guidance, "batch_order": ["uncond", "cond"],
            "zero_uncond_for_empty_negative": bool(
                is_sdxl and exported.source.model_index.get("force_zeros_for_empty_prompt", True))}


def added_conditions(unet_cfg: dict[str, Any]) -> dict[str, Any]:
    """SDXL's extra UNet inputs: the pooled text embedding and the size/crop time ids."""
    if unet_cfg.get("addition_embed_type") != "text_time":
        return {}
    return {"text_embeds": {"from": "text_encoder_2", "output": "pooled_output"},
            "time_ids": {"layout": ["height", "width", "crop_top", "crop_left", "height", "width"]}}


def step_variants(exported: Exported, report: dict[str, Any]) -> dict[str, Any] | None:
    """Per-step-group UNets (``[quantize].step_groups`` > 1): which variant each step runs, by timestep."""
    from diffc.build.calibrate import timestep_bounds

    groups = report["components"].get("unet", {}).get("quantization", {}).get("calibration", {}).get("step_groups")
    if not groups:
        return None
    return {"components": step_group_components(len(groups)),
            "timestep_bounds": timestep_bounds(exported.tables.timesteps, [g["steps"] for g in groups]),
            "steps": [g for g, grp in enumerate(groups) for _ in grp["steps"]]}


def _strict_json(config: dict[str, Any]) -> dict[str, Any]:
    """The scheduler config as strict JSON: a non-finite default (``lambda_min_clipped = -inf``) is written as the
    string ``"-Infinity"``, the spelling diffusers' own config files use."""
    def fix(v: Any) -> Any:
        if isinstance(v, float) and v != v:
            return "NaN"
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            return "Infinity" if v > 0 else "-Infinity"
        return v
    return {k: fix(v) for k, v in config.items()}


def savings(profile: Profile, guidance_entry: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's ``savings`` section from the profile's ``[savings]``; adaptive guidance on a model that does
    not guide with classifier-free guidance (LCM's embedded scale, a guidance-distilled transformer) is refused
    here, the first stage that knows the guidance mode."""
    from diffc.errors import ProfileError

    section = profile.savings.manifest_section()
    if section is not None and section["adaptive_guidance"]["mode"] != "off" and guidance_entry["mode"] != "cfg":
        raise ProfileError(f"profile {profile.name!r}: [savings].adaptive_guidance drops the uncond half of "
                           f"classifier-free guidance, but this model guides with mode {guidance_entry['mode']!r}; "
                           "set adaptive_guidance = \"off\"")
    return section


def _with_step_cache(section: dict[str, Any] | None, exported: Exported, profile: Profile,
                     report: dict[str, Any]) -> dict[str, Any] | None:
    """``section`` with the profile's ``[savings.step_cache]`` table replaced by what the build made of it."""
    if section is None or not exported.step_marks:
        return section
    from diffc.build import step_cache

    return {**section, "step_cache": step_cache.manifest_entry(profile, report, exported.denoiser)}


def compose(exported: Exported, profile: Profile, components: dict[str, Any], text_encoders: list[dict[str, Any]],
            report: dict[str, Any], *, exporter: str) -> Manifest:
    """The manifest of an artifact from the stages' results."""
    unet_cfg, vae_cfg, geometry = exported.unet_config, exported.vae_config, exported.geometry
    cache = None
    if exported.cache is not None:
        split = report["components"]["unet"]["cache_split"]
        cache = {**exported.cache, "nodes": split["nodes"], "shallow_fraction": split["shallow_fraction"]}
    return Manifest(
        source={"model": exported.model, "pipeline_class": exported.source.pipeline_class,
                "sha256": exported.source_sha256,
                # --vae-decoder: the tiny decoder's origin and scaling (diffc.exporter.tiny_vae); the runtime
                # decodes as `latent` says either way (the rescaling is folded into the graph)
                **({"vae_decoder": exported.report["vae_decoder"]} if "vae_decoder" in exported.report else {})},
        profile=profile.to_dict(),
        build={"exporter": exporter, "opset": exported.report["opset"], "versions": versions(profile),
               "passes": report["pass_order"], "scheduler_config": _strict_json(exported.scheduler_config)},
        components=components,
        text_encoders=text_encoders,
        added_conditions=added_conditions(unet_cfg),
        # a UNet's output channels: an inpainting UNet takes more than the latents (the inpaint entry)
        latent={"channels": int(unet_cfg.get("out_channels") or unet_cfg["in_channels"]) if exported.family is None
                else families.latent_channels(exported.family, unet_cfg, vae_cfg),
                "scaling_factor": float(vae_cfg["scaling_factor"]),
                "shift_factor": float(vae_cfg.get("shift_factor") or 0.0),
                "vae_scale_factor": geometry["vae_scale_factor"]},
        image={"height": geometry["height"], "width": geometry["width"], "multiple_of": geometry["multiple_of"],
               "batch": profile.batch.to_list()},
        guidance=guidance(exported, profile),
        sampler=exported.tables.to_dict(),
        step_variants=step_variants(exported, report),
        cache=cache,
        savings=_with_step_cache(savings(profile, guidance(exported, profile)), exported, profile, report),
        denoiser=None if exported.family is None else families.denoiser_entry(exported.family, unet_cfg),
        inpaint=inpaint_entry(unet_cfg) if exported.family is None else None,
        controlnets=controlnet.manifest_entry(unet_cfg, exported.components) if exported.family is None else None,
    )
