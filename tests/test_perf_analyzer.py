"""The real perf_analyzer (tritonclient 2.51 wheel) against the real tritonserver.

A short, bounded load test of ``cxr_sr`` on the tiny repository (conftest.py): it must exit
0, report a positive throughput in its CSV and cause no failed request on the server. Only
a missing Debian ``libb64-0d`` skips it (CI installs it in .ci/run). Timings are never
asserted.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks.perf import (
    MAX_REQUEST_COUNT,
    PerfSettings,
    count_window_floored,
    failed_count,
    larger_count,
    locate_perf_analyzer,
    missing_libraries,
    parse_csv,
    perf_analyzer_env,
    perf_command,
    run_level,
    write_input_data,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def perf_analyzer():
    """(binary, environment); skips only when libb64 is what is missing."""
    binary = locate_perf_analyzer()
    env = perf_analyzer_env()
    missing = missing_libraries(binary, env)
    if any("libb64" in lib for lib in missing):
        pytest.skip("perf_analyzer needs Debian's libb64-0d: apt-get install -y libb64-0d")
    assert not missing, f"perf_analyzer cannot load {missing} (nvidia-cuda-runtime-cu12?)"
    return binary, env


@pytest.fixture(scope="module")
def input_data(tmp_path_factory):
    lr = np.random.default_rng(0).random((3, 1, 64, 64)).astype(np.float32)
    return write_input_data(tmp_path_factory.mktemp("perf") / "lr.json", lr)


def _level(
    server, perf_analyzer, input_data, workdir, concurrency, settings=None, timeout_s=300, **kw
):
    """``run_level`` against the tiny repository's ``cxr_sr`` (``kw``: ``PerfSettings`` fields
    over 1 step, where ``settings`` is not given)."""
    binary, env = perf_analyzer
    settings = settings or PerfSettings(parameters={"steps": 1}, **kw)
    return run_level(
        binary,
        env,
        model="cxr_sr",
        url=server.grpc_url,
        concurrency=concurrency,
        input_data=input_data,
        workdir=workdir,
        settings=settings,
        timeout_s=timeout_s,
    )


def test_perf_analyzer_reports_throughput_without_errors(
    server, perf_analyzer, input_data, tmp_path
):
    binary, env = perf_analyzer
    csv_path = tmp_path / "perf.csv"
    # eta goes out as perf_analyzer's string type; the server parses it as the number
    parameters = {"steps": 2, "seed": 1, "eta": 0.0, "spacing": "leading"}
    settings = PerfSettings(parameters=parameters, measurement_ms=1500, request_count=8)
    cmd = perf_command(
        binary,
        model="cxr_sr",
        url=server.grpc_url,
        concurrency=2,
        input_data=input_data,
        csv_path=csv_path,
        settings=settings,
    )
    before = failed_count(server.grpc_url, "cxr_sr")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = parse_csv(csv_path)
    assert len(rows) == 1
    assert rows[0]["Concurrency"] == 2
    assert rows[0]["Inferences/Second"] > 0
    assert rows[0]["p50 latency"] > 0
    assert before is not None and failed_count(server.grpc_url, "cxr_sr") == before


def test_run_level_counts_rejected_requests(server, perf_analyzer, tmp_path):
    """Out-of-range inputs are rejected (400): the level fails and the failures are counted."""
    bad = write_input_data(tmp_path / "bad.json", np.full((1, 1, 64, 64), 7.0, np.float32))
    result, log = _level(server, perf_analyzer, bad, tmp_path, 1, request_count=2, timeout_s=120)
    assert result.error and result.returncode != 0 and result.throughput is None
    assert result.failed_requests and result.failed_requests > 0
    assert "LR" in log


def test_run_level_reports_the_batches_each_model_formed(
    server, perf_analyzer, input_data, tmp_path
):
    """The server's statistics around a level: every model of the chain served the level's
    requests, in batches no larger than the repository's max batch (4)."""
    result, log = _level(server, perf_analyzer, input_data, tmp_path, 4, request_count=8)
    assert result.error is None, log[-3000:]
    models = result.models
    assert {"cxr_sr", "vae_encoder", "sampler", "unet", "vae_decoder"} <= set(models), models
    for name in ("cxr_sr", "vae_encoder", "sampler", "vae_decoder"):
        assert models[name]["requests"] >= 8  # perf_analyzer may send a few more
    for name, m in models.items():
        assert 1 <= m["mean_batch"] <= 4, (name, m)
        assert m["queue_ms"] >= 0 and m["compute_infer_ms"] > 0, (name, m)


def test_a_count_window_at_its_one_second_floor_is_measured_again(
    server, perf_analyzer, input_data, tmp_path
):
    """Two requests on the tiny repository finish well inside a second; perf_analyzer still
    divides them by one second (2 img/s). The level is measured again over a count the
    latencies call for, and the throughput is what those requests took."""
    result, log = _level(
        server, perf_analyzer, input_data, tmp_path, 2, measurement_ms=1000, request_count=2
    )
    assert result.error is None and result.stable, log[-3000:]
    assert "1 s floor" in log
    assert result.request_count > 2
    assert result.throughput > 3.0  # 2 requests / 1 s read 2.0
    assert result.request_count / result.throughput > 0.9  # this window was not floored


def _row(count_per_s: float, p50_ms: float, concurrency: int) -> dict[str, float]:
    return {
        "Concurrency": concurrency,
        "Inferences/Second": count_per_s,
        "p50 latency": p50_ms * 1e3,
    }


def test_count_window_floor_is_told_from_latencies():
    # an H100 level: 32 requests read 32 img/s while 16 clients waited ~20 ms each
    assert count_window_floored(_row(31.98, 19.6, 16), 32)
    assert larger_count(_row(31.98, 19.6, 16), 32, 1500) == 1633  # 816 img/s x 2 s
    # the CPU: 32 requests over 3.8 s, as the latencies say: a true window
    assert not count_window_floored(_row(8.47, 118, 1), 32)
    # a window of one second that the latencies agree with
    assert not count_window_floored(_row(8.0, 480, 4), 8)
    # no count (a time window), or nothing measured
    assert not count_window_floored(_row(31.98, 19.6, 16), 0)
    assert not count_window_floored(_row(0.0, 19.6, 16), 32)
    # at least 4x the last count; never past the cap
    assert larger_count(_row(8.0, 400, 4), 8, 1000) == 32
    assert larger_count(_row(1e6, 0.001, 64), 32, 5000) == MAX_REQUEST_COUNT


def test_shared_memory_settings_reach_the_command(tmp_path):
    """--shared-memory system: perf_analyzer registers regions sized for the largest output;
    a missing size or an unknown kind is refused before anything runs."""
    common = {
        "model": "cxr_sr",
        "url": "127.0.0.1:1",
        "concurrency": 1,
        "input_data": tmp_path / "lr.json",
        "csv_path": tmp_path / "perf.csv",
    }
    settings = PerfSettings(shared_memory="system", output_bytes=262144)
    cmd = perf_command(Path("perf_analyzer"), settings=settings, **common)
    assert "--shared-memory=system" in cmd
    assert cmd[cmd.index("--output-shared-memory-size") + 1] == "262144"
    assert "--shared-memory=system" not in perf_command(
        Path("perf_analyzer"), settings=PerfSettings(), **common
    )
    with pytest.raises(ValueError, match="output_bytes"):
        perf_command(Path("perf_analyzer"), settings=PerfSettings(shared_memory="system"), **common)
    with pytest.raises(ValueError, match="shared_memory must be one of"):
        PerfSettings(shared_memory="cuda")


def test_run_level_through_shared_memory(server, perf_analyzer, input_data, tmp_path):
    """The same level with inputs and outputs in system shared memory: served, no failures."""
    settings = PerfSettings(
        parameters={"steps": 1}, request_count=8, shared_memory="system", output_bytes=4 * 256 * 256
    )
    result, log = _level(server, perf_analyzer, input_data, tmp_path, 2, settings)
    assert result.error is None, log[-3000:]
    assert result.throughput > 0 and result.failed_requests == 0
    assert result.models["sampler"]["requests"] >= 8
