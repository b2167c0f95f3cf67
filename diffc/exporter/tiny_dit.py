"""Tiny transformer-denoiser (DiT) pipelines built from configs with fixed seeds: export test fixtures.

The counterpart of :mod:`diffc.exporter.tiny` for the families whose denoiser is a transformer.
``write_tiny_dit_pipeline(out_dir, kind)`` writes a pipeline folder with ``save_pretrained`` that diffusers
loads with ``DiffusionPipeline.from_pretrained`` and that has the real model's classes, component names and
folder layout, only every width is tiny:

==========  ========================  =====================================================================
kind        pipeline class            stands for (what is kept)
==========  ========================  =====================================================================
``flux``    FluxPipeline              FLUX.1-dev: CLIP pooled + T5 states, 1 double + 1 single block, RoPE
                                      axes (2, 2, 4), guidance embedding, 16-channel VAE with shift_factor
                                      (``guidance=False``: FLUX.1-schnell)
``sd3``     StableDiffusion3Pipeline  SD3.5: CLIP-L + CLIP-G (with projections) + T5, QK RMSNorm, one
                                      MMDiT-X dual-attention layer, 16-channel VAE with shift_factor
``pixart``  PixArtSigmaPipeline       PixArt-Sigma: T5 with attention mask, AdaLN-single, learned sigma
``sana``    SanaPipeline              Sana: Gemma-2 states with attention mask, linear attention, DC-AE
``sana_sprint`` SanaSprintPipeline    Sana-Sprint: Sana's transformer with the guidance embedding and QK
                                      RMSNorm, the SCM (trigflow) scheduler
``flux2_klein`` Flux2KleinPipeline    FLUX.2 [klein]: Qwen3 (28 layers, states of layers 9 / 18 / 27 stacked,
                                      chat template), 4-axis RoPE ids, ``AutoencoderKLFlux2`` (2x2 patchified
                                      latents normalized by its BatchNorm statistics); ``guidance=False``:
                                      the step-distilled variant (``is_distilled``: no CFG)
``flux2_dev`` Flux2Pipeline           FLUX.2 [dev]: Mistral-3 (``Mistral3ForConditionalGeneration``: a 31-layer
                                      language model, states of layers 10 / 20 / 30 stacked, and a one-layer
                                      Pixtral vision tower the text-to-image path never runs), the Mistral chat
                                      template with FLUX.2's system message, the guidance embedding
==========  ========================  =====================================================================

Every VAE has two levels, so **the VAE scale factor is 2**; latents are 16x16 at the native 32x32 pixels.

The T5 and Gemma tokenizers are trained here, at fixture-build time: a sentencepiece model (unigram for T5,
byte-fallback BPE for Gemma, with the real special-token ids) on a fixed synthetic corpus, converted by
transformers' own sp -> ``tokenizer.json`` conversion, exactly the file a real checkpoint ships and diffc's
runtime reads with the ``tokenizers`` library alone. Building a fixture needs ``sentencepiece``; running an
artifact does not. CLIP tokenizers are the real CLIP BPE (``diffc/assets/clip_tokenizer``).

Weights are random, from ``torch.manual_seed(seed + offset)`` per component, so the same ``seed`` writes the
same weights.
"""

from __future__ import annotations

import io
import json
import logging
import random
import tempfile
from pathlib import Path

from diffc._fs import atomic_output_dir
from diffc.errors import ModelError, OutputExistsError
from diffc.exporter.tiny import CLIP_TOKENIZER_ASSETS, _text_config, _write_tokenizer

log = logging.getLogger("diffc.export")

DIT_KINDS = ("flux", "sd3", "pixart", "sana", "sana_sprint", "flux2_klein", "flux2_dev")
PIPELINE_CLASS = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "pixart": "PixArtSigmaPipeline",
                  "sana": "SanaPipeline", "sana_sprint": "SanaSprintPipeline", "flux2_klein": "Flux2KleinPipeline",
                  "flux2_dev": "Flux2Pipeline"}

_SEED_OFFSET = {"transformer": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3, "text_encoder_3": 4}

NATIVE_SIZE = 32  # pixels; latents 16x16
VAE_SCALE_FACTOR = 2
#: the tokenizers' model_max_length (google/t5-v1_1-xxl's tokenizer says 512; Gemma-2's is effectively unbounded)
T5_MAX_LENGTH = 512

# --- schedulers as the real checkpoints ship them ------------------------------------------------------------

#: black-forest-labs/FLUX.1-dev/scheduler/scheduler_config.json (schnell: use_dynamic_shifting False, shift 1.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
#: stabilityai/stable-diffusion-3.5-medium/scheduler/scheduler_config.json
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
#: PixArt-alpha/PixArt-Sigma-XL-2-1024-MS/scheduler/scheduler_config.json (lambda_min_clipped=-inf left at
#: its default; save_pretrained writes it as -Infinity). ``variance_type`` is null: the pipeline drops the
#: learned-sigma half itself, and with "learned_range" the scheduler would keep 3 of the 4 latent channels
#: (diffusers' own pipeline call fails on it)
PIXART_SCHEDULER = dict(algorithm_type="dpmsolver++", beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        num_train_timesteps=1000, prediction_type="epsilon", solver_order=2, solver_type="midpoint",
                        lower_order_final=True, timestep_spacing="linspace", variance_type=None,
                        steps_offset=0)
#: Efficient-Large-Model/Sana_1600M_1024px_diffusers/scheduler/scheduler_config.json
SANA_SCHEDULER = dict(algorithm_type="dpmsolver++", beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                      num_train_timesteps=1000, prediction_type="flow_prediction", solver_order=2,
                      solver_type="midpoint", lower_order_final=True, timestep_spacing="linspace",
                      use_flow_sigmas=True, flow_shift=3.0, final_sigmas_type="zero", steps_offset=0)
#: Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers/scheduler/scheduler_config.json
SANA_SPRINT_SCHEDULER = dict(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)
#: black-forest-labs/FLUX.2-klein-4B/scheduler/scheduler_config.json (FLUX.2's: shift 3.0 with dynamic shifting;
#: the pipeline computes ``mu`` itself with compute_empirical_mu)
FLUX2_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                       max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")

# --- model configs -------------------------------------------------------------------------------------------


def _vae_kl_config(latent_channels: int, scaling_factor: float, shift_factor: float | None) -> dict:
    cfg = dict(in_channels=3, out_channels=3, latent_channels=latent_channels,
               down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
               up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64),
               layers_per_block=1, norm_num_groups=32, sample_size=NATIVE_SIZE, scaling_factor=scaling_factor)
    if shift_factor is not None:
        # FLUX / SD3: latents = (z - shift) * scale, and the VAE has no quant convs
        cfg.update(shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)
    return cfg


def _t5_config(vocab_size: int, d_model: int) -> dict:
    """T5 v1.1 (gated GELU), as FLUX / SD3 / PixArt-Sigma use; ``vocab_size`` is the trained tokenizer's."""
    return dict(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=0,
                eos_token_id=1, decoder_start_token_id=0)


def _gemma2_config(vocab_size: int) -> dict:
    """Gemma-2 (sliding-window + global layers, logit soft-capping), as Sana's text encoder."""
    return dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                sliding_window=8, query_pre_attn_scalar=8, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                hidden_activation="gelu_pytorch_tanh", attention_dropout=0.0)


def _qwen3_config(vocab_size: int, layers: int = 28) -> dict:
    """Qwen3 (GQA, QK RMSNorm), as FLUX.2 [klein]'s text encoder; 28 layers so that the pipeline's layers 9, 18
    and 27 are all intermediate ones, as in the real 36-layer encoder."""
    return dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                rope_theta=1000000.0, tie_word_embeddings=True, pad_token_id=0, bos_token_id=None,
                eos_token_id=0, attention_dropout=0.0)


def _mistral3_config(vocab_size: int, layers: int = 31) -> dict:
    """``Mistral3ForConditionalGeneration`` as FLUX.2 [dev]'s text encoder (Mistral-Small-3.1: a Mistral language
    model without sliding window, plus a Pixtral vision tower and projector); 31 layers so that the pipeline's
    layers 10, 20 and 30 are all intermediate ones, as in the real 40-layer model."""
    text = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                rope_theta=1000000000.0, sliding_window=None, tie_word_embeddings=False,
                pad_token_id=MISTRAL_SPECIALS.index("<pad>"), bos_token_id=1, eos_token_id=2, attention_dropout=0.0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                  image_size=32, patch_size=8, num_channels=3)
    return dict(text_config=text, vision_config=vision, image_token_index=MISTRAL_SPECIALS.index("[IMG]"),
                spatial_merge_size=2, vision_feature_layer=-1, multimodal_projector_bias=False,
                tie_word_embeddings=False)


def tiny_dit_configs(kind: str, *, guidance: bool = True, t5_vocab: int = 0, gemma_vocab: int = 0,
                     qwen_vocab: int = 0, text_layers: int = 28, mistral_vocab: int = 0) -> dict:
    """The configs :func:`build_tiny_dit_pipeline` builds from (tokenizer vocab sizes are filled in there).
    ``text_layers``: FLUX.2's text encoder depth (see :func:`build_tiny_dit_pipeline`)."""
    _check_kind(kind)
    if kind == "flux2_dev":
        dev = tiny_dit_configs("flux2_klein", qwen_vocab=1)
        dev["transformer"].update(guidance_embeds=True)
        dev["text_encoder"] = _mistral3_config(mistral_vocab, text_layers)
        return dev
    if kind == "flux2_klein":
        return {
            # 32 VAE channels x 2 x 2 = 128 patchified; joint_attention_dim = 3 stacked Qwen3 layers x 16;
            # head dim 16 = sum(axes_dims_rope) over the 4 axes (t, h, w, l)
            "transformer": dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
                                guidance_embeds=False),
            "vae": dict(in_channels=3, out_channels=3, latent_channels=32,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64),
                        layers_per_block=1, norm_num_groups=32, sample_size=NATIVE_SIZE, patch_size=(2, 2)),
            "text_encoder": _qwen3_config(qwen_vocab, text_layers),
        }
    if kind == "sana_sprint":
        sprint = tiny_dit_configs("sana", gemma_vocab=gemma_vocab)
        sprint["transformer"].update(guidance_embeds=True, guidance_embeds_scale=0.1, qk_norm="rms_norm_across_heads",
                                     timestep_scale=1.0)
        return sprint
    if kind == "flux":
        return {
            # packed latents: 16 VAE channels x 2 x 2 = 64; head dim 8 = sum(axes_dims_rope)
            "transformer": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4)),
            "vae": _vae_kl_config(16, 0.3611, 0.1159),
            "text_encoder": _text_config(32, "quick_gelu"),
            "text_encoder_2": _t5_config(t5_vocab, 32),
        }
    if kind == "sd3":
        clip_l, clip_g = _text_config(32, "quick_gelu", 32), _text_config(64, "gelu", 64)
        return {
            # joint_attention_dim: T5's width, which must be >= CLIP-L + CLIP-G hidden (96): the pipeline pads
            # the CLIP states to it; pooled: CLIP-L + CLIP-G projections
            "transformer": dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                attention_head_dim=8, num_attention_heads=4, joint_attention_dim=128,
                                caption_projection_dim=32, pooled_projection_dim=96, pos_embed_max_size=24,
                                qk_norm="rms_norm", dual_attention_layers=(0,)),
            "vae": _vae_kl_config(16, 1.5305, 0.0609),
            "text_encoder": clip_l,
            "text_encoder_2": clip_g,
            "text_encoder_3": _t5_config(t5_vocab, 128),
        }
    if kind == "pixart":
        return {
            "transformer": dict(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8,
                                num_attention_heads=3, caption_channels=32, in_channels=4, out_channels=8,
                                cross_attention_dim=24, attention_bias=True, activation_fn="gelu-approximate",
                                num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                                norm_eps=1e-6, use_additional_conditions=False, interpolation_scale=1),
            "vae": _vae_kl_config(4, 0.13025, None),
            "text_encoder": _t5_config(t5_vocab, 32),
        }
    return {
        "transformer": dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2,
                            attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                            cross_attention_dim=8, caption_channels=16, sample_size=16, mlp_ratio=2.5),
        # DC-AE with one EfficientViT (linear-attention) level: scale 2 here, 32 in the real one
        "vae": dict(in_channels=3, latent_channels=4, attention_head_dim=2,
                    encoder_block_types=("ResBlock", "EfficientViTBlock"),
                    decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                    decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                    decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                    decoder_layers_per_block=(1, 1), downsample_block_type="conv", upsample_block_type="interpolate",
                    decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407),
        "text_encoder": _gemma2_config(gemma_vocab),
    }


def _check_kind(kind: str) -> None:
    if kind not in DIT_KINDS:
        raise ValueError(f"unknown tiny DiT pipeline kind {kind!r}; choose one of {', '.join(DIT_KINDS)}")


# --- tokenizers ----------------------------------------------------------------------------------------------

_WORDS = (
    "a an the of on in at with and by photo painting portrait cat dog horse astronaut city night day sun moon "
    "red green blue yellow black white golden small large tiny huge old young happy beautiful detailed sharp "
    "focus oil canvas watercolor digital art render cinematic lighting high quality 4k 8k ultra realistic forest "
    "river mountain ocean beach sky clouds rain snow street car bus train flower tree garden house castle robot "
    "dragon riding sitting standing running flying sleeping mars space station window table chair book cup "
    "coffee tea prompt user enhanced generate description scene colors shapes textures "
    "café crème naïve résumé 東京 夜景 の über straße zürich ñ ç"
).split()


def _corpus(n: int = 2000) -> list[str]:
    rng = random.Random(1234)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]


def _train_sentencepiece(**options) -> bytes:
    try:
        import sentencepiece as spm
    except ImportError as e:
        raise ModelError("building the tiny T5 / Gemma tokenizers needs sentencepiece (pip install sentencepiece, "
                         "part of diffc's 'export' extra); artifacts run without it") from e
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=model, num_threads=1,
                                   minloglevel=2, character_coverage=1.0, hard_vocab_limit=False,
                                   shuffle_input_sentence=False, normalization_rule_name="identity", **options)
    return model.getvalue()


def build_t5_tokenizer():
    """A T5 tokenizer (unigram; ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 as in T5) from a freshly trained sp model."""
    from transformers import T5Tokenizer

    sp = _train_sentencepiece(vocab_size=256, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    with tempfile.TemporaryDirectory(prefix="diffc-t5-") as tmp:
        (Path(tmp) / "spiece.model").write_bytes(sp)
        # from_pretrained on a folder holding only spiece.model runs transformers' sp -> tokenizers conversion
        return T5Tokenizer.from_pretrained(tmp, extra_ids=0, model_max_length=T5_MAX_LENGTH, legacy=False)


def build_gemma_tokenizer():
    """A Gemma tokenizer (byte-fallback BPE; ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3 as in Gemma-2,
    BOS added, no EOS) from a freshly trained sp model."""
    from transformers import GemmaTokenizer

    sp = _train_sentencepiece(vocab_size=400, model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                              pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                              byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
                              split_digits=True, allow_whitespace_only_pieces=True,
                              user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    with tempfile.TemporaryDirectory(prefix="diffc-gemma-") as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(sp)
        return GemmaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)


#: the chat template of Qwen3's tokenizer, reduced to what FLUX.2 [klein] renders (one user message, a generation
#: prompt, ``enable_thinking=False``): the same text as the real template for that call. diffc renders the
#: checkpoint's own template at build time (diffc.exporter.pipeline_data), so this only has to be Qwen3-like.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def build_qwen2_tokenizer():
    """A Qwen2 tokenizer (byte-level BPE with Qwen2's pre-tokenizer regex; ``<|endoftext|>`` pad 0, the chat
    special tokens after it) trained here with the ``tokenizers`` library on the fixture corpus."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import Qwen2Tokenizer

    base = Qwen2Tokenizer()  # Qwen2's normalizer and pre-tokenizer, an empty vocabulary
    tok = Tokenizer(models.BPE())
    tok.normalizer = base.backend_tokenizer.normalizer
    tok.pre_tokenizer = base.backend_tokenizer.pre_tokenizer
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    from tokenizers.pre_tokenizers import ByteLevel

    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = {k: v for k, v in model["vocab"].items()}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    qwen = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=131072)
    qwen.add_tokens(specials[1:3], special_tokens=True)
    qwen.add_tokens(specials[3:])
    qwen.chat_template = QWEN3_CHAT_TEMPLATE
    return qwen


#: the special tokens of Mistral-Small-3.1's tokenizer that FLUX.2 [dev]'s prompts touch, at the real ids' order
#: (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``[INST]`` 3, ``[/INST]`` 4; the image tokens; ``<pad>``)
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]

#: Mistral-Small-3.1's chat template reduced to what ``Flux2Pipeline`` renders (a system message and one user
#: message, content as ``[{"type": "text", ...}]`` blocks; ``[IMG]`` for an image block): the same text as the
#: real template for that call. diffc renders the checkpoint's own template at build time, so this only has to
#: be Mistral-like (the BOS written by the template, not by the tokenizer's post-processor).
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' }}{%- elif message['role'] == 'user' %}"
    "{{- '[INST]' }}{%- endif %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}{%- else %}{{- '[IMG]' }}{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[/SYSTEM_PROMPT]' }}{%- elif message['role'] == 'user' %}"
    "{{- '[/INST]' }}{%- else %}{{- eos_token }}{%- endif %}{%- endfor %}"
)


def build_mistral_tokenizer(padding_side: str = "left"):
    """A Mistral-Small-3.1-like fast tokenizer (Tekken-style byte-level BPE behind a split regex, ``<s>`` added
    by its post-processor, ``<pad>`` pads) trained here with the ``tokenizers`` library on the fixture corpus,
    with :data:`MISTRAL_CHAT_TEMPLATE`. The real pipeline wraps its tokenizer in a ``PixtralProcessor``, which
    needs torchvision; the pipeline calls the same ``apply_chat_template`` on either."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tekken_split = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?"
                    r"[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tekken_split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=MISTRAL_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    mistral = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="<pad>", padding_side=padding_side, model_max_length=131072)
    mistral.chat_template = MISTRAL_CHAT_TEMPLATE
    return mistral


def _randomize_batch_norm(vae, seed: int) -> None:
    """``AutoencoderKLFlux2.bn``'s running statistics start at mean 0 / variance 1, which would hide a missing or
    wrong (de)normalization; a trained VAE has its own, so the fixture draws some."""
    import torch

    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=gen) * 0.3)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=gen) * 1.5 + 0.25)


# --- building ------------------------------------------------------------------------------------------------


def _build_module(name: str, cls_name: str, config: dict, seed: int):
    import diffusers
    import torch
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + _SEED_OFFSET[name])
        if cls_name in _CONFIG_CLASSES:
            module = getattr(transformers, cls_name)(getattr(transformers, _CONFIG_CLASSES[cls_name])(**config))
        else:
            module = getattr(diffusers, cls_name)(**config)
    return module.eval()


#: transformers model class -> its config class (everything else is a diffusers model built from kwargs)
_CONFIG_CLASSES = {"CLIPTextModel": "CLIPTextConfig", "CLIPTextModelWithProjection": "CLIPTextConfig",
                   "T5EncoderModel": "T5Config", "Gemma2Model": "Gemma2Config", "Qwen3ForCausalLM": "Qwen3Config",
                   "Mistral3ForConditionalGeneration": "Mistral3Config"}

#: kind -> component -> model class
_CLASSES = {
    "flux": {"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
             "text_encoder_2": "T5EncoderModel"},
    "sd3": {"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL",
            "text_encoder": "CLIPTextModelWithProjection", "text_encoder_2": "CLIPTextModelWithProjection",
            "text_encoder_3": "T5EncoderModel"},
    "pixart": {"transformer": "PixArtTransformer2DModel", "vae": "AutoencoderKL", "text_encoder": "T5EncoderModel"},
    "sana": {"transformer": "SanaTransformer2DModel", "vae": "AutoencoderDC", "text_encoder": "Gemma2Model"},
    "sana_sprint": {"transformer": "SanaTransformer2DModel", "vae": "AutoencoderDC", "text_encoder": "Gemma2Model"},
    "flux2_klein": {"transformer": "Flux2Transformer2DModel", "vae": "AutoencoderKLFlux2",
                    "text_encoder": "Qwen3ForCausalLM"},
    "flux2_dev": {"transformer": "Flux2Transformer2DModel", "vae": "AutoencoderKLFlux2",
                  "text_encoder": "Mistral3ForConditionalGeneration"},
}


def build_tiny_dit_pipeline(kind: str, seed: int = 0, *, guidance: bool = True, text_layers: int | None = None):
    """The tiny ``kind`` pipeline as an in-memory diffusers pipeline (what :func:`write_tiny_dit_pipeline` saves).

    ``guidance``: FLUX only; ``False`` builds the schnell variant (no guidance embedding, no dynamic shifting).
    For ``flux2_klein``, ``False`` builds the step-distilled variant (``is_distilled``: the pipeline runs no CFG).
    ``text_layers``: klein's Qwen3 depth; the default 28 serves the pipeline's layers 9 / 18 / 27. A shallower
    encoder (tests: 4, a seventh of the graph to export and clean up) needs the build's
    ``diffc.exporter.dit.FLUX2_TEXT_LAYERS`` and the pipeline call's ``text_encoder_out_layers`` set to match.
    For ``flux2_dev`` it is the Mistral language model's depth (default 31, for layers 10 / 20 / 30;
    ``diffc.exporter.dit.FLUX2_DEV_TEXT_LAYERS``).
    """
    _check_kind(kind)
    import diffusers
    from transformers import CLIPTokenizer

    t5 = build_t5_tokenizer() if kind in ("flux", "sd3", "pixart") else None
    gemma = build_gemma_tokenizer() if kind in ("sana", "sana_sprint") else None
    qwen = build_qwen2_tokenizer() if kind == "flux2_klein" else None
    mistral = build_mistral_tokenizer() if kind == "flux2_dev" else None
    if text_layers is None:
        text_layers = 31 if kind == "flux2_dev" else 28
    configs = tiny_dit_configs(kind, guidance=guidance, t5_vocab=len(t5) if t5 else 0,
                               gemma_vocab=len(gemma) if gemma else 0, qwen_vocab=len(qwen) if qwen else 0,
                               text_layers=text_layers, mistral_vocab=len(mistral) if mistral else 0)
    modules = {name: _build_module(name, _CLASSES[kind][name], cfg, seed) for name, cfg in configs.items()}
    if kind == "flux2_dev":
        _randomize_batch_norm(modules["vae"], seed)
        return diffusers.Flux2Pipeline(**modules, tokenizer=mistral,
                                       scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER))
    if kind == "flux2_klein":
        _randomize_batch_norm(modules["vae"], seed)
        return diffusers.Flux2KleinPipeline(
            **modules, tokenizer=qwen, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER),
            is_distilled=not guidance)
    if kind == "sana_sprint":
        return diffusers.SanaSprintPipeline(**modules, tokenizer=gemma,
                                            scheduler=diffusers.SCMScheduler(**SANA_SPRINT_SCHEDULER))
    if kind == "flux":
        sched = dict(FLUX_SCHEDULER) if guidance else dict(FLUX_SCHEDULER, shift=1.0, use_dynamic_shifting=False)
        return diffusers.FluxPipeline(
            **modules, tokenizer=CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_ASSETS)), tokenizer_2=t5,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**sched))
    if kind == "sd3":
        clip = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_ASSETS))
        clip_2 = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_ASSETS), pad_token="!")
        return diffusers.StableDiffusion3Pipeline(
            **modules, tokenizer=clip, tokenizer_2=clip_2, tokenizer_3=t5,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER))
    if kind == "pixart":
        return diffusers.PixArtSigmaPipeline(**modules, tokenizer=t5,
                                             scheduler=diffusers.DPMSolverMultistepScheduler(**PIXART_SCHEDULER))
    return diffusers.SanaPipeline(**modules, tokenizer=gemma,
                                  scheduler=diffusers.DPMSolverMultistepScheduler(**SANA_SCHEDULER))


def write_tiny_dit_pipeline(out_dir, kind: str, seed: int = 0, *, guidance: bool = True,
                            text_layers: int | None = None) -> Path:
    """Write the tiny ``kind`` pipeline to ``out_dir`` (must not exist, or be empty); returns the folder."""
    _check_kind(kind)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} already exists and is not empty; choose a new folder for the tiny pipeline")
    pipe = build_tiny_dit_pipeline(kind, seed, guidance=guidance, text_layers=text_layers)
    with atomic_output_dir(out, force=True, what="tiny pipeline") as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        # the shipped CLIP BPE files, exactly (SD3's second CLIP pads with "!", like SDXL's)
        if kind in ("flux", "sd3"):
            _write_tokenizer(tmp / "tokenizer")
        if kind == "sd3":
            _write_tokenizer(tmp / "tokenizer_2", pad_token="!")
    log.info("wrote tiny %s pipeline (seed %d) to %s", kind, seed, out)
    return out
