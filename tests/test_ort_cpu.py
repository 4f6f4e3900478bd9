"""cxr_sr.ort_cpu: a batch spread over parallel onnxruntime calls gives the one-call result."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cxr_sr.ort_cpu import (
    CpuNetwork,
    lane_count,
    lane_plan,
    lane_setting,
    session,
    spin_mode,
    spin_setting,
)


def _rows(slices) -> list[int]:
    return [r for s in slices for r in range(s.start, s.stop)]


@pytest.mark.parametrize("rows", range(0, 10))
@pytest.mark.parametrize("lanes", [1, 2, 3])
@pytest.mark.parametrize(
    "pixels,max_pixels", [(4096, 32768), (16384, 32768), (65536, 32768), (10, None)]
)
def test_lane_plan_runs_every_row_once_in_order_within_the_pixel_budget(
    rows, lanes, pixels, max_pixels
):
    lane_calls, rest = lane_plan(rows, pixels, max_pixels, lanes)
    order = _rows([s for calls in lane_calls for s in calls] + rest)
    assert order == list(range(rows))
    if lane_calls:
        assert len(lane_calls) == lanes
        sizes = {len(_rows(calls)) for calls in lane_calls}
        assert len(sizes) == 1, "the lanes share the rows equally"
        assert len(_rows(rest)) < lanes, "only what does not fill a group is left over"
        # all lanes run at once: together they stay within one call's budget
        if max_pixels:
            assert all(
                (s.stop - s.start) * pixels * lanes <= max_pixels for c in lane_calls for s in c
            )
    else:
        assert lanes == 1 or rows < lanes or (max_pixels and pixels * lanes > max_pixels)
    for s in rest:  # one call: at most the budget, or one row that is larger on its own
        assert s.stop - s.start == 1 or not max_pixels or (s.stop - s.start) * pixels <= max_pixels


def test_lane_plan_examples():
    # a pair: one row per lane; an odd batch: the last row after them, with every thread
    assert lane_plan(2, 4096, 32768, 2) == ([[slice(0, 1)], [slice(1, 2)]], [])
    assert lane_plan(3, 4096, 32768, 2) == ([[slice(0, 1)], [slice(1, 2)]], [slice(2, 3)])
    # LR 128 rows: two fit the budget, so each lane takes them one call at a time
    assert lane_plan(4, 16384, 32768, 2) == (
        [[slice(0, 1), slice(1, 2)], [slice(2, 3), slice(3, 4)]],
        [],
    )
    # LR 256 rows: two at once would double the memory a call may take: one at a time
    assert lane_plan(2, 65536, 32768, 2) == ([], [slice(0, 1), slice(1, 2)])
    assert lane_plan(1, 4096, 32768, 2) == ([], [slice(0, 1)])


def test_usable_cores_follow_the_affinity_or_else_the_core_count(monkeypatch):
    """One count of usable cores for the lanes, the noise pool and the benchmark reports."""
    from cxr_sr.host import usable_cores
    from cxr_sr.noise import noise_threads

    monkeypatch.delenv("CXR_NOISE_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {2, 5, 7})
    assert usable_cores() == 3 and noise_threads() == 3
    monkeypatch.delattr("os.sched_getaffinity")  # platforms without it (macOS)
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert usable_cores() == 6
    monkeypatch.setattr("os.cpu_count", lambda: None)  # "undetermined"
    assert usable_cores() == 1


def test_lane_count_settings(monkeypatch):
    assert lane_count("auto", 2) == 2
    assert lane_count("auto", 8) == 2
    assert lane_count("auto", 1) == 1  # one thread: nothing to split
    assert lane_count(" 3 ", 2) == 3
    assert lane_count(1, 4) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert lane_count("auto", 0) == 1  # 0 threads = one per usable core
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert lane_count("auto", 0) == 2
    for bad, message in [("two", "'auto' or an integer"), ("0", "got 0"), ("65", "got 65")]:
        with pytest.raises(ValueError, match=message):
            lane_count(bad, 2)


LATENT_CHANNELS = 4  # the tiny checkpoint's (conftest)


def test_lane_setting_prefers_the_environment(monkeypatch):
    monkeypatch.delenv("CXR_ORT_LANES", raising=False)
    assert lane_setting(None) == "auto"
    assert lane_setting("1") == "1"
    monkeypatch.setenv("CXR_ORT_LANES", "3")
    assert lane_setting("1") == "3" and lane_setting(None) == "3"
    monkeypatch.setenv("CXR_ORT_LANES", "")  # empty: as if unset
    assert lane_setting("1") == "1"


def test_spin_modes_read_names_and_booleans_and_name_the_choices(monkeypatch):
    assert [spin_mode(m) for m in ("off", " RUN ", "on")] == ["off", "run", "on"]
    assert [spin_mode(b) for b in (True, False, "true", "no", "1")] == [
        "on",
        "off",
        "on",
        "off",
        "on",
    ]
    with pytest.raises(ValueError, match="one of off, run, on .* got 'spin'"):
        spin_mode("spin")
    monkeypatch.delenv("CXR_ORT_SPINNING", raising=False)
    assert spin_setting(None) == "run" and spin_setting("false") == "off"
    monkeypatch.setenv("CXR_ORT_SPINNING", "on")
    assert spin_setting("off") == "on"


@pytest.mark.parametrize(
    "mode,allow,stop", [("off", "0", None), ("run", "1", "1"), ("on", "1", None)]
)
def test_a_spin_mode_sets_onnxruntime_spinning_and_its_stop_after_a_call(
    decoder_path, mode, allow, stop
):
    options = session(decoder_path, 2, spinning=mode).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == allow
    if stop is None:  # onnxruntime raises for an entry that was never set
        with pytest.raises(Exception, match="force_spinning_stop"):
            options.get_session_config_entry("session.force_spinning_stop")
    else:
        assert options.get_session_config_entry("session.force_spinning_stop") == stop


def _decoder_feeds(rows: int, side: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "z": rng.standard_normal((rows, LATENT_CHANNELS, side, side), dtype=np.float32),
        "LR": rng.random((rows, 1, side, side), dtype=np.float32),
    }


@pytest.fixture(scope="module")
def decoder_path(built_repository):
    _, onnx_dir = built_repository
    return onnx_dir / "vae_decoder.onnx"


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_lanes_give_the_one_call_result(decoder_path, rows):
    """A batch through two lanes (and a capped call size) = the same batch in one call."""
    feeds = _decoder_feeds(rows, 16, seed=rows)
    one = CpuNetwork(decoder_path, 2)
    # a budget of 2 rows per call: each lane then runs one row per call
    split = CpuNetwork(decoder_path, 2, lanes=2, max_pixels=2 * 16 * 16)
    try:
        want = one.run(None, feeds)
        got = split.run(None, feeds)
        assert len(got) == len(want) == 1
        assert got[0].shape == want[0].shape == (rows, 1, 64, 64)
        np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    finally:
        one.close()
        split.close()


def test_lanes_run_at_the_same_time(decoder_path, monkeypatch):
    """The lanes' calls overlap: both are inside onnxruntime before either returns. With
    one thread per lane they share one session (concurrent calls of one session)."""
    net = CpuNetwork(decoder_path, 2, lanes=2)
    sessions = {id(s): s for s in net._lane_sessions}
    assert len(sessions) == 1 and net.session not in net._lane_sessions
    inside, both = [], threading.Barrier(2, timeout=30)
    (sess,) = sessions.values()
    real = sess.run

    def run(outputs, feeds):
        inside.append(threading.get_ident())
        both.wait()  # would time out (BrokenBarrierError) if the calls ran one by one
        return real(outputs, feeds)

    monkeypatch.setattr(sess, "run", run)
    try:
        out = net.run(None, _decoder_feeds(2, 16))[0]
    finally:
        net.close()
    assert out.shape == (2, 1, 64, 64)
    assert len(set(inside)) == 2


def test_lanes_with_several_threads_get_a_session_each(decoder_path):
    net = CpuNetwork(decoder_path, 4, lanes=2)
    try:
        assert len({id(s) for s in net._lane_sessions}) == 2
        feeds = _decoder_feeds(2, 16)
        np.testing.assert_allclose(
            net.run(None, feeds)[0], CpuNetwork(decoder_path, 4).run(None, feeds)[0], atol=1e-6
        )
    finally:
        net.close()


def test_a_failing_call_raises_to_the_caller(decoder_path):
    net = CpuNetwork(decoder_path, 2, lanes=2)
    feeds = _decoder_feeds(2, 16)
    feeds["z"] = feeds["z"][:, :1]  # one latent channel too few: onnxruntime refuses it
    try:
        with pytest.raises(Exception, match=r"(?i)invalid|shape|dimension"):
            net.run(None, feeds)
        # and the network keeps working
        assert net.run(None, _decoder_feeds(2, 16))[0].shape == (2, 1, 64, 64)
    finally:
        net.close()


def test_constructor_checks_lanes(decoder_path):
    with pytest.raises(ValueError, match="lanes must be at least 1"):
        CpuNetwork(decoder_path, 2, lanes=0)
