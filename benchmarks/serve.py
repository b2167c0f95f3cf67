"""Serving on Triton Inference Server against calling the same artifact in-process.

A real ``tritonserver`` (the ``serve`` extra's, or one on PATH) serves a repository written by
``diffc.serve.write_repository`` on 127.0.0.1; client threads send one-image requests over HTTP, each with its
own seed, as fast as the answers come back. Reported, for 1 and 2 model instances and 1, 2, 4 and 8 concurrent
clients:

* ``images_per_s``, ``p50_s`` / ``p99_s``: throughput and per-request latency seen by the clients;
* ``mean_batch``: requests per model execution (Triton's ``batch_stats``): what dynamic batching formed;
* ``in_process``: the same artifact called in this process, one image per call, one after another;
* ``ratios``: ``over_in_process`` (server images/s / in-process images/s; goal >= 0.9 at one client) and
  ``over_one_client`` (images/s at N clients / at 1; dynamic batching should lift it above 1 at N >= 4).

Every level sends at most ``--requests`` requests and stops early after ``--seconds``.

    python benchmarks/serve.py                   # the demo artifact (built in a temporary folder), quick
    python benchmarks/serve.py --sd15            # SD-1.5 architecture (random weights) at 256 px: minutes
    python benchmarks/serve.py --artifact DIR    # any artifact
    python benchmarks/serve.py --save            # also write benchmarks/results/serve_demo_<date>.json

Progress goes to the log (stderr); stdout is one JSON object. ``--save`` writes it into benchmarks/results/ too,
where benchmarks/report.py renders it into docs/benchmarks.md (cite the file there). The machine's load average
before and after is in the JSON: on a shared machine the server and the in-process baseline compete with
whatever else runs, so read the ratios with it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import artifact_label, emit, log_to_stderr, run_header, save_run, sig  # noqa: E402

log = logging.getLogger("diffc.bench.serve")
PROMPT = "a photograph of an astronaut riding a horse"

SD15_PROFILE = """
name = "cpu-256"
description = "cpu profile at 256 px (benchmarks/serve.py)"
backend = "onnxruntime"
[precision]
default = "fp32"
[shapes]
height = [256, 256, 256]
width = [256, 256, 256]
batch = [1, 1, 4]
[sampler]
kind = "auto"
steps = 4
guidance = 7.5
"""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def in_process(artifact: Path, requests: int, seconds: float) -> dict[str, Any]:
    import diffc

    pipe = diffc.load(artifact, progress=False)
    pipe(PROMPT, seed=0)  # warm-up
    lat = []
    start = time.perf_counter()
    for k in range(requests):
        t0 = time.perf_counter()
        pipe(PROMPT, seed=k + 1)
        lat.append(time.perf_counter() - t0)
        if time.perf_counter() - start > seconds:
            break
    wall = time.perf_counter() - start
    return {"requests": len(lat), "images_per_s": sig(len(lat) / wall), "p50_s": sig(percentile(lat, 50)),
            "p99_s": sig(percentile(lat, 99))}


def _request(http, seed: int):
    prompt = http.InferInput("prompt", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[PROMPT.encode()]], dtype=object))
    s = http.InferInput("seed", [1, 1], "INT64")
    s.set_data_from_numpy(np.array([[seed]], np.int64))
    return [prompt, s]


def _batch_counts(http, url: str, model: str) -> dict[int, int]:
    client = http.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model)["model_stats"][0]["batch_stats"]
    finally:
        client.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats}


def server_level(http, url: str, model: str, clients: int, requests: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads share ``requests`` requests, each waiting for its answer before sending the next."""
    lat: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.perf_counter() + seconds
    errors: list[BaseException] = []

    def client_loop():
        client = http.InferenceServerClient(url, network_timeout=600.0, connection_timeout=600.0)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                t0 = time.perf_counter()
                client.infer(model, _request(http, 1000 + k)).as_numpy("image")
                with lock:
                    lat.append(time.perf_counter() - t0)
        except BaseException as e:  # a failed request fails the level
            errors.append(e)
        finally:
            client.close()

    before = _batch_counts(http, url, model)
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"a request failed at {clients} clients: {errors[0]}")
    after = _batch_counts(http, url, model)
    executions = {b: after.get(b, 0) - before.get(b, 0) for b in after}
    n_exec = sum(executions.values())
    return {"clients": clients, "requests": len(lat), "images_per_s": sig(len(lat) / wall),
            "p50_s": sig(percentile(lat, 50)), "p99_s": sig(percentile(lat, 99)),
            "mean_batch": sig(sum(b * n for b, n in executions.items()) / n_exec) if n_exec else None,
            "batches": {str(b): n for b, n in sorted(executions.items()) if n}}


def instance_threads(instances: int) -> int:
    """Each instance's ``diffc.load(threads=...)``: the profile's own for one instance (as in-process), else the
    cores shared out, so that instances do not oversubscribe them."""
    return 0 if instances == 1 else max(1, (os.cpu_count() or 1) // instances)


def serve_levels(artifact: Path, work: Path, instances: int, concurrency: list[int], requests: int,
                 seconds: float) -> list[dict[str, Any]]:
    import tritonclient.http as http

    from diffc.serve import TritonServer, write_repository

    threads = instance_threads(instances)
    repo = write_repository(artifact, work / f"repo-{instances}", name="bench", instances=instances, threads=threads,
                            link=True)
    with TritonServer(repo, timeout=600) as server:
        client = http.InferenceServerClient(server.url, network_timeout=600.0)
        try:
            for k in range(instances):  # one warm-up per instance
                client.infer("bench", _request(http, k))
        finally:
            client.close()
        out = []
        for c in concurrency:
            level = server_level(http, server.url, "bench", c, max(requests, c), seconds)
            log.info("%d instance(s), %d client(s): %s", instances, c, level)
            out.append(level)
        return out


def build_artifact(work: Path, sd15: bool) -> Path:
    import diffc

    if not sd15:
        diffc.build("demo", "cpu", work / "demo.diffc", progress=False)
        return work / "demo.diffc"
    from end_to_end import write_sd15_pipeline

    profile = work / "cpu-256.toml"
    profile.write_text(SD15_PROFILE)
    diffc.build(write_sd15_pipeline(work / "sd15"), str(profile), work / "sd15-256.diffc", progress=False)
    return work / "sd15-256.diffc"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, help="An artifact to serve (default: build the demo, or --sd15).")
    ap.add_argument("--sd15", action="store_true", help="SD-1.5 architecture at 256 px (random weights; minutes).")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--instances", default="1,2")
    ap.add_argument("--requests", type=int, default=32, help="Requests per level (at most).")
    ap.add_argument("--seconds", type=float, default=30.0, help="Stop a level after this long.")
    ap.add_argument("--save", action="store_true",
                    help="Also write the JSON to benchmarks/results/serve_<artifact>_<date>.json.")
    args = ap.parse_args()
    log_to_stderr("diffc.runtime", "diffc.build", "diffc.exporter", "diffc.passes", "diffc.engines")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    instances = [int(k) for k in args.instances.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="diffc-bench-serve-") as tmp:
        work = Path(tmp)
        artifact = args.artifact or build_artifact(work, args.sd15)
        baseline = in_process(artifact, args.requests, args.seconds)
        log.info("in-process: %s", baseline)
        served = {str(k): serve_levels(artifact, work, k, concurrency, args.requests, args.seconds)
                  for k in instances}
    ratios = {k: {"over_in_process": {str(lv["clients"]): sig(lv["images_per_s"] / baseline["images_per_s"])
                                      for lv in levels},
                  "over_one_client": {str(lv["clients"]): sig(lv["images_per_s"] / levels[0]["images_per_s"])
                                      for lv in levels}}
              for k, levels in served.items()}
    result = {**run_header("serve", artifact_label(args.artifact, args.sd15), load_before),
              "requests_per_level": args.requests, "seconds_per_level": args.seconds,
              "threads_per_instance": {str(k): instance_threads(k) for k in instances}, "in_process": baseline,
              "triton": served, "ratios": ratios}
    if args.save:
        save_run(result)
    emit(result)


if __name__ == "__main__":
    main()
