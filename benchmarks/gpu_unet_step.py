"""One SD-1.5-architecture UNet step at 512x512 px on an NVIDIA GPU: diffc ``cuda-fp16`` against torch fp16 eager.

The UNet is built from SD 1.5's published config (``benchmarks/_sd15.py``) with random weights from a fixed seed
(speed does not depend on weight values; no model hub is needed), batch 2 (classifier-free guidance), 64x64
latents, text length 77. Variants, each timed as the median of ``--reps`` calls after warm-up, with the GPU
synchronized around every call:

``torch_fp16_eager``   the diffusers module in float16 on ``cuda`` under ``torch.inference_mode``
``diffc_cuda_fp16``    the exported graph through ``diffc.passes`` (target ``onnxruntime_cuda``) and the backend's
                       fp16 build, in :class:`diffc.engines.onnxruntime_cuda.Session` (I/O binding, CUDA graph)

Also reports the two outputs' relative L2 difference on the same input. ``python -m diffc.selfcheck --gpu`` runs
this; on its own: ``python benchmarks/gpu_unet_step.py --out unet_step.json``. Prints (and writes) one JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

log = logging.getLogger("diffc.bench.gpu_unet_step")
BATCH, LATENT, TEXT_LEN, CROSS_DIM = 2, 64, 77, 768


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((BATCH, 4, LATENT, LATENT)).astype(np.float32),
            "timestep": np.full((BATCH,), 981.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((BATCH, TEXT_LEN, CROSS_DIM)).astype(np.float32)}


def median_s(fn, reps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=None, help="for the ~3.4 GB graphs (default: a temp dir)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from _sd15 import sd15_unet
    from diffc.engines.onnxruntime_cuda import Session, build_engine
    from diffc.exporter.contracts import SampleShape, get_contract
    from diffc.exporter.export import export_component, quiet_huggingface
    from diffc.onnx_io import load_model, save_model
    from diffc.passes import run_passes

    quiet_huggingface()
    f = feeds()
    result: dict = {"batch": BATCH, "latent": [LATENT, LATENT], "pixels": [LATENT * 8, LATENT * 8],
                    "gpu": torch.cuda.get_device_name(0), "times_s": {}}
    with tempfile.TemporaryDirectory(prefix="diffc-gpu-unet-", dir=args.workdir) as work:
        work = Path(work)
        unet = sd15_unet(seed=0)
        contract = get_contract("unet", unet)
        sample = contract.make_inputs(unet, SampleShape(BATCH, LATENT, LATENT, TEXT_LEN),
                                      torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        (work / "export").mkdir()
        export_component(unet, contract, work / "export" / "model.onnx", opset=21, exporter="torchscript",
                         sample=sample)
        result["export_s"] = round(time.perf_counter() - t0, 1)

        unet = unet.to("cuda", torch.float16)
        tf = {k: torch.from_numpy(v).to("cuda") for k, v in f.items()}
        x, h = tf["sample"].half(), tf["encoder_hidden_states"].half()
        with torch.inference_mode():
            def torch_step():
                return unet(x, tf["timestep"], h, return_dict=False)[0]

            result["times_s"]["torch_fp16_eager"] = median_s(torch_step, args.reps, 3, torch.cuda.synchronize)
            ref = torch_step().float().cpu().numpy()
        del unet, tf, x, h
        torch.cuda.empty_cache()

        t0 = time.perf_counter()
        model = load_model(work / "export" / "model.onnx")
        passed, _ = run_passes(model, "unet", "onnxruntime_cuda")
        del model
        save_model(passed, work / "passed" / "model.onnx", external=True)
        del passed
        build_engine(work / "passed" / "model.onnx", work / "engine" / "model.onnx", precision="fp16")
        result["diffc_build_s"] = round(time.perf_counter() - t0, 1)
        sess = Session(work / "engine" / "model.onnx", cuda_graph=True)
        got = sess.run(f)["out_sample"]
        result["times_s"]["diffc_cuda_fp16"] = median_s(lambda: sess.run(f), args.reps, 3, lambda: None)
        sess.close()
    result["rel_l2_diffc_vs_torch"] = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
    result["speedup_vs_torch_fp16_eager"] = round(result["times_s"]["torch_fp16_eager"]
                                                  / result["times_s"]["diffc_cuda_fp16"], 3)
    text = json.dumps(result, indent=2)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
