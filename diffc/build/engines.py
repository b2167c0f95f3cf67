"""Stage 6, engines: each passed (or quantized) graph -> the target backend's engine in the artifact folder.

Each component is built for the shape ranges the loop will feed it (:func:`diffc.build.plan.shape_ranges`) by
the profile's backend (:func:`diffc.engines.get_backend`), which returns its manifest entry (files with their
sha256, backend and version, precision, inputs and outputs, shape ranges). Graphs cut from one model (the
cache-reuse UNet pair) are built as a group, so a backend can share their weights. Afterwards this host's
engine cache is filled, so the first ``diffc run`` here starts as fast as later ones.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from diffc.build.export import Exported
from diffc.build.plan import shape_ranges
from diffc.engines import BuiltEngine, get_backend
from diffc.profiles import Profile
from diffc.names import base_component

log = logging.getLogger("diffc.build")


def build(exported: Exported, profile: Profile, graphs: dict[str, Path], names: list[str], artifact: Path,
          report: dict[str, Any], *, no_cache: bool, progress: bool) -> dict[str, Any]:
    """Build the engines of ``names`` (each from ``graphs[name]``) into ``artifact``; returns the manifest's
    ``components``. Adds each component's engine report and export parity to ``report["components"]`` and
    ``timings.engines_s``."""
    backend = get_backend(profile.backend)
    # what only the graphs tell (TensorRT int8 / fp8 need Q/DQ): refuse before the first engine, not after
    backend.check_profile(profile, graphs)
    cache = exported.cache
    t0 = time.perf_counter()
    ranges = {name: shape_ranges(name, profile, exported.geometry, cfg=exported.cfg,
                                 feature_level=cache["level"] if cache else None) for name in names}
    built: dict[str, BuiltEngine] = {}
    if cache is not None:
        group = {"unet": graphs["unet"], "unet_shallow": graphs["unet_shallow"]}
        built.update(backend.build_engine_group(group, artifact, "unet", profile=profile,
                                                shape_ranges={n: ranges[n] for n in group}, no_cache=no_cache))
    if exported.step_marks:  # the whole denoiser, its head and tail: one weights file (diffc.build.step_cache)
        d = exported.denoiser
        group = {n: graphs[n] for n in (d, f"{d}_head", f"{d}_tail")}
        built.update(backend.build_engine_group(group, artifact, d, profile=profile,
                                                shape_ranges={n: ranges[n] for n in group}, no_cache=no_cache))
    components: dict[str, Any] = {}
    for name in tqdm(names, desc="engines", unit="component", disable=not progress):
        engine = built.get(name) or backend.build_engine(name, graphs[name], artifact, profile=profile,
                                                         shape_ranges=ranges[name], no_cache=no_cache)
        components[name] = engine.manifest
        parity = exported.report["components"][base_component(name)]
        report["components"].setdefault(name, {}).update(
            parity={k: parity[k] for k in ("max_abs_err", "rel_l2", "passed")}, **engine.report)
    report["timings"]["engines_s"] = round(time.perf_counter() - t0, 3)
    return components


def warm_host_cache(profile: Profile, artifact: Path, components: dict[str, Any], report: dict[str, Any]) -> None:
    """Fill this host's engine cache now, so the first ``diffc run`` here starts as fast as later ones."""
    if not get_backend(profile.backend).warm_host_cache:
        return
    from diffc.runtime.pipeline import open_sessions

    t0 = time.perf_counter()
    open_sessions(artifact, {"components": components, "text_encoders": []}, verify=False)
    report["timings"]["host_cache_s"] = round(time.perf_counter() - t0, 3)
