"""Cold start: how long until an SD-1.5-sized UNet is ready to run, plain onnxruntime vs a diffc artifact.

Builds the SD-1.5 UNet from its published config with random weights (speed does not depend on weight
values), exports it with diffc's exporter, then builds diffc's onnxruntime engine from it (the graph
optimized once at build time). Each load is timed in a fresh Python process (so nothing is shared between
measurements but the OS page cache, which both sides get equally: a warm-up load runs first).

    python benchmarks/cold_start.py [--reps 3] [--workdir DIR] [--keep]

Prints one JSON object: median load seconds for each side and ``ratios.plain_over_diffc``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, timed_subprocess  # noqa: E402

from diffc._fs import sha256_file  # noqa: E402

log = logging.getLogger("diffc.bench.cold_start")

PLAIN = """
import time, onnxruntime as ort
t0 = time.perf_counter()
ort.InferenceSession({path!r}, providers=["CPUExecutionProvider"])
print(time.perf_counter() - t0)
"""

DIFFC = """
import json, os, time
from pathlib import Path
os.environ["DIFFC_CACHE_DIR"] = {cache!r}
t0 = time.perf_counter()
from diffc.runtime.pipeline import open_sessions
manifest = json.loads(Path({manifest!r}).read_text())
open_sessions(Path({root!r}), manifest, verify={verify!r})
print(time.perf_counter() - t0)
"""


def export_unet(workdir: Path) -> Path:
    import torch

    from _sd15 import sd15_unet
    from diffc.exporter.contracts import SampleShape, get_contract
    from diffc.exporter.export import export_component

    unet = sd15_unet()
    contract = get_contract("unet", unet)
    sample = contract.make_inputs(unet, SampleShape(2, 64, 64, 77), torch.Generator().manual_seed(0))
    path = export_component(unet, contract, workdir / "onnx" / "unet" / "model.onnx", opset=21,
                            exporter="torchscript", sample=sample)
    del unet
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the exported files")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from diffc.engines.onnxruntime import build_engine

    work = Path(args.workdir or tempfile.mkdtemp(prefix="diffc-cold-"))
    try:
        t0 = time.perf_counter()
        onnx_path = work / "onnx" / "unet" / "model.onnx"
        if not onnx_path.exists():
            log.info("exporting the SD-1.5 UNet (random weights) to %s", onnx_path)
            export_unet(work)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine = work / "artifact" / "unet" / "model.onnx"
        build_engine(onnx_path, engine)
        engine_s = time.perf_counter() - t0
        engine_files = sorted(p for p in engine.parent.iterdir())
        root = engine.parent.parent
        manifest = root / "manifest.json"  # just the part open_sessions reads
        manifest.write_text(json.dumps({"text_encoders": [], "components": {"unet": {
            "file": "unet/model.onnx", "backend": "onnxruntime",
            "files": {f"unet/{p.name}": sha256_file(p) for p in engine_files}}}}))
        cache = work / "cache"

        def diffc(verify: bool, fresh_cache: bool) -> float:
            if fresh_cache:
                shutil.rmtree(cache, ignore_errors=True)
            return timed_subprocess(DIFFC.format(cache=str(cache), manifest=str(manifest), root=str(root),
                                                 verify=verify))

        runs = {"plain_onnxruntime": [], "diffc_first_load_on_host": [], "diffc": [], "diffc_without_sha256": []}
        timed_subprocess(PLAIN.format(path=str(onnx_path)))  # warm the page cache for both sides
        diffc(False, True)
        for i in range(args.reps):
            log.info("rep %d/%d", i + 1, args.reps)
            runs["plain_onnxruntime"].append(timed_subprocess(PLAIN.format(path=str(onnx_path))))
            runs["diffc_first_load_on_host"].append(diffc(True, True))
            runs["diffc"].append(diffc(True, False))
            runs["diffc_without_sha256"].append(diffc(False, False))
        med = {k: round(statistics.median(v), 3) for k, v in runs.items()}
        emit({
            "benchmark": "cold_start",
            "model": "SD-1.5 UNet architecture, random weights, fp32",
            "median_load_s": med,
            "runs_s": {k: [round(x, 3) for x in v] for k, v in runs.items()},
            "ratios": {
                "plain_over_diffc": round(med["plain_onnxruntime"] / med["diffc"], 2),
                "plain_over_diffc_first_load_on_host": round(med["plain_onnxruntime"] / med["diffc_first_load_on_host"], 2),
            },
            "notes": "diffc = the runtime's open_sessions(): the engine graph optimized at build time, its layout-"
                     "optimized form from the per-host cache, sha256 of all engine files checked concurrently, or "
                     "taken from the cache's record of a match while the files are unchanged (inode, size, mtime, "
                     "ctime). diffc_first_load_on_host = the same with an empty cache (it fills both); `diffc "
                     "build` fills the first on the build host. Each number is a fresh Python process.",
            "setup_s": {"export": round(export_s, 1), "diffc_engine_build": round(engine_s, 1)},
            "sizes_bytes": {"onnx": sum(p.stat().st_size for p in onnx_path.parent.iterdir()),
                            "engine": sum(p.stat().st_size for p in engine_files)},
            "machine": machine(),
        })
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
