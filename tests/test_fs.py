"""diffc._fs: the atomic writes every artifact, engine, cache and record goes through."""

import os
import stat

import pytest

from diffc import _fs


def test_write_atomic_replaces_whole_files_with_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "engine.plan"
    assert _fs.write_atomic(target, b"first") == target  # makes the folder
    _fs.write_atomic(target, memoryview(b"second version"))
    assert target.read_bytes() == b"second version"
    umask = os.umask(0o022)
    try:
        _fs.write_atomic(target, bytearray(b"third"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's private 0600
    assert sorted(p.name for p in target.parent.iterdir()) == ["engine.plan"]


def test_write_atomic_failure_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "timing.cache"
    target.write_bytes(b"old")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_fs.os, "replace", no_rename)
    with pytest.raises(OSError, match="No space"):
        _fs.write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["timing.cache"]


def test_atomic_output_dir_has_usual_permissions_and_leaves_nothing_on_failure(tmp_path):
    umask = os.umask(0o022)
    try:
        with _fs.atomic_output_dir(tmp_path / "out.diffc") as tmp:
            assert tmp.name.startswith(".out.diffc.tmp-")
            assert [p.name for p in tmp.iterdir()] == [_fs.OWNER_FILE]  # the proof diffc wrote it, for --force
            (tmp / "manifest.json").write_text("{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out.diffc").stat().st_mode) == 0o755  # not mkdtemp's private 0700
    with pytest.raises(KeyboardInterrupt), _fs.atomic_output_dir(tmp_path / "next.diffc"):
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.diffc"]
