"""The shipped CLIP tokenizer (diffc/assets/clip_tokenizer) and the runtime's PromptTokenizer.

Three oracles, none of them the code under test:
* ids published for OpenAI CLIP (produced by HF's openai/clip-vit-base-patch32 tokenizer) -- no transformers needed,
* a pure-Python re-implementation of OpenAI CLIP's ``SimpleTokenizer`` BPE reading vocab.json/merges.txt,
* transformers' ``CLIPTokenizer`` (what diffusers pipelines call), with diffusers' padding/truncation arguments.
"""

from __future__ import annotations

import json
import logging
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from diffc.errors import ArtifactError  # noqa: E402
from diffc.runtime.tokenizer import PromptTokenizer  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "diffc" / "assets" / "clip_tokenizer"
TOKENIZER_JSON = ASSETS / "tokenizer.json"
BOS, EOS, MAX = 49406, 49407, 77

# Published CLIP ids (BOS ... EOS, before padding), as HF's openai/clip-vit-base-patch32 tokenizer gives them.
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "a photo of a tree": [49406, 320, 1125, 539, 320, 2677, 49407],
    "A Photo of a TREE!": [49406, 320, 1125, 539, 320, 2677, 256, 49407],
    "it's a cat's toy, running   fast": [49406, 585, 568, 320, 2368, 568, 5988, 267, 2761, 1953, 49407],
    "2 dogs and 3 cats": [49406, 273, 3255, 537, 274, 3989, 49407],
    "a diagram": [49406, 320, 22697, 49407],
    "a photo of a waterfall": [49406, 320, 1125, 539, 320, 16403, 49407],
    "dog on a beach": [49406, 1929, 525, 320, 2117, 49407],
    "sunset over mountains": [49406, 3424, 962, 5873, 49407],
    "mobileclip": [49406, 9451, 944, 8546, 49407],
    "hatbox": [49406, 3447, 2063, 49407],
    "hat box": [49406, 3801, 2063, 49407],
    "Hello,   WORLD!": [49406, 3306, 267, 1002, 256, 49407],
    "birthday cake 2024": [49406, 1166, 2972, 273, 271, 273, 275, 49407],
    "café": [49406, 15304, 49407],
    "🐶": [49406, 10631, 49407],
    "": [49406, 49407],
    "     ": [49406, 49407],
}

LONG_PROMPT = "a beautiful oil painting of a lighthouse at dusk, " + ", ".join(f"detail number {i}" for i in range(40))
PROMPTS = [
    "a photo of a cat",
    "A PHOTO Of A Cat",
    "",
    "An astronaut riding a horse on the moon, 4k, trending on artstation!!!",
    "It's a dog's life; they're here, we've gone, I'm ok, you'll see, he'd go.",
    "price: $1,299.99 (50% off) -- 2024-01-31 @ 10:30pm",
    "café naïve résumé über straße",
    "Ünïcödé ÀÉÎÕÜ Ωμέγα Привет мир",
    "東京の夜景, 猫",
    "emoji 🐱🚀 test ✨",
    "  multiple   spaces\tand\nnewlines  ",
    "((masterpiece)), best quality, [[ugly]], {blurry}, <lora:foo:0.8> #hashtag under_score",
    "12345678901234567890",
    "cat " * 75,  # exactly 77 with BOS/EOS: no truncation
    "cat " * 76,  # one too many
    LONG_PROMPT,
]


def expected_row(ids: list[int], pad: int = EOS) -> list[int]:
    """What diffusers feeds the text encoder: truncate keeping EOS last, then pad to MAX."""
    if len(ids) > MAX:
        ids = ids[: MAX - 1] + [EOS]
    return ids + [pad] * (MAX - len(ids))


# ---------------------------------------------------------------------------------------------------------
# the asset folder
# ---------------------------------------------------------------------------------------------------------


def test_asset_files_and_vocab():
    names = {p.name for p in ASSETS.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    vocab = json.loads((ASSETS / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["a</w>"] == 256 + (ord("a") - ord("!"))  # byte-level blocks
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    merges = (ASSETS / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894 and merges[1] == "i n"
    cfg = json.loads((ASSETS / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["model_max_length"] == MAX and cfg["pad_token"] == "<|endoftext|>"
    assert cfg["tokenizer_class"] == "CLIPTokenizer"
    stm = json.loads((ASSETS / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert stm["pad_token"] == "<|endoftext|>" and stm["bos_token"] == "<|startoftext|>"
    total = sum(p.stat().st_size for p in ASSETS.iterdir())
    assert total < 4_000_000, f"tokenizer assets grew to {total} bytes"


def test_tokenizer_json_known_ids():
    tok = tokenizers.Tokenizer.from_file(str(TOKENIZER_JSON))
    assert tok.get_vocab_size() == 49408
    for prompt, ids in KNOWN_IDS.items():
        assert tok.encode(prompt).ids == ids, prompt


# ---------------------------------------------------------------------------------------------------------
# pure-Python OpenAI CLIP BPE (simple_tokenizer.py without ftfy/html.unescape) as an independent reference
# ---------------------------------------------------------------------------------------------------------


class _ReferenceCLIP:
    def __init__(self, folder: Path):
        regex = pytest.importorskip("regex")
        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, map(chr, cs)))
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.regex = regex

    def bpe(self, token: str) -> list[str]:
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)  # ftfy.fix_text normalizes to NFC
        text = self.regex.sub(r"\s+", " ", text).strip().lower()
        ids = [BOS]
        for piece in self.pat.findall(text):
            if piece in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.encoder[piece])
                continue
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece))
        return ids + [EOS]


@pytest.fixture(scope="module")
def reference():
    return _ReferenceCLIP(ASSETS)


def test_reference_bpe_reproduces_known_ids(reference):
    for prompt, ids in KNOWN_IDS.items():
        assert reference.encode(prompt) == ids, prompt


@pytest.fixture(scope="module")
def fast():
    return tokenizers.Tokenizer.from_file(str(TOKENIZER_JSON))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_json_matches_reference_bpe(reference, fast, prompt):
    assert fast.encode(prompt).ids == reference.encode(prompt)


# ---------------------------------------------------------------------------------------------------------
# against transformers' CLIPTokenizer, with diffusers' arguments
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizers():
    transformers = pytest.importorskip("transformers")
    from_files = transformers.CLIPTokenizer(str(ASSETS / "vocab.json"), str(ASSETS / "merges.txt"))
    from_folder = transformers.CLIPTokenizer.from_pretrained(str(ASSETS))  # what diffusers loads
    assert from_folder.model_max_length == MAX and from_folder.pad_token_id == EOS
    return from_files, from_folder


def _runtime_configured_tokenizer(pad_id=EOS):
    tok = tokenizers.Tokenizer.from_file(str(TOKENIZER_JSON))
    tok.enable_truncation(MAX)
    tok.enable_padding(length=MAX, pad_id=pad_id)
    return tok


def test_known_ids_through_transformers(hf_tokenizers):
    for hf in hf_tokenizers:
        for prompt, ids in KNOWN_IDS.items():
            assert hf(prompt).input_ids == ids, prompt


def test_transformers_agrees_with_tokenizers_and_runtime(hf_tokenizers, reference):
    raw = _runtime_configured_tokenizer()
    runtime = PromptTokenizer(TOKENIZER_JSON)
    got_runtime = runtime(PROMPTS)
    assert got_runtime.dtype == np.int64 and got_runtime.shape == (len(PROMPTS), MAX)
    for hf in hf_tokenizers:
        want = hf(PROMPTS, padding="max_length", max_length=MAX, truncation=True).input_ids
        for i, prompt in enumerate(PROMPTS):
            assert len(want[i]) == MAX
            assert raw.encode(prompt).ids == want[i], prompt
            assert got_runtime[i].tolist() == want[i], prompt
            assert want[i] == expected_row(reference.encode(prompt)), prompt
    # the long prompts really were truncated with EOS kept last and no padding
    for prompt in ("cat " * 76, LONG_PROMPT):
        row = got_runtime[PROMPTS.index(prompt)]
        assert row[0] == BOS and row[-1] == EOS and row[-2] != EOS
    row = got_runtime[PROMPTS.index("cat " * 75)]
    assert row[-1] == EOS and (row[1:-1] == 2368).all()


def test_transformers_pad_bang_like_sdxl_second_tokenizer(tmp_path):
    """SDXL's tokenizer_2 (and SD 2.x) pad with "!": transformers then makes "!" a special token, so every "!"
    in a prompt is id 0 on its own (diffusers issue #4153). The runtime must reproduce that, not OpenAI's ids."""
    transformers = pytest.importorskip("transformers")
    # like the real SDXL tokenizer_2 folder: vocab/merges + configs, no tokenizer.json
    folder = tmp_path / "tokenizer_2"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ASSETS / name, folder / name)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.loads((ASSETS / name).read_text(encoding="utf-8"))
        cfg["pad_token"] = "!"
        (folder / name).write_text(json.dumps(cfg), encoding="utf-8")
    prompts = PROMPTS + ["! !! !!!", "wow!", "hello!world"]
    for hf in (
        transformers.CLIPTokenizer.from_pretrained(str(ASSETS), pad_token="!"),
        transformers.CLIPTokenizer.from_pretrained(str(folder)),
    ):
        assert hf.pad_token_id == 0
        want = hf(prompts, padding="max_length", max_length=MAX, truncation=True).input_ids
        assert want[-3][:9] == [BOS, 0, 0, 0, 0, 0, 0, EOS, 0]  # the ids diffusers#4153 shows
        got = PromptTokenizer(TOKENIZER_JSON, pad_id="!")(prompts)
        assert got.tolist() == want
        # the pad-token config of the folder alone gives the same (the artifact ships tokenizer.json + config)
        shutil.copy(TOKENIZER_JSON, folder / "tokenizer.json")
        assert PromptTokenizer(folder / "tokenizer.json")(prompts).tolist() == want
        (folder / "tokenizer.json").unlink()
        # and so does the tokenizer.json transformers writes for that tokenizer
        saved = tmp_path / "saved"
        hf.save_pretrained(str(saved))
        assert PromptTokenizer(saved / "tokenizer.json")(prompts).tolist() == want
        shutil.rmtree(saved)
    # a plain tokenizers setup that only sets the pad id does NOT match (the trap the runtime avoids)
    naive = _runtime_configured_tokenizer(pad_id=0)
    wow = naive.encode("wow!").ids  # "wow" then "!</w>" (256): the OpenAI/open_clip ids
    assert wow[2:4] == [256, EOS] and want[-2][:5] == [BOS, wow[1], 0, EOS, 0]


# ---------------------------------------------------------------------------------------------------------
# PromptTokenizer without transformers: hard-coded known ids
# ---------------------------------------------------------------------------------------------------------


def test_prompt_tokenizer_known_ids():
    tok = PromptTokenizer(TOKENIZER_JSON)
    assert tok.pad_id == EOS and tok.max_length == MAX
    prompts = list(KNOWN_IDS)
    out = tok(prompts)
    assert out.dtype == np.int64 and out.shape == (len(prompts), MAX)
    for row, prompt in zip(out, prompts):
        assert row.tolist() == expected_row(KNOWN_IDS[prompt]), prompt
    assert tok("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert tok([]).shape == (0, MAX)


def test_prompt_tokenizer_pad_token_from_config(tmp_path):
    # SDXL's second tokenizer (and SD 2.x) pad with "!" (id 0): read from tokenizer_config.json
    folder = tmp_path / "tokenizer_2"
    shutil.copytree(ASSETS, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["pad_token"] = "!"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tok = PromptTokenizer(folder / "tokenizer.json")
    assert tok.pad_id == 0 and tok.pad_token == "!"
    assert tok(["a dog"])[0].tolist() == [49406, 320, 1929, 49407] + [0] * (MAX - 4)
    # explicit arguments win: as an id or as a token
    assert PromptTokenizer(folder / "tokenizer.json", pad_id=EOS).pad_id == EOS
    assert PromptTokenizer(folder / "tokenizer.json", pad_id="<|endoftext|>").pad_id == EOS
    # AddedToken-style dict in a config, and no config at all -> <|endoftext|>
    cfg["pad_token"] = {"content": "!", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert PromptTokenizer(folder / "tokenizer.json").pad_id == 0
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(TOKENIZER_JSON, bare / "tokenizer.json")
    assert PromptTokenizer(bare / "tokenizer.json").pad_id == EOS


def test_prompt_tokenizer_shorter_max_length():
    tok = PromptTokenizer(TOKENIZER_JSON, max_length=5)
    assert tok(["a photo of a cat", "a dog"]).tolist() == [
        [49406, 320, 1125, 539, 49407],
        [49406, 320, 1929, 49407, 49407],
    ]


def test_prompt_tokenizer_warns_on_truncation(caplog):
    tok = PromptTokenizer(TOKENIZER_JSON)
    prompt = "cat " * 75 + "the very end"
    with caplog.at_level(logging.WARNING, logger="diffc.runtime"):
        tok(["a dog", "cat " * 75])
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="diffc.runtime"):
        out = tok(["a dog", prompt])
    assert out[1, -1] == EOS
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING and rec.name == "diffc.runtime"
    assert "the very end" in rec.getMessage() and "77" in rec.getMessage()


def test_prompt_tokenizer_missing_or_corrupt(tmp_path):
    with pytest.raises(ArtifactError, match="rebuild"):
        PromptTokenizer(tmp_path / "nope" / "tokenizer.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ', encoding="utf-8")
    with pytest.raises(ArtifactError, match="corrupt.*rebuild"):
        PromptTokenizer(bad)
    bad.write_bytes(b"\x00\xff garbage")
    with pytest.raises(ArtifactError, match="rebuild"):
        PromptTokenizer(bad)
    shutil.copy(TOKENIZER_JSON, bad)
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ArtifactError, match="tokenizer_config.json.*rebuild"):
        PromptTokenizer(bad)
    (tmp_path / "tokenizer_config.json").write_text('{"pad_token": "<|no such token|>"}', encoding="utf-8")
    with pytest.raises(ArtifactError, match="no such token"):
        PromptTokenizer(bad)
