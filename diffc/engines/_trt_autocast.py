"""fp32 graph -> fp16 graph for a strongly typed TensorRT build.

Why this exists: TensorRT-RTX (and TensorRT from 11.0; 10.12 deprecated the alternative) builds *strongly
typed* networks only: a tensor's type is the type the ONNX graph gives it, and there is no ``FP16`` builder
flag that lets the builder pick fp16 kernels for an fp32 graph. So "build this component in fp16" means
"give TensorRT an fp16 graph". NVIDIA's recommended tool for that is ModelOpt AutoCast; diffc uses
onnxruntime's ``float16`` converter instead because onnxruntime is already a base dependency.

What stays fp32, and why:

* graph inputs and outputs (``keep_io_types``): the runtime feeds and reads float32 whatever the backend, and
  the engine's first/last layers absorb the casts;
* normalizations (``LayerNormalization``, ``InstanceNormalization``, ``GroupNormalization``): their mean and
  variance over a whole channel group overflow or lose precision in fp16 at SD activation magnitudes (the
  well-known fp16 VAE NaNs); TensorRT fuses the casts around them, so the cost is small;
* onnxruntime's default block list (``Range``, ``CumSum``, ``TopK`` ... ops with integer-like semantics);
* the *shape subgraph*: every node computed only from ``Shape`` / ``Size`` outputs and constants
  (:func:`shape_subgraph`). TensorRT evaluates such values on the host as shape tensors and refuses fp16 ones
  (``ShapeHostToDeviceCopy: output type must be kINT32, kINT64, kBOOL, or kFLOAT``). PixArt's sin-cos position
  table is the case in point: ``Shape -> Div -> Cast(float) -> Range -> ... -> Sin/Cos`` from the image size.
  Blocking those nodes alone is not enough: the converter still gives every float value between two blocked
  nodes an fp16 round trip (``Cast(fp16) -> Cast(fp32)``), which :func:`_drop_round_trips` removes again.

This is an edge conversion like Polygraphy's ``to_trt``: it only runs inside the TensorRT backend, on a temp
copy, and the artifact records ``autocast: "fp16"``. (When diffc grows an AutoCast pass in ``passes/``, this
module becomes that pass's caller.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("diffc.engines.tensorrt")

#: ops kept in fp32 on top of onnxruntime's DEFAULT_OP_BLOCK_LIST (see the module docstring for why)
FP32_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization")
#: ops whose outputs are shape tensors by definition: the seeds of :func:`shape_subgraph`
SHAPE_SOURCES = ("Shape", "Size")
#: bumped whenever the conversion's output changes for the same input: part of the engine cache key
#: (2: the shape subgraph stays fp32, fp32 -> fp16 -> fp32 round trips removed)
AUTOCAST_VERSION = 2


def autocast_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, int]:
    """Write an fp16 copy of ``src`` (fp32 I/O, normalizations and shape subgraph) to ``dst``, weights in
    ``dst.data``.

    Returns counts for the build report: nodes in the graph, normalizations left in fp32, shape-subgraph nodes
    left in fp32, Cast nodes inserted.
    """
    import onnx

    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError as e:  # the module ships with every onnxruntime wheel since 1.8
        from diffc.errors import BackendUnavailableError

        raise BackendUnavailableError(f"the fp16 conversion needs onnxruntime.transformers ({e}); reinstall "
                                      "onnxruntime: pip install -U onnxruntime") from e

    src, dst = Path(src), Path(dst)
    before = onnx.load(str(src), load_external_data=False)
    n_before = len(before.graph.node)
    casts_before = sum(n.op_type == "Cast" for n in before.graph.node)
    shape_nodes = shape_subgraph(before.graph)
    source: str | onnx.ModelProto = str(src)
    if any(not n.name for n in shape_nodes):
        # The converter blocks nodes by name: give the nameless ones one. In core, so > 2 GB graphs need named
        # nodes; diffc's passes and torch.onnx name every node, so this is for hand-made graphs.
        source = onnx.load(str(src))
        _name_nodes(source.graph)
        shape_nodes = shape_subgraph(source.graph)
    node_block = [n.name for n in shape_nodes]
    del before
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))
    # A path (not a ModelProto) lets the converter run shape inference out of core: graphs > 2 GB work.
    # Older onnxruntime logs every blocked node at WARNING; that is expected here, not news.
    ort_log = logging.getLogger("onnxruntime.transformers.float16")
    level = ort_log.level
    ort_log.setLevel(logging.ERROR)
    try:
        model = convert_float_to_float16(source, keep_io_types=True, op_block_list=block, node_block_list=node_block)
    finally:
        ort_log.setLevel(level)
    del source
    _drop_repeated_casts(model.graph)
    _drop_round_trips(model.graph)
    _toposort(model.graph)  # the converter appends its Cast nodes at the end
    onnx.helper.set_model_props(model, {**{m.key: m.value for m in model.metadata_props}, "diffc.autocast": "fp16"})
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = dst.with_name(dst.name + ".data")
    if data.exists():
        data.unlink()
    # Always external: a > 2 GB protobuf cannot be written inline, and TensorRT's parser reads either form.
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)
    kept = sum(n.op_type in FP32_OPS for n in model.graph.node)
    casts = sum(n.op_type == "Cast" for n in model.graph.node) - casts_before
    log.debug("autocast fp16: %d nodes, %d kept fp32, %d shape-subgraph nodes kept fp32, %d casts inserted",
              n_before, kept, len(node_block), casts)
    return {"nodes": n_before, "kept_fp32": kept, "shape_nodes": len(node_block), "casts_inserted": casts}


def shape_subgraph(graph) -> list:
    """The nodes of ``graph`` that compute shape tensors, in graph order: ``Shape`` / ``Size`` nodes, and every
    node whose inputs are all outputs of such nodes or constants (initializers, ``Constant`` outputs), with at
    least one of the former. This is the data-flow definition TensorRT uses for what it evaluates on the host.

    A node that also reads an activation (a ``Reshape`` of hidden states by a computed shape) is not in the set:
    only its shape operand is. Nodes with subgraphs (``If`` / ``Loop``) are left out: their bodies may read outer
    activations. ``graph`` must be topologically sorted (ONNX requires it).
    """
    import onnx

    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx") for o in n.output}
    shaped: set[str] = set()
    found = []
    for node in graph.node:
        if node.op_type in SHAPE_SOURCES and node.domain in ("", "ai.onnx"):
            shaped.update(node.output)
            found.append(node)
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        inputs = [i for i in node.input if i]
        if any(i in shaped for i in inputs) and all(i in shaped or i in constants for i in inputs):
            shaped.update(node.output)
            found.append(node)
    return found


def _name_nodes(graph) -> None:
    """Give every nameless node a name unique in ``graph`` (the converter's ``node_block_list`` is by name)."""
    taken = {n.name for n in graph.node}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"diffc_autocast_{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _drop_round_trips(graph) -> None:
    """Let fp32 values reach fp32 consumers without passing through fp16, and make the declared types true.

    The converter casts the fp32 output of every blocked node to fp16 and back before each blocked consumer
    (``x -> Cast(to=fp16) -> Cast(to=fp32)``), so a value flowing between two fp32 nodes (inside the shape
    subgraph, or a normalization feeding another) still passes through fp16: it loses precision, and TensorRT
    sees an fp16 shape tensor. It also declares fp16 ``value_info`` for initializers that it leaves fp32 (those
    only blocked nodes read), which the onnx checker refuses, and casts them to fp32 again. Here a ``Cast(to=fp32)``
    whose source is already fp32, directly or through one ``Cast(to=fp16)``, is bypassed: its readers take the
    fp32 source. Casts nobody reads afterwards go; graph outputs keep their producers.
    """
    import onnx

    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16

    def to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None)

    initializers = {t.name: t.data_type for t in graph.initializer}
    stale = [v for v in graph.value_info if v.name in initializers]  # an initializer declares its own type
    for v in stale:
        graph.value_info.remove(v)
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update(initializers)
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    bypassed = set()
    for node in graph.node:
        if node.op_type != "Cast" or to(node) != F32 or node.output[0] in outputs:
            continue
        source = node.input[0]
        if types.get(source) != F32:
            first = producer.get(source)
            if first is None or first.op_type != "Cast" or to(first) != F16 or types.get(first.input[0]) != F32:
                continue
            bypassed.add(first.output[0])
            source = first.input[0]
        rename[node.output[0]] = source
        bypassed.add(node.output[0])
    if not rename:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    read = {i for n in graph.node for i in n.input} | outputs
    dropped = {o for o in bypassed if o not in read}
    keep = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] in dropped)]
    del graph.node[:]
    graph.node.extend(keep)
    stale = [v for v in graph.value_info if v.name in dropped]
    for v in stale:
        graph.value_info.remove(v)


def _drop_repeated_casts(graph) -> None:
    """The converter inserts one ``Cast`` per consumer of a shared fp32-only input, all with the same output
    name (e.g. the ``scales`` constant that diffc's cleanup merged for every ``Resize``); TensorRT refuses a graph
    whose output names repeat. Identical copies are dropped: the first one feeds every consumer."""
    seen: dict[str, bytes] = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Cast" and len(node.output) == 1:
            key = node.SerializeToString()
            if seen.get(node.output[0]) == key:
                continue
            seen.setdefault(node.output[0], key)
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _toposort(graph) -> None:
    """Reorder ``graph.node`` so every node follows its producers (ONNX requires it; the converter breaks it).

    Stable: nodes keep their original order wherever it is already valid.
    """
    import heapq

    nodes = list(graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    deps = [{producer[x] for x in n.input if x in producer and producer[x] != i} for i, n in enumerate(nodes)]
    users: list[list[int]] = [[] for _ in nodes]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    pending = [len(d) for d in deps]
    ready = [i for i, c in enumerate(pending) if c == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):  # a cycle cannot come from the converter; leave such a graph as it was
        return
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
