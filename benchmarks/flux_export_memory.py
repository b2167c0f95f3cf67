"""Peak memory of exporting a full-width FLUX.1 transformer, and what a full-depth (12 B) one would need.

Issue 29 asks for the peak RSS of exporting a FLUX-architecture transformer at FLUX.1's width (hidden 3072 =
24 heads x 128, ``joint_attention_dim`` 4096, pooled 768, guidance embedding: FLUX.1-dev) with reduced depth,
and the extrapolation to the real 19 double + 38 single blocks. A full-size export cannot be measured on a
machine of this size, so this script measures reduced depths and fits a line.

For each depth ``(double, single)`` it runs two fresh processes:

1. ``checkpoint``: builds ``FluxTransformer2DModel`` with random weights (fixed seed) directly in bf16 and saves
   it with ``save_pretrained`` -- a bf16 safetensors checkpoint on disk, as FLUX.1 ships.
2. ``export``: what ``diffc export`` does with that component: ``from_pretrained`` in the checkpoint's own dtype,
   :func:`diffc.exporter.dit.upcast_for_export` (in-place fp32), :func:`diffc.exporter.export.export_component`
   (TorchScript exporter, the default) at the shape ``diffc export`` traces FLUX at, then the parity check at
   both of its shapes. The child reports its own ``ru_maxrss`` after loading, after export and after the
   parity check (``ru_maxrss`` only grows, so each is the peak up to that point).

The fit is ``peak = a + b * parameters`` over the measured depths (one depth: ``a`` is the export process's RSS
before loading, ``b`` what the peak adds over it per parameter); the full model's parameter count comes from
building it on the meta device, so nothing of its size is allocated. ``--refit FILE[,FILE]`` redoes the fit and
the JSON from earlier outputs' runs together, measuring nothing.

    python benchmarks/flux_export_memory.py [--depths 1x2,2x4] [--out FILE] [--refit FILE[,FILE]]

Prints one JSON object (also written to ``--out``); the log goes to stderr. Keep to depths that fit the
machine: on a 2-core EPYC (2026-12-03) the export peaked at 5.9 GiB for 1 double + 2 single blocks (0.69 B
parameters), 8.5 GiB for 2 + 2 (1.03 B) and 10.6 GiB for 2 + 4 (1.31 B): about 8.1 bytes per parameter (twice
the fp32 weights) over 0.7 GiB, which puts the full 11.9 B-parameter FLUX.1 transformer at about 90 GiB.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import call_worker, emit, log_to_stderr, machine, sig  # noqa: E402

log = logging.getLogger("diffc.bench.flux_export_memory")

#: black-forest-labs/FLUX.1-dev/transformer/config.json, less the depth (set per run)
FLUX_WIDTH_CONFIG = dict(patch_size=1, in_channels=64, out_channels=None, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FULL_DEPTH = (19, 38)
SEED = 0


def _maxrss_bytes() -> int:
    # Linux reports ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _flux_config(double: int, single: int) -> dict[str, Any]:
    return {**FLUX_WIDTH_CONFIG, "num_layers": double, "num_single_layers": single}


def worker_checkpoint(folder: Path, double: int, single: int) -> dict[str, Any]:
    """A bf16 checkpoint of the reduced-depth transformer, initialised in bf16 (no fp32 copy ever exists)."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(SEED)
    torch.set_default_dtype(torch.bfloat16)
    model = FluxTransformer2DModel(**_flux_config(double, single))
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"parameters": params, "checkpoint_bytes": size, "maxrss_bytes": _maxrss_bytes()}


def worker_export(folder: Path, out: Path) -> dict[str, Any]:
    """``diffc export``'s steps for one bf16 transformer component, with the peak RSS after each."""
    import torch
    from diffusers import FluxTransformer2DModel

    from diffc.exporter.contracts import SampleShape, get_contract
    from diffc.exporter.dit import upcast_for_export
    from diffc.exporter.export import DEFAULT_OPSET, check_parity, export_component

    stages: dict[str, Any] = {"start": _maxrss_bytes()}
    t0 = time.perf_counter()
    module = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    stages["loaded_bf16"] = _maxrss_bytes()
    contract = get_contract("transformer", module)
    # diffc export's shapes for FLUX (diffc.exporter.dit.sample_shapes with the 32-latent parity cap)
    shapes = (SampleShape(1, 32, 32, 32), SampleShape(2, 34, 36, 12))
    sample = contract.make_inputs(module, shapes[0], torch.Generator().manual_seed(0))
    with upcast_for_export(module, "transformer"):
        stages["upcast_fp32"] = _maxrss_bytes()
        t1 = time.perf_counter()
        path = export_component(module, contract, out / "transformer" / "model.onnx", opset=DEFAULT_OPSET,
                                exporter="torchscript", sample=sample)
        export_s = time.perf_counter() - t1
        stages["exported"] = _maxrss_bytes()
        t2 = time.perf_counter()
        rows = check_parity(module, contract, path, shapes)
        parity_s = time.perf_counter() - t2
        stages["parity_checked"] = _maxrss_bytes()
    onnx_bytes = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
    return {"maxrss_bytes_by_stage": stages, "peak_rss_bytes": _maxrss_bytes(), "onnx_bytes": onnx_bytes,
            "export_seconds": round(export_s, 1), "parity_seconds": round(parity_s, 1),
            "total_seconds": round(time.perf_counter() - t0, 1),
            "parity": [{k: r[k] for k in ("shape", "max_abs_err", "rel_l2", "passed")} for r in rows]}


def full_parameters(double: int, single: int) -> int:
    """Parameter count of a FLUX-width transformer of the given depth, built on the meta device (no memory)."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**_flux_config(double, single))
    return sum(p.numel() for p in model.parameters())


def _fit(points: list[tuple[int, int]], params: int, base: float) -> dict[str, Any]:
    """Linear fit of peak bytes on parameters, evaluated at ``params``. With one depth the intercept is
    ``base``, the export process's RSS before it loads the checkpoint (the libraries), and the slope what the
    measured peak adds over it per parameter."""
    if len(points) == 1:
        (x, y), = points
        slope, icept = (y - base) / x, base
    else:
        n = len(points)
        mx = sum(p[0] for p in points) / n
        my = sum(p[1] for p in points) / n
        slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
        icept = my - slope * mx
    return {"bytes_per_parameter": sig(slope), "intercept_gib": sig(icept / 2**30),
            "predicted_gib": sig((icept + slope * params) / 2**30)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=("checkpoint", "export", "count"))
    ap.add_argument("--folder")
    ap.add_argument("--out-dir")
    ap.add_argument("--double", type=int)
    ap.add_argument("--single", type=int)
    ap.add_argument("--depths", default="1x2,2x4",
                    help="comma-separated DOUBLExSINGLE block counts to measure (default 1x2,2x4)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--refit", help="earlier outputs of this script, comma-separated: fit their runs together, "
                                    "measure nothing")
    args = ap.parse_args()
    if args.worker == "checkpoint":
        emit_line(worker_checkpoint(Path(args.folder), args.double, args.single))
        return
    if args.worker == "export":
        emit_line(worker_export(Path(args.folder), Path(args.out_dir)))
        return
    if args.worker == "count":
        emit_line({"parameters": full_parameters(args.double, args.single)})
        return

    log_to_stderr("diffusers", "torch", "diffc.export", "diffc.passes", "diffc.engines")
    depths = []
    for item in args.depths.split(","):
        try:
            d, s = (int(v) for v in item.lower().split("x"))
        except ValueError:
            ap.error(f"--depths: {item!r} is not DOUBLExSINGLE, e.g. 2x4")
        depths.append((d, s))
    runs = [r for f in args.refit.split(",") for r in json.loads(Path(f).read_text())["runs"]] if args.refit else []
    for d, s in ([] if args.refit else depths):
        scratch = Path(tempfile.mkdtemp(prefix="diffc-flux-mem-"))
        try:
            log.info("depth %dx%d: writing the bf16 checkpoint", d, s)
            ckpt = call_worker(__file__, "checkpoint", folder=scratch / "ckpt", double=d, single=s)
            log.info("depth %dx%d: %.2f B parameters; exporting", d, s, ckpt["parameters"] / 1e9)
            exp = call_worker(__file__, "export", folder=scratch / "ckpt", out_dir=scratch / "onnx")
            log.info("depth %dx%d: peak RSS %.2f GiB", d, s, exp["peak_rss_bytes"] / 2**30)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        runs.append({"double_blocks": d, "single_blocks": s, "parameters": ckpt["parameters"],
                     "checkpoint_gib": sig(ckpt["checkpoint_bytes"] / 2**30),
                     "checkpoint_writer_peak_rss_gib": sig(ckpt["maxrss_bytes"] / 2**30),
                     "export_peak_rss_gib": sig(exp["peak_rss_bytes"] / 2**30),
                     "peak_rss_gib_by_stage": {k: sig(v / 2**30) for k, v in exp["maxrss_bytes_by_stage"].items()},
                     "onnx_gib": sig(exp["onnx_bytes"] / 2**30),
                     "export_seconds": exp["export_seconds"], "parity_seconds": exp["parity_seconds"],
                     "parity": exp["parity"]})
    full = call_worker(__file__, "count", double=FULL_DEPTH[0], single=FULL_DEPTH[1])["parameters"]
    base = min(r["peak_rss_gib_by_stage"]["start"] for r in runs) * 2**30
    points = [(r["parameters"], r["export_peak_rss_gib"] * 2**30) for r in runs]
    export_only = [(r["parameters"], r["peak_rss_gib_by_stage"]["exported"] * 2**30) for r in runs]
    result = {
        "benchmark": "flux_export_memory",
        "what": "peak RSS (ru_maxrss of the export process) of diffc's export of a FLUX.1-width transformer "
                "(hidden 3072, joint_attention_dim 4096, pooled 768, guidance_embeds) from a bf16 checkpoint "
                "at reduced depth, TorchScript exporter, with the parity check; linear fit on parameters",
        "config": FLUX_WIDTH_CONFIG,
        "runs": runs,
        "full_depth": {"double_blocks": FULL_DEPTH[0], "single_blocks": FULL_DEPTH[1], "parameters": full,
                       "fp32_weights_gib": sig(full * 4 / 2**30),
                       "extrapolated_export_with_parity": _fit(points, full, base),
                       "extrapolated_export_only": _fit(export_only, full, base),
                       "note": "diffc.exporter.dit.UPCAST_LIMIT_BYTES (8 GiB of fp32 weights) refuses this "
                               "export today; the figure is what lifting it would need"},
        "machine": machine(),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    emit(result)


def emit_line(obj: dict[str, Any]) -> None:
    """A worker's answer: one JSON line on stdout (what :func:`_common.call_worker` reads)."""
    sys.stdout.write(json.dumps(obj) + "\n")


if __name__ == "__main__":
    main()
