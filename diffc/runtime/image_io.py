"""Writing generated images: the file name's extension decides the format (PNG, JPEG or WebP, through Pillow).

:func:`check_image_path` runs before any work (``diffc run`` calls it before loading the artifact), so a path
that cannot take an image -- no or an unknown extension, a folder, a read-only place, a parent that is a file --
is refused in a second, not after a minute of sampling. :func:`save_image` writes through a temporary file in
the same folder and renames it, so a crash never leaves half an image under the requested name.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
from PIL import Image, features

from diffc.errors import OutputPathError
from diffc.runtime.pipeline import to_uint8

#: extension -> (Pillow format, save options). JPEG and WebP at quality 95: visually lossless for generated images,
#: a fraction of the PNG's size; PNG stays the exact one.
IMAGE_FORMATS: dict[str, tuple[str, dict]] = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95}),
    ".jpeg": ("JPEG", {"quality": 95}),
    ".webp": ("WEBP", {"quality": 95}),
}


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_image_path(path: str | os.PathLike) -> Path:
    """Refuse, with an :class:`OutputPathError` saying what to do, a path :func:`save_image` could not write."""
    path = Path(path)
    if "\0" in str(path):
        raise OutputPathError(f"output path {str(path)!r} holds a NUL byte; choose another file name")
    if path.is_dir():
        raise OutputPathError(f"output path {path} is a folder; give a file name such as {path / 'image.png'}")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_FORMATS:
        what = f"extension {path.suffix!r}" if path.suffix else "no extension"
        raise OutputPathError(f"output path {path} has {what}; the extension picks the format, one of "
                              f"{', '.join(IMAGE_FORMATS)} (e.g. {path.with_suffix('.png').name})")
    fmt = IMAGE_FORMATS[suffix][0]
    if fmt == "WEBP" and not features.check("webp"):
        raise OutputPathError(f"this Pillow was built without WebP support, so {path} cannot be written; use .png "
                              "or .jpg, or install a Pillow wheel with WebP")
    parent = path.absolute().parent
    existing = _nearest_existing(parent)
    if not existing.is_dir():
        raise OutputPathError(f"cannot write {path}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {path}: {existing} is not writable by this user (read-only folder or "
                              "mount); choose a writable path")
    return path


def save_image(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one ``float (H, W, 3)`` image in [0, 1] (as the pipeline returns) to ``path``, in the format its
    extension names; creates the parent folders. Raises :class:`OutputPathError` when the path cannot take it."""
    path = check_image_path(path)
    fmt, options = IMAGE_FORMATS[path.suffix.lower()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open rather than mkstemp: mkstemp's 0600 would survive the rename; this honours the umask like open()
        tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}; choose a writable path") from e
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(to_uint8(image)).save(f, format=fmt, **options)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputPathError(f"cannot write {path}: {e.strerror or e}; free disk space or choose another "
                              "path") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path
