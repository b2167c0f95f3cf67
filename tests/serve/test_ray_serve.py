"""Ray Serve on a real local two-node Ray cluster (``ray.cluster_utils.Cluster``, every node on 127.0.0.1): no mocks.

One replica per node (each node has one CPU, each replica reserves one), concurrent requests through the
deployment handle and over HTTP, each image equal to ``pipe(...)`` for its seed, a ``@serve.batch`` batch of more
than one request, diffc's message for a bad request while the others of its batch get their images. Every wait is
bounded; the module shuts Serve, Ray and both nodes down and checks that none of their processes is left.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from diffc.errors import InputError

# Read by Ray when it is imported, so set before it is. Ray turns "127.0.0.1" in a cluster address into the
# machine's network address ("so that other machines can reach it"), where nothing listens when every node is bound
# to 127.0.0.1; this switch (Ray's own, for single-machine clusters on macOS and Windows) keeps it on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the network

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'diffc[ray]')")
serve = pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'diffc[ray]')")
from ray.cluster_utils import Cluster  # noqa: E402

from diffc.serve.ray_app import DiffcDeployment, app, app_builder, request_arrays  # noqa: E402
from diffc.serve.server import free_port  # noqa: E402

APP = "diffc"
TIMEOUT = 120.0  # seconds any one request may take (the demo takes well under one; replicas start in seconds)
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "object_store_memory": 80 * 1024 * 1024}


@pytest.fixture(scope="module")
def pipe(demo_cpu_artifact):
    import diffc

    return diffc.load(demo_cpu_artifact, progress=False)


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, one CPU each, on 127.0.0.1; Serve's HTTP proxy on the head only, on a free port."""
    c = Cluster(initialize_head=True, head_node_args=NODE)
    session = c.head_node.get_session_dir_path()
    try:
        c.add_node(**NODE)
        ray.init(address=c.address, logging_level="warning", log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        yield c, f"http://127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        c.shutdown()
    # every process of the cluster (GCS, raylets, agents, the replicas' workers) names its session folder
    deadline = time.monotonic() + 30
    while (left := subprocess.run(["pgrep", "-f", session], capture_output=True, text=True).stdout.split()) \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left running: {left}"


@pytest.fixture(scope="module")
def handle(cluster, demo_cpu_artifact):
    # two replicas from the start (one per node: each reserves the node's only CPU), up to two under load
    h = serve.run(app(demo_cpu_artifact, min_replicas=1, max_replicas=2, initial_replicas=2, batch_wait_s=0.05),
                  name=APP, route_prefix="/", blocking=False)
    _wait_running(2)
    return h


def _wait_running(replicas: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "RUNNING":
            states = status.deployments["DiffcDeployment"].replica_states
            if states.get("RUNNING", 0) >= replicas:
                return
        if status is not None and status.status == "DEPLOY_FAILED":
            pytest.fail(f"the deployment failed: {status.message}")
        time.sleep(0.5)
    pytest.fail(f"{replicas} replicas were not running after 180 s: {serve.status()}")


def _expected(pipe, prompt, seed, guidance=None) -> np.ndarray:
    from diffc.runtime.pipeline import to_uint8

    return to_uint8(pipe(prompt, seed=seed, guidance=guidance))[0]


def _close(img: np.ndarray, ref: np.ndarray) -> bool:
    # batched and single-row engine runs may round differently in the last float bit: at most one level
    return img.shape == ref.shape and int(np.abs(img.astype(int) - ref.astype(int)).max()) <= 1


def test_replicas_run_on_both_nodes(handle, cluster):
    c, _ = cluster
    nodes = {node.node_id for node in [c.head_node, *c.worker_nodes]}
    seen = set()
    for _ in range(60):  # requests go to either replica at random: 60 tries miss one with odds 2**-59
        seen.add(handle.info.remote().result(timeout_s=TIMEOUT)["node_id"])
        if len(seen) == 2:
            break
    assert seen == nodes


def test_concurrent_requests_match_the_pipeline_and_batch(handle, pipe):
    jobs = [(f"digit {k}", 200 + k, [7.5, 3.0, 1.0, 5.0][k % 4]) for k in range(8)]
    responses = [handle.generate.remote({"prompt": p, "seed": s, "guidance": g}) for p, s, g in jobs]
    results = [r.result(timeout_s=TIMEOUT) for r in responses]
    for (prompt, seed, g), result in zip(jobs, results, strict=True):
        (img,) = result["images"]
        assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
        assert _close(img, _expected(pipe, prompt, seed, g)), (prompt, seed, g)
    assert len({r["images"][0].tobytes() for r in results}) == len(results)
    assert max(r["batch_size"] for r in results) > 1, [r["batch_size"] for r in results]


def test_several_prompts_in_one_request(handle, pipe):
    result = handle.generate.remote({"prompt": ["digit 7", "digit 8"], "seed": [3, 2**64 - 1],
                                     "guidance": [7.5, 2.0]}).result(timeout_s=TIMEOUT)
    assert _close(result["images"][0], _expected(pipe, "digit 7", 3, 7.5))
    assert _close(result["images"][1], _expected(pipe, "digit 8", 2**64 - 1, 2.0))


def test_a_bad_request_gets_diffcs_error_and_the_others_their_images(handle, pipe):
    jobs = [{"prompt": "digit 3", "seed": 1}, {"prompt": " ", "seed": 2}, {"prompt": "digit 4", "seed": 3,
                                                                         "guidance": math.nan}]
    responses = [handle.generate.remote(j) for j in jobs]
    assert _close(responses[0].result(timeout_s=TIMEOUT)["images"][0], _expected(pipe, "digit 3", 1))
    with pytest.raises(InputError, match="prompt is empty"):
        responses[1].result(timeout_s=TIMEOUT)
    with pytest.raises(InputError, match="guidance must be a finite number"):
        responses[2].result(timeout_s=TIMEOUT)
    assert _close(handle.generate.remote({"prompt": "digit 5", "seed": 4}).result(timeout_s=TIMEOUT)["images"][0],
                  _expected(pipe, "digit 5", 4))


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_requests_through_the_proxy(handle, cluster, pipe):
    from PIL import Image

    _, url = cluster
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda s: _post(url, json.dumps({"prompt": "digit 9", "seed": s}).encode()),
                                range(4), timeout=4 * TIMEOUT))
    for seed, (status, body) in enumerate(answers):
        assert status == 200, body
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))))
        assert _close(img, _expected(pipe, "digit 9", seed))
    status, body = _post(url, json.dumps({"prompt": "digit 1", "height": 36}).encode())
    assert status == 400 and "height 36 is not a multiple of 8" in body["error"] and body["code"] == "input_error"
    status, body = _post(url, b"{not json")
    assert status == 400 and "not JSON" in body["error"]
    assert _post(url, json.dumps({"prompt": "digit 1"}).encode())[0] == 200  # and it goes on serving


# ------------------------------------------------------------------------------------------ no cluster needed


@pytest.mark.parametrize(("request_", "message"), [
    ("digit 1", "a request is a JSON object"),
    ({"seed": 1}, "has no 'prompt'"),
    ({"prompt": "a", "steps": 4}, r"unknown request key\(s\) \['steps'\]"),
    ({"prompt": "a", "seed": [1]}, "'seed' must be one value"),
    ({"prompt": ["a", "b"], "seed": 1}, "'seed' must be a list with one value per prompt"),
    ({"prompt": ["a", "b"], "seed": [1]}, "'seed' has 1 values for 2 prompts"),
    ({"prompt": "a", "seed": True}, "'seed' must be an integer"),
    ({"prompt": "a", "height": 32.0}, "'height' must be an integer"),
    ({"prompt": "a", "guidance": "7"}, "'guidance' must be a number"),
    ({"prompt": 5}, "'prompt' must be text"),
])
def test_malformed_requests_are_refused_before_any_engine_runs(request_, message):
    with pytest.raises(InputError, match=message):
        request_arrays(request_)


def test_app_options_are_checked(demo_cpu_artifact):
    with pytest.raises(InputError, match="min_replicas must be an integer from 0 to 1"):
        app(demo_cpu_artifact, min_replicas=2)
    with pytest.raises(InputError, match="max_batch must be an integer from 1 to 4"):
        app(demo_cpu_artifact, max_batch=5)
    with pytest.raises(InputError, match="num_cpus must be a finite number above 0"):
        app(demo_cpu_artifact, num_cpus=math.nan)
    with pytest.raises(InputError, match="unknown argument"):
        app_builder({"artifact": str(demo_cpu_artifact), "replicas": "2"})
    with pytest.raises(InputError, match="max_replicas='two' is not an integer"):
        app_builder({"artifact": str(demo_cpu_artifact), "max_replicas": "two"})
    built = app_builder({"artifact": str(demo_cpu_artifact), "max_replicas": "3", "num_cpus": "2"})
    deployment = built._bound_deployment  # what serve.run would deploy
    assert deployment.func_or_class is DiffcDeployment.func_or_class
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert deployment.ray_actor_options["num_cpus"] == 2.0
