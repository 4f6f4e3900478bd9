"""NIH ChestX-ray14 loader on a small fake tree in the real layout (train.data.fake)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from cxr_sr.imaging import area_downsample
from cxr_sr.train.data import DataConfig, build_dataset
from cxr_sr.train.data.fake import write_fake_nih


def patient(name: str) -> int:
    return int(name.rsplit("/", 1)[-1][:8])


@pytest.fixture(scope="module", params=["flat", "split"])
def nih_root(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"nih_{request.param}")
    write_fake_nih(
        root, n_patients=10, images_per_patient=2, n_test_patients=3, layout=request.param
    )
    return root


def cfg_for(root, **kw) -> DataConfig:
    kw = {
        "source": "nih",
        "root": str(root),
        "n_images": None,
        "n_eval_images": None,
        "val_fraction": 0.25,
        **kw,
    }
    return DataConfig(**kw)


def test_layouts_are_found(nih_root):
    names = build_dataset(cfg_for(nih_root), "train").names
    nested = any("/images_0" in "/" + n for n in names)
    assert nested == (not (nih_root / "images").is_dir())


def test_splits_are_patient_wise_and_test_comes_from_test_list(nih_root):
    cfg = cfg_for(nih_root)
    splits = {s: build_dataset(cfg, s).names for s in ("train", "val", "test")}
    patients = {s: {patient(n) for n in names} for s, names in splits.items()}
    assert patients["train"] and patients["val"]
    assert not patients["train"] & patients["val"]
    test_list = set((nih_root / "test_list.txt").read_text().split())
    assert {n.rsplit("/", 1)[-1] for n in splits["test"]} == test_list
    assert patients["test"] == {8, 9, 10}
    assert not (patients["train"] | patients["val"]) & patients["test"]
    assert sum(len(v) for v in splits.values()) == 20


def test_sampling_is_seeded(nih_root):
    a = build_dataset(cfg_for(nih_root, n_images=5, seed=1), "train").names
    b = build_dataset(cfg_for(nih_root, n_images=5, seed=1), "train").names
    c = build_dataset(cfg_for(nih_root, n_images=5, seed=2), "train").names
    assert a == b and len(a) == 5 and a != c
    assert len(build_dataset(cfg_for(nih_root, n_eval_images=2), "test")) == 2


def test_view_position_filter(nih_root):
    names = build_dataset(cfg_for(nih_root, view_position="PA"), "train").names
    with open(nih_root / "Data_Entry_2017.csv", newline="") as f:
        views = {r["Image Index"]: r["View Position"] for r in csv.DictReader(f)}
    assert names and all(views[n.rsplit("/", 1)[-1]] == "PA" for n in names)


def test_pairs_shapes_ranges_and_lr(nih_root):
    ds = build_dataset(cfg_for(nih_root, n_eval_images=2), "test")
    hr, lr = ds[0]
    assert hr.shape == (1, 256, 256) and lr.shape == (1, 64, 64)
    assert hr.dtype == lr.dtype == torch.float32
    assert float(hr.min()) >= 0.0 and float(hr.max()) <= 1.0 and float(hr.std()) > 0.05
    np.testing.assert_allclose(lr.numpy(), area_downsample(hr.numpy()), atol=1e-6)
    small = build_dataset(cfg_for(nih_root, hr_size=128, n_eval_images=1), "test")
    hr, lr = small[0]
    assert hr.shape == (1, 128, 128) and lr.shape == (1, 32, 32)


def test_train_items_repeat_per_epoch_and_flip_deterministically(nih_root):
    ds = build_dataset(cfg_for(nih_root, train_crops=True, crop_scales=[0.5, 1.0]), "train")
    first = [ds[i][0] for i in range(3)]
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))
    ds.set_epoch(1)
    assert not all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))
    ds.set_epoch(0)
    assert torch.equal(first[0], ds[0][0])


def test_missing_files_give_clear_errors(tmp_path):
    write_fake_nih(tmp_path, n_patients=3, n_test_patients=1, size=64, layout="flat")
    (tmp_path / "Data_Entry_2017.csv").unlink()  # no CSV: patients come from file names
    assert {patient(n) for n in build_dataset(cfg_for(tmp_path), "test").names} == {3}
    with pytest.raises(ValueError, match="needs root"):
        build_dataset(DataConfig(source="nih"), "train")
    with pytest.raises(ValueError, match="no such folder"):
        build_dataset(cfg_for(tmp_path / "nope"), "train")


def test_wrong_layout_names_what_is_expected(tmp_path):
    write_fake_nih(tmp_path, n_patients=3, n_test_patients=1, size=64, layout="flat")
    (tmp_path / "images").rename(tmp_path / "pngs")
    with pytest.raises(ValueError, match=r"images_001/images"):
        build_dataset(cfg_for(tmp_path), "train")
    (tmp_path / "pngs").rename(tmp_path / "images")
    (tmp_path / "test_list.txt").unlink()
    with pytest.raises(ValueError, match="test_list.txt"):
        build_dataset(cfg_for(tmp_path), "test")


def test_bad_csv_header(tmp_path):
    write_fake_nih(tmp_path, n_patients=3, n_test_patients=1, size=64, layout="flat")
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels\nx.png,None\n")
    with pytest.raises(ValueError, match="Patient ID"):
        build_dataset(cfg_for(tmp_path), "train")


def test_partial_download_uses_present_images(tmp_path):
    names = write_fake_nih(tmp_path, n_patients=4, n_test_patients=1, size=64, layout="flat")
    (tmp_path / "images" / names[0]).unlink()
    ds = build_dataset(cfg_for(tmp_path, val_fraction=0.0), "train")
    assert names[0] not in [n.rsplit("/", 1)[-1] for n in ds.names]
    assert len(ds) == 5


@pytest.fixture(scope="module")
def bare_root(tmp_path_factory):
    """Only ``images/``: no CSV, no official lists, one image stored as RGBA (as 4 of the
    release's files are)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("nih_bare")
    write_fake_nih(root, n_patients=40, images_per_patient=2, n_test_patients=5, layout="flat")
    for name in ("Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt"):
        (root / name).unlink()
    first = sorted((root / "images").iterdir())[0]
    gray = Image.open(first).convert("L")
    Image.merge("RGBA", (gray, gray, gray, Image.new("L", gray.size, 255))).save(first)
    return root


def test_bare_images_folder_splits_by_patient_from_the_file_name(bare_root):
    cfg = cfg_for(bare_root, val_fraction=0.2, test_fraction=0.2)
    splits = {s: build_dataset(cfg, s).names for s in ("train", "val", "test")}
    patients = {s: {patient(n) for n in names} for s, names in splits.items()}
    assert all(patients.values())
    assert not patients["train"] & patients["val"]
    assert not (patients["train"] | patients["val"]) & patients["test"]
    assert sum(len(v) for v in splits.values()) == 80  # every image in exactly one split
    # both images of a patient land together
    assert all(len(names) % 2 == 0 for names in splits.values())
    # a view filter needs the CSV
    with pytest.raises(ValueError, match="needs Data_Entry_2017.csv"):
        build_dataset(cfg_for(bare_root, view_position="PA"), "train")


def test_rgba_files_read_as_gray(bare_root):
    from cxr_sr.client.io import read_image

    first = sorted((bare_root / "images").iterdir())[0]
    image = read_image(first)
    assert image.ndim == 2 and image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
