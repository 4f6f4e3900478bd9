"""benchmarks.batcher_waits: reading Triton's trace file, batches, idle waits; and a real
traced load against the tiny repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.batcher_waits import (
    analyse,
    idle_ns,
    main,
    model_batches,
    overlapping_batches,
    read_trace,
    request_breakdown,
)

MS = 1_000_000


def _request(trace_id: int, model: str, queue: float, start: float, end: float) -> list[dict]:
    """One request's entries as Triton writes them: the model, then one entry per stamp."""
    stamps = {"REQUEST_START": queue, "QUEUE_START": queue, "COMPUTE_START": start,
              "COMPUTE_END": end, "REQUEST_END": end}  # fmt: skip
    return [{"id": trace_id, "model_name": model, "model_version": 1, "parent_id": 0}] + [
        {"id": trace_id, "timestamps": [{"name": name, "ns": int(ms * MS)}]}
        for name, ms in stamps.items()
    ]


def _write(path: Path, requests: list[tuple[str, float, float, float]]) -> Path:
    entries = []
    for i, (model, queue, start, end) in enumerate(requests, start=1):
        entries += _request(i, model, queue, start, end)
    path.write_text(json.dumps(entries))
    return path


# a sampler batch of 2 runs 0-200 ms; a request queued at 150 ms (while it ran) starts at
# 700 ms: 500 ms of its wait with the sampler idle. A request queued at 800 ms starts at
# 801 ms. The encoder's one request waited 1 ms.
TRACE = [
    ("sampler", 0.0, 0.5, 200.0),
    ("sampler", 0.2, 0.5, 200.0),
    ("sampler", 150.0, 700.0, 800.0),
    ("sampler", 800.0, 801.0, 900.0),
    ("vae_encoder", 10.0, 11.0, 20.0),
]


def test_trace_entries_become_spans_and_batches(tmp_path):
    spans = read_trace(_write(tmp_path / "trace.json", TRACE))
    assert len(spans) == 5
    assert {s.model for s in spans.values()} == {"sampler", "vae_encoder"}
    batches = model_batches(spans, "sampler")
    assert [len(b.queued) for b in batches] == [2, 1, 1]
    assert batches[0].start == int(0.5 * MS) and batches[0].end == 200 * MS


def test_network_batches_running_at_once_are_counted(tmp_path):
    """A batch of one network that starts while another network's batch runs counts once;
    the sampler (which calls the UNet from inside its own batch) and back-to-back batches
    do not."""
    trace = [
        ("sampler", 0.0, 0.0, 100.0),
        ("vae_encoder", 0.0, 1.0, 10.0),
        ("unet", 10.0, 10.0, 50.0),  # after the encoder: fine
        ("vae_decoder", 20.0, 40.0, 90.0),  # while the UNet runs: counted
        ("vae_encoder", 45.0, 50.0, 60.0),  # the UNet ended at 50, the decoder still runs
        ("vae_encoder", 95.0, 95.0, 99.0),  # alone again
    ]
    spans = read_trace(_write(tmp_path / "trace.json", trace))
    assert overlapping_batches(spans) == 2
    assert overlapping_batches(spans, ("vae_encoder", "unet")) == 0


def test_idle_time_excludes_the_busy_intervals():
    busy = [(0, 200), (700, 800)]
    assert idle_ns(150, 700, busy) == 500
    assert idle_ns(0, 200, busy) == 0
    assert idle_ns(100, 900, busy) == 500 + 100
    assert idle_ns(300, 400, busy) == 100
    assert idle_ns(300, 400, []) == 100


def test_a_request_left_queued_at_an_idle_model_is_reported(tmp_path):
    report = analyse(read_trace(_write(tmp_path / "trace.json", TRACE)), min_idle_ms=50)
    sampler = report["sampler"]
    assert sampler["batches"] == 3 and sampler["requests"] == 4
    assert sampler["queue_ms"]["max"] == pytest.approx(550.0)
    [wait] = sampler["idle_waits"]
    assert wait["idle_ms"] == pytest.approx(500.0) and wait["queued_ms"] == pytest.approx(550.0)
    assert wait["batch"] == 1 and wait["at_ms"] == pytest.approx(150.0)
    assert report["vae_encoder"]["idle_waits"] == []
    # a threshold above the wait reports nothing
    assert (
        analyse(read_trace(tmp_path / "trace.json"), min_idle_ms=600)["sampler"]["idle_waits"] == []
    )


def test_a_request_is_broken_down_into_its_steps(tmp_path):
    """Two ensemble requests: per step the median queue and compute, the rest as other."""
    entries = []
    for parent, offset in ((100, 0.0), (200, 1000.0)):
        entries += [
            {"id": parent, "model_name": "cxr_sr", "model_version": 1},
            {"id": parent, "timestamps": [{"name": "REQUEST_START", "ns": int(offset * MS)}]},
            {"id": parent, "timestamps": [{"name": "REQUEST_END", "ns": int((offset + 50) * MS)}]},
        ]
        # encoder: queued 2 ms, ran 8; sampler: queued 1 ms, ran 37 (2 ms between them)
        for step, (model, queue, start, end) in enumerate(
            [("vae_encoder", 0, 2, 10), ("sampler", 12, 13, 50)], start=1
        ):
            child = _request(parent + step, model, offset + queue, offset + start, offset + end)
            child[0]["parent_id"] = parent
            entries += child
    (tmp_path / "trace.json").write_text(json.dumps(entries))
    spans = read_trace(tmp_path / "trace.json")
    parts = request_breakdown(spans)
    assert parts == {
        "requests": 2,
        "vae_encoder queue_ms": 2.0,
        "vae_encoder compute_ms": 8.0,
        "sampler queue_ms": 1.0,
        "sampler compute_ms": 37.0,
        "total_ms": 50.0,
        "other_ms": 2.0,
    }
    assert list(parts)[1:3] == ["vae_encoder queue_ms", "vae_encoder compute_ms"]
    assert request_breakdown(read_trace(_write(tmp_path / "flat.json", TRACE))) is None


def test_main_reads_a_trace_and_writes_the_report(tmp_path, capsys):
    trace = _write(tmp_path / "trace.json", TRACE)
    out = tmp_path / "waits.json"
    assert main(["--trace", str(trace), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sampler: batch of 1" in printed and "500.0 ms of it with sampler idle" in printed
    payload = json.loads(out.read_text())
    assert payload["models"]["sampler"]["idle_waits"][0]["idle_ms"] == pytest.approx(500.0)
    assert payload["perf"] == []


def test_a_file_that_is_not_a_trace_is_an_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a trace"}))
    assert main(["--trace", str(bad), "--out", str(tmp_path / "x.json")]) == 1
    assert "not a Triton trace file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--trace", str(tmp_path / "missing.json")])


@pytest.mark.integration
def test_a_traced_load_on_a_real_server(built_repository, tmp_path):
    """Triton writes the trace; every client request passes each step of the ensemble once,
    and the sampler's BLS calls to the UNet join its requests' traces (one call per step
    for each batch the sampler ran)."""
    repo, _ = built_repository
    out = tmp_path / "waits.json"
    args = ["--repository", str(repo), "--concurrency", "2", "--windows", "1",
            "--measurement-ms", "1000", "--out", str(out),
            "--keep-trace", str(tmp_path / "kept" / "trace.json")]  # fmt: skip
    assert main(args) == 0
    payload = json.loads(out.read_text())
    # the kept trace reads back to the same report
    assert analyse(read_trace(tmp_path / "kept" / "trace.json")) == payload["models"]
    [window] = payload["perf"]
    assert window["failed_requests"] == 0 and window["images_per_s"] > 0
    models = payload["models"]
    assert {"vae_encoder", "sampler", "unet", "vae_decoder"} <= set(models)
    served = models["sampler"]["requests"]
    assert served > 0
    assert models["vae_encoder"]["requests"] == served == models["vae_decoder"]["requests"]
    for model in ("vae_encoder", "sampler", "vae_decoder"):
        r = models[model]
        assert 1 <= r["mean_batch"] <= 4 and r["batches"] <= r["requests"] == served
    # 1 step (the tiny checkpoint's default): one UNet request per sampler batch
    assert models["unet"]["requests"] == models["sampler"]["batches"]
    # each request's steps run one after the other within it (the last step's compute ends
    # a little after the ensemble has answered, so the rest can be slightly negative)
    # the cpu target's rate limiter: no network batch starts while another network runs
    assert payload["overlapping_network_batches"] == 0
    parts = payload["request_breakdown"]
    assert parts["requests"] == served and parts["other_ms"] > -1.0
    assert parts["sampler compute_ms"] > 0 and parts["total_ms"] > parts["sampler compute_ms"]
