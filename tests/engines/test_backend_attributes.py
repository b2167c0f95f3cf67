"""What used to be backend-name switches outside diffc/engines/ now reads each backend's attributes: Triton's
instance kind (``runs_on_gpu``), the ``[tensorrt]`` table's legality (``tensorrt_options``) and the dynamic step
cache's backends (``step_cache_split``). Each check also flips the attribute, so it fails if a name list comes
back. No builds: profiles and manifests only."""

from __future__ import annotations

import dataclasses

import pytest

from diffc.engines import Backend, backend_names, get_backend
from diffc.errors import ProfileError
from diffc.profiles import load_profile
from diffc.profiles.schema import SavingsOptions, parse_profile
from diffc.serve.repository import config_pbtxt, is_gpu_artifact

ATTRIBUTES = ("runs_on_gpu", "tensorrt_options", "step_cache_split")


@pytest.mark.parametrize("name", backend_names())
def test_every_backend_declares_the_attributes(name):
    backend = get_backend(name)
    assert isinstance(backend, Backend)
    assert all(isinstance(getattr(backend, a), bool) for a in ATTRIBUTES)


def test_the_attributes_say_what_the_switches_said():
    """The values of the name lists they replace (serve.repository.GPU_BACKENDS, schema._TRT_BACKENDS,
    build.step_cache.BACKENDS)."""
    on = {a: sorted(n for n in backend_names() if getattr(get_backend(n), a)) for a in ATTRIBUTES}
    assert on == {"runs_on_gpu": ["onnxruntime_cuda", "tensorrt", "tensorrt_rtx"],
                  "tensorrt_options": ["tensorrt", "tensorrt_rtx"], "step_cache_split": ["onnxruntime"]}


def _manifest(*backends: str) -> dict:
    return {"components": {f"c{k}": {"backend": b} for k, b in enumerate(backends)}}


def test_triton_instance_kind_follows_runs_on_gpu(monkeypatch):
    def kind(manifest):
        return config_pbtxt(manifest, name="m", instances=1, max_batch=1, threads=0, queue_delay_us=0)

    assert "kind: KIND_CPU" in kind(_manifest("openvino", "onnxruntime"))
    assert "kind: KIND_GPU" in kind(_manifest("onnxruntime", "tensorrt_rtx"))  # one GPU engine places the model
    assert is_gpu_artifact(_manifest("onnxruntime_cuda")) and not is_gpu_artifact(_manifest("onnxruntime"))
    monkeypatch.setattr(get_backend("openvino"), "runs_on_gpu", True)
    assert "kind: KIND_GPU" in kind(_manifest("openvino"))


def _with_tensorrt_table(backend: str) -> dict:
    return {"name": "t", "backend": backend, "precision": {"default": "fp16" if "tensorrt" in backend else "fp32"},
            "tensorrt": {"opt_level": 2}}


def test_tensorrt_table_follows_tensorrt_options(monkeypatch):
    assert parse_profile(_with_tensorrt_table("tensorrt"), where="test").tensorrt.opt_level == 2
    with pytest.raises(ProfileError, match=r"applies to the tensorrt and tensorrt_rtx backends only.*'openvino'"):
        parse_profile(_with_tensorrt_table("openvino"), where="test")
    monkeypatch.setattr(get_backend("openvino"), "tensorrt_options", True)
    assert parse_profile(_with_tensorrt_table("openvino"), where="test").tensorrt.opt_level == 2


def test_step_cache_backends_follow_step_cache_split(monkeypatch):
    from diffc.build import step_cache

    savings = SavingsOptions(step_cache={"threshold": 0.1, "metric": "rel_l1"})
    openvino = dataclasses.replace(load_profile("cpu"), savings=savings)
    with pytest.raises(ProfileError, match="built for onnxruntime only .* not tested on openvino"):
        step_cache.check(openvino)
    step_cache.check(dataclasses.replace(load_profile("cpu-fp32"), savings=savings))
    monkeypatch.setattr(get_backend("openvino"), "step_cache_split", True)
    step_cache.check(openvino)
