"""The Python half of the C API (cpp/include/diffc.h): plain-typed entry points the C++ side calls.

Kept tiny and free of policy: the C++ side only converts arguments and copies bytes; everything that can
fail raises here, and :func:`status_of` maps the exception to the C status code.
"""

from __future__ import annotations

import math

import numpy as np

from diffc.errors import ArtifactError, BackendUnavailableError, DiffcError, InputError
from diffc.runtime.pipeline import Pipeline, to_uint8

# must match enum diffc_status in cpp/include/diffc.h
OK, INVALID_ARGUMENT, ARTIFACT, INPUT, BACKEND, PYTHON, INTERNAL = range(7)


def status_of(exc: BaseException) -> int:
    if isinstance(exc, ArtifactError):
        return ARTIFACT
    if isinstance(exc, InputError):
        return INPUT
    if isinstance(exc, BackendUnavailableError):
        return BACKEND
    if isinstance(exc, DiffcError):
        return INTERNAL
    return INTERNAL


def open_pipeline(path: str, threads: int, device: str, verify: bool, height: int = 0, width: int = 0) -> Pipeline:
    if device not in ("", "cpu"):
        raise BackendUnavailableError(f"device {device!r} is not available to this artifact's onnxruntime CPU "
                                      "engines; use device \"cpu\", or build a GPU artifact")
    return Pipeline(path, threads=threads, verify=verify, progress=False, height=height or None,
                    width=width or None)


def default_size(pipe: Pipeline) -> tuple[int, int]:
    return pipe.default_size


def generate(pipe: Pipeline, prompt: str, negative_prompt: str | None, seed: int, guidance: float, height: int,
             width: int) -> tuple[bytes, int, int]:
    """diffc.h: ``guidance <= 0`` and ``height = width = 0`` mean the artifact's defaults; a NaN or infinite
    guidance is refused (NaN compares false with everything, so it would otherwise pass as a default)."""
    if not math.isfinite(guidance):
        raise InputError(f"guidance must be a finite number (<= 0: the artifact's default), got {guidance!r}")
    images = pipe(prompt, negative_prompt=negative_prompt, seed=seed, guidance=guidance if guidance > 0 else None,
                  height=height or None, width=width or None)
    rgb = np.ascontiguousarray(to_uint8(images[0]))
    return rgb.tobytes(), int(rgb.shape[0]), int(rgb.shape[1])
