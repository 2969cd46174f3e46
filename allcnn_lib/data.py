"""Find, verify and load CIFAR-10.

``load_cifar10()`` looks for the data in this order and uses the first it finds:

1. an explicit ``path`` argument (a ``cifar-10-batches-py`` folder, a folder holding one, or the
   ``cifar-10-python.tar.gz`` archive);
2. the ``CIFAR10_DIR`` environment variable (same forms);
3. ``data/cifar-10-batches-py/``;
4. ``data/cifar-10-python.tar.gz``;
5. Keras' download of the official archive (URL and md5 checked), cached as ``data/`` item 4;
6. if the download fails, the small balanced sample shipped in ``data/cifar10_sample.npz``, with a
   one-line notice that says how to get the full set.

Images come back as uint8 NHWC arrays (N, 32, 32, 3) and labels as int64 vectors. The training
set is split, per class and seeded, into training and validation parts; the test set is never
used for model selection.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)

#: The official "python version" archive and its md5, as published on the CIFAR-10 page.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"

#: The shipped sample, written by ``scripts/make_sample.py`` (2,000 train, 1,000 test images).
SAMPLE_NAME = "cifar10_sample.npz"
SAMPLE_MD5 = "872ba65ab4eb8e2329cf18a0cec48fc1"

#: The repository's ``data/`` folder (the package is installed in editable mode from the repo).
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"

GET_FULL_SET = (
    "to get the full set, connect to the internet and run load_cifar10() once (it downloads "
    f"{ARCHIVE_NAME} into data/), or put the official {BATCHES_DIR}/ folder under data/ "
    "or set CIFAR10_DIR to it"
)


class CIFAR10Error(RuntimeError):
    """CIFAR-10 data that is missing, corrupt or malformed; the message names the file and fix."""


@dataclass
class CIFAR10:
    """CIFAR-10 split into training, validation and test parts (uint8 NHWC, int64 labels)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES
    source: str = ""
    is_sample: bool = False
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        kind = "shipped sample" if self.is_sample else "full set"
        return (f"CIFAR10({kind} from {self.source}: train {len(self.y_train)}, "
                f"validation {len(self.y_val)}, test {len(self.y_test)})")


# --------------------------------------------------------------------------- raw readers


def rows_to_images(rows: np.ndarray) -> np.ndarray:
    """Official rows (N, 3072), channel-first (1024 R, 1024 G, 1024 B), to uint8 (N, 32, 32, 3).

    A plain ``reshape(N, 32, 32, 3)`` of these rows scrambles every image: the channels must be
    split off first and moved last.
    """
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != 3072:
        raise ValueError(f"expected rows of shape (N, 3072), got {rows.shape}")
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), dtype=np.uint8)


def _bad_file(name: str, problem: str, fix: str) -> CIFAR10Error:
    return CIFAR10Error(f"{name}: {problem}. Fix: {fix}")


def parse_batch(raw: bytes, name: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle one official batch (bytes of ``data_batch_N`` or ``test_batch``) and check it."""
    try:
        batch = pickle.loads(raw, encoding="bytes")
    except Exception as err:  # truncated or garbage files raise many kinds of error
        raise _bad_file(name, f"not a readable CIFAR-10 batch ({type(err).__name__}: {err})",
                        fix) from None
    if not isinstance(batch, dict):
        raise _bad_file(name, f"holds a {type(batch).__name__}, not a CIFAR-10 batch dict", fix)
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise _bad_file(name, f"has no 'data' or 'labels' entry (keys: {sorted(batch)})", fix)
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise _bad_file(name, f"'data' has shape {data.shape} and dtype {data.dtype}, "
                        "expected (N, 3072) uint8", fix)
    if labels.shape != (data.shape[0],):
        raise _bad_file(name, f"'labels' has shape {labels.shape}, expected ({data.shape[0]},)",
                        fix)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise _bad_file(name, f"labels outside 0..9 (min {labels.min()}, max {labels.max()})",
                        fix)
    return rows_to_images(data), labels.astype(np.int64)


def _concat(parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*parts, strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def read_batches_dir(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read an official ``cifar-10-batches-py`` folder: (x_train, y_train, x_test, y_test)."""
    fix = (f"delete {folder} and download or unpack CIFAR-10 again "
           "(see data/README.md)")
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / n).is_file()]
    if missing:
        raise CIFAR10Error(f"{folder}: missing {', '.join(missing)}. Fix: {fix}")

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        return parse_batch((folder / name).read_bytes(), str(folder / name), fix)

    x_train, y_train = _concat(read(n) for n in TRAIN_BATCHES)
    x_test, y_test = read(TEST_BATCH)
    return x_train, y_train, x_test, y_test


def read_archive(archive: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the official ``cifar-10-python.tar.gz`` without unpacking it to disk."""
    fix = f"delete {archive} and download it again (load_cifar10() does), or unpack it by hand"
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if n not in members]
            if missing:
                raise CIFAR10Error(f"{archive}: the archive lacks {', '.join(missing)}. "
                                   f"Fix: {fix}")

            def read(name: str) -> tuple[np.ndarray, np.ndarray]:
                raw = tar.extractfile(members[name]).read()
                return parse_batch(raw, f"{archive}:{name}", fix)

            x_train, y_train = _concat(read(n) for n in TRAIN_BATCHES)
            x_test, y_test = read(TEST_BATCH)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise CIFAR10Error(f"{archive}: not a readable .tar.gz ({type(err).__name__}: {err}). "
                           f"Fix: {fix}") from None
    return x_train, y_train, x_test, y_test


def decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Decode concatenated JPEG bytes (``blob[offsets[i]:offsets[i+1]]``) to uint8 NHWC."""
    from PIL import Image

    raw = np.asarray(blob, np.uint8).tobytes()
    images = np.empty((len(offsets) - 1, *IMAGE_SHAPE), np.uint8)
    for i in range(len(offsets) - 1):
        with Image.open(io.BytesIO(raw[offsets[i]:offsets[i + 1]])) as im:
            images[i] = np.asarray(im.convert("RGB"), np.uint8)
    return images


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """The md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_sample(path: Path, expected_md5: str | None = SAMPLE_MD5
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the shipped sample (JPEG bytes of real CIFAR-10 images) and check its md5."""
    fix = "restore it with `git checkout data/cifar10_sample.npz` (see data/README.md)"
    if not path.is_file():
        raise CIFAR10Error(f"{path}: the shipped sample is missing. Fix: {fix}")
    if expected_md5 is not None and (got := md5sum(path)) != expected_md5:
        raise CIFAR10Error(f"{path}: md5 is {got}, expected {expected_md5} (corrupt or "
                           f"modified file). Fix: {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = []
            for split in ("train", "test"):
                x = decode_jpegs(z[f"{split}_jpeg"], z[f"{split}_offsets"])
                out += [x, z[f"{split}_labels"].astype(np.int64)]
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as err:
        raise CIFAR10Error(f"{path}: not a readable sample ({type(err).__name__}: {err}). "
                           f"Fix: {fix}") from None
    return out[0], out[1], out[2], out[3]


# --------------------------------------------------------------------------- download


def _keras_download(directory: Path) -> Path:
    """Download the official archive into ``directory`` with Keras, md5 checked."""
    import keras

    return Path(keras.utils.get_file(fname=ARCHIVE_NAME, origin=CIFAR10_URL,
                                     file_hash=CIFAR10_MD5, hash_algorithm="md5",
                                     cache_dir=str(directory), cache_subdir="."))


def download_cifar10(data_dir: Path, downloader: Callable[[Path], Path] = _keras_download
                     ) -> Path:
    """Download ``cifar-10-python.tar.gz`` into ``data_dir``, atomically.

    The file is fetched into a temporary folder inside ``data_dir``, its md5 is checked against
    the official one, and only then is it moved into place, so an interrupted or failed download
    leaves nothing half-written behind. Raises :class:`CIFAR10Error` on any failure.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / ARCHIVE_NAME
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=data_dir))
    try:
        try:
            fetched = downloader(tmp)
        except Exception as err:
            raise CIFAR10Error(f"{CIFAR10_URL}: download failed ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}). Fix: "
                               f"{GET_FULL_SET}") from None
        got = md5sum(fetched)
        if got != CIFAR10_MD5:
            raise CIFAR10Error(f"{fetched.name}: md5 is {got}, expected {CIFAR10_MD5} "
                               "(corrupt download). Fix: run load_cifar10() again, or "
                               f"download {CIFAR10_URL} by hand into {data_dir}")
        os.replace(fetched, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- splits


def balanced_subset(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` examples, ``n / 10`` from each class (``n`` divisible by 10)."""
    if n % NUM_CLASSES:
        raise ValueError(f"a balanced subset needs a multiple of {NUM_CLASSES}, got {n}")
    per_class = n // NUM_CLASSES
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has {len(idx)} examples, fewer than {per_class} "
                             f"needed for a balanced subset of {n}")
        picks.append(rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(picks))


def train_validation_split(y: np.ndarray, validation_size: int, seed: int = 0
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation), validation balanced per class and drawn with ``seed``."""
    if not 0 <= validation_size < len(y):
        raise ValueError(f"validation_size must be in [0, {len(y)}), got {validation_size}")
    val = balanced_subset(y, validation_size, seed) if validation_size else np.array([], int)
    train = np.setdiff1d(np.arange(len(y)), val)
    rng = np.random.default_rng(seed)
    return rng.permutation(train), rng.permutation(val)


# --------------------------------------------------------------------------- finding


def _resolve(candidate: Path) -> Path | None:
    """A batches folder or archive at ``candidate``, or inside it; None if neither."""
    if candidate.is_file():
        return candidate
    if (candidate / TEST_BATCH).is_file() or (candidate / "data_batch_1").is_file():
        return candidate
    if (candidate / BATCHES_DIR).is_dir():
        return candidate / BATCHES_DIR
    if (candidate / ARCHIVE_NAME).is_file():
        return candidate / ARCHIVE_NAME
    return None


def _read_source(source: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if source.is_file():
        if source.suffix == ".npz":
            return read_sample(source, expected_md5=None)
        return read_archive(source)
    return read_batches_dir(source)


def _explicit(path: Path, origin: str) -> Path:
    found = _resolve(path)
    if found is None:
        what = "does not exist" if not path.exists() else "holds no CIFAR-10 data"
        raise CIFAR10Error(f"{path} (from {origin}) {what}: expected a {BATCHES_DIR}/ folder, "
                           f"a folder holding one, or {ARCHIVE_NAME}. Fix: point {origin} at the "
                           "data, or unset it to use data/")
    return found


def quick_mode() -> bool:
    """True when ``ALLCNN_QUICK`` is set to a true value (1, true, yes)."""
    return os.environ.get("ALLCNN_QUICK", "").strip().lower() in {"1", "true", "yes", "on"}


def load_cifar10(
    path: str | os.PathLike | None = None,
    *,
    validation_size: int | None = None,
    limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    allow_sample: bool = True,
    sample: bool | None = None,
    verbose: bool = True,
    downloader: Callable[[Path], Path] = _keras_download,
) -> CIFAR10:
    """Load CIFAR-10 as uint8 NHWC images, int64 labels and class names.

    Args:
        path: a ``cifar-10-batches-py`` folder, a folder holding one, or the official archive.
            Overrides ``$CIFAR10_DIR`` and ``data/``; an explicit path that holds no data is an
            error, never a silent fallback.
        validation_size: images carved, per class and seeded, from the training set for
            validation. Default: a tenth of the training pool (5,000 on the full set).
        limit: keep a per-class balanced subset of this many training-pool images (before the
            validation split). ``test_limit``: the same for the test set.
        seed: seed of the subsets and of the validation split.
        data_dir: where to look for and cache the data (default: the repository's ``data/``).
        download: try Keras' download of the official archive when nothing is found locally.
        allow_sample: fall back to the shipped sample when the full set cannot be had.
        sample: True forces the shipped sample; None (default) uses it when ``ALLCNN_QUICK``
            is set, False never forces it.
        verbose: print the one-line notice when the sample is used in place of the full set.
        downloader: the download function (tests pass one that fails, to mimic no network).

    Raises:
        CIFAR10Error: data missing, corrupt, of the wrong shape, or not downloadable (with
            ``allow_sample=False``); the message names the file and the fix.
    """
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    notes: list[str] = []
    use_sample = quick_mode() if sample is None else sample

    source: Path | None = None
    if use_sample:
        source = data_dir / SAMPLE_NAME
    elif path is not None:
        source = _explicit(Path(path), "the path argument")
    elif os.environ.get("CIFAR10_DIR"):
        source = _explicit(Path(os.environ["CIFAR10_DIR"]), "$CIFAR10_DIR")
    else:
        source = _resolve(data_dir / BATCHES_DIR) or _resolve(data_dir / ARCHIVE_NAME)
        if source is None and download:
            try:
                source = download_cifar10(data_dir, downloader)
            except CIFAR10Error as err:
                if not allow_sample:
                    raise
                notes.append(str(err))
        if source is None:
            if not allow_sample:
                raise CIFAR10Error(f"{data_dir}: no CIFAR-10 found ({BATCHES_DIR}/ or "
                                   f"{ARCHIVE_NAME}) and download is off. Fix: {GET_FULL_SET}")
            source = data_dir / SAMPLE_NAME
            use_sample = True
            notice = ("Notice: full CIFAR-10 not found and not downloadable; using the shipped "
                      f"sample (2,000 train / 1,000 test images). For the full set: "
                      f"{GET_FULL_SET}.")
            notes.append(notice)
            if verbose:
                print(notice, file=sys.stderr)

    if use_sample:
        x_pool, y_pool, x_test, y_test = read_sample(source)
    else:
        x_pool, y_pool, x_test, y_test = _read_source(source)

    if limit is not None:
        keep = balanced_subset(y_pool, limit, seed)
        x_pool, y_pool = x_pool[keep], y_pool[keep]
    if test_limit is not None:
        keep = balanced_subset(y_test, test_limit, seed)
        x_test, y_test = x_test[keep], y_test[keep]
    if validation_size is None:
        validation_size = len(y_pool) // 10 // NUM_CLASSES * NUM_CLASSES
    train_idx, val_idx = train_validation_split(y_pool, validation_size, seed)
    return CIFAR10(
        x_train=x_pool[train_idx], y_train=y_pool[train_idx],
        x_val=x_pool[val_idx], y_val=y_pool[val_idx],
        x_test=x_test, y_test=y_test,
        class_names=CLASS_NAMES, source=str(source), is_sample=use_sample, notes=notes,
    )
