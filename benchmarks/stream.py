"""Streaming image-to-image (StreamDiffusion's stream batch) against calling image-to-image frame by frame.

The same artifact, prompt, strength and frames, side by side in one process: ``frame_by_frame`` calls
``pipe(prompt, image=frame, strength=...)`` for every frame (the prompt encoded each time, one denoiser call per
step); ``stream`` pushes the frames through ``pipe.stream(prompt, strength=...)`` (the prompt's conditioning kept,
the in-flight frames denoised as one batch: one denoiser call per frame). Both run without classifier-free
guidance (``guidance='none'``, scale 1), as StreamDiffusion runs its few-step models; the stream's frames equal
the frame-by-frame ones (tests/runtime/test_stream.py), so the ratio is speed at the same output.

Reported: frames per second of each (after ``--warmup`` frames, which also fill the stream), and
``ratio`` = stream fps / frame-by-frame fps. On a CPU a batch of n rows costs nearly n single rows, so the ratio is
mostly the saved per-frame prompt encoding and per-call overhead; a GPU, where small batches are nearly free, is
where the stream batch earns StreamDiffusion's multiple.

    python benchmarks/stream.py                    # the demo artifact (cpu-fp32, built in a temp folder), quick
    python benchmarks/stream.py --sd15             # SD-1.5 architecture (random weights) at 256 px: minutes
    python benchmarks/stream.py --artifact DIR     # any UNet artifact with a vae_encoder
    python benchmarks/stream.py --save             # also write benchmarks/results/stream_<artifact>_<date>.json

Progress goes to the log (stderr); stdout is one JSON object (benchmarks/report.py renders the saved file).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import artifact_label, emit, log_to_stderr, run_header, save_run, sig  # noqa: E402

log = logging.getLogger("benchmarks.stream")
PROMPT = "a handwritten digit seven"


def frames_for(pipe, count: int) -> list[np.ndarray]:
    """``count`` different frames at the artifact's default size: the artifact's own drawings, so the encoder sees
    pictures, not noise."""
    return [(pipe(f"a handwritten digit {k % 10}", seed=k)[0] * 255).round().astype(np.uint8) for k in range(count)]


def fps(fn, frames, warmup: int) -> float:
    for f in frames[:warmup]:
        fn(f)
    t0 = time.perf_counter()
    for f in frames[warmup:]:
        fn(f)
    return (len(frames) - warmup) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, help="A UNet artifact with a vae_encoder (default: build the demo).")
    ap.add_argument("--sd15", action="store_true", help="SD-1.5 architecture at 256 px (random weights; minutes).")
    ap.add_argument("--strength", type=float, default=0.5, help="Image-to-image strength (default 0.5).")
    ap.add_argument("--frames", type=int, default=24, help="Frames timed per mode (default 24).")
    ap.add_argument("--warmup", type=int, default=4, help="Frames before timing (default 4; >= the stream's depth).")
    ap.add_argument("--save", action="store_true",
                    help="Also write the JSON to benchmarks/results/stream_<artifact>_<date>.json.")
    args = ap.parse_args()
    log_to_stderr("diffc.runtime", "diffc.build", "diffc.exporter", "diffc.passes", "diffc.engines")
    from diffc.runtime import load

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="diffc-bench-stream-") as tmp:
        artifact = args.artifact
        if artifact is None and args.sd15:
            from serve import build_artifact

            artifact = build_artifact(Path(tmp), True)
        elif artifact is None:  # onnxruntime fp32: any batch the stream forms, and the tests' exact artifact
            import diffc

            artifact = diffc.build("demo", "cpu-fp32", Path(tmp) / "demo.diffc", progress=False)
        pipe = load(artifact, progress=False)
        frames = frames_for(pipe, args.frames + args.warmup)
        stream = pipe.stream(PROMPT, strength=args.strength, guidance="none")
        log.info("stream of %d steps (%d frames in flight); timing %d frames per mode", len(stream.steps),
                 len(stream.steps), args.frames)
        one = fps(lambda f: pipe(PROMPT, image=f, strength=args.strength, guidance=1.0), frames, args.warmup)
        batched = fps(stream, frames, args.warmup)
    h, w = pipe.default_size
    result = {**run_header("stream", artifact_label(args.artifact, args.sd15), load_before), "size": [h, w],
              "strength": args.strength, "steps": pipe.tables.num_steps, "steps_per_frame": len(stream.steps),
              "guidance": "none", "frames": args.frames,
              "fps": {"frame_by_frame": sig(one), "stream": sig(batched)}, "ratio": sig(batched / one)}
    if args.save:
        save_run(result)
    emit(result)


if __name__ == "__main__":
    main()
