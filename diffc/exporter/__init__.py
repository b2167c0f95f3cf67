"""Export: diffusers pipeline folder -> one ONNX graph per component, checked against PyTorch.

torch, diffusers and transformers are imported here and nowhere else in diffc (install the ``export``
extra). This ``__init__`` stays light: the heavy modules load on first use.
"""

from __future__ import annotations

from diffc.exporter.source import SUPPORTED_PIPELINES, ModelSource, inspect_model

__all__ = ["SUPPORTED_PIPELINES", "ModelSource", "export_pipeline", "inspect_model"]


def export_pipeline(*args, **kwargs):
    from diffc.exporter.export import export_pipeline as _export

    return _export(*args, **kwargs)
