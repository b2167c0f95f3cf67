"""The transformer-denoiser families as data: how each pipeline conditions and feeds its transformer.

The runtime loop is generic (:mod:`diffc.runtime.denoiser`): it reads from the manifest which text encoder
output conditions the denoiser, which ones are concatenated along the features and which along the sequence,
which tokenizer mask goes where, how the latents are laid out, how the timestep is scaled and how guidance is
applied. This module is where those facts are written down once per diffusers pipeline class, read off the
pipeline's ``encode_prompt`` / ``__call__`` in diffusers 0.42 (the comments name the lines' meaning). It is
torch-free, so ``diffc build --dry-run`` plans a transformer build from the config files alone.

=========================  =============================================================================
PixArtSigmaPipeline        T5 (300 tokens, lowercased, its mask to T5 and to the transformer), CFG batch,
                           ``[B, C, H, W]`` latents, timestep as the scheduler's (0..1000)
StableDiffusion3Pipeline   CLIP-L + CLIP-G penultimate states (features), zero-padded to T5's width, then T5's
                           256 states (sequence); pooled = CLIP-L + CLIP-G projections; CFG batch
FluxPipeline               CLIP-L pooled + T5's 512 states; 2x2-packed latents with ``img_ids`` / ``txt_ids``;
                           timestep = sigma (t / 1000); dev: ``guidance`` input = the scale, no CFG batch
SanaPipeline               Gemma-2 with Sana's complex-human-instruction prefix and token selection, its mask
                           to the transformer; CFG batch; timestep x ``timestep_scale``
SanaSprintPipeline         Sana's text side; ``guidance`` input = the scale (the graph multiplies it by
                           ``guidance_embeds_scale``), no CFG batch; the SCM sampler's timestep as is
Flux2KleinPipeline         Qwen3 states of layers 9 / 18 / 27 stacked along the features, prompt wrapped in the
                           tokenizer's chat template, 512 tokens; FLUX.1's 2x2 packing (the same token order as
                           FLUX.2's patchify + pack) with 4-axis ids; timestep = sigma; CFG with an empty negative
                           prompt unless ``is_distilled`` (model_index.json)
Flux2Pipeline              FLUX.2 [dev]: Mistral-3's states of layers 10 / 20 / 30 stacked (its language model
                           only), prompt in the Mistral chat template after FLUX.2's system message, 512
                           tokens; klein's latents, ids and timestep; ``guidance`` input = the scale, no CFG
=========================  =============================================================================

``Flux2Pipeline``'s edit mode (reference images through ``image=``, appended to the image tokens with their own
ids) is not built: the artifact is text-to-image, and the runtime refuses an image for it (a typed error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffc.errors import ModelError, ProfileError

#: the denoiser component of a transformer pipeline (a UNet pipeline's is ``unet``)
TRANSFORMER = "transformer"


@dataclass(frozen=True)
class EncoderPlan:
    """One text encoder of a transformer pipeline, as the manifest's ``text_encoders`` entry describes it.

    ``hidden_state``: the output that conditions the denoiser (None: only its pooled output is used, FLUX's
    CLIP); ``pooled``: the output concatenated into the pooled projection (None: unused). ``attention_mask``:
    ``"none"`` (the graph takes no mask: CLIP), ``"ones"`` (the graph takes one but the pipeline calls the
    encoder without it, which equals ones: FLUX / SD3's T5) or ``"tokens"`` (the tokenizer's mask, also fed to
    the denoiser: PixArt / Sana). Encoders of one ``sequence_group`` are concatenated along the features; the
    groups, zero-padded to the widest, along the sequence (SD3)."""

    component: str
    tokenizer: str
    tokenizer_kind: str  # clip | t5 | gemma | qwen_chat | mistral_chat
    max_length: int
    hidden_state: str | None
    pooled: str | None
    attention_mask: str
    sequence_group: int = 0
    lowercase: bool = False


@dataclass(frozen=True)
class Family:
    name: str
    encoders: tuple[EncoderPlan, ...]
    #: ``nchw`` plain latents, ``packed_2x2`` FLUX's ``[B, (h/2)(w/2), 4C]`` tokens with position ids
    latent_layout: str
    #: the transformer's input names, by role (None: the family has no such input)
    inputs: dict[str, str | None]
    #: the pipeline's ``guidance_scale`` default
    default_guidance: float
    #: the transformer's timestep = the sampler's x this (None: the transformer config's ``timestep_scale``)
    timestep_scale: float | None = None
    #: the position ids of a packed layout: ``flux`` (0, row, column) / zeros, ``flux2`` (t, row, column, layer)
    #: = (0, row, column, 0) for the image and (0, 0, 0, token) for the text
    position_ids: str = "flux"
    #: how guidance works without a guidance embedding: ``cfg`` (a batch of uncond + cond) or ``none``
    unembedded_guidance: str = "cfg"
    #: whether the pipeline feeds a guidance embedding when the transformer has one (``guidance_embeds``);
    #: False: it never does (FLUX.2 [klein]), and a transformer with one is the wrong folder
    feeds_guidance_embedding: bool = True


def _clip(component: str, tokenizer: str, hidden: str | None, pooled: str | None, group: int = 0) -> EncoderPlan:
    return EncoderPlan(component, tokenizer, "clip", 77, hidden, pooled, "none", group)


_NCHW_INPUTS = {"latents": "sample", "timestep": "timestep", "text": "encoder_hidden_states", "text_mask": None,
                "pooled": None, "image_ids": None, "text_ids": None, "guidance": None}

FAMILIES: dict[str, Family] = {
    # PixArtSigmaPipeline.encode_prompt: max_sequence_length=300, the mask to T5 and to the transformer;
    # _text_preprocessing lowercases and strips (clean_caption needs bs4 + ftfy; see T5PromptTokenizer)
    "PixArtSigmaPipeline": Family(
        "pixart",
        (EncoderPlan("text_encoder", "tokenizer", "t5", 300, "last_hidden_state", None, "tokens", lowercase=True),),
        "nchw", {**_NCHW_INPUTS, "text_mask": "encoder_attention_mask"}, 4.5),
    # StableDiffusion3Pipeline.encode_prompt: clip_skip None -> hidden_states[-2]; pooled = prompt_embeds[0]
    # (CLIPTextModelWithProjection's text_embeds); T5 at max_sequence_length=256, called without a mask
    "StableDiffusion3Pipeline": Family(
        "sd3",
        (_clip("text_encoder", "tokenizer", "penultimate_hidden_state", "pooled_output"),
         _clip("text_encoder_2", "tokenizer_2", "penultimate_hidden_state", "pooled_output"),
         EncoderPlan("text_encoder_3", "tokenizer_3", "t5", 256, "last_hidden_state", None, "ones", 1)),
        "nchw", {**_NCHW_INPUTS, "pooled": "pooled_projections"}, 7.0),
    # FluxPipeline.encode_prompt: CLIP's pooler_output, T5's states at max_sequence_length=512 without a mask
    "FluxPipeline": Family(
        "flux",
        (_clip("text_encoder", "tokenizer", None, "pooled_output"),
         EncoderPlan("text_encoder_2", "tokenizer_2", "t5", 512, "last_hidden_state", None, "ones")),
        "packed_2x2", {**_NCHW_INPUTS, "latents": "hidden_states", "pooled": "pooled_projections",
                       "image_ids": "img_ids", "text_ids": "txt_ids"}, 3.5),
    # SanaPipeline._get_gemma_prompt_embeds: lowercase + strip, the complex human instruction, select_index
    "SanaPipeline": Family(
        "sana",
        (EncoderPlan("text_encoder", "tokenizer", "gemma", 300, "last_hidden_state", None, "tokens"),),
        "nchw", {**_NCHW_INPUTS, "text_mask": "encoder_attention_mask"}, 4.5),
    # SanaSprintPipeline: SanaPipeline's encode_prompt; the transformer gets the SCM timestep as is (no
    # timestep_scale) and guidance_scale x guidance_embeds_scale (the scale is the graph input, see
    # diffc.exporter.dit._Sana), never a CFG batch
    "SanaSprintPipeline": Family(
        "sana",
        (EncoderPlan("text_encoder", "tokenizer", "gemma", 300, "last_hidden_state", None, "tokens"),),
        "nchw", {**_NCHW_INPUTS, "text_mask": "encoder_attention_mask"}, 4.5, timestep_scale=1.0,
        unembedded_guidance="none"),
    # Flux2KleinPipeline._get_qwen3_prompt_embeds: the chat template around the prompt, 512 tokens padded, the
    # tokenizer's mask to Qwen3 (not to the transformer); hidden_states[9], [18], [27] stacked on the features
    "Flux2KleinPipeline": Family(
        "flux2",
        (EncoderPlan("text_encoder", "tokenizer", "qwen_chat", 512, "stacked_hidden_states", None, "tokens"),),
        "packed_2x2", {**_NCHW_INPUTS, "latents": "hidden_states", "image_ids": "img_ids", "text_ids": "txt_ids"},
        4.0, timestep_scale=0.001, position_ids="flux2", feeds_guidance_embedding=False),
    # Flux2Pipeline._get_mistral_3_small_prompt_embeds: format_input (FLUX.2's system message, the prompt without
    # "[IMG]") through the processor's chat template, 512 tokens padded, the mask to Mistral-3 only;
    # hidden_states[10], [20], [30] stacked on the features. __call__: guidance = the scale (no CFG batch),
    # timestep / 1000, compute_empirical_mu
    "Flux2Pipeline": Family(
        "flux2",
        (EncoderPlan("text_encoder", "tokenizer", "mistral_chat", 512, "stacked_hidden_states", None, "tokens"),),
        "packed_2x2", {**_NCHW_INPUTS, "latents": "hidden_states", "image_ids": "img_ids", "text_ids": "txt_ids"},
        4.0, timestep_scale=0.001, position_ids="flux2", unembedded_guidance="none"),
}

#: pipeline classes of a supported family that diffc refuses to build, and why (the build's typed error says it)
REFUSED: dict[str, str] = {}


def family_of(pipeline_class: str) -> Family | None:
    """The family of a transformer pipeline class; None for the UNet pipelines."""
    return FAMILIES.get(pipeline_class)


def patch_size(family: Family, transformer_cfg: dict[str, Any]) -> int:
    """Latent pixels per transformer token side: FLUX packs 2x2 (its own ``patch_size`` is 1, after packing)."""
    if family.latent_layout == "packed_2x2":
        return 2
    return int(transformer_cfg.get("patch_size") or 1)


def vae_scale_factor(vae_cfg: dict[str, Any]) -> int:
    """Pixels per latent side: ``AutoencoderKL`` halves per level after the first; DC-AE (Sana) likewise per
    encoder level (``SanaPipeline.vae_scale_factor``)."""
    channels = vae_cfg.get("block_out_channels") or vae_cfg.get("encoder_block_out_channels")
    if not channels:
        raise ProfileError("the VAE config has neither block_out_channels nor encoder_block_out_channels; "
                           "re-save the pipeline with diffusers' save_pretrained()")
    return 2 ** (len(channels) - 1)


def latent_channels(family: Family, transformer_cfg: dict[str, Any], vae_cfg: dict[str, Any]) -> int:
    if family.latent_layout == "packed_2x2":
        return int(transformer_cfg["in_channels"]) // 4
    return int(transformer_cfg["in_channels"])


def native_latent(transformer_cfg: dict[str, Any], vae_cfg: dict[str, Any]) -> int:
    """The model's native latent side: the transformer's ``sample_size`` (SD3 / PixArt / Sana), else the VAE's
    ``sample_size`` in pixels over its factor (FLUX has none of its own)."""
    native = transformer_cfg.get("sample_size")
    if not native:
        sample = vae_cfg.get("sample_size") or 1024
        native = int(sample[0] if isinstance(sample, (list, tuple)) else sample) // vae_scale_factor(vae_cfg)
    return int(native[0] if isinstance(native, (list, tuple)) else native)


def guidance_mode(family: Family, transformer_cfg: dict[str, Any], profile_guidance: float | None,
                  pipeline_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's ``guidance``: FLUX.1-dev, FLUX.2 [dev] and Sana-Sprint embed the scale (``scale_input``:
    fed to the ``guidance`` input, no CFG batch); FLUX-schnell takes none, nor a step-distilled FLUX.2 [klein]
    (``is_distilled`` in ``pipeline_cfg``, model_index.json: the pipeline ignores its guidance scale); the others
    run classifier-free guidance (uncond first)."""
    if not family.feeds_guidance_embedding and transformer_cfg.get("guidance_embeds"):
        raise ModelError("the FLUX.2 [klein] transformer config sets guidance_embeds=true, but Flux2KleinPipeline "
                         "never feeds a guidance embedding (FLUX.2 [dev]'s Flux2Pipeline does); check that the "
                         "transformer folder belongs to this klein pipeline")
    if transformer_cfg.get("guidance_embeds"):
        return {"mode": "scale_input", "default_scale": profile_guidance if profile_guidance is not None
                else family.default_guidance, "input": "guidance"}
    if family.name == "flux" or family.unembedded_guidance == "none" or profile_guidance is None \
            or (pipeline_cfg or {}).get("is_distilled"):
        return {"mode": "none", "default_scale": 1.0}
    return {"mode": "cfg", "default_scale": profile_guidance, "batch_order": ["uncond", "cond"],
            "zero_uncond_for_empty_negative": False}


def uses_cfg(family: Family, transformer_cfg: dict[str, Any], pipeline_cfg: dict[str, Any] | None = None) -> bool:
    """Whether the loop runs classifier-free guidance batches (FLUX never does)."""
    return guidance_mode(family, transformer_cfg, 1.0, pipeline_cfg)["mode"] == "cfg"


def text_sequence(family: Family) -> int:
    """Tokens of text the transformer sees: the groups' lengths summed (SD3: 77 CLIP + 256 T5)."""
    groups: dict[int, int] = {}
    for e in family.encoders:
        if e.hidden_state is not None:
            groups[e.sequence_group] = max(groups.get(e.sequence_group, 0), e.max_length)
    return sum(groups.values())


def denoiser_entry(family: Family, transformer_cfg: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``denoiser`` section."""
    inputs = {k: v for k, v in family.inputs.items() if v is not None}
    if guidance_mode(family, transformer_cfg, 1.0)["mode"] == "scale_input":
        inputs["guidance"] = "guidance"
    # FLUX feeds sigma (FluxPipeline: timestep / 1000); Sana multiplies by its config's timestep_scale
    scale = family.timestep_scale if family.timestep_scale is not None else \
        0.001 if family.name == "flux" else float(transformer_cfg.get("timestep_scale") or 1.0)
    entry = {"component": TRANSFORMER, "family": family.name, "latent_layout": family.latent_layout,
             "patch_size": patch_size(family, transformer_cfg), "timestep_scale": scale, "inputs": inputs,
             "output": "out_sample"}
    if family.position_ids != "flux":
        entry["position_ids"] = family.position_ids
    return entry
