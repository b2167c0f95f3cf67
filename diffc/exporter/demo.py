"""The demo model behind ``diffc build demo``: the tiny SD pipeline of :mod:`diffc.exporter.tiny`.

Until trained weights are committed to ``diffc/assets/demo_weights/`` (``unet.safetensors``,
``vae.safetensors``, ``text_encoder.safetensors``, written by :func:`diffc.exporter.tiny.save_component_weights`)
the demo uses the seeded random initialisation: it builds and runs end to end, but draws noise-like images.
"""

from __future__ import annotations

from pathlib import Path

from diffc.exporter.tiny import write_tiny_pipeline

#: trained weights for the demo, one safetensors state dict per component (may not exist yet)
DEMO_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "demo_weights"
DEMO_KIND = "sd"
DEMO_SEED = 0


def write_demo_pipeline(out_dir) -> Path:
    """Write the demo diffusers pipeline folder to ``out_dir`` (must not exist, or be empty); returns it."""
    weights = DEMO_WEIGHTS if DEMO_WEIGHTS.is_dir() else None
    return write_tiny_pipeline(out_dir, DEMO_KIND, DEMO_SEED, weights=weights)
