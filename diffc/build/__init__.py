"""``diffc build``: a diffusers pipeline folder -> an artifact (manifest + engines + tokenizers), in stages.

==============  ============================================================================================
``plan``        profile checks, image geometry, shape ranges, cache plan (torch-free: ``--dry-run``)
``export``      the loop's components to ONNX, checked against PyTorch (:mod:`diffc.exporter` does the work)
``passes``      the profile's ordered graph passes, parity against PyTorch again, the cache-reuse split
``twin``        gated profiles: the fp32 onnxruntime twin, for calibration and the quality gate
``quantize``    calibration in the twin's loop, Q/DQ insertion, and (after assembly) the quality gate
``engines``     each graph -> the target backend's engine; this host's engine cache filled
``tokenizers``  the text encoders' tokenizers and conditioning
``manifest``    ``manifest.json``: everything the sampling loop needs, precomputed (docs/manifest.md)
==============  ============================================================================================

The artifact is assembled in a temporary folder next to ``out`` and renamed into place at the end, so an
interrupted build leaves nothing half-written; work files live in a temporary folder in ``TMPDIR``.

This ``__init__`` imports only light modules: ``import diffc`` binds :func:`build` from here. ``diffc.build``
is therefore the function, not this package: import the stages as ``from diffc.build import plan`` or
``from diffc.build.plan import shape_ranges``, not ``import diffc.build.plan``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from diffc.errors import ProfileError

__all__ = ["build"]

log = logging.getLogger("diffc.build")


def build(model: str | Path, profile: Any = "cpu", out: str | Path | None = None, *, force: bool = False,
          steps: int | None = None, sampler: str | None = None, exporter: str = "torchscript", progress: bool = True,
          no_cache: bool = False, verify_passes: bool = False, loras: Any = None,
          force_memory: bool = False, vae_decoder: str | Path | None = None) -> Path:
    """Build an artifact from ``model`` (a diffusers folder, or ``"demo"``) for ``profile`` (a name, a .toml
    path or a :class:`~diffc.profiles.Profile`) at ``out``; returns its path. ``no_cache``: rebuild TensorRT
    engines the build cache holds; ``verify_passes``: run the onnx checker and shape inference after every pass.

    A profile with int8 / fp8 components also builds its fp32 onnxruntime twin (in the work folder), runs its
    sampling loop to calibrate, inserts Q/DQ, and gates the result against it (:mod:`diffc.build.quantize`); a
    CPU profile with bf16 / fp16 compute (the default ``cpu``) builds the twin and is gated the same way
    (:func:`diffc.build.plan.gated`). ``loras``: ``[(file, scale), ...]`` (or ``{file: scale}``) fused into the
    weights before export, and recorded in the manifest (:mod:`diffc.build.lora`). ``force_memory``: build even
    when the memory check (:func:`diffc.build.memory.check_memory`, before exporting) says it will not fit.
    The report's ``memory`` holds each stage's peak RSS (:class:`diffc.build.memory.StageMemory`).
    ``vae_decoder``: a diffusers ``AutoencoderTiny`` folder (TAESD-style), or ``"demo-tiny"``, whose decoder
    replaces the VAE's in the artifact (the VAE's encoder stays: :mod:`diffc.exporter.tiny_vae`).
    """
    from diffc._fs import atomic_output_dir, work_dir
    from diffc.build import (engines, export, lora, manifest, memory, passes, plan, quantize, schedule_search,
                             step_cache, tokenizers, twin)
    from diffc.build.report import write_json

    prof = plan.resolve_profile(profile, steps=steps, sampler=sampler)
    plan.check_profile(prof)
    loras = lora.check(loras)
    if out is None:
        raise ProfileError("no output folder given; pass --out ARTIFACT")
    out = Path(out)
    t_start = time.perf_counter()
    report: dict[str, Any] = {"profile": prof.name, "components": {}, "timings": {}}
    protect = () if str(model) in ("demo", "demo-dit") else (model,)  # --force never replaces the model folder itself

    with work_dir("diffc-build") as work, memory.StageMemory() as mem, \
            atomic_output_dir(out, force=force, what="artifact", protect=protect) as tmp:
        with mem.stage("export"):
            exported = export.export(model, prof, work, tmp, exporter=exporter, progress=progress, report=report,
                                     loras=loras, force_memory=force_memory, vae_decoder=vae_decoder)
        prof = plan.for_denoiser(prof, exported.denoiser)  # [precision].unet is a transformer's precision too
        if prof.schedule == "optimized":  # refuse a sampler the search cannot serve before the passes run
            schedule_search.check(exported.tables.kind, exported.tables, exported.tables.num_steps)
        quantized = prof.quantized_components(tuple(exported.components))

        report["pass_order"] = passes.pass_order(prof)
        report["passes_reused"] = False
        with mem.stage("passes"):
            graphs = passes.run(exported, prof, work / "passed", report, verify=verify_passes, progress=progress)
        names = plan.build_components(exported.components, exported.cache)
        if exported.step_marks:  # the dynamic step cache's head and tail (diffc.build.step_cache)
            names = step_cache.components(names, exported.denoiser)

        reference = None
        if plan.gated(prof):
            with mem.stage("twin"):
                reference = twin.build(exported, prof, graphs, report, work, exporter=exporter,
                                       verify_passes=verify_passes, progress=progress)
        if prof.schedule == "optimized":  # before calibration: it and the gate run the chosen schedule
            with mem.stage("schedule_search"):
                schedule_search.stage(exported, prof, graphs, reference, work, report, exporter=exporter,
                                      verify_passes=verify_passes, progress=progress)
        exported.release_torch()  # nothing after this compares with PyTorch: the modules' weights can go
        if quantized:
            with mem.stage("quantize"):
                quantize.quantize(prof, quantized, reference, graphs, work, report, progress=progress)
            at = names.index(exported.denoiser) + 1  # the step-group variants unet_g1, ...: right after the UNet
            names[at:at] = [n for n in graphs if n not in names]

        with mem.stage("engines"):
            components = engines.build(exported, prof, graphs, names, tmp, report, no_cache=no_cache,
                                       progress=progress)
        with mem.stage("warm_host_cache"):
            engines.warm_host_cache(prof, tmp, components, report)
        with mem.stage("manifest"):
            encoders = tokenizers.write(exported, tmp)
            written = manifest.compose(exported, prof, components, encoders, report, exporter=exporter)
            lora.record(written, exported, components, tmp, loras)
            written.write(tmp)

        if reference is not None:
            t0 = time.perf_counter()
            with mem.stage("gate"):
                report["quality_gate"] = quantize.gate(prof, quantized, reference, tmp, graphs,
                                                       step_variants=written.step_variants, progress=progress)
            report["timings"]["quality_gate_s"] = round(time.perf_counter() - t0, 3)
        report["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
        report["memory"] = mem.report()
        write_json(tmp / "build_report.json", report, infinities=True)
        write_json(tmp / "export_report.json", exported.report, infinities=True)
    log.info("built %s in %.1f s", out, time.perf_counter() - t_start)
    return out
