"""Preprocessing cache: decode and resize once, train from memory-mapped uint16 shards.

    python -m cxr_sr.train.data.prepare --source nih --root PATH --out data/cache/nih \\
        --n 10000 --split train --workers 2

writes ``<out>/<split>/``::

    plan.json            the planned item names and geometry (a rerun must match it)
    shard_00000.npy      uint16 [k, hr_size, hr_size], HR = round(65535 * image), k <= shard size
    shard_00000.json     {"file", "names": [...k source names], "skipped": [{"name", "error"}]}
    ...
    index.json           {"format", "source", "split", "hr_size", "scale", "count",
                          "shards": [{"file", "names"}], "skipped": [...], "config": {...}}

Items follow the reference protocol of their source (whole image -> hr_size); names are
paths relative to ``--root`` (NIH: ``images_001/images/00000001_000.png``). Shard ``k``
holds planned items ``k * shard_size ...``; an unreadable image is logged and recorded in
``skipped``, never fatal. A shard is finished when its ``.json`` exists (written after its
``.npy``, each through a temporary name and ``os.replace``), so a rerun skips finished
shards and redoes one that an interruption left half-written. ``CachedPairs`` reads the
result with ``numpy.load(mmap_mode="r")``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cxr_sr.train.data.pairs import SPLITS, PairDataset

log = logging.getLogger(__name__)

FORMAT = 1
INDEX = "index.json"
PLAN = "plan.json"
FULL_SCALE = 65535
PREPARE_SOURCES = ("nih", "dicom", "folder", "phantom")


def shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def quantize(hr: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint16 (``round(65535 * x)``)."""
    return np.round(np.clip(hr, 0.0, 1.0) * FULL_SCALE).astype(np.uint16)


_WORKER_DATASET: PairDataset | None = None


def _init_worker(dataset: PairDataset) -> None:
    global _WORKER_DATASET
    import torch

    torch.set_num_threads(1)
    _WORKER_DATASET = dataset


def _load_one(index: int, dataset: PairDataset | None = None) -> tuple[int, np.ndarray | None, str]:
    """(index, uint16 HR [S, S] or None, error message)."""
    ds = dataset if dataset is not None else _WORKER_DATASET
    try:
        hr = ds.load_hr(index, ds.item_rng(index))
        if hr.shape != (ds.hr_size, ds.hr_size):
            raise ValueError(f"expected a {ds.hr_size}x{ds.hr_size} HR image, got {hr.shape}")
        return index, quantize(hr), ""
    except Exception as err:  # a bad image must not end the run; it is logged and skipped
        return index, None, f"{type(err).__name__}: {err}"


def _results(dataset: PairDataset, indices: list[int], workers: int) -> Iterator[tuple]:
    if workers <= 1:
        for i in indices:
            yield _load_one(i, dataset)
        return
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(dataset,)) as pool:
        yield from pool.map(_load_one, indices, chunksize=4)


def prepare(
    dataset: PairDataset,
    out: str | Path,
    *,
    shard_size: int = 256,
    workers: int = 2,
    progress: bool = True,
    meta: dict | None = None,
) -> dict:
    """Write ``dataset``'s HR images into uint16 shards under ``out`` (module docstring).

    Returns the index (also written to ``out/index.json``) with one extra key,
    ``"written"``: the number of shards this call wrote (0 when everything was done).
    Raises ``ValueError`` when ``out`` holds a different plan.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [dataset.name(i) for i in range(len(dataset))]
    plan = {"format": FORMAT, "hr_size": dataset.hr_size, "shard_size": shard_size, "names": names}
    if (out / PLAN).is_file():
        old = json.loads((out / PLAN).read_text())
        if old != plan:
            raise ValueError(
                f"{out} holds a cache prepared with other settings or images; "
                "use a new --out folder (or delete this one)"
            )
    else:
        _write_json(out / PLAN, plan)

    n_shards = -(-len(names) // shard_size)
    pending = [k for k in range(n_shards) if not (out / f"{shard_name(k)}.json").is_file()]
    indices = [
        i for k in pending for i in range(k * shard_size, min((k + 1) * shard_size, len(names)))
    ]
    bar = tqdm(total=len(indices), desc=f"prepare {out.name}", unit="img", disable=not progress)
    buffers: dict[int, dict] = {}
    for i, hr, error in _results(dataset, indices, workers):
        k = i // shard_size
        buf = buffers.setdefault(k, {"arrays": [], "names": [], "skipped": [], "seen": 0})
        buf["seen"] += 1
        if hr is None:
            log.warning("skipping %s: %s", names[i], error)
            buf["skipped"].append({"name": names[i], "error": error})
        else:
            buf["arrays"].append(hr)
            buf["names"].append(names[i])
        bar.update(1)
        if buf["seen"] == min(shard_size, len(names) - k * shard_size):
            _write_shard(out, k, buffers.pop(k), dataset.hr_size)
    bar.close()

    shards, skipped = [], []
    for k in range(n_shards):
        info = json.loads((out / f"{shard_name(k)}.json").read_text())
        shards.append({"file": info["file"], "names": info["names"]})
        skipped += info["skipped"]
    index = {
        "format": FORMAT,
        **(meta or {}),
        "split": dataset.split,
        "hr_size": dataset.hr_size,
        "scale": dataset.scale,
        "dtype": "uint16",
        "count": sum(len(s["names"]) for s in shards),
        "shards": shards,
        "skipped": skipped,
    }
    _write_json(out / INDEX, index)
    return {**index, "written": len(pending)}


def _write_shard(out: Path, k: int, buf: dict, hr_size: int) -> None:
    stack = np.stack(buf["arrays"]) if buf["arrays"] else np.zeros((0, hr_size, hr_size), np.uint16)
    file = f"{shard_name(k)}.npy"
    _atomic_write_bytes(out / file, lambda f: np.save(f, stack))
    _write_json(
        out / f"{shard_name(k)}.json",
        {"file": file, "names": buf["names"], "skipped": buf["skipped"]},
    )


class CachedPairs(PairDataset):
    """Pairs from a prepared cache folder (the one holding ``index.json``).

    HR = shard value / 65535 (float32 ``[S, S]``), LR = its area downsample; on the train
    split flipped left-right half the time (per-item RNG, see ``PairDataset``). Shards are
    memory-mapped on first use in each process.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        split: str = "train",
        seed: int = 0,
        hflip: bool = True,
        scale: int | None = None,
        hr_size: int | None = None,
    ) -> None:
        folder = Path(folder)
        if not (folder / INDEX).is_file():
            why = (
                "the preparation did not finish: rerun the same prepare command"
                if (folder / PLAN).is_file()
                else "make one with `python -m cxr_sr.train.data.prepare`"
            )
            raise ValueError(f"{folder}: no {INDEX}; {why}")
        index = json.loads((folder / INDEX).read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"{folder / INDEX}: unknown format {index.get('format')!r}")
        if hr_size is not None and hr_size != index["hr_size"]:
            raise ValueError(f"{folder} holds {index['hr_size']}-px images, not {hr_size}")
        super().__init__(
            split=split,
            seed=seed,
            hr_size=index["hr_size"],
            scale=scale or index["scale"],
            hflip=hflip,
        )
        self.folder = folder
        self.index = index
        self.files = [s["file"] for s in index["shards"]]
        self.names = [n for s in index["shards"] for n in s["names"]]
        counts = [len(s["names"]) for s in index["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._arrays: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def __len__(self) -> int:
        return len(self.names)

    def name(self, index: int) -> str:
        return self.names[index]

    def hr_uint16(self, index: int) -> np.ndarray:
        """The stored uint16 ``[S, S]`` HR image of item ``index`` (a memory-mapped view)."""
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        if k not in self._arrays:
            self._arrays[k] = np.load(self.folder / self.files[k], mmap_mode="r")
        return self._arrays[k][index - self.starts[k]]

    def load_hr(self, index: int, rng: np.random.Generator) -> np.ndarray:
        return self.hr_uint16(index).astype(np.float32) / FULL_SCALE

    def describe(self) -> dict:
        return {
            "source": "cache",
            "folder": str(self.folder),
            "split": self.split,
            "items": len(self),
            "cached_from": self.index.get("source"),
        }


def main(argv: list[str] | None = None) -> None:
    from cxr_sr.train.data import DataConfig, build_dataset

    p = argparse.ArgumentParser(
        prog="python -m cxr_sr.train.data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        choices=PREPARE_SOURCES,
        required=True,
        help="where the images come from (reference protocol: whole image -> HR)",
    )
    p.add_argument(
        "--root",
        default=None,
        help="data folder (NIH: the one holding Data_Entry_2017.csv); not for phantom",
    )
    p.add_argument("--out", required=True, help="cache folder; the split's shards go to OUT/SPLIT/")
    p.add_argument("--split", choices=SPLITS, default="train", help="which split to prepare")
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="number of images sampled from the split (seeded); default: all",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the image sampling")
    p.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="salt of the patient-wise train/val(/test) assignment",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of the train_val patients (NIH) or files held out as val",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.1,
        help="fraction held out as test (dicom/folder; NIH uses test_list.txt)",
    )
    p.add_argument(
        "--view-position",
        choices=("PA", "AP"),
        default=None,
        help="NIH only: keep this view position",
    )
    p.add_argument(
        "--resize-mode",
        choices=("crop", "stretch"),
        default="crop",
        help="non-square images: centre square crop, or stretch to a square",
    )
    p.add_argument("--hr-size", type=int, default=256, help="side of the stored HR images")
    p.add_argument(
        "--phantom-size",
        type=int,
        default=512,
        help="phantom only: side at which phantoms are drawn before resizing",
    )
    p.add_argument("--shard-size", type=int, default=256, help="images per shard file")
    p.add_argument(
        "--workers", type=int, default=2, help="decoding processes (1 = decode in this process)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    n = args.n
    cfg = DataConfig(
        source=args.source,
        root=args.root,
        n_images=n,
        n_eval_images=n,
        seed=args.seed,
        split_seed=args.split_seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        view_position=args.view_position,
        resize_mode=args.resize_mode,
        hr_size=args.hr_size,
        phantom_size=args.phantom_size,
        hflip=False,
        train_crops=False,
    )
    if args.source == "phantom" and n is None:
        cfg = replace(cfg, n_images=1000, n_eval_images=1000)
    dataset = build_dataset(cfg, args.split)
    meta = {"source": args.source, "config": asdict(cfg)}
    index = prepare(
        dataset,
        Path(args.out) / args.split,
        shard_size=args.shard_size,
        workers=args.workers,
        progress=not args.quiet,
        meta=meta,
    )
    print(
        f"{index['count']} images in {len(index['shards'])} shards under "
        f"{Path(args.out) / args.split} ({index['written']} shards written now, "
        f"{len(index['skipped'])} images skipped)"
    )


if __name__ == "__main__":
    main()
