"""The onnxruntime CUDA backend (cuda-fp16 / cuda-fp32): profiles, refusals, the wheel-conflict message, the build
(any machine), and, under the ``gpu`` marker, sessions on the GPU against onnxruntime on the CPU. Also
``Pipeline.close()`` / ``with diffc.load(...)`` on the backends that run here."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import diffc
from diffc.engines import get_backend
from diffc.engines import onnxruntime_cuda as C
from diffc.errors import BackendUnavailableError, InputError, ProfileError
from diffc.passes import resolve_options
from diffc.profiles import load_profile


def _has_cuda_provider() -> bool:
    import onnxruntime

    return C.PROVIDER in onnxruntime.get_available_providers()


@pytest.fixture(scope="module")
def cuda_provider():
    """Skips unless onnxruntime's CUDA provider and a GPU are usable here (the reason says what is missing)."""
    from diffc.engines._trt_cuda import device_compute_capability

    if device_compute_capability() is None:
        pytest.skip("needs a GPU")
    problem = C.cuda_provider_problem()
    if problem:
        pytest.skip(problem)


# ------------------------------------------------------------------------------------------------ profiles


@pytest.mark.parametrize("name, precision", [("cuda-fp16", "fp16"), ("cuda-fp32", "fp32")])
def test_profiles_load_for_the_cuda_backend(name, precision):
    prof = load_profile(name)
    assert prof.backend.value == C.NAME and prof.precision_of("unet").value == precision
    assert get_backend(prof.backend) is C.BACKEND
    get_backend(prof.backend).check_profile(prof)
    # standard ONNX ops only: diffc.passes allows contrib ops for the CPU target alone
    assert resolve_options(C.NAME, {})["attention"] == "none"


@pytest.mark.parametrize("precision, match", [("int8", "no int8 convolution kernels.*rtx-int8"),
                                              ("bf16", "builds"), ("fp8", "builds")])
def test_precisions_the_provider_lacks_are_refused(precision, match):
    prof = load_profile("cuda-fp16")
    prof = prof.with_overrides(precision={**prof.precision, "unet": type(prof.precision["default"])(precision)})
    with pytest.raises(ProfileError, match=match):
        C.BACKEND.check_profile(prof)


# ------------------------------------------------------------------------------------------------ the wheels


def test_provider_problem_names_each_case_and_its_fix():
    assert C.cuda_provider_problem(["CUDAExecutionProvider", "CPUExecutionProvider"], {}) is None
    both = C.cuda_provider_problem(["CPUExecutionProvider"], {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    assert "both" in both and "pip uninstall -y onnxruntime" in both and "--no-deps" in both
    cpu = C.cuda_provider_problem(["CPUExecutionProvider"], {"onnxruntime": "1.32.0", "onnxruntime-gpu": None})
    assert "onnxruntime-gpu" in cpu and "'cuda' extra" in cpu and "venv" in cpu
    gpu = C.cuda_provider_problem(["CPUExecutionProvider"], {"onnxruntime": None, "onnxruntime-gpu": "1.31.1"})
    assert "nvidia-smi" in gpu and "cuDNN" in gpu


def test_session_without_the_gpu_wheel_says_how_to_install_it(make_graph, tmp_path):
    if _has_cuda_provider():
        pytest.skip("this environment has onnxruntime's CUDA provider")
    engine = tmp_path / "model.onnx"
    C.build_engine(make_graph("conv"), engine, precision="fp32")
    with pytest.raises(BackendUnavailableError, match=r"(?s)onnxruntime-gpu.*diffc\[cuda\]"):
        C.Session(engine)


# ------------------------------------------------------------------------------------------------ build


def _types(model: onnx.ModelProto) -> dict[str, set[int]]:
    return {"io": {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]},
            "weights": {t.data_type for t in model.graph.initializer}}


def test_fp16_build_keeps_fp32_io_and_matches_fp32(make_graph, tmp_path):
    import onnxruntime as ort

    src = make_graph("conv")
    f32, f16 = tmp_path / "fp32" / "model.onnx", tmp_path / "fp16" / "model.onnx"
    rec32 = C.build_engine(src, f32, precision="fp32")
    rec16 = C.build_engine(src, f16, precision="fp16")
    assert rec32["files"] == ["model.onnx"] or rec32["files"][0] == "model.onnx"
    assert rec16["report"]["autocast"]["nodes"] > 0
    m32, m16 = onnx.load(str(f32)), onnx.load(str(f16))
    assert _types(m32) == {"io": {onnx.TensorProto.FLOAT}, "weights": {onnx.TensorProto.FLOAT}}
    assert _types(m16)["io"] == {onnx.TensorProto.FLOAT} and onnx.TensorProto.FLOAT16 in _types(m16)["weights"]
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(f32), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_unknown_precision_is_refused_by_the_build(make_graph, tmp_path):
    with pytest.raises(ProfileError, match="builds"):
        C.build_engine(make_graph("conv"), tmp_path / "model.onnx", precision="int8")


@pytest.fixture(scope="module")
def demo_cuda_fp16(_read_only_artifact):
    pytest.importorskip("torch", reason="building the demo artifact needs the export extra")
    return _read_only_artifact("cuda-fp16")


def test_demo_builds_for_cuda_fp16_here(demo_cuda_fp16):
    """`diffc build demo --profile cuda-fp16` on a machine without a GPU: graphs + manifest."""
    manifest = json.loads((demo_cuda_fp16 / "manifest.json").read_text())
    assert set(manifest["components"]) >= {"text_encoder", "unet", "vae_decoder"}
    for name, comp in manifest["components"].items():
        assert comp["backend"] == C.NAME and comp["precision"] == "fp16", name
        assert comp["backend_options"]["autocast"] == "fp16"
        assert all((demo_cuda_fp16 / f).is_file() for f in comp["files"])
        model = onnx.load(str(demo_cuda_fp16 / comp["file"]), load_external_data=False)
        assert _types(model)["io"] <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}


def test_demo_cuda_fp16_load_without_the_provider_is_a_clear_error(demo_cuda_fp16):
    if _has_cuda_provider():
        pytest.skip("this environment has onnxruntime's CUDA provider")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        diffc.load(demo_cuda_fp16)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("precision, atol", [("fp32", 2e-3), ("fp16", 3e-2)])
def test_session_matches_cpu_and_replays_graphs(cuda_provider, make_graph, tmp_path, precision, atol):
    import onnxruntime as ort

    src = make_graph("conv")
    engine = tmp_path / "model.onnx"
    C.build_engine(src, engine, precision=precision)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    sess = C.Session(engine, cuda_graph=True)
    rng = np.random.default_rng(0)
    xs = {s: rng.standard_normal((1, 4, s, s)).astype(np.float32) for s in (8, 16)}
    for s in (8, 8, 8, 16, 8, 8):  # replay from the third call at 8; 16 runs eagerly; back at 8: eager, replay
        got = sess.run({"x": xs[s]})["y"]
        np.testing.assert_allclose(got, ref.run(None, {"x": xs[s]})[0], atol=atol, rtol=0)
    sess.close()
    with pytest.raises(InputError, match="closed"):
        sess.run({"x": xs[8]})


@pytest.mark.gpu
def test_demo_cuda_fp16_image_close_to_cpu(cuda_provider, demo_cuda_fp16, demo_cpu_artifact):
    from diffc.selfcheck import MIN_PSNR_DB, psnr

    with diffc.load(demo_cpu_artifact, progress=False) as cpu, diffc.load(demo_cuda_fp16, progress=False) as gpu:
        assert psnr(gpu("a digit", seed=0), cpu("a digit", seed=0)) > MIN_PSNR_DB


# ------------------------------------------------------------------------------------------------ Pipeline.close


@pytest.fixture(params=["cpu-fp32", "cpu"])  # onnxruntime and OpenVINO (cpu-openvino is an alias of cpu)
def cpu_backend_artifact(request):
    """The run's shared demo builds (tests/conftest.py): cpu-fp32, and cpu (with cache reuse, as the OpenVINO
    tests need it: one build for all)."""
    name = "demo_cpu_artifact" if request.param == "cpu-fp32" else "demo_cpu_openvino_artifact"
    return request.getfixturevalue(name)


def test_closed_pipeline_refuses_calls(cpu_backend_artifact):
    with diffc.load(cpu_backend_artifact, progress=False) as pipe:
        image = pipe("a digit", seed=0)
        assert image.ndim == 4 and not pipe.closed
    assert pipe.closed
    with pytest.raises(InputError, match="closed"):
        pipe("a digit", seed=0)
    pipe.close()  # idempotent
    again = diffc.load(cpu_backend_artifact, progress=False)  # the artifact itself is untouched
    np.testing.assert_array_equal(again("a digit", seed=0), image)
    again.close()
