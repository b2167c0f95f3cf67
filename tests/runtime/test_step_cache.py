"""Dynamic step caching end to end: the build's head / tail cut of the tiny UNet and of the tiny SD3 transformer,
and the run-time rule (docs/manifest.md, "Dynamic step caching") held to a plain-numpy replay.

One tiny SD artifact is built for the module, with ``[savings.step_cache]``; every call runs on it. The transformer
is exported alone (no build) and cut here, against PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffc.build import build  # noqa: E402
from diffc.errors import InputError, ProfileError  # noqa: E402
from diffc.exporter.sampler import compile_sampler  # noqa: E402
from diffc.exporter.tiny import write_tiny_pipeline  # noqa: E402
from diffc.profiles import load_profile  # noqa: E402
from diffc.runtime import load  # noqa: E402
from diffc.runtime.step_cache import rel_l1, replay  # noqa: E402

PROFILES = Path(__file__).resolve().parents[2] / "diffc" / "profiles"
PROMPT = "a handwritten digit seven"


def _profile(root: Path, base: str = "cpu-fp32", extra: str = "[savings.step_cache]\nthreshold = 0.1\n") -> Path:
    text = (PROFILES / f"{base}.toml").read_text().replace(f'name = "{base}"', 'name = "step-cache-test"')
    path = root / f"{base}-step-cache.toml"
    path.write_text(text + "\n" + extra)
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("step-cache")
    folder = write_tiny_pipeline(root / "pipe", "sd", seed=0)
    return build(folder, _profile(root), root / "artifact", steps=4, sampler="ddim", progress=False)


@pytest.fixture(scope="module")
def pipe(artifact):
    p = load(artifact, progress=False)
    p.tables = compile_sampler("ddim", p.manifest["build"]["scheduler_config"], 10)
    return p


def test_manifest_and_shared_weights(artifact):
    import json

    m = json.loads((artifact / "manifest.json").read_text())
    entry = m["savings"]["step_cache"]
    assert entry["head_component"] == "unet_head" and entry["tail_component"] == "unet_tail"
    assert entry["metric"] == "rel_l1" and entry["threshold"] == 0.1 and entry["decision"] == "step_cache_decision"
    # the tail takes conv_in's output, the first block's skip features and its output (the decision tensor)
    assert entry["cut"][0] == "step_cache_decision" and len(entry["cut"]) >= 3
    assert 0 < entry["head_fraction"] < 0.5
    files = {c: m["components"][c]["files"] for c in ("unet", "unet_head", "unet_tail")}
    assert {f for fs in files.values() for f in fs if f.endswith(".data")} == {"unet/weights.data"}
    report = json.loads((artifact / "build_report.json").read_text())
    assert report["components"]["unet"]["step_cache_split"]["tail_check"]["passed"]


def test_head_and_tail_give_the_whole_unet(pipe):
    """At a size and batch the build's check did not use: head + tail == the whole UNet."""
    rng = np.random.default_rng(5)
    feeds = {"sample": rng.standard_normal((2, 4, 20, 24)).astype(np.float32),
             "timestep": np.array([900.0, 20.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}
    cut = pipe.savings.step_cache["cut"]
    whole = pipe.sessions["unet"].run(feeds, ["out_sample"])["out_sample"]
    marks = pipe.sessions["unet_head"].run(feeds, cut)
    got = pipe.sessions["unet_tail"].run({**feeds, **marks}, ["out_sample"])["out_sample"]
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-5)


def test_threshold_zero_reproduces_no_savings_exactly(pipe):
    pipe.set_savings(step_cache="off")
    reference = pipe(PROMPT, seed=1)
    assert pipe.last_trace.counts()["full"] == 10
    pipe.set_savings(step_cache_threshold=0)
    again = pipe(PROMPT, seed=1)
    assert np.array_equal(again, reference)
    assert pipe.last_trace.counts()["head"] == 0 and pipe.last_trace.steps[1].metrics["rel_l1"] > 0
    pipe.set_savings()


class _Recording:
    """A session that keeps every decision tensor the head returns (what the replay recomputes the rule from)."""

    def __init__(self, session, name):
        self.session, self.name, self.seen = session, name, []

    def run(self, feeds, outputs=None):
        out = self.session.run(feeds, outputs)
        self.seen.append(out[self.name].copy())
        return out


@pytest.mark.parametrize("threshold", [0.15, 0.6])
def test_numpy_replay_gives_the_runtimes_decisions(pipe, threshold):
    head = pipe.sessions["unet_head"]
    recording = _Recording(head, pipe.savings.step_cache["decision"])
    pipe.sessions["unet_head"] = recording
    try:
        pipe.set_savings(step_cache_threshold=threshold)
        pipe(PROMPT, seed=2)
    finally:
        pipe.sessions["unet_head"] = head
        pipe.set_savings()
    d = recording.seen
    changes = [None] + [rel_l1(d[k], d[k - 1]) for k in range(1, len(d))]
    trace = pipe.last_trace.steps
    assert [r.evaluation == "full" for r in trace] == replay(changes, threshold)
    # the accumulated change the runtime compared is the replay's too
    acc, expected = 0.0, []
    for k, r in enumerate(changes):
        acc = 0.0 if r is None else acc + r
        expected.append(acc)
        if trace[k].evaluation == "full":
            acc = 0.0
    np.testing.assert_allclose([r.metrics.get("rel_l1", 0.0) for r in trace], expected, rtol=1e-12)


def test_high_threshold_skips_steps_and_counts_them(pipe):
    pipe.set_savings(step_cache="off")
    reference = pipe(PROMPT, seed=3)
    pipe.set_savings(step_cache_threshold=5.0)
    cached = pipe(PROMPT, seed=3)
    trace = pipe.last_trace
    pipe.set_savings()
    # first and last step always run the tail; nothing in between moves 5x its own size
    assert [r.evaluation for r in trace.steps] == ["full"] + ["head"] * 8 + ["full"]
    assert trace.counts()["head"] == 8 and trace.counts()["batch_rows"] == 20  # CFG: 2 rows a step
    assert np.isfinite(cached).all() and not np.array_equal(cached, reference)


def test_extrapolation_order_is_applied_and_recorded(pipe):
    pipe.set_savings(step_cache_threshold=0.3, extrapolation_order=1)
    pipe(PROMPT, seed=4)
    steps = pipe.last_trace.steps
    pipe.set_savings()
    heads = [r for r in steps if r.evaluation == "head"]
    assert heads, "threshold 0.3 should skip some of 10 steps on the tiny UNet"
    fulls_before = [sum(s.evaluation == "full" for s in steps[:r.step]) for r in heads]
    assert [r.extrapolation_order for r in heads] == [min(1, n - 1) for n in fulls_before]


def test_bad_overrides_are_input_errors(pipe):
    with pytest.raises(InputError, match="step_cache_threshold must be a number"):
        pipe.set_savings(step_cache_threshold=-1)
    with pytest.raises(InputError, match="takes 'off'"):
        pipe.set_savings(step_cache="on")
    with pytest.raises(InputError, match="not both"):
        pipe.set_savings(step_cache="off", step_cache_threshold=0.2)


def test_profile_refusals(tmp_path):
    with pytest.raises(ProfileError, match="TeaCache"):
        load_profile(_profile(tmp_path, extra='[savings.step_cache]\nthreshold = 0.1\nmetric = "teacache"\n'))
    with pytest.raises(ProfileError, match="threshold.* is required"):
        load_profile(_profile(tmp_path, extra='[savings.step_cache]\nmetric = "rel_l1"\n'))
    from diffc.build import plan

    for base, why in (("cpu-cache", "does not combine with \\[cache\\]"), ("cpu-int8", "int8"),
                      ("cpu-openvino", "onnxruntime only")):
        with pytest.raises(ProfileError, match=why):
            plan.check_profile(load_profile(_profile(tmp_path, base)))


def test_transformer_split_matches_pytorch(tmp_path):
    """The tiny SD3 transformer, exported with its marks and cut: head + tail == PyTorch at two shapes."""
    import onnx_ir as ir
    import onnxruntime as ort

    from diffc.exporter.contracts import get_contract
    from diffc.exporter.export import export_component, sample_shapes
    from diffc.exporter.tiny_dit import build_tiny_dit_pipeline
    from diffc.passes.step_cache import split

    dit = build_tiny_dit_pipeline("sd3", seed=0)
    module = dit.transformer.eval()
    contract = get_contract("transformer", module, step_marks=True)
    shapes = sample_shapes(dit, "transformer")
    sample = contract.make_inputs(module, shapes[0], torch.Generator().manual_seed(0))
    marked = export_component(module, contract, tmp_path / "marked" / "model.onnx", opset=21,
                              exporter="torchscript", sample=sample)
    _, head, tail, rep = split(ir.load(str(marked)))
    assert rep["tail_inputs"] == ["step_cache_0", "step_cache_1"]  # SD3's joint block: text and image streams
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sessions = []
    for name, model in (("head", head), ("tail", tail)):
        ir.save(model, str(tmp_path / f"{name}.onnx"), external_data=f"{name}.onnx.data")
        sessions.append(ort.InferenceSession(str(tmp_path / f"{name}.onnx"), opts,
                                             providers=["CPUExecutionProvider"]))
    wrapped = contract.wrap(module).eval()
    for shape in shapes:
        inputs = contract.make_inputs(module, shape, torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = wrapped(*inputs)
        feeds = {n: t.numpy() for n, t in zip(contract.input_names, inputs)}
        marks = dict(zip(rep["head_outputs"], sessions[0].run(rep["head_outputs"], feeds)))
        got = sessions[1].run(["out_sample"], {**feeds, **{k: marks[k] for k in rep["tail_inputs"]}})[0]
        np.testing.assert_allclose(got, expected[0].numpy(), rtol=0, atol=contract.atol)
        # the decision tensor is the first block's residual on the image stream
        np.testing.assert_allclose(marks["step_cache_decision"], expected[1].numpy(), rtol=0, atol=1e-4)


def test_with_adaptive_guidance_the_cache_keeps_the_cond_half(pipe):
    pipe.set_savings(step_cache_threshold=0.3, guidance_from_step=5)
    image = pipe(PROMPT, seed=5)
    steps = pipe.last_trace.steps
    pipe.set_savings()
    assert np.isfinite(image).all()
    assert [r.rows for r in steps] == [2] * 5 + [1] * 5 and steps[-1].evaluation == "full"


@pytest.mark.parametrize("damage, message", [
    ({"tail_component": "unet_rest"}, "not among the components"),
    ({"metric": "teacache"}, "metric"),
    ({"threshold": -0.5}, "threshold"),
])
def test_manifest_refuses_a_damaged_entry(artifact, tmp_path, damage, message):
    import json
    import shutil

    from diffc.errors import ManifestError
    from diffc.runtime.manifest import read_manifest

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["savings"]["step_cache"].update(damage)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=message):
        read_manifest(copy)
