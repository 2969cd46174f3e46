#!/usr/bin/env python3
"""Write the small CIFAR-10 sample shipped in ``data/cifar10_sample.npz``.

    python scripts/make_sample.py [--source ../shared/cifar10] [--train-per-class 200]
                                  [--test-per-class 100] [--seed 0] [--out data/cifar10_sample.npz]

The source is a folder holding ``train_jpeg.npz`` and ``test_jpeg.npz`` (the JPEG copy of
CIFAR-10 this project's machines carry; see ``data/README.md``). The sample keeps the original
JPEG bytes, so its pixels are exactly those of the copy, and it is balanced per class. The
output is byte-for-byte reproducible; its md5 is printed and must be copied into
``allcnn_lib/data.py`` (``SAMPLE_MD5``) when the sample is regenerated.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

from allcnn_lib.data import CLASS_NAMES


def pick(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` images of each class, in a seeded random order."""
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
              for c in range(len(CLASS_NAMES))]
    return rng.permutation(np.concatenate(chosen))


def take(source: Path, split: str, per_class: int, rng: np.random.Generator) -> dict:
    """The JPEG bytes, offsets and labels of a balanced sample of one split."""
    z = np.load(source / f"{split}_jpeg.npz")
    blob, offsets, labels = z["jpeg"].tobytes(), z["offsets"], z["labels"].astype(np.int64)
    idx = pick(labels, per_class, rng)
    parts = [blob[offsets[i]:offsets[i + 1]] for i in idx]
    new_offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    return {
        f"{split}_jpeg": np.frombuffer(b"".join(parts), np.uint8),
        f"{split}_offsets": new_offsets,
        f"{split}_labels": labels[idx].astype(np.uint8),
    }


def write_npz(path: Path, arrays: dict) -> None:
    """A zip of .npy members with fixed timestamps, so the file is reproducible."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(2026, 1, 1, 0, 0, 0))
            zf.writestr(info, buf.getvalue())
    tmp.replace(path)


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=here.parent / "shared" / "cifar10")
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=here / "data" / "cifar10_sample.npz")
    args = ap.parse_args()
    if not (args.source / "train_jpeg.npz").is_file():
        ap.error(f"no train_jpeg.npz in {args.source}; pass --source FOLDER")
    rng = np.random.default_rng(args.seed)
    arrays = {}
    arrays.update(take(args.source, "train", args.train_per_class, rng))
    arrays.update(take(args.source, "test", args.test_per_class, rng))
    arrays["class_names"] = np.array(CLASS_NAMES)
    write_npz(args.out, arrays)
    md5 = hashlib.md5(args.out.read_bytes()).hexdigest()
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB), md5 {md5}")


if __name__ == "__main__":
    main()
