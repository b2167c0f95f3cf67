"""Write a Triton model repository for an artifact.

The layout is Triton's standard one, so the same folder runs on the ``tritonserver`` of the ``serve`` extra, in
NVIDIA's container (``nvcr.io/nvidia/tritonserver:*-py3``) and behind KServe::

    REPO/NAME/config.pbtxt          Python backend, dynamic batching, instance_group
    REPO/NAME/1/model.py            diffc/serve/triton_model.py: initialize -> diffc.load, execute -> pipe(...)
    REPO/NAME/1/artifact.diffc/     the artifact (copied; linked with link=True)

Inputs and outputs follow Triton's Stable Diffusion tutorial where they fit (``prompt`` as a one-element BYTES
row); every input but ``prompt`` is optional and takes the artifact's default when left out.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from diffc._fs import atomic_output_dir
from diffc.engines import get_backend
from diffc.errors import InputError
from diffc.runtime.manifest import read_manifest

log = logging.getLogger("diffc.serve")

#: the folder name of the artifact inside the model version folder
ARTIFACT_DIR = "artifact.diffc"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

#: (name, Triton data type, optional): every input is one element per row (dims [1], the batch axis implicit)
INPUTS = (
    ("prompt", "TYPE_STRING", False),
    ("negative_prompt", "TYPE_STRING", True),
    ("seed", "TYPE_INT64", True),
    ("guidance", "TYPE_FP32", True),
    ("height", "TYPE_INT32", True),
    ("width", "TYPE_INT32", True),
)


def is_gpu_artifact(manifest: dict[str, Any]) -> bool:
    """Whether some engine of the artifact runs only on an NVIDIA GPU (its backend's ``runs_on_gpu``): Triton
    then places the model's instances on GPUs (KIND_GPU) and Ray gives each replica one. Asking imports the
    backend's diffc module only, not the backend itself: a repository for a GPU artifact is written anywhere."""
    return any(get_backend(c["backend"]).runs_on_gpu for c in manifest["components"].values())


def config_pbtxt(manifest: dict[str, Any], *, name: str, instances: int, max_batch: int, threads: int,
                 queue_delay_us: int) -> str:
    """The model's config.pbtxt (protobuf text format, written by hand: the fields are few and fixed)."""
    kind = "KIND_GPU" if is_gpu_artifact(manifest) else "KIND_CPU"
    inputs = ",\n".join(f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ 1 ]\n'
                         + ("    optional: true\n" if opt else "") + "  }" for n, t, opt in INPUTS)
    return f"""# written by diffc: the artifact is in 1/{ARTIFACT_DIR}, the model code in 1/model.py
name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [
{inputs}
]
output [
  {{
    name: "image"
    data_type: TYPE_UINT8
    dims: [ -1, -1, 3 ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [
  {{
    count: {instances}
    kind: {kind}
  }}
]
parameters {{
  key: "artifact"
  value: {{ string_value: "{ARTIFACT_DIR}" }}
}}
parameters {{
  key: "threads"
  value: {{ string_value: "{threads}" }}
}}
"""


def write_repository(artifact: str | os.PathLike, out: str | os.PathLike, *, name: str = "diffc",
                     instances: int = 1, max_batch: int | None = None, threads: int = 0, queue_delay_us: int = 0,
                     link: bool = False, force: bool = False) -> Path:
    """Write a Triton model repository serving ``artifact`` to ``out`` (atomically: all or nothing).

    ``max_batch``: Triton's ``max_batch_size``, at most the artifact's batch range maximum (the default), so the
    dynamic batcher never forms a batch the engines cannot run. ``instances``: model instances (each loads the
    artifact once; KIND_GPU for TensorRT and CUDA artifacts, KIND_CPU otherwise). ``threads``: each instance's
    ``diffc.load(threads=...)`` (0: the profile's; with several instances on one CPU, cores / instances).

    The artifact is copied, so the repository is self-contained: it can be moved, mounted into a container or
    uploaded to the object store KServe reads, where a link would dangle. ``link=True`` links it instead (a local
    server on this machine, e.g. ``diffc serve``: no copy of multi-GB weights).
    """
    artifact = Path(artifact).absolute()
    manifest = read_manifest(artifact)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(f"model name {name!r} is not a valid Triton model name: use letters, digits, '_', '-' and "
                         "'.', starting with a letter or digit (e.g. diffc or sd15)")
    if isinstance(instances, bool) or not isinstance(instances, int) or not 1 <= instances <= 64:
        raise InputError(f"instances must be an integer from 1 to 64, got {instances!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise InputError(f"threads must be 0 (the profile's setting) or a positive integer, got {threads!r}")
    if isinstance(queue_delay_us, bool) or not isinstance(queue_delay_us, int) or queue_delay_us < 0:
        raise InputError(f"the queue delay must be a non-negative number of microseconds, got {queue_delay_us!r}")
    lo_b, _, hi_b = manifest["image"]["batch"]
    if max_batch is None:
        max_batch = hi_b
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= hi_b:
        raise InputError(f"max batch must be from 1 to {hi_b} (this artifact's batch range is [{lo_b}, {hi_b}]); "
                         "rebuild with a larger [shapes].batch to batch more")
    if lo_b > 1:
        raise InputError(f"this artifact's batch range starts at {lo_b}, but a server gets single requests; rebuild "
                         "it with [shapes].batch starting at 1")
    with atomic_output_dir(out, force=force, what="Triton repository", protect=[artifact]) as tmp:
        version = tmp / name / "1"
        version.mkdir(parents=True)
        (tmp / name / "config.pbtxt").write_text(
            config_pbtxt(manifest, name=name, instances=instances, max_batch=max_batch, threads=threads,
                         queue_delay_us=queue_delay_us))
        shutil.copyfile(Path(__file__).with_name("triton_model.py"), version / "model.py")
        if link:
            (version / ARTIFACT_DIR).symlink_to(artifact, target_is_directory=True)
        else:
            shutil.copytree(artifact, version / ARTIFACT_DIR)
    log.info("wrote Triton repository %s (model %r, %d %s instance(s), max batch %d, artifact %s)", out, name,
             instances, "GPU" if is_gpu_artifact(manifest) else "CPU", max_batch, "linked" if link else "copied")
    return Path(out)
