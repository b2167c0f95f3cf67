"""Export contracts of the transformer-denoiser (DiT) families and of the text encoders they use.

FLUX.1 (``FluxTransformer2DModel``), FLUX.2 (``Flux2Transformer2DModel``), SD3 / SD3.5
(``SD3Transformer2DModel``), PixArt-Sigma (``PixArtTransformer2DModel``) and Sana / Sana-Sprint
(``SanaTransformer2DModel``), plus T5 (``T5EncoderModel``), Gemma-2 (``Gemma2Model``), FLUX.2 [klein]'s Qwen3
(``Qwen3ForCausalLM``) and FLUX.2 [dev]'s Mistral-3 (``Mistral3ForConditionalGeneration``, its language model only)
encoders, intermediate layers stacked. CLIP encoders (FLUX's pooled CLIP-L, SD3's
CLIP-L / CLIP-G with projections), the 16-channel FLUX / SD3 ``AutoencoderKL`` and Sana's ``AutoencoderDC``
decoder use the contracts :mod:`diffc.exporter.contracts` already has (their ``decode`` / pooled outputs are the
same calls).

What the graphs take, and what the runtime must do around them (the runtime loop is not here yet):

* FLUX: ``hidden_states`` are the 2x2-*packed* latents ``[B, (H/2)(W/2), 4C]``; ``img_ids`` ``[(H/2)(W/2), 3]``
  (0, row, column) and ``txt_ids`` ``[S, 3]`` (zeros) are graph inputs, so the RoPE tables are computed in the
  graph from ids the runtime makes in numpy, for any size. ``timestep`` is the scheduler's sigma (the
  pipeline divides its timestep by 1000); ``guidance`` (dev only: ``guidance_embeds``) is the guidance scale
  per batch row, *not* a CFG batch. The output is packed like the input.
* FLUX.2: FLUX.1's packed tokens (FLUX.2's patchify + pack orders them the same way), 4-axis ids
  ``img_ids`` ``[(H/2)(W/2), 4]`` = (0, row, column, 0) and ``txt_ids`` ``[S, 4]`` = (0, 0, 0, token), sigma as
  the timestep, no pooled input; ``guidance`` only when embedded (FLUX.2 [dev]; [klein] runs CFG instead). The
  text is Qwen3's states after layers 9, 18 and 27 concatenated per token (:class:`_StackedHiddenStates`; [dev]:
  Mistral-3's after layers 10, 20 and 30, :class:`_MistralStackedHiddenStates`), and
  ``AutoencoderKLFlux2``'s decoder graph undoes the BatchNorm normalization of the latents
  (:class:`Flux2VaeDecoder`).
* SD3: plain ``[B, C, H, W]`` latents, ``timestep`` in [0, 1000], the CLIP states padded to T5's width and
  concatenated with T5's along the sequence, pooled = CLIP-L + CLIP-G projections.
* PixArt-Sigma: ``added_cond_kwargs`` are ``resolution`` / ``aspect_ratio`` = None (Sigma has no
  micro-conditioning), T5 states with their attention mask. The learned-sigma half of the output is dropped in
  the graph (what the pipeline does next), so ``out_sample`` is the noise prediction only.
* Sana: Gemma-2 states with their attention mask; ``guidance`` when the transformer embeds it (Sana-Sprint: the
  scale itself, the graph multiplies it by ``guidance_embeds_scale`` as ``SanaSprintPipeline`` does).
  Learned-sigma output split as for PixArt.

The text encoders take ``attention_mask`` always: FLUX and SD3 call T5 without one, which equals a mask of ones,
so the runtime passes ones there and the tokenizer's mask for PixArt / Sana.

Precision: these graphs are traced from the module in fp32 (:func:`export_precision` says per component
whether a checkpoint stored in bf16 / fp16 can be upcast for export; see :func:`upcast_for_export`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import onnx
import torch

from diffc.errors import ExportError, UnsupportedPipelineError
from diffc.exporter.contracts import (
    BATCH,
    HEIGHT,
    IMAGE_SEQUENCE,
    SEQUENCE,
    WIDTH,
    Contract,
    SampleShape,
    TensorSpec,
    _randn,
)

#: transformer class -> pipeline classes whose denoiser it is (for the error message of a wrong folder)
DENOISERS = ("FluxTransformer2DModel", "Flux2Transformer2DModel", "SD3Transformer2DModel", "PixArtTransformer2DModel",
             "SanaTransformer2DModel")

#: FLUX.2 [klein]'s Qwen3 layers whose states condition the transformer, stacked along the features
#: (``Flux2KleinPipeline.__call__``'s ``text_encoder_out_layers`` default)
FLUX2_TEXT_LAYERS = (9, 18, 27)
#: FLUX.2 [dev]'s Mistral-3 layers, likewise (``Flux2Pipeline.__call__``'s ``text_encoder_out_layers`` default)
FLUX2_DEV_TEXT_LAYERS = (10, 20, 30)

# --------------------------------------------------------------------------------------------- wrappers


def _rotary_traceable(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
    """``diffusers.models.embeddings.apply_rotary_emb`` for FLUX (real cos/sin, interleaved pairs), written so a
    TorchScript trace keeps every axis dynamic: the original's ``x.reshape(*x.shape[:-1], -1, 2)`` is traced with
    the sample's batch and sequence baked in, and the graph then fails at any other size. Same arithmetic."""
    if not use_real or use_real_unbind_dim != -1 or sequence_dim not in (1, 2):
        raise ExportError("the traceable rotary embedding covers FLUX's layout only (use_real, unbind_dim=-1)")
    cos, sin = freqs_cis  # [S, D]
    index = (None, slice(None), None) if sequence_dim == 1 else (None, None, slice(None))
    cos, sin = cos[index].to(x.device), sin[index].to(x.device)
    x_real, x_imag = x[..., 0::2], x[..., 1::2]
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


@contextlib.contextmanager
def _traceable_rotary(transformer: torch.nn.Module):
    """Swap :func:`_rotary_traceable` into the module that defines ``transformer``'s attention (restored after)."""
    import sys

    module = sys.modules[type(transformer).__module__]
    original = getattr(module, "apply_rotary_emb", None)
    if original is None:
        yield
        return
    module.apply_rotary_emb = _rotary_traceable
    try:
        yield
    finally:
        module.apply_rotary_emb = original


class _Flux(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        self.guidance = bool(transformer.config.guidance_embeds)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                *guidance):
        with _traceable_rotary(self.transformer):
            return self.transformer(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids,
                guidance=guidance[0] if self.guidance else None, return_dict=False,
            )[0]


class _Flux2(torch.nn.Module):
    """``Flux2Transformer2DModel``: FLUX.1's packed tokens and RoPE, 4-axis ids, no pooled projection; the
    ``guidance`` input only for a guidance-distilled checkpoint (FLUX.2 [dev]; [klein] has none)."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        self.guidance = bool(transformer.config.guidance_embeds)

    def forward(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, *guidance):
        with _traceable_rotary(self.transformer):
            return self.transformer(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                img_ids=img_ids, txt_ids=txt_ids, guidance=guidance[0] if self.guidance else None,
                return_dict=False,
            )[0]


class Flux2VaeDecoder(torch.nn.Module):
    """``AutoencoderKLFlux2``'s decode as ``Flux2KleinPipeline`` ends: the sampler's latents, normalized by the VAE's
    BatchNorm statistics in the 2x2-patchified space, are un-normalized (``x * sqrt(var + eps) + mean``) and
    decoded. The loop keeps them unpatchified, ``[B, C, h, w]``: FLUX.2's patchify + pack gives the same tokens
    as FLUX.1's 2x2 pack, so the runtime's packing serves both, and the statistics are applied here, patchified
    and back, so the manifest's scaling is the identity (``scaling_factor`` 1, ``shift_factor`` 0)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        b, c, h, w = latent_sample.shape
        x = latent_sample.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        x = x.reshape(b, c * 4, h // 2, w // 2)
        bn = self.vae.bn
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        x = x * std + bn.running_mean.view(1, -1, 1, 1)
        x = x.reshape(b, c, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)
        return self.vae.decode(x, return_dict=False)[0]


class _SD3(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]


def _noise_half(out: torch.Tensor, transformer: torch.nn.Module) -> torch.Tensor:
    """PixArt / Sana with learned sigma output 2C channels; their pipelines keep the first C (the noise)."""
    cfg = transformer.config
    if cfg.out_channels is not None and cfg.out_channels == 2 * cfg.in_channels:
        return out.chunk(2, dim=1)[0]
    return out


@contextlib.contextmanager
def _size_dependent_pos_embed(transformer: torch.nn.Module):
    """PixArt's (and Sana 4K's) ``PatchEmbed`` adds a sin-cos table stored for its native size and recomputes it only when the
    input differs; the comparison is Python, decided once while tracing, so a graph traced at the native size
    would bake the stored table in and fail at any other size. Pretending the stored size is unknown makes the
    trace take the recompute path: the table is computed in the graph from the input's height and width (the
    same formula; :func:`check_parity` and the tests compare it with the stored one)."""
    pe = getattr(transformer, "pos_embed", None)
    if pe is None or getattr(pe, "pos_embed_max_size", None) or getattr(pe, "pos_embed", None) is None:
        yield
        return
    saved = pe.height, pe.width
    pe.height = pe.width = -1
    try:
        yield
    finally:
        pe.height, pe.width = saved


class _PixArt(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask):
        with _size_dependent_pos_embed(self.transformer):
            out = self.transformer(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                                   added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                   encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
        return _noise_half(out, self.transformer)


class _Sana(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        self.guidance = bool(transformer.config.get("guidance_embeds", False))
        self.guidance_scale = float(transformer.config.get("guidance_embeds_scale", 0.1))

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, *guidance):
        # Sana-Sprint's guidance input is the user's scale; SanaSprintPipeline feeds the transformer
        # guidance_scale x guidance_embeds_scale, so the runtime feeds the scale as every other family does
        g = guidance[0] * self.guidance_scale if self.guidance else None
        # Sana 1.x has no position table (interpolation_scale None); the 4K models add PixArt's sin-cos one
        with _size_dependent_pos_embed(self.transformer):
            out = self.transformer(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                                   guidance=g,
                                   encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
        return _noise_half(out, self.transformer)


class _MaskedTextEncoder(torch.nn.Module):
    """T5 / Gemma-2 encoder: ``(input_ids, attention_mask) -> last_hidden_state`` (after the final norm)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


class _StackedHiddenStates(torch.nn.Module):
    """Qwen3 for FLUX.2 [klein]: ``(input_ids, attention_mask) -> stacked_hidden_states`` ``[B, S, 3 D]``, the
    states after layers 9, 18 and 27 concatenated per token (``Flux2KleinPipeline._get_qwen3_prompt_embeds``:
    ``stack(dim=1).permute(0, 2, 1, 3).reshape``). The causal LM's decoder alone runs (its head is unused), and
    the layers after the last one used are dead code the exporter drops."""

    #: the pipeline these states are for (the error of a too-shallow encoder names it)
    pipeline = "FLUX.2 [klein]"

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = self.decoder_of(encoder)
        self.layers = tuple(self.text_layers())
        layers = self.encoder.config.num_hidden_layers
        if max(self.layers) > layers:
            raise ExportError(f"the text encoder has {layers} layers but {self.pipeline} conditions on the states of "
                              f"layers {list(self.layers)}; this is not a {self.pipeline} text encoder")

    @staticmethod
    def decoder_of(encoder: torch.nn.Module) -> torch.nn.Module:
        return getattr(encoder, "model", encoder)

    @staticmethod
    def text_layers() -> tuple[int, ...]:
        return FLUX2_TEXT_LAYERS  # read at construction: the tests patch it for a shallow encoder

    def forward(self, input_ids, attention_mask):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                           use_cache=False)
        states = torch.stack([out.hidden_states[k] for k in self.layers], dim=1)
        b, n, s, d = states.shape
        return states.permute(0, 2, 1, 3).reshape(b, s, n * d)


class _MistralStackedHiddenStates(_StackedHiddenStates):
    """Mistral-3 for FLUX.2 [dev] (``Flux2Pipeline._get_mistral_3_small_prompt_embeds``): the states after layers
    10, 20 and 30, stacked as for klein. ``Mistral3ForConditionalGeneration`` is a vision-language model; for a
    prompt without images its forward is the language model on the token embeddings (the image features are
    only scattered into ``[IMG]`` positions when ``pixel_values`` are given, and FLUX.2's text-to-image call
    gives none), so the language model alone is traced: the vision tower and projector are not in the graph,
    and their weights (about 0.4 B of Mistral-Small-3.1's 24 B) are never exported."""

    pipeline = "FLUX.2 [dev]"

    @staticmethod
    def decoder_of(encoder: torch.nn.Module) -> torch.nn.Module:
        language_model = getattr(getattr(encoder, "model", None), "language_model", None)
        if language_model is None:
            raise ExportError(f"{type(encoder).__name__} has no model.language_model; diffc exports FLUX.2 [dev]'s "
                              "text encoder as transformers' Mistral3ForConditionalGeneration (transformers >= 5)")
        return language_model

    @staticmethod
    def text_layers() -> tuple[int, ...]:
        return FLUX2_DEV_TEXT_LAYERS


# --------------------------------------------------------------------------------------------- inputs


def _timestep(gen, batch: int, scale: float) -> torch.Tensor:
    return torch.rand(batch, generator=gen) * scale


def _mask(s: SampleShape) -> torch.Tensor:
    """Ones, except that row ``b`` of a batch > 1 ends with ``b * sequence // 4`` padding zeros (a short prompt)."""
    mask = torch.ones(s.batch, s.sequence, dtype=torch.int64)
    for b in range(1, s.batch):
        mask[b, s.sequence - b * s.sequence // 4:] = 0
    return mask


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    """``FluxPipeline._prepare_latent_image_ids`` for latents of ``height`` x ``width`` (unpacked)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def _flux_inputs(module, s: SampleShape, gen):
    cfg = module.config
    seq = (s.height // 2) * (s.width // 2)
    inputs = [
        _randn(gen, s.batch, seq, cfg.in_channels),
        _randn(gen, s.batch, s.sequence, cfg.joint_attention_dim),
        _randn(gen, s.batch, cfg.pooled_projection_dim),
        _timestep(gen, s.batch, 1.0),
        flux_image_ids(s.height, s.width),
        torch.zeros(s.sequence, 3),
    ]
    if cfg.guidance_embeds:
        inputs.append(torch.full((s.batch,), 3.5))
    return tuple(inputs)


def flux2_image_ids(height: int, width: int) -> torch.Tensor:
    """``Flux2Pipeline._prepare_latent_ids`` for latents of ``height`` x ``width`` (unpacked): (0, row, col, 0)."""
    ids = torch.zeros(height // 2, width // 2, 4)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 4)


def flux2_text_ids(sequence: int) -> torch.Tensor:
    """``Flux2Pipeline._prepare_text_ids``: (0, 0, 0, token)."""
    ids = torch.zeros(sequence, 4)
    ids[:, 3] = torch.arange(sequence)
    return ids


def _flux2_inputs(module, s: SampleShape, gen):
    cfg = module.config
    inputs = [
        _randn(gen, s.batch, (s.height // 2) * (s.width // 2), cfg.in_channels),
        _randn(gen, s.batch, s.sequence, cfg.joint_attention_dim),
        _timestep(gen, s.batch, 1.0),
        flux2_image_ids(s.height, s.width),
        flux2_text_ids(s.sequence),
    ]
    if cfg.guidance_embeds:
        inputs.append(torch.full((s.batch,), 4.0))
    return tuple(inputs)


def _sd3_inputs(module, s: SampleShape, gen):
    cfg = module.config
    return (_randn(gen, s.batch, cfg.in_channels, s.height, s.width), _timestep(gen, s.batch, 1000.0),
            _randn(gen, s.batch, s.sequence, cfg.joint_attention_dim), _randn(gen, s.batch, cfg.pooled_projection_dim))


def _pixart_inputs(module, s: SampleShape, gen):
    cfg = module.config
    return (_randn(gen, s.batch, cfg.in_channels, s.height, s.width), _timestep(gen, s.batch, 1000.0),
            _randn(gen, s.batch, s.sequence, cfg.caption_channels), _mask(s))


def _sana_inputs(module, s: SampleShape, gen):
    cfg = module.config
    inputs = [_randn(gen, s.batch, cfg.in_channels, s.height, s.width), _timestep(gen, s.batch, 1000.0),
              _randn(gen, s.batch, s.sequence, cfg.caption_channels), _mask(s)]
    if cfg.get("guidance_embeds", False):
        inputs.append(torch.full((s.batch,), 4.5))
    return tuple(inputs)


def _masked_text_inputs(module, s: SampleShape, gen):
    cfg = getattr(module.config, "text_config", None) or module.config  # Mistral-3: its language model's
    # ids above the special tokens (T5: pad 0, eos 1, unk 2; Gemma: pad, eos, bos, unk = 0..3)
    ids = torch.randint(4, cfg.vocab_size, (s.batch, s.sequence), generator=gen, dtype=torch.int64)
    mask = _mask(s)
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))  # padding positions hold the pad id, as tokenized
    if getattr(cfg, "bos_token_id", None) is not None and cfg.model_type.startswith(("gemma", "mistral")):
        ids[:, 0] = cfg.bos_token_id
    return ids, mask


# --------------------------------------------------------------------------------------------- contracts

_LATENT = (BATCH, "channels", HEIGHT, WIDTH)


def transformer_contract(module: torch.nn.Module | None = None) -> Contract:
    """The contract of a pipeline's ``transformer``: which one depends on the module's class."""
    if module is None:
        raise ExportError("the transformer's contract depends on its class and config; pass the module")
    cls = type(module).__name__
    cfg = module.config
    if cls == "FluxTransformer2DModel":
        inputs = [
            TensorSpec("hidden_states", "float32", (BATCH, IMAGE_SEQUENCE, cfg.in_channels)),
            TensorSpec("encoder_hidden_states", "float32", (BATCH, SEQUENCE, cfg.joint_attention_dim)),
            TensorSpec("pooled_projections", "float32", (BATCH, cfg.pooled_projection_dim)),
            TensorSpec("timestep", "float32", (BATCH,)),
            TensorSpec("img_ids", "float32", (IMAGE_SEQUENCE, 3)),
            TensorSpec("txt_ids", "float32", (SEQUENCE, 3)),
        ]
        if cfg.guidance_embeds:
            inputs.append(TensorSpec("guidance", "float32", (BATCH,)))
        out = TensorSpec("out_sample", "float32", (BATCH, IMAGE_SEQUENCE, cfg.out_channels or cfg.in_channels))
        return Contract(name="transformer", attribute="transformer", inputs=tuple(inputs), outputs=(out,),
                        wrap=_Flux, make_inputs=_flux_inputs, atol=2e-3, rtol_l2=1e-4,
                        extra={"family": "flux", "packed_latents": True, "patch": 2})
    if cls == "Flux2Transformer2DModel":
        inputs = [
            TensorSpec("hidden_states", "float32", (BATCH, IMAGE_SEQUENCE, cfg.in_channels)),
            TensorSpec("encoder_hidden_states", "float32", (BATCH, SEQUENCE, cfg.joint_attention_dim)),
            TensorSpec("timestep", "float32", (BATCH,)),
            TensorSpec("img_ids", "float32", (IMAGE_SEQUENCE, 4)),
            TensorSpec("txt_ids", "float32", (SEQUENCE, 4)),
        ]
        if cfg.guidance_embeds:
            inputs.append(TensorSpec("guidance", "float32", (BATCH,)))
        out = TensorSpec("out_sample", "float32", (BATCH, IMAGE_SEQUENCE, cfg.out_channels or cfg.in_channels))
        return Contract(name="transformer", attribute="transformer", inputs=tuple(inputs), outputs=(out,),
                        wrap=_Flux2, make_inputs=_flux2_inputs, atol=2e-3, rtol_l2=1e-4,
                        extra={"family": "flux2", "packed_latents": True, "patch": 2})
    if cls == "SD3Transformer2DModel":
        inputs = (
            TensorSpec("sample", "float32", _LATENT),
            TensorSpec("timestep", "float32", (BATCH,)),
            TensorSpec("encoder_hidden_states", "float32", (BATCH, SEQUENCE, cfg.joint_attention_dim)),
            TensorSpec("pooled_projections", "float32", (BATCH, cfg.pooled_projection_dim)),
        )
        return Contract(name="transformer", attribute="transformer", inputs=inputs,
                        outputs=(TensorSpec("out_sample", "float32", _LATENT),), wrap=_SD3,
                        make_inputs=_sd3_inputs, atol=2e-3, rtol_l2=1e-4,
                        extra={"family": "sd3", "patch": cfg.patch_size})
    if cls in ("PixArtTransformer2DModel", "SanaTransformer2DModel"):
        inputs = [
            TensorSpec("sample", "float32", _LATENT),
            TensorSpec("timestep", "float32", (BATCH,)),
            TensorSpec("encoder_hidden_states", "float32", (BATCH, SEQUENCE, cfg.caption_channels)),
            TensorSpec("encoder_attention_mask", "int64", (BATCH, SEQUENCE)),
        ]
        sana = cls == "SanaTransformer2DModel"
        if sana and cfg.get("guidance_embeds", False):
            inputs.append(TensorSpec("guidance", "float32", (BATCH,)))
        return Contract(name="transformer", attribute="transformer", inputs=tuple(inputs),
                        outputs=(TensorSpec("out_sample", "float32", _LATENT),), wrap=_Sana if sana else _PixArt,
                        make_inputs=_sana_inputs if sana else _pixart_inputs, atol=2e-3, rtol_l2=1e-4,
                        extra={"family": "sana" if sana else "pixart", "patch": cfg.patch_size})
    raise UnsupportedPipelineError(
        f"transformer class {cls!r} has no export contract; diffc exports {', '.join(DENOISERS)}")


#: text encoder classes that take (input_ids, attention_mask) and return their last hidden state
MASKED_TEXT_ENCODERS = ("T5EncoderModel", "Gemma2Model")


#: text encoder classes whose intermediate layers' states are stacked -> their wrapper (FLUX.2 [klein]'s Qwen3,
#: FLUX.2 [dev]'s Mistral-3)
STACKED_TEXT_ENCODERS = {"Qwen3ForCausalLM": _StackedHiddenStates, "Qwen3Model": _StackedHiddenStates,
                         "Mistral3ForConditionalGeneration": _MistralStackedHiddenStates}


def text_encoder_contract(name: str, module: torch.nn.Module | None, clip_contract) -> Contract:
    """T5 / Gemma-2 get :class:`_MaskedTextEncoder`'s contract, Qwen3 / Mistral-3 :class:`_StackedHiddenStates`'
    (:data:`STACKED_TEXT_ENCODERS`); CLIP (and ``module=None``) ``clip_contract(name)``."""
    if module is not None and type(module).__name__ in STACKED_TEXT_ENCODERS:
        wrap = STACKED_TEXT_ENCODERS[type(module).__name__]
        return Contract(
            name=name, attribute=name,
            inputs=(TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),
                    TensorSpec("attention_mask", "int64", (BATCH, SEQUENCE))),
            outputs=(TensorSpec("stacked_hidden_states", "float32", (BATCH, SEQUENCE, "hidden")),),
            wrap=wrap, make_inputs=_masked_text_inputs, atol=1e-3, rtol_l2=1e-4,
            extra={"encoder": type(module).__name__, "layers": list(wrap.text_layers())})
    if module is None or type(module).__name__ not in MASKED_TEXT_ENCODERS:
        return clip_contract(name)
    return Contract(
        name=name,
        attribute=name,
        inputs=(TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),
                TensorSpec("attention_mask", "int64", (BATCH, SEQUENCE))),
        outputs=(TensorSpec("last_hidden_state", "float32", (BATCH, SEQUENCE, "hidden")),),
        wrap=_MaskedTextEncoder,
        make_inputs=_masked_text_inputs,
        atol=1e-3,
        rtol_l2=1e-4,
        extra={"encoder": type(module).__name__},
    )


# --------------------------------------------------------------------------------------------- shapes


def latent_multiple(pipe) -> int:
    """The latent-size step of the pipeline's transformer: FLUX packs 2x2, the others patchify by patch_size."""
    cfg = pipe.transformer.config
    packed = type(pipe.transformer).__name__ in ("FluxTransformer2DModel", "Flux2Transformer2DModel")
    return 2 if packed else int(cfg.get("patch_size") or 1)


def sample_shapes(pipe, name: str, max_latent: int) -> tuple[SampleShape, SampleShape]:
    """Two shapes per component, as ``diffc.exporter.export.sample_shapes`` does for UNets: the native latent
    size (at most ``max_latent``) with a 32-token text at batch 1, and one step larger in each direction with a
    shorter text at batch 2 (so masked encoders see padding)."""
    mult = latent_multiple(pipe)
    # the transformer's sample_size is in latents (SD3 / PixArt / Sana); FLUX has none: the VAE's, in pixels
    native = pipe.transformer.config.get("sample_size")
    if not native:
        sample = pipe.vae.config.get("sample_size") or 1024
        native = int(sample[0] if isinstance(sample, (list, tuple)) else sample) // int(pipe.vae_scale_factor)
    native = int(native[0] if isinstance(native, (list, tuple)) else native)
    native = max(mult, min(native, max_latent) // mult * mult)
    first = SampleShape(1, native, native, 32)
    if name.startswith("text_encoder"):
        return first, SampleShape(2, native, native, 12)
    return first, SampleShape(2, native + mult, native + 2 * mult, 12)


# --------------------------------------------------------------------------------------------- precision

#: a half-precision component up to this size in fp32 is upcast for export (only that component, only while
#: it is exported); above it the export refuses rather than exhaust memory
UPCAST_LIMIT_BYTES = 8 * 2**30


def fp32_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * 4 for p in module.parameters()) + sum(b.numel() * 4 for b in module.buffers()
                                                                  if b.is_floating_point())


@contextlib.contextmanager
def upcast_for_export(module: torch.nn.Module, name: str, limit: int = UPCAST_LIMIT_BYTES):
    """Run the export of one component in fp32 when its weights are stored in bf16 / fp16.

    The pipeline is loaded in the checkpoint's own dtype, so the other components stay in half precision; this
    component alone is converted (in place: no second copy) and converted back afterwards, so the peak is the
    half-precision pipeline plus one component's fp32 weights. A component whose fp32 weights exceed ``limit``
    (FLUX.1's 12 B transformer: 48 GB) raises :class:`ExportError` instead: exporting such a model needs a
    half-precision export path that diffc does not have yet.
    """
    dtypes = {p.dtype for p in module.parameters()}
    if not dtypes or dtypes == {torch.float32}:
        yield module
        return
    size = fp32_bytes(module)
    if size > limit:
        raise ExportError(
            f"{name} is stored in {'/'.join(sorted(str(d) for d in dtypes))} and needs {size / 2**30:.1f} GiB "
            f"in fp32 to export, over the {limit / 2**30:.0f} GiB diffc upcasts one component to; export it on a "
            "machine with more memory after raising diffc.exporter.dit.UPCAST_LIMIT_BYTES, or a reduced-depth copy")
    original = next(iter(dtypes)) if len(dtypes) == 1 else torch.bfloat16
    module.float()
    try:
        yield module
    finally:
        module.to(original)


def stored_dtype(folder) -> str | None:
    """The floating dtype a component folder's safetensors hold (``"BF16"``, ``"F16"``, ``"F32"``), read from the
    safetensors headers without loading a tensor; ``None`` when there are none."""
    import json
    import struct
    from pathlib import Path

    found: dict[str, int] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                raise ExportError(f"{path}: safetensors header of {size} bytes; the file looks corrupt")
            header: dict[str, Any] = json.loads(f.read(size))
        for key, entry in header.items():
            if key != "__metadata__" and entry.get("dtype") in ("BF16", "F16", "F32"):
                start, end = entry["data_offsets"]
                found[entry["dtype"]] = found.get(entry["dtype"], 0) + end - start
    return max(found, key=found.get) if found else None


# --------------------------------------------------------------------------------------------- graph fixes


def drop_token_axis_squeeze(model) -> int:
    """Replace TorchScript's conditional squeeze of a dynamic axis by the tensor itself; returns how many.

    ``PixArtTransformer2DModel.forward`` ends with ``hidden_states.squeeze(1)`` on ``[B, tokens, D]``. With the
    token count dynamic, the exporter writes ``If(Shape(x)[1] == 1, Squeeze(x, 1), Identity(x))``: onnxruntime
    runs it, but TensorRT(-RTX) cannot build it (its shape analysis cannot prove the branches' shapes agree,
    "reshape changes volume"), and no artifact has a one-token image (the unpatchify after it reshapes by the
    token grid, which is also right for one token). Only ``If`` nodes of exactly that form, whose else branch
    is the identity of the squeezed tensor, are replaced; the condition's nodes, then unused, are removed."""
    graph = model.graph
    replaced = 0
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "If" or len(node.output) != 1:
            continue
        branches = {a.name: a.g for a in node.attribute}
        then, other = branches.get("then_branch"), branches.get("else_branch")
        if then is None or other is None:
            continue
        squeezes = [n for n in then.node if n.op_type == "Squeeze"]
        ops = sorted(n.op_type for n in then.node)
        if ops not in (["Squeeze"], ["Constant", "Squeeze"]) or len(other.node) != 1 \
                or other.node[0].op_type != "Identity" or squeezes[0].input[0] != other.node[0].input[0]:
            continue
        identity = onnx.helper.make_node("Identity", [other.node[0].input[0]], list(node.output),
                                         name=f"{node.name}/token_axis_kept")
        graph.node[index].CopyFrom(identity)
        replaced += 1
    if replaced:
        _remove_dead_nodes(graph)
    return replaced


def _remove_dead_nodes(graph) -> None:
    """Drop nodes none of whose outputs reach a graph output (the If's condition chain, after the rewrite)."""
    needed = {o.name for o in graph.output}
    nodes = list(graph.node)
    keep = [False] * len(nodes)
    for i in reversed(range(len(nodes))):  # the graph is topologically sorted
        node = nodes[i]
        if any(o in needed for o in node.output):
            keep[i] = True
            needed.update(node.input)
            for attr in node.attribute:  # inputs captured by subgraphs
                if attr.type == onnx.AttributeProto.GRAPH:
                    needed.update(x for n in attr.g.node for x in n.input)
    kept = [n for n, k in zip(nodes, keep) if k]
    del graph.node[:]
    graph.node.extend(kept)
