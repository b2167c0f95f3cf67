"""Test LoRA files for the tiny pipelines: a peft one (random B, so it changes the image) and copies of it in
the kohya / A1111 layout, made the way trainers make them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

#: what the test LoRAs adapt: attention, feed-forward and the transformer blocks' projections (kohya's default
#: UNet targets); q/k/v/out and the MLP of the text encoders
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK = 4


def make_peft_lora(folder: Path, out: Path, *, seed: int = 0, std: float = 0.05) -> Path:
    """A peft LoRA for the pipeline at ``folder``: ``get_peft_model_state_dict`` of the UNet and text encoder(s)
    after adding a LoraConfig with random B (peft zero-inits it, which would be a no-op LoRA), saved with
    diffusers' component prefixes (``unet.`` / ``text_encoder.`` / ``text_encoder_2.``)."""
    import diffusers
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(seed)
    state = {}
    for comp, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS), ("text_encoder_2", TEXT_TARGETS)):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        # lora_alpha = rank: diffusers reads a file without adapter metadata as alpha = rank
        inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets,
                                           init_lora_weights="gaussian"), model)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=std)
        state.update({f"{comp}.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})
    return out


KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_copy(peft_file: Path, out: Path, *, alpha: float = 2.0 * RANK, sdxl: bool = False) -> Path:
    """The same LoRA in the kohya (sd-scripts) / A1111 layout: ``lora_unet_<module_with_underscores>
    .lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; text encoders as ``lora_te_text_model_...`` (SD) or
    ``lora_te1_`` / ``lora_te2_`` (SDXL). ``up`` is divided by ``alpha / rank`` so the LoRA is the same one."""
    from safetensors.numpy import load_file, save_file

    src = load_file(str(peft_file))
    dst = {}
    for key, value in src.items():
        if not key.endswith(".lora_A.weight"):
            continue
        comp, _, module = key.removesuffix(".lora_A.weight").partition(".")
        up = src[key.replace(".lora_A.", ".lora_B.")]
        if comp.startswith("text_encoder"):
            module = "text_model." + module.removeprefix("text_model.")
        prefix = KOHYA_PREFIX[comp] if sdxl or comp != "text_encoder" else "lora_te_"
        name = prefix + module.replace(".", "_")
        dst[name + ".lora_down.weight"] = value
        dst[name + ".lora_up.weight"] = (up / np.float32(alpha / RANK)).astype(np.float32)
        dst[name + ".alpha"] = np.array(alpha, np.float32)
    save_file(dst, str(out))
    return out


@pytest.fixture(scope="session")
def lora_makers():
    """(make_peft_lora, kohya_copy) for test modules (pytest's importlib mode cannot import this file)."""
    pytest.importorskip("peft")
    return make_peft_lora, kohya_copy
