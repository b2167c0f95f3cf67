"""What the TensorRT backend needs to know about an ONNX graph before it builds: I/O, Q/DQ, weights, a content hash.

Everything here reads the graph with ``load_external_data=False`` (the protobuf only, never the weights), so
planning a build, checking a profile against a graph and hashing it for the build cache cost milliseconds
even for a multi-GB UNet. No TensorRT import: this is the backend-neutral half of the backend.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

#: ONNX elem_type -> numpy dtype name, for the types diffusion graphs carry
_NP_NAMES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64",
             16: "bfloat16", 17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2", 20: "float8_e5m2fnuz",
             21: "uint4", 22: "int4"}
#: quantized ONNX types -> the diffc precision a Q/DQ pair of that type stands for
_QUANT_PRECISION = {3: "int8", 2: "int8", 17: "fp8", 19: "fp8", 22: "int4", 21: "int4"}
_FLOAT_TYPES = {1: "fp32", 10: "fp16", 16: "bf16"}
_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2, 17: 1, 18: 1, 19: 1, 20: 1}


@dataclasses.dataclass(frozen=True)
class GraphInfo:
    """The facts about one ONNX graph that decide how TensorRT builds it."""

    inputs: tuple[dict[str, Any], ...]  # {"name", "dtype", "shape"}; shape items are ints or axis names
    outputs: tuple[dict[str, Any], ...]
    #: precisions of the Q/DQ pairs in the graph ("int8", "fp8", "int4"); empty for an unquantized graph
    quantized: frozenset[str]
    #: float types of the graph's weights ("fp32", "fp16", "bf16") -> bytes of weights of that type
    weight_floats: dict[str, int]
    weight_bytes: int
    op_types: frozenset[str]
    external_files: tuple[str, ...]  # external-data files, relative to the graph's folder

    #: the graph's ``metadata_props`` (diffc marks a graph it converted to fp16 with ``diffc.autocast``)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def has_qdq(self) -> bool:
        return bool(self.quantized)

    @property
    def float_type(self) -> str | None:
        """The float type most weight bytes have ("fp32", "fp16", "bf16"), None for a graph without float weights.

        A converted fp16 graph keeps a few fp32 weights (its normalizations), so this is a majority, not a set.
        """
        return max(self.weight_floats, key=self.weight_floats.get) if self.weight_floats else None


def _dims(value_info) -> list[int | str]:
    out: list[int | str] = []
    for i, d in enumerate(value_info.type.tensor_type.shape.dim):
        if d.dim_param:
            out.append(d.dim_param)
        elif d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:  # dynamic and unnamed: the exporter failed to name it; profiles cannot address it
            out.append(f"?{i}")
    return out


def _spec(v) -> dict[str, Any]:
    t = v.type.tensor_type.elem_type
    return {"name": v.name, "dtype": _NP_NAMES.get(t, f"onnx:{t}"), "shape": _dims(v)}


def inspect_graph(onnx_path: str | os.PathLike) -> GraphInfo:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {}
    for n in g.node:  # zero points may also come as Constant nodes
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t

    quantized: set[str] = set()
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        qtype = None
        for a in n.attribute:
            if a.name == "output_dtype" and a.i:
                qtype = a.i
        if n.op_type == "QuantizeLinear" and qtype is None and len(n.input) > 2 and n.input[2]:
            zp = inits.get(n.input[2]) or consts.get(n.input[2])
            qtype = zp.data_type if zp is not None else None
        if n.op_type == "DequantizeLinear":
            x = inits.get(n.input[0]) or consts.get(n.input[0])
            if x is not None:
                qtype = x.data_type
            elif len(n.input) > 2 and n.input[2]:
                zp = inits.get(n.input[2]) or consts.get(n.input[2])
                qtype = zp.data_type if zp is not None else qtype
        if qtype is None and n.op_type == "QuantizeLinear":
            qtype = 2  # ONNX default when neither a zero point nor output_dtype is given: uint8
        if qtype is not None:
            quantized.add(_QUANT_PRECISION.get(qtype, f"onnx:{qtype}"))

    weight_floats: dict[str, int] = {}
    weight_bytes = 0
    external: list[str] = []
    for t in g.initializer:
        n_el = 1
        for d in t.dims:
            n_el *= int(d)
        nbytes = n_el * _BYTES.get(t.data_type, 4)
        weight_bytes += nbytes
        if t.data_type in _FLOAT_TYPES:
            kind = _FLOAT_TYPES[t.data_type]
            weight_floats[kind] = weight_floats.get(kind, 0) + nbytes
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in external:
                external.append(loc)
    return GraphInfo(
        inputs=tuple(_spec(i) for i in g.input if i.name not in inits),
        outputs=tuple(_spec(o) for o in g.output),
        quantized=frozenset(quantized),
        weight_floats=weight_floats,
        weight_bytes=weight_bytes,
        op_types=frozenset(n.op_type for n in g.node),
        external_files=tuple(external),
        metadata={m.key: m.value for m in model.metadata_props},
    )


def content_hash(onnx_path: str | os.PathLike, info: GraphInfo | None = None, chunk: int = 1 << 22) -> str:
    """sha256 over the graph file and every external-data file it names (name and bytes), in a fixed order."""
    onnx_path = Path(onnx_path)
    info = info or inspect_graph(onnx_path)
    h = hashlib.sha256()
    for rel in (None, *sorted(info.external_files)):
        path = onnx_path if rel is None else onnx_path.parent / rel
        h.update((rel or "<graph>").encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()
