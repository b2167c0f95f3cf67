"""Streaming image-to-image: StreamDiffusion's stream batch on a loaded UNet artifact.

A video or camera feed runs image-to-image on every frame with the same prompt and few steps. Called frame by
frame, :class:`~diffc.runtime.pipeline.Pipeline` would encode the prompt every time and run the denoiser once per
step per frame. The stream batch (StreamDiffusion, Kodaira et al. 2023) keeps the prompt's conditioning and denoises
the ``n`` in-flight frames as ONE denoiser batch per new frame, staggered across the ``n`` steps: the newest frame
is at the strength's start step, the oldest at the last step, and each call returns the frame that just finished
(after ``n - 1`` calls of warm-up, which return None). Each row follows exactly the path a single image-to-image
call takes (its own timestep, ``c_in``, sampler coefficients and multistep state), so frame ``f``'s output is the
image ``pipe(prompt, image=frame_f, strength=...)`` gives with the same draws -- the saving is batching, not an
approximation.

Guidance: ``"none"`` (the conditional prediction alone, what StreamDiffusion runs with turbo / LCM models) or
``"full"`` (classifier-free guidance with both halves in the batch). StreamDiffusion's residual CFG (an uncond
prediction approximated from the previous step's noise) is not implemented: it changes the image, and diffc's
streams stay equal to the frame-by-frame calls. Guidance-embedded artifacts (LCM) take the scale as their
``timestep_cond``, per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from diffc.errors import InputError
from diffc.runtime import img2img
from diffc.runtime.denoiser import Conditioning, Feeds
from diffc.runtime.pipeline import check_prompts, check_size_arg
from diffc.runtime.sampler import guidance_embedding, step

__all__ = ["GUIDANCE", "Stream"]

#: how a stream guides: the conditional prediction alone, or classifier-free guidance on both halves
GUIDANCE = ("none", "full")


class Stream:
    """A stream of image-to-image frames through one artifact and one prompt (:meth:`Pipeline.stream`)."""

    def __init__(self, pipe: Any, prompt: str, *, strength: float = 0.5, guidance: str = "none",
                 guidance_scale: float | None = None, seed: int | None = 0, height: int | None = None,
                 width: int | None = None, negative_prompt: str | None = None):
        if pipe.manifest.get("denoiser") or pipe.manifest.get("inpaint") or pipe.manifest.get("controlnets"):
            raise InputError("streaming runs plain UNet artifacts (SD 1.x / 2.x / SDXL / LCM); this artifact's "
                             "denoiser takes other inputs: call it frame by frame (pipe(prompt, image=frame))")
        if guidance not in GUIDANCE:
            raise InputError(f"guidance must be one of {list(GUIDANCE)} ('none': the conditional prediction alone; "
                             f"'full': classifier-free guidance), got {guidance!r}")
        if not isinstance(prompt, str):
            raise InputError(f"a stream takes one prompt (a string), got {type(prompt).__name__}")
        check_prompts("prompt", prompt)
        height, width = check_size_arg("height", height), check_size_arg("width", width)
        img2img.check_encoder(pipe.manifest)
        mode = pipe.guidance["mode"]
        if guidance == "full" and mode != "cfg":
            raise InputError(f"guidance='full' runs classifier-free guidance, but this artifact guides with mode "
                             f"{mode!r}; use guidance='none'")
        self.pipe, self.strength, self.seed = pipe, img2img.check_strength_value(strength), seed
        self.height, self.width = height or pipe.default_size[0], width or pipe.default_size[1]
        pipe.check_size(self.height, self.width)
        f = pipe.latent["vae_scale_factor"]
        self.latent_shape = (1, pipe.latent["channels"], self.height // f, self.width // f)
        self.tables = pipe.tables_for(*self.latent_shape[-2:])
        _, self.start = img2img.check_strength(self.strength, self.tables)
        self.steps = list(range(self.start, self.tables.num_steps))
        n = len(self.steps)
        scale = float(pipe.guidance["default_scale"] if guidance_scale is None else guidance_scale)
        self.cfg, self.scale = guidance == "full", scale
        # the prompt's conditioning, once, for the n-row batch (uncond half first under CFG)
        cond = pipe.encode_prompts([prompt])
        if self.cfg:
            uncond = pipe.encode_prompts([negative_prompt or ""], negative=True)
            rows = Conditioning.cat([uncond] * n + [cond] * n)
        else:
            rows = Conditioning.cat([cond] * n)
        extra: dict[str, np.ndarray] = {}
        batch = rows.hidden.shape[0]
        if "text_embeds" in (pipe.manifest.get("added_conditions") or {}):
            extra["text_embeds"] = rows.pooled.astype(np.float32)
            extra["time_ids"] = np.tile(np.array([[self.height, self.width, 0, 0, self.height, self.width]],
                                                 np.float32), (batch, 1))
        if mode == "embedded":
            extra[pipe.guidance.get("input", "timestep_cond")] = np.repeat(
                guidance_embedding(np.array([scale - 1.0], np.float32), pipe.guidance["embedding_dim"]), batch, 0)
        self.feeder = Feeds(pipe.denoiser, rows, extra, *self.latent_shape[-2:])
        self.rng = np.random.default_rng(seed)
        self.noise_rng = np.random.default_rng(None if seed is None else seed + 1)
        # in flight: per slot (the frame's latents at step steps[j], its previous x0)
        self.slots: list[tuple[np.ndarray, np.ndarray] | None] = [None] * n
        self.frames_in = 0

    def __call__(self, frame: Any, *, latents: np.ndarray | None = None,
                 encoder_noise: np.ndarray | None = None) -> np.ndarray | None:
        """Push one frame (path, PIL image or ``(H, W, 3)`` array at the stream's size); returns the finished
        frame ``(H, W, 3)`` in [0, 1] from ``n - 1`` calls ago, or None while the stream fills. ``latents`` /
        ``encoder_noise`` replace this frame's draws, as in :meth:`Pipeline.__call__` (LCM's per-step noise comes
        from ``seed + 1``, one draw per row and step)."""
        pipe, t, shape = self.pipe, self.tables, self.latent_shape
        image = img2img.fit_image(img2img.load_image(frame, "frame"), self.height, self.width, "frame",
                                  pipe.image["multiple_of"])
        pixels = (image.transpose(2, 0, 1)[None] * np.float32(2.0) - np.float32(1.0)).astype(np.float32)
        if latents is None:
            latents = self.rng.standard_normal(shape, dtype=np.float32)
        if encoder_noise is None:
            encoder_noise = self.rng.standard_normal(shape, dtype=np.float32)
        x0 = img2img.encode(pipe, pixels, encoder_noise, shape)
        x = np.asarray(t.add_noise(self.start, x0, latents.astype(np.float32)), np.float32)
        self.slots = [(x, np.zeros_like(x))] + self.slots[:-1]
        self.frames_in += 1
        live = [j for j, s in enumerate(self.slots) if s is not None]
        xs = np.concatenate([self.slots[j][0] for j in live])
        idx = [self.steps[j] for j in live]
        c_in = np.array([t.c_in[i] for i in idx], np.float32).reshape(-1, 1, 1, 1)
        model_in = (xs * c_in).astype(np.float32)
        n = len(self.steps)
        # the feeder holds n rows per half; while the stream fills, the live rows are its first ones
        pick = np.array(live + ([n + j for j in live] if self.cfg else []))
        batch_in = np.concatenate([model_in, model_in]) if self.cfg else model_in
        feeds = self.feeder.step(batch_in, 0.0)
        feeds = {k: (v[pick] if k != self.feeder.inputs["latents"] and isinstance(v, np.ndarray) and v.ndim >= 1
                     and v.shape[0] == self.feeder.batch else v) for k, v in feeds.items()}
        timesteps = np.array([t.timesteps[i] for i in idx], np.float32)
        feeds[self.feeder.inputs["timestep"]] = np.concatenate([timesteps, timesteps]) if self.cfg else timesteps
        out = pipe.sessions[pipe.denoiser["component"]].run(feeds, [pipe.denoiser["output"]])[pipe.denoiser["output"]]
        if self.cfg:
            m_u, m_c = np.split(out, 2)
            out = m_u + np.float32(self.scale) * (m_c - m_u)
        done = None
        for r, j in enumerate(live):
            i = self.steps[j]
            xj, prev = self.slots[j]
            step_noise = None
            if t.next_from_noise[i] != 0.0:
                step_noise = self.noise_rng.standard_normal(shape, dtype=np.float32)
            x_next, x0_pred = step(t, i, xj, out[r:r + 1], prev, step_noise, entry=j == 0)
            if j == n - 1:
                done = x_next
            else:
                self.slots[j] = (x_next, x0_pred)
        if done is None:
            return None
        self.slots[n - 1] = None
        return pipe.decode(done)[0]

    @property
    def delay(self) -> int:
        """Frames pushed before the first one comes out, minus one: ``n - 1`` for ``n`` steps."""
        return len(self.steps) - 1
