"""The ``torch`` target: the networks as Python-backend PyTorch models (the fallback where no
TensorRT plan exists), served by the real tritonserver on the CPU here and held to the cpu
(onnxruntime) target's results, request for request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_sr.builders import build
from cxr_sr.builders.graphs import HALF_INPUTS, TorchStage, graphs
from cxr_sr.builders.serve import TritonServer
from cxr_sr.builders.triton_config import read_config, write_config
from cxr_sr.client import SRClient
from cxr_sr.train.checkpoint import load

STEPS = 2


@pytest.fixture(scope="module")
def torch_repository(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch") / "repo"
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--target", "torch"]
    assert build.main([*args, "--max-batch", "4", "--max-side", "128"]) == 0
    for name in HALF_INPUTS:  # buckets are for CUDA ("auto"): on here, so padding runs too
        config = read_config(out / name / "config.pbtxt")
        assert config.parameters["batch_buckets"].string_value == "auto"
        config.parameters["batch_buckets"].string_value = "true"
        write_config(config, out / name)
    return out


@pytest.fixture(scope="module")
def fused_repository(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused") / "repo"
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--target", "torch"]
    args += ["--torch-layout", "fused", "--max-batch", "4", "--max-side", "128"]
    assert build.main(args) == 0
    # buckets are for CUDA ("auto"); on here too, so the padding path runs on the CPU
    config = read_config(out / "sampler" / "config.pbtxt")
    assert config.parameters["batch_buckets"].string_value == "auto"
    config.parameters["batch_buckets"].string_value = "true"
    write_config(config, out / "sampler")
    return out


@pytest.fixture(scope="module")
def torch_server(torch_repository):
    with TritonServer(torch_repository, log_file=torch_repository.parent / "triton.log") as s:
        yield s


@pytest.mark.slow
def test_torch_repository_layout(torch_repository, checkpoint):
    for name in HALF_INPUTS:
        version = torch_repository / name / "1"
        assert (version / "model.py").is_file()
        assert (version / "checkpoint" / "cxr_sr.json").read_bytes() == (
            checkpoint / "cxr_sr.json"
        ).read_bytes()
        assert not (version / "model.onnx").exists()
        config = read_config(torch_repository / name / "config.pbtxt")
        assert config.backend == "python"
        assert config.parameters["network"].string_value == name
        assert config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    sampler = read_config(torch_repository / "sampler" / "config.pbtxt")
    assert sampler.parameters["loop_device"].string_value == "torch-auto"
    delays = {
        name: read_config(torch_repository / name / "config.pbtxt").dynamic_batching
        for name in ("vae_encoder", "unet", "sampler", "vae_decoder")
    }
    assert {n: d.max_queue_delay_microseconds for n, d in delays.items()} == {
        "vae_encoder": 2000,  # --queue-delay-us's default
        "unet": 0,  # its batches come whole from the sampler
        "sampler": 2000,
        "vae_decoder": 2000,
    }


def test_cuda_build_asks_for_gpu_instances_and_a_gpu_resident_loop(checkpoint, tmp_path):
    """What --torch-device cuda writes (checked without a GPU: configs only)."""
    from cxr_sr.builders.specs import network_specs
    from cxr_sr.builders.triton_config import network_config, sampler_config

    specs = network_specs(4, build.S.Geometry(), 64)
    unet = network_config(specs["unet"], "torch", torch_device="cuda", precision="fp16")
    assert unet.instance_group[0].kind == unet.instance_group[0].KIND_GPU
    assert unet.parameters["device"].string_value == "cuda"
    loop = sampler_config(specs["unet"], loop_device="torch-cuda")
    assert loop.parameters["loop_device"].string_value == "torch-cuda"
    assert loop.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    # a GPU takes a dynamic batch of 64 at the opt side (64x64 LR) in one call; the host
    # target keeps a call to one image of the largest side (256x256 LR): 16 of them
    full, largest = 64 * 64 * 64, 256 * 256
    # what each bucket is warmed with at load time: the opt side's (64x64 LR) input shapes
    shapes = json.loads(unet.parameters["warmup_shapes"].string_value)
    assert shapes == {"x_t": [4, 64, 64], "timestep": [1], "z_lr": [4, 64, 64]}
    assert unet.parameters["max_batch_pixels"].string_value == str(full)
    assert loop.parameters["max_batch_pixels"].string_value == str(full)
    auto = network_config(specs["unet"], "torch", torch_device="auto")
    assert auto.parameters["max_batch_pixels"].string_value == str(largest)
    fused = sampler_config(specs["unet"], loop_device="torch-cuda", fused=specs)
    assert set(json.loads(fused.parameters["stage_batch_pixels"].string_value).values()) == {full}
    fused = sampler_config(specs["unet"], loop_device="torch-cpu", fused=specs)
    assert set(json.loads(fused.parameters["stage_batch_pixels"].string_value).values()) == {
        largest
    }
    with pytest.raises(ValueError, match="precision"):
        network_config(specs["unet"], "torch", precision="int8")
    host = network_config(specs["unet"], "torch", torch_device="cuda", torch_io="host")
    assert host.parameters["io"].string_value == "host"
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in host.parameters


def test_fused_layout_is_one_model_behind_the_ensemble(fused_repository, checkpoint):
    """--torch-layout fused: no separate network models; the sampler takes LR to SR with the
    checkpoint beside it and the encoder's checks, and cxr_sr has it as its only step."""
    assert sorted(p.name for p in fused_repository.iterdir()) == ["cxr_sr", "sampler"]
    sampler = read_config(fused_repository / "sampler" / "config.pbtxt")
    assert [t.name for t in sampler.input] == ["LR"] and [t.name for t in sampler.output] == ["SR"]
    params = {k: v.string_value for k, v in sampler.parameters.items()}
    assert params["layout"] == "fused" and params["loop_device"] == "torch-auto"
    assert params["input_sides"] == '{"LR": [16, 128]}'
    assert set(json.loads(params["stage_batch_pixels"])) == set(HALF_INPUTS)
    assert (fused_repository / "sampler" / "1" / "checkpoint" / "cxr_sr.json").read_bytes() == (
        checkpoint / "cxr_sr.json"
    ).read_bytes()
    ensemble = read_config(fused_repository / "cxr_sr" / "config.pbtxt")
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["sampler"]
    assert params["lr_multiple"] == ensemble.parameters["lr_multiple"].string_value


def test_fused_layout_options_are_checked(checkpoint, tmp_path, capsys):
    from cxr_sr.builders.specs import network_specs
    from cxr_sr.builders.triton_config import sampler_config

    base = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "r")]
    assert build.main([*base, "--torch-layout", "fused"]) == 2  # target cpu
    assert "--torch-layout is for --target torch" in capsys.readouterr().err
    assert build.main([*base, "--target", "torch", "--cuda-graphs"]) == 2
    assert "--cuda-graphs needs" in capsys.readouterr().err
    assert build.main([*base, "--target", "torch", "--queue-delay-us", "-1"]) == 2
    assert "--queue-delay-us must be in" in capsys.readouterr().err
    fused = [*base, "--target", "torch", "--torch-layout", "fused", "--max-side", "128"]
    assert build.main([*fused, "--queue-delay-us", "0"]) == 0  # batch-1 latency first
    sampler = read_config(tmp_path / "r" / "sampler" / "config.pbtxt")
    assert sampler.dynamic_batching.max_queue_delay_microseconds == 0
    # the same folder rebuilt with separate models: nothing of the fused layout is left
    assert build.main([*base, "--target", "torch", "--max-side", "128"]) == 0
    assert not (tmp_path / "r" / "sampler" / "1" / "checkpoint").exists()
    assert (tmp_path / "r" / "unet" / "1" / "model.py").is_file()
    again = read_config(tmp_path / "r" / "sampler" / "config.pbtxt")
    assert "layout" not in again.parameters and [t.name for t in again.input] == ["z_lr"]
    specs = network_specs(4, build.S.Geometry(), 4)
    with pytest.raises(ValueError, match="torch networks"):
        sampler_config(specs["unet"], fused=specs)  # a numpy loop cannot run them
    gpu = sampler_config(specs["unet"], loop_device="torch-cuda", fused=specs, cuda_graphs=True)
    assert gpu.instance_group[0].kind == gpu.instance_group[0].KIND_GPU
    assert gpu.parameters["cuda_graphs"].string_value == "true"


def test_the_onnxruntime_arena_is_a_build_choice():
    """cpu target: the arena is on unless --no-ort-arena (speed vs memory, README "Memory")."""
    from cxr_sr.builders.specs import network_specs
    from cxr_sr.builders.triton_config import network_config

    unet = network_specs(4, build.S.Geometry(), 4)["unet"]
    assert network_config(unet, "cpu").parameters["ort_cpu_mem_arena"].string_value == "true"
    off = network_config(unet, "cpu", ort_arena=False)
    assert off.parameters["ort_cpu_mem_arena"].string_value == "false"
    assert build.parse_args([]).ort_arena and not build.parse_args(["--no-ort-arena"]).ort_arena


def test_cpu_lanes_are_a_build_choice(checkpoint, tmp_path, capsys):
    """cpu target: cpu_lanes (cxr_sr.ort_cpu) is written from --cpu-lanes, auto by default,
    and a bad value stops the build before anything is written."""
    from cxr_sr.builders.specs import network_specs
    from cxr_sr.builders.triton_config import network_config

    unet = network_specs(4, build.S.Geometry(), 4)["unet"]
    assert network_config(unet, "cpu").parameters["cpu_lanes"].string_value == "auto"
    assert network_config(unet, "cpu", cpu_lanes="1").parameters["cpu_lanes"].string_value == "1"
    assert "cpu_lanes" not in network_config(unet, "torch").parameters
    assert build.parse_args([]).cpu_lanes == "auto"
    out = tmp_path / "repo"
    for bad, message in [("two", "'auto' or an integer, got 'two'"), ("0", "got 0")]:
        args = ["--checkpoint", str(checkpoint), "--out", str(out), "--cpu-lanes", bad]
        assert build.main(args) == 2
        err = capsys.readouterr().err
        assert "--cpu-lanes" in err and message in err
        assert not out.exists()


def test_onnxruntime_spinning_is_a_build_choice(capsys):
    """cpu target: intra_op_spinning is written from --cpu-spinning, run by default; a value
    that is not a mode stops the parse, naming the choices."""
    from cxr_sr.builders.specs import network_specs
    from cxr_sr.builders.triton_config import network_config

    unet = network_specs(4, build.S.Geometry(), 4)["unet"]
    assert network_config(unet, "cpu").parameters["intra_op_spinning"].string_value == "run"
    off = network_config(unet, "cpu", cpu_spinning="off")
    assert off.parameters["intra_op_spinning"].string_value == "off"
    assert "intra_op_spinning" not in network_config(unet, "torch").parameters
    assert build.parse_args([]).cpu_spinning == "run"
    assert build.parse_args(["--cpu-spinning", "on"]).cpu_spinning == "on"
    with pytest.raises(SystemExit):
        build.parse_args(["--cpu-spinning", "always"])
    assert "--cpu-spinning: invalid choice: 'always'" in capsys.readouterr().err


def test_torch_stage_fp32_is_the_exported_module(checkpoint):
    ckpt = load(checkpoint)
    lr = torch.rand(2, 1, 20, 24)
    stage = TorchStage(ckpt.vae, ckpt.denoiser, "vae_encoder")
    reference = graphs(ckpt.vae, ckpt.denoiser)["vae_encoder"]
    with torch.no_grad():
        torch.testing.assert_close(stage(lr), reference(lr))
    with pytest.raises(ValueError, match="network"):
        TorchStage(ckpt.vae, ckpt.denoiser, "sampler")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (1, 1, 37, 50)])
def test_torch_target_serves_what_the_onnxruntime_target_serves(server, torch_server, shape):
    """Same request, same seed: the torch target (PyTorch fp32 on CPU) and the cpu target
    (onnxruntime) give the same SR to float tolerance, at the reference size and an odd one."""
    lr = np.random.default_rng(sum(shape)).random(shape).astype(np.float32)
    with SRClient(torch_server.http_url) as c:
        served_torch = c.super_resolve(lr, steps=STEPS, seed=4)
        again = c.super_resolve(lr, steps=STEPS, seed=4)
    with SRClient(server.http_url) as c:
        served_onnx = c.super_resolve(lr, steps=STEPS, seed=4)
    assert served_torch.shape == (shape[0], 1, 4 * shape[2], 4 * shape[3])
    np.testing.assert_array_equal(served_torch, again)
    np.testing.assert_allclose(served_torch, served_onnx, atol=2e-4)


@pytest.mark.integration
@pytest.mark.slow
def test_fused_layout_serves_what_the_separate_models_serve(torch_server, fused_repository):
    """Same requests, same seeds: one fused model gives the separate models' SR, for a batch
    of 3 at an odd size (padded to a bucket of 4 and cut back); a bad request gets its own 400
    naming the problem and the next is served."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    lr = np.random.default_rng(7).random((3, 1, 37, 50)).astype(np.float32)
    with SRClient(torch_server.http_url) as c:
        separate = c.super_resolve(lr, steps=STEPS, seed=5)
    log = fused_repository.parent / "triton.log"
    with TritonServer(fused_repository, log_file=log) as fused, SRClient(fused.http_url) as c:
        np.testing.assert_allclose(c.super_resolve(lr, steps=STEPS, seed=5), separate, atol=1e-5)
        raw = http.InferenceServerClient(fused.http_url)
        for bad, message in [
            (np.full((1, 1, 32, 32), 2.0, np.float32), "intensities"),
            (np.full((1, 1, 8, 32), 0.5, np.float32), "LR"),
        ]:
            request = http.InferInput("LR", list(bad.shape), "FP32")
            request.set_data_from_numpy(bad)
            with pytest.raises(InferenceServerException, match=message) as err:
                raw.infer("cxr_sr", [request])
            assert err.value.status() == "400"
        assert c.super_resolve(lr[:1], steps=1).shape == (1, 1, 148, 200)


@pytest.mark.integration
@pytest.mark.slow
def test_host_io_serves_the_same_through_a_torch_loop_on_the_host(
    torch_server, checkpoint, tmp_path
):
    """--torch-io host: every hop through host memory, the sampler's loop on torch CPU tensors
    (DLPack, not the stub's numpy bridge), and the same SR as the DLPack repository."""
    out = tmp_path / "repo"
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--target", "torch"]
    assert build.main([*args, "--torch-io", "host", "--max-batch", "4", "--max-side", "128"]) == 0
    sampler = read_config(out / "sampler" / "config.pbtxt")
    assert sampler.parameters["loop_device"].string_value == "torch-cpu"
    lr = np.random.default_rng(8).random((1, 1, 40, 32)).astype(np.float32)
    with SRClient(torch_server.http_url) as c:
        dlpack = c.super_resolve(lr, steps=STEPS, seed=6)
    with TritonServer(out, log_file=tmp_path / "triton.log") as host, SRClient(host.http_url) as c:
        np.testing.assert_array_equal(c.super_resolve(lr, steps=STEPS, seed=6), dlpack)


@pytest.mark.integration
@pytest.mark.slow
def test_torch_target_refuses_bad_pixels_and_keeps_serving(torch_server):
    """A request with out-of-range values gets its own 400 from the torch encoder (checked
    with tritonclient directly: SRClient would refuse it before sending)."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(torch_server.http_url)
    bad = np.full((1, 1, 32, 32), 2.0, np.float32)
    request = http.InferInput("LR", list(bad.shape), "FP32")
    request.set_data_from_numpy(bad)
    with pytest.raises(InferenceServerException, match="intensities") as err:
        client.infer("cxr_sr", [request])
    assert err.value.status() == "400"
    with SRClient(torch_server.http_url) as c:
        assert c.super_resolve(np.full((1, 1, 32, 32), 0.5, np.float32), steps=1).shape == (
            1,
            1,
            128,
            128,
        )


def test_gpu_benchmark_compares_each_stage_with_its_in_process_twin(torch_server, checkpoint):
    """``benchmarks.gpu``'s diagnosis calls every served model with the in-process pipeline's
    input for it: nothing differs on the CPU, and a stage that computes something else shows up
    alone (with the whole pipeline), not in the stages around it."""
    from benchmarks.gpu import InProcess, stage_differences

    pipe = InProcess(load(checkpoint), torch.device("cpu"), half=False)
    lr = np.random.default_rng(0).random((1, 1, 32, 28), dtype=np.float32)
    same = stage_differences(torch_server.grpc_url, pipe, lr, seed=3)
    assert set(same) == {"vae_encoder", "unet", "sampler", "vae_decoder", "cxr_sr"}
    assert max(same.values()) < 1e-4, same

    decoder = pipe.stages["vae_decoder"]
    pipe.stages["vae_decoder"] = lambda z, lr: decoder(z, lr) * 0.5
    off = stage_differences(torch_server.grpc_url, pipe, lr, seed=3)
    assert off["vae_decoder"] > 0.05 and off["cxr_sr"] > 0.05, off
    assert max(off[k] for k in ("vae_encoder", "unet", "sampler")) < 1e-4, off


@pytest.mark.integration
@pytest.mark.slow
def test_gpu_benchmark_runs_its_variants_on_the_cpu(checkpoint, tmp_path):
    """``benchmarks.gpu --device cpu``: the script a GPU session relies on builds and serves
    its variants and writes the report (a broken script would waste scarce GPU minutes)."""
    from benchmarks.gpu import main

    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--checkpoint", str(checkpoint), "--sides", "32", "--reps", "2"]
    args += ["--batch", "2", "--max-batch", "4", "--variants", "fused", "--concurrency", ""]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (fused,) = report["variants"]
    assert fused["variant"] == "fused" and "error" not in fused, fused
    assert fused["served_vs_in_process_max_abs"] < 1e-4
    assert fused["served_repeat_max_abs"] == 0.0
    assert {r["path"] for r in report["rows"]} == {
        "in-process eager",
        "served fused (gRPC, batch 1)",
    }


def test_run_in_calls_chunks_and_buckets_without_changing_rows():
    """A batch of 7 under a budget of 4 rows per call: calls of 4 and 3 rows; with buckets the
    second runs padded to 4 and is cut back; the result is the unchunked one either way."""
    from cxr_sr.builders.graphs import bucket_sizes, run_in_calls

    x = torch.randn(7, 2, 4, 4)
    t = torch.arange(7.0).reshape(7, 1)
    seen = []

    def net(a, b):
        seen.append(len(a))
        return a * 2 + b.reshape(-1, 1, 1, 1)

    want = net(x, t)
    for buckets, sizes in ((False, [4, 3]), (True, [4, 4])):
        seen.clear()
        torch.testing.assert_close(run_in_calls(net, [x, t], 4 * 16, 8, buckets), want)
        assert seen == sizes
    seen.clear()
    torch.testing.assert_close(run_in_calls(net, [x[:5], t[:5]], None, 8, True), want[:5])
    assert seen == [8]  # no budget: one call, at the bucket of 5 rows
    assert bucket_sizes(16, 3 * 16, 8) == [3, 2, 1]
    assert bucket_sizes(64 * 64, 64 * 64 * 64, 64) == [64, 32, 16, 8, 4, 2, 1]
    assert bucket_sizes(64 * 64, 256 * 256, 64) == [16, 8, 4, 2, 1]


def _load_model(version_dir, monkeypatch):
    """A repository's Python model in this process, with a stand-in triton_python_backend_utils
    (the warm-ups log through its Logger), initialised from its config as Triton would."""
    import importlib.util
    import sys
    import types

    from google.protobuf.json_format import MessageToDict

    logged = []
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Logger = types.SimpleNamespace(log_info=logged.append, log_warn=logged.append)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    name = f"model_under_test_{version_dir.parent.name}"
    spec = importlib.util.spec_from_file_location(name, version_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = read_config(version_dir.parent / "config.pbtxt")
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(MessageToDict(config, preserving_proto_field_name=True)),
            "model_repository": str(version_dir.parent),
            "model_version": version_dir.name,
        }
    )
    return model, logged


@pytest.mark.slow
def test_warm_ups_run_every_bucket_once_largest_first(
    torch_repository, fused_repository, monkeypatch
):
    """What a CUDA model runs before the server reports ready (here on the CPU, called
    directly): every batch bucket at the opt side, largest first, each network at its own
    input shapes."""
    unet, logged = _load_model(torch_repository / "unet" / "1", monkeypatch)
    calls = []
    stage = unet.stage
    unet.stage = lambda *x: (calls.append([tuple(t.shape) for t in x]), stage(*x))[1]
    unet._warm(
        json.loads(
            read_config(torch_repository / "unet" / "config.pbtxt")
            .parameters["warmup_shapes"]
            .string_value
        )
    )
    assert [c[0][0] for c in calls] == [4, 2, 1]  # --max-batch 4
    assert calls[0] == [(4, 4, 64, 64), (4, 1), (4, 4, 64, 64)]  # the opt side: LR 64
    assert "unet: warmed for batches [4, 2, 1]" in logged[-1]

    sampler, logged = _load_model(fused_repository / "sampler" / "1", monkeypatch)
    seen = {}
    for name, run in sampler.networks.items():
        sampler.networks[name] = lambda *x, run=run, name=name: (
            seen.setdefault(name, []).append(len(x[0])),
            run(*x),
        )[1]
    sampler._warm(64)
    assert seen == {n: [4, 2, 1] for n in ("vae_encoder", "unet", "vae_decoder")}
    assert "networks warmed at LR 64 for batches [4, 2, 1]" in logged[-1]


def test_gpu_benchmark_names_the_tensors_that_reached_the_loop_in_host_memory():
    """benchmarks.gpu reads the sampler's warning back from the server log: which input or
    output arrived in host memory (the warning is written by the sampler's model.py)."""
    from benchmarks import gpu

    source = (
        Path(__file__).parents[1] / "model_repository" / "sampler" / "1" / "model.py"
    ).read_text()
    assert "arrived in host memory although the loop runs on" in source
    log = (
        "W1126 model.py:330] sampler: a tensor arrived in host memory although the loop runs on "
        "the GPU (input z_lr); copying it (this warning once per name)\n"
        "W1126 model.py:330] sampler: a tensor arrived in host memory although the loop runs on "
        "the GPU (unet output model_output); copying it (this warning once per name)\n"
    )
    assert gpu.HOST_COPY_NAME.findall(log) == ["input z_lr", "unet output model_output"]
    assert gpu.HOST_COPY_NAME.findall("I1126 sampler loaded\n") == []
