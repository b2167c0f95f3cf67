"""Issue 27, data loss and leftovers: what ``--force`` may delete, the final move's race, SIGTERM / SIGKILL.

Each test is one sequence a careless or hostile user ran against diffc; the expected result is a typed
:class:`DiffcError` with the user's files untouched, or a clean exit with nothing left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from diffc import _fs
from diffc.cli import main
from diffc.errors import DiskSpaceError, OutputExistsError, OutputPathError


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write_artifact(tmp: Path) -> None:
    (tmp / "manifest.json").write_text("{}")


def _cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def thesis(tmp_path):
    folder = tmp_path / "somefolder"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / "photos").mkdir()
    (folder / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


@pytest.mark.parametrize("command", ["build", "export"])
def test_force_never_replaces_a_folder_diffc_did_not_write(thesis, command):
    before = _tree(thesis)
    result = _cli(command, "demo", "--out", str(thesis), "--force")
    assert result.exit_code == 2
    assert "error (output_exists)" in result.output and str(thesis) in result.output
    assert "did not write" in result.output
    assert _tree(thesis) == before
    assert sorted(p.name for p in thesis.parent.iterdir()) == ["somefolder"]  # no hidden .old / .tmp left


def test_force_never_replaces_a_regular_file(tmp_path):
    target = tmp_path / "notes.diffc"
    target.write_text("my notes")
    with pytest.raises(OutputExistsError, match="a file, not a folder"):
        with _fs.atomic_output_dir(target, force=True, what="artifact") as tmp:
            _write_artifact(tmp)
    assert target.read_text() == "my notes"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.diffc"]  # not moved to a hidden .notes.diffc.old-PID


def test_force_never_replaces_a_link(tmp_path, thesis):
    link = tmp_path / "link.diffc"
    link.symlink_to(thesis)
    with pytest.raises(OutputExistsError, match="symbolic link"):
        with _fs.atomic_output_dir(link, force=True) as tmp:
            _write_artifact(tmp)
    assert link.is_symlink() and (thesis / "thesis.tex").is_file()


def test_out_equal_to_or_above_the_model_folder_is_refused(tmp_path):
    model = tmp_path / "models" / "sd"
    model.mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    before = _tree(tmp_path)
    for out in (model, model.parent):
        result = _cli("export", str(model), "--out", str(out), "--force")
        assert result.exit_code == 2 and "model folder" in result.output, result.output
    assert _tree(tmp_path) == before


def test_out_root_and_unwritable_places_are_typed_errors(tmp_path):
    with pytest.raises(OutputPathError, match="names no folder"):
        with _fs.atomic_output_dir("/", force=True):
            pass
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(OutputPathError, match="cannot write"):
        with _fs.atomic_output_dir(a_file / "out.diffc"):
            pass
    assert a_file.read_text() == "x"
    result = _cli("build", "demo", "--out", "/", "--force")
    assert result.exit_code == 2 and "error (output_path)" in result.output


def test_force_replaces_what_diffc_wrote_and_empty_folders(tmp_path):
    out = tmp_path / "a.diffc"
    with _fs.atomic_output_dir(out) as tmp:
        (tmp / "manifest.json").write_text('{"v": 1}')
    assert _fs.written_by_diffc(out)
    with _fs.atomic_output_dir(out, force=True) as tmp:
        (tmp / "manifest.json").write_text('{"v": 2}')
    assert (out / "manifest.json").read_text() == '{"v": 2}'
    # an artifact written before the owner file existed: its manifest says diffc wrote it
    legacy = tmp_path / "legacy.diffc"
    legacy.mkdir()
    (legacy / "manifest.json").write_text(json.dumps({"schema_version": 1, "diffc_version": "0.1.0"}))
    with _fs.atomic_output_dir(legacy, force=True) as tmp:
        _write_artifact(tmp)
    empty = tmp_path / "empty"
    empty.mkdir()
    with _fs.atomic_output_dir(empty, force=True) as tmp:
        _write_artifact(tmp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.diffc", "empty", "legacy.diffc"]


def test_a_folder_that_appears_during_the_build_is_kept(tmp_path):
    out = tmp_path / "out.diffc"
    with pytest.raises(OutputExistsError, match="appeared while"):
        with _fs.atomic_output_dir(out, what="artifact") as tmp:
            _write_artifact(tmp)
            out.mkdir()
            (out / "notes.txt").write_text("mine")
    assert _tree(out) == {"notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.diffc"]
    # an empty folder too: os.rename would silently replace it
    empty = tmp_path / "empty.diffc"
    with pytest.raises(OutputExistsError):
        with _fs.atomic_output_dir(empty) as tmp:
            _write_artifact(tmp)
            empty.mkdir()
    assert empty.is_dir() and not any(empty.iterdir())


def test_two_builds_to_one_out_one_wins(tmp_path):
    out = tmp_path / "out.diffc"
    first = _fs.atomic_output_dir(out, what="artifact")
    second = _fs.atomic_output_dir(out, what="artifact")
    tmp1, tmp2 = first.__enter__(), second.__enter__()
    (tmp1 / "manifest.json").write_text("first")
    (tmp2 / "manifest.json").write_text("second")
    first.__exit__(None, None, None)
    with pytest.raises(OutputExistsError, match="appeared while"):
        second.__exit__(None, None, None)
    assert (out / "manifest.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.diffc"]


def test_a_folder_swapped_in_during_a_forced_build_is_kept(tmp_path, thesis):
    """--force checked a diffc folder at the start; a user's folder put there meanwhile must survive."""
    out = tmp_path / "out.diffc"
    with _fs.atomic_output_dir(out) as tmp:
        _write_artifact(tmp)
    before = _tree(thesis)
    with pytest.raises(OutputExistsError, match="did not write"):
        with _fs.atomic_output_dir(out, force=True) as tmp:
            _write_artifact(tmp)
            import shutil

            shutil.rmtree(out)
            os.rename(thesis, out)
    assert _tree(out) == before


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to make a real full / read-only disk: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_is_a_disk_space_error_and_leaves_nothing(tmp_path):
    with _tmpfs(tmp_path / "small", "size=1m") as small:
        with pytest.raises(DiskSpaceError, match="full"):
            with _fs.atomic_output_dir(small / "out.diffc", what="artifact") as tmp:
                (tmp / "weights.bin").write_bytes(b"\0" * (4 << 20))
        assert list(small.iterdir()) == []


def test_a_read_only_disk_is_an_output_path_error(tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(OutputPathError, match="cannot write"):
            with _fs.atomic_output_dir(ro / "out.diffc"):
                pass


_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from diffc import _fs
    out = Path(sys.argv[1])
    with _fs.work_dir("diffc-build") as work, _fs.atomic_output_dir(out) as tmp:
        (tmp / "manifest.json").write_text("{}")
        (work / "big").write_bytes(b"x" * 1000)
        print(tmp, work, flush=True)
        time.sleep(60)
""")


def _held_process(out: Path, env: dict[str, str]) -> tuple[subprocess.Popen, list[Path]]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert len(line) == 2, "the helper process did not start"
    return proc, [Path(p) for p in line]


def test_leftovers_of_a_killed_build_are_removed_by_the_next_one(tmp_path, monkeypatch):
    import tempfile

    env = {**os.environ, "TMPDIR": str(tmp_path / "tmpdir")}
    (tmp_path / "tmpdir").mkdir()
    out = tmp_path / "out.diffc"
    killed, left = _held_process(out, env)
    live, kept = _held_process(out, env)
    try:
        killed.kill()
        killed.wait(10)
        assert all(p.exists() for p in left)  # SIGKILL: nothing could clean up
        unrelated = [tmp_path / ".out.diffc.tmp-mine", tmp_path / "tmpdir" / "diffc-build-notes"]
        for p in unrelated:
            p.mkdir()
        monkeypatch.setenv("TMPDIR", env["TMPDIR"])
        monkeypatch.setattr(tempfile, "tempdir", None)
        with _fs.work_dir("diffc-build"), _fs.atomic_output_dir(tmp_path / "out.diffc") as tmp:
            _write_artifact(tmp)
        assert not any(p.exists() for p in left)  # the dead process's folders are gone
        assert all(p.exists() for p in kept)  # the live process's are not
        assert all(p.exists() for p in unrelated)  # nor anything not named by diffc's pattern
    finally:
        live.kill()
        live.wait(10)


def test_sigterm_cleans_up_like_ctrl_c_and_exits_143(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmpdir"), "DIFFC_CACHE_DIR": "off"}
    (tmp_path / "tmpdir").mkdir()
    out = tmp_path / "out.diffc"
    proc = subprocess.Popen([sys.executable, "-m", "diffc.cli", "-q", "build", "demo", "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.name.startswith(".out.diffc.tmp-") for p in tmp_path.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the build ended before it could be stopped: {proc.stderr.read()}"
        time.sleep(1.0)  # into the export
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmpdir"]
    assert list((tmp_path / "tmpdir").iterdir()) == []
