"""The torch-free runtime: load an artifact and run its fixed few-step loop.

Imports numpy, onnxruntime (through :mod:`diffc.engines`), tokenizers and Pillow only; a test checks that
neither torch, diffusers, transformers nor tensorrt end up in ``sys.modules``.
"""

from diffc.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, read_manifest, verify_files
from diffc.runtime.pipeline import Pipeline, load, save_png, to_uint8

__all__ = ["MANIFEST_NAME", "SCHEMA_VERSION", "Pipeline", "load", "read_manifest", "save_png", "to_uint8",
           "verify_files"]
