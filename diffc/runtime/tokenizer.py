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


class _Untruncated:
    """A prompt tokenizer's ``_tok`` (truncating, padding) and, made only when a prompt is too long, a copy without
    either (``_untruncated``) to count or show what was cut off: a copy costs as much as the load (0.2 s for CLIP's
    vocabulary)."""

    _tok: Tokenizer
    _raw: Tokenizer | None = None

    def _untruncated(self) -> Tokenizer:
        if self._raw is None:
            self._raw = Tokenizer.from_str(self._tok.to_str())
            self._raw.no_truncation()
            self._raw.no_padding()
        return self._raw


class PromptTokenizer(_Untruncated):
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


# --------------------------------------------------------------------------------- T5 / Gemma-2 (DiT families)

#: Sana's default ``complex_human_instruction`` (diffusers ``SanaPipeline.__call__``), joined with newlines
#: and put before the prompt; the negative prompt is tokenized without it.
SANA_COMPLEX_HUMAN_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing "
    "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering "
    "glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)


def _load_tokenizer(path: Path) -> Tokenizer:
    if not path.is_file():
        raise ArtifactError(f"tokenizer file {path} is missing; {_REBUILD}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a plain Exception on malformed JSON / unknown fields
        raise ArtifactError(f"tokenizer file {path} is corrupt ({e}); {_REBUILD}") from e


class PaddedPromptTokenizer(_Untruncated):
    """Prompts -> ``(input_ids, attention_mask)``, both ``int64 (B, max_length)``, for the sentencepiece-derived
    tokenizers of the transformer pipelines (T5: unigram; Gemma-2: byte-fallback BPE), read from the
    ``tokenizer.json`` a checkpoint ships (no transformers, no sentencepiece).

    What diffusers does with its transformers tokenizer, i.e. ``tokenizer(prompts, padding="max_length",
    max_length=max_length, truncation=True)``: the ``tokenizer.json`` post-processor adds the special tokens
    (T5: ``</s>`` at the end; Gemma: ``<bos>`` at the start), truncation keeps room for them, padding is on the
    right with the pad token ``tokenizer_config.json`` names, and the mask is 1 on real tokens.

    ``lowercase``: PixArt-Sigma and Sana lowercase and strip each prompt first (their ``_text_preprocessing``
    with ``clean_caption=False``; see :class:`T5PromptTokenizer` for ``clean_caption=True``).
    """

    #: the model's name in the truncation warning
    family = "the text encoder"
    #: whether the ``tokenizer.json`` post-processor adds its special tokens (False: a chat template that writes
    #: them itself, see ``diffc.runtime.denoiser.ChatPromptTokenizer``)
    add_special_tokens = True

    def __init__(self, tokenizer_json_path, max_length: int, *, lowercase: bool = False):
        path = Path(tokenizer_json_path)
        raw = _load_tokenizer(path)
        if int(max_length) < 2:
            raise ValueError(f"max_length must be >= 2 (room for a special token and one word), got {max_length}")
        pad_token = _configured_pad_token(path.parent)
        if pad_token is None:
            raise ArtifactError(f"{path.parent} has no tokenizer_config.json naming the pad token; {_REBUILD}")
        pad_id = raw.token_to_id(pad_token)
        if pad_id is None:
            raise ArtifactError(f"tokenizer {path} has no pad token {pad_token!r} in its vocabulary; {_REBUILD}")
        self.path = path
        self.max_length = int(max_length)
        self.lowercase = bool(lowercase)
        self.pad_id = int(pad_id)
        self.pad_token = pad_token
        self.vocab_size = raw.get_vocab_size(with_added_tokens=True)
        self._tok = raw
        self._tok.enable_truncation(max_length=self.max_length)
        self._tok.enable_padding(length=self.max_length, pad_id=self.pad_id, pad_token=pad_token,
                                 direction="right")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, max_length={self.max_length})"

    def count(self, text: str) -> int:
        """Token count of ``text`` with its special tokens, untruncated (``len(tokenizer.encode(text))``)."""
        return len(self._untruncated().encode(text, add_special_tokens=self.add_special_tokens).ids)

    def preprocess(self, prompts: list[str]) -> list[str]:
        return [p.lower().strip() for p in prompts] if self.lowercase else prompts

    def __call__(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        if not prompts:
            empty = np.zeros((0, self.max_length), dtype=np.int64)
            return empty, empty.copy()
        texts = self.preprocess(prompts)
        encodings = self._tok.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        for i, enc in enumerate(encodings):
            if enc.overflowing:
                full = self._untruncated().encode(texts[i], add_special_tokens=self.add_special_tokens)
                kept = sum(1 for m, s in zip(enc.attention_mask, enc.special_tokens_mask) if m and not s)
                words = [t for t, special in zip(full.ids, full.special_tokens_mask) if not special]
                removed = self._untruncated().decode(words[kept:], skip_special_tokens=True)
                logger.warning(
                    "The following part of your input was truncated because %s can only handle sequences up to "
                    "%d tokens: %r (prompt %d)", self.family, self.max_length, removed, i)
        return ids, mask


class T5PromptTokenizer(PaddedPromptTokenizer):
    """T5 (unigram) as FLUX.1 (``max_sequence_length`` 512 for dev, 256 for schnell), SD3 (256) and PixArt-Sigma
    (300, ``lowercase=True``) tokenize their prompts.

    FLUX and SD3 feed T5 no attention mask (equal to a mask of ones: the runtime passes ones); PixArt-Sigma
    passes this mask to T5 and to its transformer. Not reproduced: PixArt-Sigma's ``clean_caption=True`` (its
    ``__call__`` default, which needs ``bs4`` and ``ftfy`` installed next to diffusers and otherwise falls back
    to lowercase + strip, the path here).
    """

    family = "T5"


class GemmaPromptTokenizer(PaddedPromptTokenizer):
    """Gemma-2 (byte-fallback BPE, ``<bos>`` first) as ``SanaPipeline._get_gemma_prompt_embeds`` tokenizes.

    Sana lowercases and strips the prompt, then, with a ``complex_human_instruction`` (a list of lines; Sana's
    default is :data:`SANA_COMPLEX_HUMAN_INSTRUCTION`), prepends the lines joined by newlines and raises the
    length to ``count(instruction) + max_sequence_length - 2``. After the text encoder, Sana keeps the states
    (and mask entries) at :attr:`select_index`: the first token and the last ``max_sequence_length - 1``.
    Without an instruction (Sana's negative prompt) the length is ``max_sequence_length`` and every state is
    kept. Not reproduced: ``clean_caption=True`` (Sana's default is False).
    """

    family = "Gemma-2"

    def __init__(self, tokenizer_json_path, max_sequence_length: int = 300,
                 complex_human_instruction: list[str] | tuple[str, ...] | None = None):
        if int(max_sequence_length) < 2:
            raise ValueError(f"max_sequence_length must be >= 2, got {max_sequence_length}")
        self.max_sequence_length = int(max_sequence_length)
        self.instruction = "\n".join(complex_human_instruction) if complex_human_instruction else ""
        super().__init__(tokenizer_json_path, max_sequence_length, lowercase=True)
        if self.instruction:
            length = self.count(self.instruction) + self.max_sequence_length - 2
            self.max_length = length
            self._tok.enable_truncation(max_length=length)
            self._tok.enable_padding(length=length, pad_id=self.pad_id, pad_token=self.pad_token,
                                     direction="right")

    @property
    def select_index(self) -> list[int]:
        """Positions of the encoder output Sana keeps (all of them without an instruction)."""
        if not self.instruction:
            return list(range(self.max_length))
        return [0] + [self.max_length + i for i in range(-self.max_sequence_length + 1, 0)]

    def preprocess(self, prompts: list[str]) -> list[str]:
        return [self.instruction + p for p in super().preprocess(prompts)]
