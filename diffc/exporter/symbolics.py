"""ONNX symbolics for ATen ops that torch's TorchScript exporter lacks or gets wrong, registered once per process.

They are part of the exporter's op coverage (every component goes through
:func:`diffc.exporter.export.export_component`, which calls :func:`register_onnx_symbolics`), needed first by
the transformer families (diffc.exporter.dit): FLUX's QK RMSNorm and the DC-AE autoencoder of Sana.
"""

from __future__ import annotations

import torch

_REGISTERED = False


def register_onnx_symbolics() -> None:
    """Teach torch's TorchScript ONNX exporter two ATen ops these models hit (idempotent, process-wide):

    * ``aten::rms_norm`` (FLUX's ``torch.nn.RMSNorm`` QK-norm) has no ONNX symbolic at opset 21; it becomes
      ``x / sqrt(mean(x^2) + eps) * w`` in fp32, the pattern onnxruntime's and OpenVINO's RMSNorm fusions match.
    * ``aten::movedim`` (DC-AE's channels-last norms) is exported as a ``Transpose`` with *negative* ``perm``
      entries, which onnxruntime and the ONNX checker reject; here the dims are normalized by the input's rank.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    def rms_norm(g, x, normalized_shape, weight, eps):
        dims = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
        eps_value = symbolic_helper._maybe_get_const(eps, "f")
        if eps_value is None or symbolic_helper._is_none(eps):
            eps_value = float(torch.finfo(torch.float32).eps)  # F.rms_norm's default
        axes = g.op("Constant", value_t=torch.tensor(list(range(-len(dims), 0)), dtype=torch.int64))
        square = g.op("Pow", x, g.op("Constant", value_t=torch.tensor(2.0)))
        mean = g.op("ReduceMean", square, axes, keepdims_i=1)
        denom = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(float(eps_value)))))
        out = g.op("Div", x, denom)
        return out if symbolic_helper._is_none(weight) else g.op("Mul", out, weight)

    def _const_dims(value) -> list[int] | None:
        """An int or int-list argument as a list (``movedim.int`` and ``movedim.intlist``), None if not constant."""
        if not symbolic_helper._is_constant(value):
            return None
        const = symbolic_helper._maybe_get_const(value, "t")
        if isinstance(const, torch.Tensor):
            return [int(v) for v in const.reshape(-1).tolist()]
        return [int(v) for v in const] if isinstance(const, (list, tuple)) else [int(const)]

    def movedim(g, x, source, destination):
        rank = symbolic_helper._get_tensor_rank(x)
        src, dst = _const_dims(source), _const_dims(destination)
        if rank is None or src is None or dst is None:
            return symbolic_helper._unimplemented("movedim", "needs a known rank and constant dims", x)
        src, dst = [d % rank for d in src], [d % rank for d in dst]
        # torch.movedim: the moved dims land at `dst`, the others keep their order in the remaining slots
        perm: list[int | None] = [None] * rank
        for s_, d_ in zip(src, dst):
            perm[d_] = s_
        rest = iter(d for d in range(rank) if d not in src)
        perm = [p if p is not None else next(rest) for p in perm]
        return g.op("Transpose", x, perm_i=perm)

    register_custom_op_symbolic("aten::rms_norm", rms_norm, 18)  # ReduceMean takes axes as an input from 18
    register_custom_op_symbolic("aten::movedim", movedim, 9)
    _REGISTERED = True
