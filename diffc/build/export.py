"""Stage 2, export: the model folder -> one ONNX graph per component, checked against PyTorch.

The torch work happens in :mod:`diffc.exporter` (imported when the stage runs, so ``diffc build --dry-run``
and ``import diffc`` stay torch-free); this stage decides what to export, checks the disk first, and collects
what the later stages read: the export report (with the source folder's content hash, which the manifest
records too), the components' configs, the image geometry, the cache plan and the compiled sampler tables.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffc._fs import folder_hash
from diffc.build import controlnet, families, memory, step_cache
from diffc.build.plan import (build_components, cache_plan, check_transformer_profile, geometry_from_configs,
                              transformer_geometry, uses_cfg)
from diffc.errors import DiskSpaceError
from diffc.profiles import Profile

log = logging.getLogger("diffc.build")

#: disk a build needs, in multiples of the exported components' fp32 weight bytes: the export, the passed graphs,
#: onnxruntime's optimizer output, the artifact (and a quantized build's fp32 twin). Measured peaks of the work
#: folder + the artifact for SD 1.5 (4.26 GB fp32): cpu-cache 14.5 GB (3.4x), cpu-int8 + cache 15.1 GB (3.55x).
#: The host engine cache (DIFFC_CACHE_DIR) comes on top.
DISK_FACTOR = 4.0


@dataclass
class Exported:
    """What the export stage hands on. ``pipe`` is the loaded diffusers pipeline: the later stages pass it back
    to :mod:`diffc.exporter` functions (parity checks, sample feeds, tokenizers) and never touch it themselves."""

    model: str
    source: Any  # diffc.exporter.source.ModelSource
    pipe: Any
    components: list[str]
    onnx_dir: Path
    report: dict[str, Any]
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    geometry: dict[str, Any]
    cache: dict[str, Any] | None
    tables: Any  # diffc.runtime.sampler.SamplerTables
    #: the transformer family (diffc.build.families); None for a UNet pipeline, whose ``unet_config`` is the UNet's
    #: (for a transformer pipeline ``unet_config`` holds the transformer's config)
    family: Any = None
    #: the denoiser was exported with its first block's results marked (dynamic step caching: diffc.build.step_cache)
    step_marks: bool = False
    #: the LoRA fingerprints of the pipeline's weights (diffc.exporter.lora.weight_fingerprints), taken when
    #: :meth:`release_torch` drops the modules; None while they are loaded
    weight_prints: Any = None

    def release_torch(self) -> None:
        """Drop the pipeline's torch modules -- every component's fp32 weights -- once the stages that compare
        graphs with PyTorch are done (export, passes, the twin's passes): calibration, the engines and the gate
        run ONNX graphs only, and the modules would sit resident beside their copies (an SD-1.5 build: 4 GB).
        The weights' LoRA fingerprints (what :func:`diffc.build.lora.record` matches the engines' weights with)
        are taken first; the tokenizers stay. Idempotent."""
        from diffc.exporter.export import release_modules

        if self.weight_prints is None:
            self.weight_prints = release_modules(self.pipe)

    @property
    def denoiser(self) -> str:
        """The denoiser component: ``unet`` or ``transformer``."""
        return "unet" if self.family is None else families.TRANSFORMER

    @property
    def cfg(self) -> bool:
        """Whether the loop runs classifier-free guidance batches."""
        if self.family is not None:
            return families.uses_cfg(self.family, self.unet_config, self.source.model_index)
        return uses_cfg(self.unet_config)

    @property
    def source_sha256(self) -> str:
        return self.report["source"]["sha256"]


def check_disk(fp32_bytes: int, work: Path, artifact: Path) -> dict[str, Any]:
    """Refuse before exporting when the work folder's disk (TMPDIR) and the artifact's cannot hold the build
    (onnxruntime would otherwise fail minutes later, writing external data). Returns what was checked."""

    def size(n: int) -> str:
        return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

    need = int(DISK_FACTOR * fp32_bytes)
    out_need = fp32_bytes  # the artifact's share of ``need``
    free = shutil.disk_usage(work).free
    same_disk = os.stat(work).st_dev == os.stat(artifact).st_dev
    if free < (need if same_disk else need - out_need):
        raise DiskSpaceError(
            f"this build needs about {size(need)} of disk ({DISK_FACTOR:g}x the {size(fp32_bytes)} of fp32 weights: "
            f"the ONNX export, the passed graphs, the engines) but {work.parent} has {size(free)} free; free some "
            "space or point TMPDIR at a larger disk")
    out_free = free if same_disk else shutil.disk_usage(artifact).free
    if not same_disk and out_free < out_need:
        raise DiskSpaceError(
            f"the artifact needs up to {size(out_need)} but {artifact.parent} has {size(out_free)} free; free some "
            "space or choose another --out")
    return {"fp32_weight_bytes": fp32_bytes, "need_bytes": need, "free_bytes": free}


def weight_folders(source) -> list[str]:
    """The source folder's subfolders whose weights the build loads (``vae`` once for its encoder and decoder)."""
    from diffc.exporter.source import COMPONENT_FOLDER

    folders = dict.fromkeys(COMPONENT_FOLDER.get(c, c) for c in source.components)
    return [f for f in folders if (source.path / f).is_dir()]


def scheduler_config(source) -> dict[str, Any]:
    """The pipeline's scheduler config as the sampler tables are compiled from it (and the manifest records)."""
    cfg = dict(source.scheduler_config)
    if cfg.get("_class_name") == "PNDMScheduler":
        # PNDM never clips x0; DDIMScheduler.from_config would (its default), which is not what the model
        # was tuned with. SD 1.5's own config spells this out; tiny and older copies may not.
        cfg.setdefault("clip_sample", False)
    return cfg


def export(model: str | Path, profile: Profile, work: Path, artifact: Path, *, exporter: str, progress: bool,
           report: dict[str, Any], loras: list | None = None, force_memory: bool = False,
           vae_decoder: str | Path | None = None) -> Exported:
    """Load ``model`` (a diffusers folder, or ``"demo"`` written into ``work``), check the disk against
    ``artifact``'s, and export the loop's components into ``work/onnx`` (with the UNet's cache-branch features
    as extra outputs when the profile reuses the cache). Records ``memory_check``, ``disk`` and ``timings.export_s``
    in ``report``; refuses, before loading the pipeline, a build that will not fit in memory
    (:func:`diffc.build.memory.check_memory`; ``force_memory`` builds anyway). ``vae_decoder``: a tiny
    ``AutoencoderTiny`` folder (or ``demo-tiny``) exported as the ``vae_decoder`` (:mod:`diffc.exporter.tiny_vae`).
    """
    from diffc.exporter import pipeline_data
    from diffc.exporter.export import export_pipeline_to, load_pipeline, resolve_model
    from diffc.exporter.sampler import compile_sampler, default_kind_for
    from diffc.exporter.source import check_unet_channels, inspect_model

    folder = resolve_model(model, work)
    source = inspect_model(folder)
    tiny = None
    if vae_decoder is not None:  # a wrong folder is refused before the pipeline loads
        from diffc.exporter import tiny_vae

        tiny = tiny_vae.inspect(vae_decoder, model)
    family = families.family_of(source.pipeline_class)
    if family is not None:
        check_transformer_profile(profile, family)
    else:  # before loading: an inpainting UNet saved as text-to-image would load, build, and fail only at run time
        check_unet_channels(source.config("unet"), source.pipeline_class)
        controlnet.check_profile(profile, source.components)  # int8 / cache reuse with ControlNet: refused
    report["memory_check"] = memory.check_memory(folder, weight_folders(source), profile, force=force_memory)
    pipe = load_pipeline(source, loras or ())  # LoRAs (diffc.build.lora.check) fused before export
    components = build_components(source.components, None)  # the ControlNets after the UNet
    report["disk"] = check_disk(pipeline_data.fp32_weight_bytes(pipe, components), work, artifact)

    sched_cfg = scheduler_config(source)
    kind = profile.sampler if profile.sampler != "auto" else default_kind_for(sched_cfg.get("_class_name") or "")
    cfgs = pipeline_data.configs(pipe)
    if family is None:
        tables = compile_sampler(kind, sched_cfg, profile.steps)
        geometry = geometry_from_configs(cfgs["unet"], cfgs["vae"], profile, source.pipeline_class)
        controlnet.add_geometry(geometry, cfgs["unet"], components)
        cache = cache_plan(cfgs["unet"], profile)
    else:
        geometry = transformer_geometry(family, cfgs["transformer"], cfgs["vae"], profile)
        geometry["sequence"].update(pipeline_data.text_lengths(pipe, family))
        # as the pipeline's own __call__ sets its scheduler up (FLUX: its sigmas, and mu for the default size;
        # the runtime recomputes a resolution-dependent shift for every other size)
        f, p = geometry["vae_scale_factor"], geometry["patch"]
        tables = compile_sampler(kind, sched_cfg, profile.steps, pipeline_class=source.pipeline_class,
                                 image_seq_len=(geometry["height"][1] // f // p) * (geometry["width"][1] // f // p))
        cache = None
    tiny_record = None
    if tiny is not None:
        channels = (int(cfgs["unet"].get("out_channels") or cfgs["unet"]["in_channels"]) if family is None
                    else families.latent_channels(family, cfgs["transformer"], cfgs["vae"]))
        tiny_record = tiny_vae.attach(pipe, tiny, latent_channels=channels,
                                      vae_scale_factor=geometry["vae_scale_factor"],
                                      pipeline_class=source.pipeline_class)

    t0 = time.perf_counter()
    onnx_dir = work / "onnx"
    export_report = export_pipeline_to(pipe, source, onnx_dir, components=components, exporter=exporter,
                                       progress=progress, cache_marks=cache is not None,
                                       step_marks=step_cache.enabled(profile))
    export_report["source"] = {"model": str(model), "sha256": folder_hash(folder)}
    if tiny_record is not None:
        export_report["vae_decoder"] = tiny_record  # the manifest's source.vae_decoder
    report["timings"]["export_s"] = round(time.perf_counter() - t0, 3)
    return Exported(model=str(model), source=source, pipe=pipe, components=components, onnx_dir=onnx_dir,
                    report=export_report, unet_config=cfgs.get("unet") or cfgs["transformer"], vae_config=cfgs["vae"],
                    scheduler_config=sched_cfg, geometry=geometry, cache=cache, tables=tables, family=family,
                    step_marks=step_cache.enabled(profile))

