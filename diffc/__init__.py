"""diffc: a deployment compiler for diffusion models.

``diffc.build`` (needs the ``export`` extra) turns a diffusers pipeline folder into an artifact;
``diffc.load`` (base install only: numpy + onnxruntime) loads an artifact and returns a callable pipeline.
This module imports nothing heavy: both functions import their machinery when called.
"""

from __future__ import annotations

__version__ = "0.1.0"

from diffc.errors import DiffcError

__all__ = ["DiffcError", "__version__", "build", "load"]


def build(model, profile="cpu", out=None, **kwargs):
    """Compile ``model`` (a diffusers folder or ``"demo"``) for ``profile`` into an artifact at ``out``."""
    from diffc.builder import build as _build

    return _build(model, profile=profile, out=out, **kwargs)


def load(artifact, **kwargs):
    """Load an artifact; returns a :class:`diffc.runtime.Pipeline` (call it with a prompt)."""
    from diffc.runtime import load as _load

    return _load(artifact, **kwargs)
