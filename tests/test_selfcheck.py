"""``python -m diffc.selfcheck --gpu``: its CPU-side behaviour (arguments, exit codes, the JSON's form, the message
on a machine without a GPU). The checks themselves need an NVIDIA GPU: on one, this file's last test runs the
quick self-check end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from diffc import selfcheck as S


def _has_gpu() -> bool:
    from diffc.engines._trt_cuda import device_compute_capability

    return device_compute_capability() is not None


@pytest.mark.parametrize("argv", [[], ["--quick"], ["--gpu", "--budget-s", "0"], ["--gpu", "--budget-s", "nan"],
                                  ["--gpu", "--frobnicate"]])
def test_bad_arguments_exit_2_and_write_nothing(argv, tmp_path, capsys):
    assert S.main([*argv, "--out", str(tmp_path / "r.json")]) == S.EXIT_USAGE
    assert not (tmp_path / "r.json").exists()
    assert "usage: python -m diffc.selfcheck" in capsys.readouterr().err


def test_arguments():
    args = S.parse_args(["--gpu"])
    assert (args.gpu, args.quick, str(args.out), args.budget_s) == (True, False, S.DEFAULT_OUT, S.DEFAULT_BUDGET_S)
    args = S.parse_args(["--gpu", "--quick", "--out", "x/y.json", "--budget-s", "60"])
    assert args.quick and str(args.out) == "x/y.json" and args.budget_s == 60


def test_without_a_gpu_exits_3_with_a_json_that_says_so(tmp_path, monkeypatch, caplog):
    if _has_gpu():
        pytest.skip("this machine has a GPU; test_quick_selfcheck_on_this_gpu covers it")
    out = tmp_path / "sub" / "report.json"
    assert S.main(["--gpu", "--out", str(out)]) == S.EXIT_NO_GPU
    report = json.loads(out.read_text())
    assert report["schema"] == S.SCHEMA and report["status"] == "no_gpu" and report["exit_code"] == S.EXIT_NO_GPU
    assert report["gpu"] is None and report["checks"] == {}
    assert "no NVIDIA GPU" in report["message"] and "no NVIDIA GPU" in caplog.text
    assert set(report) >= {"started", "seconds", "versions", "onnxruntime_cuda_provider"}
    assert report["versions"]["diffc"]


def test_module_entry_point_without_a_gpu(tmp_path):
    if _has_gpu():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "diffc.selfcheck", "--gpu", "--out", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == S.EXIT_NO_GPU, proc.stderr
    assert "no NVIDIA GPU" in proc.stderr and json.loads(out.read_text())["status"] == "no_gpu"
    # the self-check stays light until it has a GPU: no torch in the process that says there is none
    code = "import sys, diffc.selfcheck as s; s.main(['--gpu', '--out', sys.argv[1]]); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr


def test_psnr():
    a = np.zeros((1, 4, 4, 3), np.float32)
    assert S.psnr(a, a) == math.inf
    assert S.psnr(a, a + 0.1) == pytest.approx(20.0)
    assert S.psnr(a, a + 0.01) == pytest.approx(40.0)


def test_pytest_summary_counts():
    assert S._pytest_counts("3 passed, 2 skipped, 1 deselected in 4.2s") == {"passed": 3, "skipped": 2,
                                                                              "deselected": 1}
    assert S._pytest_counts("1 failed, 1 error in 0.1s") == {"failed": 1, "error": 1}


def test_clock_and_skips():
    clock = S.Clock(100.0)
    assert clock.fits(50) and not clock.fits(1000) and 99 < clock.left() <= 100
    checks: dict = {}
    S._skip(checks, "unet_step", "--quick")
    assert checks == {"unet_step": {"ok": None, "skipped": "--quick"}}
    entry = S._step(checks, "boom", lambda: 1 / 0)
    assert entry["ok"] is False and "ZeroDivisionError" in entry["error"] and entry["seconds"] >= 0
    assert S._step(checks, "fine", lambda: {"value": 1})["ok"] is True


def test_rtx_profile_is_refused_on_untargeted_gpus():
    prof, why = S._rtx_profile("SM90")
    assert prof is None and "does not target SM90" in why


@pytest.mark.gpu
def test_quick_selfcheck_on_this_gpu(tmp_path):
    if not _has_gpu():
        pytest.skip("needs a GPU")
    out = tmp_path / "r.json"
    code = S.main(["--gpu", "--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["gpu"]["compute_capability"] and "build:cuda-fp16" in report["checks"]
    assert code == report["exit_code"]
