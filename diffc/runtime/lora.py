"""LoRA files read with numpy alone: parse, map their keys to module names, compute the weight deltas.

Why hand-written: diffusers' converters (``lora_state_dict``, ``_convert_non_diffusers_lora_to_diffusers``) and
peft's state-dict helpers need torch, and the runtime applies a LoRA with numpy + safetensors only. The build
uses diffusers itself to fuse (:mod:`diffc.exporter.lora`) and this module only to refuse bad files before any
work; the run-time swap (:class:`WeightSwap`) uses it to compute ``W + scale * alpha / rank * up @ down`` for
the initializers the build recorded (the manifest's ``lora_targets``, see docs/lora.md).

Key layouts understood (each a suffix that names the low-rank factors, after a component prefix):

=================  ===============================================================  ==========================
layout             keys                                                             alpha
=================  ===============================================================  ==========================
peft / diffusers   ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``             ``lora_adapter_metadata``
diffusers (old)    ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``,        ``.alpha`` keys, else rank
                   ``text_encoder.<module>.lora_linear_layer.down.weight``,
                   ``unet.<attn>.processor.to_q_lora.down.weight``
kohya / A1111      ``lora_unet_<module_with_underscores>.lora_down.weight`` /       ``.alpha`` keys, else rank
                   ``.lora_up.weight``, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``
=================  ===============================================================  ==========================

Module names are diffusers' (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``); text-encoder names
drop the ``text_model.`` level that older transformers had, so files from either era map to one name. A key
without a component prefix addresses the denoiser (diffusers does the same). Other adapter kinds (DoRA's
``.dora_scale``, LyCORIS LoHa / LoKr ``hada_`` / ``lokr_`` factors, full ``.diff`` weights) are refused as an
unknown layout, naming the key, rather than half-applied. kohya's SDXL files that use the original model's block
names (``lora_unet_input_blocks_4_1_...``) are not mapped yet: refused (naming the key) at build and at run time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from diffc.errors import InputError

#: components a LoRA may address: diffusers' prefix -> the artifact's component name
COMPONENT_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2",
                      "transformer": "transformer"}
#: kohya / A1111 prefixes -> component
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2", "lora_transformer_": "transformer"}
#: LoRAs shipped with diffc, by short name (``--lora demo-bold:1.0``, as ``demo`` names the bundled model): trained
#: by tools/train_demo_lora.py for the demo UNet
BUNDLED_LORAS = {"demo-bold": Path(__file__).resolve().parent.parent / "assets" / "demo_lora"
                 / "pytorch_lora_weights.safetensors"}
#: (down suffix, up suffix) of each layout, longest first so ``.lora.down.weight`` is not read as ``.down.weight``
FACTOR_SUFFIXES = (
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    ("_lora.down.weight", "_lora.up.weight"),  # attention-processor layout: attn1.processor.to_q_lora.down.weight
)


class LoraError(InputError):
    """A LoRA file or scale cannot be used: missing, corrupt, of an unknown key layout, or for another model."""

    code = "lora_error"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA as given by the user: a file and its scale, with the file's identity for the manifest."""

    path: Path
    scale: float
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "scale": self.scale}


@dataclass
class Factor:
    """The low-rank pair of one module: ``delta = alpha / rank * up @ down`` (before the user's scale)."""

    key: str  # the file's key of ``down``, for messages
    down: np.ndarray  # (rank, in) or conv (rank, in, kh, kw)
    up: np.ndarray  # (out, rank) or conv (out, rank, 1, 1)
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """``alpha / rank * up @ down`` in the module's weight ``shape`` (fp32, as diffusers' fuse computes it)."""
        out = int(self.up.shape[0])
        up = self.up.reshape(out, self.rank).astype(np.float32)
        down = self.down.reshape(self.rank, -1).astype(np.float32)
        scale = 1.0 if self.alpha is None else self.alpha / self.rank
        d = (up @ down) * np.float32(scale)
        if d.size != math.prod(shape):
            raise LoraError(f"LoRA key {self.key!r} has factors {tuple(self.up.shape)} x {tuple(self.down.shape)} "
                            f"but the model's weight there is {tuple(shape)}: the LoRA is for another architecture; "
                            "use a LoRA trained for this model")
        return d.reshape(shape)


@dataclass
class LoraFile:
    """A parsed LoRA: component -> module key (as the file spells it, normalized) -> :class:`Factor`."""

    spec: LoraSpec
    factors: dict[str, dict[str, Factor]] = field(default_factory=dict)
    kohya: bool = False  # module keys use underscores and are resolved against the model's names


def check_scale(scale: Any, label: str = "LoRA scale") -> float:
    ok = isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, (bool, np.bool_))
    if not ok or not math.isfinite(float(scale)):
        raise LoraError(f"{label} must be a finite number (1.0: the LoRA as trained, 0: off), got {scale!r}")
    return float(scale)


def parse_spec(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` as the command line takes it -> (file, scale); the scale defaults to 1.0. The scale is
    split at the last colon only when what follows reads as a number, so a path with colons still works."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        return head, check_scale(scale, f"the scale in --lora {text!r}")
    return text, 1.0


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def spec(path: str | os.PathLike, scale: Any = 1.0) -> LoraSpec:
    """Check one (file, scale) as given: the scale finite, the file present and readable."""
    scale = check_scale(scale, f"the scale of LoRA {str(path)!r}")
    p = Path(path)
    if str(path) in BUNDLED_LORAS:  # a short name, as `demo` names the bundled model
        p = BUNDLED_LORAS[str(path)]
        if not p.is_file():
            raise LoraError(f"the bundled LoRA {str(path)!r} is missing ({p}); restore diffc/assets/demo_lora from "
                            "the repository, or train it with `python tools/train_demo_lora.py`")
    if not p.is_file():
        raise LoraError(f"LoRA file {str(p)!r} does not exist (or is not a file); pass the path of a .safetensors "
                        "LoRA, optionally with :SCALE")
    return LoraSpec(path=p.resolve(), scale=scale, sha256=file_sha256(p))


def specs(loras: Mapping[Any, Any] | Iterable[Any] | None) -> list[LoraSpec]:
    """``{file: scale}``, ``[(file, scale), ...]`` or ``["FILE[:SCALE]", ...]`` -> checked :class:`LoraSpec`s."""
    if loras is None:
        return []
    if isinstance(loras, (str, os.PathLike)):
        raise LoraError(f"LoRAs are given as {{file: scale}} or [(file, scale), ...], got the single path {loras!r}; "
                        "wrap it: {path: 1.0}")
    items = loras.items() if isinstance(loras, Mapping) else loras
    out = []
    for item in items:
        if isinstance(item, str):
            item = parse_spec(item)
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise LoraError(f"each LoRA is (file, scale) or 'FILE[:SCALE]', got {item!r}")
        out.append(spec(*item))
    return out


def _read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors (numpy) and the metadata of a safetensors file; a corrupt or truncated file is a LoraError."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as e:  # a runtime-only install without it
        raise LoraError(f"reading LoRA files needs the safetensors package ({e}); pip install safetensors") from e
    size = path.stat().st_size
    try:
        with safe_open(str(path), framework="np") as f:
            meta = dict(f.metadata() or {})
            tensors = {}
            for k in f.keys():
                try:  # fp16 / bf16 factors are widened once here (bf16 arrives as ml_dtypes' type if loaded)
                    tensors[k] = f.get_tensor(k).astype(np.float32, copy=False)
                except TypeError:  # numpy alone has no bfloat16, a common LoRA dtype: widen it ourselves
                    tensors[k] = _bf16_tensor(path, k)
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:
        raise LoraError(f"LoRA file {path.name} ({size} bytes) is not a readable safetensors file ({e}): it is "
                        "corrupt or truncated; download it again") from None
    return tensors, meta


def _bf16_tensor(path: Path, key: str) -> np.ndarray:
    """One BF16 tensor of a safetensors file as float32 (bf16 is the top half of an fp32), read by its header:
    8 bytes of little-endian header length, the JSON header, then the data the offsets point into."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))[key]
        if info["dtype"] != "BF16":
            raise TypeError(f"tensor {key!r} has dtype {info['dtype']}, which numpy cannot read")
        begin, end = info["data_offsets"]
        f.seek(8 + n + begin)
        raw = np.frombuffer(f.read(end - begin), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def _prefix_of(key: str) -> tuple[str, str, bool]:
    """(component, rest of the key, kohya?) of one key."""
    for prefix, comp in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            return comp, key[len(prefix):], True
    head, _, rest = key.partition(".")
    if head in COMPONENT_PREFIXES and rest:
        return COMPONENT_PREFIXES[head], rest, False
    return "unet", key, False


def normalize_module(component: str, module: str) -> str:
    """One module name per weight, whichever era of diffusers / transformers wrote the key."""
    module = module.replace(".processor.", ".")
    if component.startswith("text_encoder"):
        module = module.removeprefix("text_model.")
    if module.endswith(".to_out"):  # the attention processor layout names the Linear of to_out.0 "to_out"
        module += ".0"
    return module


def _peft_alphas(meta: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``lora_adapter_metadata`` (diffusers >= 0.33 writes each prefix's LoraConfig) -> component -> config."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        head, _, name = k.partition(".")
        if head in COMPONENT_PREFIXES:
            out.setdefault(COMPONENT_PREFIXES[head], {})[name] = v
    return out


def _peft_alpha(config: Mapping[str, Any], module: str) -> float | None:
    """The module's lora_alpha as peft resolves it (``alpha_pattern`` entries match a module name's tail)."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(rf"(.*\.)?{pattern}", module):
            return float(alpha)
    return None if config.get("lora_alpha") is None else float(config["lora_alpha"])


def read_lora(lora: LoraSpec) -> LoraFile:
    """Parse ``lora``'s file into factors per component and module; an unknown key layout is a LoraError naming
    the first key that fits none (so nothing is half-applied)."""
    tensors, meta = _read_tensors(lora.path)
    if not tensors:
        raise LoraError(f"LoRA file {lora.name} holds no tensors; pass a LoRA's .safetensors file")
    parsed = LoraFile(spec=lora)
    alphas: dict[tuple[str, str], float] = {}
    pending: dict[tuple[str, str], dict[str, Any]] = {}
    for key in sorted(tensors):
        comp, rest, kohya = _prefix_of(key)
        parsed.kohya |= kohya
        if rest.endswith(".alpha"):
            module = normalize_module(comp, rest.removesuffix(".alpha"))
            alphas[(comp, module)] = float(np.asarray(tensors[key]).reshape(-1)[0])
            continue
        for down_sfx, up_sfx in FACTOR_SUFFIXES:
            for role, sfx in (("down", down_sfx), ("up", up_sfx)):
                if rest.endswith(sfx):
                    module = rest.removesuffix(sfx)
                    if sfx.startswith("_lora"):  # attn1.processor.to_q_lora.down.weight -> attn1.to_q
                        module = module.replace(".processor.", ".")
                    entry = pending.setdefault((comp, normalize_module(comp, module)), {"key": key})
                    entry[role] = np.asarray(tensors[key])
                    break
            else:
                continue
            break
        else:
            raise LoraError(
                f"LoRA file {lora.name}: key {key!r} is of no key layout diffc knows (peft/diffusers "
                "'<module>.lora_A.weight', kohya/A1111 'lora_unet_<module>.lora_down.weight'); convert the file "
                "with diffusers or pass a LoRA in one of those layouts")
    peft_cfg = _peft_alphas(meta)
    for (comp, module), entry in pending.items():
        if "down" not in entry or "up" not in entry:
            raise LoraError(f"LoRA file {lora.name}: key {entry['key']!r} has no matching "
                            f"{'up' if 'down' in entry else 'down'} factor; the file is incomplete")
        down, up = entry["down"], entry["up"]
        if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
            raise LoraError(f"LoRA file {lora.name}: key {entry['key']!r} has factors of shapes {tuple(down.shape)} "
                            f"and {tuple(up.shape)}, which do not multiply; the file is corrupt")
        alpha = alphas.get((comp, module))
        if alpha is None and comp in peft_cfg:
            alpha = _peft_alpha(peft_cfg[comp], module)
        parsed.factors.setdefault(comp, {})[module] = Factor(entry["key"], down, up, alpha)
    return parsed


def resolve(lora: LoraFile, modules: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, str], Factor]:
    """Map each of ``lora``'s factors onto the model: ``modules`` is component -> module name -> anything with a
    weight ``shape``. Returns (component, module) -> factor; a key for a module the model lacks, or with a shape
    the module's weight does not have, is a LoraError naming it (a LoRA for another architecture)."""
    out = {}
    for comp, factors in lora.factors.items():
        if comp == "unet" and "unet" not in modules and "transformer" in modules:
            comp = "transformer"  # unprefixed and lora_unet_ keys address the denoiser, whichever it is
        known = modules.get(comp)
        if known is None:
            first = next(iter(factors.values())).key
            raise LoraError(f"LoRA {lora.spec.name} addresses {comp!r} (key {first!r}), which this model does not "
                            f"have (it has {sorted(modules)}): the LoRA is for another architecture")
        by_underscores = {m.replace(".", "_"): m for m in known}
        for module, factor in factors.items():
            name = module if module in known else by_underscores.get(module.replace(".", "_"))
            if name is None and comp.startswith("text_encoder"):
                name = by_underscores.get(module.removeprefix("text_model_"))
            if name is None:
                raise LoraError(f"LoRA {lora.spec.name}: key {factor.key!r} addresses module {module!r}, which "
                                f"{comp} does not have: the LoRA is for another architecture")
            shape = tuple(_shape(known[name]))
            out_dim, in_dim = int(factor.up.shape[0]), int(np.prod(factor.down.shape[1:]))
            if shape[0] != out_dim or int(np.prod(shape[1:])) != in_dim:
                raise LoraError(f"LoRA {lora.spec.name}: key {factor.key!r} is for a weight of {out_dim} x {in_dim} "
                                f"but {comp}.{name} is {shape}: the LoRA is for another architecture")
            out[(comp, name)] = factor
    return out


def _shape(entry: Any) -> tuple[int, ...]:
    return tuple(entry["shape"] if isinstance(entry, Mapping) else entry)


# ------------------------------------------------------------------------------------------- run-time swap


def _read_base(root: Path, at: Mapping[str, Any], artifact_path) -> np.ndarray:
    """The artifact's own value of one recorded initializer: its bytes at ``file`` / ``offset`` (one seek; the
    files were checked against the manifest's digests when the pipeline loaded)."""
    from diffc.errors import ArtifactError

    dims = tuple(int(d) for d in at["dims"])
    count = math.prod(dims)
    path = artifact_path(root, at["file"])
    offset = int(at["offset"])
    # fp16: the weight as an OpenVINO IR of a bf16 component stores it
    dtype = {"float32": np.float32, "float16": np.float16}.get(at.get("dtype", "float32"))
    if dtype is None:
        raise ArtifactError(f"lora_targets place {at['initializer']!r} as {at['dtype']!r}, which this runtime cannot "
                            "read; rebuild the artifact or upgrade diffc")
    try:
        values = np.fromfile(path, dtype=dtype, count=count, offset=offset).astype(np.float32)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {at['initializer']!r} from {path}: {e}; rebuild the artifact") from None
    if values.size != count:
        raise ArtifactError(f"{path} ends before {at['initializer']!r} (offset {offset}, {count} floats) that the "
                            "manifest's lora_targets place there; the artifact was changed after its build: rebuild it")
    return values.reshape(dims)


def targets_of(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's ``lora_targets.modules`` (component -> module -> record), or a LoraError saying to rebuild."""
    targets = (manifest.get("lora_targets") or {}).get("modules")
    if not targets:
        raise LoraError("this artifact records no LoRA targets (it was built by an older diffc, or for a backend "
                        "that cannot replace weights at run time); rebuild it, or fuse the LoRA at build time "
                        "with `diffc build --lora FILE:SCALE`")
    return targets


@dataclass
class SwapPlan:
    """What a set of LoRAs changes, checked but not yet computed: for each engine component, the recorded
    initializers (``at`` entries of ``lora_targets``) and the scaled factors that add to each."""

    targets: dict[str, dict[str, Any]]
    per_engine: dict[str, list[tuple[dict[str, Any], tuple[str, str]]]]
    factors: dict[tuple[str, str], list[tuple[float, Factor]]]

    def weights(self, root: Path, engine: str, artifact_path) -> dict[str, np.ndarray]:
        """``engine``'s replaced initializers: name -> base + sum of scale * delta, fp32 in the graph's layout."""
        out = {}
        for at, (comp, module) in self.per_engine.get(engine, []):
            shape = tuple(self.targets[comp][module]["shape"])
            w = _read_base(root, at, artifact_path)
            delta = sum(np.float32(s) * f.delta(shape) for s, f in self.factors[(comp, module)])
            w += delta.reshape(shape[0], -1).T.reshape(w.shape) if at.get("transposed") else delta.reshape(w.shape)
            out[at["initializer"]] = w
        return out


def plan(manifest: Mapping[str, Any], loras: list[LoraSpec]) -> SwapPlan:
    """Parse and check ``loras`` against the artifact's ``lora_targets`` (all applied, summed as diffusers fuses
    them one after another). Everything that can be wrong with the input is raised here, before any weight is
    read or any session touched."""
    targets = targets_of(manifest)
    factors: dict[tuple[str, str], list[tuple[float, Factor]]] = {}
    for lora in loras:
        for where, factor in resolve(read_lora(lora), targets).items():
            factors.setdefault(where, []).append((lora.scale, factor))
    per_engine: dict[str, list[tuple[dict[str, Any], tuple[str, str]]]] = {}
    for (comp, module), fs in factors.items():
        record = targets[comp][module]
        if not record.get("at") or any("file" not in at for at in record["at"]):
            raise LoraError(f"{comp}.{module} (which a LoRA touches) is not addressable in this artifact's engines "
                            f"({record.get('why', 'no engine graph holds its weight')}); fuse the LoRA at "
                            "build time with `diffc build --lora FILE:SCALE`")
        for _, f in fs:
            f.delta(tuple(record["shape"]))  # the shapes multiply out (resolve checked the outer dimensions)
        for at in record["at"]:
            per_engine.setdefault(at["component"], []).append((at, (comp, module)))
    return SwapPlan(targets=targets, per_engine=per_engine, factors=factors)


def swap(pipe, loras: Any) -> list[LoraSpec]:
    """:meth:`diffc.runtime.Pipeline.set_loras`: apply ``loras`` (``{file: scale}``; ``{}`` or None: none) on
    top of the artifact's weights, replacing the previous run-time LoRAs.

    Every file is read and checked (:func:`plan`) before any session is touched: bad input leaves the pipeline
    as it was. Then each engine whose weights change is closed first; its new weights are computed (base read
    back from the artifact's file) and it is reopened (onnxruntime: :class:`diffc.engines.onnxruntime.Session`
    with replaced initializers), so the process never holds two copies of one component's weights. An engine
    going back to no LoRA is reopened exactly as at load (same file, same host cache entry): its images are the
    base artifact's, bit for bit. Should reopening fail (a file changed since load), that engine is reopened
    without LoRA before the error is raised.
    """
    from diffc.engines import SessionOptions, get_backend
    from diffc.engines.host_cache import PublishGate
    from diffc.runtime.manifest import artifact_path

    new = specs(loras)
    manifest = pipe.manifest
    swap_plan = plan(manifest, new) if new else SwapPlan({}, {}, {})
    for engine in swap_plan.per_engine:
        backend = get_backend(manifest["components"][engine]["backend"])
        if not getattr(backend, "replaces_weights", False):
            raise LoraError(f"the {backend.name} engine of {engine} cannot take a LoRA at run time; fuse it at "
                            "build time with `diffc build --lora FILE:SCALE`, or build with an onnxruntime or "
                            "OpenVINO profile")
    touched = set(swap_plan.per_engine)
    reopen = sorted(touched | set(pipe.lora_engines))
    opts = dict(pipe.session_args)
    verified = opts.pop("verified")
    ort_options = dict(manifest.get("profile", {}).get("onnxruntime") or {})
    if opts.get("memory_arena") is not None:
        ort_options["memory_arena"] = opts["memory_arena"]
    ort_options.setdefault("memory_arena", "denoiser")
    for engine in reopen:
        entry = manifest["components"][engine]
        old = pipe.sessions.pop(engine)
        close = getattr(old, "close", None)
        if close is not None:
            close()
        del old, close
        key = "|".join(entry["files"][f] for f in sorted(entry["files"])) if opts["cache"] else None
        gate = PublishGate(verified=verified)
        if not verified:
            gate.close()
        options = SessionOptions(threads=opts["threads"], cache_key=key, gate=gate, onnxruntime=ort_options,
                                 dims=opts.get("dims"))
        backend = get_backend(entry["backend"])
        path = artifact_path(pipe.root, entry["file"])
        # computed only now that the old session is gone: the process holds one copy of these weights
        try:
            replaced = swap_plan.weights(pipe.root, engine, artifact_path) if engine in touched else None
            pipe.sessions[engine] = backend.open_session(engine, entry, path, options, weights=replaced) \
                if replaced else backend.open_session(engine, entry, path, options)
        except BaseException:
            pipe.sessions[engine] = backend.open_session(engine, entry, path, options)
            pipe.lora_engines = set(pipe.lora_engines) - {engine}
            raise
        del replaced
    pipe.lora_engines = touched
    return new
