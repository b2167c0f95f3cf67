"""Stage 3, passes: the profile's ordered graph passes over each exported component, then parity again.

The passed graph is what ships, so it is checked against PyTorch once more, at the export's two sample shapes:
a pass that changes the numbers fails the build naming the passes that fired. With cache reuse, the UNet
(exported with its cache-branch features as outputs) is then cut into the full and the shallow graph, and
the cut is checked: the shallow graph fed the full graph's feature must give the full graph's output.

Each component is one ``onnx_ir`` model from load to save: the graph passes run on it in place
(:func:`diffc.passes.run_pass_list`), the stage passes that cut it (``cache_split``) take it as it is, and
each graph is written once (:func:`diffc.onnx_io.save_ir_model`) -- no protobuf round trip between passes. A
stage pass is recorded in the component's pass list like a graph pass: name, rewrite counts, seconds.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from diffc.build import memory
from diffc.build.export import Exported
from diffc.errors import ParityError
from diffc.onnx_io import save_ir_model
from diffc.passes import pass_list, profile_pass_list, run_pass_list
from diffc.profiles import Profile
from diffc.exporter.unet_blocks import feature_dims

log = logging.getLogger("diffc.build")


def pass_order(profile: Profile) -> list[dict[str, Any]]:
    """Every pass the profile's build runs, in order, as the build report and the manifest record it (the
    graph passes, then the stage passes ``cache_split`` and ``quantize`` when the profile asks for them)."""
    return [spec.to_dict() for spec in profile_pass_list(profile)]


def graph_pass_order(profile: Profile) -> list[dict[str, Any]]:
    """The graph passes alone (what :func:`run` runs on every component)."""
    return [spec.to_dict() for spec in pass_list(profile.backend.value, **profile.passes)]


def run(exported: Exported, profile: Profile, dest: Path, report: dict[str, Any], *, verify: bool,
        progress: bool) -> dict[str, Path]:
    """Run the profile's passes over every exported component into ``dest/<component>/model.onnx``, check each
    against PyTorch, split the UNet when the profile reuses the cache. Fills ``report["components"]`` and
    ``timings.passes_s``; returns the passed graph of every component to build (``unet_shallow`` included)."""
    from diffc.exporter.contracts import get_contract
    from diffc.exporter.export import check_parity, component_module, sample_shapes, worst_parity

    t0 = time.perf_counter()
    pipe, cache = exported.pipe, exported.cache
    graphs: dict[str, Path] = {}
    for name in tqdm(exported.components, desc="passes", unit="component", disable=not progress):
        model = ir.load(exported.onnx_dir / name / "model.onnx")
        pass_report = run_pass_list(model, name, profile.backend.value, verify=verify, **profile.passes)
        marked = cache is not None and name == "unet"
        # the cache-marked UNet in a folder of its own: the split writes the full graph at dest/unet, and reads
        # the marked graph's weights (lazily) while it does
        passed = save_ir_model(model, dest / (f"{name}_marked" if marked else name) / "model.onnx")
        del model  # the parity session below reads the saved graph; a split reads it back lazily (mmap'd weights)
        memory.release()
        module = component_module(pipe, name)
        step_marked = exported.step_marks and name == exported.denoiser  # diffc.build.step_cache
        contract = get_contract(name, module, **({"cache_marks": True} if marked else {}),
                                **({"step_marks": True} if step_marked else {}))
        after = worst_parity(check_parity(module, contract, passed, sample_shapes(pipe, name)))
        report["components"][name] = {"passes": pass_report, "parity_after_passes": after}
        if not after["passed"]:
            fired = [p["name"] for p in pass_report["passes"] if p["modified"]]
            raise ParityError(
                f"{name} differs from PyTorch after the graph passes (max_abs_err={after['max_abs_err']:.3g}, "
                f"rel_l2={after['rel_l2']:.3g}); passes that changed it: {fired}. Leave them out with "
                "[passes].disable in the profile, and report the model config")
        graphs[name] = passed
        if marked:
            split = split_cache(exported, ir.load(passed), dest)
            report["components"][name]["cache_split"] = split
            pass_report["passes"].append(stage_pass_entry("cache_split", split, ("full", "shallow")))
            graphs.update(unet=dest / "unet" / "model.onnx", unet_shallow=dest / "unet_shallow" / "model.onnx")
            shutil.rmtree(passed.parent)  # the two graphs hold every weight they read from it
        if step_marked:  # the whole denoiser, its head and its tail (diffc.build.step_cache)
            from diffc.build import step_cache

            split = step_cache.split(exported, ir.load(passed), dest, name)
            report["components"][name]["step_cache_split"] = split
            pass_report["passes"].append(stage_pass_entry("step_cache_split", split, ("full", "head", "tail")))
            graphs.update({name: Path(split["graphs"]["full"]), f"{name}_head": Path(split["graphs"]["head"]),
                           f"{name}_tail": Path(split["graphs"]["tail"])})
    report["timings"]["passes_s"] = round(time.perf_counter() - t0, 3)
    return graphs


def stage_pass_entry(name: str, split: dict[str, Any], parts: tuple[str, ...]) -> dict[str, Any]:
    """The pass-list record of a stage pass that cut one model into ``parts`` (each cut by its own pass, whose
    counts ``split[part]`` holds): the rewrites of every part added up, ``modified`` when any fired."""
    fired: dict[str, int] = {}
    for part in parts:
        for key, count in split[part].items():
            fired[key] = fired.get(key, 0) + int(count)
    return {"name": name, "fired": fired, "modified": any(v > 0 for v in fired.values()), "seconds": split["seconds"]}


def cpu_sessions(paths: dict[str, Path]) -> dict[str, Any]:
    """onnxruntime CPU sessions (warnings only) over the graphs a split wrote, to check the cut against the whole."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}


def split_cache(exported: Exported, marked: ir.Model, dest: Path) -> dict[str, Any]:
    """Split the passed, cache-marked UNet ``marked`` (the model the graph passes ran on; not modified) into
    ``dest/unet`` (full) and ``dest/unet_shallow``, and check the cut on the export's sample inputs. Returns the
    split's report entry: the two passes' counts (``full``, ``shallow``), node counts, the check, ``seconds``."""
    from diffc.exporter import pipeline_data
    from diffc.passes.cache_reuse import split

    t0 = time.perf_counter()
    cache = exported.cache
    full, shallow, rep = split(marked, cache["branch"], dims=("batch", None, *feature_dims(cache["level"])))
    paths = {"full": save_ir_model(full, dest / "unet" / "model.onnx"),
             "shallow": save_ir_model(shallow, dest / "unet_shallow" / "model.onnx")}
    del full, shallow, marked
    atol = pipeline_data.contract_atol(exported.pipe, "unet", cache_marks=True)
    all_feeds = pipeline_data.sample_feeds(exported.pipe, "unet", cache_marks=True)
    # one session at a time: the full graph's outputs first, then the shallow graph on its features (two
    # sessions at once held the UNet's weights twice)
    full_session = cpu_sessions({"full": paths["full"]})["full"]
    results = [full_session.run(["out_sample", cache["feature"]], feeds) for feeds in all_feeds]
    del full_session
    memory.release()
    shallow_session = cpu_sessions({"shallow": paths["shallow"]})["shallow"]
    worst = 0.0
    for feeds, (out_full, feature) in zip(all_feeds, results):
        out_shallow = shallow_session.run(["out_sample"], {**feeds, cache["feature"]: feature})[0]
        worst = max(worst, float(np.abs(out_full.astype(np.float64) - out_shallow).max()))
    del shallow_session
    rep["shallow_check"] = {"max_abs_err": worst, "passed": worst <= atol}
    if worst > atol:
        raise ParityError(f"the shallow UNet (cache branch {cache['branch']}) differs from the full UNet by "
                          f"{worst:.3g} on the same feature; the cut is wrong. Build without [cache] and report "
                          "the model config")
    rep["seconds"] = round(time.perf_counter() - t0, 4)
    return rep
