"""The shipped demo LoRA (``demo-bold``, tools/train_demo_lora.py) on the shared demo artifact.

It loads by its short name, thickens the strokes (the ink fraction grows with the scale: what it was trained to
do), keeps the digits the judge's prompted ones, and going back to no LoRA gives the base images bit for bit. On
an int8 artifact (weights quantized, not addressable) the swap is a typed error that changes nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from diffc.runtime.lora import BUNDLED_LORAS, LoraError, read_lora, spec

REPO = Path(__file__).resolve().parents[2]
DIGITS = tuple(range(10))
SEEDS = (0,)  # 10 images a pass: measured ink 0.117 -> 0.154 (0.5) -> 0.184 (1.0), judge 10/10 at each
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _judge():
    path = REPO / "benchmarks" / "judge" / "judge.py"
    mod_spec = importlib.util.spec_from_file_location("diffc_judge_lora_test", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.Judge()


def _images(pipe) -> np.ndarray:
    return np.concatenate([pipe(f"a handwritten digit {NAMES[d]}", seed=s) for d in DIGITS for s in SEEDS])


def _ink(images: np.ndarray) -> float:
    """Share of pixels brighter than 0.5: benchmarks/quality.py's ``stroke_stats`` ink fraction."""
    return float((images.mean(-1) > 0.5).mean())


@pytest.fixture(scope="module")
def demo_pipe(demo_cpu_artifact):
    from diffc.runtime import load

    return load(demo_cpu_artifact, progress=False)


def test_shipped_file_is_a_small_fp16_unet_lora():
    path = BUNDLED_LORAS["demo-bold"]
    assert path.name == "pytorch_lora_weights.safetensors" and path.stat().st_size <= 1_000_000
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    parsed = read_lora(spec("demo-bold", 1.0))
    assert set(parsed.factors) == {"unet"} and len(parsed.factors["unet"]) >= 20
    assert spec("demo-bold").path == path.resolve()


def test_demo_bold_thickens_strokes_keeps_digits_and_restores(demo_pipe):
    judge, labels = _judge(), np.repeat(DIGITS, len(SEEDS))
    base = _images(demo_pipe)
    ink = {0.0: _ink(base)}
    for scale in (0.5, 1.0):
        demo_pipe.set_loras({"demo-bold": scale})
        assert demo_pipe.lora_engines == {"unet"} and demo_pipe.loras[0]["name"] == "pytorch_lora_weights.safetensors"
        images = _images(demo_pipe)
        ink[scale] = _ink(images)
        accuracy = float((judge.predict(images) == labels).mean())
        assert accuracy >= 0.85, f"demo-bold at {scale}: the judge reads only {accuracy:.0%} as the prompted digit"
    # the trained direction: more ink, monotonically in the scale, by a margin far above noise
    assert ink[0.0] < ink[0.5] < ink[1.0] and ink[1.0] > 1.2 * ink[0.0], ink
    demo_pipe.set_loras({})
    assert demo_pipe.lora_engines == set()
    assert np.array_equal(_images(demo_pipe), base), "back to no LoRA must give the base images bit for bit"


def test_cli_takes_the_short_name(tmp_path, demo_cpu_artifact):
    from PIL import Image

    from diffc.cli import main
    from diffc.runtime import load, to_uint8

    out = tmp_path / "bold.png"
    result = CliRunner().invoke(main, ["-q", "run", str(demo_cpu_artifact), "--prompt", "a handwritten digit three",
                                       "--seed", "2", "--out", str(out), "--lora", "demo-bold:1.0"])
    assert result.exit_code == 0, result.output
    want = to_uint8(load(demo_cpu_artifact, progress=False, loras={BUNDLED_LORAS["demo-bold"]: 1.0})(
        "a handwritten digit three", seed=2))[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), want)


def test_int8_artifact_refuses_a_run_time_lora_and_stays_unchanged(demo_cpu_int8_artifact):
    """cpu-int8 stores the touched weights as int8 + per-channel scales (diffc/passes/quantize.py), which the
    build cannot address as fp32 weights: a typed error saying to fuse at build, and the pipeline unchanged."""
    from diffc.runtime import load

    pipe = load(demo_cpu_int8_artifact, progress=False)
    before = pipe("a handwritten digit seven", seed=3)
    with pytest.raises(LoraError, match=r"not addressable.*quantized.*diffc build --lora"):
        pipe.set_loras({"demo-bold": 1.0})
    assert pipe.loras == [] and pipe.lora_engines == set()
    assert np.array_equal(pipe("a handwritten digit seven", seed=3), before)
