"""The preprocessing cache: shards, resume, bad images, CachedPairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxr_sr.imaging import area_downsample
from cxr_sr.train.data import DataConfig, build_dataset
from cxr_sr.train.data.fake import write_fake_nih
from cxr_sr.train.data.prepare import CachedPairs, main, prepare


@pytest.fixture()
def nih_root(tmp_path):
    root = tmp_path / "nih"
    names = write_fake_nih(
        root, n_patients=6, images_per_patient=2, n_test_patients=2, size=320, layout="split"
    )  # > 256: the reference protocol never makes an HR image by enlarging
    bad = next(root.glob(f"images_*/images/{names[3]}"))
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # a corrupt download
    return root


def run(root, out, *extra):
    main(
        [
            "--source",
            "nih",
            "--root",
            str(root),
            "--out",
            str(out),
            "--split",
            "train",
            "--shard-size",
            "3",
            "--val-fraction",
            "0",
            "--quiet",
            *extra,
        ]
    )
    return json.loads((out / "train" / "index.json").read_text())


def test_prepare_writes_shards_skips_bad_and_resumes(nih_root, tmp_path, capsys):
    out = tmp_path / "cache"
    index = run(nih_root, out, "--workers", "2")
    assert index["count"] == 7 and len(index["skipped"]) == 1  # 8 train_val images, 1 corrupt
    assert index["skipped"][0]["name"].endswith("00000002_001.png")
    assert len(index["shards"]) == 3 and index["source"] == "nih"
    shards = sorted((out / "train").glob("shard_*.npy"))
    assert len(shards) == 3 and not list((out / "train").glob("*.tmp"))
    assert [np.load(p).shape for p in shards] == [(3, 256, 256), (2, 256, 256), (2, 256, 256)]
    assert np.load(shards[0]).dtype == np.uint16  # the corrupt image was item 3 (shard 1)
    stamps = [p.stat().st_mtime_ns for p in shards]
    capsys.readouterr()

    assert run(nih_root, out, "--workers", "1") == index  # a rerun is a no-op
    assert "0 shards written now" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in shards] == stamps

    (out / "train" / "shard_00001.json").unlink()  # interrupted after the .npy was written
    (out / "train" / "shard_00002.npy.tmp").write_bytes(b"partial")
    assert run(nih_root, out, "--workers", "1") == index
    assert "1 shards written now" in capsys.readouterr().out
    assert shards[0].stat().st_mtime_ns == stamps[0]


def test_cached_pairs_match_the_direct_dataset(nih_root, tmp_path):
    out = tmp_path / "cache"
    index = run(nih_root, out, "--workers", "1")
    cfg = DataConfig(source="nih", root=str(nih_root), n_images=None, val_fraction=0.0, hflip=False)
    direct = build_dataset(cfg, "train")
    cached = build_dataset(DataConfig(source="cache", cache_dir=str(out), hflip=False), "train")
    assert isinstance(cached, CachedPairs) and len(cached) == index["count"]
    assert cached.names == [n for n in direct.names if not n.endswith("00000002_001.png")]
    for i, name in enumerate(cached.names):
        hr, lr = cached[i]
        ref, _ = direct[direct.names.index(name)]
        assert hr.shape == (1, 256, 256) and lr.shape == (1, 64, 64)
        assert torch.allclose(hr, ref, atol=0.5 / 65535 + 1e-7)
        np.testing.assert_allclose(lr.numpy(), area_downsample(hr.numpy()), atol=1e-6)
    with pytest.raises(ValueError, match="val"):
        build_dataset(DataConfig(source="cache", cache_dir=str(out)), "val")


def test_cache_flips_are_deterministic(tmp_path):
    ds = build_dataset(
        DataConfig(source="phantom", n_images=6, phantom_size=64, hr_size=64, hflip=False)
    )
    prepare(ds, tmp_path / "train", shard_size=4, workers=1, progress=False)
    cached = CachedPairs(tmp_path / "train", seed=0)
    same = lambda a, b: torch.allclose(a[0], b[0], atol=1e-5)
    flipped = [not same(cached[i], ds[i]) for i in range(6)]
    again = CachedPairs(tmp_path / "train", seed=0)
    assert [not same(again[i], ds[i]) for i in range(6)] == flipped
    assert any(flipped) and not all(flipped)


def test_prepare_refuses_another_plan_and_reports_unfinished(tmp_path):
    def phantoms(n):
        cfg = DataConfig(source="phantom", n_images=n, phantom_size=64, hr_size=64)
        return build_dataset(cfg)

    prepare(phantoms(3), tmp_path / "c", shard_size=2, workers=1, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        prepare(phantoms(4), tmp_path / "c", shard_size=2, workers=1, progress=False)
    (tmp_path / "c" / "index.json").unlink()
    with pytest.raises(ValueError, match="rerun"):
        CachedPairs(tmp_path / "c")
    with pytest.raises(ValueError, match="prepare"):
        CachedPairs(tmp_path / "empty")
