"""The run folder ``runs/<id>/``: file names, choice lists, ``TrainConfig``, atomic writes, CSVs
and weights files. ``training.train`` writes ``config.json``, ``history.csv`` (CSVLogger),
``batches.csv``, ``best.weights.h5``, ``last.weights.h5`` and the fitted preprocessing.
No TensorFlow here: the CLI checks flags, folders and files with it before anything slow starts.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import gc
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allcnn_lib.data import portable_path
from allcnn_lib.recipes import RECIPES

CONFIG_JSON = "config.json"
HISTORY_CSV = "history.csv"
BATCHES_CSV = "batches.csv"
BEST_WEIGHTS = "best.weights.h5"
LAST_WEIGHTS = "last.weights.h5"
ZCA_FILE = "zca.npz"
STANDARDIZER_FILE = "standardizer.npz"
BATCH_COLUMNS = ("epoch", "batch", "step", "loss", "accuracy", "epoch_loss", "epoch_accuracy",
                 "learning_rate")

#: Architecture key -> ``keras.Model.name`` (``models.build_model``).
MODEL_NAMES = {"modelc": "model_c", "strided": "strided_cnn_c", "allcnn": "all_cnn_c"}
ARCHS = tuple(MODEL_NAMES)
VARIANTS = ("paper", "repository")  # Tables 1 and 2, or the original repository's deviations
#: ``initializers.get_initializer``'s names, and LSUV (orthogonal, then Algorithm 1).
INITIALIZERS = ("gaussian", "glorot_normal", "glorot_uniform", "he_normal", "he_uniform",
                "orthogonal", "lsuv")
OPTIMIZERS = ("sgd", "rmsprop", "adam")
SCHEDULES = ("paper", "constant", "inverse_time", "onecycle")
DISTRIBUTE = ("none", "mirrored")
SHIFT_FILLS = ("zero", "reflect")
TRAIN_ON = ("split", "all")  # all: the 50,000 training images, no validation split
DEFAULT_LEARNING_RATES = {"sgd": 0.01, "rmsprop": 0.001, "adam": 0.001}
MAX_SHIFT = 0.1  # largest translation, as a fraction of the image side (3 px of 32)
#: Sides of ``crop_size``: up to CIFAR-10's 32 px, down to the smallest that leaves All-CNN-C's
#: ``valid`` conv7 a 3 x 3 map after the two stride-2 stages (9 -> 5 -> 3).
CROP_SIZES = range(9, 33)
PATH_FIELDS = ("data_dir", "runs_dir", "backup_dir", "initial_weights")
#: Values older run folders wrote, when "seed" also named the original repository's settings.
RENAMED = {"variant": ("seed", "repository"), "schedule": ("seed", "inverse_time")}


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as the run's ``config.json``.

    ``None`` means a default: ``learning_rate`` from ``DEFAULT_LEARNING_RATES``,
    ``steps_per_epoch`` one pass, ``limit`` all images, ``backup_dir`` under ~/.cache/allcnn,
    ``verbose`` a progress bar on a terminal. ``recipe`` names the preset (``RECIPES``).
    ``crop_epochs``: the first N epochs train on random ``crop_size`` crops
    (``training.crop_first``).
    """

    run_id: str | None = None
    arch: str = "allcnn"
    variant: str = "paper"
    batch_norm: bool = False
    dropout: bool = True
    init: str = "glorot_uniform"
    optimizer: str = "sgd"
    learning_rate: float | None = None
    rho: float = 0.9
    schedule: str = "paper"
    epochs: int = 350
    steps_per_epoch: int | None = None
    batch_size: int = 128
    augment: bool = True
    normalize: bool = False
    zca: bool = False
    zca_epsilon: float = 0.1  # the paper's (preprocessing.PAPER_ZCA_EPSILON)
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    limit: int | None = None
    seed: int = 0
    mixed_precision: bool = False
    distribute: str = "none"
    data_dir: str | None = None
    runs_dir: str = "runs"
    backup_dir: str | None = None
    verbose: bool | None = None
    initial_weights: str | None = None
    class_relu: bool = True
    bn_momentum: float = 0.99
    max_shift: int | float = MAX_SHIFT
    shift_fill: str = "zero"
    whiten_init: bool = False
    ema: bool = False
    train_on: str = "split"
    tta_flip: bool = False
    tta_shift: int = 0
    recipe: str | None = None
    crop_epochs: int = 0
    crop_size: int = 24

    def __post_init__(self) -> None:
        for name, choices in (("arch", ARCHS), ("variant", VARIANTS), ("init", INITIALIZERS),
                              ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                              ("distribute", DISTRIBUTE), ("shift_fill", SHIFT_FILLS),
                              ("train_on", TRAIN_ON), ("recipe", (None, *RECIPES))):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of "
                                 f"{', '.join(c for c in choices if c)}")
        for name in ("epochs", "batch_size", "steps_per_epoch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.normalize and self.zca:
            raise ValueError("choose one preprocessing: normalize (per-channel) or zca, not both")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.tta_shift < 0:
            raise ValueError(f"tta_shift must be >= 0, got {self.tta_shift}")
        if not 0 <= self.crop_epochs <= self.epochs:
            raise ValueError(f"crop_epochs {self.crop_epochs} is not from 0 to the run's "
                             f"{self.epochs} epochs; lower crop_epochs or raise epochs")
        if self.crop_size not in CROP_SIZES:
            raise ValueError(f"crop_size must be from {CROP_SIZES[0]} to {CROP_SIZES[-1]} "
                             f"pixels, got {self.crop_size}")
        if self.run_id is None:
            self.run_id = f"{self.arch}_{self.init}_{self.optimizer}_seed{self.seed}"
        if not self.run_id or "/" in self.run_id or self.run_id in (".", ".."):
            raise ValueError(f"run id {self.run_id!r} must be a plain folder name")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / str(self.run_id)

    def resolved_backup_dir(self) -> Path:
        """``backup_dir``, else ``~/.cache/allcnn/backup/<run id>``."""
        return Path(self.backup_dir or Path.home() / ".cache/allcnn/backup" / str(self.run_id))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a backup must share with a run to be resumed by it."""
        d = self.to_dict()
        for volatile in ("verbose", "backup_dir", "runs_dir", "data_dir", "initial_weights"):
            d.pop(volatile)
        return {**d, "run_dir": str(self.run_dir.resolve())}


def portable_config(config: dict) -> dict:
    """A copy of a run's ``config.json`` with its paths as ``portable_path`` writes them."""
    config = json.loads(json.dumps(config))
    for key in PATH_FIELDS:
        if config.get(key):
            config[key] = portable_path(config[key])
    if (config.get("run") or {}).get("data_source"):
        config["run"]["data_source"] = portable_path(config["run"]["data_source"])
    return config


#: The settings that choose the network, with ``TrainConfig``'s defaults.
NETWORK_DEFAULTS = {name: getattr(TrainConfig, name)
                    for name in ("arch", "variant", "batch_norm", "dropout", "class_relu")}


def load_run_config(run_dir_or_file: str | os.PathLike,
                    fix: str = "restore it, or move it away and give the network's flags "
                               "(--arch, --bn, --dropout)") -> dict[str, Any] | None:
    """The ``config.json`` of a run folder or beside a weights file; None if there is none.
    A damaged one is a one-line ``ValueError`` naming the file, the problem and ``fix``."""
    p = Path(run_dir_or_file)
    path = p / CONFIG_JSON if p.is_dir() else p.parent / CONFIG_JSON
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        problem = f"not valid JSON (truncated or edited? {err.msg} at line {err.lineno})"
    except UnicodeDecodeError:
        problem = "not a text file"
    except OSError as err:
        problem = f"unreadable ({err.strerror or err})"
    else:
        if isinstance(config, dict):
            return {**config, **{key: new for key, (old, new) in RENAMED.items()
                                 if config.get(key) == old}}
        problem = f"holds a {type(config).__name__}, not a run's settings"
    raise ValueError(f"{path}: {problem}; {fix}")


# --------------------------------------------------------------------------- atomic files

SPACE_MARGIN = 1 << 20  # free space kept beyond a file's expected size
TMP_MARK = ".tmp-"


class DiskFullError(OSError):
    """No space left for a file; the previous version of the file is kept (one-line message)."""

    def __init__(self, path: str | os.PathLike, needed: int | None, free: int | None) -> None:
        need = f"needs about {needed / 1e6:.1f} MB, " if needed else ""
        have = f"{free / 1e6:.1f} MB free" if free is not None else "the disk is full"
        super().__init__(errno.ENOSPC, f"no space left on device for {path} ({need}{have}); "
                                       "the previous checkpoint is kept: free some space, then "
                                       "run the same command again to resume")

    def __str__(self) -> str:
        return str(self.strerror)


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest parent that exists."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free bytes on the device that holds ``folder`` (or its nearest existing parent)."""
    with contextlib.suppress(OSError):
        return shutil.disk_usage(nearest_existing(Path(folder).absolute())).free
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size_hint: int | None = None) -> Iterator[Path]:
    """A temporary path beside ``path``, fsynced and moved onto it (``os.replace``) once
    written: readers see the old file or the new one. If the body raises or writes nothing,
    ``path`` stays. ``DiskFullError`` before writing when ``size_hint`` bytes will not fit, or
    when a write fails with ENOSPC (the temporary is then emptied first: HDF5 segfaulted at
    exit closing a full one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = free_bytes(path.parent) if size_hint is not None else None
    if free is not None and free < size_hint + SPACE_MARGIN:
        raise DiskFullError(path, size_hint + SPACE_MARGIN, free)
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex[:12]}{suffix}")
    full = None
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # HDF5 reports ENOSPC as "errno = 28"
        if isinstance(err, DiskFullError) or not (
                getattr(err, "errno", None) == errno.ENOSPC or "errno = 28" in str(err)
                or "No space left on device" in str(err)):
            raise
        with contextlib.suppress(OSError):
            os.truncate(tmp, 0)  # while HDF5's objects still live (in err's frames)
        full = DiskFullError(path, size_hint or (path.stat().st_size if path.is_file() else None),
                             free_bytes(path.parent))
    finally:
        tmp.unlink(missing_ok=True)
    if full is not None:  # raised once err and its frames are gone
        gc.collect()  # HDF5 closes its half-written file now
        raise full


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries ``atomic_path`` left in ``folder`` (after a SIGKILL)."""
    found = list(Path(folder).glob(f".*{TMP_MARK}*")) if Path(folder).is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    return found


# --------------------------------------------------------------------------- CSV files


def _float(value: str | None) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def read_columns(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A CSV file with a header as float columns (NaN where not a number; {} if absent)."""
    if not Path(path).is_file():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {k: np.array([_float(r.get(k)) for r in rows]) for k in rows[0] if k} if rows else {}


def truncate_csv(path: str | os.PathLike, epochs: int) -> int:
    """Keep the well-formed rows with ``epoch < epochs`` (``epochs=0`` removes the file), so
    that a resumed run writes every later epoch once; returns the rows kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    if epochs == 0:
        path.unlink()
        return 0
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return 0
    header, *rows = rows
    keep = [r for r in rows if len(r) == len(header) and r[0].lstrip("-").isdigit()
            and int(r[0]) < epochs]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *keep])
    return len(keep)


def best_epoch(history: dict[str, np.ndarray]) -> tuple[int | None, float | None]:
    """The epoch (from 0) with the best validation accuracy and a finite loss (a diverged
    epoch was never saved), and that accuracy; (None, None) when there is none."""
    acc = np.array(history.get("val_accuracy", []), float)
    for key in ("loss", "val_loss"):
        if len(values := np.asarray(history.get(key, []), float)) == len(acc):
            acc[~np.isfinite(values)] = np.nan
    if np.isnan(acc).all():
        return None, None
    i = int(np.nanargmax(acc))
    return int(history["epoch"][i]), float(acc[i])


# --------------------------------------------------------------------------- weights files


class WeightsMismatchError(ValueError):
    """A weights file that does not fit the model it is loaded into (one-line message)."""


@dataclass(frozen=True)
class WeightsSummary:
    """A Keras 3 ``.weights.h5`` file's (or a model's) name and each layer's weight shapes."""

    path: Path
    model_name: str | None
    layers: dict[str, tuple[tuple[int, ...], ...]]  # layers with weights: name -> shapes
    layer_names: frozenset[str]  # every layer, weightless ones too

    @property
    def params(self) -> int:
        return sum(math.prod(s) for shapes in self.layers.values() for s in shapes)

    @property
    def arch(self) -> str | None:
        return next((k for k, v in MODEL_NAMES.items() if v == self.model_name), None)

    @property
    def batch_norm(self) -> bool:
        return any(n.startswith("bn") for n in self.layers)

    def __str__(self) -> str:
        bn = " with batch norm" if self.batch_norm else ""
        params = f" ({self.params:,} params)" if self.layers else ""
        return f"{self.model_name or 'an unnamed model'}{bn}{params}"


def _saved_layers(f: Any) -> dict[str, Any]:
    """Layer name -> its ``vars`` group in an open ``.weights.h5`` file."""
    groups = f.get("layers") or {}
    return {str(g["vars"].attrs.get("name", key)): g["vars"]
            for key, g in groups.items() if "vars" in g}


def read_weights_summary(path: str | os.PathLike) -> WeightsSummary:
    """Inspect a ``.weights.h5`` file written by ``model.save_weights`` (h5py; no model)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            name = f["vars"].attrs.get("name") if "vars" in f else None
            found = _saved_layers(f)
            layers = {n: tuple(tuple(g[k].shape) for k in sorted(g, key=int))
                      for n, g in found.items()}
    except (OSError, KeyError, ValueError) as err:
        raise WeightsMismatchError(f"{path}: not a readable Keras .weights.h5 file "
                                   f"({type(err).__name__}: {err})") from None
    name = name.decode() if isinstance(name, bytes) else name
    return WeightsSummary(path, name and str(name), {n: s for n, s in layers.items() if s},
                          frozenset(layers))


def model_summary(model: Any) -> WeightsSummary:
    """The ``WeightsSummary`` of a built ``keras.Model``."""
    layers = {layer.name: tuple(tuple(int(d) for d in w.shape) for w in layer.weights)
              for layer in model.layers if layer.weights}
    return WeightsSummary(Path(), model.name, layers, frozenset(la.name for la in model.layers))


def check_weights(saved: WeightsSummary, want: WeightsSummary) -> None:
    """``WeightsMismatchError`` unless ``saved`` fits ``want``, in one line naming both and the
    flag that fixes it. Model-C and Strided-CNN-C have the same shapes, so names are compared
    too (a summary without layers by name only)."""
    same_name = saved.model_name in (None, want.model_name)
    if same_name and (saved.layers == want.layers or not want.layers):
        return
    flags = [f"--arch {saved.arch}"] if not same_name and saved.arch else []
    if want.layers and saved.batch_norm != want.batch_norm:
        flags.append("--bn 1" if saved.batch_norm else "--bn 0")
    differ = sorted(set(saved.layers) ^ set(want.layers)) or sorted(
        n for n in saved.layers if saved.layers[n] != want.layers.get(n))
    fix = f"pass {' '.join(flags)}" if flags else f"the layers {', '.join(differ[:4])} differ"
    raise WeightsMismatchError(f"{saved.path.name} holds weights for {saved} but the model is "
                               f"{want}; {fix}")


def load_weights(model: Any, path: str | os.PathLike) -> Any:
    """``model.load_weights(path)`` after ``check_weights``. Keras files layers under their
    class name, so stock ``BatchNormalization`` weights and ``FusedBatchNormalization`` ones
    do not load into each other: those are set layer by layer from the recorded names."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    check_weights(read_weights_summary(path), model_summary(model))
    try:
        with warnings.catch_warnings():  # a failed load warns about each layer it skipped
            warnings.simplefilter("ignore")
            model.load_weights(path)
    except ValueError:
        with h5py.File(path, "r") as f:
            saved = _saved_layers(f)
            for layer in model.layers:
                if layer.weights:
                    g = saved[layer.name]
                    layer.set_weights([g[str(i)][()] for i in range(len(g))])
    return model
