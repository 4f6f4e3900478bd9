"""End to end against a real tritonserver (the one inside the nvidia-pytriton wheel).

A tiny random-weight checkpoint is built into a cpu-target repository, served on
127.0.0.1 with free ports (fixtures in conftest.py), and exercised over HTTP and gRPC
through ``cxr_sr.client.SRClient``, and through bare tritonclient where a test needs
requests the client would refuse or the server's own answer to any size.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cxr_sr import SamplingOptions
from cxr_sr.client import SRClient, SRServerError, write_png
from cxr_sr.train.checkpoint import load
from cxr_sr.train.pipeline import TorchPipeline

pytestmark = pytest.mark.integration

STEPS = 3


@pytest.fixture(scope="module")
def lr():
    return np.random.default_rng(0).random((3, 1, 64, 64)).astype(np.float32)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_shapes_range_and_seed_determinism(server, lr, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    with SRClient(url, protocol=protocol) as c:
        a = c.super_resolve(lr, steps=STEPS, seed=7)
        b = c.super_resolve(lr, steps=STEPS, seed=7)
        other = c.super_resolve(lr, steps=STEPS, seed=8)
    assert a.shape == (3, 1, 256, 256) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other)


def test_http_and_grpc_agree_bit_for_bit(server, lr):
    with SRClient(server.http_url) as h, SRClient(server.grpc_url, protocol="grpc") as g:
        np.testing.assert_array_equal(
            h.super_resolve(lr, steps=STEPS, seed=1, sampler="ddpm"),
            g.super_resolve(lr, steps=STEPS, seed=1, sampler="ddpm"),
        )


def test_served_loop_matches_offline_torch_pipeline(server, checkpoint, lr):
    """The BLS loop over onnxruntime reproduces the offline torch loop (same seed)."""
    ckpt = load(checkpoint)
    opts = ckpt.sampling.replace(steps=STEPS, sampler="ddpm")
    offline = TorchPipeline(ckpt.vae, ckpt.denoiser).super_resolve(lr, ckpt.schedule, opts, 5)
    with SRClient(server.http_url) as c:
        served = c.super_resolve(lr, steps=STEPS, sampler="ddpm", seed=5)
    np.testing.assert_allclose(served, offline, atol=1e-4)


def _infer(server, lr: np.ndarray, **params) -> np.ndarray:
    """One HTTP request to cxr_sr with bare tritonclient (no client-side checks)."""
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    x = http.InferInput("LR", list(lr.shape), "FP32")
    x.set_data_from_numpy(np.ascontiguousarray(lr, dtype=np.float32))
    try:
        return client.infer("cxr_sr", [x], parameters=params or None).as_numpy("SR")
    finally:
        client.close()


def _limits(server) -> tuple[int, int]:
    import tritonclient.http as http

    config = http.InferenceServerClient(server.http_url).get_model_config("cxr_sr")
    return tuple(
        int(config["parameters"][k]["string_value"]) for k in ("lr_min_side", "lr_max_side")
    )


@pytest.mark.parametrize(
    "size,origin",
    [
        ((16, 16), (0, 0)),
        ((40, 56), (0, 0)),
        ((64, 64), (0, 0)),
        ((100, 76), (0, 0)),
        ((41, 57), (13, 70)),
    ],
    ids=["16x16", "40x56", "64x64", "100x76", "41x57-origin"],
)
def test_any_size_served_equals_offline(server, checkpoint, size, origin):
    """Every size in the served range (non-multiples of the UNet's factor included, padded
    and cropped inside) and a tile origin: the served SR is [N, 1, 4H, 4W] and equals the
    offline torch pipeline's with the same seed."""
    ck = load(checkpoint)
    lr = np.random.default_rng(sum(size)).random((2, 1, *size)).astype(np.float32)
    opts = ck.sampling.replace(steps=STEPS, sampler="ddpm")
    offline = TorchPipeline(ck.vae, ck.denoiser).super_resolve(lr, ck.schedule, opts, 5, origin)
    served = _infer(
        server, lr, steps=STEPS, sampler="ddpm", seed=5, origin_y=origin[0], origin_x=origin[1]
    )
    assert served.shape == (2, 1, 4 * size[0], 4 * size[1])
    np.testing.assert_allclose(served, offline, atol=1e-4)


def test_a_tile_request_draws_the_noise_of_its_place(server, checkpoint):
    """origin_y/origin_x move the noise with the tile: an origin changes the output, the
    same origin repeats it bit for bit."""
    lr = np.random.default_rng(9).random((1, 1, 32, 48)).astype(np.float32)
    params = {"steps": STEPS, "sampler": "ddpm", "seed": 3}
    at = _infer(server, lr, origin_y=40, origin_x=8, **params)
    np.testing.assert_array_equal(at, _infer(server, lr, origin_y=40, origin_x=8, **params))
    assert not np.allclose(at, _infer(server, lr, **params))


@pytest.mark.parametrize(
    "shape,message",
    [
        ((1, 1, 15, 64), "must be in [16, "),
        ((1, 1, 64, 8), "must be in [16, "),
        ((1, 1, 64, None), "must be in [16, "),  # None: one more than the server's maximum
        ((1, 2, 32, 32), "LR"),  # core Triton: dims [1, -1, -1]
        ((1, 32, 32), "LR"),
    ],
    ids=["h15", "w8", "over-max", "2-channels", "rank-3"],
)
def test_sizes_outside_the_served_range_get_a_400(server, shape, message):
    import tritonclient.http as http

    hi = _limits(server)[1]
    shape = tuple(hi + 1 if s is None else s for s in shape)
    with pytest.raises(Exception) as err:
        _infer(server, np.full(shape, 0.5, np.float32), steps=1)
    assert "400" in str(err.value) and message in str(err.value)
    if shape[1:2] == (1,) and len(shape) == 4:
        assert f"{shape[2]}x{shape[3]}" in str(err.value)
    assert http.InferenceServerClient(server.http_url).is_model_ready("cxr_sr")


def _stats(server, model: str) -> tuple[int, int]:
    """(inference count, execution count) of a model: executions < inferences = batching."""
    import tritonclient.http as http

    stats = http.InferenceServerClient(server.http_url).get_inference_statistics(model)
    row = stats["model_stats"][0]
    return int(row["inference_count"]), int(row["execution_count"])


def test_equal_sizes_share_batches_and_other_sizes_wait_their_own(server):
    """While one slow request holds the sampler, two 32x32 and two 48x40 requests queue up
    behind it in that order: Triton's dynamic batcher merges each equal-shape pair and never
    concatenates the two sizes (no ragged batching), so the sampler runs 3 executions for 5
    inferences and every result equals the one it gets alone."""
    import threading
    import time

    rng = np.random.default_rng(4)
    small = [rng.random((1, 1, 32, 32)).astype(np.float32) for _ in range(2)]
    wide = [rng.random((1, 1, 48, 40)).astype(np.float32) for _ in range(2)]
    params = {"steps": STEPS, "seed": 1}
    alone = [_infer(server, x, **params) for x in (*small, *wide)]
    # the largest side the tiny server takes, so that the server's step limit (50) is enough
    slow = np.random.default_rng(5).random((1, 1, 128, 128)).astype(np.float32)
    t0 = time.perf_counter()
    _infer(server, slow, steps=20)
    per_step = (time.perf_counter() - t0) / 20
    slow_steps = int(min(50, max(20, 2.0 / per_step)))  # holds the sampler ~2 s
    before = _stats(server, "sampler")
    results: dict[int, np.ndarray] = {}

    def send(i, x, **p):
        results[i] = _infer(server, x, **p)

    threads = [threading.Thread(target=send, args=(-1, slow), kwargs={"steps": slow_steps})]
    threads += [
        threading.Thread(target=send, args=(i, x), kwargs=params)
        for i, x in enumerate((*small, *wide))
    ]
    threads[0].start()
    time.sleep(0.5)  # the slow request is in the sampler's loop
    for t in threads[1:]:
        t.start()
        time.sleep(0.1)  # queue in order: small, small, wide, wide
    for t in threads:
        t.join(120)
    after = _stats(server, "sampler")
    for i, want in enumerate(alone):
        np.testing.assert_array_equal(results[i], want)
    assert after[0] - before[0] == 5
    assert after[1] - before[1] == 3, "equal sizes should share a batch, sizes never mix"


def test_concurrent_requests_are_batched_without_changing_results(server, lr):
    """Dynamic batching merges requests; each row keeps its own noise stream."""
    with SRClient(server.http_url) as c:
        alone = [c.super_resolve(lr[i : i + 1], steps=STEPS, seed=i) for i in range(3)]

    def one(i):
        with SRClient(server.http_url) as c:
            return c.super_resolve(lr[i : i + 1], steps=STEPS, seed=i)

    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(one, [0, 1, 2, 0, 1, 2]))
    for i, out in enumerate(together):
        np.testing.assert_allclose(out, alone[i % 3], atol=1e-6)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"steps": 0}, "steps"),
        ({"steps": "many"}, "steps"),
        ({"sampler": "euler"}, "sampler"),
        ({"seed": -4}, "seed"),
        ({"strength": 2.0}, "strength"),
        ({"steps": 5000}, "steps"),
        ({"spcing": "leading"}, "unknown request parameter 'spcing'"),
        ({"steps": True}, "steps"),
    ],
)
def test_bad_parameters_get_a_400_and_the_server_keeps_serving(server, lr, params, message):
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    x = http.InferInput("LR", list(lr[:1].shape), "FP32")
    x.set_data_from_numpy(lr[:1])
    with pytest.raises(Exception) as err:
        client.infer("cxr_sr", [x], parameters=params)
    assert "400" in str(err.value) and message in str(err.value)
    assert client.is_server_live() and client.is_model_ready("cxr_sr")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unknown_parameter_fails_only_its_request(server, lr, protocol):
    """An unknown key gets its request a 400 / INVALID_ARGUMENT naming it; good requests sent
    at the same moment (so the dynamic batcher may merge them with it) are served unchanged."""
    import threading

    import tritonclient.grpc as grpc
    import tritonclient.http as http

    tc, url = (http, server.http_url) if protocol == "http" else (grpc, server.grpc_url)
    with SRClient(server.http_url) as c:
        alone = c.super_resolve(lr[:1], steps=STEPS, seed=2)
    barrier = threading.Barrier(6)

    def send(params):
        client = tc.InferenceServerClient(url)
        x = tc.InferInput("LR", [1, 1, 64, 64], "FP32")
        x.set_data_from_numpy(lr[:1])
        barrier.wait()
        try:
            return client.infer("cxr_sr", [x], parameters=params).as_numpy("SR")
        except Exception as err:  # tritonclient's InferenceServerException
            return err
        finally:
            client.close()

    good = {"steps": STEPS, "seed": 2}
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, [good, {**good, "spcing": "leading"}] * 3))
    for out in results[0::2]:
        np.testing.assert_allclose(out, alone, atol=1e-6)
    code = "400" if protocol == "http" else "INVALID_ARGUMENT"
    for err in results[1::2]:
        assert isinstance(err, Exception) and code in str(err) and "'spcing'" in str(err)


def test_spacing_is_honoured(server, checkpoint, lr):
    """spacing changes the plan, hence the output, and matches the offline loop with it."""
    ckpt = load(checkpoint)
    with SRClient(server.http_url) as c:
        trailing = c.super_resolve(lr, steps=STEPS, seed=4, spacing="trailing")
        leading = c.super_resolve(lr, steps=STEPS, seed=4, spacing="leading")
        default = c.super_resolve(lr, steps=STEPS, seed=4)
    assert ckpt.sampling.spacing == "trailing"
    np.testing.assert_array_equal(default, trailing)
    assert np.abs(leading - trailing).max() > 1e-3
    opts = ckpt.sampling.replace(steps=STEPS, spacing="leading")
    offline = TorchPipeline(ckpt.vae, ckpt.denoiser).super_resolve(lr, ckpt.schedule, opts, 4)
    np.testing.assert_allclose(leading, offline, atol=1e-4)


def test_triton_reserved_parameters_do_not_reach_the_sampler(server, lr):
    """``timeout`` travels as a request parameter but Triton consumes it: no 400."""
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    x = http.InferInput("LR", [1, 1, 64, 64], "FP32")
    x.set_data_from_numpy(lr[:1])
    out = client.infer(
        "cxr_sr", [x], parameters={"steps": STEPS, "seed": 2}, timeout=60_000_000
    ).as_numpy("SR")
    with SRClient(server.http_url) as c:
        np.testing.assert_array_equal(out, c.super_resolve(lr[:1], steps=STEPS, seed=2))


@pytest.mark.parametrize("bad", ["range", "nan"])
def test_bad_pixels_fail_only_their_request(server, lr, bad):
    x = lr[:1].copy()
    x[0, 0, 0, 0] = 7.0 if bad == "range" else np.nan

    def send(arr, seed):
        with SRClient(server.http_url) as c:
            return c._infer(arr, {"steps": STEPS, "seed": seed})

    with ThreadPoolExecutor(2) as pool:
        good = pool.submit(send, lr[1:2], 3)
        broken = pool.submit(send, x, 3)
        assert good.result().shape == (1, 1, 256, 256)
        with pytest.raises(SRServerError, match="LR"):
            broken.result()


def test_client_validates_before_sending(server):
    with SRClient(server.http_url) as c:
        for bad in (np.zeros((1, 1, 8, 8), np.float32), np.full((1, 1, 32, 32), 2, np.float32)):
            with pytest.raises(ValueError):
                c.super_resolve(bad)


def test_cli_end_to_end_with_reference(server, tmp_path):
    """cxr-sr --eval reference on a phantom (HR known: metrics, SR at 256) and the default
    upscale of a 64x64 image (4x at its own geometry, LR consistency, no HR)."""
    from PIL import Image

    from cxr_sr.client.cli import main
    from cxr_sr.train.data.phantom import chest_phantom

    write_png(tmp_path / "ref" / "phantom.png", chest_phantom(512, seed=1))
    write_png(tmp_path / "up" / "small.png", chest_phantom(64, seed=2))
    common = ["--url", server.http_url, "--steps", str(STEPS), "--seed", "1", "--quiet"]
    for folder, extra in (("ref", ["--eval", "reference"]), ("up", [])):
        report = tmp_path / f"{folder}.json"
        args = [str(tmp_path / folder), "--out", str(tmp_path / f"out_{folder}")]
        assert main(args + ["--json", str(report)] + common + extra) == 0
        rows = json.loads(report.read_text())
        rows = rows if isinstance(rows, list) else rows.get("rows", rows)
        assert "psnr" in json.dumps(rows).lower()
    with Image.open(tmp_path / "out_ref" / "phantom_sr.png") as im:
        assert im.size == (256, 256)  # the reference protocol's HR size
    with Image.open(tmp_path / "out_up" / "small_sr.png") as im:
        assert im.size == (256, 256)  # 4x the 64x64 input


def test_defaults_come_from_the_checkpoint(server, checkpoint, lr):
    """No parameters = the checkpoint's sampling defaults with seed 0."""
    defaults = load(checkpoint).sampling
    assert isinstance(defaults, SamplingOptions)
    with SRClient(server.http_url) as c:
        np.testing.assert_array_equal(
            c.super_resolve(lr[:1]), c.super_resolve(lr[:1], steps=defaults.steps, seed=0)
        )
