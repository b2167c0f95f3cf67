"""OpenVINO GenAI's side of benchmarks/end_to_end.py: optimum-intel's OpenVINO export of the benchmark's pipeline
folder, and its NNCF quantization, run by the Python of a venv of their own (end_to_end.py --genai-python).

optimum-intel pins its own torch / transformers / nncf, and OpenVINO GenAI wants the OpenVINO release it was
built against, so these live outside diffc's venv. The venv the measurements used (torch's CPU wheel, pinned:
an unpinned torch pulls a multi-GB CUDA build; optimum-intel pulls a CUDA torchvision that nothing here needs
and that fails to import without CUDA, so it is removed):

    python3 -m venv /work/genai-venv
    /work/genai-venv/bin/pip install openvino-genai==2026.4.1.0 openvino==2026.4.1 optimum-intel==2.2.0 \\
        nncf==3.4.0 torch==2.13.0 diffusers==0.39.0 transformers==5.5.4
    /work/genai-venv/bin/pip uninstall -y torchvision

Two commands, each writing a folder that OpenVINO GenAI's ``Text2ImagePipeline`` loads:

  export MODEL OUT      optimum-intel's ``main_export`` (what ``optimum-cli export openvino --task text-to-image``
                        runs): OpenVINO IR of every component plus the OpenVINO tokenizer GenAI needs
  quantize FP OUT MODE  NNCF through optimum-intel's Python API on the exported folder FP. ``int8`` is what
                        ``optimum-cli ... --quant-mode int8`` does for a diffusion pipeline (``OVQuantizationConfig``:
                        the UNet fully quantized, int8 activations (asymmetric) x int8 weights, the other
                        components int8 weight-only), calibrated here on UNet inputs collected from the exported
                        pipeline's own DDIM loop over the benchmark's calibration prompts (the CLI needs a hub
                        dataset, unreachable here; these are the prompts, seeds, size and steps diffc's int8 rows
                        calibrate on). ``int8w`` is int8 weight-only compression of every component
                        (``OVWeightQuantizationConfig(bits=8)``, no calibration).

Each writes into OUT.tmp and renames it to OUT when done, so an interrupted run never leaves a folder that
end_to_end.py would take for a finished one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("diffc.bench.genai")


def _fresh(out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def export(model: Path, out: Path) -> None:
    """optimum-intel's export of the diffusers folder ``model``, with the tokenizers converted for GenAI."""
    from optimum.exporters.openvino import main_export

    tmp = _fresh(out)
    main_export(model_name_or_path=str(model), output=tmp, task="text-to-image", convert_tokenizer=True)
    # the folder's own scheduler config, as written: the export re-saves it through diffusers' scheduler class,
    # which drops keys that class does not take (SD 1.5's PNDM config says clip_sample false for the DDIM that
    # every row samples with; GenAI's DDIM refuses clip_sample true)
    shutil.copy2(model / "scheduler" / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json")
    if not (tmp / "tokenizer" / "openvino_tokenizer.xml").is_file():
        raise SystemExit(f"optimum-intel wrote no OpenVINO tokenizer into {tmp / 'tokenizer'}: OpenVINO GenAI "
                         "cannot load the folder; install openvino-tokenizers matching the openvino release")
    os.replace(tmp, out)


def collect_unet_inputs(fp: Path, prompts: list[str], seeds: list[int], negative: str, guidance: float,
                        size: int, steps: int) -> list:
    """The UNet's inputs at every step of the exported pipeline's own DDIM loop (fp32 compute): what NNCF
    calibrates the int8 UNet on. optimum-intel's own collector runs the pipeline's defaults (50 steps, PNDM,
    no negative prompt); this one runs the loop the benchmark times."""
    import diffusers
    import torch
    from optimum.intel import OVStableDiffusionPipeline
    from optimum.intel.openvino.quantization import InferRequestWrapper

    pipe = OVStableDiffusionPipeline.from_pretrained(fp, compile=False, ov_config={"INFERENCE_PRECISION_HINT": "f32"})
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    samples: list = []
    pipe.unet.request = InferRequestWrapper(pipe.unet.request, samples)
    for prompt in prompts:
        for seed in seeds:
            pipe(prompt, negative_prompt=negative, guidance_scale=guidance, num_inference_steps=steps,
                 height=size, width=size, generator=torch.Generator().manual_seed(seed), output_type="np")
    log.info("collected %d UNet calls for calibration", len(samples))
    return samples


def quantize(fp: Path, out: Path, mode: str, calibration: dict) -> None:
    """NNCF int8 of the exported folder ``fp`` through optimum-intel's Python API (see the module docstring)."""
    import nncf
    from optimum.intel import (OVConfig, OVQuantizationConfig, OVQuantizer, OVStableDiffusionPipeline,
                               OVWeightQuantizationConfig)

    tmp = _fresh(out)
    if mode == "int8":
        samples = collect_unet_inputs(fp, **calibration)
        # what --quant-mode int8 builds (optimum.commands.export.openvino.prepare_q_config): int8, asymmetric
        # activations; optimum-intel applies it to the UNet and int8 weight-only compression to the rest
        config = OVQuantizationConfig(bits=8, dtype="int8", sym=False, num_samples=len(samples))
        dataset = {"unet": nncf.Dataset(samples)}
    elif mode == "int8w":
        config, dataset = OVWeightQuantizationConfig(bits=8), None
    else:
        raise SystemExit(f"unknown quantization mode {mode!r}: int8 or int8w")
    pipe = OVStableDiffusionPipeline.from_pretrained(fp, compile=False)
    OVQuantizer(pipe).quantize(calibration_dataset=dataset, ov_config=OVConfig(quantization_config=config),
                               save_directory=tmp)
    # the quantizer saves the pipeline's models and configs; GenAI also needs the OpenVINO tokenizer files
    # and anything else the export wrote, and the scheduler config as the export kept it (see export())
    for f in fp.rglob("*"):
        if f.is_file() and (not (tmp / f.relative_to(fp)).exists() or f.name == "scheduler_config.json"):
            (tmp / f.relative_to(fp)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, tmp / f.relative_to(fp))
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export")
    e.add_argument("model", type=Path)
    e.add_argument("out", type=Path)
    q = sub.add_parser("quantize")
    q.add_argument("fp", type=Path)
    q.add_argument("out", type=Path)
    q.add_argument("mode", choices=("int8", "int8w"))
    q.add_argument("--calibration", default="{}",
                   help="JSON: prompts, seeds, negative, guidance, size, steps of the calibration loop (int8)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "export":
        export(args.model, args.out)
    else:
        quantize(args.fp, args.out, args.mode, json.loads(args.calibration))


if __name__ == "__main__":
    main()
