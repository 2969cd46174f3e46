"""Find, verify and load CIFAR-10.

``load_cifar10()`` uses the first source it finds: the ``path`` argument, ``$CIFAR10_DIR``,
``data/cifar-10-batches-py/``, ``data/cifar-10-python.tar.gz``, a download of the official
archive (md5 checked, kept in ``data/``), and last the small sample shipped in
``data/cifar10_sample.npz`` (with a one-line notice). Images are uint8 NHWC (N, 32, 32, 3),
labels int64; the training set is split, per class and seeded, into training and validation
parts; the test set is never used for model selection.
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
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = 10

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
BATCH_NAMES = (*TRAIN_BATCHES, TEST_BATCH)

#: md5 of each file of the official release (torchvision checks the same values).
OFFICIAL_BATCH_MD5 = dict(zip(BATCH_NAMES, (
    "c99cafc152244af753f735de768cd75f", "d4bba439e000b95fd0a9bffe97cbabec",
    "54ebc095f3ab1f0389bbae665268c751", "634d18415352ddfa80567beed471001a",
    "482c414d41f54cd18b22e5b47cb7c3cb", "40351d587109b95175f43aff81a1287e"), strict=True))
#: ``batch_digest`` of each batch of copies whose pixels differ from the official release: the
#: JPEG copy of the project machines (``make data``). A digest covers the decoded images and
#: labels, so it does not depend on the numpy version that pickled the file.
KNOWN_COPIES = {"CIFAR-10 (JPEG copy)": dict(zip(BATCH_NAMES, (
    "56b8bb1ce1a9e0ff38c303a967d6ef00", "0215fa9a6db593a0007886bc4850b515",
    "153fc3e8a33ad6ee4dcc85311d696a66", "84c187115315b725bb1fcb043860a352",
    "9934fa78293b310f8b3d4e9522e492e2", "be5df2a31106e0aa14cbd22565ea7733"), strict=True))}
#: The shipped sample, written by ``scripts/make_sample.py`` (2,000 train, 1,000 test images).
SAMPLE_NAME = "cifar10_sample.npz"
SAMPLE_MD5 = "872ba65ab4eb8e2329cf18a0cec48fc1"
REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPOSITORY / "data"
DOWNLOAD_TIMEOUT = 20  # seconds; offline machines fail at once
GET_FULL_SET = (
    "to get the full set, connect to the internet and run load_cifar10() once (it downloads "
    f"{ARCHIVE_NAME} into data/), or put the official {BATCHES_DIR}/ folder under data/ "
    "or set CIFAR10_DIR to it")


class CIFAR10Error(RuntimeError):
    """CIFAR-10 data that is missing, corrupt or malformed; the message names the file and fix."""


def _error(where: object, problem: str, fix: str) -> CIFAR10Error:
    return CIFAR10Error(f"{where}: {problem}. Fix: {fix}")


def portable_path(path: str | os.PathLike) -> str:
    """``path`` relative to the repository, or as ``~/...`` in the home folder, else as given:
    how committed files and logs record paths."""
    resolved = Path(path).expanduser().resolve()
    for root, prefix in ((REPOSITORY, ""), (Path.home().resolve(), "~/")):
        if resolved.is_relative_to(root):
            return prefix + str(resolved.relative_to(root)) if resolved != root else (
                prefix.rstrip("/") or ".")
    return str(path)


def portable_config(config: dict) -> dict:
    """A copy of a run's ``config.json`` with its paths as ``portable_path`` writes them."""
    from allcnn_lib.runs import PATH_FIELDS  # belongs in runs.py, beside PATH_FIELDS

    config = json.loads(json.dumps(config))
    for key in PATH_FIELDS:
        if config.get(key):
            config[key] = portable_path(config[key])
    run = config.get("run") or {}
    if run.get("data_source"):
        run["data_source"] = portable_path(run["data_source"])
    return config


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


def rows_to_images(rows: np.ndarray) -> np.ndarray:
    """Official rows (N, 3072), channel-first (1024 R, 1024 G, 1024 B), to uint8 (N, 32, 32, 3).

    A plain ``reshape(N, 32, 32, 3)`` scrambles every image: split the channels off first.
    """
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != 3072:
        raise ValueError(f"expected rows of shape (N, 3072), got {rows.shape}")
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), dtype=np.uint8)


def _read_bytes(path: Path, fix: str) -> bytes:
    """A file's bytes; an operating-system refusal is one ``CIFAR10Error``."""
    try:
        return path.read_bytes()
    except PermissionError:
        raise CIFAR10Error(f"{path}: permission denied (this user cannot read it). Fix: "
                           f"chmod a+r {path}, or run as the user who owns it") from None
    except OSError as err:
        raise _error(path, f"cannot be read ({err.strerror or err})", fix) from None


def md5sum(path: str | os.PathLike) -> str:
    """The md5 of a file."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def batch_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """md5 of a batch's decoded uint8 images and int64 little-endian labels (``KNOWN_COPIES``)."""
    digest = hashlib.md5(np.ascontiguousarray(images, np.uint8).tobytes())
    digest.update(np.asarray(labels).astype("<i8").tobytes())
    return digest.hexdigest()


def parse_batch(raw: bytes, name: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle one official batch (``data_batch_N`` or ``test_batch``) and check it."""
    try:
        batch = pickle.loads(raw, encoding="bytes")
    except Exception as err:  # truncated or garbage files raise many kinds of error
        raise _error(name, f"not a readable CIFAR-10 batch ({type(err).__name__}: {err})",
                     fix) from None
    if not isinstance(batch, dict):
        raise _error(name, f"holds a {type(batch).__name__}, not a CIFAR-10 batch dict", fix)
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise _error(name, f"has no 'data' or 'labels' entry (keys: {sorted(batch)})", fix)
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise _error(name, f"'data' has shape {data.shape} and dtype {data.dtype}, expected "
                     "(N, 3072) uint8", fix)
    if labels.shape != (data.shape[0],):
        raise _error(name, f"'labels' has shape {labels.shape}, expected ({data.shape[0]},)",
                     fix)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise _error(name, f"labels outside 0..9 (min {labels.min()}, max {labels.max()})", fix)
    return rows_to_images(data), labels.astype(np.int64)


def _fix_for(source: Path) -> str:
    if source.is_file():
        return f"delete {source} and download it again (load_cifar10() does)"
    return f"delete {source} and download or unpack CIFAR-10 again (see data/README.md)"


def _read_batches(source: Path) -> tuple[dict[str, tuple[bytes, np.ndarray, np.ndarray]],
                                          str | None]:
    """Each batch's bytes, images and labels, from a ``cifar-10-batches-py`` folder or the
    archive (read without unpacking), and the archive's md5 (None for a folder)."""
    fix = _fix_for(source)
    if source.is_dir():
        missing = [n for n in BATCH_NAMES if not (source / n).is_file()]
        if missing:
            raise _error(source, f"missing {', '.join(missing)}", fix)
        raws = {n: _read_bytes(source / n, fix) for n in BATCH_NAMES}
        return {n: (raw, *parse_batch(raw, str(source / n), fix)) for n, raw in raws.items()}, None
    archive = _read_bytes(source, fix)
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in BATCH_NAMES if n not in members]
            if missing:
                raise _error(source, f"the archive lacks {', '.join(missing)}", fix)
            raws = {n: tar.extractfile(members[n]).read() for n in BATCH_NAMES}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise _error(source, f"not a readable .tar.gz ({type(err).__name__}: {err})",
                     fix) from None
    return ({n: (raw, *parse_batch(raw, f"{source}:{n}", fix)) for n, raw in raws.items()},
            hashlib.md5(archive).hexdigest())


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
    x_train = np.concatenate([batches[n][1] for n in TRAIN_BATCHES])
    y_train = np.concatenate([batches[n][2] for n in TRAIN_BATCHES])
    return x_train, y_train, batches[TEST_BATCH][1], batches[TEST_BATCH][2]


def read_sample(path: Path, expected_md5: str | None = SAMPLE_MD5
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the shipped sample (JPEG bytes of real CIFAR-10 images) and check its md5."""
    from PIL import Image

    fix = "restore it with `git checkout data/cifar10_sample.npz` (see data/README.md)"
    if not path.is_file():
        raise _error(path, "the shipped sample is missing", fix)
    raw = _read_bytes(path, fix)
    got = hashlib.md5(raw).hexdigest()
    if expected_md5 is not None and got != expected_md5:
        raise _error(path, f"md5 is {got}, expected {expected_md5} (corrupt or modified file)",
                     fix)
    out = []
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            for split in ("train", "test"):
                blob, ends = z[f"{split}_jpeg"].tobytes(), z[f"{split}_offsets"]
                out += [np.stack([np.asarray(Image.open(io.BytesIO(blob[a:b])).convert("RGB"))
                                  for a, b in zip(ends[:-1], ends[1:], strict=True)]),
                        z[f"{split}_labels"].astype(np.int64)]
    except Exception as err:  # a damaged zip, a missing array, an undecodable JPEG
        raise _error(path, f"not a readable sample ({type(err).__name__}: {err})", fix) from None
    return out[0], out[1], out[2], out[3]


def _http_download(directory: Path) -> Path:
    """Download the official archive into ``directory`` (urllib: no TensorFlow start-up)."""
    import urllib.request

    with urllib.request.urlopen(CIFAR10_URL, timeout=DOWNLOAD_TIMEOUT) as response, open(
            directory / ARCHIVE_NAME, "wb") as fh:
        print(f"downloading {CIFAR10_URL} (163 MB) into {portable_path(directory.parent)}/",
              file=sys.stderr, flush=True)
        shutil.copyfileobj(response, fh, length=1 << 20)
    return directory / ARCHIVE_NAME


def download_cifar10(data_dir: Path, downloader: Callable[[Path], Path] = _http_download
                     ) -> Path:
    """Download ``cifar-10-python.tar.gz`` into ``data_dir`` atomically: into a temporary folder
    there, md5 checked, then moved into place; any failure is a ``CIFAR10Error``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=data_dir))
    try:
        try:
            fetched = downloader(tmp)
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else ""
            raise _error(CIFAR10_URL, f"download failed ({type(err).__name__}: {first})",
                         GET_FULL_SET) from None
        got = md5sum(fetched)
        if got != CIFAR10_MD5:
            raise _error(fetched.name, f"md5 is {got}, expected {CIFAR10_MD5} (corrupt "
                         "download)", f"run load_cifar10() again, or download {CIFAR10_URL} "
                         f"by hand into {data_dir}")
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


def _locate(path: str | os.PathLike | None, path_name: str, data_dir: Path) -> Path | None:
    """The CIFAR-10 to read: ``path`` (named ``path_name`` in errors), else ``$CIFAR10_DIR``,
    else the batches folder or archive under ``data_dir`` (None when neither is there). An
    explicit location that holds no data is an error, never a silent fallback."""
    def found(candidate: Path) -> Path | None:
        for option in (candidate, candidate / BATCHES_DIR, candidate / ARCHIVE_NAME):
            if option.is_file() or (option / TEST_BATCH).is_file() or (
                    option / "data_batch_1").is_file():
                return option
        return None

    if path is None and os.environ.get("CIFAR10_DIR"):
        path, path_name = os.environ["CIFAR10_DIR"], "$CIFAR10_DIR"
    if path is None:
        return found(data_dir / BATCHES_DIR) or found(data_dir / ARCHIVE_NAME)
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


def load_cifar10(
    path: str | os.PathLike | None = None, *, validation_size: int | None = None,
    limit: int | None = None, test_limit: int | None = None, seed: int = 0,
    data_dir: str | os.PathLike | None = None, download: bool = True,
    allow_sample: bool = True, sample: bool | None = None, verbose: bool = True,
    downloader: Callable[[Path], Path] = _http_download,
    path_name: str = "the path argument",
) -> CIFAR10:
    """Load CIFAR-10 as uint8 NHWC images, int64 labels and class names.

    ``path`` overrides ``$CIFAR10_DIR`` and ``data_dir`` (default: the repository's ``data/``).
    ``validation_size`` images (default: a tenth of the pool) are carved per class and seeded
    from the training pool, after ``limit`` keeps a balanced subset of it (``test_limit``: the
    same for the test set). ``download`` fetches the archive when nothing is found;
    ``allow_sample`` falls back to the shipped sample (``verbose``: with a notice on stderr).
    ``sample=True`` forces the sample, None forces it when ``ALLCNN_QUICK`` is set. Tests pass a
    failing ``downloader``; the CLI passes ``path_name="--data-dir"`` for its messages.
    Raises ``CIFAR10Error`` (one line, naming the file and the fix) for missing or bad data.
    """
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    notes: list[str] = []
    use_sample = quick_mode() if sample is None else sample
    source = None if use_sample else _locate(path, path_name, data_dir)
    if source is None and not use_sample and download:
        try:
            source = download_cifar10(data_dir, downloader)
        except CIFAR10Error as err:
            if not allow_sample:
                raise
            notes.append(str(err))
    if source is None and not use_sample:
        if not allow_sample:
            raise _error(data_dir, f"no CIFAR-10 found ({BATCHES_DIR}/ or {ARCHIVE_NAME}) and "
                         "download is off", GET_FULL_SET)
        use_sample = True
        notes.append("Notice: no full CIFAR-10 here and no download possible; using the shipped "
                     f"sample (2,000 training / 1,000 test images); {GET_FULL_SET}.")
        if verbose:
            print(notes[-1], file=sys.stderr)
    if use_sample:
        source = data_dir / SAMPLE_NAME
    x_pool, y_pool, x_test, y_test = (
        read_sample(source, SAMPLE_MD5 if use_sample else None) if source.suffix == ".npz"
        else read_full_set(source))
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
                   CLASS_NAMES, portable_path(source), use_sample, notes)


@dataclass
class BatchCheck:
    """What ``verify_data`` found in one batch file."""

    name: str
    md5: str  # of the file's bytes
    class_counts: np.ndarray  # images per class
    match: str | None  # "official release", a ``KNOWN_COPIES`` name, or None


@dataclass
class DataReport:
    """``verify_data``'s findings: each batch, problems (none: the data is sound), notes."""

    source: str
    batches: list[BatchCheck]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """The report as ``allcnn verify-data`` prints it."""
        out = [f"CIFAR-10 at {self.source}",
               f"  {'file':13s} {'images':>7s}  {'md5':32s}  {'matches':22s}  images per class"]
        out += [f"  {b.name:13s} {int(b.class_counts.sum()):7,d}  {b.md5}  "
                f"{b.match or 'nothing known':22s}  {' '.join(map(str, b.class_counts))}"
                for b in self.batches]
        for split, part in (("train", self.batches[:-1]), ("test", self.batches[-1:])):
            counts = sum(b.class_counts for b in part)
            out.append(f"{split}: {int(counts.sum()):,} images, per class "
                       f"{int(counts.min()):,} to {int(counts.max()):,}")
        return out + [f"note: {n}" for n in self.notes]


def verify_data(path: str | os.PathLike | None = None, *,
                data_dir: str | os.PathLike | None = None,
                path_name: str = "the path argument") -> DataReport:
    """Check the CIFAR-10 that ``load_cifar10`` would find (no download, no sample): each
    file's md5 against the official release, its images and labels against ``KNOWN_COPIES``,
    and equal images per class. A batch that matches nothing while the others match a release
    is corrupt (a flipped byte); data that matches nothing known is checked by its counts."""
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    source = _locate(path, path_name, data_dir)
    if source is None:
        raise _error(data_dir, f"no CIFAR-10 here ({BATCHES_DIR}/ or {ARCHIVE_NAME}) to verify",
                     GET_FULL_SET)
    if source.suffix == ".npz":
        raise _error(source, "the shipped sample is checked by its md5 whenever it loads",
                     "pass a full CIFAR-10 folder or archive")
    fix, (read, archive_md5) = _fix_for(source), _read_batches(source)
    notes = [f"the archive is the official one (md5 {CIFAR10_MD5})"] * (
        archive_md5 == CIFAR10_MD5)
    batches = [BatchCheck(n, hashlib.md5(raw).hexdigest(), np.bincount(y, minlength=NUM_CLASSES),
                          _match(n, raw, x, y)) for n, (raw, x, y) in read.items()]
    matches = {b.match for b in batches}
    if matches == {None}:
        notes.append("these files are neither the official release nor a copy this tool "
                     "knows, so their bytes cannot be checked: only their counts were")
    known = next((m for m in matches if m), None)
    problems = [f"{source}/{b.name}: its contents differ from {known}, which the other batches "
                f"match (md5 {b.md5}): corrupt or modified. Fix: {fix}"
                for b in batches if known and b.match is None]
    for split, part in (("training", batches[:-1]), ("test", batches[-1:])):
        counts = sum(b.class_counts for b in part)
        if counts.min() != counts.max():
            problems.append(f"{source}: {split} images per class are "
                            f"{', '.join(map(str, counts))}, not equal (labels corrupt). "
                            f"Fix: {fix}")
    return DataReport(portable_path(source), batches, problems, notes)
