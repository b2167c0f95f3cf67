"""docs/manifest.md is enough to run an artifact without diffc: this test follows its pseudocode using only
json, numpy, onnxruntime and tokenizers (no diffc.runtime code) and must reproduce diffc's own image."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

pytest.importorskip("torch")  # to build the artifact

import diffc  # noqa: E402


def tokenize(path: Path, prompts, max_length: int, pad_id: int) -> np.ndarray:
    tok = Tokenizer.from_file(str(path))
    rows = []
    for p in prompts:
        ids = tok.encode(p).ids  # [BOS, tokens..., EOS]
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + [ids[-1]]
        rows.append(ids + [pad_id] * (max_length - len(ids)))
    return np.array(rows, dtype=np.int64)


def guidance_embedding(w: np.ndarray, d: int) -> np.ndarray:
    half = d // 2
    f = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))
    e = (1000.0 * w)[:, None] * f[None, :]
    out = np.concatenate([np.sin(e), np.cos(e)], axis=1)
    return np.pad(out, ((0, 0), (0, d % 2))).astype(np.float32)


def doc_loop(root: Path, prompt: str, negative: str | None, g: float, latents: np.ndarray) -> np.ndarray:
    M = json.loads((root / "manifest.json").read_text())
    S = M["sampler"]
    sess = {n: ort.InferenceSession(str(root / c["file"]), providers=["CPUExecutionProvider"])
            for n, c in M["components"].items()}

    def run(name, **feeds):
        s = sess[name]
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))

    def encode(prompts):
        hidden, pooled = [], None
        for E in M["text_encoders"]:
            ids = tokenize(root / E["tokenizer"], prompts, E["max_length"], E["pad_id"])
            out = run(E["component"], input_ids=ids)
            hidden.append(out[E["hidden_state"]])
            pooled = out["pooled_output"]
        return np.concatenate(hidden, axis=-1), pooled

    cond, pooled = encode([prompt])
    use_cfg = M["guidance"]["mode"] == "cfg" and g > 1
    if use_cfg:
        uncond, upooled = encode([negative or ""])
        cond = np.concatenate([uncond, cond])
    extra = {}
    if M["guidance"]["mode"] == "embedded":
        extra[M["guidance"]["input"]] = guidance_embedding(np.full(cond.shape[0], g - 1), M["guidance"]["embedding_dim"])
    x = (S["init_noise_sigma"] * latents).astype(np.float32)
    prev_x0 = np.zeros_like(x)
    for i in range(len(S["timesteps"])):
        inp = (S["c_in"][i] * x).astype(np.float32)
        if use_cfg:
            inp = np.concatenate([inp, inp])
        m = run("unet", sample=inp, timestep=np.full(cond.shape[0], S["timesteps"][i], np.float32),
                encoder_hidden_states=cond, **extra)["out_sample"]
        if use_cfg:
            mu, mc = np.split(m, 2)
            m = mu + g * (mc - mu)
        x0 = S["x0_from_x"][i] * x + S["x0_from_m"][i] * m
        assert S["next_from_noise"][i] == 0  # deterministic samplers only here
        x = (S["next_from_x"][i] * x + S["next_from_x0"][i] * x0 + S["next_from_prev_x0"][i] * prev_x0).astype(np.float32)
        prev_x0 = x0
    lat = M["latent"]
    img = run("vae_decoder", latent_sample=(x / lat["scaling_factor"] + lat["shift_factor"]).astype(np.float32))["sample"]
    return np.clip(img / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def artifact(demo_cpu_artifact):
    return demo_cpu_artifact  # shared by the run (tests/conftest.py); the test copies it before editing


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler"])
def test_doc_loop_matches_runtime(artifact, tmp_path, sampler):
    import shutil

    from diffc.exporter.sampler import compile_sampler

    root = tmp_path / "a"
    shutil.copytree(artifact, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["sampler"] = compile_sampler(sampler, manifest["build"]["scheduler_config"], 4).to_dict()
    (root / "manifest.json").write_text(json.dumps(manifest))
    pipe = diffc.load(root, progress=False)
    latents = pipe.initial_noise(9, 1, 32, 32)
    ours = pipe("a handwritten digit five", negative_prompt="noise", guidance=6.0, latents=latents)
    theirs = doc_loop(root, "a handwritten digit five", "noise", 6.0, latents)
    assert np.abs(ours - theirs).max() <= 1e-4
