"""The passes' typed errors (defined with the others in :mod:`diffc.errors`; re-exported for the pass modules)."""

from diffc.errors import PassError, PassOptionError

__all__ = ["PassError", "PassOptionError"]
