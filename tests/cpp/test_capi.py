"""The C API (cpp/include/diffc.h): CMake builds libdiffc + the example, which writes the same image as the
Python runtime; the error paths return codes with messages. Mirrors the README section "Use from C++"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

if shutil.which("cmake") is None:
    pytest.skip("cmake is not installed (apt-get install cmake)", allow_module_level=True)
pytest.importorskip("pybind11", reason="pybind11 is not installed (pip install -e '.[test]')")
pytest.importorskip("torch")  # building the demo artifact needs the export extra

from diffc.runtime import load  # noqa: E402


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    build = tmp_path_factory.mktemp("cpp-build")
    subprocess.run(["cmake", "-S", str(ROOT / "cpp"), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}"],
                   check=True, capture_output=True, text=True, encoding="utf-8", errors="replace")
    # compiler warnings quote names in UTF-8 whatever the locale: decode them as such, never as ASCII
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True, text=True,
                   encoding="utf-8", errors="replace")
    return build


@pytest.fixture(scope="module")
def artifact(demo_cpu_artifact):
    return demo_cpu_artifact  # shared by the run (tests/conftest.py): read only


def _run(args, **kw):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, encoding="utf-8", env={**os.environ}, **kw)


@pytest.mark.parametrize("seed, extra", [(0, []), (5, ["--guidance", "3.0", "--negative", "blurry"]),
                                         (7, ["--height", "48", "--width", "32"])])
def test_example_matches_python(binaries, artifact, tmp_path, seed, extra):
    from PIL import Image

    out = tmp_path / "cpp.png"
    r = _run([binaries / "diffc_generate", artifact, "a handwritten digit seven", out, "--seed", seed, *extra])
    assert r.returncode == 0, r.stderr
    got = np.asarray(Image.open(out)).astype(int)
    kw = dict(zip(extra[::2], extra[1::2]))
    ref = load(artifact, progress=False)(
        "a handwritten digit seven", seed=seed, guidance=float(kw["--guidance"]) if "--guidance" in kw else None,
        negative_prompt=kw.get("--negative"), height=int(kw.get("--height", 0)) or None,
        width=int(kw.get("--width", 0)) or None)[0]
    ref = (ref * 255).round().astype(int)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1


def test_error_paths(binaries, artifact):
    from diffc.runtime.lora import BUNDLED_LORAS

    r = _run([binaries / "diffc_capi_errors", artifact, BUNDLED_LORAS["demo-bold"]])
    assert r.returncode == 0, r.stderr
    rows = {}
    for line in r.stdout.splitlines():
        name, code, *msg = line.split(" ", 2)
        rows[name] = (int(code), msg[0] if msg else "")
    assert rows["missing_artifact"][0] == 2 and "does not exist" in rows["missing_artifact"][1]
    assert rows["null_out"][0] == 1
    assert rows["open"][0] == 0
    assert rows["null_buffer"][0] == 1 and "NULL" in rows["null_buffer"][1]
    assert rows["small_buffer"][0] == 1 and "needs" in rows["small_buffer"][1]
    assert rows["bad_size"][0] == 3 and "outside this artifact's range" in rows["bad_size"][1]
    assert rows["null_prompt"][0] == 1
    assert rows["generate"][0] == 0  # the handle still works after the failed calls
    # a size at open: checked there (typed error), then what a request without a size produces
    assert rows["open_bad_size"][0] == 3 and "outside this artifact's range" in rows["open_bad_size"][1]
    assert rows["open_negative_size"][0] == 1 and ">= 0" in rows["open_negative_size"][1]
    assert rows["open_sized"][0] == 0 and rows["default_size"][0] == 0 and rows["generate_sized"][0] == 0
    assert rows["opened_default"] == (48, "32") and rows["opened_size"] == (48, "32")
    # diffc_set_loras: NULLs are invalid arguments, a missing file or a NaN scale a typed input error (the
    # pipeline unchanged); a good LoRA applies and count 0 clears
    assert rows["lora_null_pipeline"][0] == 1 and rows["lora_null_files"][0] == 1
    assert rows["lora_missing"][0] == 3 and "does not exist" in rows["lora_missing"][1]
    assert rows["lora_nan_scale"][0] == 3 and "finite" in rows["lora_nan_scale"][1]
    assert rows["lora_set"][0] == 0 and rows["lora_generate"][0] == 0 and rows["lora_clear"][0] == 0


def test_example_applies_a_lora(binaries, artifact, tmp_path):
    """``--lora demo-bold:0.7`` (diffc_set_loras with the bundled name): the Python runtime's LoRA'd image."""
    from PIL import Image

    out = tmp_path / "bold.png"
    r = _run([binaries / "diffc_generate", artifact, "a handwritten digit three", out, "--seed", 2,
              "--lora", "demo-bold:0.7"])
    assert r.returncode == 0, r.stderr
    got = np.asarray(Image.open(out)).astype(int)
    ref = load(artifact, progress=False, loras={"demo-bold": 0.7})("a handwritten digit three", seed=2)[0]
    base = load(artifact, progress=False)("a handwritten digit three", seed=2)[0]
    assert np.abs(got - (ref * 255).round().astype(int)).max() <= 1
    assert np.abs(got - (base * 255).round().astype(int)).max() > 10  # the LoRA did apply


def test_example_reports_bad_artifact(binaries, tmp_path):
    r = _run([binaries / "diffc_generate", tmp_path / "nope", "x", tmp_path / "o.png"])
    assert r.returncode == 1 and "error 2:" in r.stderr
