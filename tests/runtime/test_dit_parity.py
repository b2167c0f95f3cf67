"""Transformer-denoiser artifacts reproduce the diffusers pipeline, image for image (issue 29).

For each family (PixArt-Sigma, SD3, FLUX.1-dev, FLUX.1-schnell) a tiny pipeline is built with the cpu-fp32
profile and run by the torch-free runtime; diffusers' own pipeline call is given the SAME initial latents (FLUX:
packed 2x2 in the test, as FluxPipeline takes them) and the images must agree within 1e-3 on [0, 1], as
tests/runtime/test_parity.py holds the UNet pipelines to. FLUX-dev's schedule shift depends on the image
sequence length, so it is compared at several sizes, square and not.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffc.build import build  # noqa: E402
from diffc.build.plan import plan  # noqa: E402
from diffc.errors import ArtifactError, InputError, ProfileError  # noqa: E402
from diffc.runtime import load  # noqa: E402
from diffc.runtime.denoiser import image_ids, pack, unpack  # noqa: E402

TOL = 1e-3
STEPS = 4
PROMPT = "A Red cat sitting on a table, oil painting"
#: kind -> (tiny pipeline kind, guidance-embedding FLUX?, the guidance scale the comparison runs at)
FAMILIES = {"pixart": ("pixart", True, 4.5), "sd3": ("sd3", True, 5.0), "flux-dev": ("flux", True, 3.5),
            "flux-schnell": ("flux", False, 1.0), "sana": ("sana", True, 4.5)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def built(request, tiny_dit_folder, tiny_dit_artifact):
    """(kind, pipeline folder, cpu-fp32 artifact) per family: the run's shared tiny pipeline and its build
    (tests/conftest.py; read-only)."""
    kind = request.param
    tiny, guidance, _ = FAMILIES[kind]
    return kind, tiny_dit_folder(tiny, guidance), tiny_dit_artifact(tiny, guidance, STEPS)


def _reference(kind: str, folder, latents: np.ndarray, height: int, width: int, scale: float,
               negative: str | None = None) -> np.ndarray:
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=STEPS, height=height, width=width, output_type="np", guidance_scale=scale)
    lat = torch.from_numpy(latents)
    if kind in ("pixart", "sana"):
        # the tiny transformer's sample_size (16) has no aspect-ratio bin table; the runtime never bins
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    if kind.startswith("flux"):
        lat = torch.from_numpy(pack(latents))  # FluxPipeline takes packed latents
    elif negative is not None:
        kwargs["negative_prompt"] = negative
    return pipe(PROMPT, latents=lat, **kwargs).images


def _compare(kind, folder, artifact, height=32, width=32, seed=3, negative=None) -> float:
    runtime = load(artifact, progress=False)
    scale = FAMILIES[kind][2]
    noise = runtime.initial_noise(seed=seed, batch=1, height=height, width=width)
    ours = runtime(PROMPT, negative_prompt=negative, guidance=scale, height=height, width=width, latents=noise)
    ref = _reference(kind, folder, noise, height, width, scale, negative)
    assert ours.shape == ref.shape == (1, height, width, 3)
    assert ref.std() > 0.02  # the comparison is not vacuous: neither flat nor saturated
    return float(np.abs(ours - ref).max())


def test_family_matches_diffusers(built):
    kind, folder, artifact = built
    err = _compare(kind, folder, artifact)
    assert err <= TOL, f"{kind}: max |runtime - diffusers| = {err:.2e}"
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["schema_version"] == 2 and m["denoiser"]["component"] == "transformer"
    assert m["guidance"]["mode"] == {"pixart": "cfg", "sd3": "cfg", "flux-dev": "scale_input",
                                     "flux-schnell": "none", "sana": "cfg"}[kind]


def test_negative_prompt_and_other_sizes(built):
    """CFG families with a negative prompt; every family at a non-square size (FLUX-dev: a different schedule
    shift, recomputed per call from the image sequence length)."""
    kind, folder, artifact = built
    if kind in ("pixart", "sd3", "sana"):
        assert _compare(kind, folder, artifact, negative="blurry, low quality") <= TOL
    # SanaPipeline checks for multiples of 32 (its real DC-AE's factor), whatever the VAE
    sizes = {"flux-dev": ((16, 48), (64, 32)), "sana": ((64, 32),)}.get(kind, ((48, 16),))
    for height, width in sizes:
        err = _compare(kind, folder, artifact, height=height, width=width, seed=5)
        assert err <= TOL, f"{kind} at {height}x{width}: max |runtime - diffusers| = {err:.2e}"


def test_flux_dev_schedule_depends_on_the_size(built):
    kind, _, artifact = built
    if kind != "flux-dev":
        pytest.skip("static schedule")
    runtime = load(artifact, progress=False)
    small, large = runtime.tables_for(8, 8), runtime.tables_for(32, 32)
    assert not np.array_equal(small.timesteps, large.timesteps)
    assert small.timesteps[1] < large.timesteps[1]  # a longer sequence shifts toward more noise (larger mu)


def test_size_not_a_multiple_is_the_typed_error(built):
    kind, _, artifact = built
    runtime = load(artifact, progress=False)
    mult = runtime.image["multiple_of"]
    assert mult == (2 if kind == "sana" else 4)  # VAE factor 2 x patch (FLUX: its 2x2 packing; Sana: 1)
    with pytest.raises(InputError, match=f"not a multiple of {mult}"):
        runtime(PROMPT, height=32 + mult // 2 if mult > 2 else 33, width=32)


def test_missing_tokenizer_file_names_it(built, tmp_path):
    kind, _, artifact = built
    copy = shutil.copytree(artifact, tmp_path / "copy")
    m = json.loads((copy / "manifest.json").read_text())
    rel = m["text_encoders"][-1]["tokenizer"]
    (copy / rel).unlink()
    with pytest.raises(ArtifactError, match=rel.replace(".", r"\.")):
        load(copy, progress=False)


def _doc_loop(root, prompt: str, g: float, latents: np.ndarray) -> np.ndarray:
    """docs/manifest.md's loop for a transformer artifact, written from the document with json, numpy,
    onnxruntime and tokenizers only (no diffc code): the document is enough to run these artifacts. The tables
    are used as built, so the caller picks the size they were built for (FLUX: ``dynamic_shift.image_seq_len``)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    M = json.loads((root / "manifest.json").read_text())
    S, D = M["sampler"], M["denoiser"]
    sess = {n: ort.InferenceSession(str(root / c["file"]), providers=["CPUExecutionProvider"])
            for n, c in M["components"].items()}

    def run(name, **feeds):
        s = sess[name]
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))

    def encode(prompts):
        groups, pooled, mask = {}, [], None
        for E in M["text_encoders"]:
            tok = Tokenizer.from_file(str(root / E["tokenizer"]))
            tok.enable_truncation(max_length=E["max_length"])
            tok.enable_padding(length=E["max_length"], pad_id=E["pad_id"])
            texts = [p.lower().strip() for p in prompts] if E["lowercase"] else prompts
            enc = tok.encode_batch(texts)
            ids = np.array([e.ids for e in enc], np.int64)
            tmask = np.array([e.attention_mask for e in enc], np.int64)
            feeds = {"input_ids": ids}
            if E["attention_mask"] != "none":
                feeds["attention_mask"] = tmask if E["attention_mask"] == "tokens" else np.ones_like(ids)
            out = run(E["component"], **feeds)
            if E["hidden_state"]:
                groups.setdefault(E["sequence_group"], []).append(out[E["hidden_state"]])
                if E["attention_mask"] == "tokens":
                    mask = tmask
            if E["pooled"]:
                pooled.append(out[E["pooled"]])
        states = [np.concatenate(groups[k], axis=-1) for k in sorted(groups)]
        width = max(s.shape[-1] for s in states)
        states = [np.pad(s, ((0, 0), (0, 0), (0, width - s.shape[-1]))) for s in states]
        return np.concatenate(states, axis=1), (np.concatenate(pooled, axis=-1) if pooled else None), mask

    cond, pooled, mask = encode([prompt])
    use_cfg = M["guidance"]["mode"] == "cfg" and g > 1
    if use_cfg:
        uncond, upooled, umask = encode([""])
        cond = np.concatenate([uncond, cond])
        pooled = None if pooled is None else np.concatenate([upooled, pooled])
        mask = None if mask is None else np.concatenate([umask, mask])
    b2, (h, w) = cond.shape[0], latents.shape[-2:]
    extra = {D["inputs"]["text"]: cond}
    if M["guidance"]["mode"] == "scale_input":
        extra[M["guidance"]["input"]] = np.full((b2,), g, np.float32)
    if "pooled" in D["inputs"]:
        extra[D["inputs"]["pooled"]] = pooled
    if "text_mask" in D["inputs"]:
        extra[D["inputs"]["text_mask"]] = mask
    if "image_ids" in D["inputs"]:
        extra[D["inputs"]["image_ids"]] = np.array([(0, r, c) for r in range(h // 2) for c in range(w // 2)],
                                                   np.float32)
    if "text_ids" in D["inputs"]:
        extra[D["inputs"]["text_ids"]] = np.zeros((cond.shape[1], 3), np.float32)
    x = np.float32(S["init_noise_sigma"]) * latents
    prev_x0 = np.zeros_like(x)
    for i in range(len(S["timesteps"])):
        inp = np.float32(S["c_in"][i]) * x
        if use_cfg:
            inp = np.concatenate([inp, inp])
        if D["latent_layout"] == "packed_2x2":
            b, c = inp.shape[:2]
            inp = inp.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)
        t = np.full((b2,), np.float32(S["timesteps"][i]) * np.float32(D["timestep_scale"]), np.float32)
        m = run(D["component"], **{D["inputs"]["latents"]: inp, D["inputs"]["timestep"]: t}, **extra)[D["output"]]
        if D["latent_layout"] == "packed_2x2":
            b = m.shape[0]
            m = m.reshape(b, h // 2, w // 2, -1, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)
        if use_cfg:
            m_u, m_c = np.split(m, 2)
            m = m_u + np.float32(g) * (m_c - m_u)
        x0 = np.float32(S["x0_from_x"][i]) * x + np.float32(S["x0_from_m"][i]) * m
        x = (np.float32(S["next_from_x"][i]) * x + np.float32(S["next_from_x0"][i]) * x0
             + np.float32(S["next_from_prev_x0"][i]) * prev_x0)
        prev_x0 = x0
    z = x / np.float32(M["latent"]["scaling_factor"]) + np.float32(M["latent"]["shift_factor"])
    img = run("vae_decoder", latent_sample=z.astype(np.float32))["sample"]
    return np.clip(img / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


def test_the_documented_loop_reproduces_the_runtime(built):
    """docs/manifest.md's pseudocode covers the transformer families (PixArt's mask, SD3's two sequence groups
    and pooled projections, FLUX's packing, ids and guidance input)."""
    kind, _, artifact = built
    if kind == "sana":
        pytest.skip("Sana's instruction prefix and token selection are covered by the runtime test above")
    runtime = load(artifact, progress=False)
    shift = runtime.manifest["sampler"].get("dynamic_shift")
    side = 32 if shift is None else int(round(shift["image_seq_len"] ** 0.5)) * 2 * runtime.latent["vae_scale_factor"]
    scale = FAMILIES[kind][2]
    noise = runtime.initial_noise(seed=4, batch=1, height=side, width=side)
    ours = runtime(PROMPT, guidance=scale, height=side, width=side, latents=noise)
    doc = _doc_loop(artifact, PROMPT, scale, noise)
    assert float(np.abs(ours - doc).max()) <= 1e-5


def test_packing_round_trips_and_ids_match_diffusers():
    x = np.random.default_rng(0).standard_normal((2, 16, 6, 10)).astype(np.float32)
    packed = pack(x)
    ref = diffusers.FluxPipeline._pack_latents(torch.from_numpy(x), 2, 16, 6, 10).numpy()
    np.testing.assert_array_equal(packed, ref)
    np.testing.assert_array_equal(unpack(packed, 6, 10), x)
    ids = diffusers.FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(image_ids(6, 10), ids)


@pytest.mark.parametrize("profile", ["cpu-cache", "rtx-fp8"])
def test_unbuilt_profiles_are_refused_before_export(tmp_path, profile, tiny_dit_folder):
    folder = tiny_dit_folder("pixart")
    with pytest.raises(ProfileError, match="transformer denoisers"):
        plan(folder, profile)
    with pytest.raises(ProfileError, match="transformer denoisers"):
        build(folder, profile, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_rtx_fp16_builds_real_engines(tmp_path, kind, tiny_dit_folder):
    """TensorRT-RTX fp16 engines for the tiny transformers, built ahead of time for SM89 on this GPU-less
    machine (opt level 0, as tests/engines/test_tensorrt_build.py does for the UNet); they cannot run here."""
    from diffc.engines import tensorrt as trt_engine

    if trt_engine.available("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX is not installed (pip install 'diffc[tensorrt]')")
    folder = tiny_dit_folder(kind)
    prof = tmp_path / "rtx.toml"
    prof.write_text('name = "rtx-fp16-o0"\nbackend = "tensorrt_rtx"\n[precision]\ndefault = "fp16"\n'
                    '[tensorrt]\ncompute_capabilities = ["SM89"]\nopt_level = 0\n')
    art = build(folder, prof, tmp_path / "rtx.diffc", steps=STEPS, progress=False)
    m = json.loads((art / "manifest.json").read_text())
    assert {c["backend"] for c in m["components"].values()} == {"tensorrt_rtx"}
    transformer = m["components"]["transformer"]
    assert transformer["precision"] == "fp16" and transformer["file"].endswith(trt_engine.ENGINE_FILE)
    axes = transformer["shape_ranges"]
    assert ("image_sequence" in axes) == (kind == "flux") and axes["sequence"] == [512 if kind == "flux" else 333] * 3
