"""The host cache trusts only what it verified (issue 27): a refused, tampered artifact leaves nothing that a
genuine artifact would later run; a damaged entry is made again; a cache that cannot be written costs a
warning, never the run."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from diffc.engines import host_cache  # noqa: E402
from diffc.errors import IntegrityError  # noqa: E402
from diffc.runtime import load  # noqa: E402

PROMPT = "a handwritten digit four"


@pytest.fixture(scope="module")
def artifact(demo_cpu_artifact):
    return demo_cpu_artifact


@pytest.fixture(scope="module")
def genuine(artifact, tmp_path_factory):
    """The artifact's image with the host cache off: what every run below must give."""
    old = os.environ.get("DIFFC_CACHE_DIR")
    os.environ["DIFFC_CACHE_DIR"] = "off"
    try:
        return load(artifact, progress=False)(PROMPT, seed=4)
    finally:
        os.environ["DIFFC_CACHE_DIR"] = old


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFC_CACHE_DIR", str(folder))
    return folder


def _entries(cache: Path) -> list[Path]:
    return sorted(p.parent for p in (cache / "onnxruntime").glob(f"*/{host_cache.RECORD}"))


def _leftovers(cache: Path) -> list[str]:
    folder = cache / "onnxruntime"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _flip(path: Path) -> None:
    """Damage ``path`` the way the issue's replay did: bytes in the weights flipped, the graph still loads."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(b ^ 0xFF for b in data[mid:mid + 4096])
    path.write_bytes(bytes(data))


def _copy(artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.diffc"
    shutil.copytree(artifact, dst)
    return dst


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and float(np.abs(a - b).max()) <= 1e-6


def test_tampered_copy_leaves_no_entry_and_the_genuine_artifact_stays_genuine(artifact, genuine, cache, tmp_path):
    """The issue's replay: a copy with flipped UNet bytes (the manifest still claims the genuine digests) is
    refused; it must not leave its layout-optimized graph under those digests (the genuine artifact then ran it
    and drew black images). Twice: the first genuine run fills the cache, the second runs from it."""
    bad = _copy(artifact, tmp_path)
    _flip(bad / "unet" / "model.onnx")
    with pytest.raises(IntegrityError, match="unet/model.onnx"):
        load(bad, progress=False)
    assert _entries(cache) == [] and _leftovers(cache) == []
    first = load(artifact, progress=False)
    assert not any(s.from_cache for s in first.sessions.values()) and len(_entries(cache)) == len(first.sessions)
    assert _same(first(PROMPT, seed=4), genuine)
    second = load(artifact, progress=False)
    assert all(s.from_cache for s in second.sessions.values())
    assert _same(second(PROMPT, seed=4), genuine)
    # and the refused copy, run again with the genuine entries in place, is still refused
    with pytest.raises(IntegrityError):
        load(bad, progress=False)
    assert len(_entries(cache)) == len(first.sessions)


def test_engine_swap_leaves_no_entry(artifact, genuine, cache, tmp_path):
    """The VAE decoder's engine copied over the UNet's: refused, and the genuine artifact afterwards runs its own
    UNet (it used to fail with ``missing inputs ['latent_sample']``)."""
    bad = _copy(artifact, tmp_path)
    shutil.copyfile(bad / "vae_decoder" / "model.onnx", bad / "unet" / "model.onnx")
    with pytest.raises(IntegrityError, match="unet/model.onnx"):
        load(bad, progress=False)
    assert _entries(cache) == [] and _leftovers(cache) == []
    for _ in range(2):
        assert _same(load(artifact, progress=False)(PROMPT, seed=4), genuine)


def test_an_interrupted_load_leaves_no_entry(artifact, cache, monkeypatch):
    """Ctrl-C while the files are hashed: the sessions were made, their entries are not kept."""
    from diffc.runtime import pipeline

    real = pipeline.verify_files

    def interrupted(root, manifest, *, hashes=True):
        if hashes:
            raise KeyboardInterrupt
        return real(root, manifest, hashes=hashes)

    monkeypatch.setattr(pipeline, "verify_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(artifact, progress=False)
    assert _entries(cache) == [] and _leftovers(cache) == []


def test_a_tampered_entry_is_discarded_and_made_again(artifact, genuine, cache, caplog):
    """An entry whose file no longer matches its integrity record (same size and mtime: only the ctime shows it)
    is re-hashed, discarded with a warning and made again; the image stays genuine."""
    load(artifact, progress=False)
    entry = max(_entries(cache), key=lambda e: (e / "model.onnx.data").stat().st_size)
    data = entry / "model.onnx.data"
    st = data.stat()
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level(logging.WARNING, logger="diffc.engines.host_cache"):
        pipe = load(artifact, progress=False)
    assert "does not match its sha256" in caplog.text
    assert sum(s.from_cache for s in pipe.sessions.values()) == len(pipe.sessions) - 1
    assert _same(pipe(PROMPT, seed=4), genuine)
    assert all(s.from_cache for s in load(artifact, progress=False).sessions.values())


def test_an_entry_of_another_record_format_is_not_read(artifact, cache):
    """A marker that is not this diffc's integrity record (an older layout, or planted) never makes a hit."""
    load(artifact, progress=False)
    for entry in _entries(cache):
        record = json.loads((entry / host_cache.RECORD).read_text())
        record["format"] = 1
        (entry / host_cache.RECORD).write_text(json.dumps(record))
    assert not any(s.from_cache for s in load(artifact, progress=False).sessions.values())


def test_a_full_cache_warns_and_runs(artifact, genuine, cache, monkeypatch, caplog):
    """No space left when an entry is published: a warning naming the cache, the run goes on, nothing left."""
    real = host_cache.os.replace

    def full(src, dst):
        if Path(dst).parent == cache / "onnxruntime":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(host_cache.os, "replace", full)
    with caplog.at_level(logging.WARNING, logger="diffc.engines.host_cache"):
        pipe = load(artifact, progress=False)
    assert "it is full" in caplog.text and "going on without it" in caplog.text
    assert caplog.text.count("cannot write the host cache") == 1  # said once, not per component
    assert _same(pipe(PROMPT, seed=4), genuine)
    assert _leftovers(cache) == []


def test_a_cache_that_cannot_be_created_warns_and_runs(artifact, genuine, tmp_path, monkeypatch, caplog):
    """DIFFC_CACHE_DIR under a regular file (as a read-only one, for a process that may write anywhere)."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DIFFC_CACHE_DIR", str(tmp_path / "file" / "cache"))
    with caplog.at_level(logging.WARNING):
        pipe = load(artifact, progress=False)
    assert "going on without it" in caplog.text
    assert _same(pipe(PROMPT, seed=4), genuine)


def test_a_file_size_limit_on_the_cache_writes_warns_and_runs(artifact, genuine, tmp_path):
    """A real write failure, not an injected one: ``diffc run`` under RLIMIT_FSIZE = 256 KiB (onnxruntime's own
    writes of the optimized graph fail with EFBIG, as on a full disk), exit 0 and the genuine image."""
    resource = pytest.importorskip("resource")
    out = tmp_path / "out.png"
    env = {**os.environ, "DIFFC_CACHE_DIR": str(tmp_path / "cache")}

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    r = subprocess.run([sys.executable, "-m", "diffc.cli", "run", str(artifact), "--prompt", PROMPT, "--seed", "4",
                        "--out", str(out)], env=env, preexec_fn=limit, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cannot write the host cache" in r.stderr
    from PIL import Image

    image = np.asarray(Image.open(out)).astype(np.int16)
    assert np.abs(image - (genuine[0] * 255).round().astype(np.int16)).max() <= 1
    assert not any((tmp_path / "cache" / "onnxruntime").glob(f"*/{host_cache.RECORD}"))


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path):
    """A process killed while writing an entry leaves its ``.tmp-<pid>-*`` folder; the next writer removes it
    (and leaves a live process's alone)."""
    cache = host_cache.HostCache("x", folder=tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale, live = tmp_path / f".tmp-{dead}-abc", tmp_path / f".tmp-{os.getpid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"x")
        os.utime(folder, (1, 1))
    pending = cache.begin("k")
    assert not stale.exists() and live.exists() and pending.path.exists()
    (pending.path / "model.onnx").write_bytes(b"entry")
    pending.finish({"a": 1})
    assert cache.lookup("k").meta == {"a": 1}


def test_a_load_that_skips_the_check_writes_no_entry(artifact, genuine, cache, tmp_path):
    """``load(..., verify=False)`` (the C API's ``verify = 0``) runs a tampered copy as asked, but keeps nothing
    under the digests it did not check; entries made by a verified load are still used."""
    bad = _copy(artifact, tmp_path)
    _flip(bad / "unet" / "model.onnx")
    load(bad, progress=False, verify=False)
    assert _entries(cache) == [] and _leftovers(cache) == []
    assert _same(load(artifact, progress=False)(PROMPT, seed=4), genuine)
    assert all(s.from_cache for s in load(artifact, progress=False, verify=False).sessions.values())
