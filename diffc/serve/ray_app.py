"""Ray Serve: the multi-node option, over the same runtime and the same request batching as the Triton model.

A Ray cluster places the replicas of one deployment on its nodes; each replica loads the artifact once
(:func:`diffc.load`), and ``@serve.batch`` hands the requests that arrive together to one
:func:`diffc.serve.batching.execute` -- the code the Triton model runs -- so a row's image is the one
``pipe(prompt, seed=s)`` gives, whichever replica and batch it lands in, and a request diffc refuses gets
diffc's message while the rest of its batch gets images. Ray Serve's autoscaler adds replicas (up to
``max_replicas``) while each has more than ``target_ongoing_requests`` requests in flight, and removes them again.

Entry points (docs/serving.md)::

    serve run diffc.serve.ray_app:app_builder artifact=/abs/path/demo.diffc max_replicas=4

    from ray import serve
    from diffc.serve.ray_app import app
    handle = serve.run(app("/abs/path/demo.diffc", max_replicas=4), name="diffc")
    handle.generate.remote({"prompt": "a red fox", "seed": 42}).result()   # {"images": [uint8 (H, W, 3)], ...}

Over HTTP (Ray Serve's proxy), ``POST /`` with the same request as JSON answers ``{"images": [base64 PNG],
"batch_size": n}``, or status 400 / 500 with ``{"error": diffc's message, "code": ...}``.

The artifact must be at the same path on every node (a shared file system, or copied there first), as a Triton
repository must be where its server runs. This module needs the ``ray`` extra; ``import diffc.serve`` does not
import it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray
from PIL import Image
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

import diffc
from diffc.errors import DiffcError, InputError
from diffc.runtime.manifest import read_manifest
from diffc.serve.batching import execute
from diffc.serve.repository import INPUTS, is_gpu_artifact

log = logging.getLogger("diffc.serve")

#: the request keys, the same names as the Triton model's inputs
KEYS = tuple(name for name, _, _ in INPUTS)
_TEXT = frozenset({"prompt", "negative_prompt"})


def request_arrays(request: Any) -> dict[str, np.ndarray | None]:
    """One request (a dict: ``prompt`` a string, or a list of strings for several images; the other keys one value
    per image, in the same shape) -> the per-row columns :func:`diffc.serve.batching.parse_request` checks.

    Values stay Python objects (an object array), so a seed up to 2**64 - 1 is not squeezed through int64 and
    every range check is diffc's own."""
    if not isinstance(request, Mapping):
        raise InputError(f"a request is a JSON object / dict such as {{\"prompt\": \"a red fox\", \"seed\": 42}}, "
                         f"got {type(request).__name__}")
    unknown = sorted(str(k) for k in request if k not in KEYS)
    if unknown:
        raise InputError(f"unknown request key(s) {unknown}; the keys are {list(KEYS)}")
    if "prompt" not in request:
        raise InputError("the request has no 'prompt'; send {\"prompt\": \"...\"} (or a list of prompts)")
    many = isinstance(request["prompt"], list)
    rows = len(request["prompt"]) if many else 1
    out: dict[str, np.ndarray | None] = dict.fromkeys(KEYS)
    for key, value in request.items():
        if value is None and key != "prompt":
            continue
        if many != isinstance(value, list):
            raise InputError(f"{key!r} must be {'a list with one value per prompt' if many else 'one value'}, like "
                             "'prompt' (a list of prompts takes lists for the other keys, one prompt single values)")
        values = value if many else [value]
        if len(values) != rows:
            raise InputError(f"{key!r} has {len(values)} values for {rows} prompts; send one per prompt")
        for v in values:
            _check_type(key, v)
        column = np.empty((rows, 1), dtype=object)
        column[:, 0] = values
        out[key] = column
    return out


def _check_type(key: str, v: Any) -> None:
    if key in _TEXT:
        ok = isinstance(v, str)
    elif key == "guidance":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    else:
        ok = isinstance(v, int) and not isinstance(v, bool)
    if not ok:
        want = "text" if key in _TEXT else "a number" if key == "guidance" else "an integer"
        raise InputError(f"{key!r} must be {want}, got {v!r}")


def png_base64(image: np.ndarray) -> str:
    """A uint8 (H, W, 3) image as base64 PNG: lossless, so an HTTP client gets the exact pixels."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@serve.deployment
class DiffcDeployment:
    """One replica: the artifact loaded once, concurrent requests batched by ``@serve.batch``."""

    def __init__(self, artifact: str, threads: int = 0, max_batch: int | None = None, batch_wait_s: float = 0.01):
        self.pipe = diffc.load(artifact, threads=threads, progress=False)
        # @serve.batch's sizes are set per replica: the artifact's largest batch is known only once it is read
        self.max_batch = max_batch or self.pipe.image["batch"][2]
        self._run.set_max_batch_size(self.max_batch)
        self._run.set_batch_wait_timeout_s(batch_wait_s)
        log.info("replica loaded %s (max batch %d, %d threads)", artifact, self.max_batch, threads)

    @serve.batch
    async def _run(self, requests: list[dict[str, np.ndarray | None]]) -> list[Any]:
        # the pipeline runs in a thread: the replica's event loop keeps taking requests, which form the next batch
        results = await asyncio.to_thread(execute, self.pipe, requests)
        return [r if isinstance(r, DiffcError) else {"images": r, "batch_size": len(requests)} for r in results]

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """``{"images": [uint8 (H, W, 3), one per prompt], "batch_size": requests run together}``; a request diffc
        refuses raises its :class:`DiffcError` (through Ray, a subclass of both it and ``RayTaskError``)."""
        result = await self._run(request_arrays(request))
        if isinstance(result, DiffcError):
            raise result
        return result

    def info(self) -> dict[str, Any]:
        """Where this replica runs: its Ray node and replica id (what a multi-node test or an operator checks)."""
        return {"node_id": ray.get_runtime_context().get_node_id(),
                "replica": serve.get_replica_context().replica_id.unique_id,
                "max_batch_size": self.max_batch}

    async def __call__(self, http: Request) -> JSONResponse:
        try:
            body = await http.body()
            try:
                request = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"the request body is not JSON ({e}); send a JSON object such as "
                                 "{\"prompt\": \"a red fox\", \"seed\": 42}") from None
            result = await self.generate(request)
        except DiffcError as e:
            return JSONResponse({"error": str(e), "code": e.code}, status_code=400 if isinstance(e, InputError)
                                else 500)
        return JSONResponse({"images": [png_base64(img) for img in result["images"]],
                             "batch_size": result["batch_size"]})


def _int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise InputError(f"{name} must be an integer from {lo}{f' to {hi}' if hi is not None else ' up'}, "
                         f"got {value!r}")
    return value


def app(artifact: str | os.PathLike, *, min_replicas: int = 1, max_replicas: int = 1,
        initial_replicas: int | None = None, target_ongoing_requests: float = 2.0, num_cpus: float = 1.0,
        threads: int = 0, max_batch: int | None = None, batch_wait_s: float = 0.01) -> serve.Application:
    """The Ray Serve application serving ``artifact`` (pass it to ``serve.run``).

    ``min_replicas`` / ``max_replicas`` / ``initial_replicas`` / ``target_ongoing_requests``: Ray Serve's
    autoscaling (equal min and max: a fixed count). ``num_cpus``: CPUs each replica reserves, so the scheduler puts
    replicas where cores are free; ``threads``: each replica's ``diffc.load(threads=...)``, 0 meaning as many as it
    reserved. GPU artifacts (TensorRT, onnxruntime CUDA) reserve one GPU per replica. ``max_batch``: requests per
    batch, at most the artifact's largest batch (the default); ``batch_wait_s``: how long a batch waits to fill.
    """
    path = Path(artifact).absolute()
    manifest = read_manifest(path)
    lo_b, _, hi_b = manifest["image"]["batch"]
    if lo_b > 1:
        raise InputError(f"this artifact's batch range starts at {lo_b}, but a server gets single requests; rebuild "
                         "it with [shapes].batch starting at 1")
    max_replicas = _int("max_replicas", max_replicas, 1)
    min_replicas = _int("min_replicas", min_replicas, 0, max_replicas)
    if initial_replicas is not None:
        initial_replicas = _int("initial_replicas", initial_replicas, min_replicas, max_replicas)
    if max_batch is not None:
        max_batch = _int("max_batch", max_batch, 1, hi_b)
    threads = _int("threads", threads, 0)
    for name, value, zero_ok in (("target_ongoing_requests", target_ongoing_requests, False),
                                 ("num_cpus", num_cpus, False), ("batch_wait_s", batch_wait_s, True)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                value < 0 or (value == 0 and not zero_ok):
            raise InputError(f"{name} must be a finite number {'of 0 or more' if zero_ok else 'above 0'}, "
                             f"got {value!r}")
    autoscaling = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                   "target_ongoing_requests": float(target_ongoing_requests)}
    if initial_replicas is not None:
        autoscaling["initial_replicas"] = initial_replicas
    actor = {"num_cpus": float(num_cpus), "num_gpus": 1 if is_gpu_artifact(manifest) else 0}
    deployment = DiffcDeployment.options(autoscaling_config=autoscaling, ray_actor_options=actor,
                                         max_ongoing_requests=max(8, 4 * (max_batch or hi_b)))
    return deployment.bind(str(path), threads or max(1, math.floor(num_cpus)), max_batch, float(batch_wait_s))


#: how ``app_builder`` reads each ``serve run`` argument (they arrive as strings)
_ARGS = {"artifact": str, "min_replicas": int, "max_replicas": int, "initial_replicas": int,
         "target_ongoing_requests": float, "num_cpus": float, "threads": int, "max_batch": int, "batch_wait_s": float}


def app_builder(args: dict[str, str]) -> serve.Application:
    """``serve run diffc.serve.ray_app:app_builder artifact=PATH [max_replicas=4 ...]``: Ray Serve's application
    builder, the keywords of :func:`app` as ``key=value`` strings."""
    unknown = sorted(set(args) - set(_ARGS))
    if unknown:
        raise InputError(f"unknown argument(s) {unknown}; the arguments are {sorted(_ARGS)}")
    if "artifact" not in args:
        raise InputError("give the artifact: serve run diffc.serve.ray_app:app_builder artifact=/path/to/x.diffc")
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        try:
            kwargs[key] = _ARGS[key](value)
        except (TypeError, ValueError):
            raise InputError(f"{key}={value!r} is not {'an integer' if _ARGS[key] is int else 'a number'}") from None
    return app(kwargs.pop("artifact"), **kwargs)
