"""The ``diffc`` command: a thin skin over the Python API. Each command parses flags and calls one function."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path

import click

from diffc import __version__
from diffc.errors import DiffcError, ProfileError
from diffc.profiles.schema import GUIDANCE_MAX, MEMORY_ARENAS, SAMPLER_KINDS, max_threads

log = logging.getLogger("diffc")


class _Group(click.Group):
    """Turns a DiffcError into a one-line message and exit code 2 (no traceback for user mistakes)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DiffcError as e:
            click.echo(f"error ({e.code}): {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; an unfinished build or export leaves nothing behind", err=True)
            sys.exit(130)


def _exit_on_sigterm(signum, frame):
    """SIGTERM (what ``timeout``, ``docker stop`` and systemd send) ends diffc the way Ctrl-C does: the exception
    unwinds through every ``with`` block, so temporary folders are removed, then the exit status is 128 + 15."""
    raise SystemExit(128 + signum)


def _handle_sigterm(ctx: click.Context) -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (an app calling main() from a worker keeps its own)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="diffc")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
@click.pass_context
def main(ctx, verbose, quiet):
    """diffc: compile diffusers pipelines into deployable artifacts, and run them."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch", "diffusers", "transformers", "onnxscript", "onnx_ir", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.obj = {"progress": not quiet}
    _handle_sigterm(ctx)


@main.command()
@click.argument("model")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True)
@click.option("--opset", type=int, default=21, show_default=True,
              help="ONNX opset, from 17 (the oldest the passes and backends read) to the installed onnx's newest.")
@click.option("--component", "components", multiple=True, help="Export only these components (repeatable).")
@click.pass_obj
def export(obj, model, out, force, exporter, opset, components):
    """Export MODEL (a diffusers folder, or 'demo' / 'demo-dit') to ONNX, one folder per component, checked against
    PyTorch."""
    import onnx

    from diffc.errors import ExportError

    newest = onnx.defs.onnx_opset_version()
    if not 17 <= opset <= newest:
        raise ExportError(f"--opset must be from 17 to {newest} (the installed onnx's newest), got {opset}")
    from diffc.exporter import export_pipeline

    report = export_pipeline(model, out, force=force, exporter=exporter, opset=opset, components=components or None,
                             progress=obj["progress"])
    for name, c in report["components"].items():
        click.echo(f"{name:16s} max_abs_err={c['max_abs_err']:.2e} rel_l2={c['rel_l2']:.2e} "
                   f"{'passed' if c['passed'] else 'FAILED'}")
    click.echo(f"wrote {out}")


def _check_overrides(steps: int | None, sampler: str | None) -> None:
    """``build --steps / --sampler`` replace profile fields: the same ranges as the profile's [sampler] table."""
    if steps is not None and not 1 <= steps <= 1000:
        raise ProfileError(f"--steps must be an integer from 1 to 1000 (it replaces the profile's [sampler].steps), "
                           f"got {steps}")
    if sampler is not None and sampler not in SAMPLER_KINDS:
        raise ProfileError(f"--sampler must be one of {', '.join(SAMPLER_KINDS)}, got {sampler!r}")


@main.command()
@click.argument("model")
@click.option("--profile", "-p", default="cpu", show_default=True, help="Profile name or path to a .toml file.")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Artifact folder to write (required unless "
              "--dry-run).")
@click.option("--force", is_flag=True, help="Replace the artifact folder if it exists.")
@click.option("--steps", type=int, default=None, help="Override the profile's step count (1 to 1000).")
@click.option("--sampler", default=None, help="Override the profile's sampler (auto, ddim, euler, dpmpp_2m, lcm, "
              "flow_euler).")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True)
@click.option("--verify-passes", is_flag=True, help="Run the onnx checker and shape inference after every graph pass.")
@click.option("--no-cache", is_flag=True, help="Rebuild every TensorRT engine, even those the build cache holds.")
@click.option("--dry-run", is_flag=True, help="Print what would be built (components, precisions, shapes, backend "
              "flags) as JSON and exit; exports and builds nothing, needs no backend.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Fuse a LoRA (peft / diffusers / kohya / A1111 .safetensors) into the weights at SCALE "
                   "(default 1.0); repeatable. Run-time LoRAs need no rebuild: `diffc run --lora`.")
@click.option("--vae-decoder", default=None, metavar="FOLDER",
              help="Decode with a tiny VAE: a diffusers AutoencoderTiny folder (TAESD-style, for this model's "
                   "latents), or 'demo-tiny' for the demo. The VAE's own encoder stays (img2img, inpainting).")
@click.option("--force-memory", is_flag=True, help="Build even when the memory check estimates that the build "
              "will not fit in this machine's available memory.")
@click.pass_obj
def build(obj, model, profile, out, force, steps, sampler, exporter, verify_passes, no_cache, dry_run, loras,
          vae_decoder, force_memory):
    """Compile MODEL (a diffusers folder, or 'demo' / 'demo-dit') for PROFILE into an artifact."""
    _check_overrides(steps, sampler)
    if dry_run:
        from diffc.build.plan import plan

        click.echo(json.dumps(plan(model, profile, steps=steps, sampler=sampler), indent=2))
        return
    if out is None:
        raise click.UsageError("Missing option '--out' / '-o' (only --dry-run runs without it).")
    from diffc.build import build as _build
    from diffc.runtime.lora import parse_spec

    path = _build(model, profile=profile, out=out, force=force, steps=steps, sampler=sampler, exporter=exporter,
                  progress=obj["progress"], no_cache=no_cache, verify_passes=verify_passes,
                  loras=[parse_spec(text) for text in loras], vae_decoder=vae_decoder,
                  force_memory=force_memory)
    if obj["progress"]:
        from diffc.build.report import format_build_report

        click.echo(format_build_report(json.loads((path / "build_report.json").read_text())))
    click.echo(f"wrote artifact {path}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True)
@click.option("--negative-prompt", default=None)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed, 0 to 2**64 - 1 (the C API's uint64); negative seeds are refused, not mapped.")
@click.option("--guidance", type=float, default=None,
              help=f"Guidance scale, a finite number from 0 to {GUIDANCE_MAX:g} (default: the artifact's). Scales "
                   "<= 1 run without classifier-free guidance, as diffusers does.")
@click.option("--height", type=int, default=None, help="Image height in pixels (default: the artifact's); "
              "`diffc inspect` shows the range the artifact covers.")
@click.option("--width", type=int, default=None, help="Image width in pixels (default: the artifact's).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Image file to write; its extension picks the format: .png, .jpg / .jpeg or .webp.")
@click.option("--threads", type=int, default=0,
              help=f"onnxruntime intra-op threads, 0 to 4 per CPU ({max_threads()} here); 0: the profile's "
                   "[onnxruntime].intra_op_num_threads.")
@click.option("--memory-arena", type=click.Choice(MEMORY_ARENAS), default=None,
              help="onnxruntime memory: arenas for the UNet only (the others give their activations back) or one "
                   "arena shared by every component (default: the profile's [onnxruntime].memory_arena).")
@click.option("--cache-interval", type=click.IntRange(min=1), default=None,
              help="Artifacts built with [cache]: run the full UNet every N-th step (1: every step, no reuse) "
                   "instead of the built schedule.")
@click.option("--image", "init_image", type=click.Path(path_type=Path), default=None,
              help="Image-to-image: redraw this image (PNG, JPEG, WebP) instead of starting from noise; it is resized "
                   "to --height x --width (default: its own size) when its aspect ratio matches, else refused.")
@click.option("--strength", type=float, default=None,
              help="With --image: how much of it is redrawn, in (0, 1] (default 0.8); more steps run the higher it is.")
@click.option("--mask", "mask_image", type=click.Path(path_type=Path), default=None,
              help="Inpainting, with --image: a mask of the image's size, white where it is redrawn, black where it "
                   "is kept (--strength then defaults to 1.0).")
@click.option("--control-image", "control_images", multiple=True, type=click.Path(path_type=Path),
              help="ControlNet artifacts: the control image (edges, depth, pose... as the ControlNet was trained on), "
                   "resized to the output size; repeat it once per ControlNet, in the artifact's order.")
@click.option("--control-scale", "control_scales", multiple=True, type=float,
              help="With --control-image: the ControlNet conditioning scale (default 1.0); once for all, or once per "
                   "--control-image.")
@click.option("--guidance-from-step", type=int, default=None, metavar="S",
              help="Adaptive guidance, static: steps S.. run the conditional half of classifier-free guidance only "
                   "(S = the step count: never). Overrides the artifact's [savings].")
@click.option("--guidance-threshold", type=float, default=None, metavar="X",
              help="Adaptive guidance, dynamic: cond-only after the first step whose uncond / cond cosine "
                   "similarity reaches X (e.g. 0.995) on every image. Overrides the artifact's [savings].")
@click.option("--extrapolation-order", type=int, default=None, metavar="K",
              help="Artifacts with cached values ([cache]): extrapolate them to each reusing step from the last K+1 "
                   "cached ones (0: reuse as is, up to 3).")
@click.option("--step-cache-threshold", type=float, default=None, metavar="X",
              help="Artifacts built with [savings.step_cache]: run the denoiser's tail only once the first block's "
                   "accumulated relative change reaches X (0: every step runs it all). Overrides the artifact's.")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="Apply a LoRA at SCALE (default 1.0) on top of the artifact's weights, without a rebuild; "
                   "repeatable (onnxruntime and OpenVINO fp32 / bf16 artifacts). FILE may be a bundled name: "
                   "demo-bold (thick strokes, for the demo).")
@click.pass_obj
def run(obj, artifact, prompt, negative_prompt, seed, guidance, height, width, out, threads, memory_arena,
        cache_interval, init_image, strength, mask_image, control_images, control_scales, guidance_from_step,
        guidance_threshold, extrapolation_order, step_cache_threshold, loras):
    """Generate an image from ARTIFACT (torch-free)."""
    from diffc.runtime import check_image_path, load, save_image
    from diffc.runtime.pipeline import check_guidance, check_prompts, check_seed, check_size_arg, check_threads

    # every flag is checked before the artifact loads: a mistake costs a second, not a load and a sampling run
    check_prompts("--prompt", prompt)
    if negative_prompt is not None:
        check_prompts("--negative-prompt", negative_prompt)
    check_seed(seed, "--seed")
    check_guidance(guidance, "--guidance")
    check_size_arg("--height", height)
    check_size_arg("--width", width)
    check_threads(threads, "--threads")
    check_image_path(out)
    from diffc.runtime.savings import Savings

    savings = {"guidance_from_step": guidance_from_step, "guidance_threshold": guidance_threshold,
               "extrapolation_order": extrapolation_order}
    savings = {k: v for k, v in savings.items() if v is not None}
    Savings().with_overrides(**savings)  # types and ranges before the artifact loads; the artifact's fit after
    if step_cache_threshold is not None:
        from diffc.errors import InputError
        from diffc.runtime.step_cache import check_threshold

        savings["step_cache_threshold"] = check_threshold(step_cache_threshold, InputError, "--step-cache-threshold")
    if init_image is not None or strength is not None:
        from diffc.runtime.img2img import check_image_args

        check_image_args(init_image, strength)  # readable image, strength in (0, 1]: before the artifact loads
    if mask_image is not None:
        from diffc.runtime.inpaint import check_mask_args

        check_mask_args(init_image, mask_image)  # an image with it, readable, of the image's size
    if control_images or control_scales:
        from diffc.runtime.controlnet import check_args as check_control_args

        check_control_args(control_images, control_scales)  # readable images, scales in range
    lora_scales = None
    if loras:
        from diffc.runtime.lora import parse_spec, specs

        lora_scales = dict(parse_spec(text) for text in loras)
        specs(lora_scales)  # files present, scales finite: before the artifact loads
    pipe = load(artifact, threads=threads, memory_arena=memory_arena, progress=obj["progress"], height=height,
                width=width, loras=lora_scales)
    if cache_interval is not None:
        pipe.set_cache_schedule({"kind": "interval", "interval": cache_interval})
    if savings:
        pipe.set_savings(**savings)
    images = pipe(prompt, negative_prompt=negative_prompt, seed=seed, guidance=guidance, height=height, width=width,
                  image=init_image, strength=strength, mask_image=mask_image,
                  control_image=_control_image_arg(control_images), controlnet_scale=_control_scale_arg(control_scales))
    log.info("denoiser evaluations: %s", pipe.last_trace.summary())
    save_image(images[0], out)
    click.echo(f"wrote {out}")


@main.command("demo-model")
@click.argument("out", type=click.Path(path_type=Path))
def demo_model(out):
    """Write diffc's bundled demo pipeline (a diffusers folder) to OUT."""
    from diffc.exporter.demo import write_demo_pipeline

    click.echo(f"wrote {write_demo_pipeline(out)}")


@main.command()
@click.option("--profile", "-p", default="cpu", show_default=True, help="Profile name or path to a .toml file.")
def passes(profile):
    """Print the ordered pass list a profile runs, with its options."""
    from diffc.passes import format_pass_list, profile_pass_list
    from diffc.profiles import load_profile

    click.echo(format_pass_list(profile_pass_list(load_profile(profile))))


@main.command()
def profiles():
    """List the shipped profiles."""
    from diffc.profiles import list_profiles, load_profile

    for name in list_profiles():
        p = load_profile(name)
        click.echo(f"{name:18s} {p.backend.value:13s} {p.description}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
def inspect(artifact):
    """Print an artifact's manifest summary."""
    from diffc.runtime import read_manifest

    m = read_manifest(artifact)
    summary = {
        "source": m["source"], "profile": m["profile"]["name"],
        "sampler": {"kind": m["sampler"]["kind"], "steps": len(m["sampler"]["timesteps"])},
        "components": {k: {"backend": v["backend"], "precision": v["precision"]} for k, v in m["components"].items()},
        "image": m["image"], "guidance": m["guidance"],
    }
    if m.get("cache"):
        from diffc.runtime.cache import schedule_summary

        c = m["cache"]
        summary["cache"] = {"branch": c["branch"], "feature": c["feature"], "schedule": c["schedule"],
                            "full_steps": schedule_summary(c["full_steps"]),
                            "components": [c["full_component"], c["shallow_component"]]}
    if m.get("savings"):
        summary["savings"] = m["savings"]
    if m.get("controlnets"):
        cn = m["controlnets"]
        summary["controlnets"] = {k: cn[k] for k in ("components", "conditioning_scale", "guidance_start",
                                                     "guidance_end")}
    click.echo(json.dumps(summary, indent=2))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Model repository folder to write.")
@click.option("--name", default="diffc", show_default=True, help="The model's name in the repository.")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Model instances (each loads the artifact; GPU instances for TensorRT artifacts).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Triton's max_batch_size (default: the artifact's largest batch).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Threads per instance (0: the profile's).")
@click.option("--queue-delay-us", type=click.IntRange(min=0), default=0, show_default=True,
              help="How long the dynamic batcher waits for more requests to batch (microseconds).")
@click.option("--link", is_flag=True, help="Link the artifact instead of copying it (the repository then only works "
              "on this machine).")
@click.option("--force", is_flag=True, help="Replace the repository folder if diffc wrote it.")
def triton(artifact, out, name, instances, max_batch, threads, queue_delay_us, link, force):
    """Write a Triton Inference Server model repository serving ARTIFACT (see docs/serving.md)."""
    from diffc.serve import write_repository

    write_repository(artifact, out, name=name, instances=instances, max_batch=max_batch, threads=threads,
                     queue_delay_us=queue_delay_us, link=link, force=force)
    click.echo(f"wrote {out} (model {name!r}); run it with: tritonserver --model-repository={out.absolute()}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="HTTP port on 127.0.0.1 (0: a free one).")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True,
              help="gRPC port on 127.0.0.1 (0: a free one).")
@click.option("--name", default="diffc", show_default=True, help="The model's name on the server.")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True, help="Model instances.")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Largest dynamic batch (default: the artifact's largest batch).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Threads per instance (0: the profile's).")
def serve(artifact, port, grpc_port, name, instances, max_batch, threads):
    """Serve ARTIFACT on a Triton Inference Server bound to 127.0.0.1 until Ctrl-C or SIGTERM."""
    from diffc.serve.server import serving

    with serving(artifact, name=name, instances=instances, max_batch=max_batch, threads=threads, http_port=port,
                 grpc_port=grpc_port) as server:
        click.echo(f"serving {name!r} at http://{server.url} (gRPC {server.grpc_url}); Ctrl-C stops it")
        server.wait()


def _control_image_arg(paths: tuple[Path, ...]):
    """``--control-image`` given once: the image (for every prompt); several times: one per ControlNet."""
    if not paths:
        return None
    return paths[0] if len(paths) == 1 else list(paths)


def _control_scale_arg(scales: tuple[float, ...]):
    """``--control-scale`` given once: the scale of every ControlNet; several times: one per ControlNet."""
    if not scales:
        return None
    return scales[0] if len(scales) == 1 else list(scales)


if __name__ == "__main__":
    main()
