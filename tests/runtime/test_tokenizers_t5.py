"""The runtime's T5 and Gemma-2 tokenizers (``tokenizers`` only) against what diffusers' own pipelines feed their
text encoders.

The oracle is the pipelines' prompt-encoding code itself (FluxPipeline / StableDiffusion3Pipeline
``_get_t5_prompt_embeds``, PixArtSigmaPipeline / SanaPipeline ``encode_prompt``), run with the transformers
tokenizer diffusers loads from the same folder and a stand-in text encoder that records the ids and mask it is
given. The tokenizers are the tiny ones diffc.exporter.tiny_dit trains (sentencepiece unigram for T5,
byte-fallback BPE for Gemma) and converts to ``tokenizer.json``.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from diffc.errors import ArtifactError  # noqa: E402
from diffc.exporter.tiny_dit import build_gemma_tokenizer, build_t5_tokenizer  # noqa: E402
from diffc.runtime.tokenizer import (  # noqa: E402
    SANA_COMPLEX_HUMAN_INSTRUCTION,
    GemmaPromptTokenizer,
    T5PromptTokenizer,
)

PROMPTS = [
    "",
    "a photo of a cat",
    "  A PHOTO of a Cat, on MARS  ",
    "Café crème, naïve résumé — 東京の夜景 🙂 über straße",
    "red\nblue\ttab   spaces",
    "2 dogs and 13 cats, 4k 8k",
    "</s> <pad> <unk> <bos> <eos> <start_of_turn> literal special tokens",
    " ".join(["a painting of a city at night with golden lights"] * 60),  # > 512 tokens: truncated
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    build_t5_tokenizer().save_pretrained(root / "t5")
    build_gemma_tokenizer().save_pretrained(root / "gemma")
    return {"t5": root / "t5", "gemma": root / "gemma"}


class _Recorder(torch.nn.Module):
    """Stands in for a text encoder: records (input_ids, attention_mask) and returns zeros of width 4."""

    dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # so the pipeline finds a device
        self.calls = []

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **_):
        self.calls.append((input_ids.numpy().copy(), None if attention_mask is None else attention_mask.numpy().copy()))
        return (torch.zeros(*input_ids.shape, 4),)


def _pipeline(cls, **parts):
    """A pipeline object with only the parts its prompt encoding touches (no weights, no config)."""
    pipe = cls.__new__(cls)
    for name, value in parts.items():
        object.__setattr__(pipe, name, value)
    return pipe


def _quiet(caplog):
    # diffusers' own truncation warning prints the (huge) padded tail; keep the test log readable
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    caplog.set_level(logging.WARNING, logger="diffc.runtime")


@pytest.mark.parametrize("max_len", [512, 256])  # FLUX.1-dev, FLUX.1-schnell
def test_flux_t5(folders, caplog, max_len):
    _quiet(caplog)
    tok = transformers.T5Tokenizer.from_pretrained(folders["t5"])
    rec = _Recorder()
    pipe = _pipeline(diffusers.FluxPipeline, text_encoder_2=rec, tokenizer_2=tok, tokenizer_max_length=77)
    pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=max_len, device=torch.device("cpu"),
                               dtype=torch.float32)
    ids, mask = T5PromptTokenizer(folders["t5"] / "tokenizer.json", max_len)(PROMPTS)
    expected_ids, expected_mask = rec.calls[0]
    assert expected_mask is None  # FLUX runs T5 unmasked: the runtime feeds ones, equal to no mask
    np.testing.assert_array_equal(ids, expected_ids)
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), max_len)
    eos = tok.eos_token_id
    lengths = mask.sum(axis=1)
    assert (ids[np.arange(len(PROMPTS)), lengths - 1] == eos).all()  # EOS last, also when truncated
    assert lengths[-1] == max_len and lengths[0] == 1  # the long prompt fills it; "" is just EOS
    assert (ids[mask == 0] == tok.pad_token_id).all()
    assert any("truncated because T5" in r.message and "(prompt 7)" in r.getMessage() for r in caplog.records)


def test_sd3_t5(folders, caplog):
    _quiet(caplog)
    tok = transformers.T5Tokenizer.from_pretrained(folders["t5"])
    rec = _Recorder()
    pipe = _pipeline(diffusers.StableDiffusion3Pipeline, text_encoder_3=rec, tokenizer_3=tok, tokenizer_max_length=77)
    pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=256, device=torch.device("cpu"), dtype=torch.float32)
    ids, _ = T5PromptTokenizer(folders["t5"] / "tokenizer.json", 256)(PROMPTS)
    np.testing.assert_array_equal(ids, rec.calls[0][0])


def test_pixart_sigma_t5_ids_and_mask(folders, caplog):
    _quiet(caplog)
    tok = transformers.T5Tokenizer.from_pretrained(folders["t5"])
    rec = _Recorder()
    pipe = _pipeline(diffusers.PixArtSigmaPipeline, text_encoder=rec, tokenizer=tok, transformer=None)
    _, expected_mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False,
                                                device=torch.device("cpu"), max_sequence_length=300,
                                                clean_caption=False)
    ids, mask = T5PromptTokenizer(folders["t5"] / "tokenizer.json", 300, lowercase=True)(PROMPTS)
    np.testing.assert_array_equal(ids, rec.calls[0][0])
    np.testing.assert_array_equal(mask, rec.calls[0][1])
    np.testing.assert_array_equal(mask, expected_mask.numpy())
    # lowercasing matters here: without it the upper-case prompt tokenizes differently
    plain, _ = T5PromptTokenizer(folders["t5"] / "tokenizer.json", 300)(PROMPTS)
    assert (plain[2] != ids[2]).any()


@pytest.mark.parametrize("instruction", [None, SANA_COMPLEX_HUMAN_INSTRUCTION], ids=["plain", "complex_human"])
def test_sana_gemma_ids_mask_and_selection(folders, caplog, instruction):
    _quiet(caplog)
    tok = transformers.GemmaTokenizer.from_pretrained(folders["gemma"])
    rec = _Recorder()
    pipe = _pipeline(diffusers.SanaPipeline, text_encoder=rec, tokenizer=tok, transformer=None)
    embeds, selected_mask, _, _ = pipe.encode_prompt(
        PROMPTS, do_classifier_free_guidance=False, device=torch.device("cpu"), max_sequence_length=300,
        complex_human_instruction=list(instruction) if instruction else None)
    runtime = GemmaPromptTokenizer(folders["gemma"] / "tokenizer.json", 300, instruction)
    ids, mask = runtime(PROMPTS)
    np.testing.assert_array_equal(ids, rec.calls[0][0])
    np.testing.assert_array_equal(mask, rec.calls[0][1])
    np.testing.assert_array_equal(mask[:, runtime.select_index], selected_mask.numpy())
    assert embeds.shape[1] == len(runtime.select_index) == 300
    assert (ids[:, 0] == tok.bos_token_id).all()
    if instruction:
        assert runtime.max_length > 300  # instruction tokens + 298


def test_diffusers_call_matches_the_default_sana_instruction():
    """SANA_COMPLEX_HUMAN_INSTRUCTION is SanaPipeline.__call__'s default, word for word."""
    import inspect

    default = inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert tuple(default) == SANA_COMPLEX_HUMAN_INSTRUCTION


def test_missing_or_broken_files_are_artifact_errors(folders, tmp_path):
    with pytest.raises(ArtifactError, match="tokenizer.json is missing"):
        T5PromptTokenizer(tmp_path / "tokenizer.json", 512)
    (tmp_path / "tokenizer.json").write_bytes((folders["t5"] / "tokenizer.json").read_bytes())
    with pytest.raises(ArtifactError, match="pad token"):  # no tokenizer_config.json naming it
        T5PromptTokenizer(tmp_path / "tokenizer.json", 512)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<nope>"}))
    with pytest.raises(ArtifactError, match="<nope>"):
        T5PromptTokenizer(tmp_path / "tokenizer.json", 512)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        GemmaPromptTokenizer(tmp_path / "tokenizer.json")


def test_empty_batch_and_type_errors(folders):
    tok = T5PromptTokenizer(folders["t5"] / "tokenizer.json", 16)
    ids, mask = tok([])
    assert ids.shape == mask.shape == (0, 16)
    with pytest.raises(TypeError):
        tok([b"bytes"])
    single_ids, single_mask = tok("a cat")
    assert single_ids.shape == (1, 16) and single_mask[0].tolist()[:3] == [1, 1, 1]
