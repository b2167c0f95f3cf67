"""The torch-free runtime: load an artifact and run its fixed few-step loop.

Imports numpy, onnxruntime (through :mod:`diffc.engines`), tokenizers and Pillow only; a test checks that
neither torch, diffusers, transformers nor tensorrt end up in ``sys.modules``.
"""

from diffc.runtime.image_io import IMAGE_FORMATS, check_image_path, save_image
from diffc.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, read_manifest, verify_files
from diffc.runtime.pipeline import Pipeline, load, to_uint8

__all__ = ["IMAGE_FORMATS", "MANIFEST_NAME", "SCHEMA_VERSION", "Pipeline", "check_image_path", "load",
           "read_manifest", "save_image", "to_uint8", "verify_files"]
