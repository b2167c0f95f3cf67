"""Reading and checking an artifact's ``manifest.json`` (numpy-free, torch-free).

Every check here protects the runtime from a bad artifact before any engine is opened: unreadable or
incomplete JSON, a manifest from a newer diffc, a file path that escapes the artifact folder, a missing
file, a file whose sha256 differs from the one recorded at build time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from diffc._fs import sha256_matches
from diffc.errors import IntegrityError, ManifestError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "diffc_version", "source", "profile", "components", "text_encoders", "latent",
                 "image", "guidance", "sampler")
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
_REBUILD = "rebuild it with `diffc build`"


def artifact_path(root: Path, rel: Any) -> Path:
    """Resolve a manifest path inside the artifact; refuse anything that leaves it."""
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"manifest names a file as {rel!r}, which is not a relative path; {_REBUILD}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or Path(rel).is_absolute():
        raise IntegrityError(f"manifest path {rel!r} leaves the artifact folder; refusing to read it. The manifest "
                             f"was edited or is malicious: {_REBUILD}")
    root = root.resolve()
    full = (root / pure).resolve()
    if os.path.commonpath([root, full]) != str(root):
        raise IntegrityError(f"manifest path {rel!r} resolves outside the artifact folder (through a link); "
                             f"refusing to read it: {_REBUILD}")
    return full


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Load ``root/manifest.json`` and check its structure (not the files; see :func:`verify_files`)."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"artifact folder {root} does not exist; build one with `diffc build MODEL --out {root}`")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{root} has no {MANIFEST_NAME}, so it is not a diffc artifact (or the build was "
                            f"interrupted); {_REBUILD}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is corrupt ({e}); {_REBUILD}") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is not a JSON object; {_REBUILD}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{path} has no valid schema_version (got {version!r}); {_REBUILD}")
    if version > SCHEMA_VERSION:
        raise ManifestError(
            f"{path} has schema_version {version}, made by a newer diffc ({manifest.get('diffc_version', '?')}); "
            f"this runtime reads schema {SCHEMA_VERSION} — upgrade diffc (pip install -U diffc) or rebuild the artifact"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{path} lacks {missing}; {_REBUILD}")
    comps = manifest["components"]
    if not isinstance(comps, dict):
        raise ManifestError(f"{path}: 'components' must be an object; {_REBUILD}")
    for name in REQUIRED_COMPONENTS:
        if name not in comps:
            raise ManifestError(f"{path}: component {name!r} is missing from the manifest; {_REBUILD}")
    for name, comp in comps.items():
        if not isinstance(comp, dict) or not isinstance(comp.get("files"), dict) or "file" not in comp:
            raise ManifestError(f"{path}: component {name!r} lacks 'file'/'files'; {_REBUILD}")
    variants = manifest.get("step_variants")
    if variants is not None:
        names = variants.get("components") if isinstance(variants, dict) else None
        bounds = variants.get("timestep_bounds") if isinstance(variants, dict) else None
        if (not isinstance(names, list) or not isinstance(bounds, list) or len(bounds) != len(names) - 1
                or any(n not in comps for n in names)):
            raise ManifestError(f"{path}: 'step_variants' must name components of this manifest and hold one "
                                f"timestep bound fewer than components; {_REBUILD}")
    return manifest


def verify_files(root: str | os.PathLike, manifest: dict[str, Any], *, hashes: bool = True) -> None:
    """Check that every file the manifest names is inside the artifact, present, and (optionally) unchanged."""
    root = Path(root)
    expected: dict[str, str | None] = {}
    for comp in manifest["components"].values():
        artifact_path(root, comp["file"])
        expected.update(comp["files"])
    for enc in manifest["text_encoders"]:
        expected[enc["tokenizer"]] = enc.get("tokenizer_sha256")
    for rel, digest in expected.items():
        full = artifact_path(root, rel)
        if not full.is_file():
            raise IntegrityError(f"artifact file {rel} is missing from {root}; {_REBUILD}")
        if hashes and digest is not None and not sha256_matches(full, digest):
            raise IntegrityError(f"artifact file {rel} does not match the sha256 recorded at build time (it was "
                                 f"modified or corrupted); {_REBUILD}")
