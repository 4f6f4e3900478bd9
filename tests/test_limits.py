"""Limits a careless or hostile client cannot exceed, on a real tritonserver.

Steps and pixels per request, queue length and queue timeout are build-time settings
(``builders.build --max-steps --max-request-pixels --max-queue-size --queue-timeout-s``),
published in the ensemble's config; a request beyond them gets its own clear error while the
others are served; the sampler's loop stops when its gRPC client has gone.
"""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from cxr_sr.builders import build
from cxr_sr.builders.serve import TritonServer
from cxr_sr.builders.triton_config import ServingLimits, read_config

pytestmark = pytest.mark.integration


def _serve_with_limits(checkpoint, built_repository, folder, limits: list[str]):
    """(server, repository): the tiny model built with the limit flags ``limits`` into
    ``folder``, served until the generator is closed."""
    _, onnx = built_repository  # its ONNX cache: only the configs are written here
    repo = folder / "repo"
    args = ["--checkpoint", str(checkpoint), "--out", str(repo), "--onnx-dir", str(onnx)]
    assert build.main([*args, "--max-batch", "4", "--max-side", "128", *limits]) == 0
    with TritonServer(repo, log_file=repo.parent / "triton.log") as server:
        yield server, repo


@pytest.fixture(scope="module")
def limited_server(checkpoint, built_repository, tmp_path_factory):
    """The tiny model with tight limits: 3 steps, 2048 LR pixels, queues of 2."""
    limits = ["--max-steps", "3", "--max-request-pixels", "2048", "--max-queue-size", "2"]
    folder = tmp_path_factory.mktemp("limited")
    yield from _serve_with_limits(checkpoint, built_repository, folder, limits)


def _input(lr: np.ndarray, name: str = "LR") -> grpcclient.InferInput:
    x = grpcclient.InferInput(name, list(lr.shape), "FP32")
    x.set_data_from_numpy(np.ascontiguousarray(lr, dtype=np.float32))
    return x


def _lr(n: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.8, (n, 1, side, side)).astype(np.float32)


def _infer(url: str, lr: np.ndarray, **params) -> np.ndarray:
    client = grpcclient.InferenceServerClient(url)
    return client.infer("cxr_sr", [_input(lr)], parameters=params).as_numpy("SR")


def _published(url: str) -> dict[str, str]:
    """The parameters the server's cxr_sr config publishes."""
    client = grpcclient.InferenceServerClient(url)
    params = client.get_model_config("cxr_sr", as_json=True)["config"]["parameters"]
    return {k: v["string_value"] for k, v in params.items()}


def _burst(url: str, n: int = 16) -> dict[int, np.ndarray | InferenceServerException]:
    """``n`` requests sent at once (request i: LR crop seed i, 3 steps, seed i): i -> its SR
    or its error."""
    results: dict[int, np.ndarray | InferenceServerException] = {}

    def send(i: int) -> None:
        try:
            results[i] = _infer(url, _lr(1, 32, seed=i), steps=3, seed=i)
        except InferenceServerException as err:
            results[i] = err

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_limits_are_published_in_the_config(limited_server):
    server, repo = limited_server
    published = _published(server.grpc_url)
    assert published["max_steps"] == "3" and published["max_request_pixels"] == "2048"
    assert published["max_queue_size"] == "2" and published["queue_timeout_s"] == "120"
    for model in ("vae_encoder", "sampler"):
        policy = read_config(repo / model / "config.pbtxt").dynamic_batching.default_queue_policy
        assert policy.max_queue_size == 2 and policy.default_timeout_microseconds == 120_000_000
        assert policy.allow_timeout_override
    # none where a refusal would waste work done (vae_decoder) or could never happen (the UNet,
    # which only the sampler calls, one request at a time)
    for model in ("unet", "vae_decoder"):
        batching = read_config(repo / model / "config.pbtxt").dynamic_batching
        assert not batching.HasField("default_queue_policy"), model


def test_the_client_splits_a_batch_to_fit_the_request_pixel_limit(limited_server):
    """4 images of 32x32 (4,096 LR pixels) against a 2,048-pixel limit: SRClient reads the
    limit from the config and sends two requests of two, as a caller would by hand."""
    from cxr_sr.client import SRClient

    server, _ = limited_server
    lr = np.random.default_rng(2).random((4, 1, 32, 32)).astype(np.float32)
    with SRClient(server.http_url) as c:
        assert c.limits().max_request_pixels == 2048
        sr = c.super_resolve(lr, steps=1, seed=5)
        by_hand = np.concatenate([c.super_resolve(lr[i : i + 2], steps=1, seed=5) for i in (0, 2)])
    assert sr.shape == (4, 1, 128, 128)
    np.testing.assert_array_equal(sr, by_hand)


def test_limits_reject_nonsense_at_build_time():
    with pytest.raises(ValueError):
        ServingLimits(max_steps=0)
    with pytest.raises(ValueError):
        ServingLimits(max_request_pixels=-1)
    with pytest.raises(ValueError, match="max_queue_size"):
        ServingLimits(max_queue_size=-1)
    with pytest.raises(ValueError, match="queue_timeout_s"):
        ServingLimits(queue_timeout_s=float("nan"))
    assert ServingLimits().request_pixels(256) == 4 * 256 * 256
    # 0 turns a queue limit off; only with both off is there no queue policy
    assert ServingLimits().queue_policy
    assert ServingLimits(max_queue_size=0).queue_policy
    assert ServingLimits(queue_timeout_s=0).queue_policy
    assert not ServingLimits(max_queue_size=0, queue_timeout_s=0).queue_policy


@pytest.fixture(scope="module")
def unlimited_server(checkpoint, built_repository, tmp_path_factory):
    """The tiny model built with ``--max-queue-size 0 --queue-timeout-s 0``."""
    limits = ["--max-queue-size", "0", "--queue-timeout-s", "0"]
    folder = tmp_path_factory.mktemp("unlimited")
    yield from _serve_with_limits(checkpoint, built_repository, folder, limits)


def test_without_queue_limits_there_is_no_queue_policy_and_a_burst_is_served(unlimited_server):
    """No queue policy in any model (what lets Triton's batcher prefetch); the burst that a
    queue of 2 partly rejects is served whole, each result equal to the request sent alone."""
    server, repo = unlimited_server
    published = _published(server.grpc_url)
    assert published["max_queue_size"] == "0" and published["queue_timeout_s"] == "0"
    for model in ("vae_encoder", "sampler", "unet", "vae_decoder"):
        batching = read_config(repo / model / "config.pbtxt").dynamic_batching
        assert not batching.HasField("default_queue_policy"), model

    results = _burst(server.grpc_url)
    failed = {i: r for i, r in results.items() if not isinstance(r, np.ndarray)}
    assert len(results) == 16 and not failed, failed
    for i in (0, 7, 15):
        alone = _infer(server.grpc_url, _lr(1, 32, seed=i), steps=3, seed=i)
        np.testing.assert_array_equal(results[i], alone)


def test_too_many_steps_or_pixels_get_invalid_arg_naming_the_limit(limited_server):
    server, _ = limited_server
    assert _infer(server.grpc_url, _lr(2, 32), steps=3).shape == (2, 1, 128, 128)
    with pytest.raises(InferenceServerException, match=r"'steps' must be <= 3 .*max_steps") as e:
        _infer(server.grpc_url, _lr(1, 16), steps=4)
    assert "INVALID_ARG" in str(e.value.status())
    with pytest.raises(InferenceServerException, match=r"3,072 pixels.*max_request_pixels") as e:
        _infer(server.grpc_url, _lr(3, 32), steps=1)
    assert "INVALID_ARG" in str(e.value.status())


def test_a_full_queue_is_a_clear_rejection_and_the_server_goes_on(limited_server):
    server, _ = limited_server
    outcomes = _burst(server.grpc_url)
    rejected = [r.message() for r in outcomes.values() if not isinstance(r, np.ndarray)]
    assert len(outcomes) == 16
    assert rejected, "16 concurrent requests never filled a queue of 2"
    assert all("Exceeds maximum queue size" in o for o in rejected), rejected
    # the server is not worse for it: the next request is served
    assert _infer(server.grpc_url, _lr(1, 32), steps=3).shape == (1, 1, 128, 128)


def test_concurrent_good_and_bad_requests_good_ones_equal_serial(server):
    """Bad requests (too many steps, NaN, unknown key, too large) batched with good ones get
    their own errors; every good one equals the same request sent alone."""
    goods = [(_lr(1, 32, seed=i), {"steps": 2, "seed": i}) for i in range(4)]
    serial = [_infer(server.grpc_url, lr, **p) for lr, p in goods]
    nan = _lr(1, 32)
    nan[0, 0, 3, 3] = np.nan
    bads = [
        (_lr(1, 32), {"steps": 51}),
        (nan, {"steps": 2}),
        (_lr(1, 32), {"steps": 2, "stpes": 3}),
        (_lr(1, 32), {"steps": 2, "seed": -5}),
    ]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    done = threading.Semaphore(0)
    results: dict[int, object] = {}

    def callback(i, result, error):
        results[i] = error if error is not None else result.as_numpy("SR")
        done.release()

    mixed = [x for pair in zip(goods, bads, strict=True) for x in pair]
    for i, (lr, params) in enumerate(mixed):
        client.async_infer(
            "cxr_sr", [_input(lr)], functools.partial(callback, i), parameters=params
        )
    for _ in mixed:
        assert done.acquire(timeout=120)
    for k, expected in enumerate(serial):
        got = results[2 * k]
        assert isinstance(got, np.ndarray), got
        np.testing.assert_array_equal(got, expected)
    for k in range(len(bads)):
        err = results[2 * k + 1]
        assert isinstance(err, InferenceServerException), err
        assert "INVALID_ARG" in str(err.status()), err.message()


def _unet_calls(client: grpcclient.InferenceServerClient) -> int:
    stats = client.get_inference_statistics("unet", as_json=True)
    return sum(int(m["inference_stats"]["success"].get("count", 0)) for m in stats["model_stats"])


def test_sampling_loop_stops_when_its_grpc_client_is_gone(server):
    """A client that gives up (gRPC deadline) cancels the request; the sampler asks between
    steps and stops. Triton 2.51 passes cancellation to a model called directly, not to the
    steps of an ensemble, so this calls ``sampler`` itself."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    config = client.get_model_config("sampler", as_json=True)["config"]
    # the chain layout's sampler takes the LR, the models layout's the LR's latent
    name, channels = config["input"][0]["name"], int(config["input"][0]["dims"][0])
    x = np.full((1, channels, 64, 64), 0.5, np.float32)

    def timed(steps: int) -> float:
        t0 = time.monotonic()
        client.infer("sampler", [_input(x, name)], parameters={"steps": steps})
        return time.monotonic() - t0

    # a step's time is the difference of two calls (warm; the fastest of three each: a stall
    # only adds time), not one call's time over its steps: a stall or the fixed cost of a
    # request counted as steps made a deadline of "8 steps" outlast all 50 (twice in CI)
    timed(1)
    short = min(timed(2) for _ in range(3))
    long = min(timed(12) for _ in range(3))
    per_step = max(1e-3, (long - short) / 10)
    fixed = max(0.0, short - 2 * per_step)
    before = _unet_calls(client)
    with pytest.raises(InferenceServerException, match="Deadline"):
        client.infer(
            "sampler",
            [_input(x, name)],
            parameters={"steps": 50},
            client_timeout=max(0.2, fixed + 8 * per_step),
        )
    calls, deadline = -1, time.monotonic() + 50 * per_step + 5
    while time.monotonic() < deadline:  # until the loop has stopped (or run all 50 steps)
        time.sleep(max(0.3, 3 * per_step))
        now = _unet_calls(client) - before
        if now == calls:
            break
        calls = now
    assert 0 < calls < 50, f"{calls} UNet calls after the client left"
