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
