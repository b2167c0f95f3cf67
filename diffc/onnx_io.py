"""Saving ONNX models the way every backend downstream can read them.

Two problems this module exists for:

* onnx 1.23 stamps IR version 14 on new models, but onnxruntime 1.31 reads at most IR 13. We save with the
  lowest IR version that supports the opsets the graph imports (from onnx's own version table), which every
  runtime new enough for those opsets accepts.
* The legacy torch exporter writes one external-data file per tensor for models over 2 GB. We always load
  and re-save, so a component is ``model.onnx`` plus at most one ``model.onnx.data``.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx.helper

#: protobuf cannot serialize messages past 2 GiB; above this many weight bytes we write external data
EXTERNAL_DATA_THRESHOLD = 1 << 30
DATA_SUFFIX = ".data"


def min_ir_version(model: onnx.ModelProto) -> int:
    """The lowest IR version whose release supports every opset the model imports."""
    ir = 3
    for opset in model.opset_import:
        if opset.domain not in ("", "ai.onnx"):
            continue
        candidates = [row[1] for row in onnx.helper.VERSION_TABLE if row[2] >= opset.version]
        if candidates:
            ir = max(ir, min(candidates))
    return ir


def weight_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in init.external_data if e.key == "length"), 0))
        else:
            total += len(init.raw_data) or onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize * int(
                _numel(init.dims)
            )
    return total


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external: bool | None = None) -> Path:
    """Save ``model`` at ``path`` with a readable IR version, weights in one ``.data`` file when large.

    ``external=None`` decides by size; ``True`` forces one external data file (used when two graphs share
    weights on disk).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.ir_version = min_ir_version(model)
    if external is None:
        external = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_path = path.with_name(path.name + DATA_SUFFIX)
    if data_path.exists():
        data_path.unlink()
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return path


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=load_external_data)
