"""The Triton Python-backend model that serves a diffc artifact (copied into a repository as ``1/model.py``).

Triton runs this file in its Python backend stub, where ``triton_python_backend_utils`` exists; diffc must be
installed in the Python the stub uses. ``initialize`` loads the artifact beside this file once per model
instance; ``execute`` gets the requests the dynamic batcher grouped and answers each: images, or an error
response carrying diffc's message for a request it refuses (the other requests and the server go on).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

import diffc
from diffc.serve.batching import execute
from diffc.serve.repository import INPUTS

log = logging.getLogger("diffc.serve")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version = Path(args["model_repository"]) / args["model_version"]
        artifact = version / params.get("artifact", "artifact.diffc")
        threads = int(params.get("threads", "0") or 0)
        self.pipe = diffc.load(artifact, threads=threads, progress=False)
        log.info("loaded %s for instance %s", artifact, args.get("model_instance_name"))

    def execute(self, requests):
        arrays = []
        for request in requests:
            tensors = {}
            for name, _, _ in INPUTS:
                t = pb_utils.get_input_tensor_by_name(request, name)
                tensors[name] = None if t is None else t.as_numpy()
            arrays.append(tensors)
        responses = []
        for result in execute(self.pipe, arrays):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{result} ({getattr(result, 'code', 'error')})",
                                               pb_utils.TritonError.INVALID_ARG)))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("image", np.ascontiguousarray(np.stack(result)))]))
        return responses

    def finalize(self):
        self.pipe = None
