"""Shared by the TensorRT backend's modules: the two flavours, how to import them, their versions, limits.

No TensorRT import happens here until :func:`_import` is called; :func:`available` only looks for the modules.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path

from diffc.errors import BackendUnavailableError, EngineBuildError, ProfileError

NAME = "tensorrt"
FLAVOURS = ("tensorrt", "tensorrt_rtx")
#: the extra that installs each flavour (TensorRT-RTX installs from PyPI anywhere; datacenter TensorRT's
#: wheels come from NVIDIA's index, and JetPack ships it with the OS)
EXTRAS = {"tensorrt_rtx": "pip install 'diffc[tensorrt]'",
          "tensorrt": "pip install 'diffc[tensorrt-datacenter]' (on a Jetson: the TensorRT that JetPack installs)"}
ENGINE_FILE = "model.plan"
#: bump when the build's meaning changes without its inputs changing, to invalidate every cached engine
CACHE_FORMAT = 1
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
HARDWARE_COMPAT = ("none", "ampere_plus", "same_compute_capability")
#: lowest compute capability (x10) with kernels for each precision (TensorRT / TensorRT-RTX support matrices)
MIN_COMPUTE_CAPABILITY = {"fp32": 75, "fp16": 75, "int8": 75, "bf16": 80, "fp8": 89}
_MIB = 1 << 20


# ------------------------------------------------------------------------------------------------ import


_MODULES = {"tensorrt": ("tensorrt",),
            # NVIDIA's SDK wheel is `tensorrt_rtx`; the PyPI split wheels are `tensorrt_rtx_bindings`, whose
            # __init__ imports `tensorrt_rtx_libs`, which dlopens the shipped .so files by full path: no
            # LD_LIBRARY_PATH needed.
            "tensorrt_rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}


def _check_flavour(flavour: str) -> str:
    if flavour not in FLAVOURS:
        raise ProfileError(f"unknown TensorRT flavour {flavour!r}; expected one of {list(FLAVOURS)}")
    return flavour


def available(flavour: str | None = None) -> str | None:
    """The importable flavour (``flavour`` if given; else ``tensorrt`` when present, then ``tensorrt_rtx``).

    Finds the module without importing it, so asking is free; a broken install shows up on first use.
    """
    for f in ((_check_flavour(flavour),) if flavour else FLAVOURS):
        if any(importlib.util.find_spec(m) is not None for m in _MODULES[f]):
            return f
    return None


@functools.lru_cache(maxsize=None)
def _import(flavour: str):
    _check_flavour(flavour)
    errors = []
    for name in _MODULES[flavour]:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            return importlib.import_module(name)
        except (ImportError, OSError) as e:  # e.g. bindings without their libs wheel
            errors.append(f"{name}: {e}")
    detail = f" (found but cannot import: {'; '.join(errors)})" if errors else ""
    raise BackendUnavailableError(f"the {flavour} backend is not installed{detail}; install it with {EXTRAS[flavour]}")


def version(flavour: str | None = None) -> str:
    flavour = flavour or available()
    if flavour is None:
        raise BackendUnavailableError(f"no TensorRT is installed; install TensorRT-RTX with {EXTRAS['tensorrt_rtx']}")
    return str(_import(flavour).__version__)


def _cc_number(cc: str) -> int:
    if not (isinstance(cc, str) and cc.startswith("SM") and cc[2:].isdigit()):
        raise ProfileError(f"compute capability {cc!r} is not of the form 'SM89'")
    return int(cc[2:])




def default_cache_dir() -> Path | None:
    """``<host cache>/tensorrt``: engines by content hash, timing caches, TensorRT-RTX runtime caches.

    The host cache is ``$DIFFC_CACHE_DIR`` (``off`` disables it), else ``$XDG_CACHE_HOME/diffc`` or
    ``~/.cache/diffc``: the same root the onnxruntime backend keeps its per-host graphs in.
    """
    from diffc._fs import host_cache_dir

    root = host_cache_dir()
    return None if root is None else root / "tensorrt"
