"""What the loop does around the denoiser, read from the manifest: text conditioning, latent layout, feeds.

A UNet artifact (no ``denoiser`` section, schema 1) and a transformer artifact (PixArt-Sigma, SD3, FLUX, Sana)
run the same loop in :mod:`diffc.runtime.pipeline`; the differences are data in the manifest, applied here:

* ``text_encoders[*]``: which tokenizer (``tokenizer_kind``), whether the encoder gets the tokenizer's mask
  (``attention_mask``), which output conditions the denoiser (``hidden_state``, or none) and which is pooled
  (``pooled``), and how the states combine: one ``sequence_group`` is concatenated along the features, the
  groups, zero-padded to the widest, along the sequence (SD3: CLIP-L + CLIP-G, then T5).
* ``denoiser``: the component, the input names by role, the latent layout (``packed_2x2``: FLUX's tokens with
  ``img_ids`` / ``txt_ids`` made here in numpy; ``position_ids: flux2``: FLUX.2's 4-axis ids), the timestep
  scale (FLUX feeds sigma = t / 1000).
* ``tokenizer_kind: qwen_chat`` (FLUX.2 [klein]) / ``mistral_chat`` (FLUX.2 [dev], its system message in the
  prefix): the prompt inside the chat template's rendered ``chat_prefix`` / ``chat_suffix``, padded to
  ``max_length`` (:class:`ChatPromptTokenizer`).

numpy and ``tokenizers`` only: this ships in the torch-free runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffc.errors import ManifestError
from diffc.runtime.manifest import artifact_path
from diffc.runtime.tokenizer import GemmaPromptTokenizer, PaddedPromptTokenizer, PromptTokenizer, T5PromptTokenizer

#: what a manifest without a ``denoiser`` section (every UNet artifact) means
UNET_DENOISER: dict[str, Any] = {
    "component": "unet", "family": "unet", "latent_layout": "nchw", "patch_size": 1, "timestep_scale": 1.0,
    "inputs": {"latents": "sample", "timestep": "timestep", "text": "encoder_hidden_states"}, "output": "out_sample",
}
LATENT_LAYOUTS = ("nchw", "packed_2x2")
#: the position ids of a packed layout: FLUX.1's 3 axes, FLUX.2's 4 (diffc.build.families.Family.position_ids)
POSITION_IDS = ("flux", "flux2")


class ChatPromptTokenizer(PaddedPromptTokenizer):
    """A causal LM's tokenizer behind a chat template, as ``Flux2KleinPipeline._get_qwen3_prompt_embeds`` runs it:
    ``apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
    enable_thinking=False)``, then ``tokenizer(text, padding="max_length", truncation=True, max_length=512)``.

    The template is Jinja, rendered at build time around a placeholder into the text before and after the prompt
    (``chat_prefix`` / ``chat_suffix`` in the manifest), so the run time needs no template engine; for one user
    message the rendering is that concatenation. No special tokens are added beyond the template's own (Qwen's
    ``tokenizer.json`` has none to add); padding is on ``padding_side`` with the configured pad token.

    ``Flux2Pipeline`` (FLUX.2 [dev]) renders a system message and the prompt through its ``PixtralProcessor``'s
    template, which writes Mistral's ``<s>`` itself: the processor then tokenizes without the post-processor's
    special tokens (``add_special_tokens=False`` in the manifest), and ``removed`` are the strings its
    ``format_input`` deletes from the prompt first (``[IMG]``).
    """

    family = "the chat text encoder"

    def __init__(self, tokenizer_json_path, max_length: int, prefix: str, suffix: str, padding_side: str = "right",
                 *, add_special_tokens: bool = True, removed: list[str] | tuple[str, ...] = ()):
        if padding_side not in ("left", "right"):
            raise ManifestError(f"text encoder padding_side {padding_side!r} must be 'left' or 'right'; rebuild the "
                                "artifact")
        if not isinstance(add_special_tokens, bool) or not all(isinstance(r, str) and r for r in removed):
            raise ManifestError("text encoder add_special_tokens must be a boolean and prompt_removes a list of "
                                "non-empty strings; rebuild the artifact")
        super().__init__(tokenizer_json_path, max_length)
        self.prefix, self.suffix = str(prefix), str(suffix)
        self.add_special_tokens = add_special_tokens
        self.removed = tuple(removed)
        self._tok.enable_padding(length=self.max_length, pad_id=self.pad_id, pad_token=self.pad_token,
                                 direction=padding_side)

    def preprocess(self, prompts: list[str]) -> list[str]:
        for r in self.removed:
            prompts = [p.replace(r, "") for p in prompts]
        return [self.prefix + p + self.suffix for p in prompts]


def denoiser_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``denoiser`` section, or the UNet's for a manifest without one."""
    return manifest.get("denoiser") or UNET_DENOISER


@dataclass
class Conditioning:
    """One batch of text conditioning: ``hidden`` [B, S, D], ``pooled`` [B, P] (or None), ``mask`` [B, S] int64
    (or None: the denoiser takes none)."""

    hidden: np.ndarray
    pooled: np.ndarray | None
    mask: np.ndarray | None

    def zeros_like(self) -> "Conditioning":
        """SDXL's uncond for an empty negative prompt (force_zeros_for_empty_prompt)."""
        return Conditioning(np.zeros_like(self.hidden), None if self.pooled is None else np.zeros_like(self.pooled),
                            self.mask)

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        """Rows of several batches, in order (CFG: uncond first)."""
        pooled = None if parts[0].pooled is None else np.concatenate([p.pooled for p in parts])
        mask = None if parts[0].mask is None else np.concatenate([p.mask for p in parts])
        return Conditioning(np.concatenate([p.hidden for p in parts]), pooled, mask)


class TextEncoders:
    """The manifest's ``text_encoders``: tokenizers opened from the artifact, prompts -> :class:`Conditioning`."""

    def __init__(self, root: Path, entries: list[dict[str, Any]]):
        self.entries = entries
        self.tokenizers = [self._tokenizer(root, e, negative=False) for e in entries]
        # Sana encodes its negative prompt without the complex human instruction (SanaPipeline.encode_prompt)
        self.negative_tokenizers = [self._tokenizer(root, e, negative=True)
                                    if e.get("complex_human_instruction") else tok
                                    for e, tok in zip(entries, self.tokenizers)]
        #: legacy (schema 1) entries name no ``pooled``: the last encoder's ``pooled_output`` is the pooled one
        self.legacy_pooled = not any("pooled" in e for e in entries)

    @staticmethod
    def _tokenizer(root: Path, e: dict[str, Any], *, negative: bool):
        path = artifact_path(root, e["tokenizer"])
        kind = e.get("tokenizer_kind", "clip")
        if kind == "clip":
            return PromptTokenizer(path, max_length=e["max_length"], pad_id=e["pad_id"])
        if kind == "t5":
            return T5PromptTokenizer(path, e["max_length"], lowercase=bool(e.get("lowercase", False)))
        if kind == "gemma":
            return GemmaPromptTokenizer(path, e.get("max_sequence_length", e["max_length"]),
                                        None if negative else e.get("complex_human_instruction"))
        if kind in ("qwen_chat", "mistral_chat"):
            if not isinstance(e.get("chat_prefix"), str) or not isinstance(e.get("chat_suffix"), str):
                raise ManifestError(f"text encoder {e['component']!r} ({kind}) lacks chat_prefix / chat_suffix "
                                    "strings; rebuild the artifact")
            return ChatPromptTokenizer(path, e["max_length"], e["chat_prefix"], e["chat_suffix"],
                                       e.get("padding_side", "right"),
                                       add_special_tokens=e.get("add_special_tokens", True),
                                       removed=e.get("prompt_removes", ()))
        raise ManifestError(f"text encoder {e['component']!r} has tokenizer_kind {kind!r}, which this runtime does not "
                            "know; upgrade diffc or rebuild the artifact")

    def encode(self, sessions: dict[str, Any], prompts: list[str], *, negative: bool = False) -> Conditioning:
        groups: dict[int, list[np.ndarray]] = {}
        pooled: list[np.ndarray] = []
        mask = None
        tokenizers = self.negative_tokenizers if negative else self.tokenizers
        for e, tok in zip(self.entries, tokenizers):
            how = e.get("attention_mask", "none")
            if how == "none":
                ids, tok_mask = tok(prompts), None
                feeds = {"input_ids": ids}
            else:
                ids, tok_mask = tok(prompts)
                feeds = {"input_ids": ids, "attention_mask": tok_mask if how == "tokens" else np.ones_like(ids)}
            out = sessions[e["component"]].run(feeds)
            if e.get("hidden_state") is not None:
                hidden = out[e["hidden_state"]]
                if isinstance(tok, GemmaPromptTokenizer):  # Sana keeps the first token and the last S - 1
                    index = tok.select_index
                    hidden, tok_mask = hidden[:, index], tok_mask[:, index]
                groups.setdefault(int(e.get("sequence_group", 0)), []).append(hidden)
                if how == "tokens":
                    mask = tok_mask
            if self.legacy_pooled:
                pooled = [out["pooled_output"]]
            elif e.get("pooled") is not None:
                pooled.append(out[e["pooled"]])
        states = [np.concatenate(groups[g], axis=-1) for g in sorted(groups)]
        width = max(s.shape[-1] for s in states)
        states = [np.pad(s, ((0, 0), (0, 0), (0, width - s.shape[-1]))) for s in states]
        hidden = np.concatenate(states, axis=1).astype(np.float32)
        return Conditioning(hidden, np.concatenate(pooled, axis=-1).astype(np.float32) if pooled else None, mask)


# ------------------------------------------------------------------------------------------ latent layout


def pack(x: np.ndarray, p: int = 2) -> np.ndarray:
    """``FluxPipeline._pack_latents``: [B, C, h, w] -> [B, (h/p)(w/p), C p p]."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpack(tokens: np.ndarray, h: int, w: int, p: int = 2) -> np.ndarray:
    """``FluxPipeline._unpack_latents`` for latents of ``h`` x ``w``: the inverse of :func:`pack`."""
    b, _, d = tokens.shape
    c = d // (p * p)
    return tokens.reshape(b, h // p, w // p, c, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, p: int = 2) -> np.ndarray:
    """``FluxPipeline._prepare_latent_image_ids``: (0, row, column) per packed token, float32 [(h/p)(w/p), 3]."""
    ids = np.zeros((h // p, w // p, 3), np.float32)
    ids[..., 1] = np.arange(h // p, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w // p, dtype=np.float32)[None, :]
    return ids.reshape(-1, 3)


def flux2_image_ids(h: int, w: int, p: int = 2) -> np.ndarray:
    """``Flux2Pipeline._prepare_latent_ids`` on the patchified latents: (t, row, column, layer) = (0, r, c, 0)."""
    ids = np.zeros((h // p, w // p, 4), np.float32)
    ids[..., 1] = np.arange(h // p, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w // p, dtype=np.float32)[None, :]
    return ids.reshape(-1, 4)


def flux2_text_ids(sequence: int) -> np.ndarray:
    """``Flux2Pipeline._prepare_text_ids``: (0, 0, 0, token index)."""
    ids = np.zeros((sequence, 4), np.float32)
    ids[:, 3] = np.arange(sequence, dtype=np.float32)
    return ids


def image_seq_len(spec: dict[str, Any], h: int, w: int) -> int:
    """Tokens of a latent of ``h`` x ``w``: what the dynamic shift of FLUX-like schedules depends on."""
    p = int(spec.get("patch_size", 1))
    return (h // p) * (w // p)


class Feeds:
    """The denoiser's feeds for one call: the per-call inputs made once, the per-step ones by :meth:`step`."""

    def __init__(self, spec: dict[str, Any], cond: Conditioning, extra: dict[str, np.ndarray], h: int, w: int,
                 guidance_scales: np.ndarray | None = None):
        self.spec = spec
        self.inputs = spec["inputs"]
        self.packed = spec.get("latent_layout", "nchw") == "packed_2x2"
        if spec.get("latent_layout", "nchw") not in LATENT_LAYOUTS:
            raise ManifestError(f"denoiser.latent_layout {spec['latent_layout']!r} is unknown to this runtime; "
                                "upgrade diffc or rebuild the artifact")
        self.p = int(spec.get("patch_size", 1))
        position_ids = spec.get("position_ids", "flux")
        if position_ids not in POSITION_IDS:
            raise ManifestError(f"denoiser.position_ids {position_ids!r} is unknown to this runtime; upgrade diffc or "
                                "rebuild the artifact")
        flux2 = position_ids == "flux2"
        self.h, self.w = h, w
        self.batch = cond.hidden.shape[0]
        fixed: dict[str, np.ndarray] = {self.inputs["text"]: cond.hidden, **extra}
        if self.inputs.get("pooled"):
            fixed[self.inputs["pooled"]] = cond.pooled
        if self.inputs.get("text_mask"):
            fixed[self.inputs["text_mask"]] = cond.mask.astype(np.int64)
        if self.inputs.get("image_ids"):
            fixed[self.inputs["image_ids"]] = flux2_image_ids(h, w, self.p) if flux2 else image_ids(h, w, self.p)
        if self.inputs.get("text_ids"):
            seq = cond.hidden.shape[1]
            fixed[self.inputs["text_ids"]] = flux2_text_ids(seq) if flux2 else np.zeros((seq, 3), np.float32)
        if self.inputs.get("guidance") and guidance_scales is not None:
            fixed[self.inputs["guidance"]] = np.asarray(guidance_scales, np.float32)
        self.fixed = fixed
        self.timestep_scale = float(spec.get("timestep_scale", 1.0))

    def step(self, model_in: np.ndarray, timestep: float) -> dict[str, np.ndarray]:
        latents = pack(model_in, self.p) if self.packed else model_in
        t = np.float32(timestep) * np.float32(self.timestep_scale) if self.timestep_scale != 1.0 \
            else np.float32(timestep)
        return {self.inputs["latents"]: latents, self.inputs["timestep"]: np.full((self.batch,), t, np.float32),
                **self.fixed}

    def output(self, out: np.ndarray) -> np.ndarray:
        """The denoiser's output in the [B, C, h, w] layout the sampler steps in."""
        return unpack(out, self.h, self.w, self.p) if self.packed else out
