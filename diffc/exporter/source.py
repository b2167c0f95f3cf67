"""Reading a diffusers pipeline folder without torch: which pipeline, which components, which files.

This module is torch-free on purpose: ``diffc build --dry-run`` and the error messages for a bad folder
must work on a runtime-only install.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from diffc.errors import MissingComponentError, ModelError, UnsupportedPipelineError

#: pipeline class -> (graph components to export, folders that must exist)
SUPPORTED_PIPELINES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "StableDiffusionPipeline": (
        ("text_encoder", "unet", "vae_decoder", "vae_encoder"),
        ("text_encoder", "tokenizer", "unet", "vae", "scheduler"),
    ),
    "StableDiffusionXLPipeline": (
        ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"),
        ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler"),
    ),
    "LatentConsistencyModelPipeline": (
        ("text_encoder", "unet", "vae_decoder", "vae_encoder"),
        ("text_encoder", "tokenizer", "unet", "vae", "scheduler"),
    ),
}
# The image-to-image classes hold the same components (an artifact with a vae_encoder does both: diffc.runtime.img2img)
SUPPORTED_PIPELINES["StableDiffusionImg2ImgPipeline"] = SUPPORTED_PIPELINES["StableDiffusionPipeline"]
SUPPORTED_PIPELINES["StableDiffusionXLImg2ImgPipeline"] = SUPPORTED_PIPELINES["StableDiffusionXLPipeline"]
SUPPORTED_PIPELINES["LatentConsistencyModelImg2ImgPipeline"] = SUPPORTED_PIPELINES["LatentConsistencyModelPipeline"]
#: the inpainting classes, with the components of their text-to-image class (the vae_encoder encodes the image and the
#: masked image): a 9-channel UNet takes the mask inputs, a 4-channel one inpaints by the latent blend
#: (diffc.runtime.inpaint); their UNet is the one whose input channels may differ from its output channels
INPAINT_PIPELINES = {"StableDiffusionInpaintPipeline": "StableDiffusionPipeline",
                     "StableDiffusionXLInpaintPipeline": "StableDiffusionXLPipeline"}
for _inpaint, _base in INPAINT_PIPELINES.items():
    SUPPORTED_PIPELINES[_inpaint] = SUPPORTED_PIPELINES[_base]
#: the ControlNet classes: their base class's components plus ``controlnet`` (and ``controlnet_1``, ... for a
#: ``MultiControlNetModel``: :func:`controlnet_components`); diffc.exporter.controlnet exports them
CONTROLNET_PIPELINES = {"StableDiffusionControlNetPipeline": "StableDiffusionPipeline",
                        "StableDiffusionXLControlNetPipeline": "StableDiffusionXLPipeline"}
for _control, _base in CONTROLNET_PIPELINES.items():
    SUPPORTED_PIPELINES[_control] = tuple(part + ("controlnet",) for part in SUPPORTED_PIPELINES[_base])

#: pipeline classes with a transformer denoiser (diffc.exporter.dit exports them, diffc.build.families says how the
#: loop runs them); ``diffc build`` builds them too. Same layout as above.
TRANSFORMER_PIPELINES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "FluxPipeline": (
        ("text_encoder", "text_encoder_2", "transformer", "vae_decoder"),
        ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae", "scheduler"),
    ),
    "StableDiffusion3Pipeline": (
        ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"),
        ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
         "transformer", "vae", "scheduler"),
    ),
    "PixArtSigmaPipeline": (
        ("text_encoder", "transformer", "vae_decoder"),
        ("text_encoder", "tokenizer", "transformer", "vae", "scheduler"),
    ),
    "SanaPipeline": (
        ("text_encoder", "transformer", "vae_decoder"),
        ("text_encoder", "tokenizer", "transformer", "vae", "scheduler"),
    ),
    "SanaSprintPipeline": (
        ("text_encoder", "transformer", "vae_decoder"),
        ("text_encoder", "tokenizer", "transformer", "vae", "scheduler"),
    ),
    "Flux2KleinPipeline": (
        ("text_encoder", "transformer", "vae_decoder"),
        ("text_encoder", "tokenizer", "transformer", "vae", "scheduler"),
    ),
    "Flux2Pipeline": (
        ("text_encoder", "transformer", "vae_decoder"),
        ("text_encoder", "tokenizer", "transformer", "vae", "scheduler"),
    ),
}

#: graph component -> the folder it is loaded from
COMPONENT_FOLDER = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "text_encoder_3": "text_encoder_3",
    "transformer": "transformer",
    "unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
}


@dataclass
class ModelSource:
    path: Path
    pipeline_class: str
    components: tuple[str, ...]
    model_index: dict = field(repr=False)

    def config(self, folder: str) -> dict:
        """The ``config.json`` (or ``scheduler_config.json``) of a component folder."""
        for name in ("config.json", "scheduler_config.json"):
            p = self.path / folder / name
            if p.is_file():
                return _read_json(p, folder if folder in _CONFIG_SCHEMAS else None)
        raise MissingComponentError(
            f"{self.path / folder} has no config.json; re-save the pipeline with diffusers' save_pretrained()"
        )

    @property
    def scheduler_config(self) -> dict:
        cfg = dict(self.config("scheduler"))
        cfg.setdefault("_class_name", self.model_index.get("scheduler", [None, None])[1])
        return cfg


#: the fields of each config that diffc reads without torch (``--dry-run``, the image geometry, the cache plan,
#: the manifest): a wrong type there must be a ModelError naming the field, not a TypeError deep in the build.
#: Everything else in a config is diffusers' business (from_pretrained checks it when the build loads the model).
_CONFIG_SCHEMAS: dict[str, dict[str, Any]] = {
    "model_index.json": {
        "type": "object",
        "required": ["_class_name"],
        "properties": {"_class_name": {"type": "string"}},
        # components: [library, class] pairs, or [null, null] for one the pipeline was saved without
        "additionalProperties": {"anyOf": [
            {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": ["string", "null"]}},
            {"not": {"type": "array"}},  # _diffusers_version, requires_safety_checker, ...
        ]},
    },
    "unet": {
        "type": "object",
        "required": ["block_out_channels", "sample_size"],
        "properties": {
            "block_out_channels": {"$ref": "#/$defs/channels"},
            "sample_size": {"anyOf": [{"type": "integer", "minimum": 1},
                                      {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1}}]},
            "in_channels": {"type": "integer", "minimum": 1},
            "out_channels": {"type": "integer", "minimum": 1},
            "layers_per_block": {"anyOf": [{"type": "integer", "minimum": 1},
                                           {"type": "array", "items": {"type": "integer", "minimum": 1}}]},
            "time_cond_proj_dim": {"type": ["integer", "null"], "minimum": 1},
            "addition_embed_type": {"type": ["string", "null"]},
        },
    },
    "vae": {
        "type": "object",
        # AutoencoderKL has block_out_channels; Sana's AutoencoderDC encoder_block_out_channels
        "anyOf": [{"required": ["block_out_channels"]}, {"required": ["encoder_block_out_channels"]}],
        "properties": {
            "block_out_channels": {"$ref": "#/$defs/channels"},
            "encoder_block_out_channels": {"$ref": "#/$defs/channels"},
            "latent_channels": {"type": "integer", "minimum": 1},
            "scaling_factor": {"type": "number", "exclusiveMinimum": 0},
            "shift_factor": {"type": ["number", "null"]},
        },
    },
    "scheduler": {
        "type": "object",
        "properties": {
            "_class_name": {"type": "string"},
            # betas are probabilities; a negative one reaches torch.linspace as a complex sqrt
            "beta_start": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "beta_end": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "num_train_timesteps": {"type": "integer", "minimum": 2},
        },
    },
}
_DEFS = {"channels": {"type": "array", "minItems": 1, "maxItems": 16, "items": {"type": "integer", "minimum": 1}}}
#: a diffusers config is a few kB; a multi-MB "config" is not one
_MAX_CONFIG_BYTES = 4 * 2**20


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _scheduler_constant(name: str) -> float:
    """diffusers writes a scheduler default of -inf as ``-Infinity`` (DPMSolverMultistepScheduler's
    ``lambda_min_clipped``, in PixArt-Sigma's and Sana's saved configs); only NaN is refused there."""
    if name in ("Infinity", "-Infinity"):
        return float(name.replace("Infinity", "inf"))
    return _refuse_constant(name)


def _where(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "the top level"


def _read_json(path: Path, schema: str | None = None) -> dict:
    """A config file as a dict, or a :class:`ModelError` naming the file (and the field, for ``schema``)."""
    fix = "the pipeline folder looks corrupt; re-save it with diffusers' save_pretrained()"
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ModelError(f"{path} is {path.stat().st_size // 2**20} MiB, not a diffusers config; {fix}")
        constants = _scheduler_constant if schema == "scheduler" else _refuse_constant
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=constants)
    except UnicodeDecodeError as e:
        raise ModelError(f"cannot read {path}: not UTF-8 text (byte {e.start}); {fix}") from None
    except RecursionError:
        raise ModelError(f"cannot read {path}: nested too deeply to be a diffusers config; {fix}") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}; {fix}") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    if schema is not None:
        validator = jsonschema.Draft202012Validator({**_CONFIG_SCHEMAS[schema], "$defs": _DEFS})
        try:
            error = best_match(validator.iter_errors(data))
        except RecursionError:
            raise ModelError(f"cannot read {path}: nested too deeply to be a diffusers config; {fix}") from None
        if error is not None:
            message = error.message if len(error.message) <= 160 else error.message[:160] + "..."
            raise ModelError(f"{path}: {_where(error.absolute_path)}: {message}; {fix}")
    return data


#: what ``diffc export`` takes but ``diffc build`` does not (none at present: every exported family builds)
EXPORT_ONLY_PIPELINES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _unsupported(cls: str, purpose: str) -> UnsupportedPipelineError:
    builds = ", ".join(sorted({**SUPPORTED_PIPELINES, **TRANSFORMER_PIPELINES}))
    if cls in EXPORT_ONLY_PIPELINES and purpose == "build":
        return UnsupportedPipelineError(
            f"pipeline class {cls!r} can be exported (diffc export) but not built yet; diffc builds: {builds}")
    from diffc.build.families import REFUSED  # torch-free data

    if cls in REFUSED:
        return UnsupportedPipelineError(
            f"pipeline class {cls!r} is not supported: {REFUSED[cls]}. diffc builds: {builds}")
    return UnsupportedPipelineError(
        f"pipeline class {cls!r} is not supported; diffc builds: {builds}. "
        "Other variants of these (FLUX fill, Kontext, SD3 / FLUX ControlNet and the other "
        "control pipeline classes) are not supported: "
        "save the base text-to-image (or image-to-image) pipeline instead")


def is_inpainting_unet(unet_cfg: dict[str, Any]) -> bool:
    """A UNet whose input is latents + 1 mask channel + masked-image latents (SD-inpainting: 9 in, 4 out)."""
    # diffusers' UNet2DConditionModel defaults: in_channels = out_channels = 4
    in_ch, out_ch = unet_cfg.get("in_channels", 4), unet_cfg.get("out_channels", 4)
    return in_ch == 2 * out_ch + 1


def check_unet_channels(unet_cfg: dict[str, Any], pipeline_class: str | None = None) -> None:
    """Refuse a UNet that does not map latents to latents, unless the folder is an inpainting pipeline
    (:data:`INPAINT_PIPELINES`) and the UNet takes the inpainting inputs. The inpainting UNet (9 input channels:
    latents, mask, masked-image latents; 4 out) saved under ``StableDiffusionPipeline`` would otherwise build,
    and only fail at ``diffc run`` (the text-to-image loop feeds it 4-channel latents). The build calls it before
    loading the pipeline, the plan (``--dry-run``) in :func:`diffc.build.plan.geometry_from_configs`."""
    in_ch, out_ch = unet_cfg.get("in_channels", 4), unet_cfg.get("out_channels", 4)
    if in_ch == out_ch:
        return
    inpainting = is_inpainting_unet(unet_cfg)
    if inpainting and pipeline_class in INPAINT_PIPELINES:
        return
    if inpainting:
        raise UnsupportedPipelineError(
            f"this pipeline's unet/config.json describes an inpainting UNet ({in_ch} input channels: {out_ch} latent + "
            f"1 mask + {out_ch} masked-image latent; {out_ch} out), which a {pipeline_class or 'text-to-image'} "
            "pipeline cannot run; if it is an inpainting checkpoint, set \"_class_name\" in model_index.json to "
            f"{', '.join(sorted(INPAINT_PIPELINES))} (diffc builds it for inpainting: diffc run --image --mask), "
            "else build the model's text-to-image checkpoint instead (its UNet has in_channels == out_channels)")
    raise UnsupportedPipelineError(
        f"this pipeline's unet/config.json describes a UNet with {in_ch} input but {out_ch} output channels, which "
        "no pipeline diffc builds can run (it takes in_channels == out_channels, or an inpainting UNet's "
        f"2 x {out_ch} + 1 under {', '.join(sorted(INPAINT_PIPELINES))}); build the model's text-to-image "
        "checkpoint instead")


def inspect_model(path: str | Path, *, purpose: str = "build") -> ModelSource:
    """Validate a diffusers pipeline folder and say what diffc will export from it.

    ``purpose``: ``"build"`` accepts the pipelines diffc builds (:data:`SUPPORTED_PIPELINES`,
    :data:`TRANSFORMER_PIPELINES`), ``"export"`` also those it only exports (:data:`EXPORT_ONLY_PIPELINES`);
    anything else is an :class:`UnsupportedPipelineError`.
    """
    if purpose not in ("build", "export"):
        raise ValueError(f"purpose must be 'build' or 'export', got {purpose!r}")
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist; pass a diffusers pipeline folder or the word 'demo'")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ModelError(
            f"{path} has no model_index.json, so it is not a diffusers pipeline folder; save one with "
            "pipeline.save_pretrained(DIR), or use 'demo'"
        )
    index = _read_json(index_path, "model_index.json")
    cls = index["_class_name"]
    known = {**SUPPORTED_PIPELINES, **TRANSFORMER_PIPELINES,
             **(EXPORT_ONLY_PIPELINES if purpose == "export" else {})}
    if cls not in known:
        raise _unsupported(cls, purpose)
    if index.get("requires_aesthetics_score"):  # the SDXL refiner's time ids: an aesthetic score, no target size
        raise UnsupportedPipelineError(
            f"{path}: {cls} saved with requires_aesthetics_score = true (the SDXL refiner's micro-conditioning), which "
            "diffc does not build; build a pipeline whose model_index.json has requires_aesthetics_score false "
            "(SDXL base, SDXL inpainting 0.1)")
    components, folders = known[cls]
    for folder in folders:
        entry = index.get(folder)
        if not isinstance(entry, list) or entry == [None, None] or not (path / folder).is_dir():
            raise MissingComponentError(
                f"{cls} needs the component '{folder}', but {path / folder} is missing (or null in "
                "model_index.json); copy the whole pipeline folder, not only some of its components"
            )
    if cls in CONTROLNET_PIPELINES:
        components = components + controlnet_components(path, index)[1:]
    return ModelSource(path=path, pipeline_class=cls, components=components, model_index=index)


def controlnet_components(path: Path, index: dict) -> tuple[str, ...]:
    """The ControlNet components of a ControlNet pipeline folder: ``controlnet`` alone, or for a
    ``MultiControlNetModel`` every folder diffusers loads it from (``controlnet``, ``controlnet_1``, ... while
    they exist: ``MultiControlNetModel.from_pretrained``)."""
    if index.get("controlnet", [None, None])[1] != "MultiControlNetModel":
        return ("controlnet",)
    names = ["controlnet"]
    while (path / f"controlnet_{len(names)}").is_dir():
        names.append(f"controlnet_{len(names)}")
    return tuple(names)
