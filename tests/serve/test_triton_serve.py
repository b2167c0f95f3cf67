"""A real Triton server on the demo artifact: no mocks.

The server is the ``tritonserver`` of the ``serve`` extra (or one on PATH), started once per module on
127.0.0.1 with free ports; every request loop is bounded, and the module checks that stopping it leaves no
process behind. Where the binary cannot run here, the tests skip with the reason.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from diffc.errors import BackendUnavailableError, InputError, OutputExistsError
from diffc.serve import TritonServer, write_repository
from diffc.serve.repository import ARTIFACT_DIR

http = pytest.importorskip("tritonclient.http", reason="the serve extra (tritonclient) is not installed")
grpc = pytest.importorskip("tritonclient.grpc", reason="the serve extra (tritonclient[grpc]) is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "demo"
TIMEOUT = 60.0  # seconds any one request may take (the demo takes well under one)


# ------------------------------------------------------------------------------------------ the repository


def test_repository_layout_copies_the_artifact(demo_cpu_artifact, tmp_path):
    repo = write_repository(demo_cpu_artifact, tmp_path / "repo", name=MODEL, instances=2)
    config = (repo / MODEL / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 4" in config  # the demo's batch range is [1, 4]
    assert "dynamic_batching" in config and "count: 2" in config and "kind: KIND_CPU" in config
    for name in ("prompt", "negative_prompt", "seed", "guidance", "height", "width", "image"):
        assert f'name: "{name}"' in config
    assert "class TritonPythonModel" in (repo / MODEL / "1" / "model.py").read_text()
    copied = repo / MODEL / "1" / ARTIFACT_DIR
    assert not copied.is_symlink()
    assert sorted(p.relative_to(copied) for p in copied.rglob("*")) == \
        sorted(p.relative_to(demo_cpu_artifact) for p in demo_cpu_artifact.rglob("*"))
    linked = write_repository(demo_cpu_artifact, tmp_path / "linked", link=True)
    assert (linked / "diffc" / "1" / ARTIFACT_DIR).resolve() == demo_cpu_artifact.resolve()


def test_repository_refuses_bad_options(demo_cpu_artifact, tmp_path):
    with pytest.raises(InputError, match=r"max batch must be from 1 to 4"):
        write_repository(demo_cpu_artifact, tmp_path / "r", max_batch=5)
    with pytest.raises(InputError, match="not a valid Triton model name"):
        write_repository(demo_cpu_artifact, tmp_path / "r", name="a/b")
    with pytest.raises(InputError, match="instances must be"):
        write_repository(demo_cpu_artifact, tmp_path / "r", instances=0)
    assert not (tmp_path / "r").exists()
    write_repository(demo_cpu_artifact, tmp_path / "r", link=True)
    with pytest.raises(OutputExistsError):
        write_repository(demo_cpu_artifact, tmp_path / "r", link=True)
    write_repository(demo_cpu_artifact, tmp_path / "r", max_batch=2, link=True, force=True)
    assert "max_batch_size: 2" in (tmp_path / "r" / "diffc" / "config.pbtxt").read_text()


# ------------------------------------------------------------------------------------------ the server


def _start(repo: Path) -> TritonServer:
    try:
        return TritonServer(repo, timeout=120).start()
    except BackendUnavailableError as e:
        pytest.skip(f"Triton cannot run here: {e}")


@pytest.fixture(scope="module")
def pipe(demo_cpu_artifact):
    import diffc

    return diffc.load(demo_cpu_artifact, progress=False)


@pytest.fixture(scope="module")
def server(demo_cpu_artifact, tmp_path_factory):
    # a 20 ms queue delay: the concurrent requests below batch even where each image takes no time at all
    repo = write_repository(demo_cpu_artifact, tmp_path_factory.mktemp("triton") / "repo", name=MODEL, link=True,
                            queue_delay_us=20_000)
    s = _start(repo)
    try:
        yield s
    finally:
        pgid, workspace = s.process.pid if s.process else None, s.workspace
        assert s.stop() == 0  # a clean exit on SIGTERM, not the SIGKILL fallback
        _assert_gone(pgid, workspace)


def _assert_gone(pgid: int | None, workspace: Path | None) -> None:
    """Nothing of the server is left: no process in its group (the Python backend stubs), no workspace."""
    if pgid is not None:
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
    assert workspace is None or not workspace.exists()


def _inputs(module, prompt, *, seed=None, guidance=None, height=None, width=None, negative=None, rows=1):
    def tensor(name, value, dtype, triton):
        arr = np.array([[value]] * rows, dtype=dtype)
        t = module.InferInput(name, list(arr.shape), triton)
        t.set_data_from_numpy(arr)
        return t

    out = [tensor("prompt", prompt.encode(), object, "BYTES")]
    if negative is not None:
        out.append(tensor("negative_prompt", negative.encode(), object, "BYTES"))
    if seed is not None:
        out.append(tensor("seed", seed, np.int64, "INT64"))
    if guidance is not None:
        out.append(tensor("guidance", guidance, np.float32, "FP32"))
    if height is not None:
        out.append(tensor("height", height, np.int32, "INT32"))
    if width is not None:
        out.append(tensor("width", width, np.int32, "INT32"))
    return out


def _expected(pipe, prompt, seed, guidance, **kw) -> np.ndarray:
    from diffc.runtime.pipeline import to_uint8

    return to_uint8(pipe(prompt, seed=seed, guidance=guidance, **kw))[0]


def test_concurrent_requests_over_http_and_grpc_match_the_pipeline(server, pipe):
    """Eight requests at once, each with its own seed and guidance, half over HTTP and half over gRPC: each image is
    the one ``pipe(...)`` gives for that seed, and the server formed a batch of more than one request."""
    jobs = [(f"digit {k}", 100 + k, [7.5, 3.0, 1.0, 5.0][k % 4], "grpc" if k % 2 else "http") for k in range(8)]

    def send(job):
        prompt, seed, g, proto = job
        module = grpc if proto == "grpc" else http
        client = module.InferenceServerClient(server.grpc_url if proto == "grpc" else server.url)
        try:
            kw = {"client_timeout": TIMEOUT} if proto == "grpc" else {}
            return client.infer(MODEL, _inputs(module, prompt, seed=seed, guidance=g), **kw).as_numpy("image")
        finally:
            client.close()

    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(send, jobs, timeout=4 * TIMEOUT))
    for (prompt, seed, g, _), img in zip(jobs, images, strict=True):
        assert img.shape == (1, 32, 32, 3) and img.dtype == np.uint8
        expected = _expected(pipe, prompt, seed, g)
        # batched and single-row engine runs may round differently in the last float bit: at most one level
        assert np.abs(img[0].astype(int) - expected.astype(int)).max() <= 1, (prompt, seed, g)
    assert len({img.tobytes() for img in images}) == len(images)  # different seeds, different images

    client = http.InferenceServerClient(server.url)
    try:
        stats = client.get_inference_statistics(MODEL)["model_stats"][0]
    finally:
        client.close()
    sizes = [b["batch_size"] for b in stats["batch_stats"]]
    assert max(sizes) > 1, f"no dynamic batch formed: {stats['batch_stats']}"


def test_a_request_with_several_rows_gets_one_image_per_row(server, pipe):
    client = http.InferenceServerClient(server.url)
    try:
        seeds = np.array([[3], [4], [5]], np.int64)
        inputs = _inputs(http, "digit 7", rows=3)
        seed = http.InferInput("seed", [3, 1], "INT64")
        seed.set_data_from_numpy(seeds)
        images = client.infer(MODEL, [*inputs, seed]).as_numpy("image")
    finally:
        client.close()
    assert images.shape == (3, 32, 32, 3)
    for s, img in zip(seeds[:, 0], images, strict=True):
        assert np.abs(img.astype(int) - _expected(pipe, "digit 7", int(s), None).astype(int)).max() <= 1


@pytest.mark.parametrize(("kwargs", "rows", "message"), [
    ({"prompt": ""}, 1, "prompt is empty"),
    ({"prompt": "digit 1", "height": 36}, 1, "height 36 is not a multiple of 8"),
    ({"prompt": "digit 1", "height": 128}, 1, r"height 128 is outside this artifact's range \[16, 64\]"),
    ({"prompt": "digit 1", "guidance": math.nan}, 1, "guidance must be a finite number"),
    ({"prompt": "digit 1", "seed": -1}, 1, "seed must be an integer from 0"),
    # Triton refuses a request above max_batch_size (the artifact's largest batch) before the model sees it
    ({"prompt": "digit 1"}, 5, "batch-size must be <= 4"),
])
def test_bad_requests_get_an_error_and_the_server_keeps_serving(server, pipe, kwargs, rows, message):
    for module, url in ((http, server.url), (grpc, server.grpc_url)):
        client = module.InferenceServerClient(url)
        try:
            prompt = kwargs.pop("prompt") if "prompt" in kwargs else None
            with pytest.raises(InferenceServerException, match=message):
                client.infer(MODEL, _inputs(module, prompt, rows=rows, **kwargs))
            kwargs["prompt"] = prompt
            img = client.infer(MODEL, _inputs(module, "digit 2", seed=9)).as_numpy("image")
        finally:
            client.close()
        assert np.abs(img[0].astype(int) - _expected(pipe, "digit 2", 9, None).astype(int)).max() <= 1


def test_a_bad_request_in_a_batch_leaves_the_others_their_images(server, pipe):
    """Bad and good requests sent together (batched by Triton): each good one gets its image."""
    jobs = [("digit 3", 1, 7.5), ("", 2, 7.5), ("digit 4", 3, math.nan), ("digit 5", 4, 2.0)]

    def send(job):
        client = http.InferenceServerClient(server.url)
        try:
            return client.infer(MODEL, _inputs(http, job[0], seed=job[1], guidance=job[2])).as_numpy("image")
        except InferenceServerException as e:
            return e
        finally:
            client.close()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, jobs, timeout=4 * TIMEOUT))
    assert "prompt is empty" in str(results[1]) and "guidance must be" in str(results[2])
    for k in (0, 3):
        prompt, seed, g = jobs[k]
        assert np.abs(results[k][0].astype(int) - _expected(pipe, prompt, seed, g).astype(int)).max() <= 1


def test_a_model_that_cannot_load_stops_the_server_with_diffcs_message(demo_cpu_artifact, tmp_path):
    from diffc.serve import ServerError

    repo = write_repository(demo_cpu_artifact, tmp_path / "repo", name=MODEL, link=True)
    artifact = repo / MODEL / "1" / ARTIFACT_DIR
    artifact.unlink()
    artifact.mkdir()  # an empty folder where the artifact should be
    server = TritonServer(repo, timeout=120)
    try:
        with pytest.raises(ServerError, match="manifest"):
            server.start()
    except BackendUnavailableError as e:
        pytest.skip(f"Triton cannot run here: {e}")
    assert server.process is None and server.workspace is None  # start() cleaned up after itself


# ------------------------------------------------------------------------------------------ diffc serve


def test_diffc_serve_prints_its_url_and_stops_on_sigterm(demo_cpu_artifact, pipe, tmp_path):
    from diffc.serve.server import find_tritonserver, free_port

    try:
        find_tritonserver()
    except BackendUnavailableError as e:
        pytest.skip(str(e))
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", "from diffc.cli import main; main()", "serve",
                             str(demo_cpu_artifact), "--port", str(port), "--grpc-port", str(grpc_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # the command prints its URL once the server is ready
        if not line:
            err = proc.stderr.read()
            if "numpy" in err and "nvidia-pytriton" in err:
                pytest.skip(err.strip().splitlines()[-1])
            pytest.fail(f"diffc serve printed nothing: {err[-3000:]}")
        assert re.search(rf"http://127\.0\.0\.1:{port}\b", line), line
        client = http.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            img = client.infer("diffc", _inputs(http, "digit 8", seed=11)).as_numpy("image")
        finally:
            client.close()
        assert np.abs(img[0].astype(int) - _expected(pipe, "digit 8", 11, None).astype(int)).max() <= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the server, its stubs and both temporary folders (repository, server workspace) are gone
    assert not list(tmp_path.glob("diffc-*"))
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes left running: {leftover}"


def test_serve_benchmark_runs_on_the_demo(server, demo_cpu_artifact):
    """benchmarks/serve.py end to end, briefly (two levels, four requests each): its JSON has every number the
    docs quote. ``server`` only makes this skip where Triton cannot run."""
    import json

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"
    out = subprocess.run([sys.executable, str(script), "--artifact", str(demo_cpu_artifact), "--requests", "4",
                          "--concurrency", "1,2", "--instances", "1", "--seconds", "30"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    levels = result["triton"]["1"]
    assert [lv["clients"] for lv in levels] == [1, 2] and all(lv["requests"] == 4 for lv in levels)
    assert result["in_process"]["images_per_s"] > 0
    assert set(result["ratios"]["1"]) == {"over_in_process", "over_one_client"}
    assert levels[0]["mean_batch"] == 1.0  # one client never has a second request waiting
