"""manifest.json as untrusted input: every damage the issue lists is a typed error, and any random mutation of a
valid manifest is either read (and then usable by everything the runtime and ``diffc inspect`` read from it) or
refused with a DiffcError -- never another exception.

The parser tests need no engines: they use manifests the builder wrote (``data/``: ``diffc build demo`` with the
profiles cpu and cpu-cache), and :func:`test_checked_in_manifests_match_the_builder` keeps them honest against
a fresh build.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffc.cli import main
from diffc.errors import DiffcError, IntegrityError, ManifestError
from diffc.runtime.cache import full_steps
from diffc.runtime.manifest import read_manifest, verify_files
from diffc.runtime.pipeline import opt_shapes, unet_for_timestep
from diffc.runtime.sampler import SamplerTables

DATA = Path(__file__).parent / "data"
BASES = {name: json.loads((DATA / f"manifest_demo_{name}.json").read_text()) for name in ("cpu", "cpu_cache")}
#: bounded and derandomized: the same examples on every run, no timing-dependent failures
FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _write(folder: Path, manifest=None, *, text: str | None = None, raw: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.json"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(text if text is not None else json.dumps(manifest))
    return folder


def _edited(fn, base: str = "cpu") -> dict:
    m = copy.deepcopy(BASES[base])
    fn(m)
    return m


def _key_paths(value, prefix=()) -> set[tuple]:
    """The structure of a manifest: every dict key path (list items collapsed), without the values."""
    out = {prefix}
    if isinstance(value, dict):
        for k, v in value.items():
            out |= _key_paths(v, prefix + (k,))
    elif isinstance(value, list):
        for v in value:
            out |= _key_paths(v, prefix + ("[]",))
    return out


def test_checked_in_manifests_are_valid(tmp_path):
    for name, m in BASES.items():
        assert read_manifest(_write(tmp_path / name, m)) == m


def test_checked_in_manifests_match_the_builder(demo_cpu_artifact):
    """The parser tests run on data/manifest_demo_cpu.json: it must still look like what the builder writes."""
    built = read_manifest(demo_cpu_artifact)
    # lora_targets: one entry per Linear / Conv module of the model (docs/lora.md), tested in test_lora_inputs.py
    volatile = {("created",), ("build", "versions"), ("lora_targets",)}
    strip = lambda paths: {p for p in paths if not any(p[:len(v)] == v for v in volatile)}  # noqa: E731
    assert strip(_key_paths(built)) == strip(_key_paths(BASES["cpu"]))


@pytest.mark.parametrize("damage, message", [
    (lambda m: m["image"].update(height="x"), r"image\.height: 'x' is not of type 'array'"),
    (lambda m: m["image"].update(height=[64, 32, 16]), r"image\.height must be \[min, opt, max\]"),
    (lambda m: m["latent"].update(vae_scale_factor=0), r"latent\.vae_scale_factor: 0 is less than the minimum"),
    (lambda m: m.update(text_encoders={}), r"text_encoders: \{\} is not of type 'array'"),
    (lambda m: m.update(text_encoders=[]), r"text_encoders: \[\] should be non-empty"),
    (lambda m: m.update(profile="x"), r"profile: 'x' is not of type 'object'"),
    (lambda m: m["components"]["unet"]["files"].update({"unet/model.onnx": None}), r"not of type 'string'"),
    (lambda m: m["components"]["unet"]["files"].update({"unet/model.onnx": "ab" * 31}), r"not a sha256 digest"),
    (lambda m: m["text_encoders"][0].update(tokenizer_sha256=None), r"tokenizer_sha256: None"),
    (lambda m: m["components"]["unet"].update(file="unet/model\0.onnx"), r"not a relative path .*NUL"),
    (lambda m: m["components"]["unet"]["files"].update({"unet/\0": "0" * 64}), r"not a relative path .*NUL"),
    (lambda m: m["components"]["unet"].update(file="unet/other.onnx"), r"not among its hashed files"),
    (lambda m: m["guidance"].update(mode="weird"), r"guidance\.mode: 'weird' is not one of"),
    (lambda m: m["guidance"].update(default_scale=-1), r"guidance\.default_scale: -1 is less than the minimum"),
    (lambda m: m["sampler"].update(kind=["ddim"]), r"sampler\.kind"),
    (lambda m: m["sampler"].update(c_in=[1.0]), r"'c_in' has length 1"),
    (lambda m: m["text_encoders"][0].update(component="text_encoder_2"), r"not among the components"),
    (lambda m: m["profile"].update(onnxruntime={"intra_op_num_threads": 100000}), r"intra_op_num_threads"),
    (lambda m: m["components"]["unet"].update(shape_ranges={"batch": [4, 1, 2]}), r"shape_ranges\.batch must be"),
    (lambda m: m.update(components=[]), r"components: \[\] is not of type 'object'"),
    (lambda m: m.update(schema_version=True), r"no valid schema_version"),
])
def test_wrong_values_are_manifest_errors(tmp_path, damage, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(_write(tmp_path, _edited(damage)))


def test_cache_and_step_variant_cross_references(tmp_path):
    with pytest.raises(ManifestError, match=r"cache\.shallow_component 'nope'"):
        read_manifest(_write(tmp_path, _edited(lambda m: m["cache"].update(shallow_component="nope"), "cpu_cache")))
    with pytest.raises(ManifestError, match=r"cache\.full_steps has 3 entries for 4"):
        read_manifest(_write(tmp_path, _edited(lambda m: m["cache"].update(full_steps=[True] * 3), "cpu_cache")))
    variants = {"components": ["unet", "unet_g1"], "timestep_bounds": [500.0], "steps": [0, 0, 1, 1]}
    with pytest.raises(ManifestError, match="step_variants"):  # unet_g1 is not a component
        read_manifest(_write(tmp_path, _edited(lambda m: m.update(step_variants=variants))))


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"schema_version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    (json.dumps(BASES["cpu"]).replace('"default_scale": 7.5', '"default_scale": NaN'), "NaN is not a JSON number"),
    (json.dumps(BASES["cpu"]).replace('"default_scale": 7.5', '"default_scale": Infinity'), "Infinity is not"),
    (json.dumps(BASES["cpu"]).replace('"scaling_factor": 1.0', '"scaling_factor": 1e999'), "not finite"),
    ("", "corrupt"),
])
def test_unparseable_manifests(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(_write(tmp_path, text=text))


def test_not_utf8_and_oversized(tmp_path):
    with pytest.raises(ManifestError, match="corrupt"):
        read_manifest(_write(tmp_path, raw=b'{"schema_version": 1, "diffc_version": "\xff\xfe"}'))
    with pytest.raises(ManifestError, match="far more than a diffc manifest"):
        read_manifest(_write(tmp_path, raw=b" " * (17 * 2**20)))


def test_traversal_stays_an_integrity_error(tmp_path):
    """Tampering is named as such even when the schema would also refuse the value."""
    with pytest.raises(IntegrityError, match="leaves the artifact"):
        read_manifest(_write(tmp_path, _edited(lambda m: m["text_encoders"][0].update(tokenizer="../t.json"))))


@pytest.mark.parametrize("damage", [
    lambda m: m["image"].update(height="x"),
    lambda m: m.update(profile="x"),
    lambda m: m["guidance"].update(mode="weird"),
    lambda m: m["latent"].update(vae_scale_factor=0),
])
def test_inspect_gives_the_same_typed_errors(tmp_path, damage):
    r = CliRunner().invoke(main, ["inspect", str(_write(tmp_path, _edited(damage)))])
    assert r.exit_code == 2 and r.output.startswith("error (manifest_error): "), r.output
    assert "Traceback" not in r.output


# ------------------------------------------------------------------------------------------ property-based

_LEAVES = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
           | st.sampled_from(["", "../x", "/etc/passwd", "a\0b", "0" * 64, "unet", "cfg", "embedded"]))
_VALUES = st.recursive(_LEAVES, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                       max_leaves=6)


def _slots(value, out=None) -> list[tuple]:
    """(container, key) for every value inside a manifest, the root's children included."""
    out = [] if out is None else out
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out.append((value, k))
        _slots(v, out)
    return out


@st.composite
def mutated_manifests(draw):
    m = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(m)
        parent, key = draw(st.sampled_from(slots))
        op = draw(st.sampled_from(["delete", "replace", "retype", "add"]))
        old = parent[key]
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(_VALUES)
        elif op == "retype":
            parent[key] = draw(st.sampled_from([str(old), [old], {"v": old}, None, True, 0, -1, 1e308, ""]))
        elif isinstance(old, dict):
            old[draw(st.text(max_size=8))] = draw(_VALUES)
        elif isinstance(old, list):
            old.append(draw(_VALUES))
        else:
            parent[key] = draw(_VALUES)
    return m


def _use_like_the_runtime(m: dict) -> None:
    """Everything Pipeline and ``diffc inspect`` read from a manifest, short of opening engines."""
    tables = SamplerTables.from_dict(m["sampler"])
    for t in tables.timesteps:
        assert unet_for_timestep(m.get("step_variants"), t) in m["components"]
    for comp in m["components"].values():
        opt_shapes(comp, {"height": 8, "width": 8})
    if m.get("cache"):
        full_steps(m["cache"]["schedule"], tables.num_steps)
    lo, opt, hi = m["image"]["batch"]
    assert 1 <= lo <= opt <= hi
    for enc in m["text_encoders"]:
        assert enc["component"] in m["components"]


@FAST
@given(manifest=mutated_manifests())
def test_any_mutation_is_read_or_refused_with_a_typed_error(tmp_path_factory, manifest):
    folder = _write(tmp_path_factory.mktemp("m", numbered=True), text=json.dumps(manifest))
    try:
        m = read_manifest(folder)
    except DiffcError as e:
        event(f"refused: {type(e).__name__}")
        return
    event("read")
    try:
        _use_like_the_runtime(m)
        verify_files(folder, m, hashes=False)  # the engine files are absent here: IntegrityError
    except DiffcError:
        pass
    r = CliRunner().invoke(main, ["inspect", str(folder)])
    assert r.exit_code == 0, r.output


@settings(FAST, max_examples=60)
@given(data=st.binary(max_size=64), cut=st.integers(0, 9040))
def test_any_truncated_or_spliced_bytes_are_refused(tmp_path_factory, data, cut):
    raw = (DATA / "manifest_demo_cpu.json").read_bytes()
    folder = _write(tmp_path_factory.mktemp("b", numbered=True), raw=raw[:cut] + data)
    try:
        read_manifest(folder)
    except DiffcError:
        pass


# ------------------------------------------------------------------------------------------ end to end

#: the parts of a manifest the loop reads at run time (everything else is provenance)
_RUNTIME_KEYS = ("latent", "image", "guidance", "sampler", "text_encoders", "components", "added_conditions")


@st.composite
def runtime_mutations(draw):
    """Replace one or two values the runtime reads with another value of the same JSON type or a small integer:
    what the schema lets through, so the engines themselves meet it."""
    m = copy.deepcopy(BASES["cpu"])
    for _ in range(draw(st.integers(1, 2))):
        slots = [(p, k) for p, k in _slots({k: m[k] for k in _RUNTIME_KEYS}) if not isinstance(p[k], (dict, list))]
        parent, key = draw(st.sampled_from(slots))
        old = parent[key]
        if isinstance(old, bool):
            parent[key] = not old
        elif isinstance(old, (int, float)):
            parent[key] = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 16, 77, 1000, 0.5, -1, type(old)(old) * 2]))
        elif isinstance(old, str):
            parent[key] = draw(st.sampled_from(["sample", "timestep", "unet", "text_encoder", "cfg", "none",
                                                "embedded", "int64", "float16", "batch", "last_hidden_state",
                                                "penultimate_hidden_state", "pooled_output", old + "x"]))
    return m


@pytest.fixture(scope="module")
def artifact_copy(demo_cpu_artifact, tmp_path_factory):
    import shutil

    dst = tmp_path_factory.mktemp("e2e") / "demo.diffc"
    shutil.copytree(demo_cpu_artifact, dst)
    return dst


@settings(FAST, max_examples=int(os.environ.get("DIFFC_E2E_EXAMPLES", 10)))
@given(manifest=runtime_mutations())
def test_any_runtime_value_mutation_runs_or_is_a_typed_error(artifact_copy, manifest):
    """With the real engines: a manifest the parser accepts either generates an image or fails with a DiffcError."""
    from diffc.runtime import load

    (artifact_copy / "manifest.json").write_text(json.dumps(manifest))
    try:
        images = load(artifact_copy, progress=False)("a handwritten digit", seed=1)
    except DiffcError as e:
        event(f"refused: {type(e).__name__}")
        return
    event("ran")
    assert np.isfinite(images).all()
