"""The fixed-step text-to-image loop, driven entirely by the manifest.

Nothing here knows which diffusers scheduler or pipeline the artifact came from: the sampler is a table of
per-step coefficients (:mod:`diffc.runtime.sampler`), guidance is a policy string, and the text conditioning
is a list of (tokenizer, encoder, output) triples. docs/manifest.md gives the same loop in pseudocode.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from diffc.engines import input_profiles
from diffc.errors import InputError, ProfileError
from diffc.profiles.schema import MEMORY_ARENAS, base_component
from diffc.runtime.cache import full_steps
from diffc.runtime.manifest import artifact_path, read_manifest, verify_files
from diffc.runtime.sampler import SamplerTables, guidance_embedding, step
from diffc.runtime.tokenizer import PromptTokenizer

log = logging.getLogger("diffc.runtime")


def _open_session(name: str, component: dict[str, Any], path: Path, threads: int, cache_key: str | None,
                  cuda_graph: bool, ort_options: dict[str, Any], dims: dict[str, int] | None = None):
    backend = component["backend"]
    if backend == "onnxruntime":
        from diffc.engines.onnxruntime import Session

        if ort_options["memory_arena"] == "shared":
            arena = "shared"
        else:
            # "denoiser": only the UNet, which runs every step, keeps an arena of its own: the text encoder and the
            # VAE decoder run once per image, and their arenas would hold their peak activations (the 512x512
            # decoder's are large) while the UNet runs (SD 1.5 at 512x512: 6.9 GiB peak with every arena on, 5.3
            # without theirs, same speed)
            arena = "own" if base_component(name) == "unet" else "none"
        return Session(path, threads=threads or ort_options.get("intra_op_num_threads", 0),
                       inter_threads=ort_options.get("inter_op_num_threads", 0), cache_key=cache_key, arena=arena)
    if backend == "openvino":
        from diffc.engines.openvino import Session

        return Session(path, precision=component["precision"], threads=threads, shapes=opt_shapes(component, dims),
                       cache_key=cache_key)
    if backend in ("tensorrt", "tensorrt_rtx"):
        # checks TensorRT version and GPU architecture against the record before deserializing
        from diffc.engines.tensorrt import Session

        return Session(path, record=component, cache_key=cache_key, cuda_graph=cuda_graph)
    raise InputError(f"this runtime cannot run {backend!r} engines; rebuild the artifact with the 'cpu' profile")


def opt_shapes(component: dict[str, Any], dims: dict[str, int] | None = None) -> list[tuple[int, ...]] | None:
    """Each input's shape at the profile's opt point (the manifest's ``shape_ranges``: the default image size and
    batch), named dimensions in ``dims`` (e.g. the latent ``height`` / ``width``) replaced; None when the
    ranges do not give every input a shape."""
    ranges = dict(component.get("shape_ranges") or {})
    for name, value in (dims or {}).items():
        if name in ranges:
            ranges[name] = [ranges[name][0], value, ranges[name][2]]
    try:
        return [p.opt for p in input_profiles(component["inputs"], ranges).values()]
    except ProfileError:
        return None


def open_sessions(root: Path, manifest: dict[str, Any], *, threads: int = 0, verify: bool = True,
                  cache: bool = True, memory_arena: str | None = None,
                  dims: dict[str, int] | None = None) -> dict[str, Any]:
    """Open every component's engine while its files are hashed on another thread.

    Paths and presence are checked first (cheap); the sha256 of multi-GB weights (~1 GB/s) then overlaps
    with session creation (hashlib and onnxruntime both release the GIL), and nothing is returned, so
    nothing can run, before every hash has matched.

    onnxruntime sessions take the profile's ``[onnxruntime]`` table (threads, ``memory_arena``); ``threads``
    and ``memory_arena``, when given, override it. OpenVINO sessions compile for the opt shapes of
    ``shape_ranges``, with the named dimensions in ``dims`` (latent ``height`` / ``width``) instead.
    """
    verify_files(root, manifest, hashes=False)
    profile = manifest.get("profile", {})
    cuda_graph = bool(profile.get("tensorrt", {}).get("cuda_graph", True))
    ort_options = dict(profile.get("onnxruntime") or {})
    if memory_arena is not None:
        ort_options["memory_arena"] = memory_arena
    policy = ort_options.setdefault("memory_arena", "denoiser")
    if policy not in MEMORY_ARENAS:
        source = "asked for" if memory_arena is not None else "in the manifest's profile (a newer diffc built it?)"
        raise InputError(f"unknown memory arena policy {policy!r} {source}; this runtime knows {list(MEMORY_ARENAS)}: "
                         "pass memory_arena= (diffc run --memory-arena) or update diffc")
    with ThreadPoolExecutor(max_workers=1) as pool, ThreadPoolExecutor(max_workers=2) as compiling:
        hashing = pool.submit(verify_files, root, manifest, hashes=True) if verify else None
        sessions = {}
        for name, c in manifest["components"].items():
            key = "|".join(c["files"][f] for f in sorted(c["files"])) if cache else None
            args = (name, c, artifact_path(root, c["file"]), threads, key, cuda_graph, ort_options, dims)
            # OpenVINO compiles without the GIL and largely on one core: two components at a time (SD-1.5 int8 +
            # cache reuse on 2 cores: 8.8 s for the four instead of 11.6 one after another)
            sessions[name] = compiling.submit(_open_session, *args) if c["backend"] == "openvino" \
                else _open_session(*args)
        sessions = {name: s.result() if isinstance(s, Future) else s for name, s in sessions.items()}
        if hashing is not None:
            hashing.result()
    return sessions


def unet_for_timestep(step_variants: dict[str, Any] | None, timestep: float) -> str:
    """The UNet component that runs at ``timestep``: ``unet``, or with per-step-group quantized variants (the
    manifest's ``step_variants``) the one whose group holds it -- variant ``g`` = how many of the descending
    ``timestep_bounds`` lie above ``timestep``."""
    if not step_variants:
        return "unet"
    return step_variants["components"][sum(1 for b in step_variants["timestep_bounds"] if timestep < b)]


class Pipeline:
    """A loaded artifact. Call it with a prompt; get ``float32 (B, H, W, 3)`` images in [0, 1]."""

    def __init__(self, root: str | Path, *, threads: int = 0, verify: bool = True, cache: bool = True,
                 progress: bool = True, memory_arena: str | None = None, height: int | None = None,
                 width: int | None = None):
        """``height`` / ``width``: the image size the caller will ask for, when it is not the artifact's default:
        engines specialized by shape at load (OpenVINO) are compiled for it instead of the default, and calls
        that give no size produce it (:attr:`default_size`)."""
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        m = self.manifest
        self.progress = progress
        self.tables = SamplerTables.from_dict(m["sampler"])
        self.image = m["image"]
        self.latent = m["latent"]
        #: (height, width) in pixels of a call that gives no size
        self.default_size = (int(height or self.image["height"][1]), int(width or self.image["width"][1]))
        dims = {}
        if height or width:
            h, w = self.default_size
            self.check_size(h, w)
            dims = {"height": h // self.latent["vae_scale_factor"], "width": w // self.latent["vae_scale_factor"]}
        self.sessions = open_sessions(self.root, m, threads=threads, verify=verify, cache=cache,
                                      memory_arena=memory_arena, dims=dims)
        self.tokenizers = [PromptTokenizer(artifact_path(self.root, e["tokenizer"]), max_length=e["max_length"],
                                           pad_id=e["pad_id"]) for e in m["text_encoders"]]
        self.guidance = m["guidance"]
        #: the manifest's cache-reuse entry (None: the artifact has no shallow UNet)
        self.cache = m.get("cache")
        self.cache_schedule = self.cache["schedule"] if self.cache else None

    def set_cache_schedule(self, schedule: dict[str, Any] | None) -> None:
        """Change which steps run the full UNet: a schedule as in the manifest's ``cache.schedule``
        (``{"kind": "interval", "interval": 3}``, ...), or None to run the full UNet on every step."""
        if schedule is not None:
            if self.cache is None:
                raise InputError("this artifact was built without cache reuse; rebuild it with a profile whose "
                                 "[cache].enabled = true (e.g. cpu-cache)")
            try:
                full_steps(schedule, self.tables.num_steps)
            except ProfileError as e:
                raise InputError(f"bad cache schedule {schedule!r}: {e}") from None
        self.cache_schedule = schedule

    def full_steps(self) -> list[bool]:
        """Per step of the current sampler tables: True = full UNet (refreshes the cache), False = shallow."""
        n = self.tables.num_steps
        if self.cache_schedule is None:
            return [True] * n
        if self.cache_schedule == self.cache["schedule"] and len(self.cache["full_steps"]) == n:
            return [bool(v) for v in self.cache["full_steps"]]  # what the build precomputed
        try:
            return full_steps(self.cache_schedule, n)
        except ProfileError as e:
            raise InputError(f"the cache schedule does not fit {n} steps: {e}; set another with "
                             "set_cache_schedule()") from None

    # ------------------------------------------------------------------------------------------ pieces

    def check_size(self, height: int, width: int) -> None:
        mult = self.image["multiple_of"]
        for label, v, (lo, _, hi) in (("height", height, self.image["height"]), ("width", width, self.image["width"])):
            if not lo <= v <= hi:
                raise InputError(f"{label} {v} is outside this artifact's range [{lo}, {hi}]; pick a size in range or "
                                 f"rebuild with a profile whose [shapes].{label} covers {v}")
            if v % mult:
                raise InputError(f"{label} {v} is not a multiple of {mult} (VAE factor x UNet downsampling); "
                                 f"use {v - v % mult or mult} or {v - v % mult + mult}")

    def encode_text(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompts -> (encoder_hidden_states, pooled) as the UNet wants them (SDXL: both encoders, concatenated)."""
        hidden, pooled = [], None
        for enc, tok in zip(self.manifest["text_encoders"], self.tokenizers):
            ids = tok(list(prompts))
            out = self.sessions[enc["component"]].run({"input_ids": ids})
            hidden.append(out[enc["hidden_state"]])
            pooled = out["pooled_output"]
        return np.concatenate(hidden, axis=-1), pooled

    def initial_noise(self, seed: int | None, batch: int, height: int, width: int) -> np.ndarray:
        f = self.latent["vae_scale_factor"]
        rng = np.random.default_rng(seed)
        return rng.standard_normal((batch, self.latent["channels"], height // f, width // f), dtype=np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        z = latents / np.float32(self.latent["scaling_factor"]) + np.float32(self.latent.get("shift_factor", 0.0))
        img = self.sessions["vae_decoder"].run({"latent_sample": z.astype(np.float32)})["sample"]
        return np.clip(img / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    # ------------------------------------------------------------------------------------------ the loop

    def __call__(self, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 seed: int | None = 0, guidance: float | None = None, height: int | None = None,
                 width: int | None = None, latents: np.ndarray | None = None,
                 noise: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Generate images.

        ``latents``: the initial standard-normal latents (B, C, h, w) instead of drawing them from ``seed``;
        ``noise``: per-step noise for samplers that inject it (LCM), instead of drawing it from ``seed``.
        Both exist so a caller can reproduce another implementation's random stream exactly.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        lo_b, _, hi_b = self.image["batch"]
        if not lo_b <= batch <= hi_b:
            raise InputError(f"{batch} prompts is outside this artifact's batch range [{lo_b}, {hi_b}]; "
                             "split the prompts or rebuild with a larger [shapes].batch")
        height = height or self.default_size[0]
        width = width or self.default_size[1]
        self.check_size(height, width)
        g = float(self.guidance["default_scale"] if guidance is None else guidance)
        mode = self.guidance["mode"]
        # guidance <= 1 skips the uncond half (as diffusers does), unless the UNet engine has a static batch that
        # expects it (TensorRT static shapes): then run it anyway; m_u + g * (m_c - m_u) is still exact.
        unet_min_batch = self.manifest["components"]["unet"].get("shape_ranges", {}).get("batch", [1])[0]
        use_cfg = mode == "cfg" and (g > 1.0 or unet_min_batch > batch)

        cond, pooled = self.encode_text(prompts)
        extra: dict[str, np.ndarray] = {}
        if use_cfg:
            negs = [""] * batch if negative_prompt is None else (
                [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt))
            if len(negs) != batch:
                raise InputError(f"{len(negs)} negative prompts for {batch} prompts; give one per prompt or one for all")
            if negative_prompt is None and self.guidance.get("zero_uncond_for_empty_negative"):
                uncond, upooled = np.zeros_like(cond), (None if pooled is None else np.zeros_like(pooled))
            else:
                uncond, upooled = self.encode_text(negs)
            cond = np.concatenate([uncond, cond])
            pooled = None if pooled is None else np.concatenate([upooled, pooled])
        unet_batch = cond.shape[0]
        added = self.manifest.get("added_conditions") or {}
        if "text_embeds" in added:
            extra["text_embeds"] = pooled.astype(np.float32)
            extra["time_ids"] = np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (unet_batch, 1))
        if mode == "embedded":
            w = np.full((unet_batch,), g - 1.0, dtype=np.float32)
            extra[self.guidance.get("input", "timestep_cond")] = guidance_embedding(w, self.guidance["embedding_dim"])

        if latents is None:
            latents = self.initial_noise(seed, batch, height, width)
        x = self.denoise(latents, cond, extra, guidance=g if use_cfg else None, seed=seed, noise=noise)
        return self.decode(x)

    def denoise(self, latents: np.ndarray, cond: np.ndarray, extra: dict[str, np.ndarray] | None = None, *,
                guidance: float | None = None, seed: int | None = 0,
                noise: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """The denoising loop: standard-normal ``latents`` -> final latents. ``cond`` (and ``extra``) are the
        UNet's conditioning for the whole denoiser batch; ``guidance`` not None: classifier-free guidance, with
        ``cond`` holding the uncond half first. Full or shallow UNet per step as :meth:`full_steps` says."""
        t = self.tables
        use_cfg = guidance is not None
        unet_batch = cond.shape[0]
        x = latents.astype(np.float32) * np.float32(t.init_noise_sigma)
        rng = np.random.default_rng(None if seed is None else seed + 1)
        prev_x0 = np.zeros_like(x)
        variants = self.manifest.get("step_variants")
        full = self.full_steps()
        # The cached feature lives only in this call: every image starts from a full step and never sees another
        # image's feature. It holds the whole denoiser batch (uncond and cond halves under CFG).
        feature = None
        feature_name = self.cache["feature"] if self.cache else None
        for i in tqdm(range(t.num_steps), desc="sampling", unit="step", disable=not self.progress, leave=False):
            model_in = (x * np.float32(t.c_in[i])).astype(np.float32)
            if use_cfg:
                model_in = np.concatenate([model_in, model_in])
            unet = self.sessions[unet_for_timestep(variants, t.timesteps[i])]
            feeds = {"sample": model_in, "timestep": np.full((unet_batch,), t.timesteps[i], dtype=np.float32),
                     "encoder_hidden_states": cond, **(extra or {})}
            if feature is not None and not full[i]:
                m = self.sessions[self.cache["shallow_component"]].run({**feeds, feature_name: feature},
                                                                       ["out_sample"])["out_sample"]
            elif feature_name is not None and self.cache_schedule is not None:
                out = unet.run(feeds, ["out_sample", feature_name])
                m, feature = out["out_sample"], out[feature_name]
            else:
                m = unet.run(feeds, ["out_sample"])["out_sample"]
            if use_cfg:
                m_uncond, m_cond = np.split(m, 2)
                m = m_uncond + np.float32(guidance) * (m_cond - m_uncond)
            step_noise = None
            if t.next_from_noise[i] != 0.0:
                step_noise = noise[i] if noise is not None else rng.standard_normal(x.shape, dtype=np.float32)
            x, prev_x0 = step(t, i, x, m, prev_x0, step_noise)
        return x


def load(artifact: str | Path, **kwargs: Any) -> Pipeline:
    return Pipeline(artifact, **kwargs)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] float images -> uint8, rounding like diffusers' ``numpy_to_pil``."""
    return (images * 255).round().astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path)
    return path
