"""Requests -> rows -> batched pipeline calls, the part of the Triton model that does not need Triton.

Each row of each request carries its own seed and guidance; rows of different requests that share an image
size (and whether a negative prompt is given) run through one pipeline call, and each row's image is the
image a call for that row alone would give (the pipeline draws each row's latents and noise from its own seed).
A request that fails validation gets its own error and never stops the other requests of the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffc.errors import DiffcError, InputError
from diffc.runtime.pipeline import check_guidance, check_seed, check_size_arg, to_uint8

log = logging.getLogger("diffc.serve")


@dataclass(frozen=True)
class Row:
    prompt: str
    negative_prompt: str | None
    seed: int
    guidance: float | None
    height: int
    width: int


def _text(label: str, value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{label} is not UTF-8 text (byte {e.start}); send the prompt encoded as UTF-8") from None
    if not isinstance(value, str):
        raise InputError(f"{label} must be text (a BYTES tensor), got {type(value).__name__}")
    return value


def _column(arrays: dict[str, np.ndarray | None], name: str, rows: int) -> list[Any] | None:
    a = arrays.get(name)
    if a is None:
        return None
    a = np.asarray(a)
    if a.ndim == 0 or a.shape[0] != rows or a.size != rows:
        raise InputError(f"input {name!r} has shape {list(a.shape)}; send one value per row ([{rows}, 1]), like "
                         "'prompt'")
    return a.reshape(rows).tolist() if a.dtype != object else list(a.reshape(rows))


def parse_request(pipe, arrays: dict[str, np.ndarray | None]) -> list[Row]:
    """One request's input tensors (name -> array of shape [B, 1], None when left out) -> its checked rows.

    Every check runs before any engine does, with diffc's own messages (:class:`InputError`)."""
    if arrays.get("prompt") is None:
        raise InputError("the request has no 'prompt' input; send one prompt per row as a BYTES tensor [B, 1]")
    rows = int(np.asarray(arrays["prompt"]).shape[0]) if np.asarray(arrays["prompt"]).ndim else 1
    lo_b, _, hi_b = pipe.image["batch"]
    if not lo_b <= rows <= hi_b:
        raise InputError(f"{rows} rows is outside this artifact's batch range [{lo_b}, {hi_b}]; send at most {hi_b} "
                         "rows per request")
    prompts = [_text("prompt", p) for p in _column(arrays, "prompt", rows)]
    for p in prompts:
        if not p.strip():
            raise InputError("prompt is empty; send the text of the image to generate (an empty prompt is almost "
                             "always a client bug, and the image it gives is not meaningful)")
    negs = _column(arrays, "negative_prompt", rows)
    negs = [None] * rows if negs is None else [_text("negative_prompt", n) for n in negs]
    seeds = _column(arrays, "seed", rows) or [0] * rows
    guidance = _column(arrays, "guidance", rows) or [None] * rows
    heights = _column(arrays, "height", rows) or [pipe.default_size[0]] * rows
    widths = _column(arrays, "width", rows) or [pipe.default_size[1]] * rows
    out = []
    for prompt, neg, seed, g, h, w in zip(prompts, negs, seeds, guidance, heights, widths, strict=True):
        seed = check_seed(int(seed) if isinstance(seed, (int, np.integer)) else seed)
        g = None if g is None else check_guidance(float(g))
        h, w = check_size_arg("height", int(h)), check_size_arg("width", int(w))
        pipe.check_size(h, w)
        out.append(Row(prompt, neg, seed, g, h, w))
    return out


def _groups(rows: list[Row], hi_b: int) -> list[list[int]]:
    """Indices of rows that can share one pipeline call (same size, same negative-prompt presence), in chunks of at
    most ``hi_b``."""
    by_key: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        by_key.setdefault((r.height, r.width, r.negative_prompt is None), []).append(i)
    return [idx[k:k + hi_b] for idx in by_key.values() for k in range(0, len(idx), hi_b)]


def generate(pipe, rows: list[Row]) -> list[np.ndarray]:
    """Each row's uint8 image (H, W, 3), through as few pipeline calls as the rows allow."""
    images: list[np.ndarray | None] = [None] * len(rows)
    for idx in _groups(rows, pipe.image["batch"][2]):
        group = [rows[i] for i in idx]
        negs = None if group[0].negative_prompt is None else [r.negative_prompt for r in group]
        out = pipe([r.prompt for r in group], negative_prompt=negs, seed=[r.seed for r in group],
                   guidance=[r.guidance for r in group], height=group[0].height, width=group[0].width)
        for i, img in zip(idx, to_uint8(out), strict=True):
            images[i] = img
    return images


def execute(pipe, requests: list[dict[str, np.ndarray | None]]) -> list[list[np.ndarray] | DiffcError]:
    """Per request: its images (one per row), or the :class:`DiffcError` that refused it. The valid requests run
    batched; if that call fails (a row whose guidance makes the denoiser diverge), each request runs alone so that
    only the failing one gets the error."""
    results: list[list[np.ndarray] | DiffcError | None] = [None] * len(requests)
    parsed: list[tuple[int, list[Row]]] = []
    for k, arrays in enumerate(requests):
        try:
            parsed.append((k, parse_request(pipe, arrays)))
        except DiffcError as e:
            results[k] = e
    rows = [r for _, rs in parsed for r in rs]
    try:
        images = generate(pipe, rows) if rows else []
    except DiffcError as e:
        if len(parsed) == 1:
            results[parsed[0][0]] = e
            return results
        log.info("a batch of %d requests failed (%s); running them one by one", len(parsed), e)
        for k, rs in parsed:
            try:
                results[k] = generate(pipe, rs)
            except DiffcError as err:
                results[k] = err
        return results
    at = 0
    for k, rs in parsed:
        results[k] = images[at:at + len(rs)]
        at += len(rs)
    return results
