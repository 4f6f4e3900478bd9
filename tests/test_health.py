"""Honest health: the inference probe, the serve wrapper's watchdog, prompt shutdown.

Triton 2.51 keeps its ready endpoints at 200 after a Python stub has died while every request
fails; these tests kill the sampler's stub (kill -9, as the OOM killer would) on a real
tritonserver under load and check that the probe says so, that the wrapper restarts the server
(or exits 1 with ``--on-failure exit``), and that stopping takes seconds, not Triton's 30.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from benchmarks.soak import server_processes
from cxr_sr.builders.probe import probe
from cxr_sr.builders.serve import (
    TritonServer,
    Watchdog,
    free_port,
    missing_stubs,
    stub_census,
)
from cxr_sr.client.triton import SRClient, SRServerError

ROOT = Path(__file__).resolve().parent.parent
RECOVERY_S = 60.0  # kill -> requests answered again: probes (1 s x 2) + stop (~5 s) + start


def _probe_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cxr_sr.builders.probe", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_probe_cli_healthy_server(server):
    done = _probe_cli("--url", server.http_url, "--timeout", "30")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("healthy: cxr_sr answered a 16x16 request")


def test_probe_cli_nothing_listening():
    done = _probe_cli("--url", f"127.0.0.1:{free_port()}", "--timeout", "3")
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unhealthy: no answer from")


def _stub(server_pid: int, model: str = "sampler") -> psutil.Process:
    return server_processes(server_pid)[model]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.integration
def test_killed_stub_fails_the_probe_while_ready_says_200_and_stop_is_prompt(built_repository):
    repo, _ = built_repository
    server = TritonServer(repo, log_file=repo.parent / "triton_health_stop.log").start()
    try:
        assert probe(server.http_url, 30).ok
        _stub(server.process.pid).kill()
        time.sleep(1.0)
        result = probe(server.http_url, 10)
        assert not result.ok and "not healthy" in result.detail  # Triton's own words
        assert _ready(server.http_url)  # what an orchestrator would have believed
        stubs = list(server_processes(server.process.pid).values())
    finally:
        t0 = time.monotonic()
        server.stop()
        took = time.monotonic() - t0
    assert took < server.exit_timeout_s + 4, f"stop took {took:.1f} s"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in stubs)


class _Load(threading.Thread):
    """Sends 16x16 one-step requests back to back; records (time, ok) of each."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.results: list[tuple[float, bool]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        lr = np.full((1, 1, 16, 16), 0.5, np.float32)
        while not self.halt.is_set():
            try:
                with SRClient(self.url, timeout_s=10) as client:
                    client.super_resolve(lr, steps=1, seed=0)
                self.results.append((time.monotonic(), True))
            except (SRServerError, OSError, ValueError):
                self.results.append((time.monotonic(), False))
                time.sleep(0.2)


def _serve(repo: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """The serve wrapper on free ports, probing every second; (process, HTTP url)."""
    http = free_port()
    cmd = [
        sys.executable,
        "-m",
        "cxr_sr.builders.serve",
        "--repository",
        str(repo),
        "--http-port",
        str(http),
        "--grpc-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        "--probe-interval",
        "1",
        "--probe-failures",
        "2",
        "--probe-timeout",
        "5",
        "--log-file",
        str(repo.parent / "triton_watchdog.log"),
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "tritonserver ready" in line:
            return proc, f"127.0.0.1:{http}"
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the serve wrapper did not start: {proc.stdout.read()}")


def _tritonserver(wrapper: subprocess.Popen) -> psutil.Process:
    children = psutil.Process(wrapper.pid).children()
    return next(c for c in children if c.name().startswith("tritonserver"))


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.mark.integration
def test_watchdog_restarts_the_server_after_a_stub_is_killed_under_load(built_repository):
    repo, _ = built_repository
    wrapper, url = _serve(repo)
    load = _Load(url)
    try:
        load.start()
        time.sleep(2.0)
        old = _tritonserver(wrapper)
        everything = list(server_processes(old.pid).values())
        killed_at = time.monotonic()
        _stub(old.pid).kill()
        recovered = None
        while time.monotonic() - killed_at < RECOVERY_S + 30:
            after = [ok for t, ok in load.results if t > killed_at + 0.5]
            if False in after and after[-1]:
                recovered = load.results[-1][0] - killed_at
                break
            time.sleep(0.5)
        load.halt.set()
        load.join(30)
        assert any(not ok for t, ok in load.results if t > killed_at), "the kill had no effect"
        assert recovered is not None and recovered < RECOVERY_S, f"no recovery: {recovered}"
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in everything)
        assert probe(url, 10).ok
        t0 = time.monotonic()
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(20) == 0
        took = time.monotonic() - t0
        output = wrapper.stdout.read()
    finally:
        load.halt.set()
        _end(wrapper)
    assert "restarting tritonserver" in output and "ready again" in output
    assert took < 12, f"stopping took {took:.1f} s"


@pytest.mark.integration
def test_on_failure_exit_stops_the_server_and_exits_1(built_repository):
    repo, _ = built_repository
    wrapper, url = _serve(repo, "--on-failure", "exit")
    try:
        server = _tritonserver(wrapper)
        everything = list(server_processes(server.pid).values())
        _stub(server.pid).kill()
        code = wrapper.wait(60)
        output = wrapper.stdout.read()
    finally:
        _end(wrapper)
    assert code == 1
    # the stub census names the model before the inference probe would say "not healthy"
    assert "probes in a row failed: Python stub process gone: sampler (1 of 1)" in output
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in everything)
    assert not _ready(url)


@pytest.mark.integration
def test_stub_census_counts_one_stub_per_python_model_instance(server, built_repository):
    repo, _ = built_repository
    python_models = {
        d.name for d in repo.iterdir() if 'backend: "python"' in (d / "config.pbtxt").read_text()
    }
    census = stub_census(server.process.pid)
    assert dict(census) == dict.fromkeys(python_models, 1), census
    assert missing_stubs(census, stub_census(server.process.pid)) is None
    assert stub_census(free_port() + 4_000_000) == {}  # no such process: nothing under it


def test_stub_census_reads_the_process_tree_below_the_server(tmp_path):
    """A fake /proc: stubs anywhere below the server count once each, by model; zombies,
    other servers' stubs and other processes do not; a comm with spaces and parentheses
    does not derail the parse; no /proc at all counts nothing."""

    def proc(pid, ppid, cmd, comm="triton_python_b", state="S"):
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(f"{pid} ({comm}) {state} {ppid} {pid} 0 0 -1 4228108\n")
        (d / "cmdline").write_bytes(b"\0".join(x.encode() for x in cmd) + b"\0")

    stub = "/opt/tritonserver/backends/python/triton_python_backend_stub"
    proc(100, 1, ["tritonserver", "--model-repository=/repo"], comm="tritonserver")
    proc(101, 100, [stub, "/repo/sampler/1/model.py", "shm", "1048576"])
    proc(102, 100, [stub, "/repo/sampler/1/model.py", "shm"], state="Z")  # dead, unreaped
    proc(103, 100, ["/bin/sh", "-c", "x"], comm="sh (odd) name")
    proc(104, 103, [stub, "/repo/unet/1/model.py", "shm"])  # below a child
    proc(200, 1, [stub, "/other/vae_decoder/1/model.py", "shm"])  # another parent
    (tmp_path / "self").mkdir()  # not a pid
    assert stub_census(100, tmp_path) == {"sampler": 1, "unet": 1}
    assert stub_census(999, tmp_path) == {}
    assert stub_census(100, tmp_path / "absent") == {}


def test_missing_stubs_names_each_model_short_of_its_count():
    from collections import Counter

    expected = Counter({"sampler": 2, "unet": 2, "vae_decoder": 1})
    assert missing_stubs(expected, Counter(expected)) is None
    assert missing_stubs(expected, Counter({"sampler": 1, "unet": 2})) == (
        "Python stub process gone: sampler (1 of 2), vae_decoder (1 of 1)"
    )


@pytest.mark.integration
def test_a_dead_stub_of_two_instances_stops_the_server(checkpoint, built_repository, tmp_path):
    """With two instances of every model the probe's request reaches one of them, and a dead
    stub of the other fails only the requests routed there; the stub census catches it."""
    from cxr_sr.builders import build

    _, onnx = built_repository
    repo = tmp_path / "repo_x2"
    args = ["--checkpoint", str(checkpoint), "--out", str(repo), "--onnx-dir", str(onnx)]
    assert build.main([*args, "--max-batch", "4", "--max-side", "128", "--instances", "2"]) == 0
    wrapper, url = _serve(repo, "--on-failure", "exit")
    try:
        server = _tritonserver(wrapper)
        assert stub_census(server.pid)["sampler"] == 2
        assert probe(url, 30).ok
        _stub(server.pid).kill()
        code = wrapper.wait(60)
        output = wrapper.stdout.read()
    finally:
        _end(wrapper)
    assert code == 1, output
    assert "Python stub process gone: sampler (1 of 2)" in output


def test_watchdog_trips_after_consecutive_failures_only():
    answers = iter([None, "down", None, "down", "down", "down"])
    dog = Watchdog(lambda: next(answers, "down"), interval_s=0.01, failures=2)
    dog.start()
    assert dog.tripped.wait(5)
    dog.join(5)
    assert dog.reason == "down"
    with pytest.raises(ValueError):
        Watchdog(lambda: None, interval_s=0, failures=1)
