"""Triton Python-backend model running one served network in PyTorch (the ``torch`` target).

Used for ``vae_encoder``, ``unet`` and ``vae_decoder`` where no TensorRT plan exists:
``builders.build --target torch`` copies this file and the checkpoint (``checkpoint/``) next
to each model's config. The network is ``builders.graphs.TorchStage``, the same module the
ONNX graphs are exported from: on CUDA in fp16 (config parameter ``precision``: fp16 | fp32),
on the CPU in fp32 (``device``: auto | cuda | cpu; auto takes CUDA when torch sees a GPU).

Tensors stay on the GPU (config parameter ``io`` "dlpack"): with
``FORCE_CPU_ONLY_INPUT_TENSORS`` "no", inputs that another model left in GPU memory arrive there
and are read through DLPack, and outputs are handed back through DLPack without a host copy.
``io`` "host" hands every output back in host memory instead. Tensors cross to and from
Triton through DLPack in host memory as well, never through the stub's numpy bridge: the
``nvidia-pytriton`` wheel's stub is built against numpy 1.x, and under numpy 2 that bridge
reads arrays with a zero item size (outputs arrive empty, inputs garbled; measured on a GPU
machine whose Python had numpy 2.5). Requests of equal shapes run as
one call (in chunks of at most ``max_batch_pixels``); inputs named in ``input_ranges`` /
``input_sides`` are checked per request, and a bad request gets its own INVALID_ARG while the
rest of the batch is served.

On CUDA (``batch_buckets`` "auto"; "true" / "false" force it) a call runs at its batch
bucket's size (zero rows appended, results cut back: ``builders.graphs.run_in_calls``), so the
network sees a handful of batch sizes instead of every size the dynamic batcher forms, and
each bucket runs once at load time, before the server reports ready, with the per-item input
shapes in ``warmup_shapes`` (JSON ``{input: [C, H, W]}``, the opt side's, written by the
builder): cuDNN's autotuning is paid there, not inside the first requests' latency.
"""

import json
import time
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from cxr_sr.builders.graphs import TorchStage, bucket_sizes, run_in_calls
from cxr_sr.serving import InputChecks, model_parameters, parse_flag
from cxr_sr.train.checkpoint import load


def _device(name: str, instance_gpu: str) -> torch.device:
    """auto: the instance's GPU when torch sees one, else the CPU; cuda: the instance's GPU
    (a KIND_GPU instance is given its device id); cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device(f"cuda:{int(instance_gpu or 0)}")
    return torch.device(name)


class TritonPythonModel:
    def initialize(self, args):
        config, params = model_parameters(args)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.checks = InputChecks.from_parameters(params)
        self.max_pixels = int(params.get("max_batch_pixels", "0")) or None
        self.device = _device(params.get("device", "auto"), args.get("model_instance_device_id"))
        self.host_io = params.get("io", "dlpack") == "host"
        half = self.device.type == "cuda" and params.get("precision", "fp16") == "fp16"
        threads = int(params.get("intra_op_threads", "0"))
        if self.device.type == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = True
        here = Path(args["model_repository"]) / args["model_version"]
        ckpt = load(here / "checkpoint")
        self.network = params["network"]
        self.stage = TorchStage(ckpt.vae, ckpt.denoiser, self.network, self.device, half)
        self.max_batch = int(config["max_batch_size"])
        on_gpu = self.device.type == "cuda"
        buckets = params.get("batch_buckets", "auto")
        self.buckets = on_gpu if buckets == "auto" else parse_flag(buckets)
        shapes = json.loads(params.get("warmup_shapes", "{}"))
        if on_gpu and shapes:
            try:
                self._warm(shapes)
            except Exception as err:  # noqa: BLE001 - the first requests then pay instead
                pb_utils.Logger.log_warn(f"{self.network}: warm-up failed: {err}")

    def _warm(self, shapes):
        """Every batch bucket once, zeros of the opt side's shapes (``warmup_shapes``)."""
        start = time.perf_counter()
        first = shapes[self.inputs[0]]
        sizes = bucket_sizes(int(first[-1] * first[-2]), self.max_pixels, self.max_batch)
        for rows in sizes:
            feeds = [torch.zeros((rows, *shapes[n]), device=self.device) for n in self.inputs]
            self._call(feeds)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        pb_utils.Logger.log_info(
            f"{self.network}: warmed for batches {sizes} in {time.perf_counter() - start:.1f} s"
        )

    def _call(self, merged):
        """The network over a merged batch (``builders.graphs.run_in_calls``)."""
        return run_in_calls(self.stage, merged, self.max_pixels, self.max_batch, self.buckets)

    def _tensor(self, tensor) -> torch.Tensor:
        """A request's input as a torch tensor, without a copy, through DLPack in host memory
        too: the stub's numpy bridge misreads arrays under numpy 2 (module docstring)."""
        return from_dlpack(tensor.to_dlpack())

    def execute(self, requests):
        responses = [None] * len(requests)
        batches = {}  # input shapes -> [(request index, {name: tensor})]
        for i, request in enumerate(requests):
            feeds = {
                n: self._tensor(pb_utils.get_input_tensor_by_name(request, n)) for n in self.inputs
            }
            problem = self.checks.problem(feeds, lambda x: x.float().cpu().numpy())
            if problem:
                responses[i] = _error(problem, pb_utils.TritonError.INVALID_ARG)
            else:
                shapes = tuple(tuple(feeds[n].shape[1:]) for n in self.inputs)
                batches.setdefault(shapes, []).append((i, feeds))
        for batch in batches.values():
            self._run(batch, responses)
        return responses

    def _run(self, batch, responses):
        merged = [torch.cat([f[n] for _, f in batch]) for n in self.inputs]
        try:
            out = self._call(merged)
            if out.is_cuda:  # Triton reads the memory from another stream and process
                torch.cuda.current_stream(out.device).synchronize()
        except Exception as err:  # answer every request rather than failing the batch
            for i, _ in batch:
                responses[i] = _error(f"torch failed: {err}", pb_utils.TritonError.INTERNAL)
            return
        start = 0
        for i, feeds in batch:
            n = len(feeds[self.inputs[0]])
            part = out[start : start + n]
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[_output(self.outputs[0], part.cpu() if self.host_io else part)]
            )
            start += n


def _output(name: str, x: torch.Tensor):
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(x.contiguous()))


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
