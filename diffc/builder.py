"""``diffc build``: export -> passes -> engines -> artifact (manifest + engines + tokenizer).

The artifact is assembled in a temporary folder next to ``out`` and renamed into place at the end, so an
interrupted build leaves nothing half-written. Everything the sampling loop needs is precomputed here and
written into ``manifest.json`` (see docs/manifest.md).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from diffc import __version__
from diffc._fs import atomic_output_dir, folder_hash, sha256_file
from diffc.errors import BackendUnavailableError, DiskSpaceError, ParityError, ProfileError
from diffc.onnx_io import load_model, save_model
from diffc.passes import pass_list, run_passes
from diffc.profiles import Profile, load_profile
from diffc.profiles.schema import Backend, Precision, Range, base_component, step_group_components
from diffc.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION
from diffc.runtime.pipeline import open_sessions

log = logging.getLogger("diffc.build")

#: components the text-to-image loop runs, in build order
TXT2IMG_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
TENSORRT_BACKENDS = (Backend.TENSORRT, Backend.TENSORRT_RTX)

def _check_tensorrt(profile: Profile, graphs: dict[str, Path] | None = None) -> None:
    """Refuse what the TensorRT profile cannot build before any work: a missing backend, a precision the
    targets lack, and (with ``graphs``, after export) int8/fp8 components whose graphs carry no Q/DQ."""
    from diffc.engines import tensorrt as trt_engine

    flavour = profile.backend.value
    if trt_engine.available(flavour) is None:
        raise BackendUnavailableError(f"profile {profile.name!r} builds {flavour} engines, and {flavour} is not "
                                      f"installed; install it with {trt_engine.EXTRAS[flavour]}")
    for comp in (graphs or TXT2IMG_COMPONENTS):
        trt_engine.check_precision(profile.precision_of(comp), backend=flavour,
                                   compute_capabilities=profile.tensorrt.compute_capabilities,
                                   strongly_typed=profile.tensorrt.strongly_typed,
                                   graph=graphs[comp] if graphs else None, component=comp, profile=profile.name)


def _check_openvino(profile: Profile) -> None:
    from diffc.engines import openvino as ov_engine

    if ov_engine.available() is None:
        raise BackendUnavailableError(f"profile {profile.name!r} builds for OpenVINO, which is not installed; install "
                                      f"it with {ov_engine.EXTRA}")
    for comp, prec in profile.precision.items():
        if prec.value not in ov_engine.PRECISIONS:
            raise BackendUnavailableError(
                f"profile {profile.name!r} asks for {prec.value} ({comp}); the openvino backend builds "
                f"{', '.join(ov_engine.PRECISIONS)} (int8: the denoiser and VAE decoder, cpu-openvino-int8)")


def _check_backend(profile: Profile) -> None:
    from diffc.quantization import check_quantization

    check_quantization(profile)  # fp8 on the CPU, int8 on a component diffc does not quantize
    if profile.backend in TENSORRT_BACKENDS:
        _check_tensorrt(profile)
        return
    if profile.backend is Backend.OPENVINO:
        _check_openvino(profile)
        return
    if profile.backend is not Backend.ONNXRUNTIME:
        raise BackendUnavailableError(
            f"profile {profile.name!r} targets {profile.backend.value}, which this diffc build cannot produce yet; "
            "use the 'cpu' profile"
        )
    for comp, prec in profile.precision.items():
        if prec not in (Precision.FP32, Precision.INT8):
            raise BackendUnavailableError(
                f"profile {profile.name!r} asks for {prec.value} ({comp}); the onnxruntime CPU backend builds fp32, "
                "and int8 for the denoiser (cpu-int8)"
            )


def _round_to(v: int, m: int) -> int:
    return max(m, (v // m) * m)


def image_geometry(pipe, profile: Profile) -> dict[str, Any]:
    """Pixel size ranges, checked against what the UNet and VAE can tile."""
    return geometry_from_configs(dict(pipe.unet.config), dict(pipe.vae.config), profile)


def geometry_from_configs(unet_cfg: dict[str, Any], vae_cfg: dict[str, Any], profile: Profile) -> dict[str, Any]:
    """:func:`image_geometry` from the components' config.json (torch-free: ``--dry-run`` uses it)."""
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    unet_mult = 2 ** (len(unet_cfg["block_out_channels"]) - 1)
    multiple = vae_factor * unet_mult
    sample = unet_cfg["sample_size"]
    native = int(sample[0] if isinstance(sample, (list, tuple)) else sample) * vae_factor
    native = _round_to(native, multiple)
    derived = Range(_round_to(native // 2, multiple), native, native * 2)
    out = {"vae_scale_factor": vae_factor, "multiple_of": multiple}
    for key in ("height", "width"):
        rng = getattr(profile, key) or derived
        bad = [v for v in rng.to_list() if v % multiple]
        if bad:
            raise ProfileError(f"profile {profile.source or profile.name}: [shapes].{key} values {bad} are not "
                               f"multiples of {multiple} (VAE factor {vae_factor} x UNet downsampling {unet_mult})")
        out[key] = rng.to_list()
    return out


def shape_ranges(component: str, profile: Profile, geometry: dict[str, Any], *, cfg: bool,
                 feature_level: int | None = None) -> dict[str, list[int]]:
    """[min, opt, max] per dynamic axis of one component, as the loop will feed it.

    Classifier-free guidance runs uncond and cond in one denoiser batch, so the UNet's batch range doubles
    (its minimum stays 1: guidance <= 1 skips the uncond half). ``unet_shallow`` (cache reuse) takes the UNet's
    inputs plus the cached feature, ``latent / 2**feature_level`` in height and width.
    """
    from diffc.runtime.cache import feature_dims

    f = geometry["vae_scale_factor"]
    b = profile.batch
    unet = base_component(component) == "unet"  # also unet_shallow and the step-group variants unet_g1...
    batch = [b.min, 2 * b.opt, 2 * b.max] if (cfg and unet and profile.guidance) else b.to_list()
    ranges: dict[str, list[int]] = {"batch": batch}
    if component.startswith("text_encoder") or unet:
        ranges["sequence"] = [77, 77, 77]
    if unet or component == "vae_decoder":
        ranges["height"] = [v // f for v in geometry["height"]]
        ranges["width"] = [v // f for v in geometry["width"]]
    if component == "unet_shallow" and feature_level:
        for axis, name in zip(("height", "width"), feature_dims(feature_level)):
            ranges[name] = [max(1, v // 2 ** feature_level) for v in ranges[axis]]
    return ranges


def _split_cache(marked: Path, out: Path, cache: dict[str, Any], module, contract, shapes) -> dict[str, Any]:
    """Split the passed, cache-marked UNet into ``out/unet`` (full) and ``out/unet_shallow``, and check the cut:
    on the sample inputs, the shallow graph fed the full graph's feature must give the full graph's output."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from diffc.passes.cache_reuse import split
    from diffc.runtime.cache import feature_dims

    full, shallow, rep = split(load_model(marked), cache["branch"],
                               dims=("batch", None, *feature_dims(cache["level"])))
    paths = {"full": save_model(full, out / "unet" / "model.onnx"),
             "shallow": save_model(shallow, out / "unet_shallow" / "model.onnx")}
    del full, shallow
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    worst = 0.0
    for shape in shapes:
        inputs = contract.make_inputs(module, shape, torch.Generator().manual_seed(0))
        feeds = {n: t.numpy() for n, t in zip(contract.input_names, inputs)}
        out_full, feature = sess["full"].run(["out_sample", cache["feature"]], feeds)
        out_shallow = sess["shallow"].run(["out_sample"], {**feeds, cache["feature"]: feature})[0]
        worst = max(worst, float(np.abs(out_full.astype(np.float64) - out_shallow).max()))
    rep["shallow_check"] = {"max_abs_err": worst, "passed": worst <= contract.atol}
    if worst > contract.atol:
        raise ParityError(f"the shallow UNet (cache branch {cache['branch']}) differs from the full UNet by "
                          f"{worst:.3g} on the same feature; the cut is wrong. Build without [cache] and report "
                          "the model config")
    return rep


def _fast_tokenizer(pipe, source_path: Path, folder_name: str):
    from transformers import CLIPTokenizerFast

    tok = getattr(pipe, folder_name)
    if getattr(tok, "is_fast", False):
        return tok
    return CLIPTokenizerFast.from_pretrained(source_path / folder_name)


def _io(model_path: Path) -> dict[str, list[dict[str, Any]]]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)

    def spec(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {"inputs": [spec(i) for i in model.graph.input], "outputs": [spec(o) for o in model.graph.output]}


def _versions(profile: Profile | None = None) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if profile is not None and profile.backend in TENSORRT_BACKENDS:
        from diffc.engines import tensorrt as trt_engine

        out[profile.backend.value] = trt_engine.version(profile.backend.value)
    if profile is not None and profile.backend is Backend.OPENVINO:
        from diffc.engines import openvino as ov_engine

        out["openvino"] = ov_engine.version()
    return out


def plan(model: str | Path, profile: str | Path | Profile = "cpu", *, steps: int | None = None,
         sampler: str | None = None) -> dict[str, Any]:
    """What :func:`build` would build (components, precisions, shape ranges, backend flags), without exporting
    or building anything: no torch, no backend needed (``diffc build --dry-run``). Raises the errors a build
    would raise before exporting (bad profile field, precision the targets cannot run)."""
    from diffc.exporter.source import inspect_model

    from diffc.quantization import check_quantization, describe

    prof = load_profile(profile)
    if steps is not None or sampler is not None:
        prof = prof.with_overrides(steps=steps or prof.steps, sampler=sampler or prof.sampler)
    quantized = check_quantization(prof)
    if str(model) == "demo":
        from diffc.exporter.demo import demo_configs

        configs = demo_configs()
        unet_cfg, vae_cfg, present = configs["unet"], configs["vae"], ("text_encoder", "unet", "vae_decoder")
    else:
        source = inspect_model(model)
        unet_cfg, vae_cfg, present = source.config("unet"), source.config("vae"), source.components
    geometry = geometry_from_configs(unet_cfg, vae_cfg, prof)
    cfg = unet_cfg.get("time_cond_proj_dim") is None
    out: dict[str, Any] = {"model": str(model), "profile": prof.name, "backend": prof.backend.value,
                           "image": {k: geometry[k] for k in ("height", "width")}, "batch": prof.batch.to_list(),
                           "components": {}}
    cache = cache_plan(unet_cfg, prof)
    if cache is not None:
        out["cache"] = cache
    for name in build_components(present, cache):
        ranges = shape_ranges(name, prof, geometry, cfg=cfg, feature_level=cache["level"] if cache else None)
        if prof.backend in TENSORRT_BACKENDS:
            from diffc.engines import tensorrt as trt_engine

            out["components"][name] = trt_engine.describe_build(prof, name, ranges)
        else:
            out["components"][name] = {"backend": prof.backend.value, "precision": prof.precision_of(name).value,
                                       "shape_ranges": ranges}
        if name in quantized:
            out["components"][name]["quantization"] = describe(prof, quantized[name], name)
    return out


def cache_plan(unet_cfg: dict[str, Any], profile: Profile) -> dict[str, Any] | None:
    """The manifest's ``cache`` entry (without the split's node counts) when the profile enables cache reuse:
    the branch checked against the UNet (typed error naming the valid range), its feature, and the per-step
    full/shallow mask precomputed from the schedule. None when ``[cache].enabled`` is false."""
    from diffc.runtime.cache import branch_info, full_steps, unet_branches

    if not profile.cache.enabled:
        return None
    info = branch_info(unet_cfg, profile.cache.branch, where=f"profile {profile.source or profile.name}: "
                                                             "[cache].branch")
    schedule = profile.cache.schedule_dict()
    return {"branch": info["branch"], "feature": info["feature"], "level": info["level"],
            "channels": info["channels"], "branches": len(unet_branches(unet_cfg)),
            "full_component": "unet", "shallow_component": "unet_shallow",
            "schedule": schedule, "full_steps": full_steps(schedule, profile.steps)}


#: disk a build needs, in multiples of the exported components' fp32 weight bytes: the export, the passed graphs,
#: onnxruntime's optimizer output, the artifact (and a quantized build's fp32 twin). Measured peaks of the work
#: folder + the artifact for SD 1.5 (4.26 GB fp32): cpu-cache 14.5 GB (3.4x), cpu-int8 + cache 15.1 GB (3.55x).
#: The host engine cache (DIFFC_CACHE_DIR) comes on top.
DISK_FACTOR = 4.0


def _check_disk(fp32_bytes: int, work: Path, artifact: Path) -> dict[str, Any]:
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


def build_components(present, cache: dict[str, Any] | None) -> list[str]:
    """The components to build, in order: the loop's, plus ``unet_shallow`` after ``unet`` with cache reuse."""
    out = []
    for name in (c for c in TXT2IMG_COMPONENTS if c in present):
        out.append(name)
        if name == "unet" and cache is not None:
            out.append("unet_shallow")
    return out


def format_build_report(report: dict[str, Any]) -> str:
    """The build report as a table: per component, the passes in order with what fired, and the op counts."""
    lines = [f"profile {report['profile']}: " + " -> ".join(p["name"] for p in report.get("pass_order", []))]
    for name, comp in report["components"].items():
        rep = comp.get("passes")
        if not rep:
            continue
        before, after = rep["op_counts_before"], rep["op_counts_after"]
        lines.append(f"{name}: {sum(before.values())} -> {sum(after.values())} nodes")
        for p in rep["passes"]:
            fired = ", ".join(f"{k}={v}" for k, v in p["fired"].items() if v) or "-"
            lines.append(f"  {p['name']:16s} {p['seconds']:7.3f}s  {fired}")
        ops = sorted(set(before) | set(after), key=lambda o: -max(before.get(o, 0), after.get(o, 0)))
        changed = [f"{o} {before.get(o, 0)}->{after.get(o, 0)}" for o in ops if before.get(o, 0) != after.get(o, 0)]
        if changed:
            lines.append("  ops: " + ", ".join(changed))
        split = comp.get("cache_split")
        if split:
            lines.append(f"  cache_reuse branch {split['branch']}: full {split['nodes']['full']} nodes, shallow "
                         f"{split['nodes']['shallow']} ({100 * split['shallow_fraction']:.0f} %), shallow vs full "
                         f"max_abs_err {split['shallow_check']['max_abs_err']:.3g}")
    return "\n".join(lines)


def _quantize(model: str | Path, prof: Profile, quantized: dict[str, Precision], graphs: dict[str, Path], work: Path,
              onnx_dir: Path, report: dict[str, Any], *, exporter: str, progress: bool) -> Path:
    """Build the fp32 reference artifact, calibrate on its loop, and swap Q/DQ graphs into ``graphs``; with
    ``[quantize].step_groups`` > 1 also add one graph per further step group (``unet_g1``, ...: same weights,
    scales from that group's steps). Returns the reference artifact's path (the quality gate compares
    against it)."""
    import onnx_ir as ir

    from diffc.passes.quantize import calibration_targets
    from diffc.quantization import activation_type, calibrate, quantize_graph, reference_profile

    reference = work / "reference.diffc"
    log.info("building the fp32 reference artifact for calibration and the quality gate")
    build(model, reference_profile(prof), reference, exporter=exporter, progress=progress, _export_dir=onnx_dir,
          _passed=(work / "passed", report))
    twin = json.loads((reference / "build_report.json").read_text())
    report["reference_build"] = {"passes_reused": twin["passes_reused"], "timings": twin["timings"]}
    opts = prof.quantize
    ort_form = prof.backend is Backend.ONNXRUNTIME
    # With cache reuse the loop also runs unet_shallow; calibration records the full graph (a superset of the
    # shallow one's tensors, by name), and both graphs are quantized with the same ranges.
    calibrated = calibrate(reference, {name: (graphs[name], calibration_targets(
        ir.load(graphs[name]).graph, keep_float=opts.keep_float, output_ranges=ort_form)) for name in quantized},
        opts, progress=progress)
    for name, precision in quantized.items():
        qtype = activation_type(prof, precision)
        group_ranges, calib = calibrated[name]
        comp = report["components"][name]
        comp["quantization"] = {"precision": precision.value, "activations": qtype,
                                "weights": "fp8 e4m3 per output channel" if qtype == "fp8" else "int8 per output channel",
                                "keep_float": list(opts.keep_float), "calibration": calib}
        # (source graph, output name, ranges): the component (and the UNet's shallow half) with the first
        # group's scales, then one more UNet per further step group
        jobs = [(n, n, group_ranges[0]) for n in graphs if n == name or n == f"{name}_shallow"]
        variants = step_group_components(len(group_ranges))[1:] if name == "unet" else []
        jobs += [(name, variant, r) for variant, r in zip(variants, group_ranges[1:])]
        source = dict(graphs)
        for src, graph_name, ranges in jobs:
            out = work / "quantized" / graph_name / "model.onnx"
            pass_entry = quantize_graph(source[src], out, ranges, qtype=qtype, keep_float=opts.keep_float,
                                        backend=prof.backend)
            graphs[graph_name] = out
            entry = {k: pass_entry[k] for k in ("name", "fired", "modified", "seconds")}
            if graph_name == name:
                comp["passes"]["passes"].append(entry)
                comp["passes"]["op_counts_after"] = pass_entry["op_counts_after"]
            else:
                comp["quantization"][f"{graph_name}_pass"] = entry
    report.setdefault("pass_order", []).append({"name": "quantize", "options": pass_entry["options"]})
    return reference


def _gate(prof: Profile, quantized: dict[str, Precision], reference: Path, artifact: Path, graphs: dict[str, Path],
          *, step_variants: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    """The quality gate: the artifact itself on onnxruntime or OpenVINO; for TensorRT, the int8 Q/DQ graph on the
    CPU (the engine needs a GPU); fp8 cannot run here at all, so it is recorded as not evaluated."""
    from diffc.quantization import quality_gate

    if prof.quantize.min_psnr_db == 0 and prof.quantize.max_abs_error is None:
        return {"skipped": "turned off in the profile ([quantize].min_psnr_db = 0)"}
    if prof.backend in (Backend.ONNXRUNTIME, Backend.OPENVINO):
        return quality_gate(reference, artifact, prof.quantize, progress=progress)
    if any(p is Precision.FP8 for p in quantized.values()):
        return {"skipped": "not evaluated on this machine: FP8 Q/DQ has no onnxruntime CPU kernels and the TensorRT "
                           "engine needs a GPU; run benchmarks/quality.py against the artifact on the target GPU"}
    return quality_gate(reference, None, prof.quantize, progress=progress, step_variants=step_variants,
                        replace={n: graphs[n] for n in graphs if base_component(n) in quantized})


def build(model: str | Path, profile: str | Path | Profile = "cpu", out: str | Path | None = None, *,
          force: bool = False, steps: int | None = None, sampler: str | None = None, exporter: str = "torchscript",
          progress: bool = True, no_cache: bool = False, verify_passes: bool = False,
          _export_dir: Path | None = None, _passed: tuple[Path, dict[str, Any]] | None = None) -> Path:
    """Build an artifact. Returns its path. ``no_cache``: rebuild TensorRT engines the build cache holds;
    ``verify_passes``: run the onnx checker and shape inference after every graph pass.

    A profile with int8 / fp8 components also builds its fp32 onnxruntime twin (in the work folder), runs its
    sampling loop to calibrate, inserts Q/DQ, and gates the result against it (:mod:`diffc.quantization`).
    ``_export_dir``: reuse that build's ONNX export instead of exporting again; ``_passed``: (folder, report) of
    a build whose graph passes ran on that export: its passed graphs are used as they are when its pass order
    is this build's (internal: the fp32 twin of an onnxruntime int8 profile)."""
    from diffc.engines import onnxruntime as ort_engine
    from diffc.exporter.contracts import get_contract
    from diffc.exporter.export import (
        check_parity,
        component_module,
        export_pipeline_to,
        load_pipeline,
        resolve_model,
        sample_shapes,
        worst_parity,
    )
    from diffc.exporter.source import inspect_model
    from diffc.runtime.sampler import compile_sampler, default_kind_for

    prof = load_profile(profile)
    if steps is not None or sampler is not None:
        prof = prof.with_overrides(steps=steps or prof.steps, sampler=sampler or prof.sampler)
    _check_backend(prof)
    if out is None:
        raise ProfileError("no output folder given; pass --out ARTIFACT")
    out = Path(out)
    t_start = time.perf_counter()
    report: dict[str, Any] = {"profile": prof.name, "components": {}, "timings": {}}

    with tempfile.TemporaryDirectory(prefix="diffc-build-") as work, \
            atomic_output_dir(out, force=force, what="artifact") as tmp:
        work = Path(work)
        folder = resolve_model(model, work)
        source = inspect_model(folder)
        pipe = load_pipeline(source)
        components = [c for c in TXT2IMG_COMPONENTS if c in source.components]
        quantized = prof.quantized_components(tuple(components))
        if _export_dir is None:  # (the fp32 twin of a quantized build was counted in its build's check)
            report["disk"] = _check_disk(
                4 * sum(p.numel() for n in components for p in component_module(pipe, n).parameters()), work, tmp)

        sched_cfg = source.scheduler_config
        if sched_cfg.get("_class_name") == "PNDMScheduler":
            # PNDM never clips x0; DDIMScheduler.from_config would (its default), which is not what the model
            # was tuned with. SD 1.5's own config spells this out; tiny and older copies may not.
            sched_cfg.setdefault("clip_sample", False)
        kind = prof.sampler if prof.sampler != "auto" else default_kind_for(sched_cfg.get("_class_name") or "")
        tables = compile_sampler(kind, sched_cfg, prof.steps)
        geometry = image_geometry(pipe, prof)
        cache = cache_plan(dict(pipe.unet.config), prof)

        t0 = time.perf_counter()
        onnx_dir = work / "onnx"
        if _export_dir is not None:
            onnx_dir = Path(_export_dir)
            export_report = json.loads((onnx_dir / "export_report.json").read_text())
        else:
            export_report = export_pipeline_to(pipe, source, onnx_dir, components=components, exporter=exporter,
                                               progress=progress, cache_marks=cache is not None)
        report["timings"]["export_s"] = round(time.perf_counter() - t0, 3)

        t0 = time.perf_counter()
        report["pass_order"] = [spec.to_dict() for spec in pass_list(prof.backend.value, **prof.passes)]
        # the same passes on the same export (the fp32 twin of an int8 build): the graphs are the build's own,
        # already checked against PyTorch
        reused = _passed is not None and _passed[1]["pass_order"] == report["pass_order"]
        report["passes_reused"] = reused
        passed_dir = _passed[0] if reused else work / "passed"
        if reused:
            for name in components:
                report["components"][name] = copy.deepcopy(
                    {k: v for k, v in _passed[1]["components"][name].items()
                     if k in ("passes", "parity_after_passes", "cache_split")})
            log.info("graph passes: reusing the graphs in %s", passed_dir)
        for name in tqdm([] if reused else components, desc="passes", unit="component", disable=not progress):
            graph, pass_report = run_passes(load_model(onnx_dir / name / "model.onnx"), name,
                                            prof.backend.value, verify=verify_passes, **prof.passes)
            passed = save_model(graph, passed_dir / name / "model.onnx")
            del graph
            # The passed graph is what ships: check it against PyTorch again, at the same two shapes as export.
            module = component_module(pipe, name)
            marked = cache is not None and name == "unet"
            contract = get_contract(name, module, **({"cache_marks": True} if marked else {}))
            rows = check_parity(module, contract, passed, sample_shapes(pipe, name))
            after = worst_parity(rows)
            report["components"][name] = {"passes": pass_report, "parity_after_passes": after}
            if not after["passed"]:
                fired = [p["name"] for p in pass_report["passes"] if p["modified"]]
                raise ParityError(
                    f"{name} differs from PyTorch after the graph passes (max_abs_err={after['max_abs_err']:.3g}, "
                    f"rel_l2={after['rel_l2']:.3g}); passes that changed it: {fired}. Leave them out with "
                    "[passes].disable in the profile, and report the model config")
            if marked:
                report["components"][name]["cache_split"] = _split_cache(passed, passed_dir, cache, module, contract,
                                                                         sample_shapes(pipe, name))
        report["timings"]["passes_s"] = round(time.perf_counter() - t0, 3)
        engine_components = build_components(components, cache)

        graphs = {n: passed_dir / n / "model.onnx" for n in engine_components}
        reference = None
        if quantized:
            t0 = time.perf_counter()
            reference = _quantize(model, prof, quantized, graphs, work, onnx_dir, report, exporter=exporter,
                                  progress=progress)
            report["timings"]["quantize_s"] = round(time.perf_counter() - t0, 3)
            variants = [n for n in graphs if n not in engine_components]  # unet_g1, ...: right after the UNet
            at = engine_components.index("unet") + 1
            engine_components[at:at] = variants

        manifest_components: dict[str, Any] = {}
        use_trt = prof.backend in TENSORRT_BACKENDS
        if use_trt:
            from diffc.engines import tensorrt as trt_engine

            # int8/fp8 need Q/DQ graphs: refuse before the first engine is built, not after
            _check_tensorrt(prof, graphs)
        t0 = time.perf_counter()
        use_ov = prof.backend is Backend.OPENVINO
        if use_ov:
            from diffc.engines import openvino as ov_engine
        shared: dict[str, dict[str, Any]] = {}
        if cache is not None and prof.backend is Backend.ONNXRUNTIME:
            # one weights file for both UNet graphs: unet/model.onnx, unet/shallow.onnx, unet/weights.data
            shared = ort_engine.build_engines_sharing_weights(
                {"unet": (graphs["unet"], tmp / "unet" / "model.onnx"),
                 "unet_shallow": (graphs["unet_shallow"], tmp / "unet" / "shallow.onnx")},
                tmp / "unet" / "weights.data")
        for name in tqdm(engine_components, desc="engines", unit="component", disable=not progress):
            onnx_path = graphs[name]
            ranges = shape_ranges(name, prof, geometry, cfg=pipe.unet.config.get("time_cond_proj_dim") is None,
                                  feature_level=cache["level"] if cache else None)
            if use_trt:
                rec = trt_engine.build_engine(onnx_path, tmp / name / trt_engine.ENGINE_FILE, no_cache=no_cache,
                                              **trt_engine.options_from_profile(prof, name, ranges))
                manifest_components[name] = {**trt_engine.manifest_entry(rec, name), "shape_ranges": ranges}
                engine_report = {"engine_bytes": rec["report"]["engine_bytes"], "tensorrt": rec["report"]}
            else:
                if name in shared:
                    info, folder = shared[name], "unet"
                elif use_ov:
                    info, folder = ov_engine.build_engine(onnx_path, tmp / name / ov_engine.ENGINE_FILE,
                                                          precision=prof.precision_of(name).value), name
                else:
                    info, folder = ort_engine.build_engine(onnx_path, tmp / name / "model.onnx"), name
                files = [f"{folder}/{f}" for f in info["files"]]
                io = _io(onnx_path if use_ov else tmp / files[0])
                manifest_components[name] = {
                    "file": files[0],
                    "files": {f: sha256_file(tmp / f) for f in files},
                    "backend": info["backend"],
                    "backend_version": info["backend_version"],
                    **({"backend_options": {"graph_optimization_applied": info["optimization"]}}
                       if "optimization" in info else {}),
                    "precision": prof.precision_of(name).value,
                    **io,
                    "shape_ranges": ranges,
                }
                engine_report = {"engine_bytes": sum((tmp / f).stat().st_size for f in files)}
            ec = export_report["components"][base_component(name)]
            report["components"].setdefault(name, {}).update(
                parity={k: ec[k] for k in ("max_abs_err", "rel_l2", "passed")}, **engine_report)
        report["timings"]["engines_s"] = round(time.perf_counter() - t0, 3)
        # a TensorRT engine may be for a GPU this machine lacks: nothing to warm
        if prof.backend in (Backend.ONNXRUNTIME, Backend.OPENVINO):
            # Fill this host's engine cache now (onnxruntime's layout-optimized graphs; OpenVINO's models compiled
            # for the default shapes), so the first `diffc run` here starts as fast as later ones.
            t0 = time.perf_counter()
            open_sessions(tmp, {"components": manifest_components, "text_encoders": []}, verify=False)
            report["timings"]["host_cache_s"] = round(time.perf_counter() - t0, 3)

        # Text conditioning: which encoders, which of their outputs, which tokenizer.
        is_sdxl = "text_encoder_2" in source.components
        encoders = []
        for enc, tok_folder in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if enc not in source.components:
                continue
            fast = _fast_tokenizer(pipe, source.path, tok_folder)
            dest = tmp / tok_folder
            dest.mkdir(parents=True, exist_ok=True)
            fast.backend_tokenizer.save(str(dest / "tokenizer.json"))
            (dest / "tokenizer_config.json").write_text(json.dumps({"pad_token": fast.pad_token}))
            encoders.append({
                "component": enc,
                "tokenizer": f"{tok_folder}/tokenizer.json",
                "tokenizer_sha256": sha256_file(dest / "tokenizer.json"),
                "max_length": int(min(fast.model_max_length, 77)),
                "pad_id": int(fast.pad_token_id),
                "hidden_state": "penultimate_hidden_state" if is_sdxl else "last_hidden_state",
            })

        unet_cfg = pipe.unet.config
        if unet_cfg.get("time_cond_proj_dim") is not None:
            guidance = {"mode": "embedded", "default_scale": prof.guidance if prof.guidance is not None else 8.5,
                        "embedding_dim": int(unet_cfg.time_cond_proj_dim), "input": "timestep_cond"}
        elif prof.guidance is None:
            guidance = {"mode": "none", "default_scale": 1.0}
        else:
            guidance = {"mode": "cfg", "default_scale": prof.guidance, "batch_order": ["uncond", "cond"],
                        "zero_uncond_for_empty_negative": bool(
                            is_sdxl and source.model_index.get("force_zeros_for_empty_prompt", True))}
        added = {}
        if unet_cfg.get("addition_embed_type") == "text_time":
            added = {"text_embeds": {"from": "text_encoder_2", "output": "pooled_output"},
                     "time_ids": {"layout": ["height", "width", "crop_top", "crop_left", "height", "width"]}}

        vae_cfg = pipe.vae.config
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "diffc_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"model": str(model), "pipeline_class": source.pipeline_class, "sha256": folder_hash(folder)},
            "profile": prof.to_dict(),
            "build": {"exporter": exporter, "opset": export_report["opset"], "versions": _versions(prof),
                      "passes": report["pass_order"],
                      "scheduler_config": {k: v for k, v in sched_cfg.items()}},
            "components": manifest_components,
            "text_encoders": encoders,
            "added_conditions": added,
            "latent": {
                "channels": int(unet_cfg.in_channels),
                "scaling_factor": float(vae_cfg.scaling_factor),
                "shift_factor": float(vae_cfg.get("shift_factor") or 0.0),
                "vae_scale_factor": geometry["vae_scale_factor"],
            },
            "image": {"height": geometry["height"], "width": geometry["width"], "multiple_of": geometry["multiple_of"],
                      "batch": prof.batch.to_list()},
            "guidance": guidance,
            "sampler": tables.to_dict(),
        }
        groups = report["components"]["unet"].get("quantization", {}).get("calibration", {}).get("step_groups")
        if groups:
            from diffc.quantization import timestep_bounds

            manifest["step_variants"] = {
                "components": step_group_components(len(groups)),
                "timestep_bounds": timestep_bounds(tables.timesteps, [g["steps"] for g in groups]),
                "steps": [g for g, grp in enumerate(groups) for _ in grp["steps"]]}
        if cache is not None:
            split = report["components"]["unet"]["cache_split"]
            manifest["cache"] = {**cache, "nodes": split["nodes"], "shallow_fraction": split["shallow_fraction"]}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        if reference is not None:
            t0 = time.perf_counter()
            report["quality_gate"] = _gate(prof, quantized, reference, tmp, graphs,
                                           step_variants=manifest.get("step_variants"), progress=progress)
            report["timings"]["quality_gate_s"] = round(time.perf_counter() - t0, 3)
        report["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
        (tmp / "build_report.json").write_text(json.dumps(report, indent=2))
        (tmp / "export_report.json").write_text(json.dumps(export_report, indent=2))
    log.info("built %s in %.1f s", out, time.perf_counter() - t_start)
    return out
