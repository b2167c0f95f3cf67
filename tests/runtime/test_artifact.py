"""Artifact layout, manifest schema, atomic builds, and every bad input the runtime must refuse with a typed error."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
jsonschema = pytest.importorskip("jsonschema")

import diffc  # noqa: E402
from diffc.errors import (  # noqa: E402
    BackendUnavailableError,
    InputError,
    IntegrityError,
    ManifestError,
    OutputExistsError,
    ProfileError,
)
from diffc.runtime import load, read_manifest  # noqa: E402

SCHEMA = Path(diffc.__file__).parent / "runtime" / "manifest.schema.json"


@pytest.fixture(scope="module")
def artifact(demo_cpu_artifact):
    return demo_cpu_artifact  # shared by the run (tests/conftest.py): tests that change it use `copy`


@pytest.fixture
def copy(artifact, tmp_path):
    dst = tmp_path / "copy.diffc"
    shutil.copytree(artifact, dst)
    return dst


def _edit(path: Path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _options(pipe):
    return {name: s._sess.get_session_options() for name, s in pipe.sessions.items()}


def _uses_shared_arena(options) -> bool:
    try:
        return options.get_session_config_entry("session.use_env_allocators") == "1"
    except RuntimeError:  # onnxruntime raises for a key never set
        return False


def test_layout_and_schema(artifact):
    manifest = read_manifest(artifact)
    jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))
    assert set(manifest["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}  # + image-to-image
    assert (artifact / "build_report.json").is_file() and (artifact / "export_report.json").is_file()
    unet = manifest["components"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet["shape_ranges"]["batch"][2] == 2 * manifest["image"]["batch"][2]  # CFG doubles the batch
    assert unet["backend"] == "onnxruntime" and unet["precision"] == "fp32"
    assert len(manifest["sampler"]["timesteps"]) == manifest["profile"]["steps"]
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_schema_rejects_a_broken_manifest(artifact):
    manifest = read_manifest(artifact)
    manifest["sampler"]["kind"] = "plms"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, json.loads(SCHEMA.read_text()))


def test_runtime_does_not_import_torch(artifact):
    code = (
        "import sys\nfrom diffc.runtime import load\n"
        f"p = load({str(artifact)!r}, progress=False)\nimg = p('a cat', seed=1)\n"
        "assert img.shape[-1] == 3\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'tensorrt') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_run_writes_png(artifact, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from diffc.cli import main

    out = tmp_path / "x.png"
    r = CliRunner().invoke(main, ["-q", "run", str(artifact), "--prompt", "a handwritten digit seven", "--seed", "3",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    img = np.asarray(Image.open(out))
    expected = load(artifact, progress=False)("a handwritten digit seven", seed=3)[0]
    assert img.shape == expected.shape
    assert np.abs(img.astype(int) - (expected * 255).round().astype(int)).max() == 0


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (lambda p: (p / "manifest.json").unlink(), ManifestError, "no manifest.json"),
        (lambda p: (p / "manifest.json").write_text("{not json"), ManifestError, "corrupt"),
        (lambda p: (p / "manifest.json").write_text("[1, 2]"), ManifestError, "not a JSON object"),
        (lambda p: _edit(p, lambda m: m.update(schema_version=99)), ManifestError, "newer diffc"),
        (lambda p: _edit(p, lambda m: m.pop("sampler")), ManifestError, "lacks"),
        (lambda p: _edit(p, lambda m: m["components"].pop("unet")), ManifestError, "'unet'"),
        (lambda p: (p / "unet" / "model.onnx").unlink(), IntegrityError, "missing"),
        (lambda p: (p / "unet" / "model.onnx").write_bytes(b"\0" * 16), IntegrityError, "sha256"),
        (lambda p: _edit(p, lambda m: m["components"]["unet"].update(file="../../etc/passwd")), IntegrityError,
         "leaves the artifact"),
        (lambda p: _edit(p, lambda m: m["components"]["unet"].update(file="/etc/passwd")), IntegrityError,
         "leaves the artifact"),
        (lambda p: _edit(p, lambda m: m["sampler"].update(timesteps=[1.0])), ManifestError, "length|num_steps|entries"),
    ],
)
def test_bad_artifact_is_refused(copy, damage, error, message):
    damage(copy)
    before = sorted((q.relative_to(copy), q.stat().st_mtime_ns) for q in copy.rglob("*"))
    with pytest.raises(error, match=message):
        load(copy, progress=False)
    assert sorted((q.relative_to(copy), q.stat().st_mtime_ns) for q in copy.rglob("*")) == before  # nothing changed


def test_link_out_of_artifact_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(copy / "unet" / "model.onnx", outside)
    (copy / "unet" / "model.onnx").unlink()
    (copy / "unet" / "model.onnx").symlink_to(outside)
    with pytest.raises(IntegrityError, match="outside the artifact"):
        load(copy, progress=False)


def test_missing_artifact(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load(tmp_path / "nothing", progress=False)


@pytest.mark.parametrize("size, message", [((8, 32), "outside"), ((32, 128), "outside"), ((34, 32), "multiple of")])
def test_size_checks(artifact, size, message):
    pipe = load(artifact, progress=False)
    with pytest.raises(InputError, match=message):
        pipe("a cat", height=size[0], width=size[1])


def test_batch_range(artifact):
    pipe = load(artifact, progress=False)
    with pytest.raises(InputError, match="batch range"):
        pipe(["a"] * 5)


def test_long_prompt_is_truncated_with_a_warning(artifact, caplog):
    pipe = load(artifact, progress=False)
    long = "a handwritten digit seven " * 30
    with caplog.at_level(logging.WARNING, logger="diffc.runtime"):
        img = pipe(long, seed=0)
    assert img.shape == (1, 32, 32, 3)
    assert any("truncat" in r.getMessage().lower() for r in caplog.records)


def test_build_refuses_existing_output_and_fp8(artifact, tmp_path):
    with pytest.raises(OutputExistsError):
        diffc.build("demo", "cpu-fp32", artifact, progress=False)
    prof = tmp_path / "fp8.toml"
    prof.write_text('name = "fp8cpu"\nbackend = "onnxruntime"\n[precision]\nunet = "fp8"\n')
    with pytest.raises(BackendUnavailableError, match="fp8"):
        diffc.build("demo", prof, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ProfileError):
        diffc.build("demo", "no-such-profile", tmp_path / "y", progress=False)


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    import diffc.engines.onnxruntime as ort_engine

    calls = []

    def interrupt(onnx_path, engine_path):
        calls.append(onnx_path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-build
        return real(onnx_path, engine_path)

    real = ort_engine.build_engine
    monkeypatch.setattr(ort_engine, "build_engine", interrupt)
    with pytest.raises(KeyboardInterrupt):
        diffc.build("demo", "cpu-fp32", tmp_path / "art", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_host_engine_cache(artifact, tmp_path, monkeypatch):
    """The first load fills the per-host cache; the next one opens the layout-optimized graph from it, and
    both give the same image as a load with the cache off."""
    monkeypatch.setenv("DIFFC_CACHE_DIR", str(tmp_path / "cache"))
    first = load(artifact, progress=False)
    assert not any(s.from_cache for s in first.sessions.values())
    entries = list((tmp_path / "cache" / "onnxruntime").iterdir())
    assert len(entries) == len(first.sessions) == 4 and all((e / "complete").is_file() for e in entries)
    # every entry keeps its weights beside the graph, to be mapped rather than parsed, whether or not the
    # artifact's graph holds them inline (the demo's text encoder and VAE decoder do)
    assert {len(list(artifact.glob(f"{c}/*"))) for c in ("text_encoder", "vae_decoder")} == {1}
    for e in entries:
        weights = [t for t in onnx.load(str(e / "model.onnx"), load_external_data=False).graph.initializer
                   if t.data_location == onnx.TensorProto.EXTERNAL]
        assert weights and (e / "model.onnx.data").stat().st_size > (e / "model.onnx").stat().st_size
    second = load(artifact, progress=False)
    assert all(s.from_cache for s in second.sessions.values())
    monkeypatch.setenv("DIFFC_CACHE_DIR", "off")
    uncached = load(artifact, progress=False)
    assert not any(s.from_cache for s in uncached.sessions.values())
    images = [p("a handwritten digit four", seed=4) for p in (first, second, uncached)]
    assert np.abs(images[0] - images[1]).max() <= 1e-6 and np.abs(images[0] - images[2]).max() <= 1e-6
    # a session opened from the cache keeps the profile's arena policy (the cpu profile's one shared arena)
    for p in (first, second):
        assert all(_uses_shared_arena(o) for o in _options(p).values())


def test_host_cache_size_limit_and_damaged_entries(artifact, tmp_path, monkeypatch):
    """DIFFC_CACHE_MAX_GB bounds the host cache, and an entry that cannot be loaded is made again instead of
    failing the load (the eviction order: test_trim_cache_order)."""
    import shutil

    cache = tmp_path / "cache" / "onnxruntime"
    monkeypatch.setenv("DIFFC_CACHE_DIR", str(tmp_path / "cache"))
    load(artifact, progress=False)
    entries = {e.name: e for e in cache.iterdir()}
    assert len(entries) == 4  # text encoder, UNet, VAE decoder and encoder
    # damage the largest entry: the next load warns and makes it again
    def size(e):
        return sum(f.stat().st_size for f in e.rglob("*") if f.is_file())

    largest = max(entries.values(), key=size)
    (largest / "model.onnx.data").write_bytes(b"cut short")
    again = load(artifact, progress=False)
    assert sum(s.from_cache for s in again.sessions.values()) == 3
    assert (largest / "complete").is_file() and (largest / "model.onnx.data").stat().st_size > 1000
    # a limit that holds the largest entry but not all four: loads keep working, the cache stays under it
    # (or holds just the entry written last, when that alone is larger)
    limit = size(largest) + 1
    monkeypatch.setenv("DIFFC_CACHE_MAX_GB", str(limit / 1e9))
    for e in cache.iterdir():
        shutil.rmtree(e)
    image = load(artifact, progress=False)("a handwritten digit four", seed=4)
    left = list(cache.iterdir())
    assert 1 <= len(left) < 4 and (sum(map(size, left)) <= limit or len(left) == 1)
    monkeypatch.setenv("DIFFC_CACHE_DIR", "off")
    assert np.abs(image - load(artifact, progress=False)("a handwritten digit four", seed=4)).max() <= 1e-6


def test_trim_cache_order(tmp_path):
    import os

    from diffc._fs import trim_cache

    for i, (name, size) in enumerate((("a", 300), ("b", 200), ("c", 100), (".tmp-x", 999))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "blob").write_bytes(b"x" * size)
        (tmp_path / name / "complete").write_text("")
        os.utime(tmp_path / name / "complete", (100 + i, 100 + i))  # a used first ... c used last
    os.utime(tmp_path / "a" / "complete", (500, 500))  # a used again, most recently
    assert trim_cache(tmp_path, "complete", max_bytes=10_000) == []
    assert trim_cache(tmp_path, "complete", max_bytes=500, keep=tmp_path / "b") == [tmp_path / "c"]
    assert trim_cache(tmp_path, "complete", max_bytes=350) == [tmp_path / "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-x", "a"]  # in-progress entries are not counted


def test_verified_hashes_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    """A file whose sha256 matched is not read again while its identity (inode, size, mtime, ctime) holds;
    any write makes it read again, even one that keeps size and mtime; a file changed in the last 2 s, or
    any file with the host cache off, is read every time."""
    import hashlib
    import os
    import time

    from diffc import _fs

    reads = []
    real = _fs.sha256_file
    monkeypatch.setattr(_fs, "sha256_file", lambda p: reads.append(Path(p).name) or real(p))
    monkeypatch.setenv("DIFFC_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "weights.data"
    f.write_bytes(b"\1" * 4096)
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    assert _fs.sha256_matches(f, digest) and _fs.sha256_matches(f, digest)
    assert len(reads) == 2  # just written: not remembered yet
    now = time.time
    monkeypatch.setattr(_fs.time, "time", lambda: now() + 10)  # the file is older than 2 s from here on
    assert _fs.sha256_matches(f, digest) and _fs.sha256_matches(f, digest) and _fs.sha256_matches(f, digest)
    assert len(reads) == 3
    assert not _fs.sha256_matches(f, "0" * 64)  # another digest is never taken from the record
    assert len(reads) == 4
    st = f.stat()
    time.sleep(0.05)  # past the kernel's timestamp tick (the 2 s rule covers this outside the faked clock)
    with open(f, "r+b") as w:  # same size, and the old mtime put back: the ctime still moves
        w.write(b"\2")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not _fs.sha256_matches(f, digest) and len(reads) == 5
    f.write_bytes(b"\1" * 4096)
    # the record folder keeps the most recently used VERIFIED_MAX_RECORDS records
    monkeypatch.setattr(_fs, "VERIFIED_MAX_RECORDS", 3)
    records = tmp_path / "cache" / "verified"
    for i in range(4):
        (records / f"old{i}.json").write_text("{}")
        os.utime(records / f"old{i}.json", (100 + i, 100 + i))
    assert _fs.sha256_matches(f, digest) and len(reads) == 6
    assert len(list(records.iterdir())) == 3  # the record just written stays
    assert sorted(p.name for p in records.iterdir() if p.name.startswith("old")) == ["old2.json", "old3.json"]
    monkeypatch.setenv("DIFFC_CACHE_DIR", "off")
    assert _fs.sha256_matches(f, digest) and _fs.sha256_matches(f, digest) and len(reads) == 8


def test_static_cfg_batch_keeps_uncond_at_guidance_one(copy):
    """An engine built with a static CFG batch (TensorRT static shapes) still gets batch 2 at guidance <= 1."""
    plain = load(copy, progress=False)
    _edit(copy, lambda m: m["components"]["unet"]["shape_ranges"].update(batch=[2, 2, 2]))
    static = load(copy, progress=False)
    seen = []
    real = static.sessions["unet"].run
    static.sessions["unet"].run = lambda feeds, *a: seen.append(feeds["sample"].shape[0]) or real(feeds, *a)
    a = static("a handwritten digit eight", seed=2, guidance=1.0)
    b = plain("a handwritten digit eight", seed=2, guidance=1.0)
    assert set(seen) == {2}
    assert np.abs(a - b).max() <= 1e-5


def test_profile_onnxruntime_table_reaches_the_sessions(artifact, copy):
    """Threads and the memory-arena policy come from the profile's [onnxruntime] table; load() overrides it."""
    plain = load(artifact, progress=False)  # the cpu profile: one shared arena
    for name, o in _options(plain).items():
        # a session that keeps an arena allocates per buffer from it: no memory pattern, which would grow the arena
        assert o.enable_cpu_mem_arena and _uses_shared_arena(o) and not o.enable_mem_pattern, name

    _edit(copy, lambda m: m["profile"].update(onnxruntime={"intra_op_num_threads": 1, "memory_arena": "denoiser"}))
    denoiser = load(copy, progress=False)
    opts = _options(denoiser)
    assert all(o.intra_op_num_threads == 1 for o in opts.values())
    assert opts["unet"].enable_cpu_mem_arena and not opts["unet"].enable_mem_pattern
    for name in ("text_encoder", "vae_decoder"):
        assert not opts[name].enable_cpu_mem_arena and opts[name].enable_mem_pattern, name
    assert not any(_uses_shared_arena(o) for o in opts.values())
    a = denoiser("a handwritten digit four", seed=5)
    b = plain("a handwritten digit four", seed=5)
    assert np.abs(a - b).max() <= 1e-5

    overridden = load(copy, progress=False, threads=2, memory_arena="shared")
    opts = _options(overridden)
    assert opts["unet"].intra_op_num_threads == 2 and _uses_shared_arena(opts["vae_decoder"])
    with pytest.raises(InputError, match="memory arena policy 'everything' asked for.*denoiser"):
        load(copy, progress=False, memory_arena="everything")
    _edit(copy, lambda m: m["profile"].update(onnxruntime={"memory_arena": "pooled"}))
    with pytest.raises(InputError, match="'pooled' in the manifest's profile.*--memory-arena"):
        load(copy, progress=False)


def test_cli_run_memory_arena_option(artifact, tmp_path):
    from click.testing import CliRunner

    from diffc.cli import main

    out = tmp_path / "x.png"
    args = ["-q", "run", str(artifact), "--prompt", "a digit", "--out", str(out), "--memory-arena"]
    assert CliRunner().invoke(main, [*args, "shared"]).exit_code == 0 and out.is_file()
    r = CliRunner().invoke(main, [*args, "all"])
    assert r.exit_code != 0 and "'all' is not one of 'denoiser', 'shared'" in r.output
