"""Running TensorRT engines: the session against onnxruntime on the same graphs, CUDA graph replay, input checks,
the runtime cache, release order (``gpu`` marker: skipped with "needs a GPU" on machines without one; nothing
there is faked), and the parts of the session's logic that run on the CPU: which GPUs an engine accepts, host
dtypes of engine I/O, output buffer sizes, when these tests skip."""

from __future__ import annotations

import numpy as np
import pytest

from diffc.engines import _trt_runtime as R
from diffc.engines import tensorrt as T
from diffc.errors import ArtifactError, InputError

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
#: |trt - onnxruntime| bounds on the tiny pipeline (outputs are O(1)); fp16 keeps normalizations in fp32
ATOL = {"fp32": 2e-3, "fp16": 5e-2}


def skip_reason(flavour: str | None, gpu_cc: str) -> str | None:
    """Why the session tests cannot run on this machine's GPU, or None: no TensorRT, or a GPU TensorRT-RTX does
    not target (an H100 / H200 is SM90: TensorRT-RTX builds nothing for it, so its tests skip, not error)."""
    if flavour is None:
        return "TensorRT is not installed (pip install 'diffc[tensorrt]')"
    if flavour == "tensorrt_rtx" and gpu_cc not in R.rtx_targets():
        return f"TensorRT-RTX does not target {gpu_cc} (it targets {', '.join(R.rtx_targets())})"
    return None


@pytest.fixture(scope="module")
def built(gpu, tiny_onnx, tiny_ranges, tmp_path_factory):
    """Engines for this machine's GPU, in the flavour that is installed (both when both are)."""
    out = tmp_path_factory.mktemp("gpu-engines")
    flavour = T.available()
    reason = skip_reason(flavour, gpu)
    if reason:
        pytest.skip(reason)
    ccs = [gpu] if flavour == "tensorrt_rtx" else []
    engines = {}
    for precision in ("fp32", "fp16"):
        for comp in COMPONENTS:
            path = out / precision / comp / T.ENGINE_FILE
            rec = T.build_engine(tiny_onnx[comp], path, shape_ranges=tiny_ranges[comp], precision=precision,
                                 backend=flavour, compute_capabilities=ccs, opt_level=0, component=comp,
                                 cache_dir=out / "cache")
            engines[comp, precision] = (path, rec)
    return engines


def _feeds(comp, batch, size, rng):
    if comp == "text_encoder":
        ids = rng.integers(0, 49406, (batch, 77)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 49406, 49407
        return {"input_ids": ids}
    lat = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
    if comp == "vae_decoder":
        return {"latent_sample": lat}
    return {"sample": lat, "timestep": np.full((batch,), 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32)).astype(np.float32)}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("comp", COMPONENTS)
def test_matches_onnxruntime(built, tiny_onnx, comp, precision):
    from diffc.engines.onnxruntime import Session as OrtSession

    path, rec = built[comp, precision]
    sess = T.Session(path, record=T.manifest_entry(rec, comp))
    ref = OrtSession(tiny_onnx[comp])
    assert sess.input_names == ref.input_names and sorted(sess.output_names) == sorted(ref.output_names)
    rng = np.random.default_rng(0)
    for batch, size in ((2, 16), (1, 8), (2, 16)):  # the repeat replays the captured CUDA graph
        feeds = _feeds(comp, batch, size, rng)
        got, want = sess.run(feeds), ref.run(feeds)
        for name in ref.output_names:
            assert got[name].shape == want[name].shape
            assert got[name].dtype == np.float32
            np.testing.assert_allclose(got[name], want[name], atol=ATOL[precision], rtol=0)
    sess.close()


@pytest.mark.gpu
def test_replay_is_deterministic(built):
    path, rec = built["unet", "fp32"]
    sess = T.Session(path, record=rec, cuda_graph=True)
    feeds = _feeds("unet", 2, 16, np.random.default_rng(1))
    first = sess.run(feeds)["out_sample"]
    for _ in range(3):
        np.testing.assert_array_equal(sess.run(feeds)["out_sample"], first)
    sess.close()


@pytest.mark.gpu
def test_inputs_are_checked(built):
    path, rec = built["vae_decoder", "fp32"]
    sess = T.Session(path, record=rec)
    with pytest.raises(InputError, match="missing inputs"):
        sess.run({})
    with pytest.raises(InputError, match="outside the engine's profile"):
        sess.run({"latent_sample": np.zeros((1, 4, 64, 64), np.float32)})  # max is 32x32 latents
    sess.close()


@pytest.mark.gpu
def test_compatible_with_this_gpu(built, gpu):
    _, rec = built["unet", "fp16"]
    T.check_engine_compatible(rec)  # this machine, this GPU: no error


@pytest.mark.gpu
def test_rtx_runtime_cache_is_kept(built, tmp_path):
    path, rec = built["vae_decoder", "fp16"]
    if rec["backend"] != "tensorrt_rtx":
        pytest.skip("the runtime cache is a TensorRT-RTX feature")
    cache = tmp_path / "rt.cache"
    sess = T.Session(path, record=rec, runtime_cache=cache)
    sess.run(_feeds("vae_decoder", 1, 16, np.random.default_rng(2)))
    sess.close()
    assert cache.is_file() and cache.stat().st_size > 0
    again = T.Session(path, record=rec, runtime_cache=cache)  # loads the JIT kernels compiled above
    again.run(_feeds("vae_decoder", 1, 16, np.random.default_rng(2)))
    again.close()


class _Proxy:
    """A real TensorRT context / CUDA stream with one method replaced, to drive the session's error paths on the
    GPU (everything else goes to the real object)."""

    def __init__(self, real, **replace):
        self._real, self._replace = real, replace

    def __getattr__(self, name):
        return self._replace.get(name) or getattr(self._real, name)


def _fresh(built, comp="unet", precision="fp32", **kw):
    path, rec = built[comp, precision]
    return T.Session(path, record=rec, **kw)


@pytest.mark.gpu
def test_capture_that_returns_false_stores_no_graph(built):
    """Issue 35 item 1: a False from execute_async_v3 under capture must not store an empty graph."""
    sess = _fresh(built, cuda_graph=True)
    if not sess._graphs_enabled:
        pytest.skip("TensorRT-RTX captures CUDA graphs itself; the session's own capture is datacenter TensorRT's")
    real = sess.context
    calls = []

    def failing_enqueue(stream):
        calls.append(stream)
        return False if sess._stream.handle is not None and len(calls) == 2 else real.execute_async_v3(stream)

    sess.context = _Proxy(real, execute_async_v3=failing_enqueue)
    feeds = _feeds("unet", 2, 16, np.random.default_rng(3))
    first = sess.run(feeds)["out_sample"]  # eager run (call 1), then the capture (call 2) returns False
    assert sess._graphs == {} and not sess._graphs_enabled
    sess.context = real
    np.testing.assert_array_equal(sess.run(feeds)["out_sample"], first)
    sess.close()


@pytest.mark.gpu
def test_graph_replays_only_at_the_previous_calls_shapes(built, tiny_onnx):
    """Issue 35 item 2: A, A (replay), B (eager), A (eager: the context last ran B), A (replay)."""
    from diffc.engines.onnxruntime import Session as OrtSession

    sess, ref = _fresh(built, cuda_graph=True), OrtSession(tiny_onnx["unet"])
    rng = np.random.default_rng(4)
    a, b = _feeds("unet", 2, 16, rng), _feeds("unet", 1, 8, rng)
    for feeds in (a, a, b, a, a):
        np.testing.assert_allclose(sess.run(feeds)["out_sample"], ref.run(feeds)["out_sample"], atol=ATOL["fp32"],
                                   rtol=0)
        assert sess._last_key == tuple(feeds[n].shape for n in sess.input_names)
    sess.close()


@pytest.mark.gpu
def test_close_synchronizes_then_releases_in_order(built):
    """Issue 35 items 5 and 7: the runtime config lives as long as the context; close() waits for the stream
    before freeing, then drops context, config and cache; a second close() does nothing."""
    sess = _fresh(built, "vae_decoder", "fp16")
    if sess.flavour == "tensorrt_rtx":
        assert sess._rtx_config is not None
    order = []
    stream = sess._stream
    sess._stream = _Proxy(stream, synchronize=lambda: (order.append("synchronize"), stream.synchronize())[1],
                          destroy=lambda: (order.append("destroy"), stream.destroy())[1])
    for buf in sess._buffers.values():
        real_free = buf.free
        buf.free = lambda real_free=real_free: (order.append("free"), real_free())[1]
    sess.run(_feeds("vae_decoder", 1, 16, np.random.default_rng(5)))
    order.clear()
    sess.close()
    assert order[0] == "synchronize" and order[-1] == "destroy" and "free" in order
    assert sess.context is None and sess._rtx_config is None and sess._rtx_cache is None
    sess.close()


@pytest.mark.gpu
def test_non_cuda_error_during_capture_leaves_no_capture(built):
    """Issue 35 item 10: an exception that is not a CudaError while capturing propagates, and the capture is
    ended and its graph destroyed: the stream works afterwards."""
    sess = _fresh(built, cuda_graph=True)
    if not sess._graphs_enabled:
        pytest.skip("TensorRT-RTX captures CUDA graphs itself; the session's own capture is datacenter TensorRT's")
    real = sess.context
    calls = []

    def raising_enqueue(stream):
        calls.append(stream)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real.execute_async_v3(stream)

    sess.context = _Proxy(real, execute_async_v3=raising_enqueue)
    feeds = _feeds("unet", 2, 16, np.random.default_rng(6))
    with pytest.raises(RuntimeError, match="interrupted"):
        sess.run(feeds)
    sess.context = real
    assert sess._graphs == {}
    out = sess.run(feeds)["out_sample"]  # a stream left capturing would fail here
    assert np.isfinite(out).all()
    sess.close()


@pytest.mark.gpu
def test_rtx_runtime_cache_saved_by_pipeline_close(built, tmp_path):
    """Issue 35 item 8: save_runtime_cache() writes without waiting for garbage collection."""
    path, rec = built["vae_decoder", "fp16"]
    if rec["backend"] != "tensorrt_rtx":
        pytest.skip("the runtime cache is a TensorRT-RTX feature")
    cache = tmp_path / "rt.cache"
    sess = T.Session(path, record=rec, runtime_cache=cache)
    sess.run(_feeds("vae_decoder", 1, 16, np.random.default_rng(7)))
    assert sess.save_runtime_cache() and cache.stat().st_size > 0
    sess.close()


# ------------------------------------------------------------------------------------------------ CPU-side logic


def _rtx_record(ccs=()):
    return {"backend": "tensorrt_rtx", "backend_version": "1.7.1.116",
            "backend_options": {"compute_capabilities": list(ccs), "hardware_compat": "none"}}


def test_rtx_targets_are_the_installed_enum(rtx):
    members = [m for m in rtx.ComputeCapability.__members__ if m.startswith("SM")]
    assert set(R.rtx_targets()) == set(members)
    assert "SM90" not in R.rtx_targets() and "SM100" not in R.rtx_targets()


@pytest.mark.parametrize("cc", ["SM80", "SM86", "SM89", "SM120"])
def test_default_rtx_engine_runs_on_its_documented_targets(cc):
    """Issue 35 item 3: an engine built without listed capabilities runs on the enum's targets from Ampere on."""
    R.check_engine_compatible(_rtx_record(), installed_version="1.7.1.116", device_cc=cc)


@pytest.mark.parametrize("cc", ["SM75", "SM87", "SM90", "SM100"])
def test_default_rtx_engine_refused_on_other_gpus(cc):
    """Issue 35 item 3: not every SM >= 80: Orin (SM87), H100 / H200 (SM90), B200 (SM100) are no targets."""
    with pytest.raises(ArtifactError, match=f"this GPU is {cc}"):
        R.check_engine_compatible(_rtx_record(), installed_version="1.7.1.116", device_cc=cc)


def test_untargeted_gpu_is_told_to_use_the_cuda_profile():
    with pytest.raises(ArtifactError, match="does not target SM90.*cuda-fp16"):
        R.check_engine_compatible(_rtx_record(["SM89"]), installed_version="1.7.1.116", device_cc="SM90")


def test_default_rtx_build_is_refused_on_sm90(rtx, make_graph, tmp_path):
    """Issue 35 item 3 (tensorrt.py): an engine built here without listed capabilities records no datacenter
    compatibility level, and its record is refused on an H100 (SM90) but accepted on an RTX 4090 (SM89)."""
    ranges = {"batch": [1, 1, 2], "height": [8, 8, 16], "width": [8, 8, 16]}
    rec = T.build_engine(make_graph("conv"), tmp_path / T.ENGINE_FILE, shape_ranges=ranges, precision="fp32",
                         backend="tensorrt_rtx", compute_capabilities=[], opt_level=0, cache_dir=tmp_path / "cache")
    assert rec["backend_options"]["hardware_compat"] == "none" and rec["backend_options"]["compute_capabilities"] == []
    R.check_engine_compatible(rec, device_cc="SM89")
    with pytest.raises(ArtifactError, match="SM90"):
        R.check_engine_compatible(rec, device_cc="SM90")


@pytest.mark.parametrize("kind, dtype", [("FLOAT", "float32"), ("HALF", "float16"), ("BF16", "bfloat16"),
                                         ("FP8", "float8_e4m3fn"), ("INT64", "int64")])
def test_io_dtype_has_a_host_form_for_bf16_and_fp8(rtx, kind, dtype):
    """Issue 35 item 6: trt.nptype raises TypeError for BF16 / FP8; the session falls back to ml_dtypes."""
    assert R.io_dtype(rtx, getattr(rtx.DataType, kind), "x").name == dtype


@pytest.mark.parametrize("kind", ["INT4", "FP4"])
def test_io_dtype_refuses_sub_byte_io_with_a_typed_error(rtx, kind):
    if not hasattr(rtx.DataType, kind):
        pytest.skip(f"this TensorRT has no {kind}")
    with pytest.raises(ArtifactError, match=f"type {kind}.*rebuild"):
        R.io_dtype(rtx, getattr(rtx.DataType, kind), "latent")


def test_output_buffer_size():
    """Issue 35 item 9: -1 from get_max_output_size is an error, not a 1-byte buffer."""
    assert R.output_buffer_bytes("y", (2, 4, 8, 8), None, 4) == 2 * 4 * 8 * 8 * 4
    assert R.output_buffer_bytes("y", (-1, 4), 4096, 2) == 4096
    with pytest.raises(ArtifactError, match="no upper bound"):
        R.output_buffer_bytes("y", (-1, 4), -1, 4)


@pytest.mark.parametrize("flavour, cc, skips", [("tensorrt_rtx", "SM90", "does not target SM90"),
                                                ("tensorrt_rtx", "SM100", "does not target SM100"),
                                                ("tensorrt_rtx", "SM89", None), ("tensorrt", "SM90", None),
                                                (None, "SM89", "not installed")])
def test_session_tests_skip_on_gpus_tensorrt_rtx_does_not_target(flavour, cc, skips):
    """Issue 35 item 4: on an H100 / H200 the session tests skip with the reason instead of erroring."""
    reason = skip_reason(flavour, cc)
    assert (reason is None) if skips is None else (skips in reason)
