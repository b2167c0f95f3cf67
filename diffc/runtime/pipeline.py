"""The fixed-step text-to-image loop, driven entirely by the manifest.

Nothing here knows which diffusers scheduler or pipeline the artifact came from: the sampler is a table of
per-step coefficients (:mod:`diffc.runtime.sampler`), guidance is a policy string, and the text conditioning
is a list of (tokenizer, encoder, output) triples. docs/manifest.md gives the same loop in pseudocode.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from diffc.engines import SessionOptions, get_backend, opt_shapes  # noqa: F401 (opt_shapes: its old home)
from diffc.engines.host_cache import PublishGate
from diffc.errors import BackendUnavailableError, InputError, ManifestError, ProfileError
from diffc.names import GUIDANCE_MAX, MEMORY_ARENAS, SEED_MAX, max_threads
from diffc.runtime import controlnet, img2img, inpaint
from diffc.runtime.cache import full_steps
from diffc.runtime.manifest import artifact_path, read_manifest, verify_files
from diffc.runtime.denoiser import Conditioning, Feeds, TextEncoders, denoiser_spec, image_seq_len
from diffc.runtime.sampler import SamplerTables, guidance_embedding, step
from diffc.runtime.savings import History, Savings, cond_feeds, cond_half
from diffc.runtime import step_cache
from diffc.runtime.trace import RunTrace, StepRecord

log = logging.getLogger("diffc.runtime")


def _open_session(name: str, component: dict[str, Any], path: Path, options: SessionOptions):
    """Open one component through its backend's :meth:`~diffc.engines.Backend.open_session`."""
    try:
        backend = get_backend(component["backend"])
    except BackendUnavailableError:
        raise InputError(f"this runtime cannot run {component['backend']!r} engines; rebuild the artifact with the "
                         "'cpu' profile") from None
    return backend.open_session(name, component, path, options)


def _parallel_open(backend: str) -> bool:
    try:
        return get_backend(backend).parallel_open
    except BackendUnavailableError:
        return False  # _open_session says why it cannot open it


def open_sessions(root: Path, manifest: dict[str, Any], *, threads: int = 0, verify: bool = True,
                  cache: bool = True, memory_arena: str | None = None,
                  dims: dict[str, int] | None = None, vouched: bool = True) -> dict[str, Any]:
    """Open every component's engine while its files are hashed on another thread.

    Paths and presence are checked first (cheap); the sha256 of multi-GB weights (~1 GB/s) then overlaps
    with session creation (hashlib and onnxruntime both release the GIL), and nothing is returned, so
    nothing can run, before every hash has matched.

    onnxruntime sessions take the profile's ``[onnxruntime]`` table (threads, ``memory_arena``); ``threads``
    and ``memory_arena``, when given, override it. OpenVINO sessions compile for the opt shapes of
    ``shape_ranges``, with the named dimensions in ``dims`` (latent ``height`` / ``width``) instead.

    Host cache entries (:mod:`diffc.engines.host_cache`) are kept under the manifest's digests only once those
    have matched the files. ``verify=False`` skips the check: with ``vouched`` the caller answers for the files
    (the builder, which just wrote them) and new entries are kept; without it (a user who skips the check)
    existing entries are still used, and none is written.
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
    # New host cache entries wait for the hash check: an artifact whose files do not match the digests it
    # claims (its sessions are built from those files) must leave nothing under them.
    gate = PublishGate(verified=not verify and vouched)
    if not (verify or vouched):
        gate.close()  # unchecked files: nothing is written under their claimed digests
    try:
        with ThreadPoolExecutor(max_workers=1) as pool, ThreadPoolExecutor(max_workers=2) as compiling:
            hashing = pool.submit(verify_files, root, manifest, hashes=True) if verify else None
            sessions = {}
            for name, c in manifest["components"].items():
                key = "|".join(c["files"][f] for f in sorted(c["files"])) if cache else None
                options = SessionOptions(threads=threads, cache_key=key, gate=gate, cuda_graph=cuda_graph,
                                         onnxruntime=ort_options, dims=dims)
                args = (name, c, artifact_path(root, c["file"]), options)
                # OpenVINO compiles without the GIL and largely on one core: two components at a time (SD-1.5
                # int8 + cache reuse on 2 cores: 8.8 s for the four instead of 11.6 one after another)
                parallel = _parallel_open(c["backend"])
                sessions[name] = compiling.submit(_open_session, *args) if parallel else _open_session(*args)
            sessions = {name: s.result() if isinstance(s, Future) else s for name, s in sessions.items()}
            if hashing is not None:
                hashing.result()
    except BaseException:
        gate.close()
        raise
    gate.open()
    return sessions


def unet_for_timestep(step_variants: dict[str, Any] | None, timestep: float) -> str:
    """The UNet component that runs at ``timestep``: ``unet``, or with per-step-group quantized variants (the
    manifest's ``step_variants``) the one whose group holds it -- variant ``g`` = how many of the descending
    ``timestep_bounds`` lie above ``timestep``."""
    if not step_variants:
        return "unet"
    return step_variants["components"][sum(1 for b in step_variants["timestep_bounds"] if timestep < b)]


#: the manifest's ``guidance.mode``: ``cfg`` classifier-free guidance (uncond + cond halves in one denoiser batch),
#: ``embedded`` the scale is a UNet input (LCM), ``scale_input`` the scale itself is a denoiser input (FLUX-dev's
#: ``guidance``, one per row, no uncond half), ``none`` the model takes no guidance
GUIDANCE_MODES = ("cfg", "embedded", "scale_input", "none")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_threads(threads: Any, label: str = "threads") -> int:
    """``threads`` as a load takes it: 0 (the profile's setting) up to :func:`max_threads` of this machine."""
    hi = max_threads()
    if not _is_int(threads) or not 0 <= threads <= hi:
        raise InputError(f"{label} must be an integer from 0 (the profile's setting) to {hi} (4 per CPU of this "
                         f"machine), got {threads!r}")
    return int(threads)


def check_seed(seed: Any, label: str = "seed") -> int | None:
    """Seeds are None (fresh randomness) or integers from 0 to 2**64 - 1 (the C API's ``uint64_t``); a negative
    seed is refused rather than mapped, so that one seed never names two images."""
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= SEED_MAX):
        raise InputError(f"{label} must be an integer from 0 to 2**64 - 1 (or None for a random image), got {seed!r}")
    return None if seed is None else int(seed)


def check_guidance(guidance: Any, label: str = "guidance") -> float | None:
    """None (the artifact's default) or a finite number from 0 to :data:`GUIDANCE_MAX`."""
    if guidance is None:
        return None
    ok = isinstance(guidance, (int, float, np.integer, np.floating)) and not isinstance(guidance, (bool, np.bool_))
    if not ok or not math.isfinite(guidance) or not 0 <= guidance <= GUIDANCE_MAX:
        raise InputError(f"{label} must be a finite number from 0 to {GUIDANCE_MAX:g} (or None: the artifact's "
                         f"default), got {guidance!r}")
    return float(guidance)


def check_size_arg(label: str, value: Any) -> int | None:
    """None (the default size) or a positive integer; whether the artifact covers it is :meth:`Pipeline.check_size`."""
    if value is not None and (not _is_int(value) or value < 1):
        raise InputError(f"{label} must be a positive number of pixels (or None: the artifact's default), "
                         f"got {value!r}")
    return None if value is None else int(value)


def check_prompts(label: str, value: Any) -> list[str]:
    """A prompt or a sequence of prompts, each text that can be written as UTF-8 (a command line given in another
    encoding reaches Python as lone surrogates, which the tokenizer would turn into garbage)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)) or \
            not all(isinstance(p, str) for p in items):
        raise InputError(f"{label} must be a string or a list of strings, got {type(value).__name__}")
    for p in items:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"{label} {p[:40]!r} is not valid text (character {e.start} is not UTF-8: {e.reason}); "
                             "pass UTF-8 text, e.g. set a UTF-8 locale (LANG=C.UTF-8) for the shell") from None
    return list(items)


class _ClosedSessions(dict):
    """What a closed :class:`Pipeline` holds instead of its sessions: any use says the pipeline is closed."""

    def __getitem__(self, name: str):
        raise InputError("this pipeline is closed (Pipeline.close() or the end of its `with` block); load the "
                         "artifact again with diffc.load()")


def is_per_row(value: Any) -> bool:
    """Whether a ``seed`` / ``guidance`` argument gives one value per prompt (a list, tuple or 1-D array) rather
    than one for the whole call."""
    return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)


class Pipeline:
    """A loaded artifact. Call it with a prompt; get ``float32 (B, H, W, 3)`` images in [0, 1]."""

    def __init__(self, root: str | Path, *, threads: int = 0, verify: bool = True, cache: bool = True,
                 progress: bool = True, memory_arena: str | None = None, height: int | None = None,
                 width: int | None = None, loras: dict[str, float] | None = None,
                 savings: dict[str, Any] | None = None):
        """``height`` / ``width``: the image size the caller will ask for, when it is not the artifact's default:
        engines specialized by shape at load (OpenVINO) are compiled for it instead of the default, and calls
        that give no size produce it (:attr:`default_size`). ``threads``: 0 (the profile's) up to
        :func:`~diffc.profiles.schema.max_threads`; anything else is an :class:`InputError`. ``loras``: ``{file:
        scale}`` applied on top of the artifact's weights, as :meth:`set_loras`. ``savings``: run-time overrides of
        the manifest's savings, as :meth:`set_savings` takes them."""
        check_threads(threads)
        if loras:
            from diffc.runtime.lora import specs

            specs(loras)  # a missing file or a bad scale is refused before the engines load
        height, width = check_size_arg("height", height), check_size_arg("width", width)
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
            dims = {"height": h // self.latent["vae_scale_factor"], "width": w // self.latent["vae_scale_factor"],
                    "image_height": h, "image_width": w}  # the vae_encoder's pixel axes
        self.sessions = open_sessions(self.root, m, threads=threads, verify=verify, cache=cache,
                                      memory_arena=memory_arena, dims=dims, vouched=False)
        #: how the sessions were opened (set_loras reopens some), and which engines hold run-time LoRA weights
        self.session_args = {"threads": threads, "memory_arena": memory_arena, "dims": dims, "cache": cache,
                             "verified": verify}
        self.lora_engines: set[str] = set()
        #: the run-time LoRAs applied (name, sha256, scale); the build's own are the manifest's ``loras``
        self.loras: list[dict[str, Any]] = []
        #: the text encoders' tokenizers and how their outputs combine (diffc.runtime.denoiser)
        self.text = TextEncoders(self.root, m["text_encoders"])
        self.tokenizers = self.text.tokenizers
        #: the denoiser: its component, input names, latent layout (the manifest's ``denoiser``; UNet without one)
        self.denoiser = denoiser_spec(m)
        self.guidance = m["guidance"]
        #: the manifest's cache-reuse entry (None: the artifact has no shallow UNet)
        self.cache = m.get("cache")
        self.cache_schedule = self.cache["schedule"] if self.cache else None
        #: the savings each call runs (the manifest's ``savings``, with set_savings' overrides)
        self.savings = Savings.from_dict(m.get("savings"))
        #: what the last call's loop evaluated, step by step (diffc.runtime.trace); None before the first call
        self.last_trace: RunTrace | None = None
        if savings:
            self.set_savings(**savings)
        if loras:
            self.set_loras(loras)

    def close(self) -> None:
        """Release every engine session now instead of at garbage collection: a TensorRT session saves its
        runtime cache (the kernels TensorRT-RTX compiled on this GPU) and frees its device memory; the others drop
        their sessions. Later calls raise :class:`InputError`. Idempotent; ``with diffc.load(...) as pipe:`` calls
        it on leaving the block."""
        sessions, self.sessions = self.sessions, _ClosedSessions()
        if isinstance(sessions, _ClosedSessions):
            return
        errors = []
        for name, session in sessions.items():
            close = getattr(session, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as e:  # noqa: BLE001 - close the others, then report the first failure
                    errors.append((name, e))
        for name, e in errors[1:]:
            log.warning("closing the %s session failed too: %s", name, e)
        if errors:
            raise errors[0][1]

    @property
    def closed(self) -> bool:
        return isinstance(self.sessions, _ClosedSessions)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def set_loras(self, loras: dict[str, float] | None) -> None:
        """Apply LoRAs without a rebuild: ``{file: scale}`` (kohya / A1111 / peft / diffusers safetensors) on top
        of the artifact's weights, replacing the LoRAs set before; ``{}`` or None: back to the artifact's weights,
        exactly. Only the engines whose weights change are reopened (:func:`diffc.runtime.lora.swap`); a bad file,
        a LoRA for another model or a non-finite scale raises :class:`~diffc.runtime.lora.LoraError` and changes
        nothing."""
        from diffc.runtime.lora import swap

        if self.closed:
            self.sessions["unet"]  # raises the closed-pipeline InputError
        self.loras = [lo.record() for lo in swap(self, loras)]

    def set_savings(self, **overrides: Any) -> None:
        """Override the manifest's savings for later calls (``diffc.runtime.savings.OVERRIDES``):
        ``guidance_from_step=S`` (static adaptive guidance), ``guidance_threshold=X`` (dynamic),
        ``adaptive_guidance="off"``, ``extrapolation_order=K``. Overrides apply to the manifest's settings, not to
        the previous call's: ``set_savings()`` with no keyword goes back to the manifest's. What cannot work on
        this artifact is an :class:`InputError`: adaptive guidance without classifier-free guidance, extrapolation
        with nothing cached. What each call evaluated is :attr:`last_trace`."""
        new = Savings.from_dict(self.manifest.get("savings")).with_overrides(**overrides)
        if new.adaptive_guidance.mode != "off" and self.guidance["mode"] != "cfg":
            raise InputError(f"adaptive guidance drops the uncond half of classifier-free guidance, but this "
                             f"artifact guides with mode {self.guidance['mode']!r}; leave it off")
        new.check_steps(self.tables.num_steps)
        if new.extrapolation_order > 0 and self.cache is None and new.step_cache is None:
            raise InputError("extrapolation_order > 0 extrapolates cached values, but this artifact caches none; "
                             "rebuild it with [cache].enabled (e.g. the cpu-cache profile) or a [savings].step_cache")
        self.savings = new

    def set_cache_schedule(self, schedule: dict[str, Any] | None) -> None:
        """Change which steps run the full UNet: a schedule as in the manifest's ``cache.schedule``
        (``{"kind": "interval", "interval": 3}``, ...), or None to run the full UNet on every step."""
        if schedule is not None:
            if not isinstance(schedule, dict):
                raise InputError(f"a cache schedule is a dict such as {{'kind': 'interval', 'interval': 2}}, or None; "
                                 f"got {type(schedule).__name__}")
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
                raise InputError(f"{label} {v} is not a multiple of {mult} (VAE factor x the denoiser's "
                                 f"downsampling or patch); "
                                 f"use {v - v % mult or mult} or {v - v % mult + mult}")

    def encode_text(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompts -> (encoder_hidden_states, pooled) as the denoiser wants them (SDXL: both encoders, concatenated;
        SD3: CLIP-L + CLIP-G, then T5). :meth:`encode_prompts` also gives the text mask."""
        c = self.encode_prompts(prompts)
        return c.hidden, c.pooled

    def encode_prompts(self, prompts: Sequence[str], *, negative: bool = False) -> Conditioning:
        """Prompts -> the denoiser's text conditioning (states, pooled, mask), as the manifest's ``text_encoders``
        say; ``negative``: tokenized as the pipeline tokenizes its negative prompt (Sana: no instruction)."""
        return self.text.encode(self.sessions, list(prompts), negative=negative)

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
                 seed: int | None | Sequence[int | None] = 0,
                 guidance: float | None | Sequence[float | None] = None, height: int | None = None,
                 width: int | None = None, latents: np.ndarray | None = None,
                 noise: Sequence[np.ndarray] | None = None, image: Any = None, strength: float | None = None,
                 encoder_noise: np.ndarray | None = None, mask_image: Any = None,
                 masked_image_noise: np.ndarray | None = None, control_image: Any = None,
                 controlnet_scale: float | Sequence[float] | None = None,
                 control_guidance_start: float | Sequence[float] | None = None,
                 control_guidance_end: float | Sequence[float] | None = None) -> np.ndarray:
        """Generate images.

        Every argument is checked before any engine runs (an :class:`InputError` names it): ``prompt`` a string or
        a list of strings (one image each, within the artifact's batch range), ``negative_prompt`` one for all or
        one per prompt, ``seed`` None (random) or an integer from 0 to 2**64 - 1, ``height`` / ``width`` None (the
        default size) or a size the artifact covers.

        ``guidance``: None (the artifact's default) or a finite number from 0 to 100. With ``cfg`` artifacts a
        scale <= 1 runs the conditional prediction alone, as diffusers does, so every scale in [0, 1] gives the
        same image as 1; ``embedded`` artifacts (LCM) feed ``guidance - 1`` to the UNet; ``none`` ignores it.

        Per row: ``seed`` and ``guidance`` may also be a list with one value per prompt. Row ``k`` then draws its
        latents (and injected noise) from its own seed and is guided by its own scale: the image a call with
        ``prompt[k]`` alone would give. This is how a server batches requests without changing their answers. One
        seed for all rows keeps its meaning: one draw for the whole batch.

        ``latents``: the initial standard-normal latents (B, C, h, w) instead of drawing them from ``seed``;
        ``noise``: per-step noise for samplers that inject it (LCM), instead of drawing it from ``seed``.
        Both exist so a caller can reproduce another implementation's random stream exactly.

        Image-to-image (artifacts with a ``vae_encoder``; :mod:`diffc.runtime.img2img`): ``image`` a path, PIL image
        or ``(H, W, 3)`` array (uint8, or float in [0, 1]), one for all prompts or a list with one per prompt;
        ``strength`` in (0, 1] (default 0.8) how much of it is redrawn. ``latents`` is then the noise added to the
        encoded image, ``encoder_noise`` the draw of the encoder's latent sample (both from ``seed`` if not given).

        Inpainting (:mod:`diffc.runtime.inpaint`): ``mask_image`` (path, PIL image or array; white = repaint, of the
        image's size) with ``image``; ``strength`` then defaults to 1.0. An artifact built from
        ``StableDiffusionInpaintPipeline`` feeds its UNet the mask and the masked image's latents (drawn with
        ``masked_image_noise``); any other UNet artifact blends the kept region back after each step.

        ControlNet (artifacts with a ``controlnets`` entry; :mod:`diffc.runtime.controlnet`): ``control_image`` a path,
        PIL image or array (one for all prompts, or a list per prompt; with several ControlNets a list with one such
        item per ControlNet), resized to the output size; ``controlnet_scale`` (default 1.0),
        ``control_guidance_start`` / ``_end`` (default 0 / 1: the fraction of the steps each ControlNet acts in),
        one value for all ControlNets or a list with one per ControlNet.
        """
        prompts = check_prompts("prompt", prompt)
        negs = None if negative_prompt is None else check_prompts("negative_prompt", negative_prompt)
        per_row_seed, per_row_guidance = is_per_row(seed), is_per_row(guidance)
        seed = [check_seed(s, f"seed[{k}]") for k, s in enumerate(seed)] if per_row_seed else check_seed(seed)
        guidance = [check_guidance(v, f"guidance[{k}]") for k, v in enumerate(guidance)] if per_row_guidance \
            else check_guidance(guidance)
        height, width = check_size_arg("height", height), check_size_arg("width", width)
        batch = len(prompts)
        lo_b, _, hi_b = self.image["batch"]
        if not lo_b <= batch <= hi_b:
            raise InputError(f"{batch} prompts is outside this artifact's batch range [{lo_b}, {hi_b}]; "
                             "split the prompts or rebuild with a larger [shapes].batch")
        for values, noun in ((seed, "seeds"), (guidance, "guidance scales")):
            if isinstance(values, list) and len(values) != batch:
                raise InputError(f"{len(values)} {noun} for {batch} prompts; give one per prompt or one for all")
        if isinstance(negative_prompt, str):
            negs = negs * batch
        if negs is not None and len(negs) != batch:
            raise InputError(f"{len(negs)} negative prompts for {batch} prompts; give one per prompt or one for all")
        init = masked = None
        if mask_image is not None or masked_image_noise is not None or inpaint.is_inpainting(self.manifest):
            masked = inpaint.prepare(self, image, mask_image, strength, batch, height, width, encoder_noise,
                                     masked_image_noise)  # inpainting (diffc.runtime.inpaint)
            height, width = masked.height, masked.width
        elif image is not None or strength is not None:  # image-to-image: the image sets the size unless one is asked
            init = img2img.prepare(self, image, strength, batch, height, width, encoder_noise)
            height, width = init.height, init.width
        # ControlNet artifacts (diffc.runtime.controlnet): the control image sets the size unless one is asked
        control = controlnet.prepare(self, control_image, controlnet_scale, control_guidance_start,
                                     control_guidance_end, batch, height, width,
                                     image_to_image=init is not None or masked is not None)
        if control is not None and control.height is not None:
            height, width = control.height, control.width
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        self.check_size(height, width)
        f = self.latent["vae_scale_factor"]
        shape = (batch, self.latent["channels"], height // f, width // f)
        if latents is not None and (not isinstance(latents, np.ndarray) or latents.shape != shape
                                    or not np.isfinite(latents).all()):
            raise InputError(f"latents must be a finite numpy array of shape {shape} for {batch} prompts at "
                             f"{height}x{width}, got {getattr(latents, 'shape', type(latents).__name__)}")
        if noise is not None and (not isinstance(noise, (Sequence, np.ndarray)) or len(noise) < self.tables.num_steps
                                  or any(np.shape(n) != shape for n in noise[:self.tables.num_steps])):
            raise InputError(f"noise must hold {self.tables.num_steps} arrays of shape {shape} (one per step)")
        default_g = float(self.guidance["default_scale"])
        scales = [default_g if v is None else float(v) for v in (guidance if per_row_guidance else [guidance] * batch)]
        mode = self.guidance["mode"]
        if mode not in GUIDANCE_MODES:  # read_manifest refuses it; a manifest edited in memory may still hold it
            raise ManifestError(f"guidance mode {mode!r} is unknown to this runtime (it knows {list(GUIDANCE_MODES)}); "
                                "rebuild the artifact or upgrade diffc")
        # guidance <= 1 skips the uncond half (as diffusers does), unless the UNet engine has a static batch that
        # expects it (TensorRT static shapes): then run it anyway; m_u + g * (m_c - m_u) is still exact.
        unet_min_batch = self.manifest["components"][self.denoiser["component"]].get("shape_ranges", {}).get(
            "batch", [1])[0]
        forced = unet_min_batch > batch
        use_cfg = mode == "cfg" and (max(scales) > 1.0 or forced)
        # per row: the scale, or NaN for a row whose own call would skip the uncond half (it takes m_cond alone)
        row_guidance = np.array([v if v > 1.0 or forced else np.nan for v in scales], np.float32)

        cond = self.encode_prompts(prompts)
        extra: dict[str, np.ndarray] = {}
        if use_cfg:
            negs = [""] * batch if negs is None else negs
            if negative_prompt is None and self.guidance.get("zero_uncond_for_empty_negative"):
                uncond = cond.zeros_like()
            else:
                uncond = self.encode_prompts(negs, negative=True)
            cond = Conditioning.cat([uncond, cond])
        pooled = cond.pooled
        unet_batch = cond.hidden.shape[0]
        added = self.manifest.get("added_conditions") or {}
        if "text_embeds" in added:
            extra["text_embeds"] = pooled.astype(np.float32)
            extra["time_ids"] = np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (unet_batch, 1))
        if mode == "embedded":
            w = np.array([v - 1.0 for v in scales], dtype=np.float32)
            extra[self.guidance.get("input", "timestep_cond")] = guidance_embedding(w, self.guidance["embedding_dim"])
        elif mode == "scale_input":
            extra[self.guidance["input"]] = np.array(scales, dtype=np.float32)

        if latents is None:
            latents = np.concatenate([self.initial_noise(s, 1, height, width) for s in seed]) if per_row_seed \
                else self.initial_noise(seed, batch, height, width)
        start = inpainting = None
        if init is not None:
            latents, start = init.start_latents(self, latents, seed, per_row_seed), init.start
        elif masked is not None:
            latents, start, inpainting = masked.start(self, latents, seed, per_row_seed)
        x = self.denoise(latents, cond, extra, guidance=row_guidance if use_cfg else None, seed=seed, noise=noise,
                         start=start, inpainting=inpainting, control=control)
        images = self.decode(x)
        if not np.isfinite(images).all():
            # NaN would pass np.clip and become black pixels: say so instead of writing a black image
            at = ", ".join(f"{v:g}" for v in sorted(set(scales)))
            raise InputError(f"the denoiser diverged (non-finite values at guidance {at}); try a smaller guidance "
                             "scale, and if that does not help, rebuild the artifact")
        return images

    def stream(self, prompt: str, **options: Any):
        """A streaming image-to-image loop for ``prompt`` (StreamDiffusion's stream batch): push frames, get each
        back ``n - 1`` frames later, the in-flight frames denoised as one batch (:class:`diffc.runtime.stream.Stream`:
        ``strength``, ``guidance`` 'none' / 'full', ``guidance_scale``, ``seed``, ``height``, ``width``)."""
        from diffc.runtime.stream import Stream  # numpy-only, like this module

        return Stream(self, prompt, **options)

    def tables_for(self, h: int, w: int) -> SamplerTables:
        """The sampler tables of a call at latent size ``h`` x ``w``: the built ones, or for a resolution-dependent
        shift (FLUX's ``mu``) the ones recomputed for that size's image sequence length."""
        return self.tables.for_image_seq_len(image_seq_len(self.denoiser, h, w))

    def denoise(self, latents: np.ndarray, cond: np.ndarray | Conditioning,
                extra: dict[str, np.ndarray] | None = None, *,
                guidance: float | np.ndarray | None = None, seed: int | None | Sequence[int | None] = 0,
                noise: Sequence[np.ndarray] | None = None, start: int | None = None,
                inpainting: inpaint.Inpainting | None = None,
                control: controlnet.ControlInput | None = None) -> np.ndarray:
        """The denoising loop: standard-normal ``latents`` -> final latents. ``cond`` (and ``extra``) are the
        UNet's conditioning for the whole denoiser batch; ``guidance`` not None: classifier-free guidance, with
        ``cond`` holding the uncond half first, at one scale or one per row (NaN: that row takes the conditional
        prediction alone). ``seed``: one seed, or one per row (each row's injected noise from its own stream).
        Full or shallow UNet per step as :meth:`full_steps` says. ``cond``: the text states alone, or a
        :class:`~diffc.runtime.denoiser.Conditioning` (with the pooled states and mask a transformer takes).
        ``start`` (image-to-image): ``latents`` are already the sampler's state at step ``start`` (not scaled by
        ``init_noise_sigma``), and steps ``start ..`` run. ``inpainting``: an inpainting call's mask inputs or latent
        blend (:class:`diffc.runtime.inpaint.Inpainting`). ``control``: the call's ControlNet images and scales
        (:class:`diffc.runtime.controlnet.ControlInput`; a ControlNet artifact without one runs them off)."""
        control = control or controlnet.off(self)  # a ControlNet artifact's UNet always takes the residual inputs
        if not isinstance(cond, Conditioning):
            cond = Conditioning(cond, None, None)
        h, w = latents.shape[-2:]
        t = self.tables_for(h, w)
        use_cfg = guidance is not None
        feeder = Feeds(self.denoiser, cond, dict(extra or {}), h, w)
        x = latents.astype(np.float32) * np.float32(t.init_noise_sigma) if start is None \
            else latents.astype(np.float32)
        # injected noise (LCM): from seed + 1, one stream for the batch, or one per row for per-row seeds
        seeds = list(seed) if is_per_row(seed) else [seed]
        rngs = [np.random.default_rng(None if s is None else s + 1) for s in seeds]
        if use_cfg:
            # a scale per row (NaN: that row takes the conditional prediction alone), shaped to broadcast
            g = np.broadcast_to(np.asarray(guidance, np.float32).reshape(-1, 1, 1, 1), (x.shape[0], 1, 1, 1))
        prev_x0 = np.zeros_like(x)
        variants = self.manifest.get("step_variants")
        full = self.full_steps()
        # The cached feature lives only in this call: every image starts from a full step and never sees another
        # image's feature. It holds the whole denoiser batch (uncond and cond halves under CFG).
        feature = None
        feature_name = self.cache["feature"] if self.cache else None
        # savings (diffc.runtime.savings): adaptive guidance's cond-only steps, the cached feature's extrapolation
        guide = self.savings.start(t.num_steps, use_cfg, x.shape[0], self.manifest["components"][
            self.denoiser["component"]].get("shape_ranges", {}).get("batch", [1])[0])
        history, full_feeder = History(self.savings.extrapolation_order), feeder
        # dynamic step caching (diffc.runtime.step_cache): head every step, tail when the head moved enough
        caching = step_cache.start(self.savings, self.manifest, self.sessions, self.denoiser["output"], start or 0,
                                   t.num_steps - 1)
        self.last_trace = RunTrace(images=x.shape[0])
        for i in tqdm(range(start or 0, t.num_steps), desc="sampling", unit="step", disable=not self.progress,
                      leave=False):
            cond_only, metrics, order = guide.cond_only(i), {}, 0
            if cond_only and feeder is full_feeder:  # the batch shrinks to the cond half, for good
                feeder, feature = cond_feeds(full_feeder), None if feature is None else cond_half(feature)
                history.map(cond_half)
                if caching is not None:
                    caching.map(cond_half)
            model_in = (x * np.float32(t.c_in[i])).astype(np.float32)
            if inpainting is not None:  # an inpainting UNet's mask inputs (diffc.runtime.inpaint)
                model_in = inpainting.unet_input(model_in)
            if use_cfg and not cond_only:
                model_in = np.concatenate([model_in, model_in])
            unet = self.sessions[unet_for_timestep(variants, t.timesteps[i]) if variants
                                 else self.denoiser["component"]]
            feeds = feeder.step(model_in, t.timesteps[i])
            if control is not None:  # the ControlNets' residuals for the UNet (zeros when none runs this step)
                feeds.update(control.residual_feeds(self.sessions, feeds, i, t.num_steps))
            evaluation = "shallow" if feature is not None and not full[i] else "full"
            if caching is not None:
                m, evaluation, metrics, order = caching.evaluate(i, feeds, t.timesteps[i], feeder.output)
            elif evaluation == "shallow":
                fed, order = history.at(t.timesteps[i])
                m = self.sessions[self.cache["shallow_component"]].run({**feeds, feature_name: fed},
                                                                       ["out_sample"])["out_sample"]
            elif feature_name is not None and self.cache_schedule is not None:
                out = unet.run(feeds, ["out_sample", feature_name])
                m, feature = out["out_sample"], out[feature_name]
                history.push(feature, t.timesteps[i])
            else:
                m = feeder.output(unet.run(feeds, [self.denoiser["output"]])[self.denoiser["output"]])
            if use_cfg:
                m, guided = guide.guide(i, m, g)
                metrics = {**metrics, **guided}  # the step cache's rel_l1 and adaptive guidance's cosine
            self.last_trace.add(StepRecord(i, evaluation, model_in.shape[0], cond_only, metrics, order))
            step_noise = None
            if t.next_from_noise[i] != 0.0:
                if noise is not None:
                    step_noise = noise[i]
                elif len(rngs) == 1:
                    step_noise = rngs[0].standard_normal(x.shape, dtype=np.float32)
                else:
                    step_noise = np.concatenate([r.standard_normal((1, *x.shape[1:]), dtype=np.float32) for r in rngs])
            x, prev_x0 = step(t, i, x, m, prev_x0, step_noise, entry=i == (start or 0))
            if inpainting is not None:  # the latent blend keeps the unmasked region
                x = inpainting.blend(i, x)
        return x


def load(artifact: str | Path, **kwargs: Any) -> Pipeline:
    return Pipeline(artifact, **kwargs)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] float images -> uint8, rounding like diffusers' ``numpy_to_pil``."""
    return (images * 255).round().astype(np.uint8)

