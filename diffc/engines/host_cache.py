"""The per-host cache of what a backend derives from an engine on this machine, one protocol for every backend.

onnxruntime keeps layout-optimized graphs here, OpenVINO compiled models, TensorRT built engines: minutes of
work that a later start skips. Because a later start *runs* what it finds, the cache trusts only what it
verified:

* **Keys are verified digests.** A session derives an entry from engine files whose sha256 the manifest claims;
  the entry is written into a temporary folder and held by a :class:`PublishGate` until the runtime has
  checked those claims against the files (:func:`diffc.runtime.pipeline.open_sessions`); a failed or
  interrupted check discards it. A tampered artifact that claims a genuine artifact's digests therefore
  leaves nothing under them. The key also holds the backend's version and the host's signature (CPU, GPU).
* **Every entry carries its own integrity record** (the marker file ``complete``: each file's sha256 and its
  identity -- device, inode, size, mtime, ctime -- when it was published). A lookup compares identities
  (stat only); a changed identity means the file is read and hashed again, a mismatch means a warning, the
  entry discarded and made again.
* **The cache is an optimization, never a reason to fail**: a cache folder that cannot be written (read-only,
  full: ENOSPC, EFBIG) costs a warning and the next start the work again.

Entries are published by renaming a complete ``.tmp-<pid>-*`` folder into place (a reader never sees half an
entry; of two processes making the same entry the first wins); the folder's size is bounded by
:func:`diffc._fs.trim_cache` (least recently used first). Temporary folders of processes that died (SIGKILL)
are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from diffc._fs import host_cache_dir, sha256_file, touch, trim_cache

log = logging.getLogger("diffc.engines.host_cache")

#: the marker and integrity record of an entry; an entry without it is not one
RECORD = "complete"
#: the record's layout, also part of every key: entries of an older layout are never read (and age out)
FORMAT = 2
#: a temporary folder whose owner is gone and that was last changed this long ago is removed by the next writer
STALE_S = 60.0

#: cache folders this process has said it cannot write to (once each: not once per component)
_WARNED: set[Path | None] = set()
_WARNED_LOCK = threading.Lock()


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class PublishGate:
    """Holds new cache entries until the files they were derived from are known to be genuine.

    Undecided, it keeps what :meth:`Pending.finish` hands it; :meth:`open` (the engine files' hashes matched)
    publishes them and every later one at once; :meth:`close` (they did not, or the open failed) discards
    them and every later one. Thread-safe: OpenVINO sessions compile on worker threads.
    """

    def __init__(self, *, verified: bool = False):
        self._lock = threading.Lock()
        self._state: bool | None = True if verified else None
        self._held: list[tuple[Pending, dict[str, Any]]] = []

    @property
    def state(self) -> bool | None:
        """True: open (publishing), False: closed (discarding), None: undecided (holding)."""
        return self._state

    def submit(self, pending: "Pending", meta: dict[str, Any]) -> None:
        with self._lock:
            state = self._state
            if state is None:
                self._held.append((pending, meta))
                return
        pending.publish(meta) if state else pending.discard()

    def open(self) -> None:
        with self._lock:
            if self._state is not None:
                return
            self._state, held, self._held = True, self._held, []
        for pending, meta in held:
            pending.publish(meta)

    def close(self) -> None:
        with self._lock:
            if self._state is False:
                return
            self._state, held, self._held = False, self._held, []
        for pending, _ in held:
            pending.discard()


class Entry:
    """A published, verified cache entry: its folder and the backend's ``meta`` recorded with it."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path, self.meta = path, meta

    def discard(self, why: str) -> None:
        """Remove this entry (it could not be used: ``why``), so that it is made again."""
        log.warning("the host cache entry %s cannot be used (%s); making it again", self.path, why)
        _discard(self.path)


class Pending:
    """A new entry being written: fill :attr:`path`, then :meth:`finish` (published now or when the gate opens)
    or :meth:`discard`."""

    def __init__(self, cache: "HostCache", key: str, path: Path, gate: PublishGate | None):
        self.cache, self.key, self.path, self.gate = cache, key, path, gate

    def finish(self, meta: dict[str, Any] | None = None) -> None:
        """The folder is complete: publish it with ``meta`` once its sources are verified."""
        if self.gate is None:
            self.publish(meta or {})
        else:
            self.gate.submit(self, meta or {})

    def discard(self) -> None:
        _discard(self.path)

    def publish(self, meta: dict[str, Any]) -> Path | None:
        """Record every file's sha256 and identity, move the folder into place and trim the cache; returns the
        entry, or None when it could not be written (a warning; the caller goes on without it)."""
        entry = self.cache.folder / self.key
        try:
            files = {}
            for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
                identity = _identity(f.stat())  # before the read: a change while reading shows as a new identity
                files[f.relative_to(self.path).as_posix()] = {"sha256": sha256_file(f), "identity": identity}
            if not files:
                raise ValueError("the backend wrote no files")
            record = {"format": FORMAT, "key": self.key, "files": files, "meta": meta}
            with open(self.path / RECORD, "w") as f:
                f.write(json.dumps(record))
            if not (entry / RECORD).is_file():  # else another process published it first: its entry stands
                _discard(entry)  # a half-removed or damaged folder of that name
                os.replace(self.path, entry)
        except (OSError, ValueError) as e:
            self.discard()
            if not (entry / RECORD).is_file():  # not merely a race lost to another process
                self.cache.unwritable(e)
                return None
        self.discard()  # left only when the entry already stood
        self.cache.trim(keep=entry)
        return entry


class HostCache:
    """One backend's folder in the per-host cache (``<host cache>/<name>``; ``folder`` overrides it; None when
    the host cache is off: ``DIFFC_CACHE_DIR=off``)."""

    def __init__(self, name: str, *, folder: str | os.PathLike | None = None):
        self.name = name
        if folder is not None:
            self.folder: Path | None = Path(folder)
        else:
            root = host_cache_dir()
            self.folder = None if root is None else root / name

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    @staticmethod
    def key(*parts: Any) -> str:
        """An entry's name from what decides its content (JSON-able parts: verified digests, versions, host
        signature, options), with the record's :data:`FORMAT`."""
        text = json.dumps([FORMAT, *parts], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    def lookup(self, key: str) -> Entry | None:
        """The entry ``key`` when it is complete and its files match its integrity record; else None (a damaged
        entry is discarded, with a warning). Marks the entry used (for the size limit)."""
        if self.folder is None:
            return None
        path = self.folder / key
        marker = path / RECORD
        if not marker.is_file():
            return None
        try:
            record = json.loads(marker.read_text())
            if record.get("format") != FORMAT or record.get("key") != key or not record.get("files"):
                raise ValueError("its integrity record is not one this diffc wrote")
            changed = False
            for rel, want in record["files"].items():
                f = path / rel
                st = f.stat()
                if _identity(st) == want["identity"]:
                    continue
                if sha256_file(f) != want["sha256"]:
                    raise ValueError(f"{rel} does not match its sha256 recorded when the entry was made")
                want["identity"], changed = _identity(st), True
        except FileNotFoundError as e:  # removed meanwhile by another process's size limit, or a file is missing
            if path.exists():
                Entry(path, {}).discard(str(e))
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            Entry(path, {}).discard(str(e))
            return None
        if changed:  # re-hashed and matched (copied, hard-linked): remember the new identity, best effort
            with contextlib.suppress(OSError):
                tmp = marker.with_name(f".{RECORD}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps(record))
                os.replace(tmp, marker)
        touch(marker)
        return Entry(path, record.get("meta") or {})

    def remove(self, key: str) -> None:
        """Remove entry ``key`` if there is one (to make it again)."""
        if self.folder is not None:
            _discard(self.folder / key)

    def begin(self, key: str, gate: PublishGate | None = None) -> Pending | None:
        """A new temporary folder for entry ``key``, or None when the cache is off or cannot be written (a
        warning, once per cache; the caller goes on without it). ``gate``: publish only once it opens."""
        if self.folder is None:
            return None
        if gate is not None and gate.state is False:
            return None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            path = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=self.folder))
        except OSError as e:
            self.unwritable(e)
            return None
        return Pending(self, key, path, gate)

    def unwritable(self, error: BaseException) -> None:
        """Say, once, that this cache cannot be written and the process goes on without it."""
        with _WARNED_LOCK:
            warned = self.folder in _WARNED
            _WARNED.add(self.folder)
        if warned:
            log.debug("cannot write the host cache %s: %s", self.folder, error)
            return
        full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        log.warning("cannot write the host cache %s (%s%s); going on without it: the next start does this work "
                    "again (free space there, point DIFFC_CACHE_DIR elsewhere, or set DIFFC_CACHE_DIR=off)",
                    self.folder, error, ": it is full" if full else "")

    def trim(self, keep: Path | None = None) -> list[Path]:
        if self.folder is None:
            return []
        try:
            return trim_cache(self.folder, RECORD, keep=keep)
        except OSError as e:
            log.debug("cannot trim the host cache %s: %s", self.folder, e)
            return []

    def _remove_stale(self) -> None:
        """Remove ``.tmp-<pid>-*`` folders whose process is gone (killed while writing an entry)."""
        now = time.time()
        with os.scandir(self.folder) as it:
            for e in it:
                if not (e.name.startswith(".tmp-") and e.is_dir(follow_symlinks=False)):
                    continue
                pid = e.name[5:].split("-", 1)[0]
                with contextlib.suppress(OSError):
                    if now - e.stat().st_mtime > STALE_S and not (pid.isdigit() and _alive(int(pid))):
                        _discard(Path(e.path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def with_fallback(open_cached: Callable[[], Any], open_plain: Callable[[], Any], pending: Pending | None,
                  cache: HostCache) -> tuple[Any, bool]:
    """Open a session that writes a cache entry into ``pending`` as it is made (``open_cached``); when that
    fails and the plain open (``open_plain``) works, the cache write was the cause (a full or unwritable cache
    folder): warn and go on without the entry. Returns (session, whether the entry was written). A failure of
    the plain open too is the engine's own: its error is raised."""
    if pending is None:
        return open_plain(), False
    try:
        return open_cached(), True
    except BaseException as cached_error:
        pending.discard()
        if not isinstance(cached_error, Exception):
            raise  # Ctrl-C, SystemExit
        session = open_plain()  # raises the engine's own error when the engine is at fault
        # the backend's own words (its error wrapped in "cannot load the artifact" would blame the artifact)
        cache.unwritable(cached_error.__cause__ or cached_error)
        return session, False
