"""config.pbtxt from specs, through tritonclient's ``model_config_pb2`` and ``text_format``.

Image sides are ``-1`` dims: Triton accepts any size there and its dynamic batcher only
merges requests whose shapes are equal (no ``allow_ragged_batch``), so requests of one size
share batches and requests of different sizes are never concatenated. The served range of
LR sides is checked by the Python models (``input_sides`` on the networks that take ``LR``,
``latent_sides`` on the sampler, which also covers the gpu target's ONNX Runtime encoder) and
published as parameters of the ensemble (``lr_min_side``, ``lr_max_side``, ``lr_multiple``)
for clients to read with ``get_model_config``. ``max_batch_pixels`` caps what one session (or
UNet) call takes: a full batch at the opt size (64x64), one image at the largest sizes, so a
model process's memory does not grow with batch x pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from cxr_sr.builders.specs import ENSEMBLE, SAMPLER, NetworkSpec, TensorSpec

TARGETS = ("cpu", "gpu")


def _dtype(name: str) -> int:
    return mc.DataType.Value(f"TYPE_{name}")


def _io(cls, tensors: tuple[TensorSpec, ...]):
    return [cls(name=t.name, data_type=_dtype(t.dtype), dims=list(t.shape)) for t in tensors]


def _batching(config: mc.ModelConfig, max_batch: int, queue_delay_us: int) -> None:
    config.max_batch_size = max_batch
    db = config.dynamic_batching
    db.preferred_batch_size.extend(sorted({max(1, max_batch // 2), max_batch}))
    db.max_queue_delay_microseconds = queue_delay_us


def network_config(
    spec: NetworkSpec,
    target: str,
    *,
    instances: int = 1,
    queue_delay_us: int = 2000,
    parameters: dict[str, str] | None = None,
    env_path: str | None = None,
) -> mc.ModelConfig:
    """A network's config: Python+onnxruntime on ``cpu``; TensorRT UNet + ORT VAE on ``gpu``."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    config = mc.ModelConfig(name=spec.name)
    config.input.extend(_io(mc.ModelInput, spec.inputs))
    config.output.extend(_io(mc.ModelOutput, spec.outputs))
    _batching(config, spec.max_batch, queue_delay_us)
    group = config.instance_group.add()
    group.count = instances
    if target == "cpu":
        config.backend = "python"
        group.kind = mc.ModelInstanceGroup.KIND_CPU
    else:
        group.kind = mc.ModelInstanceGroup.KIND_GPU
        if spec.name == "unet":
            config.platform = "tensorrt_plan"
        else:
            config.platform = "onnxruntime_onnx"
    params = dict(parameters or {})
    if config.backend == "python" and "LR" in spec.input_names:
        g = spec.geometry
        params.setdefault("input_ranges", json.dumps({"LR": [0.0, 1.0]}))
        params.setdefault("input_sides", json.dumps({"LR": [g.min_side, g.max_side]}))
    if config.backend == "python":
        params.setdefault("max_batch_pixels", str(spec.batch_pixels()))
    if env_path and config.backend == "python":
        params["EXECUTION_ENV_PATH"] = env_path
    for key, value in params.items():
        config.parameters[key].string_value = str(value)
    return config


def sampler_config(
    unet: NetworkSpec,
    *,
    instances: int = 1,
    queue_delay_us: int = 2000,
    gpu: bool = False,
    env_path: str | None = None,
) -> mc.ModelConfig:
    """The BLS sampler: z_lr -> z, calling ``unet`` once per step."""
    z_lr = next(t for t in unet.inputs if t.name == "z_lr")
    config = mc.ModelConfig(name=SAMPLER, backend="python")
    config.input.extend(_io(mc.ModelInput, (z_lr,)))
    config.output.extend(_io(mc.ModelOutput, (TensorSpec("z", z_lr.shape, grid=z_lr.grid),)))
    _batching(config, unet.max_batch, queue_delay_us)
    group = config.instance_group.add()
    group.count = instances
    group.kind = mc.ModelInstanceGroup.KIND_CPU  # the loop is host code; tensors stay where unet is
    params = {
        "unet_model": unet.name,
        "unet_inputs": ",".join(unet.input_names),
        "unet_output": unet.output_names[0],
        "vae_factor": str(unet.geometry.vae_factor),
        "latent_sides": ",".join(map(str, unet.geometry.latent_sides())),
        "max_batch_pixels": str(unet.batch_pixels()),
    }
    if env_path:
        params["EXECUTION_ENV_PATH"] = env_path
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def ensemble_config(specs: dict[str, NetworkSpec]) -> mc.ModelConfig:
    """``cxr_sr``: LR -> vae_encoder -> sampler -> vae_decoder -> SR."""
    enc, dec = specs["vae_encoder"], specs["vae_decoder"]
    config = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=enc.max_batch)
    config.input.extend(_io(mc.ModelInput, enc.inputs))
    config.output.extend(_io(mc.ModelOutput, dec.outputs))
    g = enc.geometry
    sizes = {"lr_min_side": g.min_side, "lr_max_side": g.max_side, "lr_multiple": g.multiple}
    for key, value in sizes.items():
        config.parameters[key].string_value = str(value)
    steps = [
        (enc.name, {"LR": "LR"}, {"z_lr": "z_lr"}),
        (SAMPLER, {"z_lr": "z_lr"}, {"z": "z"}),
        (dec.name, {"z": "z", "LR": "LR"}, {"SR": "SR"}),
    ]
    for model, inputs, outputs in steps:
        step = config.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        for k, v in inputs.items():
            step.input_map[k] = v
        for k, v in outputs.items():
            step.output_map[k] = v
    return config


def write_config(config: mc.ModelConfig, model_dir: str | Path) -> Path:
    path = Path(model_dir) / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(config))
    return path


def read_config(path: str | Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
