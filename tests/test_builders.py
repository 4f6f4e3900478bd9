"""Builders: specs drive ONNX and configs; both targets; cached, idempotent stages; any LR
size inside the served range (dynamic sides, TensorRT profiles over them, -1 dims)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cxr_sr.builders import build
from cxr_sr.builders.graphs import (
    attention_bytes,
    graphs,
    lr_multiple,
    pad_to_multiple,
    unet_factor,
    vae_factor,
)
from cxr_sr.builders.specs import NETWORKS, Geometry, NetworkSpec, TensorSpec, network_specs
from cxr_sr.builders.triton_config import CPU_STEP_QUEUE_DELAY_US, QUEUE_DELAY_US, read_config
from cxr_sr.builders.trt import profile_shapes
from cxr_sr.train import checkpoint as ckpt_io


@pytest.fixture(scope="module")
def built(checkpoint, built_repository, tmp_path_factory):
    """The shared cpu repository (conftest.py) plus a gpu one from the same ONNX files.

    Returns (folders, build args): folders["cpu"|"gpu"|"onnx"]. The gpu build reuses the
    cached ONNX export, so it only writes configs (``--engine skip``: no TensorRT here).
    """
    cpu, onnx_dir = built_repository
    gpu = tmp_path_factory.mktemp("b") / "gpu"
    args = ["--checkpoint", str(checkpoint), "--onnx-dir", str(onnx_dir), "--max-batch", "4"]
    args += ["--max-side", "128"]  # as conftest's cpu repository
    assert build.main([*args, "--out", str(gpu), "--target", "gpu", "--engine", "skip"]) == 0
    return {"cpu": cpu, "gpu": gpu, "onnx": onnx_dir}, args


def test_rate_limit_reaches_the_server_command(built, tmp_path, capsys):
    """A repository whose networks ask for the rate limiter's resource is served with
    ``--rate-limit=execution_count`` (without it Triton ignores the resources), unless the
    caller sets ``--rate-limit`` itself; ``--no-cpu-rate-limit`` builds without them."""
    from cxr_sr.builders.serve import TritonServer, rate_limited

    root, args = built
    flag = "--rate-limit=execution_count"
    assert rate_limited(root["cpu"]) and flag in TritonServer(root["cpu"]).command(Path("/b"))
    own = TritonServer(root["cpu"], extra_args=["--rate-limit=off"]).command(Path("/b"))
    assert flag not in own and own[-1] == "--rate-limit=off"
    assert not rate_limited(root["gpu"])
    assert flag not in TritonServer(root["gpu"]).command(Path("/b"))

    out = tmp_path / "free"
    assert build.main([*args, "--out", str(out), "--no-cpu-rate-limit"]) == 0
    for name in NETWORKS:
        config = read_config(out / name / "config.pbtxt")
        assert not config.instance_group[0].HasField("rate_limiter")
    assert not rate_limited(out) and flag not in TritonServer(out).command(Path("/b"))
    bad = [*args, "--out", str(tmp_path / "g"), "--target", "gpu", "--no-cpu-rate-limit"]
    assert build.main([*bad, "--engine", "skip"]) == 2
    assert "--no-cpu-rate-limit are for --target cpu" in capsys.readouterr().err
    # more instances are there to run at once: no rate limiter unless asked for
    two = [*args, "--instances", "2"]
    assert build.main([*two, "--out", str(tmp_path / "two")]) == 0
    assert not rate_limited(tmp_path / "two")
    assert build.main([*two, "--out", str(tmp_path / "two_rl"), "--cpu-rate-limit"]) == 0
    assert rate_limited(tmp_path / "two_rl")


def test_gpu_loop_numpy_and_its_target_check(built, tmp_path, capsys):
    """``--gpu-loop numpy``: the gpu target's sampler on the host, for a runtime without torch;
    the option is refused on the other targets."""
    root, args = built
    out = tmp_path / "gpu_numpy"
    gpu = [*args, "--target", "gpu", "--engine", "skip", "--gpu-loop", "numpy"]
    assert build.main([*gpu, "--out", str(out)]) == 0
    params = read_config(out / "sampler" / "config.pbtxt").parameters
    assert params["loop_device"].string_value == "numpy"
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in params
    assert read_config(out / "unet" / "config.pbtxt") == read_config(
        root["gpu"] / "unet" / "config.pbtxt"
    )
    bad = [*args, "--out", str(tmp_path / "cpu"), "--gpu-loop", "numpy"]
    assert build.main(bad) == 2
    assert "--gpu-loop is for --target gpu" in capsys.readouterr().err


def test_onnx_io_matches_spec(built):
    root, _ = built
    specs = network_specs(4, max_batch=4)  # 4 latent channels in the shared tiny VAE
    for name in NETWORKS:
        model = onnx.load(root["onnx"] / f"{name}.onnx")
        spec = specs[name]
        assert [i.name for i in model.graph.input] == spec.input_names
        assert [o.name for o in model.graph.output] == spec.output_names
        for value, tensor in zip(model.graph.input, spec.inputs, strict=True):
            dims = value.type.tensor_type.shape.dim
            assert dims[0].dim_param == "batch"
            want = list(tensor.shape)
            if tensor.grid:
                want[-2:] = [f"{tensor.grid}_height", f"{tensor.grid}_width"]
            assert [d.dim_param or d.dim_value for d in dims[1:]] == want
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta == {"vae_factor": "4", "lr_multiple": "2"}  # tiny: f = 4, UNet 2 levels


@pytest.mark.parametrize("size", [(16, 16), (17, 30), (64, 64), (41, 57)])
def test_onnx_graphs_serve_any_size_like_torch(checkpoint, built, size):
    """The exported graphs with dynamic sides equal the torch graphs at sizes they were not
    traced at, non-multiples of the UNet's factor included (padding, cropping)."""
    import onnxruntime as ort

    root, _ = built
    ck = ckpt_io.load(checkpoint)
    nets = graphs(ck.vae, ck.denoiser)
    lr = np.random.default_rng(1).random((2, 1, *size), dtype=np.float32)
    sessions = {n: ort.InferenceSession(str(root["onnx"] / f"{n}.onnx")) for n in NETWORKS}
    z = sessions["vae_encoder"].run(None, {"LR": lr})[0]
    with torch.no_grad():
        z_torch = nets["vae_encoder"](torch.from_numpy(lr)).numpy()
    padded = [-(-s // 2) * 2 for s in size]
    assert z.shape == (2, 4, *padded)
    np.testing.assert_allclose(z, z_torch, atol=1e-4)
    t = np.full((2, 1), 100, np.float32)
    out = sessions["unet"].run(None, {"x_t": z, "timestep": t, "z_lr": z})[0]
    assert out.shape == z.shape
    sr = sessions["vae_decoder"].run(None, {"z": z, "LR": lr})[0]
    with torch.no_grad():
        sr_torch = nets["vae_decoder"](torch.from_numpy(z), torch.from_numpy(lr)).numpy()
    assert sr.shape == (2, 1, 4 * size[0], 4 * size[1])
    np.testing.assert_allclose(sr, sr_torch, atol=1e-4)


def test_padding_and_cropping_leave_multiples_untouched(checkpoint):
    """A 64x64 LR (a multiple) goes through zero padding and cropping: the graphs compute
    exactly what the ResidualVAE does, so its output is the one it had before any size."""
    ck = ckpt_io.load(checkpoint)
    nets = graphs(ck.vae, ck.denoiser)
    lr = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        z = nets["vae_encoder"](lr)
        assert torch.equal(z, ck.vae.encode_lr(lr))
        base = nets["vae_decoder"].bicubic(lr)  # bicubic(LR) as a convolution (tested below)
        assert torch.equal(nets["vae_decoder"](z, lr), ck.vae.decode(z, lr, base=base))
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    padded = pad_to_multiple(x, 4)
    assert padded.shape == (1, 2, 8, 8) and torch.equal(padded[..., :5, :7], x)
    assert torch.equal(padded[..., 5, :7], x[..., 3, :])  # reflection, not replication
    assert pad_to_multiple(x, 1) is x


def test_geometry_of_the_networks(checkpoint):
    ck = ckpt_io.load(checkpoint)
    assert (vae_factor(ck.vae), unet_factor(ck.denoiser)) == (4, 2)
    assert lr_multiple(4, 2) == 2 and lr_multiple(4, 4) == 4 and lr_multiple(8, 4) == 8
    assert lr_multiple(8, 1) == 2 and lr_multiple(2, 4) == 2 and lr_multiple(4, 1) == 1
    g = Geometry(vae_factor=8, multiple=8, min_side=16, max_side=256)
    assert g.padded(41) == 48 and g.side("latent", 41) == 24 and g.side("sr", 41) == 164
    assert g.latent_sides() == (8, 128)
    with pytest.raises(ValueError):
        Geometry(multiple=32, min_side=16)


def test_attention_memory_is_measured_per_head(checkpoint):
    """The tiny UNet's mid-block attention (4 heads of 32 channels at latent / 2) and no VAE
    attention; the estimate grows with the fourth power of the side."""
    ck = ckpt_io.load(checkpoint)
    at64 = attention_bytes(ck.vae, ck.denoiser, 64)
    assert at64 == {"vae": 0, "unet": 4 * 4 * (32 * 32) ** 2}
    assert attention_bytes(ck.vae, ck.denoiser, 128)["unet"] == 16 * at64["unet"]


@pytest.mark.parametrize("kind", ["headwise", "fused"])
def test_exported_attention_kinds(built, checkpoint, kind):
    """The UNet is exported twice: ``unet.onnx`` computes its mid-block attention one head at
    a time in plain ONNX (one Softmax per head: one head's score matrix alive at a time, and
    TensorRT parses it); ``unet.fused.onnx`` as one onnxruntime MultiHeadAttention node (flash
    attention on CPU), which the cpu repository serves. Both give what the stock diffusers
    processor gives; the export leaves the module's own processors in place."""
    import onnxruntime as ort
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from cxr_sr.builders.graphs import ATTENTION, export_attention

    root, _ = built
    ck = ckpt_io.load(checkpoint)
    (attn,) = [m for m in ck.denoiser.modules() if isinstance(m, Attention)]
    path = root["onnx"] / ("unet.onnx" if kind == "headwise" else "unet.fused.onnx")
    nodes = onnx.load(path).graph.node
    softmax = sum(n.op_type == "Softmax" for n in nodes)
    fused = [n for n in nodes if n.op_type == "MultiHeadAttention"]
    if kind == "headwise":
        assert softmax == attn.heads == 4 and not fused
        assert all(n.domain in ("", "ai.onnx") for n in nodes)  # standard ONNX only
    else:
        assert softmax == 0 and len(fused) == 1 and fused[0].domain == "com.microsoft"
        assert onnx.helper.get_attribute_value(fused[0].attribute[0]) == attn.heads
        served = root["cpu"] / "unet" / "1" / "model.onnx"
        assert served.read_bytes() == path.read_bytes()
    assert not (root["gpu"] / "unet" / "1" / "model.onnx").exists()  # TensorRT's plan there

    unet = graphs(ck.vae, ck.denoiser)["unet"]
    g = torch.Generator().manual_seed(0)
    x, z = (torch.randn(2, 4, 24, 20, generator=g) for _ in range(2))
    t = torch.tensor([[999.0], [10.0]])
    with torch.no_grad():
        stock = unet(x, t, z)
        with export_attention(unet, kind) as n:
            assert n == 1 and isinstance(attn.processor, ATTENTION[kind])
            swapped = unet(x, t, z)
    assert isinstance(attn.processor, AttnProcessor2_0)
    torch.testing.assert_close(swapped, stock, rtol=0, atol=1e-5)
    session = ort.InferenceSession(str(path))
    got = session.run(None, {"x_t": x.numpy(), "timestep": t.numpy(), "z_lr": z.numpy()})[0]
    np.testing.assert_allclose(got, stock.numpy(), rtol=0, atol=1e-4)


def test_fused_attention_needs_the_torchscript_exporter(checkpoint, tmp_path):
    from cxr_sr.builders.export import export_onnx
    from cxr_sr.builders.graphs import export_attention

    ck = ckpt_io.load(checkpoint)
    spec = network_specs(4, max_batch=4)["unet"]
    with pytest.raises(ValueError, match="TorchScript"):
        export_onnx(ck, spec, tmp_path / "u.onnx", dynamo=True, attention="fused")
    unet = graphs(ck.vae, ck.denoiser)["unet"]
    with pytest.raises(ValueError, match="headwise"), export_attention(unet, "flash"):
        pass


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (17, 30), (64, 64)])
def test_bicubic_convolution_is_torch_bicubic(scale, size):
    """The decoder's bicubic(LR) as edge pad + one 5x5 kernel per output phase + pixel shuffle
    gives torch's bicubic interpolation, borders and 1-pixel inputs included."""
    import torch.nn.functional as F

    from cxr_sr.builders.graphs import Bicubic

    x = torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(sum(size)))
    want = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
    atol = 1e-6 if scale in (2, 4) else 1e-5  # 1 / 3 is rounded in torch's coordinates
    torch.testing.assert_close(Bicubic(scale)(x), want, rtol=0, atol=atol)


def test_decoder_graph_has_no_cubic_resize(built):
    """onnxruntime's cubic Resize is 30-45x slower than the convolution that replaces it."""
    model = onnx.load(built[0]["onnx"] / "vae_decoder.onnx")
    modes = [
        onnx.helper.get_attribute_value(a)
        for n in model.graph.node
        if n.op_type == "Resize"
        for a in n.attribute
        if a.name == "mode"
    ]
    assert b"cubic" not in modes and any(n.op_type == "DepthToSpace" for n in model.graph.node)


def test_cpu_and_gpu_configs(built):
    root, _ = built
    enc = read_config(root["cpu"] / "vae_encoder" / "config.pbtxt")
    assert list(enc.input[0].dims) == [1, -1, -1] and list(enc.output[0].dims) == [4, -1, -1]
    assert not enc.input[0].allow_ragged_batch  # the batcher merges equal shapes only
    ens = read_config(root["cpu"] / "cxr_sr" / "config.pbtxt")
    lo, hi = (int(ens.parameters[k].string_value) for k in ("lr_min_side", "lr_max_side"))
    assert enc.parameters["input_sides"].string_value == f'{{"LR": [{lo}, {hi}]}}'
    assert (lo, hi) == (16, 128) and ens.parameters["lr_multiple"].string_value == "2"
    # one session call takes a full batch at 64x64 but at most one image of the largest size
    assert enc.parameters["max_batch_pixels"].string_value == str(min(4 * 64 * 64, 128 * 128))
    sampler = read_config(root["cpu"] / "sampler" / "config.pbtxt")
    assert sampler.parameters["vae_factor"].string_value == "4"
    assert sampler.parameters["latent_sides"].string_value == "16,128"
    assert sampler.parameters["max_batch_pixels"].string_value == str(min(4 * 64 * 64, 128 * 128))
    g = Geometry(max_side=128)
    assert network_specs(4, g, max_batch=8)["vae_encoder"].batch_pixels() == 128 * 128
    assert network_specs(4, Geometry(), max_batch=8)["unet"].batch_pixels() == 8 * 64 * 64
    # on a GPU: a full batch at the opt side in one call, never less than one largest image
    assert network_specs(4, g, max_batch=8)["vae_encoder"].batch_pixels(gpu=True) == 8 * 64 * 64
    assert network_specs(4, g, max_batch=2)["vae_encoder"].batch_pixels(gpu=True) == 128 * 128
    for name in NETWORKS:
        cpu, gpu = (
            read_config(root["cpu"] / name / "config.pbtxt"),
            read_config(root["gpu"] / name / "config.pbtxt"),
        )
        assert cpu.backend == "python" and (root["cpu"] / name / "1" / "model.py").is_file()
        assert gpu.platform == ("tensorrt_plan" if name == "unet" else "onnxruntime_onnx")
        assert cpu.input == gpu.input and cpu.output == gpu.output
        assert cpu.max_batch_size == gpu.max_batch_size == 4
        # the sampler sends unet whole batches; clients' requests reach vae_encoder, whose
        # batch reaches the sampler and vae_decoder whole (within 500 us on the cpu target)
        delay = 0 if name == "unet" else QUEUE_DELAY_US
        assert gpu.dynamic_batching.max_queue_delay_microseconds == delay
        if name == "vae_decoder":
            delay = CPU_STEP_QUEUE_DELAY_US
        assert cpu.dynamic_batching.max_queue_delay_microseconds == delay
        # one instance: the inference probe then covers every stub (--instances says why)
        assert [g.count for g in cpu.instance_group] == [g.count for g in gpu.instance_group]
        assert [g.count for g in cpu.instance_group] == [1]
        # the cpu target's networks run one at a time (Triton's rate limiter); the gpu's not
        [limit] = cpu.instance_group[0].rate_limiter.resources
        assert (limit.name, limit.count) == ("cpu", 1)
        assert not gpu.instance_group[0].HasField("rate_limiter")
    assert [g.count for g in sampler.instance_group] == [1]
    # it calls the networks from inside its execute: a unit it held would block them
    assert not sampler.instance_group[0].HasField("rate_limiter")
    assert not (root["gpu"] / "unet" / "1" / "model.plan").exists()  # --engine skip
    # the gpu target's loop keeps the latents on the GPU (--gpu-loop torch, the default)
    loop = read_config(root["gpu"] / "sampler" / "config.pbtxt").parameters
    assert loop["loop_device"].string_value == "torch-cuda"
    assert loop["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"  # GPU inputs as they are
    assert loop["max_batch_pixels"].string_value == str(4 * 64 * 64)  # GPU bound: a full batch
    assert sampler.parameters["loop_device"].string_value == "numpy"  # the cpu target's
    assert (root["gpu"] / "vae_decoder" / "1" / "model.onnx").is_file()
    assert read_config(root["cpu"] / "cxr_sr" / "config.pbtxt") == read_config(
        root["gpu"] / "cxr_sr" / "config.pbtxt"
    )


def test_ensemble_wires_the_stages(built):
    """The ensemble chains the three models (the cpu target's opt-in chain layout:
    tests/test_cpu_layouts.py)."""
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


def test_max_side_default_follows_the_attention_budget(checkpoint):
    """The default max side is 256 unless one image's attention would exceed the budget (all
    heads) or an eighth of it (one head); an explicit --max-side is kept, with a warning."""
    ck = ckpt_io.load(checkpoint)

    def fits(side: int, budget_mib: float) -> bool:
        total = attention_bytes(ck.vae, ck.denoiser, side)["unet"]
        head = attention_bytes(ck.vae, ck.denoiser, side, per_head=True)["unet"]
        return total <= budget_mib * 2**20 and head <= budget_mib * 2**20 / build.HEAD_SHARE

    g, note = build.served_geometry(ck, None, budget_mib=64)
    assert g.max_side < 256 and fits(g.max_side, 64) and not fits(g.max_side + 16, 64)
    assert "--max-side overrides" in note
    g, note = build.served_geometry(ck, 256, budget_mib=64)
    assert g.max_side == 256 and note.startswith("warning")
    g, note = build.served_geometry(ck, 48, budget_mib=64)
    assert (g.max_side, g.opt_side, note) == (48, 48, None)
    # the tiny UNet's 4 heads of 32 channels: one head is a quarter of the whole
    assert (
        4 * attention_bytes(ck.vae, ck.denoiser, 64, per_head=True)["unet"]
        == (attention_bytes(ck.vae, ck.denoiser, 64)["unet"])
    )


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert build.main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


@pytest.mark.parametrize("n", ["0", "-1", "65"])
def test_instances_out_of_range_is_a_clear_error(checkpoint, tmp_path, capsys, n):
    args = ["--checkpoint", str(checkpoint), "--out", str(tmp_path), "--instances", n]
    assert build.main(args) == 2
    assert f"--instances must be in [1, 64], got {n}" in capsys.readouterr().err


def test_profile_and_bad_batches():
    """TensorRT profiles span the batch and the served sides (min, opt = 64, max)."""
    g = Geometry(vae_factor=8, multiple=8, min_side=16, max_side=256)
    specs = network_specs(4, g, max_batch=8)
    spec = specs["unet"]
    assert spec.profile()["x_t"] == ((1, 4, 8, 8), (4, 4, 32, 32), (8, 4, 128, 128))
    assert spec.profile()["timestep"] == ((1, 1), (4, 1), (8, 1))
    dec = dict((name, (lo, opt, hi)) for name, lo, opt, hi in profile_shapes(specs["vae_decoder"]))
    assert dec["LR"] == ((1, 1, 16, 16), (4, 1, 64, 64), (8, 1, 256, 256))
    assert dec["z"][2] == (8, 4, 128, 128)
    assert spec.dynamic_axes()["x_t"] == {0: "batch", 2: "latent_height", 3: "latent_width"}
    with pytest.raises(ValueError):
        NetworkSpec("x", (TensorSpec("a", (1,)),), (), min_batch=4, opt_batch=2, max_batch=8)


def _qdq_ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node} & {
        "QuantizeLinear",
        "DequantizeLinear",
    }


@pytest.mark.integration
def test_int8_unet_build_serves_the_quantized_unet(built, checkpoint, tmp_path, capsys):
    """--int8-unet: the UNet is quantized (QDQ) with ranges from the float pipeline on the
    bundled radiograph, cached, installed only in the UNet's folder and labelled in the
    configs; the repository serves, and its SR stays near the float repository's."""
    from benchmarks.bench import InProcess
    from benchmarks.common import lr_crops
    from benchmarks.cost import grpc_call
    from cxr_sr.builders.serve import TritonServer
    from cxr_sr.imaging import bicubic_baseline

    root, args = built
    onnx_dir = shutil.copytree(root["onnx"], tmp_path / "onnx")  # keep the shared one as is
    args = [*args, "--onnx-dir", str(onnx_dir), "--out", str(tmp_path / "repo"), "--int8-unet"]
    assert build.main(args) == 0
    assert "the UNet in int8, calibrated on" in capsys.readouterr().out
    stamp = json.loads((onnx_dir / "unet.int8.json").read_text())
    assert stamp["calibration_crops"] == 8 and stamp["calls"] >= 8  # one per sampling step
    assert stamp["source"] == "unet.fused.onnx"  # the graph the cpu target serves
    repo = tmp_path / "repo"
    assert _qdq_ops(repo / "unet" / "1" / "model.onnx") == {"QuantizeLinear", "DequantizeLinear"}
    for name in ("vae_encoder", "vae_decoder"):
        assert not _qdq_ops(repo / name / "1" / "model.onnx")
        assert (
            read_config(repo / name / "config.pbtxt").parameters["precision"].string_value == "fp32"
        )
    assert (
        read_config(repo / "unet" / "config.pbtxt").parameters["precision"].string_value == "int8"
    )
    assert build.main(args) == 0
    assert "unet.int8.onnx is up to date" in capsys.readouterr().out
    from cxr_sr.client.io import write_png

    write_png(tmp_path / "own.png", np.random.default_rng(1).random((300, 280)))
    own = [*args, "--out", str(tmp_path / "own"), "--calibration-images", str(tmp_path / "own.png")]
    assert build.main(own) == 0  # other calibration pixels: quantized again
    assert "the UNet in int8, calibrated on" in capsys.readouterr().out
    assert build.main(args) == 0  # and back: the bundled crops' ranges again
    assert "unet.int8.onnx is up to date" not in capsys.readouterr().out
    from benchmarks import quantize as bench_quantize

    with pytest.raises(ValueError, match="unet is already int8"):  # no int8-vs-int8 report
        bench_quantize.run(
            repo, ["unet"], tmp_path / "w", calibration=1, eval_crops=1, sides=[16], runs=1
        )

    lr = lr_crops(32, 1, seed=4)
    params = {"steps": 1, "seed": 0}
    with TritonServer(repo, log_file=tmp_path / "triton.log") as server:
        served = grpc_call(server.grpc_url, lr, params)()
    assert served.shape == (1, 1, 128, 128) and np.isfinite(served).all()
    in_float = InProcess(root["cpu"], params, threads=1, spinning=False)(lr)
    in_int8 = InProcess(repo, params, threads=1, spinning=False)(lr)
    np.testing.assert_array_equal(served, in_int8)  # the server runs the int8 graph
    change = np.abs(in_float - bicubic_baseline(lr[0, 0])).max()  # what the networks add
    error = np.abs(in_int8 - in_float).max()
    print(f"int8 vs float32 max abs {error:.4g}; networks' change to bicubic {change:.4g}")
    assert 0 < error < change / 4


def test_int8_flags_are_checked(checkpoint, tmp_path, capsys):
    base = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "r")]
    assert build.main([*base, "--target", "gpu", "--int8-unet"]) == 2
    assert "--int8-unet and --calibration-images are for --target cpu" in capsys.readouterr().err
    assert build.main([*base, "--calibration-images", str(tmp_path)]) == 2
    assert "--calibration-images needs --int8-unet" in capsys.readouterr().err


def test_calibration_crops_come_from_the_images_given(tmp_path):
    """LR crops alternate 64 and 128 (smaller where an image is), from the images by turns;
    a folder without images is an error."""
    from cxr_sr.builders import quantize
    from cxr_sr.client.io import write_png

    rng = np.random.default_rng(0)
    write_png(tmp_path / "a.png", rng.random((600, 520)))
    write_png(tmp_path / "b.png", rng.random((100, 90)))
    crops = quantize.calibration_lr([tmp_path], count=4)
    assert [c.shape for c in crops] == [
        (1, 1, 64, 64),
        (1, 1, 20, 20),
        (1, 1, 64, 64),
        (1, 1, 20, 20),
    ]
    assert all(c.dtype == np.float32 and c.min() >= 0 and c.max() <= 1 for c in crops)
    assert [c.shape[-1] for c in quantize.calibration_lr(count=3)] == [64, 128, 64]  # bundled
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images under"):
        quantize.calibration_lr([tmp_path / "empty"])
