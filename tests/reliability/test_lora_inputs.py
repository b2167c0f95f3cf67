"""LoRA files and scales as untrusted input, at build and at run time.

Each bad input -- a scale that is NaN or inf, a missing, corrupt or truncated safetensors file, an unknown key
layout, a LoRA for another architecture (a module the model lacks, a factor of the wrong shape) -- is a typed
:class:`~diffc.runtime.lora.LoraError` that says what to do, raised before any work: a build writes nothing, a
loaded pipeline keeps producing the image it produced before. A model folder saved with an unfused adapter is a
:class:`~diffc.errors.ModelError` pointing at ``--lora``; a stray LoRA file in the folder gets a warning.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from diffc.cli import main
from diffc.errors import DiffcError, InputError, ModelError
from diffc.runtime.lora import LoraError, parse_spec

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _lora(path, tensors):
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))
    return path


def _factors(rng, out_dim, in_dim, rank=2, std=0.2):
    return rng.standard_normal((rank, in_dim)).astype(np.float32), \
        (std * rng.standard_normal((out_dim, rank))).astype(np.float32)


def _from_targets(path, manifest, n=6, seed=0, **override):
    """A peft-layout LoRA for ``n`` of the artifact's addressable UNet modules, from its manifest alone."""
    rng = np.random.default_rng(seed)
    modules = [(m, r) for m, r in manifest["lora_targets"]["modules"]["unet"].items() if r["at"]][:n]
    tensors = {}
    for module, rec in modules:
        shape = rec["shape"]
        down, up = _factors(rng, shape[0], int(np.prod(shape[1:])))
        tensors[f"unet.{module}.lora_A.weight"] = down.reshape(down.shape[0], *shape[1:]) if len(shape) == 4 else down
        tensors[f"unet.{module}.lora_B.weight"] = up.reshape(*up.shape, 1, 1) if len(shape) == 4 else up
    tensors.update(override)
    return _lora(path, tensors)


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("text, expected", [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("style.safetensors:0.5", ("style.safetensors", 0.5)),
    ("style.safetensors:-1", ("style.safetensors", -1.0)),
    ("C:/loras/style.safetensors", ("C:/loras/style.safetensors", 1.0)),
    ("a:b.safetensors:2", ("a:b.safetensors", 2.0)),
])
def test_parse_spec(text, expected):
    assert parse_spec(text) == expected


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_non_finite_scale_is_refused_by_the_cli(tmp_path, scale):
    lora = tmp_path / "style.safetensors"
    for args in (["build", "demo", "--out", str(tmp_path / "a.diffc"), "--lora", f"{lora}:{scale}"],
                 ["run", str(tmp_path / "none.diffc"), "--prompt", "x", "--out", str(tmp_path / "x.png"),
                  "--lora", f"{lora}:{scale}"]):
        result = CliRunner().invoke(main, ["-q", *args])
        assert result.exit_code == 2, result.output
        assert "error (lora_error): " in result.output and "must be a finite number" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "a.diffc").exists()


def test_lora_error_is_a_typed_input_error():
    assert issubclass(LoraError, InputError) and issubclass(LoraError, DiffcError)
    assert LoraError.code == "lora_error"


# ------------------------------------------------------------------------------------------------ build time


def _bad_files(tmp_path):
    rng = np.random.default_rng(0)
    down, up = _factors(rng, 32, 32)
    good = _lora(tmp_path / "good.safetensors", {f"unet.{TO_Q}.lora_A.weight": down, f"unet.{TO_Q}.lora_B.weight": up})
    data = good.read_bytes()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 64])
    unknown = _lora(tmp_path / "unknown.safetensors", {f"unet.{TO_Q}.hada_w1_a": down})
    half = _lora(tmp_path / "half.safetensors", {f"unet.{TO_Q}.lora_A.weight": down})
    return {
        "missing": (tmp_path / "nope.safetensors", "does not exist"),
        "corrupt": (corrupt, "corrupt or truncated"),
        "truncated": (truncated, "corrupt or truncated"),
        "unknown layout": (unknown, "hada_w1_a"),
        "no up factor": (half, "no matching up factor"),
    }


def test_bad_lora_files_fail_the_build_before_any_work(tmp_path):
    import diffc

    for what, (path, message) in _bad_files(tmp_path).items():
        with pytest.raises(LoraError, match=message):
            diffc.build("demo", "cpu-fp32", tmp_path / "out.diffc", loras=[(path, 1.0)], progress=False)
        assert not (tmp_path / "out.diffc").exists(), what
    for scale in (math.nan, math.inf):
        with pytest.raises(LoraError, match="finite"):
            diffc.build("demo", "cpu-fp32", tmp_path / "out.diffc", loras=[(tmp_path / "good.safetensors", scale)],
                        progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["good.safetensors", "corrupt.safetensors", "truncated.safetensors", "unknown.safetensors", "half.safetensors"])


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    pytest.importorskip("torch", reason="building needs the export extra")
    from diffc.exporter.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", "sd", seed=0)


@pytest.mark.parametrize("key, shape, message", [
    (f"unet.{TO_Q}", ((2, 40), (32, 2)), f"{TO_Q}.lora_A.weight' is for a weight of 32 x 40"),
    ("unet.down_blocks.7.attentions.0.proj_in", ((2, 32), (32, 2)), "addresses module 'down_blocks.7"),
    ("transformer.transformer_blocks.0.attn.to_q", ((2, 32), (32, 2)), "addresses 'transformer'"),
])
def test_lora_for_another_architecture_fails_the_build(tmp_path, tiny_sd, key, shape, message):
    import diffc

    rng = np.random.default_rng(0)
    lora = _lora(tmp_path / "other.safetensors", {f"{key}.lora_A.weight": rng.standard_normal(shape[0]),
                                                  f"{key}.lora_B.weight": rng.standard_normal(shape[1])})
    with pytest.raises(LoraError, match=message) as err:
        diffc.build(tiny_sd, "cpu-fp32", tmp_path / "out.diffc", loras=[(lora, 1.0)], progress=False)
    assert "another architecture" in str(err.value)
    assert not (tmp_path / "out.diffc").exists()


def test_unfused_adapter_folder_is_refused_and_stray_lora_warned(tmp_path, tiny_sd, caplog):
    """Reproduces issue 33: a pipeline saved after load_lora_weights() without fuse_lora() (peft's base_layer /
    lora_A keys in the UNet's weights) is a ModelError naming --lora, not an export failure on meta tensors."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    import diffc
    from diffc.exporter.lora import check_folder

    rng = np.random.default_rng(0)
    down, up = _factors(rng, 32, 32)
    lora = _lora(tmp_path / "pytorch_lora_weights.safetensors",
                 {f"unet.{TO_Q}.lora_A.weight": down, f"unet.{TO_Q}.lora_B.weight": up})
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_sd, dtype=torch.float32)
    pipe.load_lora_weights(str(lora))
    pipe.save_pretrained(tmp_path / "unfused")
    with pytest.raises(ModelError, match="unfused LoRA adapter .*--lora"):
        diffc.build(tmp_path / "unfused", "cpu-fp32", tmp_path / "out.diffc", progress=False)
    assert not (tmp_path / "out.diffc").exists()

    stray = tiny_sd.parent / "stray"
    import shutil

    shutil.copytree(tiny_sd, stray)
    shutil.copy(lora, stray / "pytorch_lora_weights.safetensors")
    with caplog.at_level(logging.WARNING, logger="diffc.export"):
        check_folder(stray, [])
    assert any("pytorch_lora_weights.safetensors" in r.message and "--lora" in r.message for r in caplog.records)
    caplog.clear()
    from diffc.runtime.lora import spec

    with caplog.at_level(logging.WARNING, logger="diffc.export"):
        check_folder(stray, [spec(stray / "pytorch_lora_weights.safetensors")])
    assert not caplog.records  # passed with --lora: nothing to warn about


# ------------------------------------------------------------------------------------------------ run time


@pytest.fixture(scope="module")
def demo_pipe(demo_cpu_artifact):
    from diffc.runtime import load

    return load(demo_cpu_artifact, progress=False)


def _image(pipe):
    return pipe("a handwritten digit 3", seed=1, guidance=3.0)


def test_bad_run_time_loras_leave_the_pipeline_unchanged(tmp_path, demo_pipe):
    manifest = demo_pipe.manifest
    before = _image(demo_pipe)
    bad = _bad_files(tmp_path)
    good = _from_targets(tmp_path / "demo_lora.safetensors", manifest)
    module, rec = next((m, r) for m, r in manifest["lora_targets"]["modules"]["unet"].items() if r["at"])
    wrong_shape = _from_targets(tmp_path / "wrong.safetensors", manifest, n=1,
                                **{f"unet.{module}.lora_A.weight": np.ones((2, int(np.prod(rec["shape"][1:])) + 1))})
    bad["wrong shape"] = (wrong_shape, "for a weight of")
    for what, (path, message) in bad.items():
        with pytest.raises(LoraError, match=message):
            demo_pipe.set_loras({path: 1.0})
        assert demo_pipe.loras == [] and demo_pipe.lora_engines == set(), what
    for scale in (math.nan, math.inf, "1"):
        with pytest.raises(LoraError, match="finite"):
            demo_pipe.set_loras({good: scale})
    with pytest.raises(LoraError, match="single path"):
        demo_pipe.set_loras(str(good))
    assert np.array_equal(_image(demo_pipe), before)

    # a good one changes the image; back to none restores it exactly
    demo_pipe.set_loras({good: 1.0})
    assert demo_pipe.lora_engines == {"unet"} and demo_pipe.loras[0]["name"] == "demo_lora.safetensors"
    assert float(np.abs(_image(demo_pipe) - before).max()) > 1e-2
    demo_pipe.set_loras({})
    assert np.array_equal(_image(demo_pipe), before)


def test_artifact_without_lora_targets_says_to_rebuild(demo_pipe, tmp_path, monkeypatch):
    good = _from_targets(tmp_path / "good.safetensors", demo_pipe.manifest)
    manifest = {k: v for k, v in demo_pipe.manifest.items() if k != "lora_targets"}
    monkeypatch.setattr(demo_pipe, "manifest", manifest)
    with pytest.raises(LoraError, match="records no LoRA targets.*--lora"):
        demo_pipe.set_loras({good: 1.0})


def test_cli_run_with_a_lora(tmp_path, demo_cpu_artifact, demo_pipe):
    from PIL import Image

    from diffc.runtime import load, to_uint8

    good = _from_targets(tmp_path / "good.safetensors", demo_pipe.manifest)
    out = tmp_path / "x.png"
    result = CliRunner().invoke(main, ["-q", "run", str(demo_cpu_artifact), "--prompt", "a handwritten digit 3",
                                       "--seed", "1", "--guidance", "3", "--out", str(out), "--lora", f"{good}:0.8"])
    assert result.exit_code == 0, result.output
    want = to_uint8(load(demo_cpu_artifact, progress=False, loras={good: 0.8})("a handwritten digit 3", seed=1,
                                                                                guidance=3.0))[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), want)


def test_lora_on_a_weight_the_engines_do_not_hold_says_to_fuse_at_build(demo_pipe, tmp_path, monkeypatch):
    """A weight the build found in no replaceable graph (quantized, folded) is recorded without a location; a
    run-time LoRA touching it is refused, naming the module, and the pipeline is unchanged."""
    import copy

    good = _from_targets(tmp_path / "demo_lora.safetensors", demo_pipe.manifest, n=2)
    manifest = copy.deepcopy(demo_pipe.manifest)
    module, rec = next((m, r) for m, r in manifest["lora_targets"]["modules"]["unet"].items() if r["at"])
    rec.update(at=[], why="quantized")
    monkeypatch.setattr(demo_pipe, "manifest", manifest)
    with pytest.raises(LoraError, match=rf"unet\.{module} .*quantized.*--lora"):
        demo_pipe.set_loras({good: 1.0})
    assert demo_pipe.lora_engines == set()


def test_bf16_lora_files_are_read(tmp_path):
    """numpy has no bfloat16, the dtype many LoRAs ship in: the reader widens it rather than calling the file
    corrupt."""
    import json

    from diffc.runtime.lora import read_lora, spec

    rng = np.random.default_rng(0)
    values = {f"unet.{TO_Q}.lora_A.weight": rng.standard_normal((2, 32)).astype(np.float32),
              f"unet.{TO_Q}.lora_B.weight": rng.standard_normal((32, 2)).astype(np.float32)}
    header, blobs, at = {}, [], 0
    for key, v in values.items():
        top = (v.view(np.uint32) >> 16).astype("<u2").tobytes()  # bf16: the top half of each fp32
        header[key] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [at, at + len(top)]}
        blobs.append(top)
        at += len(top)
    text = json.dumps(header).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    factor = read_lora(spec(path)).factors["unet"][TO_Q]
    for got, want in ((factor.down, values[f"unet.{TO_Q}.lora_A.weight"]),
                      (factor.up, values[f"unet.{TO_Q}.lora_B.weight"])):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2**-7)  # bf16 keeps 8 bits of mantissa
