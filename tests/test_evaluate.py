"""Offline evaluation on a random-init checkpoint: runs, and bicubic matches client.metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_sr import Schedule
from cxr_sr.client import metrics
from cxr_sr.imaging import bicubic_upsample
from cxr_sr.train import checkpoint
from cxr_sr.train.data import DataConfig, build_dataset
from cxr_sr.train.evaluate import evaluate, main, table
from cxr_sr.train.models import UNetConfig, VAEConfig


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return checkpoint.random_init(
        folder,
        VAEConfig(channels=[8, 8, 16], latent_channels=2, norm_groups=4),
        UNetConfig(channels=[16, 32], norm_groups=4),
        Schedule(num_train_timesteps=50),
        seed=0,
    )


def _data():
    return DataConfig(source="phantom", phantom_size=256, n_eval_images=2)


def test_evaluate_reports_bicubic_like_client_metrics(tiny_ckpt):
    ds = build_dataset(_data(), "test")
    res = evaluate(tiny_ckpt, ds, [1, 2], batch_size=2)
    assert set(res["methods"]) == {"bicubic", "vae_ceiling", "sr_1steps", "sr_2steps"}
    hr = np.stack([ds[i][0].numpy() for i in range(len(ds))])
    lr = np.stack([ds[i][1].numpy() for i in range(len(ds))])
    bic = np.clip(bicubic_upsample(lr), 0.0, 1.0)
    b = res["methods"]["bicubic"]
    assert b["psnr"] == pytest.approx(float(np.mean(metrics.psnr(bic, hr))), rel=1e-9)
    assert b["ssim"] == pytest.approx(float(np.mean(metrics.ssim(bic, hr))), rel=1e-9)
    assert b["hfen"] == pytest.approx(float(np.mean(metrics.hfen(bic, hr))), rel=1e-9)
    for row in res["methods"].values():
        assert np.isfinite([row["psnr"], row["ssim"], row["ms_ssim"], row["hfen"]]).all()
        assert row["seconds_per_image"] >= 0
    assert res["methods"]["sr_2steps"]["steps"] == 2
    assert "PSNR" in table(res)


def test_evaluate_rejects_bad_backend(tiny_ckpt):
    with pytest.raises(ValueError, match="backend"):
        evaluate(tiny_ckpt, build_dataset(_data(), "test"), [1], backend="tensorrt")
    with pytest.raises(ValueError, match="onnx_dir"):
        evaluate(tiny_ckpt, build_dataset(_data(), "test"), [1], backend="onnx")


def test_cli_writes_json(tiny_ckpt, tmp_path):
    out = tmp_path / "eval.json"
    rc = main(
        [
            "--checkpoint",
            str(tiny_ckpt),
            "--data",
            "phantom",
            "--set",
            "phantom_size=256",
            "--set",
            "n_eval_images=1",
            "--steps",
            "1",
            "--out",
            str(out),
            "--no-lpips",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    for protocol in ("reference", "native"):  # phantoms: drawn at 256, so both are 256 px
        r = res["protocols"][protocol]
        assert r["n_images"] == 1 and "sr_1steps" in r["methods"]
    assert (tmp_path / "eval_zoom.png").is_file()  # the zoom figure, next to the JSON


# --------------------------------------------- protocols, LR consistency, the zoom figure


def test_lr_psnr_measures_consistency_with_the_lr_input():
    from cxr_sr.imaging import area_downsample

    rng = np.random.default_rng(0)
    hr = rng.random((2, 1, 32, 32)).astype(np.float32)
    lr = area_downsample(hr, 4)
    assert np.isinf(metrics.lr_psnr(hr, lr)).all()  # the HR image is exactly consistent
    # detail that averages out over each 4x4 block stays consistent (up to float32 rounding)
    base = np.clip(hr, 0.1, 0.9)
    checker = np.where(np.indices((32, 32)).sum(0) % 2 == 0, 0.05, -0.05).astype(np.float32)
    assert (metrics.lr_psnr(base + checker, area_downsample(base, 4)) > 100).all()
    shifted = hr + 0.1  # a brightness change at LR scale: PSNR of a 0.1 offset = 20 dB
    assert metrics.lr_psnr(shifted, lr) == pytest.approx([20.0, 20.0], abs=1e-4)
    single = metrics.lr_psnr(shifted[0, 0], lr[0, 0])
    assert isinstance(single, float) and single == pytest.approx(20.0, abs=1e-4)
    assert metrics.lr_psnr(hr, lr, data_range=2.0) is not None
    with pytest.raises(ValueError, match="expected"):
        metrics.lr_psnr(hr[..., :16], lr)
    with pytest.raises(ValueError, match="leading"):
        metrics.lr_psnr(hr, lr[0])


@pytest.fixture(scope="module")
def fake_nih(tmp_path_factory):
    """A bare images/ folder of 320-px phantoms (no CSV, no lists: hash split)."""
    from cxr_sr.train.data.fake import write_fake_nih

    root = tmp_path_factory.mktemp("nih")
    write_fake_nih(root, n_patients=12, images_per_patient=1, size=320, layout="flat")
    for name in ("Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt"):
        (root / name).unlink()
    return root


NIH_SET = [
    "--set",
    "val_fraction=0.05",
    "--set",
    "test_fraction=0.4",
    "--set",
    "n_eval_images=null",
]


def _fake_nih_test(root):
    """The test split of the fake NIH tree (a bare images/ folder, patient-wise hash split)."""
    cfg = DataConfig(
        source="nih", root=str(root), test_fraction=0.4, val_fraction=0.05, n_eval_images=None
    )
    return build_dataset(cfg, "test")


def test_native_item_is_the_image_at_its_own_size(fake_nih):
    from cxr_sr.train.evaluate import NativeView, native_item

    ds = _fake_nih_test(fake_nih)
    hr, lr = native_item(ds, 0)
    assert hr.shape == (1, 320, 320) and lr.shape == (1, 80, 80)
    ref_hr, ref_lr = ds[0]
    assert tuple(ref_hr.shape) == (1, 256, 256) and tuple(ref_lr.shape) == (1, 64, 64)
    hr, lr = native_item(ds, 0, multiple=48)  # 320 -> 288, centred
    assert hr.shape == (1, 288, 288) and lr.shape == (1, 72, 72)
    view = NativeView(ds)
    view[0]
    assert "native scale" in view.describe()["scale"] and "320x320" in view.describe()["scale"]


def test_native_protocol_scores_full_size_images(tiny_ckpt, fake_nih):
    ds = _fake_nih_test(fake_nih)
    seen = []
    res = evaluate(
        tiny_ckpt,
        ds,
        [1],
        limit=2,
        use_lpips=False,
        protocol="native",
        on_batch=lambda idx, hr, lr, out: seen.append(
            (idx, hr.shape, lr.shape, out["sr_1steps"].shape)
        ),
    )
    assert res["n_images"] == 2 and res["protocol"] == "native"
    assert seen == [
        ([0], (1, 1, 320, 320), (1, 1, 80, 80), (1, 1, 320, 320)),
        ([1], (1, 1, 320, 320), (1, 1, 80, 80), (1, 1, 320, 320)),
    ]
    assert "native" in res["title"] and "320x320" in res["scale"]
    for row in res["methods"].values():
        assert np.isfinite(row["lr_psnr"])
    with pytest.raises(ValueError, match="protocol"):
        evaluate(tiny_ckpt, ds, [1], protocol="nearest")


def test_zoom_grid_layout():
    from cxr_sr.train.figures import ZOOM_GAP, zoom_box, zoom_grid, zoom_layout, zoom_panels

    assert zoom_box((320, 320), (0.5, 0.5), 128) == (96, 96, 128)
    assert zoom_box((64, 64), (0.0, 1.0), 128) == (0, 0, 64)  # clamped to the image
    rng = np.random.default_rng(1)
    hr = rng.random((1, 64, 64)).astype(np.float32)
    lr = rng.random((1, 16, 16)).astype(np.float32)
    panels = zoom_panels(hr, lr, hr * 0.5, hr * 0.25, (8, 16, 32))
    assert [p.shape for p in panels] == [(32, 32)] * 4
    assert panels[0][0, 0] == lr[0, 2, 4] and panels[0][3, 3] == lr[0, 2, 4]
    np.testing.assert_array_equal(panels[3], hr[0, 8:40, 16:48])
    grid = zoom_grid([panels, panels], magnify=2)
    pos = zoom_layout(2, 4, 64)
    assert grid.shape == (pos[1][0][0] + 64 + ZOOM_GAP, ZOOM_GAP + 4 * (64 + ZOOM_GAP))
    y, x = pos[1][3]
    np.testing.assert_array_equal(
        grid[y : y + 64 : 2, x : x + 64 : 2], np.rint(np.clip(panels[3], 0, 1) * 255)
    )
    assert (grid[:, x - ZOOM_GAP : x] == 255).all()  # white gap before the HR column


@pytest.mark.slow
def test_cli_both_protocols_on_nih_writes_json_plot_and_figure(tiny_ckpt, fake_nih, tmp_path):
    from PIL import Image

    from cxr_sr.train.figures import ZOOM_GAP

    out = tmp_path / "eval_nih.json"
    rc = main(
        [
            "--checkpoint",
            str(tiny_ckpt),
            "--data",
            "nih",
            "--root",
            str(fake_nih),
            *NIH_SET,
            "--steps",
            "1,2",
            "--native-limit",
            "2",
            "--figure-images",
            "2",
            "--no-lpips",
            "--zoom",
            "0.5,0.5",
            "--out",
            str(out),
            "--plot",
            str(tmp_path / "q.png"),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    ref, nat = res["protocols"]["reference"], res["protocols"]["native"]
    n_test = len(
        build_dataset(
            DataConfig(
                source="nih",
                root=str(fake_nih),
                test_fraction=0.4,
                val_fraction=0.05,
                n_eval_images=None,
            ),
            "test",
        )
    )
    assert n_test > 2
    assert ref["n_images"] == n_test and nat["n_images"] == 2 and nat["native_limit"] == 2
    assert "reference protocol" in ref["title"] and "native protocol" in nat["title"]
    assert "HR 256x256" in ref["scale"] and "HR 320x320, LR 80x80" in nat["scale"]
    for r in (ref, nat):
        assert set(r["methods"]) == {"bicubic", "vae_ceiling", "sr_1steps", "sr_2steps"}
        assert all(np.isfinite(m["lr_psnr"]) for m in r["methods"].values())
    fig = res["figure"]
    assert fig["protocol"] == "native" and fig["path"] == str(tmp_path / "eval_nih_zoom.png")
    assert fig["boxes_top_left_side"] == [[96, 96, 128], [96, 96, 128]]
    image = np.asarray(Image.open(fig["path"]))
    panel = 256  # 128 px crops shown 2x
    assert image.ndim == 2 and image.shape[1] == ZOOM_GAP + 4 * (panel + ZOOM_GAP)
    assert image.shape[0] > 2 * panel
    assert (tmp_path / "q.png").stat().st_size > 0


def _make_eval_argv(**variables) -> list[str]:
    """The arguments `make eval` passes to train.evaluate (from `make -n`)."""
    import shlex
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make not installed")
    root = Path(__file__).resolve().parents[1]
    extra = [f"{k}={v}" for k, v in variables.items()]
    text = subprocess.run(
        ["make", "-n", "-s", "-C", str(root), "eval", *extra],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    text = text.replace("\\\n", " ")  # the recipe's continued lines, joined
    line = next(ln for ln in text.splitlines() if "cxr_sr.train.evaluate" in ln)
    words = shlex.split(line)
    return words[words.index("cxr_sr.train.evaluate") + 1 :]


def test_make_eval_command_line_parses(tiny_ckpt, tmp_path):
    from cxr_sr.train.evaluate import parse_args

    args = parse_args(_make_eval_argv(CKPT=tiny_ckpt))
    assert args.data == "sample" and args.protocol == "both" and args.steps == "1,2,4,8"
    assert (args.out, args.plot, args.figure) == (
        "outputs/eval.json",
        "outputs/quality_vs_steps.png",
        "outputs/eval_zoom.png",
    )
    args = parse_args(_make_eval_argv(CKPT=tiny_ckpt, NIH="/data/nih"))
    assert args.data == "nih" and args.root == "/data/nih" and args.steps == "1,2,4,8"
    assert args.out == "outputs/eval_nih.json" and args.figure == "outputs/eval_nih_zoom.png"
    assert "n_eval_images=null" in args.set and "test_fraction=0.1" in args.set
    assert args.native_steps == "1" and args.native_limit == 0  # all 40 NIH images, one step


@pytest.mark.slow
def test_make_eval_nih_runs_on_a_fake_tree(tiny_ckpt, fake_nih, tmp_path):
    """`make eval NIH=...`'s own arguments, outputs moved and the run shortened."""
    argv = _make_eval_argv(CKPT=tiny_ckpt, NIH=fake_nih)
    argv = [a.replace("test_fraction=0.1", "test_fraction=0.4") for a in argv]
    out = tmp_path / "eval_nih.json"
    argv += [
        "--out",
        str(out),
        "--plot",
        str(tmp_path / "q.png"),
        "--figure",
        str(tmp_path / "z.png"),
        "--limit",
        "1",
        "--steps",
        "1,2",
        "--no-lpips",
    ]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["protocols"]["reference"]["n_images"] == 1
    assert res["protocols"]["native"]["n_images"] == 1
    ref, native = (res["protocols"][p]["methods"] for p in ("reference", "native"))
    assert {"sr_1steps", "sr_2steps"} <= set(ref)  # the sweep at the reference protocol
    assert "sr_1steps" in native and "sr_2steps" not in native  # --native-steps 1
    assert (tmp_path / "z.png").is_file()


@pytest.mark.slow
def test_sample_native_protocol_uses_the_held_out_squares(tiny_ckpt):
    """The bundled radiograph: 5 held-out squares of 460 px, cropped to 448 at native scale."""
    ds = build_dataset(DataConfig(source="sample"), "test")
    res = evaluate(tiny_ckpt, ds, [1], limit=1, use_lpips=False, protocol="native")
    assert res["n_images"] == 1 and "HR 448x448, LR 112x112" in res["scale"]
    assert res["dataset"]["source"] == "sample"


def test_protocol_choice_without_native_images():
    """A prepared cache keeps reference pairs only: both -> reference (said why); native -> exit."""
    from cxr_sr.train.evaluate import _protocols

    class Cached:  # no box/image, no path: like train.data.prepare.CachedPairs
        pass

    assert _protocols("both", Cached()) == (["reference"], "Cached keeps no native-scale images")
    assert _protocols("reference", Cached()) == (["reference"], None)
    with pytest.raises(SystemExit, match="native"):
        _protocols("native", Cached())
    ds = build_dataset(_data(), "test")
    assert _protocols("both", ds) == (["reference", "native"], None)
