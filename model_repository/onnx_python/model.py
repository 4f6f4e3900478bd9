"""Triton Python-backend model wrapping an onnxruntime session (the ``cpu`` target).

Used for ``vae_encoder``, ``unet`` and ``vae_decoder``: ``builders.build`` copies this file
next to each ``model.onnx``. Tensor names come from the model's config.pbtxt (written from
the network spec). The dynamic batch is run as one session call. An input listed in the
config parameter ``input_ranges`` (JSON ``{"LR": [0, 1]}``) is checked per request: a
request with NaN or out-of-range values gets its own INVALID_ARG error, the rest are served.
Request parameters are not read: the ensemble forwards the client's sampling parameters to
every step, and only the ``sampler`` checks them.
"""

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from cxr_sr.serving import check_finite_range


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.ranges = json.loads(params.get("input_ranges", "{}"))
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads", os.environ.get("CXR_ORT_THREADS", "0")))
        options.intra_op_num_threads = threads
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = [None] * len(requests)
        batch = []  # (request index, {name: array})
        for i, request in enumerate(requests):
            feeds = {
                n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs
            }
            problems = (check_finite_range(n, feeds[n], *lim) for n, lim in self.ranges.items())
            problem = next((p for p in problems if p), None)
            if problem:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(problem, pb_utils.TritonError.INVALID_ARG)
                )
            else:
                batch.append((i, feeds))
        if not batch:
            return responses
        merged = {n: np.concatenate([f[n] for _, f in batch]) for n in self.inputs}
        try:
            results = self.session.run(self.outputs, merged)
        except Exception as err:  # answer every request rather than failing the batch
            for i, _ in batch:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(
                        f"onnxruntime failed: {err}", pb_utils.TritonError.INTERNAL
                    )
                )
            return responses
        start = 0
        for i, feeds in batch:
            n = len(feeds[self.inputs[0]])
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(r[start : start + n]))
                for name, r in zip(self.outputs, results, strict=True)
            ]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += n
        return responses
