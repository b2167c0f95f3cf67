"""The build's part of dynamic step caching (``[savings.step_cache]``): what it refuses, the head / tail cut of the
denoiser with its parity check, and the manifest's ``savings.step_cache`` entry.

The denoiser is exported with its first block's results marked as outputs (diffc.exporter.step_marks), passed
like any graph, then cut by :func:`diffc.passes.step_cache.split` into the whole denoiser (marks dropped: what a
call without the step cache runs), the head and the tail. The three are built as one engine group, so they share
one weights file (``<denoiser>/weights.data``) as the cache-reuse pair does. The cut is checked before anything
ships: head + tail must give the whole denoiser's output on the export's sample inputs, else :class:`ParityError`.

Torch-free; the parity check runs the passed graphs in onnxruntime.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffc.engines import backend_names, get_backend
from diffc.errors import ParityError, ProfileError
from diffc.profiles import Profile

log = logging.getLogger("diffc.build")


def enabled(profile: Profile) -> bool:
    savings = getattr(profile, "savings", None)
    return bool(savings is not None and savings.step_cache)


def check(profile: Profile, denoiser: str = "unet") -> None:
    """Refuse, before any export, what the step cache does not combine with (each with its reason)."""
    if not enabled(profile):
        return
    where = f"profile {profile.name!r}: [savings.step_cache]"
    if profile.cache.enabled:
        raise ProfileError(f"{where} does not combine with [cache] (DeepCache reuse): both replace the whole UNet on "
                           "some steps by a cheaper graph, by different rules, and their cuts (after the first down "
                           "block; before an up layer) would need a third graph per step kind. Use one of them")
    # which backends the head / tail pair is built and tested for is theirs to say (``step_cache_split``):
    # OpenVINO compiles every engine for fixed shapes at load, TensorRT needs shape profiles for the cut tensors
    if not get_backend(profile.backend).step_cache_split:
        split_on = ", ".join(n for n in backend_names() if get_backend(n).step_cache_split)
        raise ProfileError(f"{where} is built for {split_on} only (the head / tail pair is not tested on "
                           f"{profile.backend.value}); use a profile for one of them, such as cpu-fp32")
    quantized = profile.quantized_components(("unet", "transformer"))
    if quantized:
        raise ProfileError(f"{where} does not combine with int8 / fp8 denoisers yet: the quantizer calibrates and "
                           "gates the whole denoiser, not the head and tail the step cache runs; set "
                           "[precision].unet to a float precision or leave the step cache out")


def components(names: list[str], denoiser: str) -> list[str]:
    """``names`` with the head and tail right after the denoiser."""
    at = names.index(denoiser) + 1
    return [*names[:at], f"{denoiser}_head", f"{denoiser}_tail", *names[at:]]


def split(exported: Any, marked: Any, dest: Path, denoiser: str) -> dict[str, Any]:
    """Cut the passed, step-marked denoiser ``marked`` (the ``ir.Model`` the graph passes ran on; not modified)
    into ``dest/<denoiser>_step_cache/{full,head,tail}``, and check head + tail against the whole graph on the
    export's sample inputs. Returns the split's report entry (``graphs``: the three files; ``seconds``)."""
    from diffc.build.passes import cpu_sessions
    from diffc.exporter import pipeline_data
    from diffc.onnx_io import save_ir_model
    from diffc.passes.step_cache import split as cut

    t0 = time.perf_counter()
    full, head, tail, rep = cut(marked)
    # beside the marked graph, whose weights file the three may still read from (onnx_ir loads them lazily)
    paths = {key: save_ir_model(model, dest / f"{denoiser}_step_cache" / key / "model.onnx")
             for key, model in (("full", full), ("head", head), ("tail", tail))}
    del full, head, tail
    rep["graphs"] = {k: str(p) for k, p in paths.items()}
    sess = cpu_sessions(paths)
    atol = pipeline_data.contract_atol(exported.pipe, denoiser)
    worst = 0.0
    for feeds in pipeline_data.sample_feeds(exported.pipe, denoiser):
        whole = sess["full"].run(["out_sample"], feeds)[0]
        marks = dict(zip(rep["head_outputs"], sess["head"].run(rep["head_outputs"], feeds)))
        got = sess["tail"].run(["out_sample"], {**feeds, **{k: marks[k] for k in rep["tail_inputs"]}})[0]
        worst = max(worst, float(np.abs(whole.astype(np.float64) - got).max()))
    rep["tail_check"] = {"max_abs_err": worst, "passed": worst <= atol}
    if worst > atol:
        raise ParityError(f"the {denoiser}'s head + tail (dynamic step cache) differ from the whole {denoiser} by "
                          f"{worst:.3g} on the same inputs; the cut is wrong. Build without [savings.step_cache] and "
                          "report the model config")
    rep["seconds"] = round(time.perf_counter() - t0, 4)
    log.info("step cache: head %d nodes of %d (%.0f %%), head + tail within %.3g of the whole %s",
             rep["nodes"]["head"], rep["nodes"]["full"], 100 * rep["head_fraction"], worst, denoiser)
    return rep


def manifest_entry(profile: Profile, report: dict[str, Any], denoiser: str) -> dict[str, Any]:
    """The manifest's ``savings.step_cache``: the two components, the compared tensor, the tensors the tail takes
    from the head (``cut``), the rule (``metric``, ``threshold``) and the head's share of the denoiser's nodes."""
    rep = report["components"][denoiser]["step_cache_split"]
    table = profile.savings.step_cache
    return {"head_component": f"{denoiser}_head", "tail_component": f"{denoiser}_tail",
            "decision": "step_cache_decision", "cut": list(rep["tail_inputs"]),
            "metric": table.get("metric", "rel_l1"), "threshold": float(table["threshold"]),
            "head_fraction": rep["head_fraction"]}
