"""benchmarks.overload: where a flooded server refuses requests. The figures from
statistics snapshots, and a real flood of the tiny model built with queues of 2."""

from __future__ import annotations

import json

import pytest

from benchmarks import overload
from cxr_sr.builders import build


def _snapshot(**images: int) -> dict[str, dict[str, int]]:
    return {
        name: {
            "requests": n,
            "executions": n // 2,
            "queue_ns": n * 3_000_000,
            "busy_ns": n * 5_000_000,
        }
        for name, n in images.items()
    }


def test_work_refused_after_the_sampler_is_counted_as_discarded():
    before = _snapshot(vae_encoder=0, sampler=0, vae_decoder=0)
    after = _snapshot(vae_encoder=30, sampler=12, vae_decoder=10)
    models = overload.model_rows(before, after, served=10)
    assert {name: m["discarded"] for name, m in models.items()} == {
        "vae_encoder": 20,
        "sampler": 2,
        "vae_decoder": 0,
    }
    assert models["sampler"]["mean_batch"] == 2.0
    assert models["sampler"]["queue_ms"] == pytest.approx(3.0)
    assert models["sampler"]["compute_ms"] == pytest.approx(5.0)
    assert models["sampler"]["discarded_compute_s"] == pytest.approx(0.01)
    outcomes = overload.Outcomes(latencies_s=[0.1] * 10, refused=40)
    report = overload.summarise(outcomes, 5.0, models)
    assert not report["passed"]
    assert report["problems"] == [
        "2 of the 12 images the sampler ran were refused after it (a queue limit after the "
        "UNet loop)"
    ]
    assert report["served_img_s"] == 2.0 and report["refused_per_s"] == 8.0


def test_other_errors_fail_and_no_refusal_is_only_a_note():
    models = overload.model_rows(
        _snapshot(sampler=0, vae_decoder=0), _snapshot(sampler=4, vae_decoder=4), served=4
    )
    calm = overload.Outcomes(latencies_s=[0.1] * 4)
    report = overload.summarise(calm, 1.0, models)
    assert report["passed"] and report["notes"] and not report["problems"]
    calm.add(None, "in ensemble 'cxr_sr', Failed to process the request(s) for model 'unet'")
    calm.add(None, "in ensemble 'cxr_sr', Exceeds maximum queue size")
    report = overload.summarise(calm, 1.0, models)
    assert report["refused"] == 1 and not report["passed"]
    assert report["problems"] == ["1 requests failed other than refused"]


def test_arguments_out_of_range_are_refused():
    for bad in (["--clients", "0"], ["--duration-s", "0"], ["--backoff-s", "-1"], ["--size", "0"]):
        with pytest.raises(SystemExit) as e:
            overload.parse_args(bad)
        assert e.value.code == 2


@pytest.mark.integration
def test_a_flood_is_refused_before_the_unet_loop_never_after(
    checkpoint, built_repository, tmp_path
):
    """24 clients resending at once for 6 s against queues of 2: many refusals, and every
    image the sampler ran was decoded and served. With a queue limit at vae_decoder (the
    builder's default until 2026-11-27) this failed in 3 runs of 3: 4, 10 and 4 of 40-46
    sampler runs discarded."""
    _, onnx = built_repository
    repo = tmp_path / "repo"
    args = ["--checkpoint", str(checkpoint), "--out", str(repo), "--onnx-dir", str(onnx)]
    assert (
        build.main([*args, "--max-batch", "4", "--max-side", "128", "--max-queue-size", "2"]) == 0
    )
    out = tmp_path / "overload.json"
    flood = ["--clients", "24", "--duration-s", "6", "--backoff-s", "0", "--size", "32"]
    code = overload.main(["--repository", str(repo), "--out", str(out), *flood])
    report = json.loads(out.read_text())
    assert code == 0, report["problems"]
    assert report["served"] > 10 and report["refused"] > 100 and not report["other_errors"]
    models = report["models"]
    assert models["sampler"]["discarded"] == models["vae_decoder"]["discarded"] == 0
    assert models["sampler"]["images"] == report["served"]
    assert models["vae_encoder"]["images"] >= models["sampler"]["images"]
    assert report["max_queue_size"] == 2 and report["clients"] == 24
    assert report["versions"]["tritonserver"] and report["device"]["cpu"]
    assert str(tmp_path) not in out.read_text()  # no machine paths in the report
