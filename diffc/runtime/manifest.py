"""Reading and checking an artifact's ``manifest.json`` (numpy-free, torch-free).

Every check here protects the runtime from a bad artifact before any engine is opened: unreadable or
incomplete JSON, a manifest from a newer diffc, a value of the wrong type or out of range (the JSON schema
``manifest.schema.json`` next to this file, checked with jsonschema *before* anything reads a field), names
that do not agree with each other (a component, a table length), a file path that escapes the artifact
folder, a missing file, a file whose sha256 differs from the one recorded at build time.

So whatever bytes ``manifest.json`` holds, :func:`read_manifest` returns a manifest the runtime can use or
raises a :class:`~diffc.errors.ManifestError` / :class:`~diffc.errors.IntegrityError` (tests/reliability
mutates manifests at random to hold it to that).
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from diffc._fs import sha256_matches
from diffc.errors import IntegrityError, ManifestError

MANIFEST_NAME = "manifest.json"
#: 2 adds the optional ``denoiser`` section and the transformer families' text-encoder fields (docs/manifest.md);
#: a schema-1 manifest (a UNet artifact) reads the same as before
SCHEMA_VERSION = 3
#: 3 adds the ``inpaint`` entry of a 9-channel inpainting UNet. A build writes the oldest version that holds what
#: the artifact uses (:func:`written_schema_version`): every other artifact stays schema 2, which older runtimes
#: read, while a schema-2 runtime refuses an inpainting artifact as "made by a newer diffc" instead of feeding
#: its UNet 4-channel latents
INPAINT_SCHEMA_VERSION = 3
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
REQUIRED_KEYS = ("schema_version", "diffc_version", "source", "profile", "components", "text_encoders", "latent",
                 "image", "guidance", "sampler")
REQUIRED_COMPONENTS = ("text_encoder", "vae_decoder")
#: a manifest is a few kB (sampler tables of up to 1000 steps: ~200 kB); anything far larger is not one, and is
#: refused before it is parsed into memory
MAX_MANIFEST_BYTES = 16 * 2**20
_REBUILD = "rebuild it with `diffc build`"


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _refuse_constant(name: str) -> None:
    # json.loads takes NaN / Infinity by default; they are not JSON, and a NaN table entry would poison every image
    raise ValueError(f"{name} is not a JSON number")


def _where(path) -> str:
    """``image.height[0]`` for a jsonschema error path ``deque(['image', 'height', 0])``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the top level"


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _explain(error: jsonschema.ValidationError) -> str:
    """jsonschema's message, except for patterns, whose regex says nothing to a person."""
    defs = _validator().schema["$defs"]
    if error.validator == "pattern" and error.schema == defs["relpath"]:
        return f"{_short(repr(error.instance))} is not a relative path inside the artifact (no NUL byte, no '..')"
    if error.validator == "pattern" and error.schema == defs["sha256"]:
        return f"{_short(repr(error.instance))} is not a sha256 digest (64 lowercase hex digits)"
    return _short(error.message)


def _check_path_text(rel: Any) -> None:
    """Tampering first: a path that leaves the artifact is an IntegrityError whatever else is wrong."""
    if isinstance(rel, str) and rel:
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or (os.name == "nt" and Path(rel).is_absolute()):
            raise IntegrityError(f"manifest path {rel!r} leaves the artifact folder; refusing to read it. The manifest "
                                 f"was edited or is malicious: {_REBUILD}")


def artifact_path(root: Path, rel: Any) -> Path:
    """Resolve a manifest path inside the artifact; refuse anything that leaves it."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise ManifestError(f"manifest names a file as {_short(repr(rel))}, which is not a relative path; {_REBUILD}")
    _check_path_text(rel)
    if Path(rel).is_absolute():
        raise IntegrityError(f"manifest path {rel!r} leaves the artifact folder; refusing to read it. The manifest "
                             f"was edited or is malicious: {_REBUILD}")
    root = root.resolve()
    full = (root / PurePosixPath(rel)).resolve()
    if os.path.commonpath([root, full]) != str(root):
        raise IntegrityError(f"manifest path {rel!r} resolves outside the artifact folder (through a link); "
                             f"refusing to read it: {_REBUILD}")
    return full


def _named_paths(manifest: dict[str, Any]) -> list[Any]:
    """Every file path the manifest names, read defensively (the schema has not run yet)."""
    paths: list[Any] = []
    comps = manifest.get("components")
    for comp in comps.values() if isinstance(comps, dict) else ():
        if isinstance(comp, dict):
            paths.append(comp.get("file"))
            if isinstance(comp.get("files"), dict):
                paths.extend(comp["files"])
    encs = manifest.get("text_encoders")
    for enc in encs if isinstance(encs, list) else ():
        if isinstance(enc, dict):
            paths.append(enc.get("tokenizer"))
    return paths


def _check_range(where: str, value: list[int]) -> None:
    lo, opt, hi = value
    if not lo <= opt <= hi:
        raise ManifestError(f"{where} must be [min, opt, max] with min <= opt <= max, got {value}")


def _first_non_finite(value: Any) -> str | None:
    """Where a float that is not finite sits (JSON has no NaN / Infinity, but ``1e999`` parses to inf)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return where or "the top level"
        if isinstance(v, dict):
            stack.extend((f"{where}.{k}" if where else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))
    return None


def _io(comp: dict[str, Any], kind: str) -> dict[str, list]:
    return {t["name"]: t["shape"] for t in comp[kind]}


def _dim(shape: list, axis: int) -> int | None:
    """A static dimension of a recorded shape (None: symbolic, or the shape is too short to have it)."""
    return shape[axis] if len(shape) > axis and isinstance(shape[axis], int) else None


def written_schema_version(manifest: dict[str, Any]) -> int:
    """The schema version a build writes ``manifest`` with: the oldest one that has every field it holds."""
    # a ControlNet artifact's UNet takes residual inputs a schema-2 runtime would not feed: schema 3 too
    return INPAINT_SCHEMA_VERSION if manifest.get("inpaint") or manifest.get("controlnets") else 2


def _check_engine_io(m: dict[str, Any]) -> None:
    """The tensors the loop feeds and reads must be the ones the engines' records name, with agreeing static
    sizes: a manifest edited to disagree would otherwise fail inside the backend with its own exception."""
    comps = m["components"]
    denoiser = m.get("denoiser")
    if denoiser is not None:
        return _check_transformer_io(m, denoiser)
    unets = [n for n in comps if n == "unet" or n in (m.get("step_variants") or {}).get("components", ())]
    if m.get("cache"):
        unets.append(m["cache"]["shallow_component"])
    needed = {"vae_decoder": ({"latent_sample"}, {"sample"})}
    unet_inputs = {"sample", "timestep", "encoder_hidden_states"}
    if "text_embeds" in (m.get("added_conditions") or {}):
        unet_inputs |= {"text_embeds", "time_ids"}
    if m["guidance"]["mode"] == "embedded":
        unet_inputs.add(m["guidance"]["input"])
    for name in unets:
        needed[name] = (unet_inputs, {"out_sample"})
    for enc in m["text_encoders"]:
        if enc["hidden_state"] is None:
            raise ManifestError(f"text encoder {enc['component']!r} has no hidden_state, which a UNet artifact needs")
        needed[enc["component"]] = ({"input_ids"}, {enc["hidden_state"], "pooled_output"})
    for name, (inputs, outputs) in needed.items():
        have_in, have_out = set(_io(comps[name], "inputs")), set(_io(comps[name], "outputs"))
        if not inputs <= have_in or not outputs <= have_out:
            raise ManifestError(f"component {name!r} records inputs {sorted(have_in)} and outputs {sorted(have_out)}; "
                                f"the runtime feeds {sorted(inputs)} and reads {sorted(outputs)}")
    channels = m["latent"]["channels"]
    # an inpainting UNet's sample is the latents with the mask and the masked-image latents (the inpaint entry)
    sample = [p["channels"] for p in m["inpaint"]["sample"]] if m.get("inpaint") else [channels]
    if sample[0] != channels:
        raise ManifestError(f"latent.channels is {channels} but inpaint.sample starts with {sample[0]} latent channels")
    checks = [(n, "sample", sum(sample)) for n in unets] + [("vae_decoder", "latent_sample", channels)]
    for name, tensor, want in checks:
        dim = _dim(_io(comps[name], "inputs")[tensor], 1)
        if dim is not None and dim != want:
            what = f"inpaint.sample sums to {want}" if want != channels else f"latent.channels is {channels}"
            raise ManifestError(f"{what} but {name}.{tensor} has {dim} channels")
    hidden = [_dim(_io(comps[e["component"]], "outputs")[e["hidden_state"]], 2) for e in m["text_encoders"]]
    want = _dim(_io(comps["unet"], "inputs")["encoder_hidden_states"], 2)
    if None not in hidden and want is not None and sum(hidden) != want:
        raise ManifestError(f"the text encoders give {sum(hidden)} features per token, the unet takes {want}")
    if m["guidance"]["mode"] == "embedded":
        dim = _dim(_io(comps["unet"], "inputs")[m["guidance"]["input"]], 1)
        if dim is not None and dim != m["guidance"]["embedding_dim"]:
            raise ManifestError(f"guidance.embedding_dim is {m['guidance']['embedding_dim']} but the unet's "
                                f"{m['guidance']['input']} takes {dim}")


def _check_transformer_io(m: dict[str, Any], denoiser: dict[str, Any]) -> None:
    """:func:`_check_engine_io` for a manifest with a ``denoiser`` section: the inputs it names by role, the
    guidance input, and what the text encoder entries read and feed."""
    comps = m["components"]
    name = denoiser["component"]
    needed: dict[str, tuple[set, set]] = {"vae_decoder": ({"latent_sample"}, {"sample"})}
    inputs = {v for v in denoiser["inputs"].values() if v}
    if m["guidance"]["mode"] in ("embedded", "scale_input"):
        inputs.add(m["guidance"]["input"])
    needed[name] = (inputs, {denoiser["output"]})
    for enc in m["text_encoders"]:
        feeds = {"input_ids"} | ({"attention_mask"} if enc.get("attention_mask", "none") != "none" else set())
        reads = {o for o in (enc["hidden_state"], enc.get("pooled")) if o}
        needed[enc["component"]] = (feeds, reads)
    if not any(e["hidden_state"] for e in m["text_encoders"]):
        raise ManifestError("no text encoder entry names a hidden_state, so the denoiser would get no text states")
    if denoiser["inputs"].get("text_mask") and not any(e.get("attention_mask") == "tokens"
                                                        for e in m["text_encoders"]):
        raise ManifestError("denoiser.inputs.text_mask is set but no text encoder entry has attention_mask 'tokens'")
    for comp, (want_in, want_out) in needed.items():
        if comp not in comps:
            raise ManifestError(f"component {comp!r} is missing from the manifest's components {sorted(comps)}")
        have_in, have_out = set(_io(comps[comp], "inputs")), set(_io(comps[comp], "outputs"))
        if not want_in <= have_in or not want_out <= have_out:
            raise ManifestError(f"component {comp!r} records inputs {sorted(have_in)} and outputs {sorted(have_out)}; "
                                f"the runtime feeds {sorted(want_in)} and reads {sorted(want_out)}")


def _check_consistency(m: dict[str, Any]) -> None:
    """What the schema cannot say: names that must refer to each other, lengths that must agree."""
    bad = _first_non_finite(m)
    if bad is not None:
        raise ManifestError(f"{bad} holds a number that is not finite")
    comps = m["components"]
    for name, comp in comps.items():
        if comp["file"] not in comp["files"]:
            # the runtime opens `file` but verifies `files`: a file outside them would run unverified
            raise ManifestError(f"component {name!r} opens {comp['file']!r}, which is not among its hashed files")
        for axis, rng in (comp.get("shape_ranges") or {}).items():
            _check_range(f"components.{name}.shape_ranges.{axis}", rng)
    for enc in m["text_encoders"]:
        if enc["component"] not in comps:
            raise ManifestError(f"text encoder {enc['component']!r} is not among the components {sorted(comps)}")
    for key in ("height", "width", "batch"):
        _check_range(f"image.{key}", m["image"][key])
        if m["profile"].get(key) is not None:
            _check_range(f"profile.{key}", m["profile"][key])
    mult = m["image"]["multiple_of"]
    for key in ("height", "width"):
        bad = [v for v in m["image"][key] if v % mult]
        if bad:
            raise ManifestError(f"image.{key} values {bad} are not multiples of image.multiple_of = {mult}")
    denoiser = (m.get("denoiser") or {}).get("component", "unet")
    if denoiser not in comps:
        raise ManifestError(f"the denoiser component {denoiser!r} is not among the components {sorted(comps)}")
    if m["guidance"]["mode"] == "embedded":
        unet_inputs = [i["name"] for i in comps[denoiser]["inputs"]]
        if m["guidance"]["input"] not in unet_inputs:
            raise ManifestError(f"guidance.input {m['guidance']['input']!r} is not an input of the unet "
                                f"({unet_inputs})")
    sampler = m["sampler"]
    steps = len(sampler["timesteps"])
    for key, value in sampler.items():
        if isinstance(value, list) and len(value) != steps:
            raise ManifestError(f"sampler table {key!r} has length {len(value)}, but timesteps has {steps} entries")
    if sampler.get("num_steps", steps) != steps:
        raise ManifestError(f"sampler.num_steps is {sampler['num_steps']} but the tables have {steps} entries")
    cache = m.get("cache")
    if cache is not None:
        for key in ("full_component", "shallow_component"):
            if cache[key] not in comps:
                raise ManifestError(f"cache.{key} {cache[key]!r} is not among the components {sorted(comps)}")
        if len(cache["full_steps"]) != steps:
            raise ManifestError(f"cache.full_steps has {len(cache['full_steps'])} entries for {steps} sampler steps")
    variants = m.get("step_variants")
    if variants is not None:
        names, bounds = variants["components"], variants["timestep_bounds"]
        if len(bounds) != len(names) - 1 or any(n not in comps for n in names):
            raise ManifestError("'step_variants' must name components of this manifest and hold one timestep bound "
                                "fewer than components")
        if len(variants["steps"]) != steps or any(s >= len(names) for s in variants["steps"]):
            raise ManifestError(f"step_variants.steps must hold one group index below {len(names)} per sampler step")
    _check_savings(m, steps)
    _check_engine_io(m)
    if m.get("controlnets") is not None:
        from diffc.runtime.controlnet import check_manifest_entry

        check_manifest_entry(m)


def _check_savings(m: dict[str, Any], steps: int) -> None:
    """The ``savings`` section against the rest: adaptive guidance needs classifier-free guidance and a step within
    the loop; extrapolation needs a cached value to extrapolate (``cache`` or ``savings.step_cache``)."""
    from diffc.runtime.savings import Savings

    if m.get("savings") is None:
        return
    sv = Savings.from_dict(m["savings"])
    ag = sv.adaptive_guidance
    if ag.mode != "off" and m["guidance"]["mode"] != "cfg":
        raise ManifestError(f"savings.adaptive_guidance is {ag.mode!r} but guidance.mode is "
                            f"{m['guidance']['mode']!r}; adaptive guidance drops the uncond half of classifier-free "
                            "guidance ('cfg') and has nothing to drop here")
    if ag.mode == "static" and ag.from_step > steps:
        raise ManifestError(f"savings.adaptive_guidance.from_step {ag.from_step} is past the {steps} sampler steps")
    if sv.extrapolation_order > 0 and m.get("cache") is None and sv.step_cache is None:
        raise ManifestError("savings.extrapolation.order > 0 but nothing is cached to extrapolate (no 'cache' "
                            "section, no savings.step_cache)")
    if sv.step_cache is not None:  # its components present, its threshold in range (diffc.runtime.step_cache)
        from diffc.runtime.step_cache import check_entry

        check_entry(sv.step_cache, m["components"])


def _check_savings_version(path: Path, savings: Any) -> None:
    """A ``savings`` section from a newer diffc gets "upgrade diffc" (its new keys would otherwise read as schema
    errors); the schema and :func:`_check_consistency` check the rest."""
    from diffc.runtime.savings import SAVINGS_VERSION

    version = savings.get("version") if isinstance(savings, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > SAVINGS_VERSION:
        raise ManifestError(f"{path}: savings.version {version} was written by a newer diffc (this runtime reads "
                            f"{SAVINGS_VERSION}); upgrade diffc or rebuild the artifact")


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Load ``root/manifest.json`` and check it completely (not the files; see :func:`verify_files`).

    Order: readable JSON object, schema version (a newer diffc's manifest gets "upgrade diffc", not a list of
    schema errors), paths that leave the artifact (an :class:`IntegrityError`), then the JSON schema and the
    cross-references it cannot express. Every failure is a :class:`ManifestError` naming the field.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"artifact folder {root} does not exist; build one with `diffc build MODEL --out {root}`")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{root} has no {MANIFEST_NAME}, so it is not a diffc artifact (or the build was "
                            f"interrupted); {_REBUILD}")
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path} is {size / 2**20:.0f} MiB, far more than a diffc manifest (a few kB); it is "
                                f"not one, {_REBUILD}")
        manifest = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise ManifestError(f"{path} is corrupt (nested too deeply to be a diffc manifest); {_REBUILD}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"{path} is corrupt ({_short(str(e))}); {_REBUILD}") from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is not a JSON object; {_REBUILD}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{path} has no valid schema_version (got {_short(repr(version))}); {_REBUILD}")
    if version > SCHEMA_VERSION:
        raise ManifestError(
            f"{path} has schema_version {version}, made by a newer diffc "
            f"({_short(str(manifest.get('diffc_version', '?')), 40)}); this runtime reads schema {SCHEMA_VERSION} — "
            "upgrade diffc (pip install -U diffc) or rebuild the artifact"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{path} lacks {missing}; {_REBUILD}")
    comps = manifest["components"]
    denoiser = manifest.get("denoiser")
    denoiser = denoiser.get("component") if isinstance(denoiser, dict) else "unet"
    if isinstance(comps, dict):
        for name in REQUIRED_COMPONENTS + ((denoiser,) if isinstance(denoiser, str) else ()):
            if name not in comps:
                raise ManifestError(f"{path}: component {name!r} is missing from the manifest; {_REBUILD}")
    for rel in _named_paths(manifest):
        _check_path_text(rel)
    _check_savings_version(path, manifest.get("savings"))
    try:
        error = best_match(_validator().iter_errors(manifest))
    except RecursionError:
        raise ManifestError(f"{path} nests values too deeply to be a diffc manifest; {_REBUILD}") from None
    if error is not None:
        raise ManifestError(f"{path}: {_where(error.absolute_path)}: {_explain(error)}; {_REBUILD}")
    try:
        _check_consistency(manifest)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}; {_REBUILD}") from None
    return manifest


def verify_files(root: str | os.PathLike, manifest: dict[str, Any], *, hashes: bool = True) -> None:
    """Check that every file the manifest names is inside the artifact, present, and (optionally) unchanged."""
    root = Path(root)
    expected: dict[str, str | None] = {}
    for comp in manifest["components"].values():
        artifact_path(root, comp["file"])
        expected.update(comp["files"])
    for enc in manifest["text_encoders"]:
        expected[enc["tokenizer"]] = enc.get("tokenizer_sha256")
    for rel, digest in expected.items():
        full = artifact_path(root, rel)
        if not full.is_file():
            raise IntegrityError(f"artifact file {rel} is missing from {root}; {_REBUILD}")
        if hashes and digest is not None and not sha256_matches(full, digest):
            raise IntegrityError(f"artifact file {rel} does not match the sha256 recorded at build time (it was "
                                 f"modified or corrupted); {_REBUILD}")
