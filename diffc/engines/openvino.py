"""OpenVINO backend (CPU): the artifact ships OpenVINO IR (``model.xml`` + ``model.bin``); the runtime compiles it.

Why OpenVINO beside onnxruntime: onnxruntime's x86 CPU kernels compute in fp32 (or int8); OpenVINO's CPU plugin
has bf16 kernels (AVX512-BF16 / AMX) for convolutions, GEMMs and a fused attention it finds in the graph by
itself. SD-1.5's architecture at 512x512 on a 2-core AVX512-BF16 AMD EPYC: a UNet step (batch 2) 4.5-5.4 s in
bf16 vs 8.5 s on onnxruntime fp32; the VAE decoder 6.4 s vs 12.8 s (output rel. L2 error 2.2-2.4% vs fp32
with random weights). With diffc's calibrated int8 Q/DQ UNet (``int8`` precision), a step takes 3.0-3.5 s:
its convolutions and GEMMs run on int8 kernels (VNNI), attention and norms in bf16 (onnxruntime's int8 UNet:
~4.3 s). That needs static shapes: compiled for the IR's dynamic shapes, an int8 Q/DQ UNet took 7.0-7.6 s per
step, slower than bf16.

What an engine is here: the graph after diffc's passes for the ``openvino`` target (no contrib ops, attention
left decomposed for OpenVINO to fuse), converted to OpenVINO IR at build time. A ``bf16`` component keeps its
weights in fp16 in ``model.bin`` (OpenVINO's weight compression; the plugin turns them into bf16 when it packs
them, so nothing is lost that bf16 compute would keep): the SD-1.5 UNet's file is 1.7 GB instead of 3.4. An
``fp32`` component keeps fp32 weights. The precision is the plugin's inference precision hint, set when the
session compiles the graph. Memory: the compiled model keeps the weights file mapped beside its packed copy,
so the session drops the file's pages once compiled (SD-1.5 UNet after a 512x512 step: 1.9 GiB resident
instead of 3.5; 5.8 with the fp32 ONNX graph of the first version).

Compiled models are kept per host (``<host cache>/openvino``): compiling the int8 UNet takes 5.6-9 s (its
low-precision transformations), the bf16 one 3-4 s; a later start imports the compiled model instead (int8
UNet: 3.3-3.5 s) without reading the IR. diffc imports it itself rather than through OpenVINO's model cache:
OpenVINO's cache looks an entry up by hashing the whole model, weights included, which leaves the weights file
resident beside the mapped blob and the packed copy (peak 2.97 GiB for the int8 UNet instead of 2.0) and
takes longer (3.8 s). OpenVINO's cache still writes the entry (while compiling, streamed to the file: +2.2 s
on the first start, no more memory); diffc maps the blob past the header OpenVINO's core puts in front.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Sequence

import numpy as np

from diffc.engines import (BuiltEngine, SessionOptions, check_feeds, component_entry, engine_io, opt_shapes,
                           plain_description, register)
from diffc.engines.host_cache import Entry, HostCache, Pending, PublishGate, with_fallback
from diffc.errors import ArtifactError, BackendUnavailableError, InputError

log = logging.getLogger("diffc.engines.openvino")

NAME = "openvino"
EXTRA = "pip install 'diffc[openvino]'"
#: diffc precision -> OpenVINO CPU inference precision hint. An int8 component is a Q/DQ graph (diffc's quantize
#: pass, calibrated on the sampling loop): OpenVINO runs its quantized convolutions and GEMMs with int8 kernels
#: (VNNI / AMX) and the layers left in float (attention, norms, keep_float layers) in bf16 where the CPU has it.
PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}


def available() -> str | None:
    """OpenVINO's version, or None when it is not importable."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


def _ov():
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailableError(f"this artifact runs on OpenVINO, which is not importable ({e}); "
                                      f"install it with {EXTRA}") from e
    return openvino


def version() -> str:
    return _ov().get_version()


def native_bf16(core=None) -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it OpenVINO computes in fp32.
    ``core``: an ``openvino.Core`` to ask (a new one if None)."""
    core = core or _ov().Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


#: the engine files of a component, in its folder
ENGINE_FILE = "model.xml"


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str) -> dict[str, Any]:
    """Convert ``onnx_path`` to OpenVINO IR at ``engine_path`` (``.xml``, weights in the ``.bin`` beside it):
    fp16 weights for a ``bf16`` component, fp32 for ``fp32``; an ``int8`` component's graph has Q/DQ nodes and
    int8 weights, kept as they are (its few float layers stay fp32). Returns the engine record; its ``files`` are
    relative to ``engine_path``'s folder."""
    import onnx

    ov = _ov()
    if precision not in PRECISIONS:
        raise BackendUnavailableError(f"the openvino backend builds {', '.join(PRECISIONS)}, not {precision}")
    engine_path = Path(engine_path)
    try:
        model = ov.Core().read_model(str(onnx_path))
    except Exception as e:  # OpenVINO raises its own exception types for an op it cannot convert
        raise BackendUnavailableError(f"OpenVINO {ov.get_version()} cannot read {onnx_path}: {e}") from e
    # one name per input/output port, the graph's own: OpenVINO also gives a port the names of the inner tensors
    # it was merged with, and the loop asks for outputs by the manifest's names
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    for ports, values in ((model.inputs, graph.input), (model.outputs, graph.output)):
        for port, value in zip(ports, values):
            port.get_tensor().set_names({value.name})
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(engine_path), compress_to_fp16=precision == "bf16")
    return {"backend": NAME, "backend_version": ov.get_version(),
            "files": [engine_path.name, engine_path.with_suffix(".bin").name]}


#: IR constant element types a run-time weight swap can address -> numpy dtype
_IR_FLOAT_TYPES = {"f32": np.float32, "f16": np.float16}


def ir_weight_tensors(xml_path: Path, artifact: Path):
    """Yield ``(value as fp32, record)`` for every float constant (2-D and up) of the IR at ``xml_path``:
    ``record`` = {initializer (the constant's layer name), dims, file (the ``.bin``), offset, dtype}, read from the
    IR's own ``<data element_type shape offset size>`` entries, so the runtime reads a base weight with one seek.
    Parsed with the standard library's XML reader: an IR file is XML the build itself wrote."""
    import xml.etree.ElementTree as ET

    bin_path = xml_path.with_suffix(".bin")
    rel = bin_path.relative_to(artifact).as_posix()
    for layer in ET.parse(xml_path).getroot().iter("layer"):
        data = layer.find("data")
        if layer.get("type") != "Const" or data is None or data.get("element_type") not in _IR_FLOAT_TYPES:
            continue
        dims = [int(d) for d in data.get("shape", "").split(",") if d.strip()]
        if len(dims) < 2:
            continue
        dtype = _IR_FLOAT_TYPES[data.get("element_type")]
        offset = int(data.get("offset"))
        values = np.fromfile(bin_path, dtype=dtype, count=int(np.prod(dims)), offset=offset).reshape(dims)
        yield values.astype(np.float32), {"initializer": layer.get("name"), "dims": dims, "file": rel,
                                          "offset": offset, "dtype": np.dtype(dtype).name}


def replace_constants(model, weights: dict[str, np.ndarray], where: Path) -> None:
    """Replace the constants named in ``weights`` (layer name -> fp32 value) in the read ``model``, each in its
    own element type (fp16 stays fp16: the plugin converts it as it did the built one)."""
    ov = _ov()
    consts = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    for name, value in weights.items():
        old = consts.get(name)
        if old is None:
            raise ArtifactError(f"{where} holds no constant {name!r} that the manifest's lora_targets name; the "
                                "artifact was changed after its build: rebuild it")
        dtype = {ov.Type.f16: np.float16, ov.Type.f32: np.float32}.get(old.get_output_element_type(0))
        if dtype is None or tuple(old.get_output_shape(0)) != value.shape:
            raise ArtifactError(f"{where}: constant {name!r} is {old.get_output_element_type(0)} "
                                f"{list(old.get_output_shape(0))}, not the float {list(value.shape)} the manifest "
                                "records; rebuild the artifact")
        new = ov.op.Constant(np.ascontiguousarray(value, dtype=dtype))
        new.set_friendly_name(name)
        old.output(0).replace(new.output(0))


#: how a host cache entry is laid out (in its key, so entries of another layout are made again, never misread)
CACHE_LAYOUT = 1


def cpu_signature(core=None) -> str:
    """What a compiled model depends on besides the graph and its options: the machine, the CPU (its name and
    the precisions OpenVINO finds on it) and OpenVINO's version: a cache entry made elsewhere (a shared home
    folder) or by another release is never tried."""
    import platform

    core = core or _ov().Core()
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "|".join([platform.machine(), version(), str(core.get_property("CPU", "FULL_DEVICE_NAME")),
                     ",".join(sorted(str(c) for c in caps))])


class Session:
    """One component compiled by OpenVINO's CPU plugin. ``run`` takes and returns numpy arrays by name.

    ``precision``: ``bf16``, ``fp32`` or ``int8`` (:data:`PRECISIONS` gives the plugin's inference precision
    hint); ``threads`` 0: OpenVINO's latency default (one stream over the physical cores).

    The graph is compiled for static input shapes: the plugin then packs the weights while compiling, where with
    the IR's dynamic shapes it packed them during the first inference, 2.6 s slower for the SD-1.5 UNet at
    512x512 (compiling takes ~1 s longer), and an int8 graph ran at half the speed. ``shapes`` (one per input,
    in the graph's order): compile for them now; a run with other shapes (or the first run, without
    ``shapes``) compiles for its own, replacing the compiled model (the loop gives each component one shape
    per image size and batch). After compiling, the session drops the IR's weight pages from its resident
    memory (:func:`_drop_file_pages`): the plugin has its packed copy (an fp32 graph reads some weights in
    place; those pages come back as they are read).

    With a ``cache_key`` (the engine files' sha256 digests), a compiled model is also kept in the per-host cache
    (``<host cache>/openvino``, keyed by the engine, the shapes, the plugin options and :func:`cpu_signature`)
    and later sessions import it instead of compiling: the IR is then not read at all, and the blob is mapped,
    not copied (its pages dropped like the IR's). The SD-1.5 int8 UNet, 256x256 or 512x512: 3.3-3.5 s instead of
    5.7 (7.9 the first time, writing the entry), peak 2.0 GiB either way. ``from_cache``: whether the last
    compile was an import. ``gate``: a new entry is published only once it opens (the runtime opens it when the
    digests have been verified against the files; :mod:`diffc.engines.host_cache`); without one the caller
    vouches for ``cache_key``.
    """

    def __init__(self, path: str | os.PathLike, *, precision: str = "fp32", threads: int = 0,
                 shapes: Sequence[Sequence[int]] | None = None, cache_key: str | None = None,
                 gate: PublishGate | None = None, weights: dict[str, np.ndarray] | None = None):
        ov = _ov()
        if precision not in PRECISIONS:
            raise InputError(f"OpenVINO sessions run {sorted(PRECISIONS)}, not {precision!r}; rebuild the artifact "
                             "with the cpu-openvino profile")
        self._config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision],
                                        "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._core = ov.Core()
        if PRECISIONS[precision] == "bf16" and not native_bf16(self._core):
            log.warning("this CPU has no bf16 instructions (AVX512-BF16 or AMX): OpenVINO runs %s in fp32", path)
        self.path, self.precision, self._cache_key, self._gate = Path(path), precision, cache_key, gate
        self._model = self._blob = None
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        self._shapes: tuple[tuple[int, ...], ...] | None = None
        self._compiled = self._request = None
        self.from_cache = False
        if weights:
            # run-time LoRA weights: the IR read now and its constants replaced before any compile; such a session
            # bypasses the host cache (its entries hold the artifact's own weights)
            self._cache_key = None
            self._read()
            replace_constants(self._model, weights, self.path)
        if shapes is not None:
            self._compile(tuple(tuple(int(d) for d in shape) for shape in shapes))
        if not self.input_names:
            self._read()

    def _read(self) -> None:
        """Read the IR (the first compile that does not import from the host cache needs it)."""
        try:
            self._model = self._core.read_model(str(self.path))
        except Exception as e:  # OpenVINO raises RuntimeError for a bad or unreadable file
            raise ArtifactError(f"OpenVINO cannot read {self.path}: {e}; rebuild the artifact with `diffc build`") from e
        # the IR's ports carry one name each (build_engine): read them here, since compiling merges inner tensor
        # names into the output ports; the compiled model keeps the ports' order
        self.input_names = [p.get_any_name() for p in self._model.inputs]
        self.output_names = [p.get_any_name() for p in self._model.outputs]

    def _entry_key(self, cache: HostCache, shapes: tuple[tuple[int, ...], ...]) -> str | None:
        if not (self._cache_key and cache.enabled):
            return None
        return cache.key(self._cache_key, [list(s) for s in shapes], sorted(self._config.items()),
                         cpu_signature(self._core), CACHE_LAYOUT)

    def _compile(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        # the old packed weights go before the new ones are made; a failed compile leaves no shapes to match
        self._compiled = self._request = self._shapes = self._blob = None
        self.from_cache = False
        t0 = time.perf_counter()
        cache = HostCache(NAME)
        key = self._entry_key(cache, shapes)
        entry = cache.lookup(key) if key else None
        if entry is not None:
            self._import(entry)
        if self._compiled is None:
            if self._model is None:
                self._read()
            try:
                self._model.reshape(dict(zip(self.input_names, (list(s) for s in shapes))))
            except Exception as e:
                raise InputError(f"{self.path.parent.name}: inputs of shapes {dict(zip(self.input_names, shapes))} "
                                 f"do not fit the graph: {e}") from e
            pending = cache.begin(key, self._gate) if key else None
            # OpenVINO writes the compiled model into the folder as it compiles (streamed to the file; a compiled
            # model's export_model() would hold two copies in memory: +2 GiB for the int8 UNet)
            self._compiled, written = with_fallback(
                lambda: self._compile_model({**self._config, "CACHE_DIR": str(pending.path)}),
                lambda: self._compile_model(self._config), pending, cache)
            if written:
                self._publish(pending)
        self._request = self._compiled.create_infer_request()
        self._shapes = shapes
        dropped = _drop_file_pages(self.path.with_suffix(".bin"))
        if self.from_cache:
            dropped += _drop_file_pages(entry.path / "model.blob")
        log.debug("OpenVINO %s %s (%s) for %s in %.2f s; %.0f MiB of weight pages dropped",
                  "imported" if self.from_cache else "compiled", self.path, self.precision, shapes,
                  time.perf_counter() - t0, dropped / 2**20)

    def _compile_model(self, config: dict[str, Any]):
        try:
            return self._core.compile_model(self._model, "CPU", config)
        except Exception as e:
            raise ArtifactError(f"OpenVINO cannot compile {self.path}: {e}; rebuild the artifact with "
                                "`diffc build`") from e

    def _import(self, entry: Entry) -> None:
        """Import the compiled model of a host cache entry, its blob mapped (copy-on-write: OpenVINO takes a
        writable tensor, and reads its constants in place); an entry OpenVINO cannot import is removed and the
        session compiles instead."""
        ov = _ov()
        try:
            meta = entry.meta
            blob = np.memmap(entry.path / "model.blob", dtype=np.uint8, mode="c", offset=meta["offset"])
            self._compiled = self._core.import_model(ov.Tensor(blob, shared_memory=True), "CPU", self._config)
            inputs, outputs = list(meta["inputs"]), list(meta["outputs"])
        except Exception as e:  # OSError, ValueError, KeyError, OpenVINO's RuntimeError for a blob it cannot import
            entry.discard(str(e))
            self._compiled = None
            return
        self._blob = blob  # the compiled model reads from it: it lives as long as the compiled model
        self.input_names, self.output_names = inputs, outputs
        self.from_cache = True

    def _publish(self, pending: Pending) -> None:
        """Make the folder where OpenVINO wrote the compiled model a host cache entry: the blob renamed, where the
        plugin's part of it starts and the port names recorded (published once the gate opens)."""
        blobs = list(pending.path.glob("*.blob"))
        offset = _plugin_offset(blobs[0]) if len(blobs) == 1 else None
        if offset is None:
            log.warning("OpenVINO %s wrote %s, not one compiled blob diffc can read; %s is not cached", version(),
                        sorted(p.name for p in pending.path.iterdir()), self.path)
            pending.discard()
            return
        try:
            blobs[0].rename(pending.path / "model.blob")
        except OSError as e:
            pending.discard()
            pending.cache.unwritable(e)
            return
        pending.finish({"inputs": self.input_names, "outputs": self.output_names, "offset": offset,
                        "cpu": cpu_signature(self._core)})

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        check_feeds(self.input_names, feeds)
        arrays = [np.ascontiguousarray(feeds[n]) for n in self.input_names]
        shapes = tuple(a.shape for a in arrays)
        if shapes != self._shapes:
            self._compile(shapes)
        self._request.infer(arrays)
        # the request's output buffers are reused by the next run: copy what is returned
        return {n: self._request.get_output_tensor(self.output_names.index(n)).data.copy()
                for n in outputs or self.output_names}


class OpenVINOBackend:
    """The OpenVINO CPU backend behind :class:`diffc.engines.Backend`."""

    name = NAME
    #: OpenVINO fuses MatMul-Softmax-MatMul attention itself (its CPU plugin's scaled-dot-product subgraph) and runs
    #: the InstanceNormalization form of GroupNorm as one MVN; it knows no onnxruntime contrib ops
    pass_defaults = MappingProxyType({"attention": "none", "groupnorm": "instance_norm", "layernorm": True,
                                      "gelu": True, "quick_gelu": False, "disable": ()})
    #: OpenVINO compiles without the GIL and largely on one core: two components at a time (SD-1.5 int8 + cache
    #: reuse on 2 cores: 8.8 s for the four instead of 11.6 one after another)
    parallel_open = True
    #: models compiled for the default shapes are kept per host: worth making at build time
    warm_host_cache = True
    runs_on_build_host = True
    contrib_ops = False
    rmsnorm_op = False
    #: diffc quantizes for it with symmetric int8 activations (no zero points)
    int8_activations = ("int8",)
    fp8_kernels = False
    #: Q/DQ on the inputs only, float bias (the output Q/DQ and int32 bias are onnxruntime's QLinearConv form)
    qdq_form = MappingProxyType({"output_qdq": False, "int32_bias": False})
    runs_on_gpu = False
    tensorrt_options = False
    #: OpenVINO compiles every engine for fixed shapes at load: the head / tail pair is not tested with it yet
    step_cache_split = False
    describe_build = staticmethod(plain_description)
    #: sessions open with replaced IR constants (``open_session(..., weights=)``): run-time LoRAs
    replaces_weights = True

    def available(self) -> str | None:
        return available()

    def version(self) -> str:
        return version()

    def tolerance(self, precision: str) -> float:
        # bf16 compute (fp16-stored weights) on the CPUs that have it: 2.2-2.4% on SD-1.5's VAE decoder
        return {"fp32": 1e-4, "bf16": 3e-2, "int8": 0.1}.get(precision, 0.0)

    def check_profile(self, profile, graphs=None) -> None:
        if available() is None:
            raise BackendUnavailableError(f"profile {profile.name!r} builds for OpenVINO, which is not installed; "
                                          f"install it with {EXTRA}")
        for comp, prec in profile.precision.items():
            if prec.value not in PRECISIONS:
                raise BackendUnavailableError(
                    f"profile {profile.name!r} asks for {prec.value} ({comp}); the openvino backend builds "
                    f"{', '.join(PRECISIONS)} (int8: the denoiser and VAE decoder, cpu-openvino-int8)")

    def build_engine(self, component: str, onnx_path: Path, artifact: Path, *, profile, shape_ranges,
                     no_cache: bool = False) -> BuiltEngine:
        precision = profile.precision_of(component).value
        info = build_engine(onnx_path, Path(artifact) / component / ENGINE_FILE, precision=precision)
        # the IR's ports keep the graph's names (build_engine), so the manifest's I/O is the graph's
        return component_entry(Path(artifact), component, info["files"], backend=NAME,
                               backend_version=info["backend_version"], precision=precision,
                               io=engine_io(onnx_path), shape_ranges=shape_ranges)

    def build_engine_group(self, graphs, artifact: Path, folder: str, *, profile, shape_ranges,
                           no_cache: bool = False) -> dict[str, BuiltEngine]:
        """Each graph on its own (``<component>/model.xml``): OpenVINO IR has no weights file two graphs share."""
        return {name: self.build_engine(name, Path(p), artifact, profile=profile, shape_ranges=shape_ranges[name])
                for name, p in graphs.items()}

    @staticmethod
    def weight_tensors(path: Path, artifact: Path):
        """The IR's float weights and where they lie (:func:`ir_weight_tensors`); build time."""
        return ir_weight_tensors(path, artifact)

    def open_session(self, name: str, component, path: Path, options: SessionOptions,
                     weights: dict[str, np.ndarray] | None = None) -> Session:
        """``weights``: constants to replace (layer name -> fp32 value), see :class:`Session`."""
        return Session(path, precision=component["precision"], threads=options.threads,
                       shapes=opt_shapes(component, options.dims), cache_key=options.cache_key, gate=options.gate,
                       weights=weights)


BACKEND = register(OpenVINOBackend())


def _plugin_offset(blob: Path) -> int | None:
    """Where the CPU plugin's exported model starts in a blob of OpenVINO's model cache: after the header
    OpenVINO's core writes in front of it (``<?xml ...?><compiled_blob ... header_size_alignment="0"/>`` and a
    newline), which ``Core.import_model`` does not read. None for a header of another layout (an aligned one,
    or a future format): the blob is then not cached."""
    with open(blob, "rb") as f:
        head = f.read(1 << 16)
    start = head.find(b"<compiled_blob ")
    end = head.find(b"/>", start) if head.startswith(b"<?xml") and start >= 0 else -1
    if end < 0 or b'header_size_alignment="0"' not in head[start:end]:
        return None
    end += 2
    return end + 1 if head[end:end + 1] == b"\n" else end


#: madvise(2) advice that unmaps a range's pages from this process (Linux); file pages are read again on access
_MADV_DONTNEED = 4


def _file_mappings(path: Path) -> list[tuple[int, int, str, int]]:
    """This process's mappings of ``path``: (start, end, permissions, bytes of anonymous pages: those written
    through a private mapping, copies that the file does not hold), from ``/proc/self/smaps`` (Linux; empty
    elsewhere). (Not ``Private_Dirty``: that also counts file pages dirty in the page cache, as a blob this
    process has just written is.)"""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    target = str(path.resolve())
    found: list[list] = []
    current = None
    for line in lines:
        fields = line.split(maxsplit=5)
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            start, end = (int(x, 16) for x in fields[0].split("-"))
            current = [start, end, fields[1], 0] if len(fields) == 6 and fields[5] == target else None
            if current is not None:
                found.append(current)
        elif current is not None and fields and fields[0] == "Anonymous:":
            current[3] = int(fields[1]) * 1024
    return [tuple(m) for m in found]


def _drop_file_pages(path: Path) -> int:
    """Drop the pages of ``path``'s mappings from this process's resident memory; returns the bytes of mapping
    advised. OpenVINO maps the IR's weights file and keeps the mapping after the plugin has packed its own copy
    of the weights, so every weight page it read while compiling stayed resident twice (the SD-1.5 UNet:
    1.66 GiB of file pages beside 1.85 GiB for the compiled model); an imported blob is mapped the same way. A
    mapping holds nothing that the file does not while none of its pages was written (read-only, or private
    without anonymous pages: the copy-on-write mapping of an imported blob), so its pages can go; should
    OpenVINO read them again they are read back from the file. A mapping with written pages is left alone.
    Linux only (``/proc/self/smaps``); elsewhere nothing is done."""
    import ctypes

    mappings = _file_mappings(path)
    if not mappings:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for start, end, perms, written in mappings:
        if "w" in perms and (perms.endswith("s") or written):
            continue
        if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
            dropped += end - start
        else:
            log.debug("madvise on %s failed: errno %d", path, ctypes.get_errno())
    return dropped
