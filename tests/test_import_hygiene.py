"""The runtime install must not need torch: importing diffc, diffc.runtime or running `diffc --help` must not
pull torch, diffusers, transformers, tensorrt or openvino into the process (checked in a fresh subprocess); a backend
loads only when an artifact built for it is opened."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings", "tensorrt_rtx_libs",
         "onnxscript", "openvino")
#: cuda-bindings' .pth file imports the empty ``cuda`` namespace at interpreter start; the bindings are the heavy part
HEAVY_PREFIXES = ("cuda.bindings", "cuda.cudart")

PROBE = """
import json, sys
{body}
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r} or m.startswith({prefixes!r}))))
"""


def _heavy_modules_after(body: str) -> list[str]:
    code = PROBE.format(body=body, heavy=set(HEAVY), prefixes=HEAVY_PREFIXES)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "body",
    [
        "import diffc",
        "import diffc.runtime",
        "import diffc.runtime.capi",
        "import diffc.profiles, diffc.errors, diffc.exporter",
        "from click.testing import CliRunner\nimport diffc.cli\n"
        "r = CliRunner().invoke(diffc.cli.main, ['--help'])\nassert r.exit_code == 0, r.output",
        "from click.testing import CliRunner\nimport diffc.cli\n"
        "r = CliRunner().invoke(diffc.cli.main, ['profiles'])\nassert r.exit_code == 0, r.output",
        "import diffc.engines.tensorrt",
    ],
)
def test_no_heavy_imports(body):
    assert _heavy_modules_after(body) == []


def test_probe_can_fail():
    """The probe really sees heavy modules when they are imported (so the test above can fail)."""
    pytest.importorskip("torch")
    assert "torch" in _heavy_modules_after("import torch")


#: packages only diffc/exporter/ may import (the export extra): the rest of diffc runs without them
EXPORT_ONLY = ("torch", "transformers", "diffusers")


def _imports_of(source: str, packages, filename: str = "<test>") -> list[tuple[int, str]]:
    """(line, module) of every import statement in ``source`` of a module in ``packages`` or below, at any depth
    (inside functions too: a lazy import still needs the package at run time, and still closes a cycle)."""
    import ast

    def inside(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in packages)

    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n) for n in names if inside(n)]
    return found


def _offenders(folder: str, packages, *, skip: str | None = None) -> list[str]:
    from pathlib import Path

    import diffc

    root = Path(diffc.__file__).parent
    out = []
    for path in sorted((root / folder).rglob("*.py")):
        if skip is not None and (root / skip) in path.parents:
            continue
        out += [f"{path.relative_to(root.parent)}:{line} imports {mod}"
                for line, mod in _imports_of(path.read_text(encoding="utf-8"), packages, str(path))]
    return out


def test_torch_is_imported_only_under_exporter():
    """torch, transformers and diffusers are imported in diffc/exporter/ and nowhere else in the package."""
    assert _offenders(".", EXPORT_ONLY, skip="exporter") == []


def test_runtime_imports_neither_profiles_nor_the_build():
    """The runtime reads artifacts; profiles and the build make them. The profiles import the runtime's cache
    schedules, so a runtime import of profiles would be a cycle (the shared names live in diffc/names.py)."""
    assert _offenders("runtime", ("diffc.profiles", "diffc.build", "diffc.exporter", "diffc.passes")) == []


def test_exporter_does_not_reach_into_the_runtime():
    """Build-time knowledge (UNet blocks, sampler tables) lives in the exporter, not in the runtime it feeds."""
    assert _offenders("exporter", ("diffc.runtime.cache", "diffc.runtime.pipeline")) == []


def test_import_scan_can_fail():
    """The scan sees every form of import, at any depth, and not look-alikes."""
    source = ("import torch\nimport numpy as np, torch.nn as nn\nfrom transformers import CLIPTokenizerFast\n"
              "def f():\n    from diffusers.models import UNet2DConditionModel\n"
              "import torchvision\nfrom . import torch\nx = 'import torch'\nfrom diffc.profilesx import y\n")
    assert _imports_of(source, EXPORT_ONLY) == [(1, "torch"), (2, "torch.nn"), (3, "transformers"),
                                                (5, "diffusers.models")]
    assert _imports_of(source, ("diffc.profiles",)) == []
