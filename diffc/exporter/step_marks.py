"""Step-cache marks: the denoiser exported with its first block's results as extra graph outputs.

Dynamic step caching (:mod:`diffc.passes.step_cache`) cuts the denoiser into a *head* (embeddings + the first
block) and a *tail* (the rest). As with the DeepCache marks (``diffc.exporter.contracts._CacheMarkedUNet``), the
boundary is captured here with forward hooks on the diffusers modules and exported as named graph outputs, so the
cut is found by name on graphs from either torch exporter and after any graph pass, and no node name is guessed:

* ``step_cache_<k>``: every tensor the rest of the denoiser reads from the first block. UNet
  (``UNet2DConditionModel.forward``): ``conv_in``'s output (the first skip feature) and every ``res_samples``
  tensor of ``down_blocks[0]`` (its last one is the block's output). Transformer: every tensor ``transformer_blocks[0]``
  returns (SD3 / FLUX joint blocks: the text and the image stream; PixArt / Sana: the image stream).
* ``step_cache_decision``: what the run-time rule compares from step to step. UNet: the first down block's output
  (its last ``res_samples`` tensor); transformer: the first block's residual on the image stream (block output
  minus block input, as first-block caching does; the image stream is the last returned tensor of the input's shape).

The time / text embeddings are not marked: the tail recomputes them from the denoiser's own inputs (they are a few
small matmuls), which keeps the cut to tensors the first block produces.
"""

from __future__ import annotations

import dataclasses

import torch

from diffc.errors import ExportError
from diffc.exporter.unet_blocks import feature_dims

#: output names (diffc.passes.step_cache reads the same names)
MARK_PREFIX = "step_cache_"
DECISION = "step_cache_decision"


def first_block(module: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """``("unet", down_blocks[0])`` or ``("transformer", transformer_blocks[0])``."""
    if hasattr(module, "down_blocks") and hasattr(module, "conv_in"):
        return "unet", module.down_blocks[0]
    blocks = getattr(module, "transformer_blocks", None)
    if blocks is not None and len(blocks):
        return "transformer", blocks[0]
    raise ExportError(f"{type(module).__name__} has neither UNet down blocks nor transformer blocks; dynamic step "
                      "caching ([savings.step_cache]) cuts after the first one. Build without it")


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    out: list[torch.Tensor] = []
    for item in output:
        out.extend(_tensors(item) if isinstance(item, (tuple, list)) else
                   [item] if isinstance(item, torch.Tensor) else [])
    return out


class _StepMarked(torch.nn.Module):
    """Wraps a contract's module wrapper: returns ``(out, step_cache_decision, step_cache_0, ...)``."""

    def __init__(self, wrapped: torch.nn.Module, denoiser: torch.nn.Module):
        super().__init__()
        self.wrapped = wrapped
        self.kind, self.block = first_block(denoiser)
        self.conv_in = denoiser.conv_in if self.kind == "unet" else None

    def forward(self, *inputs):
        captured: dict[str, object] = {}

        def block_pre(module, args, kwargs):
            captured["in"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def block_post(module, args, output):
            captured["block"] = output

        def conv_post(module, args, output):
            captured["conv_in"] = output

        handles = [self.block.register_forward_pre_hook(block_pre, with_kwargs=True),
                   self.block.register_forward_hook(block_post)]
        if self.conv_in is not None:
            handles.append(self.conv_in.register_forward_hook(conv_post))
        try:
            out = self.wrapped(*inputs)
        finally:
            for h in handles:
                h.remove()
        if self.kind == "unet":
            # DownBlock2D / CrossAttnDownBlock2D return (hidden_states, res_samples); the UNet appends res_samples
            # to the skip features after conv_in's output
            hidden, res = captured["block"]
            marks = [captured["conv_in"], *_tensors(res)]
            decision = hidden
        else:
            marks = _tensors(captured["block"])
            x_in = captured["in"]
            image = [t for t in marks if t.shape == x_in.shape]
            if not image:
                raise ExportError("the first transformer block returns no tensor of its input's shape; dynamic step "
                                  "caching cannot find its image stream. Build without [savings.step_cache]")
            decision = image[-1] - x_in
        return (out, decision, *marks)


def mark_count(module: torch.nn.Module) -> int:
    """How many ``step_cache_<k>`` tensors the first block hands on (counted the way :class:`_StepMarked` does)."""
    kind, block = first_block(module)
    if kind == "unet":
        return 1 + len(block.resnets) + (len(block.downsamplers) if getattr(block, "downsamplers", None) else 0)
    # SD3 / FLUX joint blocks return (text stream, image stream); PixArt / Sana blocks the image stream
    return 2 if type(block).__name__ in ("JointTransformerBlock", "FluxTransformerBlock") else 1


def mark_contract(contract, module: torch.nn.Module):
    """``contract`` (the UNet's or the transformer's) with the step-cache marks as extra outputs. A UNet's marks
    carry the latent's axis names (the downsampler's output at half size); a transformer's token axes are left
    to the exported graph (their names are not dynamic-axis names), and :mod:`diffc.passes.step_cache` names every
    non-channel axis of a cut tensor symbolically, so the head and tail take any size the denoiser takes."""
    from diffc.exporter.contracts import BATCH, HEIGHT, WIDTH, TensorSpec

    kind, block = first_block(module)
    count = mark_count(module)
    if kind == "unet":
        c0 = int(module.config.block_out_channels[0])
        full, half = (BATCH, c0, HEIGHT, WIDTH), (BATCH, c0, *feature_dims(1))
        dims = [full] * (1 + len(block.resnets)) + [half] * (count - 1 - len(block.resnets))
        decision = dims[-1]
    else:
        dims = [(BATCH, f"tokens_{k}", f"hidden_{k}") for k in range(count)]
        decision = (BATCH, "tokens", "hidden")
    extra = (TensorSpec(DECISION, "float32", decision),
             *(TensorSpec(f"{MARK_PREFIX}{k}", "float32", d) for k, d in enumerate(dims)))
    inner = contract.wrap
    return dataclasses.replace(contract, outputs=(*contract.outputs, *extra),
                               wrap=lambda m: _StepMarked(inner(m), m),
                               extra={**contract.extra, "step_marks": count})
