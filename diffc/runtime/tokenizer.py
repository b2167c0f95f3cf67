"""Prompt -> CLIP token ids, torch-free (numpy + the ``tokenizers`` library only).

Reproduces what diffusers' Stable Diffusion pipelines do with their transformers ``CLIPTokenizer``::

    tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)

i.e. ``[BOS, tokens..., EOS, PAD, ...]`` of exactly ``max_length`` ids; a prompt that is too long keeps its first
``max_length - 2`` tokens and still ends with EOS, and a WARNING names the part that was cut off (diffusers
warns the same way).

The artifact ships the tokenizer folder's ``tokenizer.json`` (the full fast tokenizer: normalizer,
pre-tokenizer, BPE, BOS/EOS post-processor) and, next to it, ``tokenizer_config.json`` /
``special_tokens_map.json``, which only say which token pads: ``<|endoftext|>`` (49407) for SD 1.x and the
first SDXL tokenizer, ``!`` (0) for the second SDXL tokenizer and SD 2.x. Like transformers, the pad token is a
special token: with pad ``!`` every ``!`` in a prompt is encoded as id 0 on its own (what diffusers feeds SDXL).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer

from diffc.errors import ArtifactError

logger = logging.getLogger("diffc.runtime")

DEFAULT_PAD_TOKEN = "<|endoftext|>"
_END_OF_WORD = "</w>"
_REBUILD = "rebuild the artifact (diffc build) or restore its tokenizer files"


def _token_str(value) -> str | None:
    """A special token as tokenizer configs write it: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _configured_pad_token(folder: Path) -> str | None:
    """The pad token named by ``tokenizer_config.json`` (else ``special_tokens_map.json``) in ``folder``."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"tokenizer config {path} is unreadable or corrupt ({e}); {_REBUILD}") from e
        if not isinstance(cfg, dict):
            raise ArtifactError(f"tokenizer config {path} is not a JSON object; {_REBUILD}")
        pad = _token_str(cfg.get("pad_token"))
        if pad is not None:
            return pad
    return None


class PromptTokenizer:
    """Batch of prompts -> ``int64 (B, max_length)`` CLIP ids, padded and truncated like diffusers does.

    ``pad_id``: ``None`` (default) pads with the token ``tokenizer_config.json`` next to ``tokenizer.json``
    names (``<|endoftext|>`` when there is none); a string is a pad *token* (e.g. ``"!"``), an int a pad *id*.
    """

    def __init__(self, tokenizer_json_path, max_length: int = 77, pad_id: int | str | None = None):
        path = Path(tokenizer_json_path)
        if not path.is_file():
            raise ArtifactError(f"tokenizer file {path} is missing; {_REBUILD}")
        try:
            raw = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception on malformed JSON / unknown fields
            raise ArtifactError(f"tokenizer file {path} is corrupt ({e}); {_REBUILD}") from e
        if int(max_length) < 2:
            raise ValueError(f"max_length must be >= 2 (room for BOS and EOS), got {max_length}")
        self.path = path
        self.max_length = int(max_length)
        vocab_size = raw.get_vocab_size(with_added_tokens=True)

        if pad_id is None:
            pad_id = _configured_pad_token(path.parent) or DEFAULT_PAD_TOKEN
        if isinstance(pad_id, str):
            pad_token = pad_id
            resolved = raw.token_to_id(pad_token)
            if resolved is None:
                raise ArtifactError(f"tokenizer {path} has no pad token {pad_token!r} in its vocabulary; {_REBUILD}")
            pad_id = resolved
        else:
            pad_id = int(pad_id)
            if not 0 <= pad_id < vocab_size:
                raise ValueError(f"pad_id {pad_id} is outside the tokenizer's vocabulary (0..{vocab_size - 1})")
            pad_token = raw.id_to_token(pad_id)
        self.pad_id = int(pad_id)
        self.pad_token = pad_token
        self.vocab_size = vocab_size
        # transformers registers every configured special token (pad included) as a special added token, so
        # with SDXL's second tokenizer (pad "!") each "!" in a prompt becomes its own id 0 instead of merging
        # with its neighbours (diffusers issue #4153). Do the same, or our ids differ from diffusers' ids.
        raw.add_special_tokens([AddedToken(pad_token, special=True, normalized=False)])

        # `_tok` gives the model input. Truncation in `tokenizers` reserves room for the post-processor's BOS/EOS,
        # so EOS stays last. A copy without truncation, to say what was cut off, is made only when a prompt is
        # too long (a copy costs as much as the load: 0.2 s for CLIP's vocabulary)
        self._tok = raw
        self._tok.enable_truncation(max_length=self.max_length)
        self._tok.enable_padding(length=self.max_length, pad_id=self.pad_id, pad_token=self.pad_token)
        self._raw: Tokenizer | None = None

    def _untruncated(self) -> Tokenizer:
        if self._raw is None:
            self._raw = Tokenizer.from_str(self._tok.to_str())
            self._raw.no_truncation()
            self._raw.no_padding()
        return self._raw

    def __repr__(self) -> str:
        return f"PromptTokenizer({str(self.path)!r}, max_length={self.max_length}, pad_id={self.pad_id})"

    def _decode_words(self, ids) -> str:
        # the ByteLevel decoder leaves CLIP's end-of-word markers in; transformers turns them into spaces too
        return self._untruncated().decode(list(ids), skip_special_tokens=False).replace(_END_OF_WORD, " ").strip()

    def __call__(self, prompts) -> np.ndarray:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        if not prompts:
            return np.zeros((0, self.max_length), dtype=np.int64)
        encodings = self._tok.encode_batch(prompts)
        out = np.array([e.ids for e in encodings], dtype=np.int64)
        for i, truncated in enumerate(encodings):
            if truncated.overflowing:
                enc = self._untruncated().encode(prompts[i])
                # as diffusers: everything between the kept tokens and the final EOS was dropped
                removed = self._decode_words(enc.ids[self.max_length - 1 : -1])
                logger.warning(
                    "The following part of your input was truncated because CLIP can only handle sequences up to "
                    "%d tokens: %r (prompt %d)",
                    self.max_length,
                    removed,
                    i,
                )
        return out
