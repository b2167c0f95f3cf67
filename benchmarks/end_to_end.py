"""End-to-end text-to-image on the CPU: diffc against what users run today, side by side in one run.

The pipeline is Stable Diffusion 1.5's architecture built from its published component configs (CLIP
ViT-L/14 text encoder, the 860 M-parameter UNet, the SD VAE) with random weights from a fixed seed: speed
does not depend on weight values, and no model hub is reachable here. Every configuration generates the same
prompt with classifier-free guidance (7.5) and the same sampler (DDIM, which diffc picks for SD 1.5's PNDM
config), at each size and step count:

  diffusers_fp32   diffusers StableDiffusionPipeline, eager fp32 (where most users start)
  diffusers_bf16   the same in bf16 with channels_last UNet/VAE (its fastest CPU configuration measured here)
  optimum_ort      optimum's ORTDiffusionPipeline on the same pipeline exported by optimum (needs optimum-onnx,
                   whose transformers<4.58 pin conflicts with diffc's export stack: it runs from its own venv,
                   --optimum-python; without one the row says why it was skipped)
  diffc_cpu        diffc artifact built with the `cpu-fp32` profile (onnxruntime fp32), run by diffc's runtime
  diffc_cpu_int8   the `cpu-int8` profile: int8 UNet and VAE decoder calibrated on the artifact's own fp32 loop
                   (here 2 prompts x 1 seed at 512x512, to keep the setup short; random weights make image
                   quality meaningless, so its build-time quality gate is off here -- quality is measured on
                   the trained demo model by benchmarks/quality.py)
  diffc_cpu_cache  the `cpu-cache` profile: fp32, cache reuse at branch 0, full UNet every 2nd step
  diffc_cpu_int8_cache  both: `cpu-int8` (calibrated as above) with `cpu-cache`'s [cache] table
  diffc_openvino   the `cpu-openvino` profile: OpenVINO's CPU plugin, bf16 compute (AVX512-BF16 / AMX; fp32 on
                   CPUs without them); needs the openvino extra, else the row says why it was skipped
  diffc_openvino_cache  `cpu-openvino` with `cpu-cache`'s [cache] table
  diffc_openvino_int8  the `cpu-openvino-int8` profile: int8 UNet and VAE decoder (calibrated as for
                   diffc_cpu_int8) on OpenVINO's int8 kernels, bf16 elsewhere
  diffc_openvino_int8_cache  `cpu-openvino-int8` with `cpu-cache`'s [cache] table
  genai_bf16       OpenVINO GenAI's Text2ImagePipeline (C++ pipeline, Python bindings) on optimum-intel's OpenVINO
                   export of the same pipeline folder: what an Intel-CPU user deploys today. Its scheduler is set
                   to DDIM (Scheduler.from_config on the folder's scheduler_config.json, Type.DDIM), the pipeline
                   reshaped to static shapes for the image size (reshape(1, size, size, 7.5): its fastest
                   setting) and compiled with INFERENCE_PRECISION_HINT bf16 on a CPU with AVX512-BF16 / AMX, f32
                   elsewhere (the row's `precision` says which), and a CACHE_DIR, like diffc's host cache.
                   optimum-intel, nncf and GenAI run from a venv of their own (--genai-python; benchmarks/_genai.py
                   gives the install line); without one the genai rows say why they were skipped
  genai_int8       the same on NNCF full int8 through optimum-intel's Python API (OVQuantizationConfig: what
                   optimum-cli's --quant-mode int8 does), calibrated like diffc_openvino_int8 (same prompts, seed,
                   512x512, 4 DDIM steps); bf16 hint for what stays float
  genai_int8w      the same on int8 weight-only compression of every component (OVWeightQuantizationConfig(bits=8))

Each configuration runs in fresh processes, --reps of them, taken in turn with the other rows (fp32, bf16,
..., diffc, then again: this machine's speed drifts, and so every row sees the drift alike). Each process
times its first image from the cold start (imports and model load included), then one more image (the
first was its warm-up), and reads its peak resident memory. A row gives the medians over its processes and
the largest peak. Before anything is timed, every configuration's files are read once (the OS
page cache, for every row alike) and each diffc artifact is loaded once per image size in a process of its
own, as a user's first run at that size would: that fills diffc's host cache (onnxruntime's layout-optimized
graphs, normally made by `diffc build` already; OpenVINO's models compiled for the size; the record of files
whose sha256 matched). `setup_s` gives those first loads' seconds. diffc rows also say where an image's time goes:
`engine_s`, the median seconds per image spent in each engine (text encoder, UNet, shallow UNet, VAE decoder).

    python benchmarks/end_to_end.py --quick          # 256x256, 4 steps, 1 rep
    python benchmarks/end_to_end.py                  # 256 and 512, 4 and 20 steps, 3 reps

Prints one JSON object with every measurement, `ratios` (baseline time / diffc time per baseline) and the
machine's details.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import emit, machine, sig  # noqa: E402

log = logging.getLogger("diffc.bench.end_to_end")

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
GUIDANCE = 7.5
DIFFC_CONFIGS = ("diffc_cpu", "diffc_cpu_int8", "diffc_cpu_cache", "diffc_cpu_int8_cache", "diffc_openvino",
                 "diffc_openvino_cache", "diffc_openvino_int8", "diffc_openvino_int8_cache")
GENAI_CONFIGS = ("genai_bf16", "genai_int8", "genai_int8w")
CONFIGS = ("diffusers_fp32", "diffusers_bf16", "optimum_ort", *GENAI_CONFIGS, *DIFFC_CONFIGS)
# what the int8 rows (diffc's and GenAI's) calibrate on, short to keep the setup short: diffc's calibration runs
# the artifact's loop at its defaults (the model's 512x512, the profile's 4 steps, guidance 7.5, empty negative)
CALIBRATION = {"prompts": ["a red bicycle by a brick wall", "a lighthouse at dusk, watercolor"], "seeds": [0],
               "size": 512, "steps": 4, "guidance": GUIDANCE, "negative": ""}


# ------------------------------------------------------------------------------------------------ setup


def write_sd15_pipeline(folder: Path) -> Path:
    """SD 1.5's architecture with random weights, saved as a diffusers folder (with the real CLIP tokenizer)."""
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers
    import torch
    import transformers

    from _sd15 import SD15_SCHEDULER, SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE
    from diffc.exporter.tiny import CLIP_TOKENIZER_ASSETS

    log.info("writing the SD-1.5-architecture pipeline (random weights) to %s", folder)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET)
    vae = diffusers.AutoencoderKL(**SD15_VAE)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT_ENCODER))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_ASSETS)
    scheduler = diffusers.PNDMScheduler.from_config({k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"})
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; older transformers (optimum's venv) need vocab.json + merges.txt
    for f in CLIP_TOKENIZER_ASSETS.iterdir():
        shutil.copy(f, tmp / "tokenizer" / f.name)
    # SD 1.5's own scheduler config says clip_sample false (PNDM ignores it; DDIM would clip without it)
    cfg_path = tmp / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "clip_sample": False}, indent=2))
    os.replace(tmp, folder)
    return folder


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def diffc_profile(config: str):
    """The profile each diffc row is built with."""
    import dataclasses

    from diffc.profiles import load_profile

    if config == "diffc_cpu_cache":
        return load_profile("cpu-cache")
    base = config.removesuffix("_cache")
    profile = load_profile({"diffc_cpu": "cpu-fp32", "diffc_cpu_int8": "cpu-int8", "diffc_openvino": "cpu-openvino",
                            "diffc_openvino_int8": "cpu-openvino-int8"}[base])
    if profile.quantized_components():
        profile = dataclasses.replace(profile, quantize=dataclasses.replace(
            profile.quantize, calibration_prompts=tuple(CALIBRATION["prompts"]),
            calibration_seeds=tuple(CALIBRATION["seeds"]), min_psnr_db=0.0))
    if config.endswith("_cache"):
        profile = dataclasses.replace(profile, cache=load_profile("cpu-cache").cache)
    return profile


def build_diffc(model: Path, out: Path, config: str = "diffc_cpu") -> Path:
    import diffc

    from diffc.profiles.schema import Profile

    profile = diffc_profile(config)
    if (out / "manifest.json").is_file():
        # a kept artifact is reused only if it was built with the profile this run asks for (the shipped
        # profiles change between diffc versions); read back through the schema, so fields added since with
        # their default values compare equal
        def fields(prof):
            return {k: v for k, v in prof.to_dict().items() if k != "source"}

        if fields(Profile.from_dict(json.loads((out / "manifest.json").read_text())["profile"])) == fields(profile):
            return out
        log.info("%s was built with another profile than %s asks for now: rebuilding it", out, config)
    log.info("building the diffc artifact %s (%s)", out, profile.name)
    return diffc.build(model, profile, out, progress=False, force=True)


def setup_genai(python: str | None, model: Path, work: Path, configs: list[str], paths: dict[str, Path],
                skipped: dict[str, str], setup_s: dict[str, float]) -> None:
    """optimum-intel's export of ``model`` and its NNCF quantizations for the genai rows in ``configs``, made
    once (kept in ``work``) by benchmarks/_genai.py run by ``python``, the genai venv's; the seconds go into
    ``setup_s``. Without ``python``, or when a step fails, the rows it feeds are put in ``skipped`` with why."""
    wanted = [c for c in GENAI_CONFIGS if c in configs]
    if not wanted:
        return
    if not python:
        for config in wanted:
            skipped[config] = ("OpenVINO GenAI, optimum-intel and nncf run from a venv of their own: pass "
                               "--genai-python (or DIFFC_BENCH_GENAI_PYTHON) with its python3; "
                               "benchmarks/_genai.py's docstring has the install line")
        return
    script = str(HERE / "_genai.py")

    def run(name: str, out: Path, feeds: list[str], *cmd: str) -> bool:
        """Makes ``out`` unless a finished one is kept; on failure the rows in ``feeds`` say why."""
        if (out / "model_index.json").is_file():
            return True
        log.info("genai setup: %s -> %s", name, out)
        t0 = time.perf_counter()
        try:
            subprocess.run([python, script, *cmd], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            for config in feeds:
                skipped[config] = f"genai {name} failed: {(e.stderr or '')[-1000:]}"
            return False
        setup_s[f"genai_{name}"] = round(time.perf_counter() - t0, 1)
        return True

    fp = work / "genai-ov"
    if not run("export", fp, wanted, "export", str(model), str(fp)):
        return
    for config in wanted:
        mode = config.removeprefix("genai_")
        out = fp if mode == "bf16" else work / f"genai-ov-{mode}"
        if mode == "bf16" or run(f"quantize_{mode}", out, [config], "quantize", str(fp), str(out), mode,
                                 "--calibration", json.dumps(CALIBRATION)):
            paths[config] = out


def export_optimum(python: str, model: Path, out: Path) -> Path:
    if (out / "model_index.json").is_file():
        return out
    log.info("exporting with optimum (%s) to %s", python, out)
    subprocess.run([python, "-m", "optimum.exporters.onnx", "--model", str(model), "--task", "text-to-image",
                    str(out)], check=True, capture_output=True, text=True)
    return out


# ------------------------------------------------------------------------------------------------ child


def child(config: str, path: str, size: int, steps: int, load_only: bool = False) -> None:
    """Runs inside the measured process: the first image, then one timed image. Prints JSON events; the parent
    timestamps `first_image`. With ``load_only`` it loads the pipeline and exits (the warm-up before timing)."""
    import numpy as np

    def event(**kw):
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()

    # where each image's time goes, for the rows that can say: seconds per component
    spent: dict[str, float] = {}
    precision = None  # the compute precision, for the rows that choose it by the CPU
    if config.startswith("diffusers"):
        import diffusers
        import torch

        dtype = torch.bfloat16 if config == "diffusers_bf16" else torch.float32
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, dtype=dtype)
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        if config == "diffusers_bf16":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        pipe.set_progress_bar_config(disable=True)

        def generate(seed):
            with torch.inference_mode():
                return pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE, num_inference_steps=steps,
                            height=size, width=size, generator=torch.Generator().manual_seed(seed),
                            output_type="np").images
    elif config == "optimum_ort":
        import diffusers
        from optimum.onnxruntime import ORTDiffusionPipeline

        pipe = ORTDiffusionPipeline.from_pretrained(path)
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        import torch  # optimum's ORT pipelines take torch generators like diffusers'

        def generate(seed):
            return pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE, num_inference_steps=steps,
                        height=size, width=size, generator=torch.Generator().manual_seed(seed),
                        output_type="np").images
    elif config.startswith("diffc"):
        import diffc
        from diffc.exporter.sampler import compile_sampler

        pipe = diffc.load(path, progress=False, height=size, width=size)
        m = pipe.manifest
        # the artifact's sampler tables are data: the same engines serve every step count
        pipe.tables = compile_sampler(m["sampler"]["kind"], m["build"]["scheduler_config"], steps)

        # seconds in each engine (the rest is numpy: tokenizing, the sampler step)
        def timed(run, name):
            def wrapper(*args, **kwargs):
                t = time.perf_counter()
                try:
                    return run(*args, **kwargs)
                finally:
                    spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
            return wrapper

        for name, session in pipe.sessions.items():
            session.run = timed(session.run, name)

        def generate(seed):
            spent.clear()
            return pipe(PROMPT, negative_prompt=NEGATIVE, guidance=GUIDANCE, seed=seed, height=size, width=size)
    elif config in GENAI_CONFIGS:
        import openvino as ov
        import openvino_genai as ov_genai

        # bf16 compute where the CPU multiplies bf16 natively (AVX512-BF16 / AMX), as diffc's cpu profile does;
        # OpenVINO's CPU plugin defaults to bf16 only with AMX
        precision = "bf16" if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
        props: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if os.environ.get("DIFFC_CACHE_DIR"):  # compiled models kept between processes, like diffc's host cache
            props["CACHE_DIR"] = str(Path(os.environ["DIFFC_CACHE_DIR"]) / "openvino-genai" / config)
        pipe = ov_genai.Text2ImagePipeline(path)
        pipe.set_scheduler(ov_genai.Scheduler.from_config(str(Path(path) / "scheduler" / "scheduler_config.json"),
                                                          ov_genai.Scheduler.Type.DDIM))
        pipe.reshape(1, size, size, GUIDANCE)  # static shapes for this size: GenAI's fastest setting
        pipe.compile("CPU", **props)

        def generate(seed):
            image = pipe.generate(PROMPT, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE,
                                  num_inference_steps=steps, height=size, width=size,
                                  generator=ov_genai.TorchGenerator(seed))
            m = pipe.get_performance_metrics()  # its ImageGenerationPerfMetrics: ms, raw durations in us
            spent.clear()
            spent.update(text_encoder=sum(m.get_text_encoder_infer_duration().values()) / 1e3,
                         unet=sum(m.raw_metrics.unet_inference_durations) / 1e6,
                         vae_decoder=m.get_vae_decoder_infer_duration() / 1e3)
            return image.data
    else:
        raise SystemExit(f"unknown config {config}")

    if load_only:
        return
    img = generate(0)
    event(event="first_image", shape=list(np.asarray(img).shape))
    t0 = time.perf_counter()
    generate(1)
    image_s = time.perf_counter() - t0
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
    with open("/proc/self/status") as f:
        hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    event(event="done", image_s=image_s, engines=dict(spent) or None, precision=precision,
          peak_rss_bytes=hwm_kib * 1024)


def child_cmd(python: str, config: str, path: Path, size: int, steps: int, *extra: str) -> list[str]:
    return [python, str(Path(__file__).resolve()), "--child", config, "--path", str(path), "--size", str(size),
            "--steps", str(steps), *extra]


def warm_up(python: str, config: str, path: Path, env: dict[str, str], sizes: list[int]) -> float:
    """Before timing, untimed: read every file of ``config`` (into the OS page cache, for every row alike);
    diffc rows are also loaded once per image size in a process of their own, as a user's first run at that
    size would (it fills diffc's host cache: onnxruntime's layout-optimized graphs, normally made by `diffc
    build` already, OpenVINO's models compiled for that size, and the record of files whose sha256 matched);
    genai rows too (their CACHE_DIR of compiled models). Returns the seconds it took."""
    t0 = time.perf_counter()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    if config.startswith("diffc") or config in GENAI_CONFIGS:
        for size in sizes:
            subprocess.run(child_cmd(python, config, path, size, 1, "--load-only"), check=True, capture_output=True,
                           env={**os.environ, **env})
    return time.perf_counter() - t0


def cold_process(python: str, config: str, path: Path, size: int, steps: int, env: dict[str, str]) -> dict[str, Any]:
    """One fresh process of ``config``: seconds to its first image (imports and load included), the seconds of
    one more image after that (steady state: the first was its warm-up), its peak resident memory, and for
    diffc rows the seconds in each engine during the timed image."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(child_cmd(python, config, path, size, steps), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    first = None
    done: dict[str, Any] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ev.get("event") == "first_image":
            first = time.perf_counter() - t0
        elif ev.get("event") == "done":
            done = ev
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0 or first is None or not done:
        raise RuntimeError(f"{config} {size}px {steps} steps failed: {err[-2000:]}")
    return {"first_s": first, "image_s": done["image_s"], "peak_rss_bytes": done["peak_rss_bytes"],
            "engines": done["engines"], "precision": done.get("precision")}


def measure_cell(python_for, configs: list[str], paths: dict[str, Path], size: int, steps: int, reps: int,
                 env: dict[str, str], skipped: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``reps`` cold processes per configuration, taken in turn (fp32, bf16, ..., diffc, then again), so this
    machine's speed drift falls on every row alike; medians over the processes. A configuration whose process
    fails is left out of the cell (and said in ``skipped``); the other rows go on."""
    samples: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    key = f"{size}px_{steps}steps"
    for r in range(reps):
        for config in configs:
            if f"{config}@{key}" in skipped:
                continue
            log.info("%s: %s (process %d of %d)", key, config, r + 1, reps)
            try:
                samples[config].append(cold_process(python_for(config), config, paths[config], size, steps, env))
            except RuntimeError as e:  # one broken baseline must not lose the other rows
                log.error("%s", e)
                skipped[f"{config}@{key}"] = str(e)[-1000:]
                samples[config] = []
    rows = {}
    for config, runs in samples.items():
        if not runs:
            continue
        times, firsts = [p["image_s"] for p in runs], [p["first_s"] for p in runs]
        row = {
            "median_s": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times],
            "time_to_first_image_s": round(statistics.median(firsts), 3),
            "first_images_s": [round(t, 3) for t in firsts],
            "peak_rss_gib": round(max(p["peak_rss_bytes"] for p in runs) / 2**30, 2),
        }
        if runs[0]["engines"]:  # diffc and genai rows: median seconds per image in each engine
            row["engine_s"] = {n: sig(statistics.median(p["engines"].get(n, 0.0) for p in runs))
                               for n in runs[0]["engines"]}
        if runs[0].get("precision"):
            row["precision"] = runs[0]["precision"]
        rows[config] = row
    return rows


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256x256, 4 steps, 1 repetition")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--steps", default="4,20")
    ap.add_argument("--reps", type=int, default=3, help="cold processes per configuration and cell")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--workdir", type=Path, default=None, help="keep the pipeline, exports and artifact here")
    ap.add_argument("--optimum-python", default=os.environ.get("DIFFC_BENCH_OPTIMUM_PYTHON"),
                    help="python3 of a venv with optimum-onnx installed (it needs transformers<4.58)")
    ap.add_argument("--genai-python", default=os.environ.get("DIFFC_BENCH_GENAI_PYTHON"),
                    help="python3 of a venv with openvino-genai, optimum-intel and nncf (benchmarks/_genai.py)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.path, args.size, int(args.steps), args.load_only)
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.sizes, args.steps, args.reps = "256", "4", 1
    sizes = [int(s) for s in args.sizes.split(",")]
    step_counts = [int(s) for s in args.steps.split(",")]
    configs = [c for c in args.configs.split(",") if c]

    work = args.workdir or Path(tempfile.mkdtemp(prefix="diffc-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {"DIFFC_CACHE_DIR": str(work / "engine-cache")}
    os.environ.update(env)
    try:
        model = write_sd15_pipeline(work / "sd15")
        paths: dict[str, Path] = {"diffusers_fp32": model, "diffusers_bf16": model}
        skipped: dict[str, str] = {}
        setup_s: dict[str, float] = {}
        from diffc.engines import openvino as openvino_engine

        for config in (c for c in DIFFC_CONFIGS if c in configs):
            if config.startswith("diffc_openvino") and openvino_engine.available() is None:
                skipped[config] = f"OpenVINO is not installed; {openvino_engine.EXTRA}"
                continue
            t0 = time.perf_counter()
            paths[config] = build_diffc(model, work / f"sd15-{config}.diffc", config)
            setup_s[f"{config}_build"] = round(time.perf_counter() - t0, 1)
        if "optimum_ort" in configs:
            if not args.optimum_python:
                skipped["optimum_ort"] = (
                    "optimum-onnx 0.1.0 requires transformers<4.58 while diffc's export stack uses transformers 5; "
                    "pass --optimum-python with a venv that has `pip install optimum-onnx onnxruntime diffusers`")
            else:
                t0 = time.perf_counter()
                try:
                    paths["optimum_ort"] = export_optimum(args.optimum_python, model, work / "optimum")
                    setup_s["optimum_export"] = round(time.perf_counter() - t0, 1)
                except subprocess.CalledProcessError as e:
                    skipped["optimum_ort"] = f"optimum export failed: {(e.stderr or '')[-500:]}"

        setup_genai(args.genai_python, model, work, configs, paths, skipped, setup_s)

        def python_for(config):
            if config in GENAI_CONFIGS:
                return args.genai_python
            return args.optimum_python if config == "optimum_ort" else sys.executable

        for config in configs:
            if config not in skipped:
                log.info("warm-up: %s", config)
                try:
                    setup_s[f"{config}_warm_up"] = round(warm_up(python_for(config), config, paths[config],
                                                                      env, sizes), 1)
                except subprocess.CalledProcessError as e:  # measure_cell() below says what failed, per cell
                    log.error("%s warm-up failed: %s", config, (e.stderr or b"")[-1000:])

        results: dict[str, dict[str, Any]] = {}
        measured = [c for c in configs if c not in skipped]
        for size in sizes:
            for steps in step_counts:
                results[f"{size}px_{steps}steps"] = measure_cell(python_for, measured, paths, size, steps,
                                                                 args.reps, env, skipped)

        ratios: dict[str, dict[str, float]] = {}
        for key, row in results.items():
            ratios[key] = {}
            for target in (c for c in DIFFC_CONFIGS if c in row):
                d = row[target]
                for config, r in row.items():
                    if config in DIFFC_CONFIGS and DIFFC_CONFIGS.index(config) >= DIFFC_CONFIGS.index(target):
                        continue  # every baseline over every diffc row, and diffc_cpu over diffc_cpu_int8
                    ratios[key][f"{config}_over_{target}"] = round(r["median_s"] / d["median_s"], 2)
                    ratios[key][f"{config}_over_{target}_first_image"] = round(
                        r["time_to_first_image_s"] / d["time_to_first_image_s"], 2)
        wb = weight_bytes(model)
        emit({
            "benchmark": "end_to_end",
            "model": "SD-1.5 architecture (CLIP ViT-L/14, 860M UNet, SD VAE), random weights",
            "prompt": PROMPT, "guidance": GUIDANCE, "sampler": "DDIM", "reps": args.reps,
            "fp32_weight_bytes": wb,
            "results": results,
            "ratios": ratios,
            "peak_rss_over_weights": {k: {c: round(r["peak_rss_gib"] * 2**30 / wb, 2) for c, r in row.items()}
                                      for k, row in results.items()},
            "skipped": skipped,
            "setup_s": setup_s,
            "machine": machine(),
        })
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
