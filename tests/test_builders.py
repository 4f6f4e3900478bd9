"""Builders: specs drive ONNX and configs; both targets; cached, idempotent stages."""

from __future__ import annotations

import onnx
import pytest

from cxr_sr.builders import build
from cxr_sr.builders.specs import NETWORKS, NetworkSpec, TensorSpec, network_specs
from cxr_sr.builders.triton_config import read_config


@pytest.fixture(scope="module")
def built(checkpoint, built_repository, tmp_path_factory):
    """The shared cpu repository (conftest.py) plus a gpu one from the same ONNX files.

    Returns (folders, build args): folders["cpu"|"gpu"|"onnx"]. The gpu build reuses the
    cached ONNX export, so it only writes configs (``--engine skip``: no TensorRT here).
    """
    cpu, onnx_dir = built_repository
    gpu = tmp_path_factory.mktemp("b") / "gpu"
    args = ["--checkpoint", str(checkpoint), "--onnx-dir", str(onnx_dir), "--max-batch", "4"]
    assert build.main([*args, "--out", str(gpu), "--target", "gpu", "--engine", "skip"]) == 0
    return {"cpu": cpu, "gpu": gpu, "onnx": onnx_dir}, args


def test_onnx_io_matches_spec(built):
    root, _ = built
    specs = network_specs((4, 64, 64), max_batch=4)  # f = 4 for the shared tiny VAE
    for name in NETWORKS:
        graph = onnx.load(root["onnx"] / f"{name}.onnx").graph
        spec = specs[name]
        assert [i.name for i in graph.input] == spec.input_names
        assert [o.name for o in graph.output] == spec.output_names
        for value, tensor in zip(graph.input, spec.inputs, strict=True):
            dims = value.type.tensor_type.shape.dim
            assert dims[0].dim_param == "batch"
            assert tuple(d.dim_value for d in dims[1:]) == tensor.shape


def test_cpu_and_gpu_configs(built):
    root, _ = built
    for name in NETWORKS:
        cpu, gpu = (
            read_config(root["cpu"] / name / "config.pbtxt"),
            read_config(root["gpu"] / name / "config.pbtxt"),
        )
        assert cpu.backend == "python" and (root["cpu"] / name / "1" / "model.py").is_file()
        assert gpu.platform == ("tensorrt_plan" if name == "unet" else "onnxruntime_onnx")
        assert cpu.input == gpu.input and cpu.output == gpu.output
        assert cpu.max_batch_size == gpu.max_batch_size == 4
        assert cpu.dynamic_batching.max_queue_delay_microseconds > 0
    assert not (root["gpu"] / "unet" / "1" / "model.plan").exists()  # --engine skip
    assert (root["gpu"] / "vae_decoder" / "1" / "model.onnx").is_file()
    assert read_config(root["cpu"] / "cxr_sr" / "config.pbtxt") == read_config(
        root["gpu"] / "cxr_sr" / "config.pbtxt"
    )


def test_ensemble_wires_the_stages(built):
    root, _ = built
    ens = read_config(root["cpu"] / "cxr_sr" / "config.pbtxt")
    assert ens.platform == "ensemble"
    assert [s.model_name for s in ens.ensemble_scheduling.step] == [
        "vae_encoder",
        "sampler",
        "vae_decoder",
    ]
    assert [i.name for i in ens.input] == ["LR"] and [o.name for o in ens.output] == ["SR"]
    assert not ens.HasField("response_cache")  # outputs depend on request parameters
    sampler = read_config(root["cpu"] / "sampler" / "config.pbtxt")
    assert sampler.parameters["unet_inputs"].string_value == "x_t,timestep,z_lr"
    assert (root["cpu"] / "sampler" / "1" / "scheduler_config.json").is_file()


def test_export_is_cached(built, capsys, tmp_path):
    root, args = built
    before = (root["onnx"] / "unet.onnx").stat().st_mtime_ns
    # a fresh --out: the shared repository may be serving (conftest.server)
    assert build.main([*args, "--out", str(tmp_path / "cpu")]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (root["onnx"] / "unet.onnx").stat().st_mtime_ns == before


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert build.main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_profile_and_bad_batches():
    spec = network_specs((4, 32, 32), max_batch=8)["unet"]
    assert spec.profile()["x_t"] == ((1, 4, 32, 32), (4, 4, 32, 32), (8, 4, 32, 32))
    assert spec.profile()["timestep"][2] == (8, 1)
    with pytest.raises(ValueError):
        NetworkSpec("x", (TensorSpec("a", (1,)),), (), min_batch=4, opt_batch=2, max_batch=8)
