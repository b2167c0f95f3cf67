"""The cpu-cache artifact: layout (one weights file for both UNet graphs), manifest, and the loop's behaviour
(interval 1 equals an artifact without caching, the cache never leaks between images, the schedule is followed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
jsonschema = pytest.importorskip("jsonschema")

import diffc  # noqa: E402
from diffc.build.plan import plan  # noqa: E402
from diffc.errors import InputError, ProfileError  # noqa: E402
from diffc.runtime import load, read_manifest  # noqa: E402

SCHEMA = Path(diffc.__file__).parent / "runtime" / "manifest.schema.json"
PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def artifacts(demo_cpu_artifact, demo_cpu_cache_artifact):
    return {"cpu": demo_cpu_artifact, "cpu-cache": demo_cpu_cache_artifact}  # shared by the run: read only


def test_layout_manifest_and_shared_weights(artifacts):
    art = artifacts["cpu-cache"]
    m = read_manifest(art)
    jsonschema.validate(m, json.loads(SCHEMA.read_text()))
    c = m["cache"]
    assert (c["branch"], c["feature"], c["full_steps"]) == (0, "cache_feature_0", [True, False, True, False])
    assert c["nodes"]["shallow"] < c["nodes"]["full"]
    full, shallow = m["components"]["unet"], m["components"]["unet_shallow"]
    assert (full["file"], shallow["file"]) == ("unet/model.onnx", "unet/shallow.onnx")
    assert "unet/weights.data" in full["files"] and "unet/weights.data" in shallow["files"]
    assert [o["name"] for o in full["outputs"]] == ["out_sample", "cache_feature_0"]
    assert [i["name"] for i in shallow["inputs"]][-1] == "cache_feature_0"
    assert sorted(p.name for p in (art / "unet").iterdir()) == ["model.onnx", "shallow.onnx", "weights.data"]
    # every large tensor of both graphs lives in the one data file; the shallow graph's are a subset
    spans = {}
    for name in ("model.onnx", "shallow.onnx"):
        g = onnx.load(str(art / "unet" / name), load_external_data=False)
        ext = [t for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert ext and {e.value for t in ext for e in t.external_data if e.key == "location"} == {"weights.data"}
        spans[name] = {tuple(e.value for e in t.external_data if e.key in ("offset", "length")) for t in ext}
    assert spans["shallow.onnx"] <= spans["model.onnx"]
    size = (art / "unet" / "weights.data").stat().st_size
    assert size < 1.05 * sum(int(length) for _, length in spans["model.onnx"]) + 4096 * len(spans["model.onnx"])


def test_interval_one_is_no_cache(artifacts):
    plain = load(artifacts["cpu"], progress=False)
    cached = load(artifacts["cpu-cache"], progress=False)
    cached.set_cache_schedule({"kind": "interval", "interval": 1})
    a, b = plain(PROMPT, seed=3), cached(PROMPT, seed=3)
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)


def test_schedule_is_followed_and_cache_does_not_leak(artifacts, monkeypatch):
    pipe = load(artifacts["cpu-cache"], progress=False)
    calls = []
    for name in ("unet", "unet_shallow"):
        sess = pipe.sessions[name]
        run = sess.run

        def spy(feeds, outputs=None, _run=run, _name=name):
            calls.append((_name, feeds["sample"].shape[0]))
            return _run(feeds, outputs)

        monkeypatch.setattr(sess, "run", spy)
    first = pipe(PROMPT, seed=0)
    # full, shallow, full, shallow; the feature covers the whole CFG batch (uncond + cond)
    assert calls == [("unet", 2), ("unet_shallow", 2), ("unet", 2), ("unet_shallow", 2)]
    other = pipe("a handwritten digit two", seed=1)
    assert calls[4][0] == "unet"  # a new image starts from a full step, never from the last image's feature
    again = pipe(PROMPT, seed=0)
    np.testing.assert_array_equal(again, first)
    assert not np.allclose(other, first)
    fresh = load(artifacts["cpu-cache"], progress=False)
    np.testing.assert_array_equal(fresh(PROMPT, seed=0), first)


def test_schedule_overrides(artifacts):
    pipe = load(artifacts["cpu-cache"], progress=False)
    pipe.set_cache_schedule({"kind": "mask", "mask": [1, 1, 0, 0]})
    assert pipe.full_steps() == [True, True, False, False]
    with pytest.raises(InputError, match="4 steps"):
        pipe.set_cache_schedule({"kind": "mask", "mask": [1, 0]})
    with pytest.raises(InputError, match="without cache reuse"):
        load(artifacts["cpu"], progress=False).set_cache_schedule({"kind": "interval", "interval": 2})


def test_branch_out_of_range_is_refused_before_export(tmp_path):
    prof = tmp_path / "deep.toml"
    prof.write_text('name = "deep"\n[cache]\nenabled = true\nbranch = 3\n')
    with pytest.raises(ProfileError, match="branches 0 to 2"):
        plan("demo", prof)


def test_cli_run_with_cache_interval(artifacts, tmp_path):
    from click.testing import CliRunner

    from diffc.cli import main

    res = CliRunner().invoke(main, ["--quiet", "run", str(artifacts["cpu-cache"]), "--prompt", PROMPT,
                                    "--cache-interval", "3", "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "x.png").is_file()
