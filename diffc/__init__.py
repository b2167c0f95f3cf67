"""diffc: a deployment compiler for diffusion models.

``diffc.build`` (needs the ``export`` extra) turns a diffusers pipeline folder into an artifact;
``diffc.load`` (base install only: numpy + onnxruntime) loads an artifact and returns a callable pipeline.
This module imports nothing heavy: both functions import their machinery when called.
"""

from __future__ import annotations

__version__ = "0.1.0"

from diffc.errors import DiffcError

# ``diffc.build`` is both the function and the package of build stages (diffc/build/). Importing the function
# here, before anything imports a stage, binds the name to the function for good: the import system sets a
# package's attribute only when it first loads the subpackage, which this line does. The package's __init__
# is light (the stages load when build() runs).
from diffc.build import build  # noqa: E402

__all__ = ["DiffcError", "__version__", "build", "load"]


def load(artifact, **kwargs):
    """Load an artifact; returns a :class:`diffc.runtime.Pipeline` (call it with a prompt)."""
    from diffc.runtime import load as _load

    return _load(artifact, **kwargs)
