"""Find, verify and load CIFAR-10.

``load_cifar10()`` uses the first source it finds: the ``path`` argument, ``$CIFAR10_DIR``,
``data/cifar-10-batches-py/``, ``data/cifar-10-python.tar.gz``, a download of the official
archive (md5 checked, kept in ``data/``), and last the small sample shipped in
``data/cifar10_sample.npz`` (with a one-line notice). Images are uint8 NHWC, labels int64.
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
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = 10
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME, BATCHES_DIR = "cifar-10-python.tar.gz", "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
BATCH_NAMES = (*TRAIN_BATCHES, TEST_BATCH)
#: md5 of each file of the official release (torchvision checks the same values).
OFFICIAL_BATCH_MD5 = dict(zip(BATCH_NAMES, (
    "c99cafc152244af753f735de768cd75f", "d4bba439e000b95fd0a9bffe97cbabec",
    "54ebc095f3ab1f0389bbae665268c751", "634d18415352ddfa80567beed471001a",
    "482c414d41f54cd18b22e5b47cb7c3cb", "40351d587109b95175f43aff81a1287e"), strict=True))
#: ``batch_digest`` of each batch of copies whose pixels differ from the official release (the
#: JPEG copy of the project machines, ``make data``): it does not depend on the pickling.
KNOWN_COPIES = {"CIFAR-10 (JPEG copy)": dict(zip(BATCH_NAMES, (
    "56b8bb1ce1a9e0ff38c303a967d6ef00", "0215fa9a6db593a0007886bc4850b515",
    "153fc3e8a33ad6ee4dcc85311d696a66", "84c187115315b725bb1fcb043860a352",
    "9934fa78293b310f8b3d4e9522e492e2", "be5df2a31106e0aa14cbd22565ea7733"), strict=True))}
#: The shipped sample, written by ``scripts/make_sample.py`` (2,000 train, 1,000 test images).
SAMPLE_NAME, SAMPLE_MD5 = "cifar10_sample.npz", "872ba65ab4eb8e2329cf18a0cec48fc1"
REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPOSITORY / "data"
GET_FULL_SET = (
    "to get the full set, connect to the internet and run load_cifar10() once (it downloads "
    f"{ARCHIVE_NAME} into data/), or put the official {BATCHES_DIR}/ folder under data/ "
    "or set CIFAR10_DIR to it")


class CIFAR10Error(RuntimeError):
    """Missing, corrupt or malformed CIFAR-10; the one-line message names the file and the fix."""


def _error(where: object, problem: str, fix: str) -> CIFAR10Error:
    return CIFAR10Error(f"{where}: {problem}. Fix: {fix}")


def portable_path(path: str | os.PathLike) -> str:
    """``path`` relative to the repository, or as ``~/...`` under home, else as given."""
    resolved = Path(path).expanduser().resolve()
    for root, prefix in ((REPOSITORY, ""), (Path.home().resolve(), "~/")):
        if resolved.is_relative_to(root):
            return f"{prefix}{resolved.relative_to(root)}".removesuffix("/.")
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
    source: str = ""  # as ``portable_path`` writes it
    is_sample: bool = False

    def __repr__(self) -> str:
        kind = "shipped sample" if self.is_sample else "full set"
        return (f"CIFAR10({kind} from {self.source}: train {len(self.y_train)}, "
                f"validation {len(self.y_val)}, test {len(self.y_test)})")


def rows_to_images(rows: np.ndarray) -> np.ndarray:
    """Official rows (N, 3072), channel-first (1024 R, 1024 G, 1024 B), to uint8 (N, 32, 32, 3).

    A plain ``reshape(N, 32, 32, 3)`` scrambles every image: split the channels off first.
    """
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != 3072:
        raise ValueError(f"expected rows of shape (N, 3072), got {rows.shape}")
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), dtype=np.uint8)


def md5sum(path: str | os.PathLike) -> str:
    """The md5 of a file."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def batch_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """md5 of a batch's decoded uint8 images and int64 little-endian labels (``KNOWN_COPIES``)."""
    digest = hashlib.md5(np.ascontiguousarray(images, np.uint8).tobytes())
    digest.update(np.asarray(labels).astype("<i8").tobytes())
    return digest.hexdigest()


def _fix(source: Path) -> str:
    return f"delete {source} and download or unpack CIFAR-10 again (see data/README.md)"


def _read_bytes(path: Path, fix: str) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError:
        raise CIFAR10Error(f"{path}: permission denied (this user cannot read it). Fix: "
                           f"chmod a+r {path}, or run as the user who owns it") from None
    except OSError as err:
        raise _error(path, f"cannot be read ({err.strerror or err})", fix) from None


def parse_batch(raw: bytes, name: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle one official batch (``data_batch_N`` or ``test_batch``) and check it."""
    try:
        batch = {k.decode() if isinstance(k, bytes) else k: v
                 for k, v in pickle.loads(raw, encoding="bytes").items()}
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    except Exception as err:  # truncated or garbage files raise many kinds of error
        raise _error(name, f"not a readable CIFAR-10 batch ({type(err).__name__}: {err})",
                     fix) from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise _error(name, f"'data' has shape {data.shape} and dtype {data.dtype}, expected "
                     "(N, 3072) uint8", fix)
    if labels.shape != (len(data),):
        raise _error(name, f"'labels' has shape {labels.shape}, expected ({len(data)},)", fix)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise _error(name, f"labels outside 0..9 (min {labels.min()}, max {labels.max()})", fix)
    return rows_to_images(data), labels.astype(np.int64)


def _read_batches(source: Path) -> tuple[dict[str, tuple[bytes, np.ndarray, np.ndarray]],
                                          str | None]:
    """Each batch's bytes, images and labels, from a batches folder or the archive (read without
    unpacking), and the archive's md5 (None for a folder)."""
    fix = _fix(source)
    if source.is_dir():
        if missing := [n for n in BATCH_NAMES if not (source / n).is_file()]:
            raise _error(source, f"missing {', '.join(missing)}", fix)
        raws, archive_md5 = {n: _read_bytes(source / n, fix) for n in BATCH_NAMES}, None
    else:
        archive = _read_bytes(source, fix)
        try:
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                if missing := [n for n in BATCH_NAMES if n not in members]:
                    raise _error(source, f"the archive lacks {', '.join(missing)}", fix)
                raws = {n: tar.extractfile(members[n]).read() for n in BATCH_NAMES}
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise _error(source, f"not a readable .tar.gz ({type(err).__name__}: {err})",
                         fix) from None
        archive_md5 = hashlib.md5(archive).hexdigest()
    prefix = f"{source}/" if archive_md5 is None else f"{source}:"
    return {n: (raw, *parse_batch(raw, prefix + n, fix)) for n, raw in raws.items()}, archive_md5


def _match(name: str, raw: bytes, images: np.ndarray, labels: np.ndarray) -> str | None:
    """The release this batch belongs to: "official release", a ``KNOWN_COPIES`` name, or None."""
    if OFFICIAL_BATCH_MD5.get(name) == hashlib.md5(raw).hexdigest():
        return "official release"
    digest = batch_digest(images, labels)
    return next((copy for copy, known in KNOWN_COPIES.items() if known.get(name) == digest), None)


def read_full_set(source: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of a batches folder or the official archive.

    A file with the official archive's name must be it (md5 ``CIFAR10_MD5``) or hold the batches
    of a copy in ``KNOWN_COPIES``: a flipped byte is caught here, not trained on."""
    batches, archive_md5 = _read_batches(source)
    if source.name == ARCHIVE_NAME and archive_md5 != CIFAR10_MD5:
        matches = {_match(n, *b) for n, b in batches.items()}
        if None in matches or len(matches) > 1:
            raise CIFAR10Error(
                f"{source}: md5 is {archive_md5}, not the official archive's {CIFAR10_MD5}, "
                "and its batches match no known copy (corrupt or modified). Fix: delete it and "
                "download it again; to use a copy of your own, unpack it and pass its "
                f"{BATCHES_DIR}/ folder (allcnn verify-data checks it)")
    x_train, y_train = (np.concatenate([batches[n][k] for n in TRAIN_BATCHES]) for k in (1, 2))
    return x_train, y_train, batches[TEST_BATCH][1], batches[TEST_BATCH][2]


def read_sample(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of the shipped sample (JPEG bytes), md5 checked."""
    from PIL import Image

    fix = "restore it with `git checkout data/cifar10_sample.npz` (see data/README.md)"
    if not path.is_file():
        raise _error(path, "the shipped sample is missing", fix)
    raw = _read_bytes(path, fix)
    if (got := hashlib.md5(raw).hexdigest()) != SAMPLE_MD5:
        raise _error(path, f"md5 is {got}, expected {SAMPLE_MD5} (corrupt or modified file)", fix)
    out = []
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        for split in ("train", "test"):
            blob, ends = z[f"{split}_jpeg"].tobytes(), z[f"{split}_offsets"]
            out += [np.stack([np.asarray(Image.open(io.BytesIO(blob[a:b])).convert("RGB"))
                              for a, b in zip(ends[:-1], ends[1:], strict=True)]),
                    z[f"{split}_labels"].astype(np.int64)]
    return out[0], out[1], out[2], out[3]


def _fetch(directory: Path) -> Path:
    """Download the official archive into ``directory`` (urllib: no TensorFlow start-up)."""
    import urllib.request

    with urllib.request.urlopen(CIFAR10_URL, timeout=20) as response, open(
            directory / ARCHIVE_NAME, "wb") as fh:
        print(f"downloading {CIFAR10_URL} (163 MB) into {portable_path(directory.parent)}/",
              file=sys.stderr, flush=True)
        shutil.copyfileobj(response, fh, length=1 << 20)
    return directory / ARCHIVE_NAME


def download_cifar10(data_dir: Path) -> Path:
    """Download the archive into ``data_dir`` atomically: into a temporary folder there, md5
    checked, then moved into place. Raises ``CIFAR10Error`` saying what went wrong."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=data_dir))
    try:
        try:
            fetched = _fetch(tmp)
        except Exception as err:
            raise CIFAR10Error(f"download failed ({type(err).__name__}: "
                               f"{(str(err).splitlines() or [''])[0]})") from None
        if (got := md5sum(fetched)) != CIFAR10_MD5:
            raise CIFAR10Error(f"the download's md5 is {got}, expected {CIFAR10_MD5}")
        os.replace(fetched, data_dir / ARCHIVE_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data_dir / ARCHIVE_NAME


def balanced_subset(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` examples, ``n / 10`` from each class (``n`` divisible by 10)."""
    if n % NUM_CLASSES:
        raise ValueError(f"a balanced subset needs a multiple of {NUM_CLASSES}, got {n}")
    per_class, rng, picks = n // NUM_CLASSES, np.random.default_rng(seed), []
    for c in range(NUM_CLASSES):
        if len(idx := np.flatnonzero(y == c)) < per_class:
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
    rng = np.random.default_rng(seed)
    return rng.permutation(np.setdiff1d(np.arange(len(y)), val)), rng.permutation(val)


def _locate(path: str | os.PathLike | None, path_name: str) -> Path | None:
    """The CIFAR-10 to read: ``path``, else ``$CIFAR10_DIR``, else the batches folder or archive
    in ``DEFAULT_DATA_DIR`` (None if neither). An explicit location without data is an error."""
    def found(candidate: Path) -> Path | None:
        return next((option for option in (candidate, candidate / BATCHES_DIR,
                                           candidate / ARCHIVE_NAME)
                     if option.is_file() or (option / "data_batch_1").is_file()
                     or (option / TEST_BATCH).is_file()), None)

    if path is None and os.environ.get("CIFAR10_DIR"):
        path, path_name = os.environ["CIFAR10_DIR"], "$CIFAR10_DIR"
    if path is None:
        return found(DEFAULT_DATA_DIR / BATCHES_DIR) or found(DEFAULT_DATA_DIR / ARCHIVE_NAME)
    if (source := found(Path(path))) is None:
        what = "does not exist" if not Path(path).exists() else "holds no CIFAR-10 data"
        drop = "unset it" if path_name.startswith("$") else "leave it out"
        raise CIFAR10Error(f"{path} (from {path_name}) {what}: expected a {BATCHES_DIR}/ "
                           f"folder, a folder holding one, or {ARCHIVE_NAME}. Fix: point "
                           f"{path_name} at the data, or {drop} to use data/")
    return source


def quick_mode() -> bool:
    """True when ``ALLCNN_QUICK`` is set to a true value (1, true, yes, on)."""
    return os.environ.get("ALLCNN_QUICK", "").strip().lower() in {"1", "true", "yes", "on"}


def load_cifar10(path: str | os.PathLike | None = None, *, validation_size: int | None = None,
                 limit: int | None = None, test_limit: int | None = None, seed: int = 0,
                 sample: bool | None = None, verbose: bool = True,
                 path_name: str = "the path argument") -> CIFAR10:
    """CIFAR-10 from the first source found (see the module), split into train/val/test.

    ``limit`` keeps a balanced subset of the training pool (``test_limit``: of the test set);
    ``validation_size`` images (default: a tenth of the pool) are then carved from it per class,
    seeded. ``sample=True`` loads the shipped sample, ``None`` does when ``ALLCNN_QUICK`` is set;
    ``verbose`` prints the notice when the sample stands in for missing data. ``path_name``
    names ``path`` in errors (the CLI: "--data-dir"). Bad data raises ``CIFAR10Error``.
    """
    use_sample = quick_mode() if sample is None else sample
    source = None if use_sample else _locate(path, path_name)
    if source is None and not use_sample:
        try:
            source = download_cifar10(DEFAULT_DATA_DIR)
        except CIFAR10Error as err:
            if verbose:
                print(f"Notice: no full CIFAR-10 here and no download possible ({err}); using "
                      "the shipped sample (2,000 training / 1,000 test images); "
                      f"{GET_FULL_SET}.", file=sys.stderr)
    source = source or DEFAULT_DATA_DIR / SAMPLE_NAME
    is_sample = source.suffix == ".npz"
    x_pool, y_pool, x_test, y_test = (read_sample if is_sample else read_full_set)(source)
    if limit is not None:
        keep = balanced_subset(y_pool, limit, seed)
        x_pool, y_pool = x_pool[keep], y_pool[keep]
    if test_limit is not None:
        keep = balanced_subset(y_test, test_limit, seed)
        x_test, y_test = x_test[keep], y_test[keep]
    if validation_size is None:
        validation_size = len(y_pool) // 10 // NUM_CLASSES * NUM_CLASSES
    train, val = train_validation_split(y_pool, validation_size, seed)
    return CIFAR10(x_pool[train], y_pool[train], x_pool[val], y_pool[val], x_test, y_test,
                   CLASS_NAMES, portable_path(source), is_sample)


@dataclass
class DataReport:
    """``verify_data``'s findings: a row per batch file, problems (none: sound) and notes."""

    source: str
    batches: list[tuple[str, str, np.ndarray, str | None]]  # name, md5, per class, match
    problems: list[str]
    notes: list[str]

    def lines(self) -> list[str]:
        """The report as ``allcnn verify-data`` prints it."""
        out = [f"CIFAR-10 at {self.source}",
               f"  {'file':13s} {'images':>7s}  {'md5':32s}  {'matches':22s}  images per class"]
        out += [f"  {name:13s} {int(counts.sum()):7,d}  {md5}  {match or 'nothing known':22s}  "
                f"{' '.join(map(str, counts))}" for name, md5, counts, match in self.batches]
        for split, part in (("train", self.batches[:-1]), ("test", self.batches[-1:])):
            counts = sum(row[2] for row in part)
            out.append(f"{split}: {int(counts.sum()):,} images, per class "
                       f"{int(counts.min()):,} to {int(counts.max()):,}")
        return out + [f"note: {n}" for n in self.notes]


def verify_data(path: str | os.PathLike | None = None, *,
                path_name: str = "the path argument") -> DataReport:
    """Check the CIFAR-10 that ``load_cifar10`` would find (no download, no sample): each
    file's md5 against the official release, its pixels and labels against ``KNOWN_COPIES``,
    and equal images per class. A batch that matches nothing while the others match a release
    is corrupt (a flipped byte); data that matches nothing known is checked by its counts."""
    source = _locate(path, path_name)
    if source is None:
        raise _error(DEFAULT_DATA_DIR, f"no CIFAR-10 here ({BATCHES_DIR}/ or {ARCHIVE_NAME}) "
                     "to verify", GET_FULL_SET)
    read, archive_md5 = _read_batches(source)
    rows = [(n, hashlib.md5(raw).hexdigest(), np.bincount(y, minlength=NUM_CLASSES),
             _match(n, raw, x, y)) for n, (raw, x, y) in read.items()]
    notes = [f"the archive is the official one (md5 {CIFAR10_MD5})"] * (
        archive_md5 == CIFAR10_MD5)
    known = next((row[3] for row in rows if row[3]), None)
    if known is None:
        notes.append("these files are neither the official release nor a copy this tool "
                     "knows, so their bytes cannot be checked: only their counts were")
    fix = _fix(source)
    problems = [f"{source}/{name}: its contents differ from {known}, which the other batches "
                f"match (md5 {md5}): corrupt or modified. Fix: {fix}"
                for name, md5, _, match in rows if known and match is None]
    for split, part in (("training", rows[:-1]), ("test", rows[-1:])):
        if (counts := sum(row[2] for row in part)).min() != counts.max():
            problems.append(f"{source}: {split} images per class are "
                            f"{', '.join(map(str, counts))}, not equal (labels corrupt). "
                            f"Fix: {fix}")
    return DataReport(portable_path(source), rows, problems, notes)
