"""builders.demo end to end on the tiny repository, with a crop standing in for the whole
radiograph (the full-size one belongs to `make demo`): both protocols reported with their
scale, the native one tiled, the zoom and the SR written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cxr_sr.builders import demo


@pytest.mark.integration
def test_demo_reports_both_protocols_and_writes_the_zoom(
    built_repository, tmp_path, monkeypatch, capsys
):
    full = demo.radiograph()
    monkeypatch.setattr(demo, "radiograph", lambda: full[600:1002, 1000:1350])  # 402 x 350
    repo, _ = built_repository
    out = tmp_path / "out"
    args = ["--repository", str(repo), "--out", str(out), "--tile", "48", "--in-flight", "2"]
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    assert "Native scale" in text and "400x348" in text and "Reference protocol" in text

    report = json.loads((out / "demo.json").read_text())
    native = report["protocols"]["native"]
    (row,) = native["images"]
    assert row["tiles"] > 1 and max(report["tile"]) <= 48  # tiles of at most --tile
    for key in ("psnr_sr", "psnr_bicubic", "ssim_sr", "ssim_bicubic", "lr_psnr_sr"):
        assert np.isfinite(row[key])
    reference = report["protocols"]["reference"]
    assert [r["image"] for r in reference["images"]][0] == "RG1 whole"
    assert "downscale" in reference["title"] and "native" in native["definition"]
    with Image.open(out / "demo_sr.png") as im:
        assert im.size == (348, 400)
    with Image.open(out / "demo_side_by_side.png") as im:  # the zoom fitted inside
        side = 4 * min(demo.ZOOM[2], 87)
        assert im.size == (4 * side + 3 * 4, side)
