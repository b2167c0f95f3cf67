"""Target-ops check: refuse graphs holding ops the target backend cannot run.

Why: onnxruntime loads a graph with a CUDA-only contrib op (``GroupNorm``, ``SkipGroupNorm``,
``BiasSplitGelu``, ``NhwcConv``, packed-QKV attention ...) only to fail at session creation on a CPU-only
machine -- or, worse, on the *user's* machine after the artifact shipped. onnxruntime's own SD optimizer emits
exactly these ops by default. This pass never changes the graph; it raises :class:`PassError` at build time,
naming the ops and what to do, and runs last so it also catches what an input graph brought in.

* ``onnxruntime`` (CPU provider): ONNX-domain ops, plus the ``com.microsoft`` ops in :data:`ORT_CPU_CONTRIB`
  (ops onnxruntime registers a CPU kernel for and that diffc may emit or meet); anything else from a
  non-ONNX domain is refused. ``MultiHeadAttention`` must have separate Q/K/V (packed QKV is CUDA-only).
* ``tensorrt`` / ``tensorrt_rtx`` / ``openvino``: ONNX-domain ops only -- their ONNX readers know no
  onnxruntime contrib ops (OpenVINO's knows a few, not the ones diffc would emit) -- and not the ops onnxruntime
  registers in the ONNX domain itself (:data:`ORT_ONNX_DOMAIN_OPS`: ``SimplifiedLayerNormalization``).
"""

from __future__ import annotations

import collections
import logging

import onnx_ir as ir

from diffc.engines import get_backend
from diffc.passes import TARGETS
from diffc.passes._base import MS_DOMAIN, DiffcPass, PassError, PassOptionError

log = logging.getLogger("diffc.passes.check_ops")

#: contrib ops with a CPU kernel in onnxruntime (subset that diffusion graphs meet)
ORT_CPU_CONTRIB = frozenset({
    "MultiHeadAttention", "Attention", "QuickGelu", "Gelu", "FastGelu", "BiasGelu", "FusedMatMul",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupQueryAttention", "RotaryEmbedding",
    "MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "FusedConv", "NchwcConv",
})
#: ops onnxruntime registers in the *ONNX* domain that ONNX does not define: legal on onnxruntime only (the
#: others' ONNX readers know no such op), though their domain looks standard
ORT_ONNX_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})
#: contrib ops onnxruntime implements for CUDA/ROCm/DML only, which SD optimizers like to emit
CUDA_ONLY_CONTRIB = frozenset({
    "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv", "PackedAttention",
    "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention", "DecoderMaskedSelfAttention",
    "GemmFastGelu", "BiasDropout", "RemovePadding", "RestorePadding",
})


class CheckTargetOpsPass(DiffcPass):
    """Raise if the graph holds ops the target cannot run. It never rewrites, so nothing fires and ``modified`` is
    always False; what it saw is in :attr:`found` (``contrib_ops``: contrib nodes, all legal)."""

    name = "check_ops"
    needs_shapes = False

    def __init__(self, *, target: str) -> None:
        super().__init__()
        if target not in TARGETS:
            raise PassOptionError(f"target must be one of {list(TARGETS)}, got {target!r}")
        self.target = target
        #: onnxruntime's CPU contrib ops and its ONNX-domain extras are legal (the backend's ``contrib_ops``)
        self.contrib = get_backend(target).contrib_ops

    def run(self, model: ir.Model) -> dict[str, int]:
        bad: collections.Counter[str] = collections.Counter()
        contrib = 0
        for node in model.graph.all_nodes():
            domain = node.domain or ""
            if domain in ("", "ai.onnx"):
                if not self.contrib and node.op_type in ORT_ONNX_DOMAIN_OPS:
                    bad[f"{node.op_type} (onnxruntime-only)"] += 1
                continue
            key = f"{domain}::{node.op_type}"
            if not self.contrib:
                bad[key] += 1
            elif domain != MS_DOMAIN or node.op_type not in ORT_CPU_CONTRIB:
                bad[key] += 1
            elif node.op_type == "MultiHeadAttention" and (len(node.inputs) < 3 or node.inputs[1] is None
                                                           or node.inputs[2] is None):
                bad[f"{key} (packed QKV)"] += 1
            else:
                contrib += 1
        if bad:
            listing = ", ".join(f"{k} x{v}" for k, v in sorted(bad.items()))
            if self.contrib:
                cuda = sorted(k for k in bad if k.split("::")[-1].split(" ")[0] in CUDA_ONLY_CONTRIB)
                why = (f"{', '.join(cuda)} run on CUDA only; " if cuda else "") + \
                    "onnxruntime's CPU provider has no kernel for these"
            else:
                why = f"{self.target} cannot parse contrib (non-ONNX-domain) ops or onnxruntime-only ones"
            raise PassError(
                f"the graph holds ops the {self.target} target cannot run: {listing} ({why}). Export the model "
                "with diffc (not a graph optimized for another backend), or disable the pass that emitted them"
            )
        self.found = {"contrib_ops": contrib}
        return {}
