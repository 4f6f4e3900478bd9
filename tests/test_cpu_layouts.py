"""The cpu target's two layouts: ``models`` (default: the ensemble chains vae_encoder, sampler
and vae_decoder, each batching on its own) and ``chain`` (``--cpu-layout chain``: the sampler
takes LR and calls the three networks through BLS, one batching point). Same graphs, same SR."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from cxr_sr.builders import build
from cxr_sr.builders.serve import TritonServer
from cxr_sr.builders.specs import NETWORKS, network_specs
from cxr_sr.builders.triton_config import (
    CPU_CHAIN_QUEUE_DELAY_US,
    CPU_STEP_QUEUE_DELAY_US,
    QUEUE_DELAY_US,
    read_config,
    sampler_config,
)
from cxr_sr.client import SRClient

STEPS = 2


@pytest.fixture(scope="module")
def chain_repository(checkpoint, built_repository, tmp_path_factory):
    """The shared repository's graphs (conftest.py) in the chain layout."""
    _, onnx_dir = built_repository
    out = tmp_path_factory.mktemp("chain") / "repo"
    args = ["--checkpoint", str(checkpoint), "--onnx-dir", str(onnx_dir), "--out", str(out)]
    args += ["--max-batch", "4", "--max-side", "128", "--cpu-layout", "chain"]
    assert build.main(args) == 0
    return out


def _delays(repo):
    return {
        name: read_config(
            repo / name / "config.pbtxt"
        ).dynamic_batching.max_queue_delay_microseconds
        for name in (*NETWORKS, "sampler")
    }


def _policies(repo):
    """Which models have a queue policy (a queue limit, a timeout)."""
    return {
        name: read_config(repo / name / "config.pbtxt").dynamic_batching.HasField(
            "default_queue_policy"
        )
        for name in (*NETWORKS, "sampler")
    }


def test_chain_layout_batches_once(chain_repository):
    """The sampler takes LR to SR with the encoder's checks and names the models it calls;
    cxr_sr has it as its only step; only the sampler waits for a batch to form."""
    repo = chain_repository
    ens = read_config(repo / "cxr_sr" / "config.pbtxt")
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["sampler"]
    sampler = read_config(repo / "sampler" / "config.pbtxt")
    assert [t.name for t in sampler.input] == ["LR"] and [t.name for t in sampler.output] == ["SR"]
    params = {k: v.string_value for k, v in sampler.parameters.items()}
    assert params["layout"] == "chain" and params["loop_device"] == "numpy"
    assert json.loads(params["chain_models"]) == {
        "vae_encoder": [["LR"], "z_lr"],
        "vae_decoder": [["z", "LR"], "SR"],
    }
    encoder = read_config(repo / "vae_encoder" / "config.pbtxt").parameters
    for key in ("input_ranges", "input_sides"):
        assert params[key] == encoder[key].string_value
    assert params["lr_multiple"] == "2"
    assert _delays(repo) == {
        "vae_encoder": 0,
        "unet": 0,
        "vae_decoder": 0,
        "sampler": CPU_CHAIN_QUEUE_DELAY_US,
    }
    # the queue limits where clients' requests wait; none where only the sampler calls
    assert _policies(repo) == {
        "vae_encoder": False,
        "unet": False,
        "vae_decoder": False,
        "sampler": True,
    }


def test_models_layout_is_the_default_and_batches_at_every_stage(built_repository):
    models_repository, _ = built_repository
    ens = read_config(models_repository / "cxr_sr" / "config.pbtxt")
    steps = [s.model_name for s in ens.ensemble_scheduling.step]
    assert steps == ["vae_encoder", "sampler", "vae_decoder"]
    sampler = read_config(models_repository / "sampler" / "config.pbtxt")
    assert [t.name for t in sampler.input] == ["z_lr"]
    assert "layout" not in sampler.parameters and "chain_models" not in sampler.parameters
    # clients' requests wait 2 ms at vae_encoder, its batch's 500 us at the steps after it
    assert _delays(models_repository) == {
        "vae_encoder": QUEUE_DELAY_US,
        "unet": 0,
        "sampler": CPU_STEP_QUEUE_DELAY_US,
        "vae_decoder": CPU_STEP_QUEUE_DELAY_US,
    }
    assert _policies(models_repository) == {
        "vae_encoder": True,
        "unet": False,
        "sampler": True,
        "vae_decoder": False,
    }


@pytest.mark.parametrize("given, step", [(300, 300), (5000, CPU_STEP_QUEUE_DELAY_US), (0, 0)])
def test_steps_after_the_encoder_wait_at_most_the_step_delay(
    checkpoint, built_repository, tmp_path, given, step
):
    _, onnx_dir = built_repository
    out = tmp_path / "repo"
    args = ["--checkpoint", str(checkpoint), "--onnx-dir", str(onnx_dir), "--out", str(out),
            "--max-batch", "4", "--max-side", "128", "--queue-delay-us", str(given)]  # fmt: skip
    assert build.main(args) == 0
    assert _delays(out) == {"vae_encoder": given, "unet": 0, "sampler": step, "vae_decoder": step}


def test_layout_flags_are_checked(checkpoint, tmp_path, capsys):
    base = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "r"), "--max-side", "128"]
    assert build.main([*base, "--target", "torch", "--cpu-layout", "chain"]) == 2
    assert "--cpu-layout is for --target cpu" in capsys.readouterr().err
    specs = network_specs(4, max_batch=4)
    with pytest.raises(ValueError, match="not both"):
        sampler_config(specs["unet"], loop_device="torch-cpu", fused=specs, chain=specs)
    with pytest.raises(ValueError, match="cpu_layout"):
        build.assemble(checkpoint, tmp_path / "x", "cpu", specs, {}, cpu_layout="ensemble")


@pytest.mark.integration
@pytest.mark.slow
def test_chain_serves_what_the_models_layout_serves(server, chain_repository):
    """Same requests, same seeds, both layouts: the same SR to float rounding, for a batch of
    3 at an odd size and for requests sent at once (batched by the sampler, not by three
    batchers); a bad LR among them gets its own 400 from the chain sampler and the rest are
    served."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    rng = np.random.default_rng(11)
    lr = rng.random((3, 1, 37, 50)).astype(np.float32)
    singles = [rng.random((1, 1, 32, 32)).astype(np.float32) for _ in range(4)]
    bad = np.full((1, 1, 32, 32), 2.0, np.float32)

    def at_once(url):
        """The singles and the bad LR sent together; SRs, and the bad one's error."""
        out: list = [None] * (len(singles) + 1)
        raw = http.InferenceServerClient(url, concurrency=len(out))

        def send(i, x):
            request = http.InferInput("LR", list(x.shape), "FP32")
            request.set_data_from_numpy(x)
            try:
                out[i] = raw.infer("cxr_sr", [request], parameters={"seed": i, "steps": STEPS})
                out[i] = out[i].as_numpy("SR")
            except InferenceServerException as err:
                out[i] = err

        threads = [threading.Thread(target=send, args=a) for a in enumerate([*singles, bad])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    with SRClient(server.http_url) as c:
        models = c.super_resolve(lr, steps=STEPS, seed=5)
    models_once = at_once(server.http_url)
    assert isinstance(models_once[-1], InferenceServerException)
    log = chain_repository.parent / "triton.log"
    with TritonServer(chain_repository, log_file=log) as chain, SRClient(chain.http_url) as c:
        np.testing.assert_allclose(c.super_resolve(lr, steps=STEPS, seed=5), models, atol=1e-6)
        chain_once = at_once(chain.http_url)
    error = chain_once[-1]
    assert isinstance(error, InferenceServerException) and error.status() == "400"
    assert "intensities" in error.message()
    for a, b in zip(chain_once[:-1], models_once[:-1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
