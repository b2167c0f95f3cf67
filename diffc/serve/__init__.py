"""Serving an artifact on Triton Inference Server.

:func:`write_repository` turns any artifact into a standard Triton model repository (a Python-backend model whose
``initialize`` calls :func:`diffc.load` and whose ``execute`` batches requests into one pipeline call), which runs
unchanged on a CPU box, in NVIDIA's Triton container and behind KServe (docs/serving.md). :class:`TritonServer`
starts the ``tritonserver`` binary (the ``serve`` extra's, or one on ``PATH``) on such a repository, bound to
127.0.0.1. Nothing here imports tritonclient or the server's Python modules: the base install can write a
repository for another machine.
"""

from __future__ import annotations

from diffc.serve.repository import write_repository
from diffc.serve.server import ServerError, TritonServer, find_tritonserver

__all__ = ["ServerError", "TritonServer", "find_tritonserver", "write_repository"]
