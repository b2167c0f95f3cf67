"""Export a diffusers pipeline's components to ONNX and check each one against PyTorch.

For every component the pipeline class needs (see :mod:`diffc.exporter.source`) we wrap the module as its
contract says, export it with named inputs/outputs and dynamic axes, re-save it with a readable IR version
(one external data file when large), then run it in onnxruntime at two different shapes and compare with
PyTorch. A component over tolerance fails the export with :class:`~diffc.errors.ParityError`; the numbers go
to ``export_report.json`` either way.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from diffc._fs import atomic_output_dir, folder_hash, work_dir
from diffc.errors import ExportError, ModelError, ParityError, ShapeError
from diffc.exporter.contracts import Contract, SampleShape, get_contract
from diffc.exporter.dit import upcast_for_export
from diffc.exporter.symbolics import register_onnx_symbolics
from diffc.exporter.source import ModelSource, inspect_model
from diffc.onnx_io import load_model, save_model

log = logging.getLogger("diffc.export")

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 21  # GroupNormalization-21 is the CPU-legal GroupNorm; see diffc.passes


@dataclass
class ExportedComponent:
    name: str
    path: Path
    contract: Contract
    parity: list[dict[str, Any]]

    @property
    def passed(self) -> bool:
        return all(p["passed"] for p in self.parity)


#: names that mean one of diffc's own trained demo pipelines (written into the work folder), not a folder
BUNDLED_MODELS = ("demo", "demo-dit")


def resolve_model(model: str | Path, workdir: Path) -> Path:
    """``"demo"`` (UNet) and ``"demo-dit"`` (SD3-shaped transformer) mean diffc's bundled demo pipelines, written
    into ``workdir``; anything else is a folder."""
    if str(model) == "demo":
        quiet_huggingface()
        from diffc.exporter.demo import write_demo_pipeline

        return write_demo_pipeline(workdir / "demo_pipeline")
    if str(model) == "demo-dit":
        quiet_huggingface()
        from diffc.exporter.demo_dit import write_demo_dit_pipeline

        return write_demo_dit_pipeline(workdir / "demo_dit_pipeline")
    return Path(model)


def quiet_huggingface() -> None:
    """diffusers/transformers print their own progress bars and torchvision notices; diffc shows its own."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import diffusers

    diffusers.utils.logging.disable_progress_bar()


def load_pipeline(source: ModelSource, loras=()):
    """The diffusers pipeline of ``source``, with ``loras`` (:class:`~diffc.runtime.lora.LoraSpec`) fused into its
    weights (:mod:`diffc.exporter.lora`); a folder saved with an unfused adapter is refused before loading."""
    import diffusers

    from diffc.exporter.lora import check_folder, fuse

    quiet_huggingface()
    check_folder(source.path, loras)
    log.info("loading %s from %s", source.pipeline_class, source.path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = diffusers.DiffusionPipeline.from_pretrained(source.path, dtype=load_dtypes(source))
    except Exception as e:  # diffusers raises many types for a broken folder
        raise ModelError(f"diffusers could not load {source.path}: {e}") from e
    fuse(pipe, loras)
    from diffc.exporter.controlnet import mark_controlled

    mark_controlled(pipe)  # a ControlNet pipeline's UNet is exported with the residual inputs
    return pipe


def load_dtypes(source: ModelSource):
    """float32 for the UNet pipelines (small enough to export from an fp32 copy); for the transformer
    pipelines each model stays in the dtype its safetensors hold, so a bf16 / fp16 checkpoint is never copied
    whole to fp32 (diffc.exporter.dit.upcast_for_export upcasts one component at a time, while it is exported)."""
    if "transformer" not in source.components:
        return torch.float32
    from diffc.exporter.dit import stored_dtype
    from diffc.exporter.source import COMPONENT_FOLDER

    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    folders = {COMPONENT_FOLDER[c] for c in source.components}
    return {"default": torch.float32,
            **{f: names[stored_dtype(source.path / f) or "F32"] for f in sorted(folders)}}


def release_modules(pipe):
    """Drop ``pipe``'s torch modules (its weights) and return their LoRA fingerprints
    (:func:`diffc.exporter.lora.weight_fingerprints`), taken first; the tokenizers, scheduler and configs stay.
    The build calls this once no stage compares a graph with PyTorch any more
    (:meth:`diffc.build.export.Exported.release_torch`)."""
    from diffc.exporter.lora import weight_fingerprints

    prints = weight_fingerprints(pipe)
    for name, value in list(pipe.components.items()):
        if isinstance(value, torch.nn.Module):
            setattr(pipe, name, None)
    return prints


def component_module(pipe, name: str) -> torch.nn.Module:
    from diffc.exporter import controlnet

    if controlnet.is_controlnet(name):
        return controlnet.module_of(pipe, name)
    if name == "vae_decoder":
        from diffc.exporter.tiny_vae import attached

        tiny = attached(pipe)  # --vae-decoder: a tiny decoder replaces the VAE's own (diffc.exporter.tiny_vae)
        if tiny is not None:
            return tiny.eval()
    contract_attr = {"vae_decoder": "vae", "vae_encoder": "vae"}.get(name, name)
    module = getattr(pipe, contract_attr, None)
    if module is None:
        raise ModelError(f"the pipeline has no {contract_attr!r} module to export as {name!r}")
    return module.eval()


#: largest latent side the parity check runs at. Export traces at the first sample shape and every check
#: runs both, in PyTorch and in onnxruntime, after export and again after the passes: at SD 1.5's native 64
#: (and 72x80 at batch 2) one check of its VAE decoder took 135 s and of its UNet 57 s on a 2-core CPU, at 32
#: 40 s and 19 s, with the same errors (1e-6 - 1e-4). 32 latents (256 px for SD) still run every block.
PARITY_MAX_LATENT = 32


def sample_shapes(pipe, name: str) -> tuple[SampleShape, SampleShape]:
    """Two different shapes per component, so the dynamic axes are really exercised by the parity check: the
    denoiser's native latent size (at most :data:`PARITY_MAX_LATENT`), and one step up in each direction at
    batch 2."""
    if getattr(pipe, "unet", None) is None:
        from diffc.exporter.dit import sample_shapes as dit_sample_shapes

        return dit_sample_shapes(pipe, name, PARITY_MAX_LATENT)
    unet = pipe.unet
    native = int(unet.config.sample_size) if not isinstance(unet.config.sample_size, (list, tuple)) else int(
        unet.config.sample_size[0]
    )
    mult = 2 ** (len(unet.config.block_out_channels) - 1)
    native = min(native, max(PARITY_MAX_LATENT, mult))
    native = max(mult, native - native % mult)
    seq = int(getattr(pipe.tokenizer, "model_max_length", 77) or 77)
    seq = min(seq, 77)
    if name.startswith("text_encoder"):
        return SampleShape(1, native, native, seq), SampleShape(2, native, native, max(8, seq // 4))
    return SampleShape(1, native, native, seq), SampleShape(2, native + mult, native + 2 * mult, max(8, seq // 4))


def export_component(module: torch.nn.Module, contract: Contract, path: Path, *, opset: int, exporter: str,
                     sample: tuple[torch.Tensor, ...]) -> Path:
    """Export one wrapped module to ``path`` (``model.onnx`` [+ ``model.onnx.data``])."""
    register_onnx_symbolics()
    wrapped = contract.wrap(module).eval()
    with work_dir("diffc-export") as scratch:
        raw = scratch / "raw.onnx"
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if exporter == "torchscript":
                    torch.onnx.export(
                        wrapped, sample, str(raw), input_names=contract.input_names,
                        output_names=contract.output_names, dynamic_axes=contract.dynamic_axes(),
                        opset_version=opset, do_constant_folding=True, dynamo=False,
                    )
                elif exporter == "dynamo":
                    program = torch.onnx.export(
                        wrapped, sample, input_names=contract.input_names, output_names=contract.output_names,
                        dynamic_axes=contract.dynamic_axes(), opset_version=opset, dynamo=True, verbose=False,
                    )
                    program.save(str(raw), external_data=True)
                else:
                    raise ExportError(f"unknown exporter {exporter!r}; use one of {EXPORTERS}")
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed for {contract.name} ({exporter}): {e}") from e
        model = load_model(raw)
    if contract.name == "transformer":
        from diffc.exporter.dit import drop_token_axis_squeeze

        drop_token_axis_squeeze(model)
    _check_io_names(model, contract)
    return save_model(model, path)


def _check_io_names(model, contract: Contract) -> None:
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != contract.input_names or got_out != contract.output_names:
        raise ExportError(
            f"{contract.name}: exported graph has inputs {got_in} / outputs {got_out}, but the contract says "
            f"{contract.input_names} / {contract.output_names}; an input the module ignores is pruned by the "
            "exporter — check the component's config"
        )


def check_parity(module: torch.nn.Module, contract: Contract, path: Path, shapes: Iterable[SampleShape],
                 seed: int = 0) -> list[dict[str, Any]]:
    """Run the ONNX graph in onnxruntime and the module in PyTorch on the same inputs; compare outputs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    wrapped = contract.wrap(module).eval()
    rows = []
    for shape in shapes:
        gen = torch.Generator().manual_seed(seed)
        inputs = contract.make_inputs(module, shape, gen)
        with torch.no_grad():
            ref = wrapped(*inputs)
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        feeds = {n: t.numpy() for n, t in zip(contract.input_names, inputs)}
        got = sess.run(contract.output_names, feeds)
        worst = {"max_abs_err": 0.0, "rel_l2": 0.0}
        for name, r, g in zip(contract.output_names, ref, got):
            r = r.float().numpy()
            if r.shape != g.shape:
                raise ShapeError(
                    f"{contract.name}: output {name!r} has shape {g.shape} in onnxruntime but {r.shape} in PyTorch "
                    f"at input shape {shape}; a dynamic axis was baked in during export"
                )
            diff = np.abs(r.astype(np.float64) - g.astype(np.float64))
            worst["max_abs_err"] = max(worst["max_abs_err"], float(diff.max(initial=0.0)))
            denom = float(np.linalg.norm(r.astype(np.float64))) or 1.0
            worst["rel_l2"] = max(worst["rel_l2"], float(np.linalg.norm(diff) / denom))
        rows.append({
            "shape": {"batch": shape.batch, "height": shape.height, "width": shape.width, "sequence": shape.sequence},
            **worst,
            "tolerance": {"atol": contract.atol, "rtol_l2": contract.rtol_l2},
            "passed": worst["max_abs_err"] <= contract.atol and worst["rel_l2"] <= contract.rtol_l2,
        })
    return rows


def worst_parity(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst errors over :func:`check_parity`'s rows, and whether every row passed."""
    return {"max_abs_err": max(r["max_abs_err"] for r in rows), "rel_l2": max(r["rel_l2"] for r in rows),
            "passed": all(r["passed"] for r in rows)}


def export_pipeline_to(pipe, source: ModelSource, out: Path, *, components: Iterable[str] | None = None,
                       opset: int = DEFAULT_OPSET, exporter: str = "torchscript", check: bool = True,
                       progress: bool = True, cache_marks: bool = False, step_marks: bool = False) -> dict[str, Any]:
    """Export into an existing folder ``out`` (no atomicity here; callers wrap it). Returns the report.

    ``cache_marks``: export the UNet with its cache-branch features as extra outputs (for ``cache_reuse``).
    ``step_marks``: export the denoiser with its first block's results as extra outputs (for ``step_cache``).
    """
    names = list(components or source.components)
    unknown = [n for n in names if n not in source.components]
    if unknown:
        raise ExportError(f"{source.pipeline_class} has no component(s) {unknown}; it has {list(source.components)}")
    report: dict[str, Any] = {"pipeline_class": source.pipeline_class, "exporter": exporter, "opset": opset,
                              "torch": torch.__version__, "components": {}}
    failures = []
    bar = tqdm(names, desc="export", unit="component", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        module = component_module(pipe, name)
        contract = get_contract(name, module, **({"cache_marks": True} if cache_marks and name == "unet" else {}),
                                **({"step_marks": True} if step_marks and name in ("unet", "transformer") else {}))
        shapes = sample_shapes(pipe, name)
        t0 = time.perf_counter()
        sample = contract.make_inputs(module, shapes[0], torch.Generator().manual_seed(0))
        with upcast_for_export(module, name):
            path = export_component(module, contract, out / name / "model.onnx", opset=opset, exporter=exporter,
                                    sample=sample)
            rows = check_parity(module, contract, path, shapes) if check else None
        entry: dict[str, Any] = {"file": f"{name}/model.onnx", "export_seconds": round(time.perf_counter() - t0, 3),
                                 "contract": contract.to_dict()}
        if rows is not None:
            entry.update({
                **worst_parity(rows),
                "tolerance": {"atol": contract.atol, "rtol_l2": contract.rtol_l2},
                "checks": rows,
            })
            log.info("%s: max_abs_err=%.3g rel_l2=%.3g (%s)", name, entry["max_abs_err"], entry["rel_l2"],
                     "ok" if entry["passed"] else "OVER TOLERANCE")
            if not entry["passed"]:
                failures.append(name)
        report["components"][name] = entry
    (out / "export_report.json").write_text(json.dumps(report, indent=2))
    if failures:
        detail = ", ".join(
            f"{n} (max_abs_err={report['components'][n]['max_abs_err']:.3g}, "
            f"rel_l2={report['components'][n]['rel_l2']:.3g})" for n in failures)
        raise ParityError(
            f"exported graphs differ from PyTorch beyond tolerance: {detail}; see export_report.json. "
            "Try --exporter dynamo, or report the model config"
        )
    return report


def export_pipeline(model: str | Path, out: str | Path, *, force: bool = False, components: Iterable[str] | None = None,
                    opset: int = DEFAULT_OPSET, exporter: str = "torchscript", check: bool = True,
                    progress: bool = True) -> dict[str, Any]:
    """``diffc export``: every component of ``model`` to ``out/<component>/model.onnx`` + ``export_report.json``."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; use one of {EXPORTERS}")
    protect = [model] if str(model) not in BUNDLED_MODELS else []
    with work_dir("diffc-model") as work, atomic_output_dir(out, force=force, what="export", protect=protect) as tmp:
        folder = resolve_model(model, Path(work))
        source = inspect_model(folder, purpose="export")
        pipe = load_pipeline(source)
        report = export_pipeline_to(pipe, source, tmp, components=components, opset=opset, exporter=exporter,
                                    check=check, progress=progress)
        report["source"] = {"model": str(model), "sha256": folder_hash(folder)}
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2))
    return report
