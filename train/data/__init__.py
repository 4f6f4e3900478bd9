"""Training data: HR/LR pairs from every source the service is trained on.

``build_dataset(cfg, split)`` returns a ``torch.utils.data.Dataset`` whose items are

    hr  float32 [1, hr_size, hr_size]                    in [0, 1]
    lr  float32 [1, hr_size/scale, hr_size/scale]        in [0, 1], area downsample of hr

Sources (``DataConfig.source``) and their splits:

=========  =================================================================================
sample     the bundled real radiograph RG1_UNCI.dcm, split spatially (``holdout``, default
           the right quarter of the columns). train: random crops at ``crop_scales`` inside
           the training region (``n_images`` per epoch); val: fixed crops of the held-out
           region at ``crop_scales``; test: the whole held-out region cut into squares of
           its short side, each resized to hr_size (``train.data.sample``).
phantom    seeded synthetic chest phantoms drawn at ``phantom_size``, resized whole;
           train/val/test use disjoint phantom seeds (``train.data.phantoms``).
nih        NIH ChestX-ray14 on its published layout under ``root``; train/val divide the
           patients of train_val_list.txt (``val_fraction``), test = test_list.txt;
           ``n_images`` (train) / ``n_eval_images`` (val, test) sampled with ``seed``
           (``train.data.nih``).
dicom      DICOM files under ``root`` (recursive), split patient-wise by a stable hash.
folder     PNG/JPEG/TIFF/BMP (8/16-bit) under ``root`` (recursive), split file-wise.
cache      shards written by ``python -m cxr_sr.train.data.prepare`` under
           ``cache_dir`` (or ``root``) ``/<split>/`` (``train.data.prepare.CachedPairs``).
=========  =================================================================================

nih, dicom and folder follow the reference protocol (whole image -> hr_size, anti-aliased;
a non-square image is centre-cropped, or stretched with ``resize_mode="stretch"``), unless
``train_crops`` asks for random multi-scale crops on the train split. Every source decodes
with ``client.io.read_image``.

Determinism: item ``i`` at epoch ``e`` is a pure function of (seed, split, e, i); call
``dataset.set_epoch(e)`` before iterating epoch ``e`` (see ``train.data.pairs``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from cxr_sr.train.data.pairs import RESIZE_MODES, SPLITS, PairDataset, make_pair
from cxr_sr.train.data.phantom import chest_phantom

SOURCES = ("sample", "phantom", "nih", "dicom", "folder", "cache")


@dataclass
class DataConfig:
    """Where training pairs come from and how they are cut. Defaults: the bundled sample."""

    source: str = "sample"  # one of SOURCES
    root: str | None = None  # data folder (nih, dicom, folder; cache when cache_dir is None)
    n_images: int | None = 10000  # nih/dicom/folder train: images sampled (None: all);
    #                               sample/phantom train: items per epoch
    n_eval_images: int | None = 500  # val/test images sampled (sample: fixed by the region)
    val_fraction: float = 0.1  # share of train_val patients (nih) or of patients/files as val
    test_fraction: float = 0.1  # dicom/folder, and nih without official lists: test share
    split_seed: int = 0  # salt of the patient-wise split; keep it fixed across experiments
    view_position: str | None = None  # nih: "PA" or "AP" to keep one view only
    crop_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # crop side
    #                               = scale * hr_size native pixels, resized to hr_size
    train_crops: bool = False  # nih/dicom/folder train: random crops instead of whole images
    hflip: bool = True  # train split: left-right flip with probability 1/2
    holdout: str = "right:0.25"  # sample: "<left|right|top|bottom>:<fraction>" held out
    sample_file: str = "RG1_UNCI.dcm"  # sample: a file in pydicom-data, or a path to an image
    phantom_size: int = 512  # phantom: side at which phantoms are drawn
    resize_mode: str = "crop"  # non-square images: "crop" (centred square) or "stretch"
    cache_dir: str | None = None  # cache: folder given to prepare --out
    keep_decoded: bool = False  # nih/dicom/folder: decode every image once, up front, and keep
    #                              it in memory (forked loader workers share it); small sets only
    epoch_repeats: int = 1  # nih/dicom/folder train: each image appears this often per epoch
    #                         (different random crops), so small sets make longer epochs
    seed: int = 0  # image sampling, crops and flips
    hr_size: int = 256
    scale: int = 4

    def validate(self) -> DataConfig:
        """Raise ``ValueError`` for an impossible setting; return self."""
        if self.source not in SOURCES:
            raise ValueError(f"data source must be one of {SOURCES}, got {self.source!r}")
        if self.source in ("nih", "dicom", "folder") and not self.root:
            raise ValueError(f"data source {self.source!r} needs root (the data folder)")
        if self.source == "cache" and not (self.cache_dir or self.root):
            raise ValueError("data source 'cache' needs cache_dir (the prepare --out folder)")
        if self.scale < 1 or self.hr_size < self.scale or self.hr_size % self.scale:
            raise ValueError(f"hr_size {self.hr_size} must be a multiple of scale {self.scale}")
        for name in ("n_images", "n_eval_images"):
            n = getattr(self, name)
            if n is not None and n < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {n}")
        if not 0.0 <= self.val_fraction < 1.0 or not 0.0 <= self.test_fraction < 1.0:
            raise ValueError("val_fraction and test_fraction must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1")
        if not self.crop_scales or min(self.crop_scales) <= 0:
            raise ValueError(f"crop_scales must be positive numbers, got {self.crop_scales}")
        if self.view_position not in (None, "PA", "AP"):
            raise ValueError(
                f"view_position must be 'PA', 'AP' or None, got {self.view_position!r}"
            )
        if self.epoch_repeats < 1:
            raise ValueError(f"epoch_repeats must be >= 1, got {self.epoch_repeats}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.source == "sample":
            from cxr_sr.train.data.sample import parse_holdout

            parse_holdout(self.holdout)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        """Build from a mapping (e.g. YAML), rejecting unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown data config key(s) {unknown}; known: {sorted(known)}")
        return cls(**d).validate()

    def to_dict(self) -> dict:
        return asdict(self)


def build_dataset(cfg: DataConfig, split: str = "train") -> PairDataset:
    """The ``(hr, lr)`` dataset of ``cfg.source`` for ``split`` (module docstring).

    Every returned dataset has ``set_epoch(epoch)``, ``name(index)`` and ``describe()``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cfg.validate()
    common = {
        "split": split,
        "seed": cfg.seed,
        "hr_size": cfg.hr_size,
        "scale": cfg.scale,
        "hflip": cfg.hflip,
    }
    n = cfg.n_images if split == "train" else cfg.n_eval_images
    if cfg.source == "sample":
        from cxr_sr.train.data.sample import SampleRadiograph

        return SampleRadiograph(
            crop_scales=cfg.crop_scales,
            holdout=cfg.holdout,
            n_train=cfg.n_images or 10000,
            file=cfg.sample_file,
            **common,
        )
    if cfg.source == "phantom":
        from cxr_sr.train.data.phantoms import PhantomPairs

        return PhantomPairs(n=n or 1000, size=cfg.phantom_size, **common)
    if cfg.source == "cache":
        from cxr_sr.train.data.prepare import CachedPairs

        base = Path(cfg.cache_dir or cfg.root)
        folder = base / split if (base / split).is_dir() else base
        if not (folder / "index.json").is_file() and not (folder / "plan.json").is_file():
            raise ValueError(
                f"no prepared {split!r} split: expected {base}/{split}/index.json, written by "
                f"`python -m cxr_sr.train.data.prepare --split {split} --out {base} ...`"
            )
        ds = CachedPairs(
            folder,
            split=split,
            seed=cfg.seed,
            hflip=cfg.hflip,
            scale=cfg.scale,
            hr_size=cfg.hr_size,
        )
        cached_split = ds.index.get("split")
        if cached_split != split:
            raise ValueError(
                f"{folder} holds the {cached_split!r} split, not {split!r}; "
                f"expected {base}/{split}/index.json"
            )
        return ds
    from cxr_sr.train.data.nih import files_dataset, nih_dataset

    files = {
        "keep_decoded": cfg.keep_decoded,
        "repeats": cfg.epoch_repeats if split == "train" else 1,
        "resize_mode": cfg.resize_mode,
        "train_crops": cfg.train_crops,
        "crop_scales": cfg.crop_scales,
        **common,
    }
    files.pop("split")
    files.pop("seed")
    if cfg.source == "nih":
        return nih_dataset(
            cfg.root,
            split,
            n=n,
            seed=cfg.seed,
            val_fraction=cfg.val_fraction,
            test_fraction=cfg.test_fraction,
            split_seed=cfg.split_seed,
            view_position=cfg.view_position,
            **files,
        )
    return files_dataset(
        cfg.root,
        split,
        dicom=cfg.source == "dicom",
        n=n,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        split_seed=cfg.split_seed,
        **files,
    )


__all__ = [
    "SOURCES",
    "SPLITS",
    "DataConfig",
    "PairDataset",
    "build_dataset",
    "chest_phantom",
    "make_pair",
]
