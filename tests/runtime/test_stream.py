"""Streaming image-to-image: the stream batch gives each frame the image a frame-by-frame image-to-image call gives
with the same draws, n - 1 frames later, for both guidance modes; bad options are typed errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffc.errors import InputError
from diffc.runtime import load

PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def pipe(demo_cpu_artifact):
    return load(demo_cpu_artifact, progress=False)


@pytest.fixture(scope="module")
def frames(pipe):
    """Four 32x32 digits the demo drew itself: the 'video'."""
    return [(pipe(f"a handwritten digit {d}", seed=d)[0] * 255).round().astype(np.uint8) for d in range(4)]


@pytest.mark.parametrize("guidance, scale", [("none", 1.0), ("full", 5.0)])
@pytest.mark.parametrize("strength", [0.75, 0.5])
def test_stream_equals_frame_by_frame(pipe, frames, guidance, scale, strength):
    stream = pipe.stream(PROMPT, strength=strength, guidance=guidance, guidance_scale=scale, seed=3)
    n = pipe.tables.num_steps - pipe.tables.start_step(strength)
    assert stream.delay == n - 1 >= 1
    rng = np.random.default_rng(11)
    draws = [tuple(rng.standard_normal((1, 4, 8, 8), dtype=np.float32) for _ in range(2)) for _ in frames]
    outs = [stream(f, latents=a, encoder_noise=b) for f, (a, b) in zip(frames, draws)]
    assert [o is None for o in outs] == [k < n - 1 for k in range(len(frames))]
    for k in range(n - 1, len(frames)):
        src = k - (n - 1)
        alone = pipe(PROMPT, image=frames[src], strength=strength, guidance=scale, latents=draws[src][0],
                     encoder_noise=draws[src][1])[0]
        assert np.abs(outs[k] - alone).max() <= 1e-5, f"frame {src} out at push {k}"
        assert outs[k].std() > 0.02
    # the stream's own draws: the same seed, the same frames
    again = pipe.stream(PROMPT, strength=strength, guidance=guidance, guidance_scale=scale, seed=3)
    first = pipe.stream(PROMPT, strength=strength, guidance=guidance, guidance_scale=scale, seed=3)
    a = [again(f) for f in frames]
    b = [first(f) for f in frames]
    assert all(np.array_equal(x, y) for x, y in zip(a[n - 1:], b[n - 1:]))


@pytest.mark.parametrize("options, message", [
    ({"guidance": "residual"}, r"guidance must be one of \['none', 'full'\]"),
    ({"strength": 0.0}, r"strength must be a number in \(0, 1\]"),
    ({"strength": 0.1}, r"leaves no step to run"),
    ({"height": 33}, r"33"),
])
def test_bad_stream_options(pipe, options, message):
    with pytest.raises(InputError, match=message):
        pipe.stream(PROMPT, **options)


def test_bad_frames(pipe):
    stream = pipe.stream(PROMPT, strength=0.5)
    with pytest.raises(InputError, match=r"frame is 64x32 \(width x height\), another aspect ratio"):
        stream(np.zeros((32, 64, 3), np.uint8))
    with pytest.raises(InputError, match=r"frame must be an image file's path"):
        stream(7)


def test_stream_needs_a_vae_encoder(demo_cpu_artifact, tmp_path):
    art = tmp_path / "no-encoder"
    shutil.copytree(demo_cpu_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"no vae_encoder component"):
        load(art, progress=False).stream(PROMPT)
