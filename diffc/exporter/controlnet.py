"""ControlNet export: each ControlNet as its own graph, and the UNet with the residual inputs it adds to.

``StableDiffusionControlNetPipeline`` runs, per step, every ControlNet on the (scaled) latents, the timestep, the
text states and its control image, scales its down / mid residuals by ``conditioning_scale`` and sums them over
the ControlNets; the UNet adds them to its skip features and its mid block output
(``down_block_additional_residuals``, ``mid_block_additional_residual``). diffc exports:

* ``controlnet``, ``controlnet_1``, ... (the folders diffusers' ``MultiControlNetModel`` is saved in): inputs
  ``sample``, ``timestep``, ``encoder_hidden_states``, ``controlnet_cond`` (the control image, RGB in [0, 1] at
  the output's pixel size) [+ SDXL's ``text_embeds``, ``time_ids``]; outputs the residuals named by
  :func:`diffc.exporter.unet_blocks.control_residuals` at ``conditioning_scale`` 1.
* ``unet`` of a ControlNet pipeline: the plain UNet's inputs plus one input per residual (same names). The plain
  pipelines' UNet export is unchanged: the UNet gets these inputs only when :func:`mark_controlled` marked it.

Why the scale is not a graph input: it changes per step (``control_guidance_start`` / ``end`` zero it outside
their window, and the runtime then skips that ControlNet's engine altogether), and several ControlNets' residuals
are summed on the host anyway, so the runtime multiplies each residual by its scale while summing (one
multiply-add per element of tensors far smaller than the ControlNet's work). The graphs stay free of a scalar input
that every backend would need a shape profile for, and one engine serves every scale.
"""

from __future__ import annotations

import dataclasses
import re
import weakref

import torch

from diffc.errors import ModelError, UnsupportedPipelineError
from diffc.exporter.contracts import (BATCH, HEIGHT, IMAGE_HEIGHT, IMAGE_WIDTH, SEQUENCE, WIDTH, Contract, SampleShape,
                                      TensorSpec, _text_embeds_dim, _unet_inputs, _UNet, unet_contract)
from diffc.exporter.unet_blocks import control_residuals, feature_dims

__all__ = ["CONTROL_INPUT", "controlnet_contract", "controlled_unet_contract", "is_controlled", "is_controlnet",
           "mark_controlled", "module_of"]

#: the control image's input name (diffusers' argument name)
CONTROL_INPUT = "controlnet_cond"
_NAME = re.compile(r"controlnet(_[1-9][0-9]*)?")
#: UNets of pipelines that have a ControlNet (exported with the residual inputs); weak, so a pipeline is freed
_CONTROLLED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def is_controlnet(name: str) -> bool:
    """Whether ``name`` is a ControlNet component (``controlnet``, ``controlnet_1``, ...)."""
    return bool(_NAME.fullmatch(name))


def mark_controlled(pipe) -> None:
    """Mark the UNet of a pipeline with a ControlNet, so its contract takes the residual inputs; refuse a
    ControlNet diffc cannot reproduce."""
    if getattr(pipe, "controlnet", None) is None:
        return
    for net in _nets(pipe):
        if net.config.get("global_pool_conditions"):
            raise UnsupportedPipelineError(
                "this ControlNet has global_pool_conditions (e.g. the shuffle ControlNet), which diffusers runs "
                "in guess mode only; diffc builds ControlNets without guess mode: use another ControlNet")
    _CONTROLLED.add(pipe.unet)


def is_controlled(unet: torch.nn.Module | None) -> bool:
    return unet is not None and unet in _CONTROLLED


def _nets(pipe) -> list[torch.nn.Module]:
    cn = pipe.controlnet
    return list(cn.nets) if hasattr(cn, "nets") else [cn]


def module_of(pipe, name: str) -> torch.nn.Module:
    """The ControlNet module of component ``name`` (``controlnet_k`` is the ``k``-th of a MultiControlNetModel)."""
    nets = _nets(pipe) if getattr(pipe, "controlnet", None) is not None else []
    k = 0 if name == "controlnet" else int(name.rsplit("_", 1)[1])
    if k >= len(nets):
        raise ModelError(f"the pipeline has {len(nets)} ControlNet(s), so no component {name!r}")
    return nets[k].eval()


def _residual_specs(unet_cfg) -> list[TensorSpec]:
    specs = []
    for r in control_residuals(dict(unet_cfg)):
        h, w = (HEIGHT, WIDTH) if r["level"] == 0 else feature_dims(r["level"])
        specs.append(TensorSpec(r["name"], "float32", (BATCH, r["channels"], h, w)))
    return specs


def _added(cfg) -> list[TensorSpec]:
    if cfg.get("addition_embed_type") == "text_time":
        return [TensorSpec("text_embeds", "float32", (BATCH, _text_embeds_dim(cfg))),
                TensorSpec("time_ids", "float32", (BATCH, 6))]
    if cfg.get("addition_embed_type") is not None:
        raise UnsupportedPipelineError(f"ControlNet addition_embed_type={cfg.addition_embed_type!r} is not supported; "
                                       "diffc exports SD 1.x / 2.x and SDXL ('text_time') ControlNets")
    return []


def _image_factor(cfg) -> int:
    """Pixels per latent side the conditioning embedding downsamples by (one stride-2 conv per width step)."""
    return 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)


class _ControlNet(torch.nn.Module):
    """``ControlNetModel`` at ``conditioning_scale`` 1 without guess mode: residuals as a flat tuple."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.text_time = net.config.get("addition_embed_type") == "text_time"

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *extra):
        kwargs = {}
        if self.text_time:
            kwargs["added_cond_kwargs"] = {"text_embeds": extra[0], "time_ids": extra[1]}
        down, mid = self.net(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                             guess_mode=False, return_dict=False, **kwargs)
        return (*down, mid)


class _ControlledUNet(_UNet):
    """:class:`~diffc.exporter.contracts._UNet` whose last inputs are the ControlNet residuals."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__(unet)
        self.residuals = len(control_residuals(dict(unet.config)))

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        extra, res = list(extra[:-self.residuals]), list(extra[-self.residuals:])
        kwargs = {}
        if self.text_time:
            kwargs["added_cond_kwargs"] = {"text_embeds": extra.pop(0), "time_ids": extra.pop(0)}
        if self.timestep_cond:
            kwargs["timestep_cond"] = extra.pop(0)
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=res[:-1],
                         mid_block_additional_residual=res[-1], return_dict=False, **kwargs)[0]


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _residual_inputs(cfg, s: SampleShape, gen) -> list[torch.Tensor]:
    return [_randn(gen, s.batch, r["channels"], s.height // 2 ** r["level"], s.width // 2 ** r["level"])
            for r in control_residuals(dict(cfg))]


def controlled_unet_contract(unet: torch.nn.Module) -> Contract:
    """The UNet of a ControlNet pipeline: :func:`~diffc.exporter.contracts.unet_contract`'s inputs + the residuals."""
    base = unet_contract(unet, controlled=False)

    def make_inputs(module, s: SampleShape, gen):
        return (*_unet_inputs(module, s, gen), *_residual_inputs(module.config, s, gen))

    return dataclasses.replace(base, inputs=(*base.inputs, *_residual_specs(unet.config)), wrap=_ControlledUNet,
                               make_inputs=make_inputs, notes="UNet with ControlNet residual inputs")


def controlnet_contract(net: torch.nn.Module, name: str = "controlnet") -> Contract:
    """One ControlNet: the UNet's first three inputs (+ SDXL's), the control image, the residuals out."""
    cfg = net.config
    dim = cfg.cross_attention_dim
    hidden = dim[0] if isinstance(dim, (list, tuple)) else dim
    added = _added(cfg)

    def make_inputs(module, s: SampleShape, gen):
        c = module.config
        sample = _randn(gen, s.batch, c.in_channels, s.height, s.width)
        timestep = torch.randint(1, 1000, (s.batch,), generator=gen).to(torch.float32)
        states = _randn(gen, s.batch, s.sequence, hidden)
        f = _image_factor(c)
        image = torch.rand(s.batch, c.conditioning_channels, s.height * f, s.width * f, generator=gen)
        extra = []
        if added:
            extra = [_randn(gen, s.batch, _text_embeds_dim(c)),
                     torch.tensor([[s.height * 8.0, s.width * 8.0, 0.0, 0.0, s.height * 8.0, s.width * 8.0]] * s.batch)]
        return (sample, timestep, states, image, *extra)

    inputs = (TensorSpec("sample", "float32", (BATCH, "channels", HEIGHT, WIDTH)),
              TensorSpec("timestep", "float32", (BATCH,)),
              TensorSpec("encoder_hidden_states", "float32", (BATCH, SEQUENCE, "hidden")),
              TensorSpec(CONTROL_INPUT, "float32", (BATCH, int(cfg.conditioning_channels), IMAGE_HEIGHT, IMAGE_WIDTH)),
              *added)
    # the residuals sit on the ControlNet's own blocks, which mirror the UNet's down path
    outputs = tuple(_residual_specs(cfg))
    return Contract(name=name, attribute="controlnet", inputs=inputs, outputs=outputs, wrap=_ControlNet,
                    make_inputs=make_inputs, atol=2e-3, rtol_l2=1e-4,
                    notes="ControlNet residuals at conditioning_scale 1 (the runtime scales and sums them)")
