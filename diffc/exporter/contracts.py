"""Export contracts: what each pipeline component looks like as an ONNX graph, declared as data.

A contract names the graph's inputs and outputs, their dtypes and dynamic axes, how to wrap the diffusers
module so that ``forward`` takes exactly those inputs in that order, how to make sample inputs at a given
shape, and the tolerance the exported graph must meet against PyTorch. The exporter and the parity check
read contracts; they know nothing about individual components.

Modelled on optimum's ``OnnxConfig`` classes, kept much smaller: diffc only exports the components of
latent diffusion pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from diffc.exporter.unet_blocks import feature_dims, unet_branches

# Symbolic axis names, shared by all contracts so the runtime and the TensorRT profiles can map them.
BATCH, SEQUENCE, HEIGHT, WIDTH = "batch", "sequence", "height", "width"
IMAGE_HEIGHT, IMAGE_WIDTH = "image_height", "image_width"
#: FLUX's packed-latent token count, (H/2)(W/2) (diffc.exporter.dit)
IMAGE_SEQUENCE = "image_sequence"
#: spatial axes of cached UNet features below the latent resolution (diffc.exporter.unet_blocks.feature_dims)
FEATURE_AXES = frozenset(f"{axis}_div{2 ** level}" for axis in ("height", "width") for level in range(1, 7))
#: only these names become dynamic axes; other string dims (``"channels"``, ``"hidden"``) are static and read
#: off the exported graph
DYNAMIC_AXES = frozenset({BATCH, SEQUENCE, HEIGHT, WIDTH, IMAGE_HEIGHT, IMAGE_WIDTH, IMAGE_SEQUENCE}) | FEATURE_AXES


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    dims: tuple[int | str, ...]  # ints are static, strings are dynamic axis names

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


@dataclass(frozen=True)
class SampleShape:
    """The shape of one sample input set. ``height``/``width`` are latent sizes."""

    batch: int
    height: int
    width: int
    sequence: int


@dataclass(frozen=True)
class Contract:
    name: str
    #: the attribute of the diffusers pipeline that holds the module
    attribute: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrap: Callable[[torch.nn.Module], torch.nn.Module]
    make_inputs: Callable[[torch.nn.Module, SampleShape, torch.Generator], tuple[torch.Tensor, ...]]
    #: max |onnx - torch| allowed, and the relative L2 error allowed (both must hold)
    atol: float = 1e-3
    rtol_l2: float = 1e-4
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {}
        for spec in (*self.inputs, *self.outputs):
            dyn = {i: d for i, d in enumerate(spec.dims) if d in DYNAMIC_AXES}
            if dyn:
                axes[spec.name] = dyn
        return axes

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "atol": self.atol,
            "rtol_l2": self.rtol_l2,
        }


# --------------------------------------------------------------------------------------------- wrappers


class _TextEncoder(torch.nn.Module):
    """CLIP text encoder returning what SD 1.x/2.x (last state) and SDXL (penultimate state, pooled) use."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True)
        # CLIPTextModel -> pooler_output; CLIPTextModelWithProjection -> text_embeds (SDXL's pooled prompt)
        pooled = out.text_embeds if hasattr(out, "text_embeds") and out.text_embeds is not None else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


class _UNet(torch.nn.Module):
    """UNet2DConditionModel with its optional conditionings turned into positional graph inputs."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        cfg = unet.config
        self.text_time = cfg.get("addition_embed_type") == "text_time"
        self.timestep_cond = cfg.get("time_cond_proj_dim") is not None

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        extra = list(extra)
        kwargs = {}
        if self.text_time:
            text_embeds, time_ids = extra.pop(0), extra.pop(0)
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        if self.timestep_cond:
            kwargs["timestep_cond"] = extra.pop(0)
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]


class _CacheMarkedUNet(_UNet):
    """:class:`_UNet` that also returns, per cache branch, the main-branch tensor its up layer concatenates with
    a skip feature (``cache_feature_<m>``, DeepCache numbering: diffc.runtime.cache).

    The tensors are captured with forward hooks on the diffusers modules, so the graph marks them by name
    whichever exporter traces it, and no node name is ever guessed. In ``CrossAttnUpBlock2D`` / ``UpBlock2D``
    layer ``j`` runs ``torch.cat([hidden_states, res_hidden_states])`` on the up block's input (``j == 0``)
    or on what layer ``j - 1`` returned (its attention if the block has attentions, else its resnet). FreeU,
    when enabled, rescales that tensor *after* this point, so a cut here is exact with or without it.
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__(unet)
        self.branches = unet_branches(dict(unet.config))
        self._captured: dict[int, torch.Tensor] = {}

    def _hook_points(self):
        for b in self.branches:
            block = self.unet.up_blocks[b["up_block"]]
            if b["layer"] == 0:
                yield b["branch"], block, True
            else:
                layers = getattr(block, "attentions", None) or block.resnets
                yield b["branch"], layers[b["layer"] - 1], False

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        self._captured = {}
        handles = []

        def capture(branch):
            def pre_hook(module, args, kwargs):
                self._captured[branch] = args[0] if args else kwargs["hidden_states"]

            def post_hook(module, args, output):
                self._captured[branch] = output[0] if isinstance(output, (tuple, list)) else output

            return pre_hook, post_hook

        for branch, module, before in self._hook_points():
            pre, post = capture(branch)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True) if before
                           else module.register_forward_hook(post))
        try:
            out = super().forward(sample, timestep, encoder_hidden_states, *extra)
        finally:
            for h in handles:
                h.remove()
        return (out, *(self._captured[b["branch"]] for b in self.branches))


class _VaeDecoder(torch.nn.Module):
    """Decodes *unscaled* latents (the runtime divides by scaling_factor, as the manifest says)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    """Encodes an image in [-1, 1] to the latent distribution's mean and standard deviation: diffusers' img2img
    pipelines draw ``mean + std * randn`` (``retrieve_latents``' default ``sample_mode="sample"``), and the
    runtime must do the same to reproduce them; ``std`` is computed here, after diffusers' logvar clamp."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        dist = self.vae.encode(sample, return_dict=False)[0]
        return dist.mean, dist.std


# --------------------------------------------------------------------------------------------- inputs


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _text_inputs(module, s: SampleShape, gen):
    vocab = module.config.vocab_size
    ids = torch.randint(0, vocab - 2, (s.batch, s.sequence), generator=gen, dtype=torch.int64)
    ids[:, 0] = module.config.bos_token_id if module.config.bos_token_id < vocab else 0
    # CLIP pools at the first occurrence of the highest id (eos_token_id == 2 in old configs) or at eos
    ids[:, -1] = module.config.eos_token_id if module.config.eos_token_id < vocab else vocab - 1
    return (ids,)


def _unet_inputs(module, s: SampleShape, gen):
    cfg = module.config
    sample = _randn(gen, s.batch, cfg.in_channels, s.height, s.width)
    timestep = torch.randint(1, 1000, (s.batch,), generator=gen).to(torch.float32)
    hidden = _randn(gen, s.batch, s.sequence, _cross_attention_dim(cfg))
    extra: list[torch.Tensor] = []
    if cfg.get("addition_embed_type") == "text_time":
        extra.append(_randn(gen, s.batch, _text_embeds_dim(cfg)))
        extra.append(torch.tensor([[s.height * 8.0, s.width * 8.0, 0.0, 0.0, s.height * 8.0, s.width * 8.0]] * s.batch))
    if cfg.get("time_cond_proj_dim") is not None:
        extra.append(_randn(gen, s.batch, cfg.time_cond_proj_dim))
    return (sample, timestep, hidden, *extra)


def _vae_decoder_inputs(module, s: SampleShape, gen):
    return (_randn(gen, s.batch, module.config.latent_channels, s.height, s.width),)


def _vae_encoder_inputs(module, s: SampleShape, gen):
    factor = 2 ** (len(module.config.block_out_channels) - 1)
    img = torch.rand(s.batch, module.config.in_channels, s.height * factor, s.width * factor, generator=gen)
    return (img * 2 - 1,)


def _cross_attention_dim(cfg) -> int:
    dim = cfg.cross_attention_dim
    return dim[0] if isinstance(dim, (list, tuple)) else dim


def _text_embeds_dim(cfg) -> int:
    # projection_class_embeddings_input_dim = text_embeds + 6 * addition_time_embed_dim
    return cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim


# --------------------------------------------------------------------------------------------- registry


def _text_encoder_contract(name: str) -> Contract:
    return Contract(
        name=name,
        attribute=name,
        inputs=(TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),),
        outputs=(
            TensorSpec("last_hidden_state", "float32", (BATCH, SEQUENCE, "hidden")),
            TensorSpec("penultimate_hidden_state", "float32", (BATCH, SEQUENCE, "hidden")),
            TensorSpec("pooled_output", "float32", (BATCH, "pooled")),
        ),
        wrap=_TextEncoder,
        make_inputs=_text_inputs,
        atol=1e-3,
        rtol_l2=1e-4,
    )


def unet_contract(unet: torch.nn.Module | None = None, *, cache_marks: bool = False,
                  controlled: bool | None = None) -> Contract:
    """The UNet's inputs depend on its config: SDXL adds ``text_embeds``/``time_ids``, LCM ``timestep_cond``.

    ``cache_marks``: also output every cache branch's feature (``cache_feature_<m>``, see
    :class:`_CacheMarkedUNet`), which the ``cache_reuse`` pass splits the graph at. Needs ``unet``.
    The UNet of a ControlNet pipeline also takes the ControlNet residuals (:mod:`diffc.exporter.controlnet`);
    ``controlled=False``: the plain contract whatever the UNet.
    """
    if unet is not None and not cache_marks and controlled is not False:
        from diffc.exporter import controlnet

        if controlnet.is_controlled(unet):
            return controlnet.controlled_unet_contract(unet)
    inputs = [
        TensorSpec("sample", "float32", (BATCH, "channels", HEIGHT, WIDTH)),
        TensorSpec("timestep", "float32", (BATCH,)),
        TensorSpec("encoder_hidden_states", "float32", (BATCH, SEQUENCE, "hidden")),
    ]
    if unet is not None:
        cfg = unet.config
        if cfg.get("addition_embed_type") == "text_time":
            inputs.append(TensorSpec("text_embeds", "float32", (BATCH, _text_embeds_dim(cfg))))
            inputs.append(TensorSpec("time_ids", "float32", (BATCH, 6)))
        elif cfg.get("addition_embed_type") is not None:
            from diffc.errors import UnsupportedPipelineError

            raise UnsupportedPipelineError(
                f"UNet addition_embed_type={cfg.addition_embed_type!r} is not supported; diffc exports plain, "
                "SDXL ('text_time') and LCM UNets."
            )
        if cfg.get("time_cond_proj_dim") is not None:
            inputs.append(TensorSpec("timestep_cond", "float32", (BATCH, cfg.time_cond_proj_dim)))
    outputs = [TensorSpec("out_sample", "float32", (BATCH, "channels", HEIGHT, WIDTH))]
    if cache_marks:
        if unet is None:
            from diffc.errors import ExportError

            raise ExportError("unet_contract(cache_marks=True) needs the UNet module: its config names the branches")
        for b in unet_branches(dict(unet.config)):
            outputs.append(TensorSpec(b["feature"], "float32", (BATCH, b["channels"], *feature_dims(b["level"]))))
    return Contract(
        name="unet",
        attribute="unet",
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        wrap=_CacheMarkedUNet if cache_marks else _UNet,
        make_inputs=_unet_inputs,
        atol=2e-3,
        rtol_l2=1e-4,
    )


CONTRACTS: dict[str, Callable[..., Contract]] = {
    # CLIP, or T5 / Gemma-2 for the transformer pipelines (diffc.exporter.dit dispatches on the module's class)
    "text_encoder": lambda m=None: _dit.text_encoder_contract("text_encoder", m, _text_encoder_contract),
    "text_encoder_2": lambda m=None: _dit.text_encoder_contract("text_encoder_2", m, _text_encoder_contract),
    "text_encoder_3": lambda m=None: _dit.text_encoder_contract("text_encoder_3", m, _text_encoder_contract),
    "transformer": lambda m=None: _dit.transformer_contract(m),
    "unet": unet_contract,
    "vae_decoder": lambda m=None: Contract(
        name="vae_decoder",
        attribute="vae",
        inputs=(TensorSpec("latent_sample", "float32", (BATCH, "latent_channels", HEIGHT, WIDTH)),),
        outputs=(TensorSpec("sample", "float32", (BATCH, 3, IMAGE_HEIGHT, IMAGE_WIDTH)),),
        # FLUX.2's VAE un-normalizes its latents in the graph (diffc.exporter.dit.Flux2VaeDecoder)
        wrap=_dit.Flux2VaeDecoder if type(m).__name__ == "AutoencoderKLFlux2" else _VaeDecoder,
        make_inputs=_vae_decoder_inputs,
        atol=2e-3,
        rtol_l2=1e-4,
    ),
    "vae_encoder": lambda m=None: Contract(
        name="vae_encoder",
        attribute="vae",
        inputs=(TensorSpec("sample", "float32", (BATCH, 3, IMAGE_HEIGHT, IMAGE_WIDTH)),),
        outputs=(TensorSpec("latent_mean", "float32", (BATCH, "latent_channels", HEIGHT, WIDTH)),
                 TensorSpec("latent_std", "float32", (BATCH, "latent_channels", HEIGHT, WIDTH))),
        wrap=_VaeEncoder,
        make_inputs=_vae_encoder_inputs,
        atol=2e-3,
        rtol_l2=1e-4,
    ),
}


# the DiT contracts build on this module's TensorSpec / Contract; imported last, and used only at call time, so
# importing either module first works
import diffc.exporter.dit as _dit  # noqa: E402


def get_contract(name: str, module: torch.nn.Module | None = None, **options: Any) -> Contract:
    """The contract of component ``name``; ``options`` go to its factory (``unet``: ``cache_marks``), except
    ``step_marks`` (the denoiser with its first block's results as extra outputs: diffc.exporter.step_marks)."""
    step_marks = options.pop("step_marks", False)
    from diffc.exporter import controlnet

    if controlnet.is_controlnet(name):
        return controlnet.controlnet_contract(module, name)
    try:
        factory = CONTRACTS[name]
    except KeyError:
        from diffc.errors import ExportError

        raise ExportError(f"no export contract for component {name!r}; known: {sorted(CONTRACTS)}") from None
    contract = factory(module, **options)
    if step_marks:
        from diffc.exporter.step_marks import mark_contract

        contract = mark_contract(contract, module)
    return contract
