#!/usr/bin/env python
"""Build the CLIP BPE tokenizer shipped as package data in ``diffc/assets/clip_tokenizer/``.

Run once by a developer (the output is committed; nothing at build or run time calls this script)::

    . .venv/bin/activate
    python tools/convert_clip_bpe.py /path/to/open_clip_torch-3.3.0-py3-none-any.whl
    # or, with the merges file itself:
    python tools/convert_clip_bpe.py /path/to/bpe_simple_vocab_16e6.txt.gz [--out diffc/assets/clip_tokenizer]

Input: the original OpenAI CLIP BPE merges ``bpe_simple_vocab_16e6.txt.gz`` (shipped inside the
open-clip-torch wheel as ``open_clip/bpe_simple_vocab_16e6.txt.gz``, and in openai/CLIP). The vocabulary is
rebuilt exactly as OpenAI CLIP's ``SimpleTokenizer`` and Hugging Face's ``CLIPTokenizer`` define it:

* ids 0..255: the 256 byte-level unicode characters (GPT-2 ``bytes_to_unicode`` order, so ``!`` is id 0),
* ids 256..511: the same characters + ``</w>`` (end of word),
* ids 512..49405: one token per merge, for the first ``49152 - 256 - 2 = 48894`` merge lines after the header,
* ids 49406, 49407: ``<|startoftext|>`` and ``<|endoftext|>``  -> 49408 entries.

Output (read directly by transformers / diffusers as a ``tokenizer/`` folder, so nothing is compressed):

* ``vocab.json``, ``merges.txt`` (Hugging Face format, ``#version: 0.2`` header): the classic slow-tokenizer
  files, as the Stable Diffusion 1.x ``tokenizer/`` folders ship them,
* ``tokenizer.json``: the ``tokenizers``-library fast tokenizer (normalizer, pre-tokenizer, BPE model, BOS/EOS
  post-processor), written by transformers' ``CLIPTokenizer`` and re-saved compactly (one line, merges as
  legacy ``"a b"`` strings so tokenizers 0.19 reads it too); with ``tokenizer_config.json`` (for the pad token)
  it is all the torch-free runtime needs (``diffc.runtime.tokenizer.PromptTokenizer``),
* ``tokenizer_config.json``: as transformers' ``CLIPTokenizer.save_pretrained`` writes it
  (``model_max_length`` 77, pad token ``<|endoftext|>`` like the SD 1.x tokenizers),
* ``special_tokens_map.json``: the legacy file transformers 4.x writes (and reads), for older loaders.

Needs transformers (>= 4.45; tested with 5.x) and tokenizers. Prints the ids of a known prompt and the
size of the output folder.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import sys
import tempfile
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "diffc" / "assets" / "clip_tokenizer"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2  # as in OpenAI CLIP's simple_tokenizer.py
MODEL_MAX_LENGTH = 77
MERGES_HEADER = "#version: 0.2"

# the well-known CLIP ids of "a photo of a cat", used as a self-check
KNOWN = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode char table (order matters: it defines ids 0..255)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_bpe_lines(src: Path) -> list[str]:
    """The lines of ``bpe_simple_vocab_16e6.txt`` from the wheel, the .txt.gz or a plain .txt."""
    if src.suffix == ".whl" or zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as zf:
            names = [n for n in zf.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz")]
            if not names:
                raise SystemExit(f"{src}: no {BPE_MEMBER} in this archive")
            data = gzip.decompress(zf.read(names[0]))
    elif src.suffix == ".gz":
        data = gzip.decompress(src.read_bytes())
    else:
        data = src.read_bytes()
    return data.decode("utf-8").split("\n")


def build_vocab_and_merges(lines: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    if not lines or "#version" not in lines[0]:
        raise SystemExit(f"unexpected BPE file: first line is {lines[:1]!r}, expected a '#version' header")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise SystemExit(f"unexpected BPE file: need {N_MERGES} 'a b' merge lines after the header")
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS, EOS]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    if len(vocab) != VOCAB_SIZE or len(encoder) != VOCAB_SIZE:
        raise SystemExit(f"vocabulary has {len(vocab)} entries ({len(encoder)} distinct), expected {VOCAB_SIZE}")
    return encoder, merges


def make_fast_tokenizer(encoder: dict[str, int], merges: list[tuple[str, str]], tmp: Path):
    """transformers' CLIPTokenizer (v5: tokenizers-backed) or CLIPTokenizerFast (v4) built from vocab/merges."""
    import transformers
    from transformers import CLIPTokenizer

    kw = dict(model_max_length=MODEL_MAX_LENGTH, pad_token=EOS)
    if int(transformers.__version__.split(".")[0]) >= 5:
        return CLIPTokenizer(vocab=dict(encoder), merges=list(merges), **kw)
    # transformers 4.x: the fast class converts the slow files (untested here; kept for older dev envs)
    from transformers import CLIPTokenizerFast

    return CLIPTokenizerFast(vocab_file=str(tmp / "vocab.json"), merges_file=str(tmp / "merges.txt"), **kw)


def write_slow_files(encoder: dict[str, int], merges: list[tuple[str, str]], out: Path) -> None:
    with open(out / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False, separators=(",", ":"))
    with open(out / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write(MERGES_HEADER + "\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


def convert(src: Path, out: Path) -> Path:
    from tokenizers import Tokenizer

    encoder, merges = build_vocab_and_merges(read_bpe_lines(src))
    out.mkdir(parents=True, exist_ok=True)
    write_slow_files(encoder, merges, out)

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        write_slow_files(encoder, merges, tmp)
        tok = make_fast_tokenizer(encoder, merges, tmp)
        got = tok(KNOWN[0]).input_ids
        if got != KNOWN[1]:
            raise SystemExit(f"self-check failed: {KNOWN[0]!r} -> {got}, expected {KNOWN[1]}")
        saved = Path(td) / "saved"
        tok.save_pretrained(str(saved))
        # tokenizer_config.json exactly as save_pretrained wrote it
        (out / "tokenizer_config.json").write_bytes((saved / "tokenizer_config.json").read_bytes())
        # tokenizer.json re-saved on one line by the tokenizers library (same content, ~40% smaller)
        spec = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))
        spec["padding"] = spec["truncation"] = None  # the runtime sets both itself
        # tokenizers >= 0.20 writes merges as ["a", "b"] pairs, which tokenizers 0.19 (our floor) cannot
        # read; the legacy "a b" strings are read by every version (no CLIP merge contains a space)
        spec["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
        with open(out / "tokenizer.json", "w", encoding="utf-8", newline="\n") as f:
            json.dump(spec, f, ensure_ascii=False, separators=(",", ":"))

    # transformers 5 no longer writes special_tokens_map.json; 4.x writes and reads it. Keep it in step.
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    stm = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in cfg}
    (out / "special_tokens_map.json").write_text(json.dumps(stm, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    check = Tokenizer.from_file(str(out / "tokenizer.json"))
    if check.get_vocab_size() != VOCAB_SIZE or check.encode(KNOWN[0]).ids != KNOWN[1]:
        raise SystemExit("self-check of the written tokenizer.json failed")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="open_clip_torch-*.whl, or bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = p.parse_args(argv)
    out = convert(args.source, args.out)
    total = 0
    for f in sorted(out.iterdir()):
        size = f.stat().st_size
        total += size
        print(f"{size:>10,d}  {f}")
    print(f"{total:>10,d}  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
