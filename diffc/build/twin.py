"""Stage 4 (gated profiles only: :func:`diffc.build.plan.gated`), the fp32 twin: the artifact as ``cpu-fp32``
would build it, in the work folder.

Calibration (quantized profiles) runs the twin's sampling loop to record the ranges Q/DQ is inserted with, and
the quality gate compares the artifact's images with the twin's (quantized profiles, and the bf16 ``cpu``).
The twin has the profile's shapes, sampler, guidance and cache reuse, on onnxruntime in fp32 with its default
passes. It is assembled from this build's own export
(no second export, no second pipeline load) and, when its pass list is the profile's (an onnxruntime int8
profile), from this build's passed graphs too: those were already checked against PyTorch.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from diffc.build import engines, manifest, passes, tokenizers
from diffc.build.export import Exported
from diffc.build.plan import build_components
from diffc.profiles import Profile
from diffc.profiles.schema import Backend, MemoryBudget, Precision, TensorRTOptions

log = logging.getLogger("diffc.build")


def reference_profile(profile: Profile) -> Profile:
    """The fp32 onnxruntime twin of ``profile``: same shapes, sampler, guidance and cache reuse, what
    calibration runs and the gate compares against."""
    return dataclasses.replace(profile, name=f"{profile.name}-fp32-reference", backend=Backend.ONNXRUNTIME,
                               precision={"default": Precision.FP32}, passes={}, tensorrt=TensorRTOptions(),
                               memory=MemoryBudget())


def build(exported: Exported, profile: Profile, graphs: dict[str, Path], report: dict[str, Any], work: Path, *,
          exporter: str, verify_passes: bool, progress: bool) -> Path:
    """Assemble the twin of ``profile`` at ``work/reference.diffc`` from ``exported`` (and from ``graphs``, this
    build's passed graphs, when the twin's pass list is the same). Records ``reference_build`` in ``report``;
    returns the twin's folder."""
    log.info("building the fp32 reference artifact for calibration and the quality gate")
    t_start = time.perf_counter()
    twin = reference_profile(profile)
    twin_report: dict[str, Any] = {"profile": twin.name, "components": {}, "timings": {}}
    reused = passes.graph_pass_order(twin) == passes.graph_pass_order(profile)
    if reused:
        log.info("graph passes: reusing this build's passed graphs")
        for name in exported.components:
            twin_report["components"][name] = {k: v for k, v in report["components"][name].items()
                                               if k in ("passes", "parity_after_passes", "cache_split")}
        twin_graphs = dict(graphs)
    else:
        twin_graphs = passes.run(exported, twin, work / "reference-passed", twin_report, verify=verify_passes,
                                 progress=progress)
    twin_report["pass_order"] = passes.pass_order(twin)
    artifact = work / "reference.diffc"
    artifact.mkdir()
    components = engines.build(exported, twin, twin_graphs, build_components(exported.components, exported.cache),
                               artifact, twin_report, no_cache=False, progress=progress)
    encoders = tokenizers.write(exported, artifact)
    manifest.compose(exported, twin, components, encoders, twin_report, exporter=exporter).write(artifact)
    twin_report["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
    report["reference_build"] = {"passes_reused": reused, "timings": twin_report["timings"]}
    return artifact
