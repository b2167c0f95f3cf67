"""diffc.engines.host_cache: the entry protocol every backend's host cache goes through (no backend needed)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil

import pytest

from diffc.engines import host_cache
from diffc.engines.host_cache import RECORD, HostCache, PublishGate


def _publish(cache: HostCache, key: str, content: bytes = b"graph", gate: PublishGate | None = None, meta=None):
    pending = cache.begin(key, gate)
    (pending.path / "model.onnx").write_bytes(content)
    (pending.path / "sub").mkdir()
    (pending.path / "sub" / "weights.data").write_bytes(content * 100)
    pending.finish(meta or {"made": "here"})
    return pending


def test_publish_records_every_file_and_lookup_returns_the_meta(tmp_path):
    cache = HostCache("x", folder=tmp_path)
    key = cache.key("digests", "1.2.3", {"cpu": "avx2"})
    assert key == cache.key("digests", "1.2.3", {"cpu": "avx2"}) != cache.key("digests", "1.2.4", {"cpu": "avx2"})
    assert cache.lookup(key) is None
    _publish(cache, key)
    record = json.loads((tmp_path / key / RECORD).read_text())
    assert sorted(record["files"]) == ["model.onnx", "sub/weights.data"] and record["key"] == key
    entry = cache.lookup(key)
    assert entry.path == tmp_path / key and entry.meta == {"made": "here"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [key]  # no temporary folder left


def test_a_copied_file_is_rehashed_and_kept_a_changed_one_discarded(tmp_path, caplog):
    cache = HostCache("x", folder=tmp_path)
    _publish(cache, "k")
    f = tmp_path / "k" / "model.onnx"
    shutil.copyfile(f, tmp_path / "copy")
    os.replace(tmp_path / "copy", f)  # same bytes, new inode: read and hashed again, then trusted
    assert cache.lookup("k") is not None
    before = json.loads((tmp_path / "k" / RECORD).read_text())["files"]["model.onnx"]["identity"]
    assert before[1] == f.stat().st_ino  # the new identity remembered
    f.write_bytes(b"grapH")  # same size, other bytes
    with caplog.at_level(logging.WARNING):
        assert cache.lookup("k") is None
    assert "model.onnx does not match its sha256" in caplog.text and not (tmp_path / "k").exists()


@pytest.mark.parametrize("damage", ["missing file", "bad record", "foreign key"])
def test_a_damaged_entry_is_discarded(tmp_path, damage):
    cache = HostCache("x", folder=tmp_path)
    _publish(cache, "k")
    if damage == "missing file":
        (tmp_path / "k" / "sub" / "weights.data").unlink()
    elif damage == "bad record":
        (tmp_path / "k" / RECORD).write_text("{not json")
    else:  # an entry renamed to another key: its record names the key it was made for
        _publish(cache, "other")
        shutil.rmtree(tmp_path / "k")
        os.rename(tmp_path / "other", tmp_path / "k")
    assert cache.lookup("k") is None and not (tmp_path / "k").exists()


def test_the_gate_holds_publishes_or_discards(tmp_path):
    cache = HostCache("x", folder=tmp_path)
    opened, closed = PublishGate(), PublishGate()
    _publish(cache, "a", gate=opened)
    _publish(cache, "b", gate=closed)
    assert cache.lookup("a") is None and cache.lookup("b") is None and len(list(tmp_path.iterdir())) == 2
    opened.open()
    closed.close()
    assert cache.lookup("a") is not None and sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    _publish(cache, "c", gate=opened)  # after the verdict: at once
    assert cache.lookup("c") is not None
    assert cache.begin("d", closed) is None  # nothing to write for a refused artifact
    assert cache.lookup("e") is None and _publish(cache, "e", gate=PublishGate(verified=True))
    assert cache.lookup("e") is not None


def test_a_lost_race_keeps_the_first_entry_silently(tmp_path, caplog):
    cache = HostCache("x", folder=tmp_path)
    first, second = cache.begin("k"), cache.begin("k")
    for pending, content in ((first, b"one"), (second, b"two")):
        (pending.path / "model.onnx").write_bytes(content)
    first.finish()
    with caplog.at_level(logging.WARNING):
        second.finish()
    assert caplog.text == "" and (tmp_path / "k" / "model.onnx").read_bytes() == b"one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_a_full_or_missing_cache_folder_warns_and_returns_none(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("")
    with caplog.at_level(logging.WARNING):
        assert HostCache("x", folder=tmp_path / "file" / "x").begin("k") is None
    assert "going on without it" in caplog.text
    cache = HostCache("y", folder=tmp_path / "y")
    pending = cache.begin("k")
    (pending.path / "model.onnx").write_bytes(b"x")
    monkeypatch.setattr(host_cache.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pending.finish()
    assert "it is full" in caplog.text and list((tmp_path / "y").iterdir()) == []


def test_the_size_limit_evicts_least_recently_used_entries(tmp_path, monkeypatch):
    cache = HostCache("x", folder=tmp_path)
    for i, key in enumerate("abc"):
        _publish(cache, key, content=b"x" * 1000)
        os.utime(tmp_path / key / RECORD, (100 + i, 100 + i))
    assert cache.lookup("a") is not None  # used now: the most recent
    monkeypatch.setenv("DIFFC_CACHE_MAX_GB", str(250_000 / 1e9))  # two entries of ~101 KB fit
    _publish(cache, "d", content=b"x" * 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "d"]


def test_off_means_nothing_written(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFC_CACHE_DIR", "off")
    cache = HostCache("onnxruntime")
    assert not cache.enabled and cache.begin("k") is None and cache.lookup("k") is None
    monkeypatch.setenv("DIFFC_CACHE_DIR", str(tmp_path))
    assert HostCache("onnxruntime").folder == tmp_path / "onnxruntime"
