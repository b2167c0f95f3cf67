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
