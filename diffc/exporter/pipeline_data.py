"""What the build stages read from the loaded diffusers pipeline besides its ONNX graphs.

The stages in :mod:`diffc.build` are torch-free; whatever needs the torch modules or the transformers
tokenizers (sample inputs for a check, the fast tokenizer's files, the weights' size) is asked of this module,
so torch, transformers and diffusers stay inside ``diffc/exporter/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffc.exporter.contracts import get_contract
from diffc.exporter.export import component_module, sample_shapes


def configs(pipe) -> dict[str, dict[str, Any]]:
    """The denoiser's (``unet`` or ``transformer``) and the VAE's config as plain dicts (what the build's plan
    reads)."""
    denoiser = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    vae = dict(pipe.vae.config)
    if type(pipe.vae).__name__ == "AutoencoderKLFlux2":
        # FLUX.2's latents are normalized by the VAE's BatchNorm statistics, which its decoder graph undoes
        # (diffc.exporter.dit.Flux2VaeDecoder): the loop's latents go to it unscaled
        vae.update(scaling_factor=1.0, shift_factor=0.0)
    return {denoiser: dict(getattr(pipe, denoiser).config), "vae": vae}


def fp32_weight_bytes(pipe, components) -> int:
    """Bytes of the exported components' weights in fp32 (the disk check scales from it)."""
    return 4 * sum(p.numel() for n in components for p in component_module(pipe, n).parameters())


def sample_feeds(pipe, name: str, *, cache_marks: bool = False) -> list[dict[str, np.ndarray]]:
    """Feeds for ``name``'s graph at the export's two sample shapes, from the contract's seeded input factory
    (the same tensors the parity check runs): what the build checks a rewritten graph against its source on."""
    module = component_module(pipe, name)
    contract = get_contract(name, module, **({"cache_marks": True} if cache_marks else {}))
    feeds = []
    for shape in sample_shapes(pipe, name):
        inputs = contract.make_inputs(module, shape, torch.Generator().manual_seed(0))
        feeds.append({n: t.numpy() for n, t in zip(contract.input_names, inputs)})
    return feeds


def contract_atol(pipe, name: str, *, cache_marks: bool = False) -> float:
    """The absolute tolerance ``name``'s export contract declares."""
    module = component_module(pipe, name)
    return get_contract(name, module, **({"cache_marks": True} if cache_marks else {})).atol


def save_fast_tokenizer(pipe, source_path: Path, folder_name: str, dest: Path) -> dict[str, Any]:
    """Write the pipeline's tokenizer ``folder_name`` as a fast (Rust ``tokenizers``) ``tokenizer.json`` plus
    its pad token into ``dest``, the form the runtime's tokenizer reads without transformers. Returns its
    ``pad_token``, ``pad_id`` and ``model_max_length``."""
    from transformers import AutoTokenizer, CLIPTokenizerFast

    tok = getattr(pipe, folder_name)
    tok = getattr(tok, "tokenizer", tok)  # a processor (FLUX.2 [dev]'s PixtralProcessor) wraps its tokenizer
    if not getattr(tok, "is_fast", False):
        # a slow (sentencepiece / python BPE) tokenizer: transformers converts the folder to the fast form
        fast = CLIPTokenizerFast if type(tok).__name__.startswith("CLIP") else AutoTokenizer
        tok = fast.from_pretrained(source_path / folder_name)
    dest.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps({"pad_token": tok.pad_token}))
    return {"pad_token": tok.pad_token, "pad_id": int(tok.pad_token_id), "model_max_length": tok.model_max_length}


def text_lengths(pipe, family) -> dict[str, list[int]]:
    """Tokens each text encoder of a transformer family is fed, where the tokenizer decides it: Sana's Gemma-2
    takes its complex human instruction plus ``max_sequence_length - 2`` tokens (``SanaPipeline
    ._get_gemma_prompt_embeds``: ``len(tokenizer.encode(chat_prompt)) + max_sequence_length - 2``)."""
    from diffc.runtime.tokenizer import SANA_COMPLEX_HUMAN_INSTRUCTION

    out = {}
    for e in family.encoders:
        if e.tokenizer_kind == "gemma":
            tok = getattr(pipe, e.tokenizer)
            # the negative prompt goes without the instruction: max_sequence_length tokens
            n = len(tok.encode("\n".join(SANA_COMPLEX_HUMAN_INSTRUCTION))) + e.max_length - 2
            out[e.component] = [min(n, e.max_length), n, max(n, e.max_length)]
    return out


#: stands for the prompt while a chat template is rendered; split on, it gives the text around any prompt
_CHAT_PLACEHOLDER = "\u2063diffc-prompt\u2063"


def chat_template_parts(pipe, folder_name: str) -> dict[str, str]:
    """The text a chat template puts before and after the prompt, as ``Flux2KleinPipeline`` renders it
    (one user message, ``add_generation_prompt=True``, ``enable_thinking=False``), and the tokenizer's padding
    side: what the runtime's ``ChatPromptTokenizer`` needs to tokenize without transformers or Jinja."""
    from diffc.errors import ModelError

    tok = getattr(pipe, folder_name)
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"tokenizer {folder_name!r} has no chat template (chat_template.jinja, or chat_template in "
                         "tokenizer_config.json); re-save the pipeline with its tokenizer's template")
    text = tok.apply_chat_template([{"role": "user", "content": _CHAT_PLACEHOLDER}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    if text.count(_CHAT_PLACEHOLDER) != 1:
        raise ModelError(f"tokenizer {folder_name!r}'s chat template does not put the prompt in its text exactly "
                         "once; diffc cannot reproduce it at run time")
    prefix, suffix = text.split(_CHAT_PLACEHOLDER)
    return {"chat_prefix": prefix, "chat_suffix": suffix, "padding_side": str(tok.padding_side)}


#: what ``Flux2Pipeline``'s ``format_input`` deletes from each prompt (the Pixtral processor counts ``[IMG]``
#: tokens against the images, and a text-to-image prompt has none)
FLUX2_DEV_PROMPT_REMOVES = ("[IMG]",)


def flux2_dev_chat_parts(pipe, folder_name: str) -> dict[str, Any]:
    """The chat-template text around the prompt as ``Flux2Pipeline._get_mistral_3_small_prompt_embeds`` renders it:
    diffusers' own ``format_input`` (the pipeline's ``system_message``, then one user message of one text block),
    ``add_generation_prompt=False``. A ``PixtralProcessor`` then tokenizes the text without the tokenizer's
    special tokens when the template already wrote its BOS (transformers' ``ProcessorMixin.apply_chat_template``),
    a bare tokenizer's template call never adds them: the manifest's ``add_special_tokens`` says which."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    from diffc.errors import ModelError

    tok = getattr(pipe, folder_name)
    tokenizer = getattr(tok, "tokenizer", tok)
    if not getattr(tok, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"tokenizer {folder_name!r} has no chat template (chat_template.jinja / chat_template.json "
                         "next to the processor); re-save the FLUX.2 [dev] pipeline with its processor's template")
    system = getattr(pipe, "system_message", None)
    if not isinstance(system, str):
        raise ModelError("the FLUX.2 [dev] pipeline has no system_message; diffc reads it from diffusers' "
                         "Flux2Pipeline (diffusers >= 0.36)")
    messages = format_input([_CHAT_PLACEHOLDER], system_message=system)[0]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if text.count(_CHAT_PLACEHOLDER) != 1:
        raise ModelError(f"tokenizer {folder_name!r}'s chat template does not put the prompt in its text exactly "
                         "once; diffc cannot reproduce it at run time")
    prefix, suffix = text.split(_CHAT_PLACEHOLDER)
    bos = getattr(tokenizer, "bos_token", None)
    add_special = tok is not tokenizer and not (bos is not None and text.startswith(bos))
    return {"chat_prefix": prefix, "chat_suffix": suffix, "padding_side": str(tokenizer.padding_side),
            "add_special_tokens": add_special, "prompt_removes": list(FLUX2_DEV_PROMPT_REMOVES)}
