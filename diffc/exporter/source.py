"""Reading a diffusers pipeline folder without torch: which pipeline, which components, which files.

This module is torch-free on purpose: ``diffc build --dry-run`` and the error messages for a bad folder
must work on a runtime-only install.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

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

#: graph component -> the folder it is loaded from
COMPONENT_FOLDER = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
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
                return _read_json(p)
        raise MissingComponentError(
            f"{self.path / folder} has no config.json; re-save the pipeline with diffusers' save_pretrained()"
        )

    @property
    def scheduler_config(self) -> dict:
        cfg = dict(self.config("scheduler"))
        cfg.setdefault("_class_name", self.model_index.get("scheduler", [None, None])[1])
        return cfg


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}; the pipeline folder looks corrupt, re-save it") from e


def inspect_model(path: str | Path) -> ModelSource:
    """Validate a diffusers pipeline folder and say what diffc will export from it."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist; pass a diffusers pipeline folder or the word 'demo'")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ModelError(
            f"{path} has no model_index.json, so it is not a diffusers pipeline folder; save one with "
            "pipeline.save_pretrained(DIR), or use 'demo'"
        )
    index = _read_json(index_path)
    cls = index.get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise UnsupportedPipelineError(
            f"pipeline class {cls!r} is not supported; diffc builds: {', '.join(sorted(SUPPORTED_PIPELINES))}"
        )
    components, folders = SUPPORTED_PIPELINES[cls]
    for folder in folders:
        entry = index.get(folder)
        if not entry or entry == [None, None] or not (path / folder).is_dir():
            raise MissingComponentError(
                f"{cls} needs the component '{folder}', but {path / folder} is missing (or null in "
                "model_index.json); copy the whole pipeline folder, not only some of its components"
            )
    return ModelSource(path=path, pipeline_class=cls, components=components, model_index=index)
