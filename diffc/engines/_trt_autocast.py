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
* onnxruntime's default block list (``Range``, ``CumSum``, ``TopK`` ... ops with integer-like semantics).

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


def autocast_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, int]:
    """Write an fp16 copy of ``src`` (fp32 I/O and normalizations) to ``dst``, weights in ``dst.data``.

    Returns counts for the build report: nodes in the graph, nodes left in fp32, Cast nodes inserted.
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
    del before
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))
    # A path (not a ModelProto) lets the converter run shape inference out of core: graphs > 2 GB work.
    # Older onnxruntime logs every blocked node at WARNING; that is expected here, not news.
    ort_log = logging.getLogger("onnxruntime.transformers.float16")
    level = ort_log.level
    ort_log.setLevel(logging.ERROR)
    try:
        model = convert_float_to_float16(str(src), keep_io_types=True, op_block_list=block)
    finally:
        ort_log.setLevel(level)
    _drop_repeated_casts(model.graph)
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
    log.debug("autocast fp16: %d nodes, %d kept fp32, %d casts inserted", n_before, kept, casts)
    return {"nodes": n_before, "kept_fp32": kept, "casts_inserted": casts}


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
