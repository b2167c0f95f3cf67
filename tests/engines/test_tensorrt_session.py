"""Running TensorRT engines (GPU only): the session against onnxruntime on the same graphs, CUDA graph replay,
input checks, the runtime cache. Skipped with "needs a GPU" on machines without one; nothing here is faked."""

from __future__ import annotations

import numpy as np
import pytest

from diffc.engines import tensorrt as T
from diffc.errors import InputError

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
#: |trt - onnxruntime| bounds on the tiny pipeline (outputs are O(1)); fp16 keeps normalizations in fp32
ATOL = {"fp32": 2e-3, "fp16": 5e-2}


@pytest.fixture(scope="module")
def built(gpu, tiny_onnx, tiny_ranges, tmp_path_factory):
    """Engines for this machine's GPU, in the flavour that is installed (both when both are)."""
    out = tmp_path_factory.mktemp("gpu-engines")
    flavour = T.available()
    if flavour is None:
        pytest.skip("TensorRT is not installed (pip install 'diffc[tensorrt]')")
    rtx = T._import("tensorrt_rtx") if flavour == "tensorrt_rtx" else None
    ccs = [gpu] if rtx is not None and hasattr(rtx.ComputeCapability, gpu) else []
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


def test_replay_is_deterministic(built):
    path, rec = built["unet", "fp32"]
    sess = T.Session(path, record=rec, cuda_graph=True)
    feeds = _feeds("unet", 2, 16, np.random.default_rng(1))
    first = sess.run(feeds)["out_sample"]
    for _ in range(3):
        np.testing.assert_array_equal(sess.run(feeds)["out_sample"], first)
    sess.close()


def test_inputs_are_checked(built):
    path, rec = built["vae_decoder", "fp32"]
    sess = T.Session(path, record=rec)
    with pytest.raises(InputError, match="missing inputs"):
        sess.run({})
    with pytest.raises(InputError, match="outside the engine's profile"):
        sess.run({"latent_sample": np.zeros((1, 4, 64, 64), np.float32)})  # max is 32x32 latents
    sess.close()


def test_compatible_with_this_gpu(built, gpu):
    _, rec = built["unet", "fp16"]
    T.check_engine_compatible(rec)  # this machine, this GPU: no error


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
