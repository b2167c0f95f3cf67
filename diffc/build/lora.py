"""Stage ``lora``: the ``--lora`` files checked before any work, and the artifact's LoRA records.

Two things go into the manifest (docs/lora.md):

``loras``
    each LoRA fused at build time: ``{name, sha256, scale}``, in the order they were fused.
``lora_targets``
    for every Linear / Conv weight of the denoiser and text encoders (what the LoRA layouts address), which
    initializer of which FINAL engine graph holds it and whether transposed, so the runtime can replace exactly
    those tensors (:mod:`diffc.runtime.lora`). The exporter names MatMul weights ``onnx::MatMul_123`` and the
    passes and onnxruntime's optimizer may fold or rename them, so the match is by value: the fingerprint of
    each module's fp32 weight (and of its transpose) against every fp32 initializer of the built graphs. A
    weight found nowhere (folded into another tensor, quantized) is recorded with no location, and a LoRA
    that touches it at run time is refused with a message saying to fuse it at build time instead.

Only backends that can open an engine with replaced weights (``replaces_weights``: onnxruntime, and OpenVINO,
whose IR constants are matched as fp16 when the IR stores them so) get locations, read by the backend's
``weight_tensors``; the check of the files happens before the export so a bad LoRA costs a second, not a build.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from diffc.runtime.lora import LoraSpec, read_lora, specs

log = logging.getLogger("diffc.build")


def check(loras: Any) -> list[LoraSpec]:
    """``loras`` as :func:`diffc.build` takes them (``[(file, scale)]``, ``{file: scale}`` or ``"FILE[:SCALE]"``
    strings) -> checked specs; every file is parsed (corrupt, truncated, unknown layout: a LoraError now)."""
    out = specs(loras)
    for lora in out:
        read_lora(lora)
    return out


def _graph_prints(backend, path: Path, artifact: Path) -> dict[str, dict[str, Any]]:
    """fingerprint -> location record of every weight the built engine at ``path`` holds
    (``backend.weight_tensors``); the first of identical tensors wins."""
    from diffc.exporter.lora import fingerprint

    out: dict[str, dict[str, Any]] = {}
    for array, record in backend.weight_tensors(path, artifact):
        out.setdefault(fingerprint(array), record)
    return out


def targets(pipe, components: dict[str, Any], artifact: Path, prints=None) -> dict[str, Any] | None:
    """The manifest's ``lora_targets`` for the built engines ``components`` (name -> manifest entry); None when
    no engine's backend can take replaced weights (the runtime then says to fuse LoRAs at build). ``prints``:
    the pipeline's weight fingerprints taken before its modules were dropped (else taken from ``pipe``)."""
    from diffc.engines import get_backend
    from diffc.exporter.lora import weight_fingerprints
    from diffc.runtime.manifest import artifact_path

    replaceable = [e for e, entry in components.items()
                   if getattr(get_backend(entry["backend"]), "replaces_weights", False)]
    if not replaceable:
        return None
    records, by_print = prints if prints is not None else weight_fingerprints(pipe)
    for engine in replaceable:
        entry = components[engine]
        backend = get_backend(entry["backend"])
        for digest, where in _graph_prints(backend, artifact_path(artifact, entry["file"]), artifact).items():
            owners = by_print.get(digest, [])
            if len(owners) != 1:
                # identical weights in two modules: replacing the one initializer would change both
                for comp, name, _ in owners:
                    records[comp][name]["why"] = "its weight is identical to another module's and shared with it"
                continue
            comp, name, transposed = owners[0]
            records[comp][name]["at"].append({"component": engine, "transposed": transposed, **where})
    for comp_mods in records.values():
        for rec in comp_mods.values():
            if "why" in rec:
                rec["at"] = []
            elif not rec["at"]:
                rec["why"] = ("its fp32 weight is in no engine graph that can take replaced weights: quantized, "
                              "folded into another tensor, or built for a backend that cannot replace weights")
    found = sum(1 for c in records.values() for r in c.values() if r["at"])
    total = sum(len(c) for c in records.values())
    log.info("LoRA targets: %d of %d weights addressable in the engines", found, total)
    return {"fingerprint": "sha1-fp32", "modules": records}


def record(manifest, exported, components: dict[str, Any], artifact: Path, loras: list[LoraSpec]) -> None:
    """Fill the manifest's ``loras`` and ``lora_targets`` (called once the engines are in ``artifact``)."""
    manifest.loras = [lo.record() for lo in loras] or None
    manifest.lora_targets = targets(exported.pipe, components, artifact, prints=exported.weight_prints)
