"""Peak memory and wall time of ``diffc build`` on the SD-1.5 architecture (random weights), per profile.

Issue 30 item 3: a build must fit where the model does -- peak RSS <= 2x the fp32 bytes of its largest component
+ 2 GB. Each build runs in its own fresh process, one at a time; its peak RSS is that child's ``ru_maxrss`` as
``os.wait4`` returns it (the whole process's high-water mark, libraries included), its wall time the parent's
clock around it. The child's build report adds the peak of each stage (``build_report.json``'s ``memory``).

Configurations (``--profiles``, comma-separated): ``cpu-fp32`` (onnxruntime fp32), ``cpu-openvino`` (alias of
the default ``cpu``: OpenVINO bf16, gated against the fp32 twin), ``cpu-openvino-int8+cache`` (int8 UNet and
VAE decoder calibrated in the twin's loop, cache reuse, gated). Each is built as ``benchmarks/end_to_end.py``
builds it (:func:`end_to_end.diffc_profile`: two calibration images), except that the int8 build's quality gate
stays on (``min_psnr_db`` 0.001: the gate runs and is measured, and random weights cannot fail it).

``--arch sd15-half`` halves the UNet's channels (a quarter of its parameters), ``sd15-small`` takes 0.3x (a
tenth): proxies that fit beside other jobs while iterating. ``--size`` builds for one image size (calibration and
the gate run there; the issue's baseline used the model's default). ``--tree DIR`` builds with the diffc of
another checkout (``git archive`` of an earlier commit): the before figures, with the same harness.

The SDXL architecture (a 10 GB fp32 UNet) is not built here: its components' fp32 sizes come from
instantiating the configs on torch's meta device (nothing allocated), and the JSON records what the build's own
memory check (:func:`diffc.build.memory.check_memory`) decides for it on this machine.

    python benchmarks/build_memory.py [--arch sd15|sd15-half|sd15-small] [--profiles ...] [--size N] [--tree DIR]
                                       [--work DIR] [--out FILE]

Prints one JSON object (also written to ``--out``); the log goes to stderr. Run SD-1.5-size builds alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, log_to_stderr, machine, sig  # noqa: E402

log = logging.getLogger("diffc.bench.build_memory")

PROFILES = ("cpu-fp32", "cpu-openvino", "cpu-openvino-int8+cache")
#: issue 30 item 3, measured before this work (SD-1.5 architecture, 3.97 GB fp32, UNet 3.44 GB)
BASELINE = {"source": "issue 30 item 3 (peak RSS of diffc build before the build-memory work, 2026-12-03)",
            "fp32_bytes_total": 3.97e9, "largest_fp32_bytes": 3.44e9,
            "peak_rss_bytes": {"cpu-openvino": 11.5e9, "cpu-openvino-int8+cache": 18.9e9}}
GB = 1e9

# SDXL base 1.0's configs (stabilityai/stable-diffusion-xl-base-1.0, unet/ and text_encoder_2/ config.json)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, down_block_types=(
    "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), up_block_types=(
    "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(320, 640, 1280),
    layers_per_block=2, transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)
SDXL_TEXT_ENCODER_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                           projection_dim=1280)


def profile_for(name: str, size: int | None = None):
    """The profile a configuration is built with (see the module docstring); ``size``: images of ``size`` px
    only (calibration and the gate run there; the proxies use 256 to spare the CPU), else the model's default."""
    from end_to_end import diffc_profile

    from diffc.profiles.schema import Range

    config = {"cpu-fp32": "diffc_cpu", "cpu-openvino": "diffc_openvino",
              "cpu-openvino-int8+cache": "diffc_openvino_int8_cache"}[name]
    profile = diffc_profile(config)
    if profile.quantized_components():
        profile = dataclasses.replace(profile, quantize=dataclasses.replace(profile.quantize, min_psnr_db=0.001))
    if size:
        profile = dataclasses.replace(profile, height=Range(size, size, size), width=Range(size, size, size))
    return profile


def write_pipeline(arch: str, folder: Path) -> Path:
    """The SD-1.5 architecture with random weights (``sd15-half``: the UNet's channels halved; ``sd15-small``: at
    0.3x, a tenth of its parameters)."""
    import end_to_end

    if arch == "sd15":
        return end_to_end.write_sd15_pipeline(folder)
    import _sd15

    channels = {"sd15-half": (160, 320, 640, 640), "sd15-small": (96, 192, 384, 384)}[arch]
    half = {**_sd15.SD15_UNET, "block_out_channels": channels}
    saved = _sd15.SD15_UNET
    _sd15.SD15_UNET = half  # write_sd15_pipeline reads the config from the module
    try:
        return end_to_end.write_sd15_pipeline(folder)
    finally:
        _sd15.SD15_UNET = saved


def worker_build(model: Path, name: str, out: Path, result: Path, size: int | None) -> None:
    """In the measured process: build ``model`` with configuration ``name``; write the report's memory figures."""
    import diffc

    diffc.build(model, profile_for(name, size), out, progress=False, force=True)
    report = json.loads((out / "build_report.json").read_text())
    result.write_text(json.dumps({"memory": report.get("memory"), "memory_check": report.get("memory_check"),
                                  "timings": report.get("timings"),
                                  "quality_gate": {k: v for k, v in (report.get("quality_gate") or {}).items()
                                                   if k != "rows"}}))


def worker_sdxl(result: Path) -> None:
    """SDXL's components' fp32 bytes from its configs on the meta device, and the memory check's verdict."""
    import diffusers
    import torch
    import transformers

    from _sd15 import SD15_TEXT_ENCODER, SD15_VAE
    from diffc.build import memory

    with torch.device("meta"):
        modules = {"unet": diffusers.UNet2DConditionModel(**SDXL_UNET), "vae": diffusers.AutoencoderKL(**SD15_VAE),
                   "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT_ENCODER)),
                   "text_encoder_2": transformers.CLIPTextModelWithProjection(
                       transformers.CLIPTextConfig(**SDXL_TEXT_ENCODER_2))}
    sizes = {k: 4 * sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
    verdicts = {}
    for name in PROFILES:
        kind = memory.build_kind(profile_for(name))
        need = memory.estimate_peak(sizes, kind)
        avail = memory.mem_available()
        verdicts[name] = {"kind": kind, "estimated_peak_bytes": need, "available_bytes": avail,
                          "refused": avail is not None and need > avail}
    result.write_text(json.dumps({"fp32_bytes": sizes, "check": verdicts}))


def run_child(argv: list[str], tree: Path | None = None) -> tuple[dict[str, Any], int, float, int]:
    """Run this script with ``argv`` in a fresh process (importing diffc from the checkout ``tree`` when given);
    (its result file, peak RSS bytes, wall s, exit code)."""
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None
    with tempfile.TemporaryDirectory(prefix="diffc-bm-") as d:
        result = Path(d) / "result.json"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv, "--result", str(result)],
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        data = json.loads(result.read_text()) if result.is_file() else {}
    return data, usage.ru_maxrss * 1024, wall, proc.returncode  # Linux: ru_maxrss in KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("sd15", "sd15-half", "sd15-small"), default="sd15")
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--work", type=Path, default=None, help="where the pipeline folder and artifacts go (kept)")
    ap.add_argument("--no-sdxl", action="store_true", help="skip the SDXL memory-check row")
    ap.add_argument("--tree", type=Path, default=None,
                    help="build with the diffc of this checkout (e.g. `git archive` of an earlier commit: the "
                         "before figures, with the same harness); default: the installed one")
    ap.add_argument("--size", type=int, default=None, help="build for SIZE px images only (default: the model's)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", choices=("pipeline", "build", "sdxl"), default=None)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--config")
    ap.add_argument("--artifact", type=Path)
    ap.add_argument("--result", type=Path)
    args = ap.parse_args()
    log_to_stderr("diffc.export", "diffc.passes", "diffc.engines")
    if args.worker == "pipeline":
        write_pipeline(args.arch, args.model)
        args.result.write_text("{}")
        return
    if args.worker == "build":
        worker_build(args.model, args.config, args.artifact, args.result, args.size)
        return
    if args.worker == "sdxl":
        worker_sdxl(args.result)
        return

    from diffc.build import memory

    names = [p for p in args.profiles.split(",") if p]
    unknown = [p for p in names if p not in PROFILES]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {PROFILES}")
    work = args.work or Path(tempfile.mkdtemp(prefix="diffc-build-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"{args.arch}_pipeline"
    run_child(["--worker", "pipeline", "--arch", args.arch, "--model", str(model)])
    sizes = memory.component_fp32_bytes(model, ["text_encoder", "unet", "vae"])
    largest = max(sizes, key=sizes.get)
    goal = 2 * sizes[largest] + 2 * GB
    result: dict[str, Any] = {
        "benchmark": "build_memory", "arch": args.arch, "machine": machine(),
        "fp32_bytes": sizes, "fp32_bytes_total": sum(sizes.values()), "largest_component": largest,
        "largest_fp32_bytes": sizes[largest], "goal": "peak RSS <= 2 x largest fp32 component + 2 GB",
        "goal_bytes": goal, "diffc_tree": str(args.tree) if args.tree else "installed",
        "image_size": args.size or "the model's default", "baseline": BASELINE, "runs": []}
    for name in names:
        artifact = work / f"{args.arch}_{name.replace('+', '_')}.diffc"
        log.info("building %s (%s) in a fresh process", artifact.name, name)
        size = ["--size", str(args.size)] if args.size else []
        data, peak, wall, rc = run_child(["--worker", "build", "--model", str(model), "--config", name,
                                          "--artifact", str(artifact), *size], tree=args.tree)
        row = {"profile": name, "exit_code": rc, "peak_rss_bytes": peak, "peak_rss_gb": sig(peak / GB),
               "ratio_to_largest": sig(peak / sizes[largest]), "within_goal": peak <= goal, "wall_s": round(wall, 1),
               **data}
        before = BASELINE["peak_rss_bytes"].get(name) if args.arch == "sd15" and not args.size else None
        if before:
            row["baseline_peak_rss_gb"] = sig(before / GB)
            row["reduction_vs_baseline"] = sig(before / peak)
        result["runs"].append(row)
        log.info("%s: peak RSS %.2f GB (%.2fx the largest component; goal %.2f GB), %.0f s, exit %d", name,
                 peak / GB, peak / sizes[largest], goal / GB, wall, rc)
        shutil.rmtree(artifact, ignore_errors=True)
    if not args.no_sdxl:
        data, peak, _, rc = run_child(["--worker", "sdxl"])
        if data:
            sdxl_largest = max(data["fp32_bytes"].values())
            result["sdxl"] = {**data, "goal_bytes": 2 * sdxl_largest + 2 * GB, "worker_peak_rss_bytes": peak,
                              "built": False,
                              "why_not_built": "sizes from the configs on torch's meta device; the build's memory "
                                               "check's verdict on this machine is in `check` (a refused build is "
                                               "refused before exporting)"}
    emit(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
