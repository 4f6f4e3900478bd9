"""ONNX export of the three networks, each checked against torch with onnxruntime.

The graphs are ``builders.graphs`` (the modules the offline torch pipeline runs too), exported
with dynamic batch and sides (the spec's ``dynamic_axes``) and checked at several LR sizes,
non-multiples included. Each ONNX file records the geometry it was traced with in its
metadata (``vae_factor``, ``lr_multiple``), which ``train.pipeline.OnnxPipeline`` reads.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from cxr_sr.builders.graphs import (
    export_attention,
    graphs,
    lr_multiple,
    unet_factor,
    vae_factor,
)
from cxr_sr.builders.specs import NetworkSpec
from cxr_sr.train.checkpoint import Checkpoint

log = logging.getLogger(__name__)
OPSET = 17


def export_onnx(
    ckpt: Checkpoint,
    spec: NetworkSpec,
    path: str | Path,
    *,
    dynamo: bool = False,
    attention: str = "headwise",
) -> Path:
    """Export one network with dynamic batch and sides; returns the path written.

    ``attention``: how attention layers are written (``builders.graphs.ATTENTION``):
    ``headwise`` (portable ONNX, what TensorRT parses) or ``fused`` (onnxruntime's
    ``com.microsoft.MultiHeadAttention``; TorchScript exporter only)."""
    if dynamo and attention == "fused":
        raise ValueError("fused attention needs the TorchScript exporter (dynamo=False)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = graphs(ckpt.vae, ckpt.denoiser)[spec.name]
    example = spec.example_inputs(spec.opt_batch)
    args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad(), export_attention(module, attention), warnings.catch_warnings():
        # The tracer flags two branches of diffusers' Upsample2D on the batch size (>= 64) and
        # the element count (> 2**31): both only add a .contiguous() (a PyTorch kernel
        # workaround) and give the same numbers, so baking either in is harmless.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript")
        if dynamo:
            torch.onnx.export(
                module,
                args,
                tmp,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamo=True,
                dynamic_shapes=_dynamo_shapes(spec),
                external_data=False,
            )
        else:
            torch.onnx.export(
                module,
                args,
                tmp,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                opset_version=OPSET,
                dynamo=False,
                custom_opsets={"com.microsoft": 1} if attention == "fused" else None,
            )
    _write_metadata(tmp, ckpt)
    tmp.replace(path)
    return path


def _dynamo_shapes(spec: NetworkSpec) -> tuple[dict[int, object], ...]:
    """``dynamic_shapes`` for the dynamo exporter: the spec's dynamic axes as ``Dim``s, one
    per symbol, so tensors on one grid share their sides."""
    dims: dict[str, object] = {}
    shapes = []
    axes = spec.dynamic_axes()
    for t in spec.inputs:
        shapes.append(
            {i: dims.setdefault(name, torch.export.Dim(name)) for i, name in axes[t.name].items()}
        )
    return tuple(shapes)


def geometry_metadata(ckpt: Checkpoint) -> dict[str, str]:
    """What an ONNX file records about the pipeline's geometry (see the module docstring)."""
    f = vae_factor(ckpt.vae)
    return {"vae_factor": str(f), "lr_multiple": str(lr_multiple(f, unet_factor(ckpt.denoiser)))}


def _write_metadata(path: Path, ckpt: Checkpoint) -> None:
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, geometry_metadata(ckpt))
    onnx.save(model, str(path))


def check_sizes(spec: NetworkSpec) -> tuple[tuple[int, tuple[int, int]], ...]:
    """(batch, LR size) cases :func:`check_onnx` runs: the opt size at batch 1 and 3, the
    smallest side, and a non-multiple size that needs padding and cropping."""
    g = spec.geometry
    odd = (g.min_side + g.multiple + 1, g.min_side + 2 * g.multiple - 1)
    return (
        (1, (g.opt_side, g.opt_side)),
        (3, (g.opt_side, g.opt_side)),
        (2, odd),
        (1, (g.min_side, g.min_side)),
    )


def check_onnx(ckpt: Checkpoint, spec: NetworkSpec, path: str | Path) -> float:
    """Max abs difference between onnxruntime and torch over the :func:`check_sizes` cases."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    module = graphs(ckpt.vae, ckpt.denoiser)[spec.name]
    worst = 0.0
    for b, size in check_sizes(spec):
        feeds = spec.example_inputs(b, seed=b, lr_size=size)
        (got,) = session.run(spec.output_names, feeds)
        with torch.no_grad():
            want = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names)).numpy()
        if got.shape != want.shape:
            raise RuntimeError(f"{spec.name}: onnx shape {got.shape} != torch {want.shape}")
        worst = max(worst, float(np.max(np.abs(got - want))))
    return worst
