"""The demo model behind ``diffc build demo``: a tiny latent text-to-image model trained on handwritten digits.

It has the Stable Diffusion shape -- ``AutoencoderKL``, ``UNet2DConditionModel`` with cross-attention,
``CLIPTextModel`` behind the real CLIP BPE tokenizer, a DDIM scheduler config -- and is saved as a
``StableDiffusionPipeline`` folder, so exporting and building it exercises the same code paths as SD 1.5.
Only the sizes are tiny (see ``docs/demo.md``):

* images are **32x32**: MNIST digits (28x28, white on black), padded by 2 pixels, grey replicated to RGB;
* the VAE downsamples by **4** into **8x8x4** latents; the training script folds the latent normalisation
  into the VAE's ``quant_conv`` / ``post_quant_conv``, so its latents have unit variance and
  ``scaling_factor`` is 1;
* the UNet has two levels (8x8, 4x4) of width (48, 96), both with cross-attention;
* the text encoder is a 3-layer, 32-wide CLIP text transformer over the full 49408-token vocabulary (its
  token embedding is most of its weights: the vocabulary is fixed by the real tokenizer);
* the scheduler is v-prediction on SD's ``scaled_linear`` betas rescaled to zero terminal SNR, with
  ``trailing`` timestep spacing: a 1- to 4-step sampler then starts from pure noise at t=999, which is what
  makes few-step sampling work (arXiv 2305.08891).

The weights are trained by ``tools/train_demo.py`` (CPU, deterministic, ~20 minutes) and shipped as fp16
safetensors in ``diffc/assets/demo_weights/`` (one state dict per component); they are loaded into fp32 modules.
"""

from __future__ import annotations

import logging
from pathlib import Path

from diffc.errors import ModelError

log = logging.getLogger("diffc.export")

#: trained weights for the demo, one safetensors state dict per component (written by tools/train_demo.py)
DEMO_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "demo_weights"
DEMO_COMPONENTS = ("unet", "vae", "text_encoder")

NATIVE_SIZE = 32  # pixels (MNIST's 28 padded to a multiple of the 8 the UNet + VAE need)
VAE_SCALE_FACTOR = 4  # 2 ** (len(vae block_out_channels) - 1)
LATENT_CHANNELS = 4
SAMPLE_SIZE = NATIVE_SIZE // VAE_SCALE_FACTOR  # 8x8 latents

#: the prompt the README, the benchmark and the tests use; ``{}`` is a digit's English name
PROMPT_TEMPLATE = "a handwritten digit {}"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: ``DDIMScheduler`` kwargs. clip_sample off (latents are not bounded), set_alpha_to_one so the last step of a
#: trailing schedule lands on the clean sample. "trailing" spacing ignores steps_offset; it is 1 because
#: StableDiffusionPipeline rewrites any other value to 1 (with a deprecation warning).
DEMO_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    rescale_betas_zero_snr=True,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=1,
)

_TEXT_ENCODER = dict(
    vocab_size=49408,  # the real CLIP BPE ids go up to 49407
    hidden_size=32,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,  # the tokenizer pads with <|endoftext|>
    projection_dim=32,
)

_UNET = dict(
    sample_size=SAMPLE_SIZE,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    block_out_channels=(48, 96),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),  # diffusers' legacy name: heads per block (head dim 24)
    cross_attention_dim=_TEXT_ENCODER["hidden_size"],
    norm_num_groups=16,
    time_embedding_dim=128,
)

_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=LATENT_CHANNELS,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=NATIVE_SIZE,
    scaling_factor=1.0,  # the latent normalisation is folded into the weights (see the module docstring)
)


def demo_configs() -> dict[str, dict]:
    """The component configs of the demo model (copies: callers may change them)."""
    return {"unet": dict(_UNET), "vae": dict(_VAE), "text_encoder": dict(_TEXT_ENCODER)}


def demo_prompt(digit: int) -> str:
    return PROMPT_TEMPLATE.format(DIGIT_WORDS[digit])


def build_demo_modules(seed: int = 0) -> dict:
    """Freshly initialised fp32 modules from :func:`demo_configs` (what training starts from)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = demo_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "vae": AutoencoderKL(**cfg["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        }


def load_demo_weights(modules: dict, weights=DEMO_WEIGHTS) -> dict:
    """Load ``weights/<component>.safetensors`` (fp16 or fp32) into ``modules`` (fp32), strictly."""
    import torch
    from safetensors.torch import load_file

    weights = Path(weights)
    missing = [c for c in DEMO_COMPONENTS if not (weights / f"{c}.safetensors").is_file()]
    if missing:
        raise ModelError(
            f"the demo model's trained weights are missing ({', '.join(f'{c}.safetensors' for c in missing)} "
            f"in {weights}); restore diffc/assets/demo_weights from the repository, or train them with "
            "`python tools/train_demo.py` (needs the 'train' extra: pip install -e '.[export,train]')")
    for name in DEMO_COMPONENTS:
        path = weights / f"{name}.safetensors"
        try:
            state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
            modules[name].load_state_dict(state, strict=True)
        except Exception as e:  # safetensors header errors, missing/unexpected keys, shape mismatches
            raise ModelError(f"cannot load {path} into the demo {name}: {e}; the weights do not match the configs "
                             "in diffc/exporter/demo.py -- retrain them with tools/train_demo.py") from e
    return modules


def build_demo_pipeline(weights=DEMO_WEIGHTS):
    """The trained demo model as an in-memory ``StableDiffusionPipeline`` (fp32, eval mode)."""
    import diffusers
    from transformers import CLIPTokenizer

    from diffc.exporter.tiny import CLIP_TOKENIZER_ASSETS

    modules = load_demo_weights(build_demo_modules(), weights)
    return diffusers.StableDiffusionPipeline(
        **{k: m.eval() for k, m in modules.items()},
        tokenizer=CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_ASSETS)),
        scheduler=diffusers.DDIMScheduler(**DEMO_SCHEDULER),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def write_demo_pipeline(out_dir) -> Path:
    """Write the demo diffusers pipeline folder to ``out_dir`` (must not exist, or be empty); returns it.

    Raises :class:`~diffc.errors.ModelError` when the trained weights are missing: a random demo would build
    and run but draw noise, which no one should mistake for the demo.
    """
    from diffc._fs import atomic_output_dir
    from diffc.errors import OutputExistsError
    from diffc.exporter.tiny import _write_tokenizer

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} already exists and is not empty; choose a new folder for the demo pipeline")
    pipe = build_demo_pipeline(DEMO_WEIGHTS)
    with atomic_output_dir(out, force=True, what="demo pipeline") as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        _write_tokenizer(tmp / "tokenizer")  # the exact shipped files, not transformers' re-serialisation
    log.info("wrote the demo pipeline (weights %s) to %s", DEMO_WEIGHTS, out)
    return out
