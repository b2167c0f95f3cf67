"""The ``diffc`` command: a thin skin over the Python API. Each command parses flags and calls one function."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from diffc import __version__
from diffc.errors import DiffcError
from diffc.profiles.schema import MEMORY_ARENAS

log = logging.getLogger("diffc")


class _Group(click.Group):
    """Turns a DiffcError into a one-line message and exit code 2 (no traceback for user mistakes)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DiffcError as e:
            click.echo(f"error ({e.code}): {e}", err=True)
            sys.exit(2)


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


@main.command()
@click.argument("model")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True)
@click.option("--opset", type=int, default=21, show_default=True)
@click.option("--component", "components", multiple=True, help="Export only these components (repeatable).")
@click.pass_obj
def export(obj, model, out, force, exporter, opset, components):
    """Export MODEL (a diffusers folder, or 'demo') to ONNX, one folder per component, checked against PyTorch."""
    from diffc.exporter import export_pipeline

    report = export_pipeline(model, out, force=force, exporter=exporter, opset=opset, components=components or None,
                             progress=obj["progress"])
    for name, c in report["components"].items():
        click.echo(f"{name:16s} max_abs_err={c['max_abs_err']:.2e} rel_l2={c['rel_l2']:.2e} "
                   f"{'passed' if c['passed'] else 'FAILED'}")
    click.echo(f"wrote {out}")


@main.command()
@click.argument("model")
@click.option("--profile", "-p", default="cpu", show_default=True, help="Profile name or path to a .toml file.")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Artifact folder to write (required unless "
              "--dry-run).")
@click.option("--force", is_flag=True, help="Replace the artifact folder if it exists.")
@click.option("--steps", type=int, default=None, help="Override the profile's step count.")
@click.option("--sampler", default=None, help="Override the profile's sampler (ddim, euler, dpmpp_2m, lcm, flow_euler).")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True)
@click.option("--verify-passes", is_flag=True, help="Run the onnx checker and shape inference after every graph pass.")
@click.option("--no-cache", is_flag=True, help="Rebuild every TensorRT engine, even those the build cache holds.")
@click.option("--dry-run", is_flag=True, help="Print what would be built (components, precisions, shapes, backend "
              "flags) as JSON and exit; exports and builds nothing, needs no backend.")
@click.pass_obj
def build(obj, model, profile, out, force, steps, sampler, exporter, verify_passes, no_cache, dry_run):
    """Compile MODEL (a diffusers folder, or 'demo') for PROFILE into an artifact."""
    if dry_run:
        from diffc.builder import plan

        click.echo(json.dumps(plan(model, profile, steps=steps, sampler=sampler), indent=2))
        return
    if out is None:
        raise click.UsageError("Missing option '--out' / '-o' (only --dry-run runs without it).")
    from diffc.builder import build as _build

    path = _build(model, profile=profile, out=out, force=force, steps=steps, sampler=sampler, exporter=exporter,
                  progress=obj["progress"], no_cache=no_cache, verify_passes=verify_passes)
    if obj["progress"]:
        from diffc.builder import format_build_report

        click.echo(format_build_report(json.loads((path / "build_report.json").read_text())))
    click.echo(f"wrote artifact {path}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True)
@click.option("--negative-prompt", default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--guidance", type=float, default=None, help="Guidance scale (default: the artifact's).")
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="PNG file to write.")
@click.option("--threads", type=int, default=0,
              help="onnxruntime intra-op threads (0: the profile's [onnxruntime].intra_op_num_threads).")
@click.option("--memory-arena", type=click.Choice(MEMORY_ARENAS), default=None,
              help="onnxruntime memory: arenas for the UNet only (the others give their activations back) or one "
                   "arena shared by every component (default: the profile's [onnxruntime].memory_arena).")
@click.option("--cache-interval", type=click.IntRange(min=1), default=None,
              help="Artifacts built with [cache]: run the full UNet every N-th step (1: every step, no reuse) "
                   "instead of the built schedule.")
@click.pass_obj
def run(obj, artifact, prompt, negative_prompt, seed, guidance, height, width, out, threads, memory_arena,
        cache_interval):
    """Generate an image from ARTIFACT (torch-free)."""
    from diffc.runtime import load, save_png

    pipe = load(artifact, threads=threads, memory_arena=memory_arena, progress=obj["progress"], height=height,
                width=width)
    if cache_interval is not None:
        pipe.set_cache_schedule({"kind": "interval", "interval": cache_interval})
    images = pipe(prompt, negative_prompt=negative_prompt, seed=seed, guidance=guidance, height=height, width=width)
    save_png(images[0], out)
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
    from diffc.passes import format_pass_list, pass_list
    from diffc.profiles import load_profile

    prof = load_profile(profile)
    click.echo(format_pass_list(pass_list(prof.backend.value, **prof.passes)))


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
    click.echo(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
