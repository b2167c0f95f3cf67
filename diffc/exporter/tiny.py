"""Tiny diffusers pipelines built from configs with fixed seeds: test fixtures and the demo model.

``write_tiny_pipeline(out_dir, kind)`` writes a complete pipeline folder with ``save_pretrained``, loadable by
``diffusers.DiffusionPipeline.from_pretrained`` and structured like the real model it stands for, so export
and build code meets the same classes, configs and folder layout -- only every width is tiny:

=========  ====================================  ==========================================================
kind       pipeline class / scheduler            stands for
=========  ====================================  ==========================================================
``sd``     StableDiffusionPipeline / PNDM        SD 1.5 (PNDM config exactly as SD 1.5 ships it)
``sdxl``   StableDiffusionXLPipeline / Euler     SDXL base 1.0 (two text encoders, ``text_time`` conditioning)
``lcm``    LatentConsistencyModelPipeline / LCM  LCM-Dreamshaper-v7 (UNet with ``time_cond_proj_dim``)
=========  ====================================  ==========================================================

Shapes (all kinds): UNet ``sample_size`` 16 (16x16x4 latents), VAE with two levels (``block_out_channels``
(32, 64)) as in diffusers' own ``get_dummy_components``, so **the VAE scale factor is 2** (not SD's 8) and the
native image is **32x32**; 4 latent channels; the UNet downsamples once, so the models take any multiple of
4 pixels (diffusers' pipelines still insist on multiples of 8).
Text encoders use the real CLIP BPE (``diffc/assets/clip_tokenizer``, 49408 ids) with hidden size 32
(SDXL's second one: 64, so the two encoders differ like CLIP-L/bigG do), 3 layers, 4 heads, 77 positions.

Weights are random, from ``torch.manual_seed`` per component, so two calls with the same ``seed`` write
byte-identical files. ``weights=DIR`` loads ``DIR/<component>.safetensors`` (state dicts of ``unet``, ``vae``,
``text_encoder`` [, ``text_encoder_2``]) instead (the trained demo has its own configs: diffc.exporter.demo);
:func:`save_component_weights` writes such a folder from a pipeline.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from diffc._fs import atomic_output_dir
from diffc.errors import ModelError, OutputExistsError

log = logging.getLogger("diffc.export")

PIPELINE_KINDS = ("sd", "sdxl", "lcm")

CLIP_TOKENIZER_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

#: component -> offset added to ``seed`` before it is initialised (order-independent, distinct streams)
_SEED_OFFSET = {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}

SAMPLE_SIZE = 16  # latent height/width the UNet is configured for
VAE_SCALE_FACTOR = 2  # 2 ** (len(vae block_out_channels) - 1)
LATENT_CHANNELS = 4
NATIVE_SIZE = SAMPLE_SIZE * VAE_SCALE_FACTOR  # 32 pixels

# --- schedulers, as the real models ship them --------------------------------------------------------------

_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
#: stable-diffusion-v1-5/scheduler/scheduler_config.json
SD15_PNDM = dict(_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
#: stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json
SDXL_EULER = dict(_BETAS, prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
                  timestep_spacing="leading", steps_offset=1)
#: LCM_Dreamshaper_v7/scheduler/scheduler_config.json
LCM_SCHEDULER = dict(_BETAS, clip_sample=False, set_alpha_to_one=True, steps_offset=1, prediction_type="epsilon",
                     original_inference_steps=50, timestep_spacing="leading", timestep_scaling=10.0)

# --- model configs -----------------------------------------------------------------------------------------


def _text_config(hidden_size: int, hidden_act: str, projection_dim: int | None = None) -> dict:
    return dict(
        vocab_size=49408,  # the real CLIP BPE ids go up to 49407
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=3,  # >= 3 so "penultimate layer" (SDXL, clip_skip) differs from first and last
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        projection_dim=projection_dim or hidden_size,  # only CLIPTextModelWithProjection uses it
    )


def _unet_config(kind: str) -> dict:
    common = dict(
        sample_size=SAMPLE_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,  # as the real models (and fused GroupNorm kernels) use
    )
    if kind == "sdxl":
        te1, te2 = _text_config(32, "quick_gelu"), _text_config(64, "gelu", projection_dim=32)
        time_dim = 8
        return dict(
            common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL: no attention at full resolution
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(4, 8),  # diffusers' legacy name: number of heads per block (head dim 8)
            use_linear_projection=True,
            cross_attention_dim=te1["hidden_size"] + te2["hidden_size"],  # the two encoders, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # 6 micro-conditioning numbers (original size, crop, target size) + the pooled text embedding
            projection_class_embeddings_input_dim=6 * time_dim + te2["projection_dim"],
        )
    cfg = dict(
        common,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),  # SD 1.x order: plain block at the bottom
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    if kind == "lcm":
        cfg["time_cond_proj_dim"] = 32  # guidance-scale embedding (LCM-Dreamshaper: 256)
    return cfg


def _vae_config(kind: str) -> dict:
    cfg = dict(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=NATIVE_SIZE,
        scaling_factor=0.18215,
    )
    if kind == "sdxl":
        cfg.update(scaling_factor=0.13025, force_upcast=True)
    return cfg


def tiny_configs(kind: str = "sd") -> dict:
    """The configs :func:`write_tiny_pipeline` builds from (for documentation and tests)."""
    _check_kind(kind)
    out = {
        "unet": _unet_config(kind),
        "vae": _vae_config(kind),
        "text_encoder": _text_config(32, "quick_gelu"),
    }
    if kind == "sdxl":
        out["text_encoder_2"] = _text_config(64, "gelu", projection_dim=32)
    return out


def _check_kind(kind: str) -> None:
    if kind not in PIPELINE_KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; choose one of {', '.join(PIPELINE_KINDS)}")


# --- building ----------------------------------------------------------------------------------------------


def _build_module(name: str, config: dict, seed: int):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed + _SEED_OFFSET[name])
        if name == "unet":
            module = UNet2DConditionModel(**config)
        elif name == "vae":
            module = AutoencoderKL(**config)
        elif name == "text_encoder":
            module = CLIPTextModel(CLIPTextConfig(**config))
        else:
            module = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    return module.eval()


def _load_weights(module, name: str, weights: Path) -> None:
    from safetensors.torch import load_file

    path = weights / f"{name}.safetensors"
    if not path.is_file():
        raise ModelError(f"weights folder {weights} has no {path.name}; it needs one state dict per component "
                         f"(see diffc.exporter.tiny.save_component_weights)")
    try:
        module.load_state_dict(load_file(str(path)), strict=True)
    except Exception as e:  # safetensors header errors, missing/unexpected keys, shape mismatches
        raise ModelError(f"cannot load {path} into the tiny {name}: {e}; were these weights saved from a "
                         f"pipeline of the same kind and diffc version?") from e


def _write_tokenizer(dest: Path, pad_token: str | None = None) -> None:
    """A copy of the shipped CLIP tokenizer; ``pad_token`` patches the configs (SDXL's tokenizer_2 pads with "!")."""
    missing = [f for f in _TOKENIZER_FILES if not (CLIP_TOKENIZER_ASSETS / f).is_file()]
    if missing:
        raise ModelError(f"diffc's CLIP tokenizer assets are incomplete ({', '.join(missing)} missing in "
                         f"{CLIP_TOKENIZER_ASSETS}); regenerate them with tools/convert_clip_bpe.py")
    if dest.exists():
        shutil.rmtree(dest)  # drop whatever save_pretrained wrote: we want the exact shipped files
    dest.mkdir(parents=True)
    for f in _TOKENIZER_FILES:
        shutil.copyfile(CLIP_TOKENIZER_ASSETS / f, dest / f)
    if pad_token is None:
        return
    # Like the real SDXL tokenizer_2: the pad token is a special token (transformers makes it one anyway, so
    # every "!" in a prompt becomes id 0 on its own); say so in tokenizer.json too, so it is self-describing.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.loads((dest / name).read_text(encoding="utf-8"))
        cfg["pad_token"] = pad_token
        (dest / name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    spec = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
    pad_id = spec["model"]["vocab"][pad_token]
    if not any(t["content"] == pad_token for t in spec["added_tokens"]):
        spec["added_tokens"].append({"id": pad_id, "content": pad_token, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
        spec["added_tokens"].sort(key=lambda t: t["id"])
    with open(dest / "tokenizer.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(spec, f, ensure_ascii=False, separators=(",", ":"))


def build_tiny_pipeline(kind: str = "sd", seed: int = 0, *, weights=None):
    """The tiny pipeline as an in-memory diffusers pipeline object (what :func:`write_tiny_pipeline` saves)."""
    _check_kind(kind)
    import diffusers
    from transformers import CLIPTokenizer

    weights = Path(weights) if weights is not None else None
    if weights is not None and not weights.is_dir():
        raise ModelError(f"weights folder {weights} does not exist; pass a folder of <component>.safetensors or None")

    modules = {}
    for name, config in tiny_configs(kind).items():
        module = _build_module(name, config, seed)
        if weights is not None:
            _load_weights(module, name, weights)
        modules[name] = module

    tokenizer = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_ASSETS))
    if kind == "sd":
        return diffusers.StableDiffusionPipeline(
            **modules, tokenizer=tokenizer, scheduler=diffusers.PNDMScheduler(**SD15_PNDM),
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )
    if kind == "lcm":
        return diffusers.LatentConsistencyModelPipeline(
            **modules, tokenizer=tokenizer, scheduler=diffusers.LCMScheduler(**LCM_SCHEDULER),
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
        )
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_ASSETS), pad_token="!")
    return diffusers.StableDiffusionXLPipeline(
        **modules, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        scheduler=diffusers.EulerDiscreteScheduler(**SDXL_EULER),
        image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def write_tiny_pipeline(out_dir, kind: str = "sd", seed: int = 0, *, weights=None) -> Path:
    """Write the tiny ``kind`` pipeline to ``out_dir`` (must not exist, or be empty); returns the folder.

    ``weights``: optional folder of ``<component>.safetensors`` state dicts loaded instead of the random init.
    """
    _check_kind(kind)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} already exists and is not empty; choose a new folder for the tiny pipeline")
    pipe = build_tiny_pipeline(kind, seed, weights=weights)
    with atomic_output_dir(out, force=True, what="tiny pipeline") as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        _write_tokenizer(tmp / "tokenizer")
        if kind == "sdxl":
            _write_tokenizer(tmp / "tokenizer_2", pad_token="!")
    log.info("wrote tiny %s pipeline (seed %d%s) to %s", kind, seed, f", weights {weights}" if weights else "", out)
    return out


def save_component_weights(pipe_or_folder, weights_dir) -> Path:
    """Write ``<component>.safetensors`` for each model of a tiny pipeline (object or folder): the ``weights=``
    format of :func:`write_tiny_pipeline`."""
    import torch
    from safetensors.torch import save_file

    pipe = pipe_or_folder
    if isinstance(pipe_or_folder, (str, Path)):
        import diffusers

        pipe = diffusers.DiffusionPipeline.from_pretrained(str(pipe_or_folder))  # saved as float32
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    for name in _SEED_OFFSET:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(weights_dir / f"{name}.safetensors"))
    return weights_dir


# --- ControlNet ----------------------------------------------------------------------------------------------

#: seed offset of the ``k``-th tiny ControlNet (``seed + CONTROLNET_SEED_OFFSET + k``): apart from the others
CONTROLNET_SEED_OFFSET = 10


def tiny_controlnet_config(kind: str = "sd") -> dict:
    """The tiny ControlNet's config, from the tiny UNet's: the same down path, plus a conditioning embedding that
    takes the control image at pixel size down by the VAE factor (2 here; SD's 8 has four channel widths)."""
    if kind not in ("sd", "sdxl"):
        raise ValueError(f"tiny ControlNets are built for kinds 'sd' and 'sdxl', got {kind!r}")
    unet = _unet_config(kind)
    keys = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "norm_num_groups",
            "cross_attention_dim", "attention_head_dim", "transformer_layers_per_block", "use_linear_projection",
            "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
    return {**{k: unet[k] for k in keys if k in unet}, "conditioning_embedding_out_channels": (16, 32)}


def build_tiny_controlnet(seed: int = 0, index: int = 0, kind: str = "sd"):
    """One tiny ``ControlNetModel`` with seeded random weights everywhere: diffusers zero-initialises the
    residual convolutions (``controlnet_down_blocks``, ``controlnet_mid_block``) and the conditioning embedding's
    output conv, which would make every residual zero and a parity test unable to fail; they get the default
    convolution init instead."""
    import torch
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + CONTROLNET_SEED_OFFSET + index)
        net = ControlNetModel(**tiny_controlnet_config(kind))
        for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
            conv.reset_parameters()
    return net.eval()


def build_tiny_controlnet_pipeline(controlnets: int = 1, seed: int = 0, kind: str = "sd"):
    """The tiny ``kind`` pipeline (``sd`` or ``sdxl``) as a ``StableDiffusionControlNetPipeline`` /
    ``StableDiffusionXLControlNetPipeline`` with ``controlnets`` ControlNets (more than one: diffusers'
    ``MultiControlNetModel``, saved as ``controlnet``, ``controlnet_1``, ...)."""
    import diffusers

    if controlnets < 1:
        raise ValueError(f"controlnets must be at least 1, got {controlnets}")
    base = build_tiny_pipeline(kind, seed)
    nets = [build_tiny_controlnet(seed, k, kind) for k in range(controlnets)]
    controlnet = nets[0] if controlnets == 1 else diffusers.MultiControlNetModel(nets)
    if kind == "sdxl":
        return diffusers.StableDiffusionXLControlNetPipeline(
            vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
            tokenizer_2=base.tokenizer_2, unet=base.unet, controlnet=controlnet, scheduler=base.scheduler,
            force_zeros_for_empty_prompt=True, add_watermarker=False, feature_extractor=None, image_encoder=None)
    return diffusers.StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=controlnet, scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False)


def write_tiny_controlnet_pipeline(out_dir, controlnets: int = 1, seed: int = 0, kind: str = "sd") -> Path:
    """Write :func:`build_tiny_controlnet_pipeline` to ``out_dir`` (must not exist, or be empty)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} already exists and is not empty; choose a new folder for the tiny pipeline")
    pipe = build_tiny_controlnet_pipeline(controlnets, seed, kind)
    with atomic_output_dir(out, force=True, what="tiny pipeline") as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        _write_tokenizer(tmp / "tokenizer")
        if kind == "sdxl":
            _write_tokenizer(tmp / "tokenizer_2", pad_token="!")
    log.info("wrote tiny %s ControlNet pipeline (%d ControlNet(s), seed %d) to %s", kind, controlnets, seed, out)
    return out
