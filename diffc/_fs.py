"""Filesystem helpers shared by export and build: atomic output folders and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the final folder gets the usual permissions
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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
