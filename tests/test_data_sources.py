"""Phantom, bundled sample, folder and DICOM sources; determinism of crops and flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cxr_sr.imaging import area_downsample, bicubic_upsample
from cxr_sr.train.data import DataConfig, build_dataset, chest_phantom
from cxr_sr.train.data.pairs import Region
from cxr_sr.train.data.sample import SampleRadiograph, split_regions


def test_phantom_is_seeded_and_detailed():
    a, b, c = chest_phantom(128, 5), chest_phantom(128, 5), chest_phantom(128, 6)
    assert a.shape == (128, 128) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0 and a.std() > 0.1
    big = chest_phantom(256, 5)
    residual = big - bicubic_upsample(area_downsample(big))
    assert np.abs(residual).mean() > 2e-3  # detail that bicubic does not restore
    assert np.abs(np.diff(big, axis=0)).max() > 0.1  # sharp edges
    with pytest.raises(ValueError):
        chest_phantom(8)


def test_phantom_splits_differ_and_pairs_are_consistent():
    cfg = DataConfig(source="phantom", n_images=3, n_eval_images=2, phantom_size=128, hr_size=64)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 3 and len(val) == 2
    hr, lr = train[0]
    assert hr.shape == (1, 64, 64) and lr.shape == (1, 16, 16)
    np.testing.assert_allclose(lr.numpy(), area_downsample(hr.numpy()), atol=1e-6)
    assert not torch.equal(hr, val[0][0]) and not torch.equal(hr, val[0][0].flip(-1))


def test_loader_workers_reproduce_in_process_order():
    cfg = DataConfig(source="phantom", n_images=4, phantom_size=64, hr_size=64)
    ds = build_dataset(cfg, "train")
    ds.set_epoch(3)
    inline = torch.stack([ds[i][0] for i in range(4)])
    batches = DataLoader(ds, batch_size=2, num_workers=2)
    assert torch.equal(torch.cat([hr for hr, _ in batches]), inline)


@pytest.fixture(scope="module")
def sample_cfg():
    return DataConfig(source="sample", n_images=64, crop_scales=[1.0, 2.0, 4.0])


def test_sample_regions_do_not_overlap(sample_cfg):
    train = build_dataset(sample_cfg, "train")
    h, w = train.image.shape
    assert (h, w) == (1955, 1841)
    held = train.heldout_region
    assert held == Region(0, 1955, 1381, 1841) and train.train_region == Region(0, 1955, 0, 1381)
    for epoch in (0, 1):
        train.set_epoch(epoch)
        for i in range(len(train)):
            box = train.box(i)
            assert train.train_region.contains(box) and not held.overlaps(box)
    assert {round(train.box(i).scale) for i in range(len(train))} == {1, 2, 4}
    for split in ("val", "test"):
        ds = build_dataset(sample_cfg, split)
        assert ds.boxes and all(held.contains(b) for b in ds.boxes)
    val = build_dataset(sample_cfg, "val")
    assert {b.side for b in val.boxes} == {256, 460}
    test = build_dataset(sample_cfg, "test")
    covered = np.zeros(h, bool)
    for b in test.boxes:
        covered[b.y : b.y + b.side] = True
    assert covered.all() and all(b.side == 460 for b in test.boxes)


def test_sample_pixels_never_cross_the_split():
    image = np.zeros((600, 800), np.float32)
    _, held = split_regions(600, 800, "right:0.25")
    image[:, held.x0 :] = 1.0  # a held-out pixel anywhere in a train crop would show
    kw = dict(
        seed=0,
        hr_size=64,
        scale=4,
        hflip=True,
        crop_scales=[1, 2, 4],
        holdout="right:0.25",
        n_train=50,
        image=image,
    )
    train = SampleRadiograph(split="train", **kw)
    assert max(float(train[i][0].max()) for i in range(len(train))) == 0.0
    for split in ("val", "test"):
        ds = SampleRadiograph(split=split, **kw)
        assert min(float(ds[i][0].min()) for i in range(len(ds))) > 1.0 - 1e-5


def test_sample_crops_are_a_function_of_seed_epoch_index(sample_cfg):
    a, b = build_dataset(sample_cfg, "train"), build_dataset(sample_cfg, "train")
    other = build_dataset(DataConfig(source="sample", n_images=64, seed=1), "train")
    hr_a, lr_a = a[7]
    assert torch.equal(hr_a, b[7][0]) and not torch.equal(hr_a, other[7][0])
    np.testing.assert_allclose(lr_a.numpy(), area_downsample(hr_a.numpy()), atol=1e-6)
    assert hr_a.shape == (1, 256, 256) and lr_a.shape == (1, 64, 64)
    b.set_epoch(1)
    assert b.box(7) != a.box(7)
    b.set_epoch(0)
    assert b.box(7) == a.box(7) and torch.equal(b[7][0], hr_a)
    val = build_dataset(sample_cfg, "val")
    val.set_epoch(5)  # evaluation items do not depend on the epoch
    assert torch.equal(val[0][0], build_dataset(sample_cfg, "val")[0][0])


def test_bad_configs_raise_value_error():
    with pytest.raises(ValueError, match="source"):
        build_dataset(DataConfig(source="imagenet"))
    with pytest.raises(ValueError, match="holdout"):
        build_dataset(DataConfig(holdout="middle:0.3"))
    with pytest.raises(ValueError, match="split"):
        build_dataset(DataConfig(source="phantom"), "dev")
    with pytest.raises(ValueError, match="unknown"):
        DataConfig.from_dict({"source": "phantom", "size": 3})
    with pytest.raises(ValueError, match="multiple"):
        DataConfig(hr_size=250).validate()


def write_png(path, image, bits=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits == 8:
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)
    else:
        Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(path)


def test_folder_source(tmp_path):
    for i in range(12):
        image = chest_phantom(96, i)
        if i == 0:
            image = np.pad(image, ((0, 0), (20, 20)))  # non-square: centre crop
        write_png(tmp_path / f"sub{i % 3}" / f"img{i}.png", image, bits=16 if i % 2 else 8)
    cfg = DataConfig(
        source="folder",
        root=str(tmp_path),
        n_images=None,
        n_eval_images=None,
        hr_size=64,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    splits = {s: build_dataset(cfg, s) for s in ("train", "val", "test")}
    names = [set(ds.names) for ds in splits.values()]
    assert sum(map(len, names)) == 12 and not (names[0] & names[1] or names[0] & names[2])
    hr, lr = splits["train"][0]
    assert hr.shape == (1, 64, 64) and lr.shape == (1, 16, 16)


def test_dicom_source_splits_by_patient(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    for i in range(12):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
        ds.PatientID, ds.Modality = f"P{i // 3}", "DX"
        pixels = np.round(chest_phantom(64, i) * 4095).astype(np.uint16)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        folder = tmp_path / f"study{i // 3}"
        folder.mkdir(exist_ok=True)
        ds.save_as(folder / f"IM{i}", enforce_file_format=True)  # no suffix, as on a CD
    (tmp_path / "notes.png").write_bytes(b"not a dicom")  # ignored by the dicom source
    cfg = DataConfig(
        source="dicom",
        root=str(tmp_path),
        n_images=None,
        n_eval_images=None,
        hr_size=64,
        val_fraction=0.3,
        test_fraction=0.3,
        split_seed=3,
    )
    by_split = {}
    for split in ("train", "val", "test"):
        try:
            by_split[split] = build_dataset(cfg, split).names
        except ValueError:  # an empty split with only 4 patients
            by_split[split] = []
    assert sorted(n for v in by_split.values() for n in v) == sorted(
        f"study{i // 3}/IM{i}" for i in range(12)
    )
    studies = [{n.split("/")[0] for n in v} for v in by_split.values()]
    assert not (studies[0] & studies[1] or studies[0] & studies[2] or studies[1] & studies[2])
    some = next(v for v in by_split.values() if v)
    hr, lr = build_dataset(cfg, next(k for k, v in by_split.items() if v))[0]
    assert hr.shape == (1, 64, 64) and float(hr.std()) > 0.05 and some
