"""Filesystem helpers shared by export, build and the runtime: atomic output folders, content hashes, the host
cache and its size limit."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from diffc.errors import DiffcError, DiskSpaceError, OutputExistsError, OutputPathError

log = logging.getLogger("diffc")


#: written into every folder :func:`atomic_output_dir` creates: the proof, for a later ``--force``, that diffc wrote
#: the folder and may replace it (diffc never deletes a folder it did not write)
OWNER_FILE = ".diffc-output.json"
#: what marked the folders diffc wrote before :data:`OWNER_FILE` existed: a JSON file with these keys
_LEGACY_OWNER_FILES = {"manifest.json": ("schema_version", "diffc_version"), "export_report.json": ("opset",
                                                                                                   "components")}


def written_by_diffc(folder: Path) -> bool:
    """Whether ``folder`` (a real folder, not a link) is one diffc wrote: it holds :data:`OWNER_FILE`, or, for
    folders written before that file existed, an artifact manifest / export report with diffc's keys."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    marks = {OWNER_FILE: ("written_by",), **_LEGACY_OWNER_FILES}
    for name, keys in marks.items():
        path = folder / name
        if path.is_symlink() or not path.is_file():
            continue
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and all(k in data for k in keys) and data.get("written_by", "diffc") == "diffc":
                return True
    return False


def _replaceable(path: Path) -> bool:
    """A folder ``--force`` may replace: an empty real folder, or one diffc wrote."""
    if path.is_symlink() or not path.is_dir():
        return False
    with contextlib.suppress(OSError):
        with os.scandir(path) as it:
            if next(it, None) is None:
                return True
    return written_by_diffc(path)


def _refuse_replacing(out: Path, what: str) -> OutputExistsError:
    if out.is_symlink():
        kind = "a symbolic link"
    elif out.is_dir():
        kind = "a folder diffc did not write (it holds no diffc manifest, export report or " + OWNER_FILE + ")"
    elif out.exists():
        kind = "a file, not a folder"
    else:
        kind = "something diffc did not write"
    return OutputExistsError(f"{what} path {out} is {kind}; --force only replaces folders diffc wrote, or empty "
                             "ones, and never deletes anything else: choose another --out, or move it away yourself")


def _check_protected(out: Path, protect: Iterable[str | os.PathLike], what: str) -> None:
    real_out = out.resolve()
    for p in protect:
        real = Path(p).absolute().resolve()
        if real == real_out or real_out in real.parents:
            raise OutputExistsError(f"{what} path {out} is (or holds) the model folder {p}; writing there would "
                                    "replace the model itself: choose another --out")


def _output_error(out: Path, what: str, e: OSError) -> DiffcError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" ({e.filename})" if e.filename else ""
        return DiskSpaceError(f"a disk filled up while writing the {what} {out}{where}: {e.strerror}; nothing was "
                              "written: free some space, choose another --out, or set TMPDIR to a disk with room "
                              "for the work files")
    return OutputPathError(f"cannot write the {what} at {out}: {e.strerror or e} ({e.__class__.__name__}); "
                           "choose an --out in a folder you can write to")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False, what: str = "output",
                      protect: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; move it to ``out`` only if the block succeeds.

    The temporary folder lives in the same parent so the final step is a rename on one filesystem: an
    interrupted export or build (exception, Ctrl-C, SIGTERM through the CLI) leaves no half-written ``out``
    behind, and one killed outright leaves a ``.NAME.tmp-PID-START-*`` folder that the next call beside the
    same ``out`` removes once that process is gone (:func:`remove_stale`).

    What it will and will not delete: with ``force``, an existing ``out`` is replaced only when it is an empty
    folder or one diffc wrote (:func:`written_by_diffc`); a file, a link, any other folder, or a path that is or
    holds one of ``protect`` (the source model) is refused with :class:`OutputExistsError` before any work.
    The final move never replaces what appeared at ``out`` while the block ran (another build, a user's
    folder): it renames with ``RENAME_NOREPLACE``, and a target that appeared is a typed error, with the new
    folder removed and the other left as it was. A full disk is :class:`DiskSpaceError`, an unwritable
    location :class:`OutputPathError`.
    """
    out = Path(out).absolute()
    if out.parent == out or not out.name or out.name in (".", ".."):
        raise OutputPathError(f"{what} path {out} names no folder that can be created; choose an --out like "
                              "./model.diffc")
    _check_protected(out, protect, what)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{what} folder {out} already exists; pass --force to replace it (only a folder "
                                    "diffc wrote, or an empty one, is replaced), or choose another --out")
        if not _replaceable(out):
            raise _refuse_replacing(out, what)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out.parent, f".{out.name}.")
        tmp = _temporary_sibling(out)
        os.mkdir(tmp, 0o777)  # the usual permissions (umask applies), not mkdtemp's private 0700
    except OSError as e:
        raise _output_error(out, what, e) from e
    try:
        (tmp / OWNER_FILE).write_text(json.dumps({"written_by": "diffc", "what": what}) + "\n")
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _output_error(out, what, e) from e
        raise
    try:
        _publish(tmp, out, force=force, what=what)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _output_error(out, what, e) from e
        raise


def _publish(tmp: Path, out: Path, *, force: bool, what: str) -> None:
    """Move ``tmp`` to ``out`` without ever replacing what diffc may not delete (see :func:`atomic_output_dir`)."""
    old = None
    if force and (out.exists() or out.is_symlink()):
        # move it aside first and check what was actually moved (it may have changed since the check at start)
        old = out.parent / f".{out.name}.old-{_owner_tag()}-{secrets.token_hex(4)}"
        os.rename(out, old)
        if not _replaceable(old):
            _rename_noreplace(old, out)  # put it back as it was
            raise _refuse_replacing(out, what)
    try:
        _rename_noreplace(tmp, out)
    except FileExistsError:
        if old is not None:
            with contextlib.suppress(OSError):
                _rename_noreplace(old, out)
        raise OutputExistsError(f"{what} folder {out} appeared while this one was being written (another build to "
                                "the same --out?); it was left as it is and nothing was written: run again with "
                                "another --out, or with --force to replace it if diffc wrote it") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_libc = None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """``rename(src, dst)`` that fails with FileExistsError when ``dst`` exists, atomically (Linux
    ``renameat2(RENAME_NOREPLACE)``: Python's ``os.rename`` silently replaces an empty folder at ``dst`` and has no
    no-replace flag, so the syscall is called through ctypes). Where the syscall or the file system lacks it,
    a check then ``os.rename`` (which still refuses a non-empty folder) is the fallback."""
    global _libc
    if sys.platform.startswith("linux"):
        import ctypes

        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(_libc, "renameat2", None)
        if fn is not None:
            at_fdcwd, rename_noreplace = -100, 1
            if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
                return
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                raise FileExistsError(err, os.strerror(err), str(dst))
            if err not in (errno.EINVAL, errno.ENOSYS):
                raise OSError(err, os.strerror(err), str(src))
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from e
        raise


@contextlib.contextmanager
def work_dir(prefix: str = "diffc-work") -> Iterator[Path]:
    """A temporary work folder in ``TMPDIR`` named ``PREFIX-PID-START-*`` (this process's id and start time),
    removed when the block ends; folders of this form whose process is gone (a build killed with SIGKILL) are
    removed first (:func:`remove_stale`). A full ``TMPDIR`` is :class:`DiskSpaceError`."""
    base = Path(tempfile.gettempdir())
    remove_stale(base, f"{prefix}-")
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}-{_owner_tag()}-", dir=base))
    except OSError as e:
        raise _output_error(base / prefix, "work folder", e) from e
    try:
        yield path
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskSpaceError(f"a disk filled up during the build ({e.strerror}: {e.filename or ''}); nothing "
                                 f"was written: free some space (work files go to {base}; set TMPDIR to use "
                                 "another disk)") from e
        raise
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), which tells a
    live process from a later one that reuses its id; None when there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces or parentheses itself
    return stat_line.rsplit(")", 1)[-1].split()[19]


_OWNER_TAG: str | None = None


def _owner_tag() -> str:
    """``PID-START``: what temporary names carry so that a later process can tell whether their owner lives."""
    global _OWNER_TAG
    pid = os.getpid()
    if _OWNER_TAG is None or not _OWNER_TAG.startswith(f"{pid}-"):
        _OWNER_TAG = f"{pid}-{_process_start(pid) or 0}"
    return _OWNER_TAG


_STALE = re.compile(r"(?:tmp|old)?-?(\d+)-(\d+)-[0-9a-z_]+$")


def remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove what killed diffc processes left in ``folder``: entries named ``PREFIX[tmp-|old-]PID-START-*``
    (see :func:`_owner_tag`) whose process is gone. Entries of live processes, and every name not of this
    exact form, are left alone. Returns what was removed."""
    removed = []
    if not prefix or not folder.is_dir():
        return removed
    with contextlib.suppress(OSError), os.scandir(folder) as it:
        entries = [e for e in it if e.name.startswith(prefix)]
    for e in entries:
        m = _STALE.fullmatch(e.name[len(prefix):])
        if m is None:
            continue
        pid, start = int(m.group(1)), m.group(2)
        if pid == os.getpid() or _process_start(pid) == start or (start == "0" and _pid_alive(pid)):
            continue
        path = Path(e.path)
        if path.is_symlink() or not path.is_dir():
            with contextlib.suppress(OSError):
                path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by diffc process %d, which is gone", path, pid)
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    return path.with_name(f".{path.name}.tmp-{_owner_tag()}-{secrets.token_hex(8)}")


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
