"""Stage 7, tokenizers: the text conditioning the loop runs, written into the artifact.

For each text encoder of the pipeline: its tokenizer as a fast-tokenizer ``tokenizer.json`` (read by the
runtime without transformers), the token length, the pad id, and which encoder output conditions the UNet
(SDXL conditions on the penultimate hidden state of both encoders, SD 1.x / 2.x on the last one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffc._fs import sha256_file
from diffc.build.export import Exported
from diffc.build.plan import SEQUENCE

#: (text encoder, its tokenizer's folder) in the order the loop concatenates their outputs
ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def write(exported: Exported, artifact: Path) -> list[dict[str, Any]]:
    """Write every encoder's tokenizer into ``artifact/<tokenizer folder>/``; returns the manifest's
    ``text_encoders``."""
    from diffc.exporter.pipeline_data import save_fast_tokenizer

    if exported.family is not None:
        return _write_family(exported, artifact)
    present = exported.source.components
    is_sdxl = "text_encoder_2" in present
    encoders = []
    for enc, folder in ENCODERS:
        if enc not in present:
            continue
        dest = artifact / folder
        tok = save_fast_tokenizer(exported.pipe, exported.source.path, folder, dest)
        encoders.append({
            "component": enc,
            "tokenizer": f"{folder}/tokenizer.json",
            "tokenizer_sha256": sha256_file(dest / "tokenizer.json"),
            "max_length": int(min(tok["model_max_length"], SEQUENCE)),
            "pad_id": tok["pad_id"],
            "hidden_state": "penultimate_hidden_state" if is_sdxl else "last_hidden_state",
        })
    return encoders


def _write_family(exported: Exported, artifact: Path) -> list[dict[str, Any]]:
    """The ``text_encoders`` of a transformer family (:mod:`diffc.build.families`): which tokenizer, mask,
    outputs and sequence group each encoder has, as the runtime's :class:`~diffc.runtime.denoiser.TextEncoders`
    reads them."""
    from diffc.exporter.pipeline_data import save_fast_tokenizer
    from diffc.runtime.tokenizer import SANA_COMPLEX_HUMAN_INSTRUCTION

    encoders = []
    for e in exported.family.encoders:
        dest = artifact / e.tokenizer
        tok = save_fast_tokenizer(exported.pipe, exported.source.path, e.tokenizer, dest)
        entry: dict[str, Any] = {
            "component": e.component,
            "tokenizer": f"{e.tokenizer}/tokenizer.json",
            "tokenizer_sha256": sha256_file(dest / "tokenizer.json"),
            "max_length": e.max_length,
            "pad_id": tok["pad_id"],
            "hidden_state": e.hidden_state,
            "pooled": e.pooled,
            "tokenizer_kind": e.tokenizer_kind,
            "attention_mask": e.attention_mask,
            "sequence_group": e.sequence_group,
            "lowercase": e.lowercase,
        }
        if e.tokenizer_kind == "gemma":
            entry.update(max_length=exported.geometry["sequence"][e.component][1], max_sequence_length=e.max_length,
                         complex_human_instruction=list(SANA_COMPLEX_HUMAN_INSTRUCTION))
        if e.tokenizer_kind == "qwen_chat":  # FLUX.2 [klein]: the chat template, rendered around the prompt
            from diffc.exporter.pipeline_data import chat_template_parts

            entry.update(chat_template_parts(exported.pipe, e.tokenizer))
        if e.tokenizer_kind == "mistral_chat":  # FLUX.2 [dev]: its system message and the prompt, in the template
            from diffc.exporter.pipeline_data import flux2_dev_chat_parts

            entry.update(flux2_dev_chat_parts(exported.pipe, e.tokenizer))
        encoders.append(entry)
    return encoders
