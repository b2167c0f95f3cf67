"""Filesystem helpers shared by export, build and the runtime: atomic output folders, content hashes, the host
cache and its size limit."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from diffc.errors import OutputExistsError

log = logging.getLogger("diffc")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; move it to ``out`` only if the block succeeds.

    The temporary folder lives in the same parent so the final step is a rename on one filesystem: an
    interrupted export or build (exception, Ctrl-C) leaves no half-written ``out`` behind.
    """
    out = Path(out).absolute()
    if out.exists() and not force:
        raise OutputExistsError(f"{what} folder {out} already exists; pass --force to replace it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(out)
    os.mkdir(tmp, 0o777)  # the usual permissions (umask applies), not mkdtemp's private 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` through a new temporary file in the same folder and a rename: readers (other
    processes loading the same engine or cache) see the old file or the whole new one, never a torn write, and a
    failed write leaves no temporary file behind. The file gets the usual permissions (umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _temporary_sibling(path: Path) -> Path:
    """A fresh hidden name beside ``path``, created by the caller with an explicit mode (O_EXCL / mkdir) so the
    umask applies: reading the umask means setting it, which would race with other threads creating files."""
    return path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_matches(path: str | os.PathLike, digest: str) -> bool:
    """Whether ``path``'s sha256 is ``digest``, remembered on this host: a match is recorded in the host cache
    (``verified/``) with the file's identity (device, inode, size, mtime, ctime), and while that identity is
    unchanged the file is not read again (the SD-1.5 int8 artifact: 1.6 GB, ~1.1 s of a 4 s load on 2 cores).

    Every write, rename or copy through the file system gives the file a new ctime, which no user call can set
    back, so any such change is read and checked; only damage below the file system (bit rot) goes unseen,
    as it would between two reads. A file changed in the last 2 s is read every time (timestamps are coarse:
    a second write in the same tick could keep them). With the host cache off, every call reads the file.
    """
    path = Path(path)
    st = path.stat()
    identity = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    cache = host_cache_dir()
    record = None
    if cache is not None:
        record = cache / "verified" / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]}.json"
        with contextlib.suppress(OSError, ValueError):
            if json.loads(record.read_text()) == {"identity": identity, "sha256": digest}:
                touch(record)
                return True
    if sha256_file(path) != digest:  # read after stat: a change while reading gives a new identity next time
        return False
    if record is not None and time.time() - max(st.st_mtime, st.st_ctime) > 2.0:
        try:
            write_atomic(record, json.dumps({"identity": identity, "sha256": digest}).encode())
            _trim_records(record.parent)
        except OSError as e:  # a read-only or full cache only costs the next load a read
            log.debug("cannot record the verified hash of %s: %s", path, e)
    return True


#: the most records of matched hashes the host cache keeps (~200 bytes each); the least recently used go first
VERIFIED_MAX_RECORDS = 4096


def _trim_records(folder: Path) -> None:
    records = []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.endswith(".json") and not e.name.startswith("."):
                with contextlib.suppress(OSError):
                    records.append((e.stat().st_mtime, e.path))
    for _, path in sorted(records)[: max(len(records) - VERIFIED_MAX_RECORDS, 0)]:
        with contextlib.suppress(OSError):
            os.unlink(path)


def folder_hash(root: str | os.PathLike) -> str:
    """A content hash of every regular file under ``root`` (relative paths and bytes), order-independent."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def host_cache_dir() -> Path | None:
    """``$DIFFC_CACHE_DIR`` (``off`` disables the cache), else ``$XDG_CACHE_HOME/diffc`` or ``~/.cache/diffc``."""
    env = os.environ.get("DIFFC_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffc"


#: the most one backend's host cache folder keeps, unless ``$DIFFC_CACHE_MAX_GB`` says otherwise: room for the
#: onnxruntime entries of four SD-1.5 artifacts (fp32 ~4.1 GB each, int8 ~1.2 GB) or one SDXL fp32 artifact
DEFAULT_CACHE_MAX_GB = 20.0


def cache_limit_bytes() -> int:
    """``$DIFFC_CACHE_MAX_GB`` (default :data:`DEFAULT_CACHE_MAX_GB`) in bytes."""
    raw = os.environ.get("DIFFC_CACHE_MAX_GB", "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_CACHE_MAX_GB
    except ValueError:
        log.warning("DIFFC_CACHE_MAX_GB=%r is not a number of GB; using %g", raw, DEFAULT_CACHE_MAX_GB)
        gb = DEFAULT_CACHE_MAX_GB
    return int(max(gb, 0.0) * 1e9)


def touch(path: Path) -> None:
    """Mark a cache entry's marker file as used now (the size limit evicts the least recently used first)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def new_cache_folder(entry: Path | None) -> Path | None:
    """A new ``.tmp-*`` folder beside the host cache ``entry``, to fill and then rename into place (readers never
    see half an entry; :func:`trim_cache` leaves such folders alone); None without an entry (the cache is off),
    or, with a warning, when the cache cannot be written (the caller goes on without it)."""
    if entry is None:
        return None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    except OSError as e:
        log.warning("cannot write the host cache %s (%s); going on without it", entry.parent, e)
        return None


def trim_cache(folder: Path, marker: str, *, keep: Path | None = None, max_bytes: int | None = None) -> list[Path]:
    """Delete the least recently used entries of a cache folder until its entries total at most ``max_bytes``
    (default :func:`cache_limit_bytes`). An entry is a folder holding ``marker``, last used at the marker's
    mtime (:func:`touch`); ``keep`` (the entry just written) and in-progress ``.tmp-*`` folders stay. Returns
    the entries deleted. A process still reading a deleted entry keeps its open files (POSIX unlink)."""
    limit = cache_limit_bytes() if max_bytes is None else max_bytes
    entries = []
    for m in folder.rglob(marker):
        entry = m.parent
        if any(part.startswith(".") for part in entry.relative_to(folder).parts):
            continue
        try:
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            entries.append((m.stat().st_mtime, entry, size))
        except OSError:  # deleted meanwhile by another process
            continue
    total = sum(size for _, _, size in entries)
    evicted = []
    for _, entry, size in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if keep is not None and entry == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        evicted.append(entry)
        log.info("host cache over %.1f GB: removed %s (%.2f GB, least recently used)", limit / 1e9, entry, size / 1e9)
    return evicted
