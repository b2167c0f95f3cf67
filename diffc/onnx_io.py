"""Saving ONNX models the way every backend downstream can read them.

Two problems this module exists for:

* onnx 1.23 stamps IR version 14 on new models, but onnxruntime 1.31 reads at most IR 13. We save with the
  lowest IR version that supports the opsets the graph imports (from onnx's own version table), which every
  runtime new enough for those opsets accepts.
* The legacy torch exporter writes one external-data file per tensor for models over 2 GB. We always load
  and re-save, so a component is ``model.onnx`` plus at most one ``model.onnx.data``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import onnx
import onnx.helper
from onnx import numpy_helper

#: protobuf cannot serialize messages past 2 GiB; above this many weight bytes we write external data
EXTERNAL_DATA_THRESHOLD = 1 << 30
DATA_SUFFIX = ".data"


def min_ir_version(model: onnx.ModelProto) -> int:
    """The lowest IR version whose release supports every opset the model imports."""
    return _min_ir_version({o.domain: o.version for o in model.opset_import})


def _min_ir_version(opsets: dict[str, int]) -> int:
    ir = 3
    for domain, version in opsets.items():
        if domain not in ("", "ai.onnx"):
            continue
        candidates = [row[1] for row in onnx.helper.VERSION_TABLE if row[2] >= version]
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


def save_ir_model(model: Any, path: str | os.PathLike, *, external: bool | None = None) -> Path:
    """:func:`save_model` for an ``onnx_ir`` model (the build's stages hold one ``ir.Model`` through their passes
    and write it once): the same readable IR version and the same weights layout.

    Weights the model still reads lazily from another file (``ir.load``) are written into this one -- inline, or
    into ``<path>.data`` when large -- so the saved graph never points at a work folder's files; the in-memory
    model keeps reading them from where they were.
    """
    import onnx_ir as ir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.ir_version = _min_ir_version(dict(model.opset_imports))
    if external is None:
        external = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                       if v.const_value is not None) > EXTERNAL_DATA_THRESHOLD
    data_path = path.with_name(path.name + DATA_SUFFIX)
    if external:
        ir.save(model, str(path), external_data=data_path.name, size_threshold_bytes=1024)
        return path
    if data_path.exists():
        data_path.unlink()
    lazy = {name: v.const_value for name, v in model.graph.initializers.items()
            if isinstance(v.const_value, ir.ExternalTensor)}
    try:  # inline: read the lazy weights for this save only
        for name, tensor in lazy.items():
            model.graph.initializers[name].const_value = ir.Tensor(tensor.numpy(), name=tensor.name)
        ir.save(model, str(path))
    finally:
        for name, tensor in lazy.items():
            model.graph.initializers[name].const_value = tensor
    return path


def save_models_sharing_data(models: dict[Path, onnx.ModelProto], data_path: str | os.PathLike, *,
                             size_threshold: int = 1024, align: int = 4096) -> dict[str, int]:
    """Save several graphs so that one external data file holds every large initializer of all of them once.

    Two graphs cut from one model (diffc's full and shallow UNet) share most weights: a tensor whose bytes were
    already written is pointed at by offset instead of being written again, whatever its name. Every model must
    live in the data file's folder (runtimes resolve external data relative to the model and refuse paths that
    leave its folder). Offsets are ``align``-aligned so backends can map tensors straight from the file.
    The models are modified (their tensors now point into the file). Returns tensor and byte counts.
    """
    data_path = Path(data_path)
    for path in models:
        if Path(path).parent.resolve() != data_path.parent.resolve():
            raise ValueError(f"{path} is not in {data_path.parent}: external data must sit next to its graph")
    data_path.parent.mkdir(parents=True, exist_ok=True)
    written: dict[bytes, tuple[int, int]] = {}
    stats = {"tensors": 0, "shared": 0, "bytes_written": 0, "bytes_referenced": 0}
    tmp = data_path.with_name(data_path.name + ".tmp")
    with open(tmp, "wb") as f:
        for model in models.values():
            for tensor in model.graph.initializer:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    raise ValueError(f"initializer {tensor.name} still points to external data; load the model with "
                                     "its external data first")
                raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
                if len(raw) < size_threshold:
                    continue
                key = hashlib.sha256(raw).digest()
                stats["tensors"] += 1
                stats["bytes_referenced"] += len(raw)
                if key in written:
                    stats["shared"] += 1
                else:
                    offset = f.tell()
                    if offset % align:
                        f.write(b"\0" * (align - offset % align))
                        offset = f.tell()
                    f.write(raw)
                    written[key] = (offset, len(raw))
                    stats["bytes_written"] += len(raw)
                offset, length = written[key]
                dtype, dims, name = tensor.data_type, list(tensor.dims), tensor.name
                tensor.Clear()
                tensor.name, tensor.data_type = name, dtype
                tensor.dims.extend(dims)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
    os.replace(tmp, data_path)
    for path, model in models.items():
        model.ir_version = max(model.ir_version, min_ir_version(model))
        onnx.save_model(model, str(path))
    return stats


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=load_external_data)
