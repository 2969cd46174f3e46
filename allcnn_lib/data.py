"""Find, verify and load CIFAR-10.

``load_cifar10()`` looks for the data in this order and uses the first it finds:

1. an explicit ``path`` argument (a ``cifar-10-batches-py`` folder, a folder holding one, or the
   ``cifar-10-python.tar.gz`` archive);
2. the ``CIFAR10_DIR`` environment variable (same forms);
3. ``data/cifar-10-batches-py/``;
4. ``data/cifar-10-python.tar.gz``;
5. a download of the official archive (urllib; URL and md5 checked), cached as ``data/`` item 4;
6. if the download fails, the small balanced sample shipped in ``data/cifar10_sample.npz``, with a
   one-line notice that says how to get the full set.

Images come back as uint8 NHWC arrays (N, 32, 32, 3) and labels as int64 vectors. The training
set is split, per class and seeded, into training and validation parts; the test set is never
used for model selection.
"""

from __future__ import annotations

import hashlib
import io
import json
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

#: md5 of each file of the official release (as published with the archive; torchvision checks
#: the same values).
OFFICIAL_BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}

#: ``batch_digest`` of each batch of the copies whose pixels differ from the official release:
#: the JPEG copy the project machines carry (``../shared/cifar10/unpack.py``, ``make data``).
#: A digest covers the decoded images and labels, not the pickle's bytes, so it does not depend
#: on the numpy version that wrote the file.
KNOWN_COPIES = {
    "CIFAR-10 (JPEG copy)": {
        "data_batch_1": "56b8bb1ce1a9e0ff38c303a967d6ef00",
        "data_batch_2": "0215fa9a6db593a0007886bc4850b515",
        "data_batch_3": "153fc3e8a33ad6ee4dcc85311d696a66",
        "data_batch_4": "84c187115315b725bb1fcb043860a352",
        "data_batch_5": "9934fa78293b310f8b3d4e9522e492e2",
        "test_batch": "be5df2a31106e0aa14cbd22565ea7733",
    },
}

#: Per-channel pixel mean and standard deviation (0-255) of the official training images; the
#: JPEG copy is within 1 of each. ``verify_data`` allows ``STATS_TOLERANCE``.
EXPECTED_MEAN = (125.3, 123.0, 113.9)
EXPECTED_STD = (63.0, 62.1, 66.7)
STATS_TOLERANCE = 4.0

#: The shipped sample, written by ``scripts/make_sample.py`` (2,000 train, 1,000 test images).
SAMPLE_NAME = "cifar10_sample.npz"
SAMPLE_MD5 = "872ba65ab4eb8e2329cf18a0cec48fc1"

#: The repository's ``data/`` folder (the package is installed in editable mode from the repo).
REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPOSITORY / "data"

GET_FULL_SET = (
    "to get the full set, connect to the internet and run load_cifar10() once (it downloads "
    f"{ARCHIVE_NAME} into data/), or put the official {BATCHES_DIR}/ folder under data/ "
    "or set CIFAR10_DIR to it"
)


class CIFAR10Error(RuntimeError):
    """CIFAR-10 data that is missing, corrupt or malformed; the message names the file and fix."""


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as committed files and printed logs record it: relative to the repository when
    inside it, ``~/...`` when inside the home folder, else as given (no machine's absolute
    paths)."""
    resolved = Path(path).expanduser().resolve()
    for root, prefix in ((REPOSITORY, ""), (Path.home().resolve(), "~/")):
        if resolved.is_relative_to(root):
            return prefix + str(resolved.relative_to(root)) if resolved != root else (
                prefix.rstrip("/") or ".")
    return str(path)


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
    source: str = ""  # where the data came from, as ``portable_path`` writes it
    is_sample: bool = False
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        kind = "shipped sample" if self.is_sample else "full set"
        return (f"CIFAR10({kind} from {self.source}: train {len(self.y_train)}, "
                f"validation {len(self.y_val)}, test {len(self.y_test)})")


# --------------------------------------------------------------------------- raw readers



#: The path settings of a run's ``config.json`` (``training.TrainConfig``).
PATH_FIELDS = ("data_dir", "runs_dir", "backup_dir", "initial_weights")


def portable_config(config: dict) -> dict:
    """A copy of a run's ``config.json`` with its paths (``PATH_FIELDS`` and the run's data
    source) as ``portable_path`` records them, for files that are committed."""
    config = json.loads(json.dumps(config))
    for key in PATH_FIELDS:
        if config.get(key):
            config[key] = portable_path(config[key])
    run = config.get("run") or {}
    if run.get("data_source"):
        run["data_source"] = portable_path(run["data_source"])
    return config

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


def _unreadable(path: Path, err: OSError, fix: str) -> CIFAR10Error:
    """The one-line error for a data file the operating system refuses to read."""
    if isinstance(err, PermissionError):
        return CIFAR10Error(f"{path}: permission denied (this user cannot read it). Fix: "
                            f"chmod a+r {path}, or run as the user who owns it")
    return CIFAR10Error(f"{path}: cannot be read ({err.strerror or err}). Fix: {fix}")


def read_file(path: Path, fix: str) -> bytes:
    """The bytes of a data file; an OS-level failure (permission, I/O) is one ``CIFAR10Error``."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise _unreadable(path, err, fix) from None


def batch_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """md5 of a batch's decoded uint8 images and its labels (int64, little-endian): what
    ``KNOWN_COPIES`` records, independent of how the file was pickled."""
    digest = hashlib.md5(np.ascontiguousarray(images, np.uint8).tobytes())
    digest.update(np.asarray(labels).astype("<i8").tobytes())
    return digest.hexdigest()


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
        return parse_batch(read_file(folder / name, fix), str(folder / name), fix)

    x_train, y_train = _concat(read(n) for n in TRAIN_BATCHES)
    x_test, y_test = read(TEST_BATCH)
    return x_train, y_train, x_test, y_test


def read_archive(archive: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the official ``cifar-10-python.tar.gz`` without unpacking it to disk.

    A file with the official archive's name must be the official archive (md5 ``CIFAR10_MD5``)
    or hold the batches of a copy in ``KNOWN_COPIES``: a flipped byte is caught here, not
    trained on.
    """
    fix = f"delete {archive} and download it again (load_cifar10() does), or unpack it by hand"
    try:
        md5 = md5sum(archive)
    except OSError as err:
        raise _unreadable(archive, err, fix) from None
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if n not in members]
            if missing:
                raise CIFAR10Error(f"{archive}: the archive lacks {', '.join(missing)}. "
                                   f"Fix: {fix}")
            for name in (*TRAIN_BATCHES, TEST_BATCH):
                raw = tar.extractfile(members[name]).read()
                batches[name] = parse_batch(raw, f"{archive}:{name}", fix)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise CIFAR10Error(f"{archive}: not a readable .tar.gz ({type(err).__name__}: {err}). "
                           f"Fix: {fix}") from None
    if archive.name == ARCHIVE_NAME and md5 != CIFAR10_MD5:
        digests = {name: batch_digest(*xy) for name, xy in batches.items()}
        if known_copy(digests) is None:
            raise CIFAR10Error(
                f"{archive}: md5 is {md5}, not the official archive's {CIFAR10_MD5}, and its "
                "batches match no known copy (corrupt or modified). Fix: delete it and download "
                "it again; to use a copy of your own, unpack it and pass its "
                f"{BATCHES_DIR}/ folder (allcnn verify-data checks it)")
    x_train, y_train = _concat(batches[n] for n in TRAIN_BATCHES)
    x_test, y_test = batches[TEST_BATCH]
    return x_train, y_train, x_test, y_test


def known_copy(digests: dict[str, str]) -> str | None:
    """The name of the copy in ``KNOWN_COPIES`` whose every batch has these digests, or None."""
    for name, known in KNOWN_COPIES.items():
        if all(digests.get(batch) == digest for batch, digest in known.items()):
            return name
    return None


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
    try:
        got = md5sum(path) if expected_md5 is not None else None
    except OSError as err:
        raise _unreadable(path, err, fix) from None
    if expected_md5 is not None and got != expected_md5:
        raise CIFAR10Error(f"{path}: md5 is {got}, expected {expected_md5} (corrupt or "
                           f"modified file). Fix: {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = []
            for split in ("train", "test"):
                x = decode_jpegs(z[f"{split}_jpeg"], z[f"{split}_offsets"])
                out += [x, z[f"{split}_labels"].astype(np.int64)]
    except PermissionError as err:
        raise _unreadable(path, err, fix) from None
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as err:
        raise CIFAR10Error(f"{path}: not a readable sample ({type(err).__name__}: {err}). "
                           f"Fix: {fix}") from None
    return out[0], out[1], out[2], out[3]


# --------------------------------------------------------------------------- download


#: Seconds to wait for the server to answer before giving up (offline machines fail at once).
DOWNLOAD_TIMEOUT = 20


def _http_download(directory: Path) -> Path:
    """Download the official archive into ``directory`` (urllib; no TensorFlow start-up)."""
    import urllib.request

    target = directory / ARCHIVE_NAME
    with urllib.request.urlopen(CIFAR10_URL, timeout=DOWNLOAD_TIMEOUT) as response:
        print(f"downloading {CIFAR10_URL} (163 MB) into {portable_path(directory.parent)}/",
              file=sys.stderr, flush=True)
        with open(target, "wb") as fh:
            shutil.copyfileobj(response, fh, length=1 << 20)
    return target


def download_cifar10(data_dir: Path, downloader: Callable[[Path], Path] = _http_download
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


def _locate(path: str | os.PathLike | None, path_name: str, data_dir: Path) -> Path | None:
    """The CIFAR-10 copy to read: ``path`` (named ``path_name`` in errors), else
    ``$CIFAR10_DIR``, else the batches folder or the archive under ``data_dir`` (None when
    neither is there). An explicit location that holds no data is an error."""
    if path is not None:
        return _explicit(Path(path), path_name)
    if os.environ.get("CIFAR10_DIR"):
        return _explicit(Path(os.environ["CIFAR10_DIR"]), "$CIFAR10_DIR")
    return _resolve(data_dir / BATCHES_DIR) or _resolve(data_dir / ARCHIVE_NAME)


def _explicit(path: Path, origin: str) -> Path:
    found = _resolve(path)
    if found is None:
        what = "does not exist" if not path.exists() else "holds no CIFAR-10 data"
        drop = "unset it" if origin.startswith("$") else "leave it out"
        raise CIFAR10Error(f"{path} (from {origin}) {what}: expected a {BATCHES_DIR}/ folder, "
                           f"a folder holding one, or {ARCHIVE_NAME}. Fix: point {origin} at the "
                           f"data, or {drop} to use data/")
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
    downloader: Callable[[Path], Path] = _http_download,
    path_name: str = "the path argument",
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
        download: download the official archive when nothing is found locally.
        allow_sample: fall back to the shipped sample when the full set cannot be had.
        sample: True forces the shipped sample; None (default) uses it when ``ALLCNN_QUICK``
            is set, False never forces it.
        verbose: print the one-line notice when the sample is used in place of the full set.
        downloader: the download function (tests pass one that fails, to mimic no network).
        path_name: how messages name ``path`` (the command line passes ``"--data-dir"``).

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
    else:
        source = _locate(path, path_name, data_dir)
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
            notice = ("Notice: no full CIFAR-10 here and no download possible; using the "
                      "shipped sample (2,000 training / 1,000 test images); "
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
        class_names=CLASS_NAMES, source=portable_path(source), is_sample=use_sample,
        notes=notes,
    )


# --------------------------------------------------------------------------- verification


@dataclass
class BatchCheck:
    """What ``verify_data`` found in one batch file."""

    name: str
    md5: str  # of the file's bytes
    digest: str  # ``batch_digest`` of its decoded images and labels
    images: int
    class_counts: np.ndarray  # images per class
    pixel_histogram: np.ndarray  # (3, 256): pixel values per channel
    match: str | None  # "official release", a ``KNOWN_COPIES`` name, or None


@dataclass
class DataReport:
    """``verify_data``'s findings: each batch, the problems (empty: the data is sound) and
    notes that are no error."""

    source: str
    batches: list[BatchCheck]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """The report as printed by ``allcnn verify-data``."""
        out = [f"CIFAR-10 at {self.source}",
               f"  {'file':13s} {'images':>7s}  {'md5':32s}  {'matches':22s}  images per class"]
        for b in self.batches:
            out.append(f"  {b.name:13s} {b.images:7,d}  {b.md5}  {b.match or 'nothing known':22s}"
                       f"  {' '.join(str(int(c)) for c in b.class_counts)}")
        for split, names in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
            part = [b for b in self.batches if b.name in names]
            counts = sum(b.class_counts for b in part)
            mean, std = histogram_stats(sum(b.pixel_histogram for b in part))
            out.append(f"{split}: {int(counts.sum()):,} images, per class "
                       f"{int(counts.min()):,} to {int(counts.max()):,}; pixel mean (R, G, B) "
                       f"{_triple(mean)}, std {_triple(std)}")
        out += [f"note: {n}" for n in self.notes]
        return out


def _triple(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ")"


def histogram_stats(histogram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of pixel values from (3, 256) value counts."""
    values = np.arange(256, dtype=np.float64)
    n = histogram.sum(axis=1)
    mean = histogram @ values / n
    var = histogram @ values**2 / n - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0))


def _check_batch(name: str, raw: bytes, where: str, fix: str) -> BatchCheck:
    images, labels = parse_batch(raw, where, fix)
    md5 = hashlib.md5(raw).hexdigest()
    digest = batch_digest(images, labels)
    match = None
    if OFFICIAL_BATCH_MD5.get(name) == md5:
        match = "official release"
    else:
        match = next((copy for copy, known in KNOWN_COPIES.items()
                      if known.get(name) == digest), None)
    histogram = np.stack([np.bincount(images[..., c].ravel(), minlength=256)
                          for c in range(3)])
    return BatchCheck(name, md5, digest, len(labels),
                      np.bincount(labels, minlength=NUM_CLASSES), histogram, match)


def verify_data(path: str | os.PathLike | None = None, *,
                data_dir: str | os.PathLike | None = None,
                path_name: str = "the path argument") -> DataReport:
    """Check CIFAR-10 found on disk (as ``load_cifar10`` finds it, without download or sample):
    each batch file's md5 against the official release and its decoded images and labels
    against the copies in ``KNOWN_COPIES``; images per class (equal in each split); and the
    per-channel pixel mean and std of the training images against the official ones.

    A batch that matches nothing while the others match one release is corrupt (a flipped
    byte); data that matches nothing known is checked by its counts and statistics only.
    Raises ``CIFAR10Error`` when no data is found or a file cannot be read at all.
    """
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    source = _locate(path, path_name, data_dir)
    if source is None:
        raise CIFAR10Error(f"{data_dir}: no CIFAR-10 here ({BATCHES_DIR}/ or {ARCHIVE_NAME}) "
                           f"to verify. Fix: {GET_FULL_SET}")
    notes: list[str] = []
    problems: list[str] = []
    names = (*TRAIN_BATCHES, TEST_BATCH)
    if source.is_file() and source.suffix == ".npz":
        raise CIFAR10Error(f"{source}: the shipped sample is checked by its md5 whenever it "
                           "loads. Fix: pass a full CIFAR-10 folder or archive")
    if source.is_file():
        fix = f"delete {source} and download it again"
        try:
            archive_md5 = md5sum(source)
            with tarfile.open(source, "r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in names if n not in members]
                if missing:
                    raise CIFAR10Error(f"{source}: the archive lacks {', '.join(missing)}. "
                                       f"Fix: {fix}")
                batches = [_check_batch(n, tar.extractfile(members[n]).read(),
                                        f"{source}:{n}", fix) for n in names]
        except OSError as err:
            raise _unreadable(source, err, fix) from None
        except (tarfile.TarError, EOFError, zlib.error) as err:
            raise CIFAR10Error(f"{source}: not a readable .tar.gz ({type(err).__name__}: "
                               f"{err}). Fix: {fix}") from None
        if archive_md5 == CIFAR10_MD5:
            notes.append(f"the archive is the official one (md5 {CIFAR10_MD5})")
    else:
        fix = f"delete {source} and download or unpack CIFAR-10 again (see data/README.md)"
        missing = [n for n in names if not (source / n).is_file()]
        if missing:
            raise CIFAR10Error(f"{source}: missing {', '.join(missing)}. Fix: {fix}")
        batches = [_check_batch(n, read_file(source / n, fix), str(source / n), fix)
                   for n in names]

    matches = {b.match for b in batches}
    if matches == {None}:
        notes.append("these files are neither the official release nor a copy this tool "
                     "knows, so their bytes cannot be checked: only counts and statistics were")
    elif None in matches:
        known = next(m for m in matches if m)
        for b in batches:
            if b.match is None:
                problems.append(f"{source}/{b.name}: its contents differ from {known}, which "
                                f"the other batches match (md5 {b.md5}): corrupt or modified. "
                                f"Fix: {fix}")
    for split, part in (("training", batches[:-1]), ("test", batches[-1:])):
        counts = sum(b.class_counts for b in part)
        if counts.min() != counts.max():
            problems.append(f"{source}: {split} images per class are "
                            f"{', '.join(str(int(c)) for c in counts)}, not equal (labels "
                            f"corrupt). Fix: {fix}")
    train_images = sum(b.images for b in batches[:-1])
    if train_images >= 10_000:  # statistics of a full-size set, not of a toy one
        mean, std = histogram_stats(sum(b.pixel_histogram for b in batches[:-1]))
        off = np.abs(np.concatenate([mean - EXPECTED_MEAN, std - EXPECTED_STD]))
        if off.max() > STATS_TOLERANCE:
            problems.append(f"{source}: training pixel mean {_triple(mean)} and std "
                            f"{_triple(std)} are far from CIFAR-10's {_triple(EXPECTED_MEAN)} "
                            f"and {_triple(EXPECTED_STD)}: not CIFAR-10 images, or corrupt. "
                            f"Fix: {fix}")
    return DataReport(portable_path(source), batches, problems, notes)
