"""``diffc run / build / inspect`` flags as untrusted input: each bad one ends in ``error (<code>): ...`` and exit 2
before any work (no artifact is loaded: the refusals below run against a folder that does not even exist), and
the output file's extension picks the image format."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from diffc.cli import main
from diffc.profiles.schema import max_threads

NO_ARTIFACT = "/nonexistent/artifact.diffc"


def _run(*args: str):
    return CliRunner().invoke(main, ["-q", *args])


def _refused(result, code: str, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert f"error ({code}): " in result.output and message in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("flags, message", [
    (["--threads", "100000"], f"--threads must be an integer from 0 (the profile's setting) to {max_threads()}"),
    (["--threads", "-1"], "--threads must be an integer from 0"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2**64 - 1"),
    (["--seed", str(2**64)], "--seed must be an integer from 0 to 2**64 - 1"),
    (["--guidance", "nan"], "--guidance must be a finite number from 0 to 100"),
    (["--guidance", "inf"], "--guidance must be a finite number from 0 to 100"),
    (["--guidance", "-1"], "--guidance must be a finite number from 0 to 100"),
    (["--height", "0", "--width", "0"], "--height must be a positive number of pixels"),
    (["--width", "-64"], "--width must be a positive number of pixels"),
    (["--negative-prompt", "caf\udce9"], "--negative-prompt 'caf\\udce9' is not valid text"),
])
def test_run_flags_are_checked_before_loading(tmp_path, flags, message):
    _refused(_run("run", NO_ARTIFACT, "--prompt", "a digit", "--out", str(tmp_path / "x.png"), *flags),
             "input_error", message)


def test_non_utf8_prompt_from_a_real_command_line(tmp_path):
    """The bytes reach Python as surrogates (PEP 383) through the real argv, not only through CliRunner."""
    import subprocess

    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    r = subprocess.run([sys.executable, "-m", "diffc.cli", "run", NO_ARTIFACT, "--prompt", b"caf\xe9",
                        "--out", str(tmp_path / "x.png")], capture_output=True, env=env)
    assert r.returncode == 2, r.stderr
    assert b"error (input_error): --prompt" in r.stderr and b"not valid text" in r.stderr, r.stderr


@pytest.mark.parametrize("name, message", [
    ("x", "has no extension; the extension picks the format, one of .png, .jpg, .jpeg, .webp (e.g. x.png)"),
    ("x.gif", "has extension '.gif'; the extension picks the format"),
    ("x.PNG.txt", "has extension '.txt'"),
])
def test_output_extension_decides(tmp_path, name, message):
    _refused(_run("run", NO_ARTIFACT, "--prompt", "a", "--out", str(tmp_path / name)), "output_path", message)


def test_output_folder_file_parent_and_read_only(tmp_path):
    _refused(_run("run", NO_ARTIFACT, "--prompt", "a", "--out", str(tmp_path)), "output_path", "is a folder")
    (tmp_path / "file").write_text("x")
    _refused(_run("run", NO_ARTIFACT, "--prompt", "a", "--out", str(tmp_path / "file" / "sub" / "x.png")),
             "output_path", "is a file, not a folder")
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _refused(_run("run", NO_ARTIFACT, "--prompt", "a", "--out", str(ro / "x.png")), "output_path", "not writable")
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_save_image_refuses_a_place_that_takes_no_files():
    """Where the up-front check cannot tell (root passes every permission check; procfs takes no new files), the
    write itself fails with a typed error and leaves nothing."""
    from diffc.errors import OutputPathError
    from diffc.runtime import save_image

    with pytest.raises(OutputPathError, match="cannot write /proc/diffc-test.png: .*; choose a writable path"):
        save_image(np.zeros((4, 4, 3), np.float32), "/proc/diffc-test.png")


def test_run_writes_the_format_the_extension_names(demo_cpu_artifact, tmp_path):
    """One load per format; PNG is exact, JPEG / WebP close, and nothing but the image is left in the folder."""
    images = {}
    for name, fmt in (("x.png", "PNG"), ("x.JPG", "JPEG"), ("sub/x.webp", "WEBP")):
        out = tmp_path / name
        r = _run("run", str(demo_cpu_artifact), "--prompt", "a handwritten digit seven", "--seed", "3",
                 "--out", str(out))
        assert r.exit_code == 0, r.output
        with Image.open(out) as img:
            assert img.format == fmt
            images[fmt] = np.asarray(img.convert("RGB")).astype(int)
    assert np.abs(images["JPEG"] - images["PNG"]).mean() < 8 and np.abs(images["WEBP"] - images["PNG"]).mean() < 8
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub", "x.JPG", "x.png", "x.webp"]


@pytest.mark.parametrize("flags, code, message", [
    (["--steps", "0"], "profile_error", "--steps must be an integer from 1 to 1000"),
    (["--steps", "-3"], "profile_error", "--steps must be an integer from 1 to 1000"),
    (["--sampler", "plms"], "profile_error", "--sampler must be one of auto, ddim"),
])
def test_build_overrides_are_checked(flags, code, message):
    _refused(_run("build", "demo", "--dry-run", *flags), code, message)


@pytest.mark.parametrize("opset", ["5", "999"])
def test_export_opset_is_checked(tmp_path, opset):
    _refused(_run("export", "demo", "--out", str(tmp_path / "x"), "--opset", opset), "export_error",
             "--opset must be from 17 to")
    assert not (tmp_path / "x").exists()


def test_help_documents_the_ranges():
    r = CliRunner().invoke(main, ["run", "--help"], terminal_width=200)
    text = " ".join(r.output.split())
    for phrase in ("0 to 2**64 - 1", "negative seeds are refused", "from 0 to 100", ".png, .jpg / .jpeg or .webp",
                   "0 to 4 per CPU"):
        assert phrase in text, phrase
