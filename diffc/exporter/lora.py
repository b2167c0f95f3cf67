"""LoRAs at build time: check the model folder, fuse ``--lora`` files into the pipeline, fingerprint its weights.

Fusing uses diffusers itself (``load_lora_weights`` converts the kohya / A1111 layouts; ``fuse_lora`` then
``unload_lora_weights`` leaves plain modules holding ``W + scale * delta``), so the exported graphs carry what
diffusers would run. Each file is first parsed by the runtime's torch-free reader (:mod:`diffc.runtime.lora`)
and checked against the pipeline's module shapes, and after fusing every touched weight is compared with the
reader's own ``W + scale * delta``: a LoRA that diffusers applies differently from the run-time swap (or
silently skips, as it does for some old-format keys) fails the build instead of shipping an artifact whose
build-time and run-time LoRAs disagree.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from diffc.errors import ModelError
from diffc.runtime.lora import LoraError, LoraSpec, normalize_module, read_lora, resolve

log = logging.getLogger("diffc.export")

#: the pipeline attributes whose Linear / Conv weights a LoRA may address
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
#: keys peft leaves in a saved state dict while an adapter is loaded but not fused
_UNFUSED_MARKS = (".base_layer.", ".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.")
#: fused weights must equal the runtime reader's ``W + scale * delta`` this closely (fp32 rounding of the sum)
FUSE_ATOL = 1e-4


def check_folder(folder: Path, loras: Sequence[LoraSpec]) -> None:
    """Before loading: a component saved with an unfused adapter is a ModelError (diffusers would load it into
    meta tensors and the export would fail much later); a stray ``*lora*.safetensors`` that was not passed
    with ``--lora`` gets a warning (it would otherwise be ignored without a word)."""
    from safetensors import safe_open

    folder = Path(folder)
    given = {lo.path.resolve() for lo in loras}
    for comp in LORA_COMPONENTS:
        for weights in sorted((folder / comp).glob("*.safetensors")):
            try:
                with safe_open(str(weights), framework="np") as f:
                    bad = next((k for k in f.keys() if any(m in k for m in _UNFUSED_MARKS)), None)
            except Exception:  # noqa: BLE001 - a broken weights file is diffusers' to report, with its own words
                continue
            if bad is not None:
                raise ModelError(
                    f"{weights.relative_to(folder)} holds an unfused LoRA adapter (key {bad!r}): the pipeline was "
                    "saved after load_lora_weights() without fuse_lora(). Save the base model without the adapter "
                    "and pass the LoRA file with `diffc build MODEL --lora FILE[:SCALE]` (or fuse_lora() + "
                    "unload_lora_weights() before save_pretrained())")
    stray = [p for p in sorted(folder.rglob("*.safetensors"))
             if "lora" in p.name.lower() and p.resolve() not in given]
    for p in stray:
        log.warning("%s looks like a LoRA but is not applied: diffc builds only what --lora names; pass it with "
                    "`diffc build MODEL --lora %s[:SCALE]` (or move it out of the model folder)", p.relative_to(folder),
                    p)


def weight_modules(pipe) -> dict[str, dict[str, Any]]:
    """component -> module name (normalized as :func:`~diffc.runtime.lora.normalize_module`) -> its Linear /
    Conv2d module, for every component a LoRA may address."""
    out: dict[str, dict[str, Any]] = {}
    for comp in LORA_COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        out[comp] = {normalize_module(comp, name): m for name, m in model.named_modules()
                     if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    return out


def _shapes(modules: dict[str, dict[str, Any]]) -> dict[str, dict[str, tuple[int, ...]]]:
    return {c: {n: tuple(m.weight.shape) for n, m in ms.items()} for c, ms in modules.items()}


def fuse(pipe, loras: Sequence[LoraSpec]) -> None:
    """Fuse each LoRA into ``pipe`` at its scale (one after another, as diffusers sums them), then check every
    touched weight against the torch-free reader. Nothing is loaded into ``pipe`` before every file has been
    parsed and matched against the model's shapes, so a bad LoRA leaves the pipeline as it was."""
    if not loras:
        return
    modules = weight_modules(pipe)
    shapes = _shapes(modules)
    plans = [(lora, resolve(read_lora(lora), shapes)) for lora in loras]
    expected: dict[tuple[str, str], np.ndarray] = {}
    for lora, factors in plans:
        for (comp, name), factor in factors.items():
            if (comp, name) not in expected:
                expected[(comp, name)] = modules[comp][name].weight.detach().float().numpy().copy()
            expected[(comp, name)] += np.float32(lora.scale) * factor.delta(shapes[comp][name])
    from diffusers.utils import logging as diffusers_logging

    # diffusers logs a notice for every component a LoRA leaves alone ("No LoRA keys associated to
    # CLIPTextModel ..."): normal for a UNet-only LoRA, and the check below is what says whether it applied
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        for i, (lora, _) in enumerate(plans):
            adapter = f"diffc_lora_{i}"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pipe.load_lora_weights(str(lora.path), adapter_name=adapter)
                    pipe.fuse_lora(lora_scale=lora.scale, adapter_names=[adapter])
                    pipe.unload_lora_weights()
            except Exception as e:  # diffusers / peft raise many types for a LoRA they cannot place
                raise LoraError(f"diffusers could not apply LoRA {lora.name}: {e}; check that it was trained for "
                                "this model") from e
            log.info("fused LoRA %s at scale %g", lora.name, lora.scale)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    modules = weight_modules(pipe)
    for (comp, name), want in expected.items():
        got = modules[comp][name].weight.detach().float().numpy()
        err = float(np.abs(got - want).max())
        if not err <= FUSE_ATOL * max(1.0, float(np.abs(want).max())):
            raise LoraError(f"diffusers fused {comp}.{name} differently from diffc's LoRA reader (max difference "
                            f"{err:.3g}); the LoRA's key layout is read two ways. Convert it to the peft layout "
                            "('<module>.lora_A.weight' / '.lora_B.weight') and build again")


def fingerprint(array: np.ndarray) -> str:
    """The identity of a weight by value: sha1 of its fp32 bytes, C order."""
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def weight_fingerprints(pipe) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, list[tuple]]]:
    """The weights a LoRA may touch, as the artifact's graphs hold them: (component -> module -> {shape}, and
    fingerprint -> [(component, module, transposed)]). A Linear's weight ``(out, in)`` may sit in a graph as is
    (Gemm) or transposed (the torchscript exporter's MatMul); a Conv's ``(out, in, kh, kw)`` as is, or as a
    transposed ``(in, out)`` matrix when a pass turned a 1x1 convolution into a MatMul. Each weight is also
    printed rounded to fp16 (read back as fp32), as an engine that stores fp16 weights holds it (OpenVINO's
    compressed IR for bf16 components)."""
    records: dict[str, dict[str, dict[str, Any]]] = {}
    by_print: dict[str, list[tuple]] = {}
    for comp, mods in weight_modules(pipe).items():
        for name, m in mods.items():
            w32 = m.weight.detach().float().numpy()
            records.setdefault(comp, {})[name] = {"shape": list(w32.shape), "at": []}
            for w in (w32, w32.astype(np.float16).astype(np.float32)):
                for owner, value in (((comp, name, False), w), ((comp, name, True), w.reshape(w.shape[0], -1).T)):
                    owners = by_print.setdefault(fingerprint(value), [])
                    if owner not in owners:  # a weight fp16 holds exactly prints the same both ways
                        owners.append(owner)
    return records, by_print
