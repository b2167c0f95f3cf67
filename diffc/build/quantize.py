"""Stage 5, quantize: INT8 / FP8 Q/DQ graphs from ranges calibrated in the artifact's own loop, and the gate.

With int8 / fp8 components in the profile, the build first makes the fp32 onnxruntime twin of the artifact
(:mod:`diffc.build.twin`), runs its sampling loop to record every quantized tensor's range
(:mod:`diffc.build.calibrate`), inserts Q/DQ with :class:`diffc.passes.quantize.QuantizePass`, and, once the
artifact is assembled, gates it: final images of the quantized artifact against the fp32 twin's on fixed
prompts and seeds (mean PSNR over the images, each on [0, 1]; the worst image's PSNR and the max absolute error
are reported, the latter gated too when the profile sets ``max_abs_error``). Below the profile's threshold the
build fails with :class:`~diffc.errors.QualityGateError` and writes nothing. CPU profiles with bf16 / fp16
compute (the default ``cpu``: OpenVINO bf16) have no Q/DQ but are gated the same way (:func:`gate`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from diffc.build.calibrate import calibrate
from diffc.build.plan import activation_type
from diffc.engines import get_backend
from diffc.engines.onnxruntime import BACKEND as CPU_EVALUATOR, Session
from diffc.errors import QualityGateError
from diffc.onnx_io import save_ir_model
from diffc.passes import pass_entry
from diffc.passes._base import op_counts
from diffc.passes.quantize import QuantizePass, calibration_targets
from diffc.names import base_component, step_group_components
from diffc.profiles.schema import Backend, Precision, Profile, QuantizeOptions
from diffc.runtime.pipeline import Pipeline

log = logging.getLogger("diffc.quantization")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def quality_gate(reference: Path, candidate: Path | None, options: QuantizeOptions, *,
                 replace: dict[str, Path] | None = None, step_variants: dict[str, Any] | None = None,
                 progress: bool = True, quantized: bool = True) -> dict[str, Any]:
    """Final images of ``candidate`` (an artifact) -- or of the reference with its quantized graphs swapped in
    from ``replace`` (component -> graph; ``step_variants`` as the artifact's manifest has it), run with
    onnxruntime (for engines this machine cannot run) -- against ``reference``. ``quantized``: whether the
    candidate has int8 / fp8 components (False: only reduced float compute, e.g. bf16), for the error's advice.
    Raises :class:`QualityGateError` when below the thresholds; returns the numbers otherwise."""
    from diffc.build.memory import release
    from diffc.runtime.controlnet import gate_inputs

    jobs = [(p, s) for p in options.gate_prompts for s in options.gate_seeds]
    bar = tqdm(total=2 * len(jobs), desc="quality gate", unit="image", disable=not progress)
    # one artifact's sessions at a time: the reference's images first, then the candidate's (both open at once
    # held the fp32 weights beside the candidate's engines)
    with Pipeline(reference, progress=False, cache=False) as ref:
        extras = [gate_inputs(ref) for _ in jobs]  # a ControlNet artifact is gated with its ControlNets on
        expected = []
        for (prompt, seed), extra in zip(jobs, extras):
            expected.append(ref(prompt, seed=seed, **extra))
            bar.update()
    release()
    if candidate is not None:
        cand = Pipeline(candidate, progress=False, cache=False)
    else:
        cand = Pipeline(reference, progress=False, cache=False)
        for name, graph in (replace or {}).items():
            cand.sessions[name] = None  # the fp32 session goes before its quantized stand-in opens
            cand.sessions[name] = Session(graph)
        if step_variants:
            cand.manifest = {**cand.manifest, "step_variants": step_variants}
    rows = []
    with cand:
        for (prompt, seed), extra, a in zip(jobs, extras, expected):
            b = cand(prompt, seed=seed, **extra)
            bar.update()
            rows.append({"prompt": prompt, "seed": seed, "psnr_db": round(_psnr(a, b), 3),
                         "max_abs_error": round(float(np.abs(a - b).max()), 5)})
    bar.close()
    worst_psnr = min(r["psnr_db"] for r in rows)
    mean_psnr = round(float(np.mean([min(r["psnr_db"], 99.0) for r in rows])), 3)
    worst_err = max(r["max_abs_error"] for r in rows)
    passed = mean_psnr >= options.min_psnr_db and (options.max_abs_error is None
                                                   or worst_err <= options.max_abs_error)
    report = {"images": len(rows), "psnr_db_mean": mean_psnr, "psnr_db_min": worst_psnr,
              "max_abs_error": worst_err, "min_psnr_db": options.min_psnr_db,
              "max_abs_error_allowed": options.max_abs_error, "passed": passed, "rows": rows,
              "evaluated_with": "artifact" if candidate is not None else "onnxruntime (CPU) on the Q/DQ graph"}
    log.info("quality gate: PSNR mean %.2f dB (threshold %.1f), min %.2f dB, max abs error %.4f -> %s", mean_psnr,
             options.min_psnr_db, worst_psnr, worst_err, "pass" if passed else "FAIL")
    if not passed:
        advice = (". Keep more layers in float ([quantize].keep_float, e.g. add \"output_block\"), calibrate on "
                  "more prompts, or lower [quantize].min_psnr_db if that quality is acceptable") if quantized else (
                  ". This model loses too much in bf16 / fp16 compute: build it with the exact-fp32 profile "
                  "(--profile cpu-fp32), or lower [quantize].min_psnr_db if that quality is acceptable")
        raise QualityGateError(
            f"the {'quantized' if quantized else 'reduced-precision'} artifact is below the quality gate: mean PSNR "
            f"{mean_psnr:.2f} dB vs fp32 (needs >= {options.min_psnr_db:g}), max abs error {worst_err:.4f}"
            + (f" (allowed {options.max_abs_error:g})" if options.max_abs_error is not None else "") + advice)
    return report


def quantize_graph(graph: Path, out: Path, ranges: dict[str, tuple[float, float]], *, qtype: str,
                   keep_float: Sequence[str], backend: Backend) -> dict[str, Any]:
    """Insert Q/DQ into the graph at ``graph`` and save it at ``out``, in the form ``backend``'s int8 kernels
    fuse (its ``qdq_form``): the quantize stage pass on one ``onnx_ir`` model from load to save, as the passes
    stage runs its passes (:mod:`diffc.build.passes`). Returns the pass's record (:func:`diffc.passes.pass_entry`)
    with its options and the op counts before and after."""
    model = ir.load(graph)
    form = dict(get_backend(backend).qdq_form)
    qpass = QuantizePass(qtype=qtype, ranges=ranges, keep_float=keep_float, **form)
    before = op_counts(model)
    qpass(model)
    save_ir_model(model, out)
    return {**pass_entry("quantize", qpass), "options": {"qtype": qtype, "keep_float": list(keep_float), **form},
            "op_counts_before": before, "op_counts_after": op_counts(model)}


def quantize(profile: Profile, quantized: dict[str, Precision], reference: Path, graphs: dict[str, Path],
             work: Path, report: dict[str, Any], *, progress: bool) -> None:
    """Calibrate on the fp32 ``reference`` artifact's loop and swap Q/DQ graphs into ``graphs`` (written under
    ``work/quantized``); with ``[quantize].step_groups`` > 1 also add one graph per further step group
    (``unet_g1``, ...: same weights, scales from that group's steps; the UNet only -- a transformer denoiser is
    one graph calibrated on every step, :func:`diffc.build.plan.check_transformer_profile` refuses more groups).
    Records each component's quantization,
    the quantize pass's fire counts in its pass report, and ``timings.quantize_s``."""
    t0 = time.perf_counter()
    opts = profile.quantize
    output_ranges = get_backend(profile.backend).qdq_form["output_qdq"]
    # With cache reuse the loop also runs unet_shallow; calibration records the full graph (a superset of the
    # shallow one's tensors, by name), and both graphs are quantized with the same ranges.
    calibrated = calibrate(reference, {name: (graphs[name], calibration_targets(
        ir.load(graphs[name]).graph, keep_float=opts.keep_float, output_ranges=output_ranges)) for name in quantized},
        opts, progress=progress)
    for name, precision in quantized.items():
        qtype = activation_type(profile, precision)
        group_ranges, calib = calibrated[name]
        comp = report["components"][name]
        comp["quantization"] = {"precision": precision.value, "activations": qtype,
                                "weights": ("fp8 e4m3 per output channel" if qtype == "fp8"
                                            else "int8 per output channel"),
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
                                        backend=profile.backend)
            graphs[graph_name] = out
            entry = {k: pass_entry[k] for k in ("name", "fired", "modified", "seconds")}
            if graph_name == name:
                comp["passes"]["passes"].append(entry)
                comp["passes"]["op_counts_after"] = pass_entry["op_counts_after"]
            else:
                comp["quantization"][f"{graph_name}_pass"] = entry
    report["timings"]["quantize_s"] = round(time.perf_counter() - t0, 3)


def gate(profile: Profile, quantized: dict[str, Precision], reference: Path, artifact: Path,
         graphs: dict[str, Path], *, step_variants: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    """The quality gate (quantized profiles, and reduced float compute on the CPU: :func:`diffc.build.plan.gated`):
    the artifact itself where the build machine runs its engines (``runs_on_build_host``: onnxruntime, OpenVINO);
    otherwise (a GPU engine) the int8 Q/DQ graph on onnxruntime's CPU kernels; fp8 has none, so it cannot run here
    at all and is recorded as not evaluated."""
    if profile.quantize.min_psnr_db == 0 and profile.quantize.max_abs_error is None:
        return {"skipped": "turned off in the profile ([quantize].min_psnr_db = 0)"}
    if get_backend(profile.backend).runs_on_build_host:
        return quality_gate(reference, artifact, profile.quantize, progress=progress, quantized=bool(quantized))
    if any(p is Precision.FP8 for p in quantized.values()) and not CPU_EVALUATOR.fp8_kernels:
        return {"skipped": "not evaluated on this machine: FP8 Q/DQ has no onnxruntime CPU kernels and the TensorRT "
                           "engine needs a GPU; run benchmarks/quality.py against the artifact on the target GPU"}
    return quality_gate(reference, None, profile.quantize, progress=progress, step_variants=step_variants,
                        replace={n: graphs[n] for n in graphs if base_component(n) in quantized})
