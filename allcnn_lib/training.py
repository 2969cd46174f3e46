"""Train the All-CNN family: optimizers, schedules, the tf.data pipeline, callbacks, ``train``.

``train(TrainConfig(...))`` writes one run folder, ``runs/<id>/``::

    config.json        the TrainConfig and what the run found (model, data, steps, status)
    history.csv        one row per epoch (keras.callbacks.CSVLogger; epochs counted from 0)
    batches.csv        one row per training batch: epoch, batch, step, that batch's loss and
                       accuracy, the epoch's running means, the learning rate of the step
    best.weights.h5    the weights of the epoch with the best validation accuracy
    last.weights.h5    the weights after the last completed epoch
    accuracy.png, loss.png   the training curves (``allcnn_lib.plots``)
    zca.npz            the GCN + ZCA whitening fitted on the training split (``zca=True`` only)

Reliability: every file above is written to a temporary file and moved into place with
``os.replace``, so a reader (or a crash) never sees half a checkpoint. A run killed mid-epoch
and started again with the same config resumes from its last completed epoch
(``keras.callbacks.BackupAndRestore`` under ``backup_dir``); both CSV files are cut back to the
restored epoch first, so no epoch or batch appears twice. With the same seed on CPU two runs give
identical histories (``keras.utils.set_random_seed`` and TensorFlow's op determinism), and so
does a resumed run: the backup carries the dropout seed generators' state, and ``fast_forward``
brings the input pipeline to the epoch's shuffle and augmentation seeds. An epoch with a NaN
loss or weight is never saved (``CheckpointGuard``); a checkpoint that would not fit on the disk
stops the run with ``DiskFullError`` and keeps the previous one and the backup.

The seed repository's optimizer, ``SGD(lr=0.01, momentum=0.9, nesterov=True, decay=1e-6)``, used
Keras 2's ``decay`` argument, which Keras 3 no longer has (it is ignored with a warning, or an
error). ``make_optimizer("sgd", schedule="seed")`` states it explicitly as
``InverseTimeDecay(0.01, decay_steps=1, decay_rate=1e-6)``: lr_k = 0.01 / (1 + 1e-6 k).
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
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from allcnn_lib.data import CIFAR10, load_cifar10, portable_path
from allcnn_lib.models import ARCHITECTURES, build_model
from allcnn_lib.preprocessing import (
    PAPER_GCN_SCALE,
    PAPER_ZCA_EPSILON,
    Standardizer,
    ZCAWhitening,
    augment_dataset,
    global_contrast_normalize,
)
from allcnn_lib.recipes import RECIPES

# --------------------------------------------------------------------------- names and defaults

OPTIMIZERS = ("sgd", "rmsprop", "adam")
SCHEDULES = ("paper", "cosine", "constant", "seed", "onecycle")
INITIALIZERS = ("gaussian", "glorot_normal", "glorot_uniform", "he_normal", "he_uniform",
                "orthogonal", "lsuv")
DISTRIBUTE = ("none", "mirrored")
SHIFT_FILLS = ("zero", "reflect")
#: ``split``: train on the training split, select on the validation split; ``all``: train on all
#: 50,000 training images (no validation; the checkpoint is the schedule's last epoch).
TRAIN_ON = ("split", "all")

#: Default learning rates: the seed's SGD (0.01) and Keras' defaults for RMSprop and Adam.
DEFAULT_LEARNING_RATES = {"sgd": 0.01, "rmsprop": 0.001, "adam": 0.001}

#: The paper's schedule (Section 3.2): x0.1 after epochs 200, 250 and 300 of 350.
PAPER_DROP_EPOCHS = (200, 250, 300)
PAPER_EPOCHS = 350
PAPER_DROP_FACTOR = 0.1

#: Keras 2's ``decay`` of the seed's SGD.
SEED_DECAY = 1e-6

#: Share of the run spent warming up in the "cosine" schedule.
COSINE_WARMUP_FRACTION = 0.05

#: Largest translation of the augmentation, as a fraction of the image side (3 px of 32).
MAX_SHIFT = 0.1

#: Share of the run the "onecycle" schedule spends warming up linearly from 0 to the peak.
ONECYCLE_WARMUP_FRACTION = 0.2

#: Decay of the weights' exponential moving average (``ema=True``): a horizon of ~100 steps.
EMA_MOMENTUM = 0.99

#: Training batches that re-estimate the batch-norm statistics under the averaged weights.
BN_RECALIBRATION_BATCHES = 20

#: Batches the input pipeline prepares ahead of the train step (a fixed, small buffer).
PREFETCH_BATCHES = 2

HISTORY_CSV = "history.csv"
BATCHES_CSV = "batches.csv"
CONFIG_JSON = "config.json"
BEST_WEIGHTS = "best.weights.h5"
LAST_WEIGHTS = "last.weights.h5"
ZCA_FILE = "zca.npz"
STANDARDIZER_FILE = "standardizer.npz"
BATCH_COLUMNS = ("epoch", "batch", "step", "loss", "accuracy", "epoch_loss", "epoch_accuracy",
                 "learning_rate")

#: ``keras.Model.name`` of each architecture key (``allcnn_lib.models``).
MODEL_NAMES = {"modelc": "model_c", "strided": "strided_cnn_c", "allcnn": "all_cnn_c"}

_TMP_MARK = ".tmp-"


# --------------------------------------------------------------------------- optimizers


def paper_boundaries(total_steps: int) -> list[int]:
    """Step indices (from 0) at which the paper's schedule divides the rate by 10.

    The paper drops after epochs 200, 250 and 300 of 350; a run of ``total_steps`` drops at the
    same fractions of its length (200/350, 250/350, 300/350), rounded to a step and kept
    strictly increasing. For 350 epochs of ``s`` steps the drops land on steps 200 s, 250 s and
    300 s: the first step of epochs 200, 250 and 300 (counted from 0).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    drops: list[int] = []
    for epoch in PAPER_DROP_EPOCHS:
        step = max(1, round(total_steps * epoch / PAPER_EPOCHS))
        if drops and step <= drops[-1]:
            step = drops[-1] + 1
        drops.append(step)
    return drops


def make_schedule(name: str, learning_rate: float, *, steps_per_epoch: int | None = None,
                  epochs: int | None = None
                  ) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning-rate schedule ``name`` starting from ``learning_rate``.

    - ``"constant"``: the rate itself (a float).
    - ``"paper"``: ``PiecewiseConstantDecay``, x0.1 at 200/350, 250/350 and 300/350 of the run
      (``paper_boundaries``); needs ``steps_per_epoch`` and ``epochs``.
    - ``"cosine"``: linear warm-up from 0 over the first 5% of the steps, then cosine decay to 0
      (``CosineDecay`` with ``warmup_target``); needs ``steps_per_epoch`` and ``epochs``.
    - ``"seed"``: the seed's Keras-2 ``decay=1e-6`` made explicit,
      ``InverseTimeDecay(lr, decay_steps=1, decay_rate=1e-6)``: lr_k = lr / (1 + 1e-6 k).
    - ``"onecycle"``: linear warm-up from 0 to ``learning_rate`` over the first 20% of the
      steps, then linear decay to 0 at the last step (Smith 2018; Page 2018).
    """
    schedules = keras.optimizers.schedules
    if name == "constant":
        return float(learning_rate)
    if name == "seed":
        return schedules.InverseTimeDecay(learning_rate, decay_steps=1, decay_rate=SEED_DECAY)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if not steps_per_epoch or not epochs:
        raise ValueError(f"the {name!r} schedule needs steps_per_epoch and epochs")
    total = int(steps_per_epoch) * int(epochs)
    if name == "onecycle":
        peak = max(1, round(total * ONECYCLE_WARMUP_FRACTION))
        return OneCycle(learning_rate, peak_step=peak, total_steps=total)
    if name == "paper":
        # Keras' boundaries are inclusive on the left value: lr(step) = values[i] for
        # boundaries[i-1] < step <= boundaries[i]; a drop "at step d" is a boundary at d - 1.
        boundaries = [d - 1 for d in paper_boundaries(total)]
        values = [learning_rate * PAPER_DROP_FACTOR**i for i in range(len(boundaries) + 1)]
        return schedules.PiecewiseConstantDecay(boundaries, values)
    warmup = round(total * COSINE_WARMUP_FRACTION)
    if warmup == 0:
        return schedules.CosineDecay(learning_rate, decay_steps=total)
    return schedules.CosineDecay(0.0, decay_steps=max(1, total - warmup),
                                 warmup_target=learning_rate, warmup_steps=warmup)


@keras.saving.register_keras_serializable(package="allcnn")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Piecewise linear: 0 at step 0, ``peak`` at ``peak_step``, 0 at ``total_steps``."""

    def __init__(self, peak: float, peak_step: int, total_steps: int) -> None:
        self.peak, self.peak_step, self.total_steps = float(peak), int(peak_step), int(total_steps)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        up = step / self.peak_step
        down = (self.total_steps - step) / max(1, self.total_steps - self.peak_step)
        return self.peak * keras.ops.clip(keras.ops.minimum(up, down), 0.0, 1.0)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "peak_step": self.peak_step, "total_steps": self.total_steps}


def make_optimizer(name: str, *, learning_rate: float | None = None, rho: float = 0.9,
                   schedule: str | None = None, steps_per_epoch: int | None = None,
                   epochs: int | None = None, ema: bool = False) -> keras.optimizers.Optimizer:
    """One of the course's optimizers, with its learning-rate schedule.

    - ``"sgd"``: lr 0.01, momentum 0.9, Nesterov (the seed's optimizer; the paper uses plain
      momentum 0.9 with lr in {0.25, 0.1, 0.05, 0.01}). Its Keras-2 ``decay=1e-6`` is the
      ``"seed"`` schedule.
    - ``"rmsprop"``: lr 0.001, ``rho`` 0.9. RMSprop divides the gradient by the root of a moving
      average of squared gradients, ``v = rho v + (1 - rho) g^2``. With ``rho=0.0`` that average
      is just the last squared gradient, so the step is ``lr g / |g|``: a sign-like step of size
      lr for every weight, however small its gradient. It ignores gradient magnitudes and makes
      training unstable; the seed ran it that way, the course shows why not to.
    - ``"adam"``: lr 0.001.

    ``schedule`` (``make_schedule``): ``"constant"`` (default), ``"paper"``, ``"cosine"`` or
    ``"seed"``; ``"paper"`` and ``"cosine"`` need ``steps_per_epoch`` and ``epochs``.
    ``ema``: keep an exponential moving average of the weights (Keras' ``use_ema``, momentum
    ``EMA_MOMENTUM``); ``fit`` copies it into the model when training ends.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    lr = DEFAULT_LEARNING_RATES[name] if learning_rate is None else float(learning_rate)
    rate = make_schedule(schedule or "constant", lr, steps_per_epoch=steps_per_epoch,
                         epochs=epochs)
    averaging = {"use_ema": True, "ema_momentum": EMA_MOMENTUM} if ema else {}
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=rate, momentum=0.9, nesterov=True, **averaging)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=rate, rho=float(rho), **averaging)
    return keras.optimizers.Adam(learning_rate=rate, **averaging)


def current_learning_rate(optimizer: keras.optimizers.Optimizer, step: int | None = None) -> float:
    """The learning rate the optimizer uses at ``step`` (default: its next step)."""
    rate = optimizer._learning_rate  # the schedule itself, not its value at `iterations`
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        if step is None:
            step = int(keras.ops.convert_to_numpy(optimizer.iterations))
        return float(keras.ops.convert_to_numpy(rate(step)))
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


# --------------------------------------------------------------------------- input pipeline


def scale_to_unit(images: tf.Tensor) -> tf.Tensor:
    """uint8 images to float32 in [0, 1] (the default preprocessing)."""
    return tf.cast(images, tf.float32) / 255.0


def _pipeline_options() -> tf.data.Options:
    options = tf.data.Options()
    # Autotune's background threads made model.fit/predict block for seconds at the end of a
    # call on this kind of machine (CPU idle, in TF's pipeline clean-up); fixed parallelism and
    # a fixed prefetch buffer do not.
    options.autotune.enabled = False
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def make_dataset(x: np.ndarray, y: np.ndarray | None = None, batch_size: int = 128, *,
                 training: bool = False, augment: bool = False, seed: int = 0,
                 preprocess: Callable[[tf.Tensor], tf.Tensor] | None = None,
                 num_classes: int | None = None, max_shift: int | float = MAX_SHIFT,
                 shift_fill: str = "zero", drop_remainder: bool | None = None,
                 repeat: bool = False) -> tf.data.Dataset:
    """A ``tf.data`` pipeline over uint8 NHWC images (and int labels) for fit/evaluate/predict.

    In order: shuffle (``training``; the whole set, reshuffled every epoch, seeded), batch,
    uint8 -> float32 with ``preprocess`` (a function of a uint8 batch; default: /255), random
    shifts of up to ``max_shift`` (a fraction of the side, or int pixels) with the border
    filled by zeros or, ``shift_fill="reflect"``, by mirroring, and horizontal flips
    (``augment``; seeded, different every epoch), one-hot labels (``num_classes``; for label
    smoothing), and a prefetch of ``PREFETCH_BATCHES`` batches. Autotune is off and the order
    deterministic.
    ``drop_remainder`` defaults to ``training`` (every training batch full: the per-batch log
    then holds exact per-batch values). ``repeat``: an endless stream (reshuffled on every
    pass, batches crossing the passes) for ``fit(steps_per_epoch=...)``.
    """
    preprocess = preprocess or scale_to_unit
    n = len(x)
    if drop_remainder is None:
        drop_remainder = training and n >= batch_size
    ds = tf.data.Dataset.from_tensor_slices((x, y) if y is not None else (x,))
    if training:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)

    ds = ds.map(lambda *batch: (preprocess(batch[0]), *batch[1:]))
    if augment:
        # Stateless shifts and flips with one seed per batch from Dataset.random(seed): the
        # same in every run, different in every epoch (allcnn_lib.preprocessing).
        ds = augment_dataset(ds, max_shift=max_shift, seed=seed,
                             fill_value="reflect" if shift_fill == "reflect" else 0)
    if y is not None and num_classes:
        ds = ds.map(lambda images, labels: (images, tf.one_hot(labels, num_classes)))
    if y is None:
        ds = ds.map(lambda images: images)
    return ds.prefetch(PREFETCH_BATCHES).with_options(_pipeline_options())


# --------------------------------------------------------------------------- atomic files


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh, unused name beside ``path`` that keeps its ``.weights.h5``/``.keras`` ending."""
    path = Path(path)
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix
    return path.with_name(f".{path.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}{suffix}")


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


#: Free space ``atomic_path`` keeps in reserve beyond a file's expected size (CSV rows, config).
SPACE_MARGIN = 1 << 20


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class DiskFullError(OSError):
    """No space left on the device for a file; the previous version of the file is kept.

    Its message is one line that names the file, the space needed and the space free.
    """

    def __init__(self, path: str | os.PathLike, needed: int | None, free: int | None) -> None:
        self.path = Path(path)
        need = f"needs about {_megabytes(needed)}, " if needed else ""
        have = f"{_megabytes(free)} free" if free is not None else "the disk is full"
        super().__init__(errno.ENOSPC, f"no space left on device for {path} ({need}{have}); "
                                       "the previous checkpoint is kept: free some space, then "
                                       "run the same command again to resume")

    def __str__(self) -> str:
        return str(self.strerror)


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free bytes on the device that holds ``folder`` (its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(err: BaseException) -> bool:
    """True for an ENOSPC failure, also as HDF5 reports it (a RuntimeError naming errno 28)."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    return isinstance(err, (OSError, RuntimeError)) and (
        "No space left on device" in str(err) or "errno = 28" in str(err))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size_hint: int | None = None) -> Iterator[Path]:
    """A temporary path beside ``path``; once written it is fsynced and moved onto ``path``.

    ``os.replace`` within one folder is atomic: readers see the old file or the new one, never
    half of one. If the body raises, or writes nothing, ``path`` is left as it was and the
    temporary file is removed.

    A full disk is ``DiskFullError``: at once when ``size_hint`` bytes (plus ``SPACE_MARGIN``)
    are not free, else when a write fails with ENOSPC. In that case the half-written file is
    first cut to nothing, so that HDF5 can close it cleanly (left full, its clean-up at exit
    ended the process with a segmentation fault).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if size_hint is not None:
        free = free_bytes(path.parent)
        if free is not None and free < size_hint + SPACE_MARGIN:
            raise DiskFullError(path, size_hint + SPACE_MARGIN, free)
    tmp = temporary_path(path)
    full: DiskFullError | None = None
    try:
        yield tmp
        if tmp.exists():
            _fsync(tmp)
            os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if isinstance(err, DiskFullError) or not is_disk_full(err):
            raise
        with contextlib.suppress(OSError):
            os.truncate(tmp, 0)  # while HDF5's objects still live (they are in err's frames)
        full = DiskFullError(path, size_hint or (path.stat().st_size if path.is_file() else None),
                             free_bytes(path.parent))
    finally:
        tmp.unlink(missing_ok=True)
    if full is not None:  # raised here, once err and its frames are gone
        gc.collect()  # HDF5 closes its half-written file now, into the space just freed
        raise full


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files ``atomic_path`` left behind in ``folder`` (after a SIGKILL)."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(f".*{_TMP_MARK}*"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# --------------------------------------------------------------------------- checkpoints


class WeightsMismatchError(ValueError):
    """A weights file that does not fit the model it is loaded into (one-line message)."""


@dataclass(frozen=True)
class WeightsSummary:
    """What a Keras 3 ``.weights.h5`` file holds: the model's name and each layer's shapes."""

    path: Path
    model_name: str | None
    layers: dict[str, tuple[tuple[int, ...], ...]]  # layers with weights: name -> shapes
    layer_names: frozenset[str]  # every layer recorded, weightless ones too

    @property
    def params(self) -> int:
        return sum(math.prod(s) for shapes in self.layers.values() for s in shapes)


def read_weights_summary(path: str | os.PathLike) -> WeightsSummary:
    """Inspect a ``.weights.h5`` file written by ``model.save_weights`` (h5py; no model)."""
    import h5py

    path = Path(path)
    layers: dict[str, tuple[tuple[int, ...], ...]] = {}
    names: set[str] = set()
    try:
        with h5py.File(path, "r") as f:
            root = f.get("vars")
            model_name = root.attrs.get("name") if root is not None else None
            group = f.get("layers")
            for key in group if group is not None else ():
                vars_group = group[key].get("vars")
                if vars_group is None:
                    continue
                name = str(vars_group.attrs.get("name", key))
                names.add(name)
                shapes = tuple(tuple(vars_group[k].shape)
                               for k in sorted(vars_group, key=lambda k: int(k)))
                if shapes:
                    layers[name] = shapes
    except (OSError, KeyError, ValueError) as err:
        raise WeightsMismatchError(f"{path}: not a readable Keras .weights.h5 file "
                                   f"({type(err).__name__}: {err})") from None
    if isinstance(model_name, bytes):
        model_name = model_name.decode()
    return WeightsSummary(path, model_name and str(model_name), layers, frozenset(names))


def model_summary(model: keras.Model) -> WeightsSummary:
    """The same summary as ``read_weights_summary`` for a built model."""
    layers = {layer.name: tuple(tuple(int(d) for d in w.shape) for w in layer.weights)
              for layer in model.layers if layer.weights}
    names = frozenset(layer.name for layer in model.layers)
    return WeightsSummary(Path(), model.name, layers, names)


def _arch_of(model_name: str | None) -> str | None:
    return next((k for k, v in MODEL_NAMES.items() if v == model_name), None)


def _describe(s: WeightsSummary) -> str:
    bn = " with batch norm" if any(n.startswith("bn") for n in s.layers) else ""
    return f"{s.model_name or 'an unnamed model'}{bn} ({s.params:,} params)"


def check_weights(model: keras.Model, path: str | os.PathLike) -> WeightsSummary:
    """Check that ``path`` holds weights for ``model``; else raise ``WeightsMismatchError``.

    The message names both networks and the flag that fixes it, e.g. ``best.weights.h5 holds
    weights for strided_cnn_c (954,730 params) but the model is all_cnn_c (1,369,738 params);
    pass --arch strided``. Model-C and Strided-CNN-C have identically shaped weights, so the
    model name stored in the file is compared too.
    """
    path = Path(path)
    saved = read_weights_summary(path)
    want = model_summary(model)
    if saved.layers == want.layers and (saved.model_name in (None, want.model_name)):
        return saved
    flags = []
    arch = _arch_of(saved.model_name)
    if saved.model_name != want.model_name and arch:
        flags.append(f"--arch {arch}")
    saved_bn = any(n.startswith("bn") for n in saved.layers)
    if saved_bn != any(n.startswith("bn") for n in want.layers):
        flags.append("--bn 1" if saved_bn else "--bn 0")
    if flags:
        fix = f"pass {' '.join(flags)}"
    else:
        differ = sorted(set(saved.layers) ^ set(want.layers)) or sorted(
            n for n in saved.layers if saved.layers[n] != want.layers.get(n))
        fix = f"the layers {', '.join(differ[:4])} differ"
    raise WeightsMismatchError(f"{path.name} holds weights for {_describe(saved)} but the model "
                               f"is {_describe(want)}; {fix}")


def load_weights(model: keras.Model, path: str | os.PathLike) -> keras.Model:
    """``model.load_weights(path)`` after ``check_weights``; a missing file is one clear error.

    Keras files each layer under its *class* name (``layers/batch_normalization_3``), so weights
    saved from stock ``BatchNormalization`` layers do not load into the course's
    ``FusedBatchNormalization`` (or back): ``check_weights`` has matched every layer by the name
    the file records, so the weights are then set layer by layer from those names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    check_weights(model, path)
    try:
        with warnings.catch_warnings():  # a failed load warns about each layer it skipped
            warnings.simplefilter("ignore")
            model.load_weights(path)
    except ValueError:
        import h5py

        with h5py.File(path, "r") as f:
            saved = {str(g["vars"].attrs["name"]): g["vars"] for g in f["layers"].values()
                     if "vars" in g}
            for layer in model.layers:
                if layer.weights:
                    found = saved[layer.name]
                    layer.set_weights([found[str(i)][()] for i in range(len(found))])
    return model


def finite_state(model: keras.Model, logs: Mapping[str, Any] | None = None) -> bool:
    """True when the epoch's losses in ``logs`` and every weight of ``model`` are finite."""
    for key in ("loss", "val_loss"):
        if logs and key in logs and not math.isfinite(float(logs[key])):
            return False
    return all(bool(np.isfinite(keras.ops.convert_to_numpy(w)).all()) for w in model.weights)


def checkpoint_bytes(model: keras.Model, path: str | os.PathLike | None = None) -> int:
    """About how large a ``.weights.h5`` checkpoint of ``model`` is (its variables, the
    optimizer's included, plus HDF5's overhead); at least the size of ``path`` if it exists."""
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)  # an uncompiled model has none
    if optimizer is not None and optimizer.built:
        variables += list(optimizer.variables)
    size = int(sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables) * 1.05)
    size += 256 * 1024
    if path is not None and Path(path).is_file():
        size = max(size, Path(path).stat().st_size)
    return size


class CheckpointGuard:
    """Shared by a run's checkpoint callbacks, so that a broken state never replaces a good
    checkpoint: an epoch with a non-finite loss or weight (a diverged run) is not saved, and
    after a full disk nothing more is written. Either stops the training."""

    def __init__(self) -> None:
        self.nonfinite_epoch: int | None = None  # the first diverged epoch, counted from 0
        self.disk_full: DiskFullError | None = None

    @property
    def stopped(self) -> bool:
        return self.nonfinite_epoch is not None or self.disk_full is not None

    def allows(self, model: keras.Model, epoch: int, logs: Mapping[str, Any] | None) -> bool:
        """May the state at the end of ``epoch`` be saved? (Stops the training when not.)"""
        if self.disk_full is not None:
            return False
        if self.nonfinite_epoch is None and not finite_state(model, logs):
            self.nonfinite_epoch = epoch
        if self.nonfinite_epoch is not None:
            model.stop_training = True
            return False
        return True

    def out_of_space(self, model: keras.Model, err: DiskFullError) -> None:
        self.disk_full = err
        model.stop_training = True


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``keras.callbacks.ModelCheckpoint`` whose file appears atomically, and never from a
    diverged state or onto a full disk (``CheckpointGuard``).

    Keras writes the checkpoint in place, so a crash mid-write leaves a broken file where the
    last good one was. Here Keras writes to a temporary name beside the target, which then
    replaces the target with ``os.replace`` (``atomic_path``); when Keras decides not to save
    (no improvement), nothing changes. An epoch with a NaN loss or weight is not saved (and
    stops training); so is one whose checkpoint would not fit on the disk (``DiskFullError``
    in ``guard.disk_full``; the previous checkpoint stays).
    """

    _tmp_target: Path | None = None
    _target: Path | None = None

    def __init__(self, *args: Any, guard: CheckpointGuard | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard or CheckpointGuard()

    def _get_file_path(self, epoch, batch, logs):  # Keras hook: where to write
        if self._tmp_target is not None:
            return str(self._tmp_target)
        return super()._get_file_path(epoch, batch, logs)

    def _should_save_model(self, epoch, batch, logs, filepath):  # Keras hook: decide
        if not self.guard.allows(self.model, epoch, logs):
            return False
        if not super()._should_save_model(epoch, batch, logs, filepath):
            return False
        needed = checkpoint_bytes(self.model, self._target) + SPACE_MARGIN
        free = free_bytes(self._target.parent)
        if free is not None and free < needed:
            raise DiskFullError(self._target, needed, free)
        return True

    def _save_model(self, epoch, batch, logs):  # Keras hook: decide and write
        if self.guard.stopped:
            return
        self._target = Path(super()._get_file_path(epoch, batch, logs))
        try:
            with atomic_path(self._target) as tmp:
                self._tmp_target = tmp
                try:
                    super()._save_model(epoch, batch, logs)
                finally:
                    self._tmp_target = None
        except DiskFullError as err:
            self.guard.out_of_space(self.model, err)


_EPOCH_ATTR = "allcnn_completed_epochs"


_SEED_STATES = "allcnn_seed_states"


def seed_states(model: keras.Model) -> list[keras.Variable]:
    """The state variables of the model's random seed generators (dropout's): not weights, so
    ``save_weights`` leaves them out, but a resumed run needs them to draw the same masks."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``keras.callbacks.BackupAndRestore`` with an atomic, self-describing, never-poisoned
    backup.

    The weights (and optimizer state, and the dropout layers' seed-generator states) go to a
    temporary file that also records the number of completed epochs as an HDF5 attribute, and
    only then replace the previous backup; the epoch therefore always matches the weights, even
    when the process dies between two files. An epoch with a NaN loss or weight is not backed
    up, nor one after a full disk (``CheckpointGuard``); a run that a full disk stopped keeps
    its backup, so that the same command resumes it.
    """

    def __init__(self, backup_dir: str, *args: Any, guard: CheckpointGuard | None = None,
                 **kwargs: Any) -> None:
        super().__init__(backup_dir, *args, **kwargs)
        self.guard = guard or CheckpointGuard()

    def on_epoch_end(self, epoch, logs=None):  # noqa: D102 (Keras hook)
        if not self.guard.allows(self.model, epoch, logs):
            return
        try:
            super().on_epoch_end(epoch, logs)
        except DiskFullError as err:
            self.guard.out_of_space(self.model, err)

    def on_train_end(self, logs=None):  # noqa: D102 (Keras hook)
        if self.guard.disk_full is None:
            super().on_train_end(logs)

    def _save_model(self):  # noqa: D102 (Keras hook)
        os.makedirs(self.backup_dir, exist_ok=True)
        import h5py

        size = checkpoint_bytes(self.model, self._weights_path)
        with atomic_path(self._weights_path, size_hint=size) as tmp:
            self.model.save_weights(str(tmp), overwrite=True)
            with h5py.File(tmp, "a") as f:
                f.attrs[_EPOCH_ATTR] = int(self._current_epoch)
                group = f.create_group(_SEED_STATES)
                for i, state in enumerate(seed_states(self.model)):
                    group[str(i)] = keras.ops.convert_to_numpy(state)
        atomic_write_text(self._training_metadata_path, json.dumps(
            {"epoch": self._current_epoch, "batch": self._last_batch_seen}))

    def _load_model(self):  # noqa: D102 (Keras hook)
        super()._load_model()
        epoch = backup_epoch(self.backup_dir)
        if epoch:
            self.model._initial_epoch = epoch
        weights = Path(self._weights_path)
        if not weights.is_file():
            return
        import h5py

        with h5py.File(weights, "r") as f:
            group = f.get(_SEED_STATES)
            states = seed_states(self.model)
            if group is not None and len(group) == len(states):
                for i, state in enumerate(states):
                    state.assign(group[str(i)][()])


def backup_epoch(backup_dir: str | os.PathLike) -> int:
    """Completed epochs recorded in a ``AtomicBackupAndRestore`` backup (0 when none)."""
    import h5py

    weights = Path(backup_dir) / "latest.weights.h5"
    if not weights.is_file():
        return 0
    try:
        with h5py.File(weights, "r") as f:
            if _EPOCH_ATTR in f.attrs:
                return int(f.attrs[_EPOCH_ATTR])
    except OSError:
        return 0
    meta = Path(backup_dir) / "training_metadata.json"
    if meta.is_file():
        return int(json.loads(meta.read_text()).get("epoch", 0))
    return 0


# --------------------------------------------------------------------------- callbacks


class EpochInfo(keras.callbacks.Callback):
    """Adds ``time`` (seconds) and ``learning_rate`` (of the epoch's last step) to epoch logs.

    Put it before the loggers: callbacks share one logs dict, so they all see both values.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["time"] = round(time.perf_counter() - self._start, 3)
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) - 1
            logs["learning_rate"] = current_learning_rate(self.model.optimizer, max(step, 0))


class BatchCSVLogger(keras.callbacks.Callback):
    """One CSV row per training batch (``BATCH_COLUMNS``), appended and flushed as it goes.

    Keras reports running means over the epoch; ``loss`` and ``accuracy`` here are the values of
    the batch alone, recovered from two successive means (exact for equal batch sizes, which
    ``make_dataset(training=True)`` guarantees). ``step`` counts batches from the run's start.
    A file that already has rows is appended to (``truncate_csv`` cuts it back on resume).
    """

    def __init__(self, filename: str | os.PathLike) -> None:
        super().__init__()
        self.filename = Path(filename)
        self._file = None
        self._writer = None

    def on_train_begin(self, logs=None):
        new = not self.filename.is_file() or self.filename.stat().st_size == 0
        self._file = open(self.filename, "a", newline="")  # closed in on_train_end
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(BATCH_COLUMNS)
            self._file.flush()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._prev = (0.0, 0.0)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        steps = self.params.get("steps") or 0
        loss = float(logs.get("loss", math.nan))
        acc = float(logs.get("accuracy", math.nan))
        prev_loss, prev_acc = self._prev
        batch_loss = (batch + 1) * loss - batch * prev_loss
        batch_acc = (batch + 1) * acc - batch * prev_acc
        self._prev = (loss, acc)
        step = self._epoch * steps + batch
        lr = current_learning_rate(self.model.optimizer, step)
        self._writer.writerow([self._epoch, batch, step, f"{batch_loss:.6g}",
                               f"{min(max(batch_acc, 0.0), 1.0):.6g}", f"{loss:.6g}",
                               f"{acc:.6g}", f"{lr:.6g}"])
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None


class EpochLogger(keras.callbacks.Callback):
    """A quiet one-line-per-epoch log for notebooks and log files, in a fixed format::

        epoch 3/10  loss 1.234  acc 0.456  val_loss 1.300  val_acc 0.420  12.3 s
    """

    def __init__(self, stream=None) -> None:
        super().__init__()
        self.stream = stream

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        print(format_epoch_line(epoch, self.params.get("epochs"), logs or {},
                                time.perf_counter() - self._start),
              file=self.stream or sys.stdout, flush=True)


def format_epoch_line(epoch: int, epochs: int | None, logs: Mapping[str, float],
                      seconds: float | None = None) -> str:
    """``epoch 3/10  loss 1.234  acc 0.456  val_loss 1.300  val_acc 0.420  12.3 s``."""
    parts = [f"epoch {epoch + 1}/{epochs}" if epochs else f"epoch {epoch + 1}"]
    for key, label in (("loss", "loss"), ("accuracy", "acc"), ("val_loss", "val_loss"),
                       ("val_accuracy", "val_acc")):
        if key in logs:
            parts.append(f"{label} {float(logs[key]):.3f}")
    seconds = logs.get("time", seconds)
    if seconds is not None:
        parts.append(f"{float(seconds):.1f} s")
    return "  ".join(parts)


# --------------------------------------------------------------------------- CSV files


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts of strings ([] when absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def truncate_csv(path: str | os.PathLike, epochs: int) -> int:
    """Keep only rows with ``epoch < epochs`` (and well-formed); returns the rows kept.

    Called at start-up, before the loggers append: a run resumed at epoch ``epochs`` then
    writes every later epoch exactly once, and a fresh run (``epochs=0``) starts empty.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return 0
    header, body = rows[0], rows[1:]
    keep = [r for r in body if len(r) == len(header) and r[0].lstrip("-").isdigit()
            and int(r[0]) < epochs]
    if epochs == 0:
        path.unlink()
        return 0
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(keep)
    return len(keep)


def read_history(path: str | os.PathLike) -> dict[str, list[float]]:
    """``history.csv`` as columns of floats (``epoch`` included, counted from 0)."""
    rows = read_csv(path)
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                columns.setdefault(key, []).append(math.nan)
    return columns


# --------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as the run's ``config.json``.

    ``zca`` applies the paper's preprocessing, global contrast normalization (L2 norm 55)
    then ZCA whitening with ``zca_epsilon``, fitted on the training split (``fit_zca``).
    ``init`` is an initializer name (``INITIALIZERS``); ``"lsuv"`` starts from orthogonal
    weights and applies LSUV (Mishkin & Matas 2015, Algorithm 1) on one training batch.
    ``learning_rate=None`` takes the optimizer's default (``DEFAULT_LEARNING_RATES``).
    ``normalize`` standardizes each channel with the training split's mean and std (the simpler
    alternative to ``zca``; not both). ``steps_per_epoch`` makes an "epoch" that many batches of
    an endless reshuffled stream (validation after each), e.g. 10 x 300 batches for a budget of
    3,000; ``None``: one pass over the training split.
    ``limit`` keeps a class-balanced subset of the training pool (``load_cifar10``).
    ``backup_dir=None`` means ``~/.cache/allcnn/backup/<run id>``. ``verbose=None`` shows
    Keras' progress bar when stdout is a terminal and ``EpochLogger`` lines otherwise.
    ``initial_weights`` starts from a ``.weights.h5`` file (the seed's ``-retrain``).
    ``bn_momentum``: decay of batch norm's moving mean and variance (Keras' default 0.99
    averages over ~100 steps, over an epoch at batch 512).
    The fast recipe's switches (``RECIPES``): ``class_relu`` (the ReLU on conv9),
    ``max_shift``/``shift_fill`` (translation and its border), ``whiten_init`` (conv1 from
    ``initializers.whiten_first_conv``), ``ema`` (average of the weights, batch norm
    re-estimated under it at the end), ``train_on`` (``TRAIN_ON``), ``tta_flip``/``tta_shift``
    (test-time augmentation of the final validation, and of ``allcnn evaluate``), ``recipe``
    (the preset's name, for the record).
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
    zca_epsilon: float = PAPER_ZCA_EPSILON
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

    def __post_init__(self) -> None:
        for name, value, choices in (("arch", self.arch, tuple(ARCHITECTURES)),
                                     ("init", self.init, INITIALIZERS),
                                     ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("schedule", self.schedule, SCHEDULES),
                                     ("distribute", self.distribute, DISTRIBUTE),
                                     ("shift_fill", self.shift_fill, SHIFT_FILLS),
                                     ("train_on", self.train_on, TRAIN_ON)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.normalize and self.zca:
            raise ValueError("choose one preprocessing: normalize (per-channel) or zca, not both")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of "
                             f"{', '.join(RECIPES)}")
        if self.tta_shift < 0:
            raise ValueError(f"tta_shift must be >= 0, got {self.tta_shift}")
        if self.run_id is None:
            self.run_id = f"{self.arch}_{self.init}_{self.optimizer}_seed{self.seed}"
        if not self.run_id or "/" in self.run_id or self.run_id in (".", ".."):
            raise ValueError(f"run id {self.run_id!r} must be a plain folder name")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / str(self.run_id)

    def resolved_backup_dir(self) -> Path:
        if self.backup_dir:
            return Path(self.backup_dir)
        return Path.home() / ".cache" / "allcnn" / "backup" / str(self.run_id)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a backup must share with a run to be resumed by it."""
        d = self.to_dict()
        for volatile in ("verbose", "backup_dir", "runs_dir", "data_dir", "initial_weights"):
            d.pop(volatile)
        d["run_dir"] = str(self.run_dir.resolve())
        return d


@dataclass
class TrainResult:
    """What ``train`` returns: the run folder, the model (last epoch's weights) and history."""

    run_dir: Path
    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int | None  # counted from 0, as in history.csv
    best_val_accuracy: float | None
    initial_epoch: int  # > 0 when resumed from a backup
    epochs_completed: int
    terminated_on_nan: bool
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)

    def __repr__(self) -> str:
        best = (f"best val_accuracy {self.best_val_accuracy:.4f} at epoch {self.best_epoch + 1}"
                if self.best_epoch is not None else "no validation" if "val_accuracy" not in
                self.history else "no epoch with finite losses")
        return (f"TrainResult({self.run_dir}: {self.epochs_completed} epochs, {best}, "
                f"{self.seconds:.1f} s)")


# --------------------------------------------------------------------------- training


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """``keras.utils.set_random_seed`` plus TensorFlow's op determinism (CPU: bit-identical).

    Op determinism stays on for the rest of the process (TensorFlow cannot turn it off again)
    and disables XLA in ``model.fit`` (``jit_compile="auto"``).
    """
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def fit_zca(x_train: np.ndarray, epsilon: float, scale: float = PAPER_GCN_SCALE
            ) -> ZCAWhitening:
    """The paper's whitening fitted on the training images: GCN(``scale``), then ZCA.

    Springenberg et al. (Sec. 3.2) follow Goodfellow et al. (2013): global contrast
    normalization to an L2 norm of 55 per image, then ZCA with ``epsilon`` (0.1) added to the
    covariance's eigenvalues (``allcnn_lib.preprocessing``).
    """
    return ZCAWhitening(epsilon=epsilon).fit(global_contrast_normalize(x_train, scale))


def gcn_zca_preprocess(zca: ZCAWhitening, scale: float = PAPER_GCN_SCALE
                       ) -> Callable[[tf.Tensor], tf.Tensor]:
    """A pipeline ``preprocess`` doing GCN(``scale``) and a fitted ZCA in TensorFlow.

    Per image: subtract its mean, divide by ``sqrt(sum(c^2)) / scale`` (by 1 when that is
    below 1e-8, as pylearn2), then ``(v - mean) @ W.T`` with the training mean and whitening
    matrix; the same numbers as ``zca.transform(global_contrast_normalize(x, scale))``.
    """
    mean = tf.constant(np.asarray(zca.mean_, np.float32)[None, :])
    w_t = tf.constant(np.ascontiguousarray(np.asarray(zca.whitening_matrix_, np.float32).T))

    def preprocess(images: tf.Tensor) -> tf.Tensor:
        flat = tf.reshape(tf.cast(images, tf.float32), (tf.shape(images)[0], -1))
        centred = flat - tf.reduce_mean(flat, axis=1, keepdims=True)
        divisor = tf.sqrt(tf.reduce_sum(tf.square(centred), axis=1, keepdims=True)) / scale
        divisor = tf.where(divisor < 1e-8, tf.ones_like(divisor), divisor)
        return tf.reshape(tf.matmul(centred / divisor - mean, w_t), tf.shape(images))

    return preprocess


def standardize_preprocess(standardizer: Standardizer) -> Callable[[tf.Tensor], tf.Tensor]:
    """A pipeline ``preprocess``: uint8 images to ``(x - mean) / std`` per channel, with the
    statistics a ``Standardizer`` fitted on the (uint8) training images."""
    mean = tf.constant(np.asarray(standardizer.mean_, np.float32))
    std = tf.constant(np.asarray(standardizer.std_, np.float32))

    def preprocess(images: tf.Tensor) -> tf.Tensor:
        return (tf.cast(images, tf.float32) - mean) / std

    return preprocess


#: Training images whose 3x3 patches ``whiten_init`` samples (``initializers.whiten_first_conv``).
WHITENING_IMAGES = 5000


def recalibrate_batch_norm(model: keras.Model, dataset: tf.data.Dataset,
                           batches: int = BN_RECALIBRATION_BATCHES) -> int:
    """Re-estimate every ``BatchNormalization`` layer's moving mean and variance as the plain
    average over ``batches`` training batches, for the weights the model has now (e.g. after
    the EMA of the weights replaced them: the moving statistics were gathered under the raw
    weights). Returns the batches used."""
    layers = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    if not layers:
        return 0
    saved = [la.momentum for la in layers]
    used = 0
    try:
        for used, element in enumerate(dataset.take(batches), 1):
            for layer in layers:  # momentum (k-1)/k: the running mean of the k batches so far
                layer.momentum = (used - 1) / used
            model(element[0], training=True)
    finally:
        for layer, momentum in zip(layers, saved, strict=True):
            layer.momentum = momentum
    return used


def _finish_run(config: TrainConfig, model: keras.Model, train_ds: tf.data.Dataset,
                data: CIFAR10, preprocess: Callable[[tf.Tensor], tf.Tensor], last: Path,
                steps_per_epoch: int) -> dict[str, Any]:
    """After the last epoch: with ``ema``, the averaged weights (which ``fit`` put in the model)
    get batch-norm statistics of their own and become ``last.weights.h5``; then the final
    weights are scored on the validation split, plain and with the run's test-time
    augmentation. Returns those figures for ``config.json``."""
    from allcnn_lib.evaluation import evaluate

    final: dict[str, Any] = {}
    has_val = len(data.y_val) > 0

    def score(**tta: Any) -> float:
        return evaluate(model, data.x_val, data.y_val, 512, preprocess=preprocess,
                        **tta).accuracy

    if config.ema:
        if has_val:
            final["val_accuracy_ema_stale_bn"] = score()
        final["bn_recalibration_batches"] = recalibrate_batch_norm(model, train_ds)
        with atomic_path(last) as tmp:
            model.save_weights(tmp)
    if has_val:
        final["val_accuracy"] = score()
        if config.tta_flip or config.tta_shift:
            final["val_accuracy_tta"] = score(flip=config.tta_flip, shift=config.tta_shift)
    return final


#: Training images LSUV calibrates on (Mishkin & Matas use one mini-batch; 256 gives a steadier
#: variance estimate than a batch of 32: LSUV on All-CNN-C takes 0.5 s on a 2-core AVX-512 CPU,
#: 2.1 s on an AVX2 one, docs/performance.md).
LSUV_IMAGES = 256


def base_initializer(init: str) -> str:
    """The Keras initializer a model for ``init`` is built with: LSUV starts from orthogonal."""
    return "orthogonal" if init == "lsuv" else init


def finish_initialization(model: keras.Model, init: str, x_train: np.ndarray, *, seed: int = 0,
                          preprocess: Callable[[tf.Tensor], tf.Tensor] | None = None,
                          images: int = LSUV_IMAGES) -> keras.Model:
    """Complete ``init`` on a model built with ``base_initializer(init)``: for ``"lsuv"``, LSUV
    on ``images`` training images (shuffled with ``seed``, through ``preprocess``, no
    augmentation); other initializers are complete already. The one path ``train`` and
    ``experiments.train_briefly`` share. Returns the model."""
    if init != "lsuv":
        return model
    from allcnn_lib.initializers import lsuv

    # Without labels, make_dataset yields bare image batches; lsuv takes the tensor as it is.
    lsuv(model, next(iter(make_dataset(x_train, None, images, training=True, seed=seed,
                                       preprocess=preprocess))), seed=seed)
    return model


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``"mirrored"``: ``MirroredStrategy`` over every GPU, or, with no GPU, over every logical
    CPU device (``tf.config.set_logical_device_configuration`` splits the CPU; on a plain CPU
    that is one replica). ``"none"``: TensorFlow's default strategy."""
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=cpus)
    if name != "none":
        raise ValueError(f"unknown distribute {name!r}; choose one of {', '.join(DISTRIBUTE)}")
    return tf.distribute.get_strategy()


_PATH_FIELDS = ("data_dir", "runs_dir", "backup_dir", "initial_weights")


def _say(message: str) -> None:
    print(message, file=sys.stdout, flush=True)


def _prepare_backup(config: TrainConfig, overwrite: bool = False) -> tuple[Path, int]:
    """The backup folder and the completed epochs to resume from (0: start afresh, always so
    with ``overwrite``)."""
    backup = config.resolved_backup_dir()
    stamp = backup / "allcnn_run.json"
    fingerprint = config.fingerprint()
    if overwrite and backup.exists():
        shutil.rmtree(backup)
    remove_stale_temporaries(backup)
    if backup.exists():
        old = json.loads(stamp.read_text()) if stamp.is_file() else None
        if old != fingerprint:
            if backup_epoch(backup):
                _say(f"note: the backup in {backup} belongs to another configuration; "
                     "starting afresh")
            shutil.rmtree(backup)
    backup.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps(fingerprint, indent=1))
    return backup, backup_epoch(backup)


def _best_so_far(history_csv: Path) -> tuple[int | None, float | None]:
    """The epoch with the best validation accuracy among those with finite losses (a diverged
    epoch was never saved) and that accuracy; (None, None) when there is none."""
    history = read_history(history_csv)
    acc = np.array(history.get("val_accuracy") or [], float)
    for key in ("loss", "val_loss"):
        values = np.array(history.get(key) or [], float)
        if len(values) == len(acc):
            acc[~np.isfinite(values)] = np.nan
    if not len(acc) or np.isnan(acc).all():
        return None, None
    i = int(np.nanargmax(acc))
    return int(history["epoch"][i]), float(acc[i])


def fast_forward(dataset: tf.data.Dataset, epochs: int, steps_per_epoch: int, *,
                 repeat: bool) -> tf.data.Dataset:
    """The training pipeline as a run resumed after ``epochs`` completed epochs must see it, so
    that it shuffles and augments as the uninterrupted run did.

    A finite pipeline draws new shuffle and augmentation seeds whenever an iterator over it is
    made (``reshuffle_each_iteration``), and ``fit`` makes two in each epoch (one to read, one
    ready for the next epoch): Keras' own epoch iterator is walked through ``epochs`` epochs
    without reading a batch, which makes the same iterators. An endless pipeline (``repeat``)
    is one stream across the epochs: it skips the batches already trained on. (Under
    ``distribute="mirrored"`` the strategy copies the pipeline, so a resumed run reshuffles.)
    """
    if not epochs:
        return dataset
    if repeat:
        return dataset.skip(epochs * steps_per_epoch)
    from keras.src.backend.tensorflow.trainer import TFEpochIterator  # what fit iterates with

    walker = TFEpochIterator(x=dataset, distribute_strategy=tf.distribute.get_strategy(),
                             steps_per_execution=1)
    for _ in range(epochs):
        for _ in walker:  # yields (step, step, iterator) without reading a batch
            pass
    return dataset


def _record_status(files: dict[str, Path], meta: dict[str, Any], status: str,
                   error: BaseException | None = None) -> None:
    """Write ``status`` (and a one-line ``error``) into the run's config.json, if the disk
    lets it; a run that stops early still says why."""
    meta["run"]["status"] = status
    meta["run"]["epochs_completed"] = len(read_history(files["history"]).get("epoch", []))
    if error is not None:
        meta["run"]["error"] = " ".join(str(error).split())[:300]
    with contextlib.suppress(OSError):
        atomic_write_text(files["config"], json.dumps(meta, indent=2))


def train(config: TrainConfig, data: CIFAR10 | None = None, *,
          overwrite: bool = False) -> TrainResult:
    """Train ``config.arch`` on CIFAR-10 and write ``runs/<id>/`` (see the module docstring).

    ``data`` is a ``CIFAR10`` (``load_cifar10``); by default it is loaded from
    ``config.data_dir`` with ``config.limit`` and ``config.seed`` (the shipped sample when
    ``ALLCNN_QUICK=1``). Model selection uses the validation split; the test split is never used.
    ``overwrite``: start afresh even when a backup of this run could be resumed.

    A run that diverges stops at the first non-finite epoch, which is not saved
    (``terminated_on_nan``); a full disk stops it with ``DiskFullError`` and keeps its backup;
    Ctrl-C leaves ``status: interrupted`` in config.json. Running it again resumes from the
    last completed epoch, with the same losses as an uninterrupted run (CPU, default strategy).
    """
    start = time.perf_counter()
    seed_everything(config.seed)
    if data is None:
        data = load_cifar10(config.data_dir, limit=config.limit, seed=config.seed,
                            validation_size=0 if config.train_on == "all" else None)
    if len(data.y_train) < config.batch_size:  # before any folder is made
        raise ValueError(f"{len(data.y_train)} training images make no batch of "
                         f"{config.batch_size}; lower the batch size")
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    files = {name: run_dir / fname for name, fname in (
        ("config", CONFIG_JSON), ("history", HISTORY_CSV), ("batches", BATCHES_CSV),
        ("best", BEST_WEIGHTS), ("last", LAST_WEIGHTS))}

    backup_dir, initial_epoch = _prepare_backup(config, overwrite)
    initial_epoch = min(initial_epoch, config.epochs)
    for name in ("history", "batches"):
        truncate_csv(files[name], initial_epoch)
    if initial_epoch:
        _say(f"resuming {config.run_id} from epoch {initial_epoch + 1} "
             f"(backup in {backup_dir})")
    best_epoch, best_acc = _best_so_far(files["history"])

    # ----- preprocessing (fitted on the training split only)
    preprocess = scale_to_unit
    if config.zca:
        files["zca"] = run_dir / ZCA_FILE
        if initial_epoch and files["zca"].is_file():  # resuming: the run's own whitening
            zca = ZCAWhitening.load(files["zca"])
        else:
            zca = fit_zca(data.x_train, config.zca_epsilon)
            zca.save(files["zca"])  # atomic, like every file here
        preprocess = gcn_zca_preprocess(zca)
    elif config.normalize:
        files["standardizer"] = run_dir / STANDARDIZER_FILE
        if initial_epoch and files["standardizer"].is_file():
            standardizer = Standardizer.load(files["standardizer"])
        else:
            standardizer = Standardizer().fit(data.x_train)
            standardizer.save(files["standardizer"])
        preprocess = standardize_preprocess(standardizer)

    has_val = len(data.y_val) > 0
    num_classes = len(data.class_names)
    one_hot = num_classes if config.label_smoothing > 0 else None
    train_ds = make_dataset(data.x_train, data.y_train, config.batch_size, training=True,
                            augment=config.augment, seed=config.seed, preprocess=preprocess,
                            num_classes=one_hot, repeat=config.steps_per_epoch is not None,
                            max_shift=config.max_shift, shift_fill=config.shift_fill)
    val_ds = (make_dataset(data.x_val, data.y_val, config.batch_size, preprocess=preprocess,
                           num_classes=one_hot) if has_val else None)
    steps_per_epoch = config.steps_per_epoch or int(train_ds.cardinality().numpy())
    if len(data.y_train) < config.batch_size or steps_per_epoch < 1:
        raise ValueError(f"{len(data.y_train)} training images make no batch of "
                         f"{config.batch_size}; lower the batch size")

    previous_policy = keras.config.dtype_policy()
    if config.mixed_precision:
        keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        strategy = make_strategy(config.distribute)
        with strategy.scope():
            model = build_model(config.arch, variant=config.variant,
                                batch_norm=config.batch_norm, dropout=config.dropout,
                                initializer=base_initializer(config.init),
                                weight_decay=config.weight_decay, class_relu=config.class_relu,
                                input_shape=data.x_train.shape[1:], num_classes=num_classes)
            for layer in model.layers:  # the moving statistics' decay (Keras' default 0.99)
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = config.bn_momentum
            if not initial_epoch:  # a resumed run restores its weights from the backup
                if config.whiten_init:
                    from allcnn_lib.initializers import whiten_first_conv

                    sample = np.random.default_rng(config.seed).permutation(
                        len(data.x_train))[:WHITENING_IMAGES]
                    whiten_first_conv(model, preprocess(data.x_train[sample]).numpy(),
                                      seed=config.seed)
                finish_initialization(model, config.init, data.x_train, seed=config.seed,
                                      preprocess=preprocess)
            if config.initial_weights:
                load_weights(model, config.initial_weights)
            if one_hot:
                loss = keras.losses.CategoricalCrossentropy(
                    label_smoothing=config.label_smoothing)
                metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
            else:
                loss = keras.losses.SparseCategoricalCrossentropy()
                metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
            optimizer = make_optimizer(config.optimizer, learning_rate=config.learning_rate,
                                       rho=config.rho, schedule=config.schedule,
                                       steps_per_epoch=steps_per_epoch, epochs=config.epochs,
                                       ema=config.ema)
            model.compile(optimizer=optimizer, loss=loss, metrics=metrics)

        if not initial_epoch:
            for name in ("best", "last"):
                files[name].unlink(missing_ok=True)
        recorded = {k: portable_path(v) if k in _PATH_FIELDS and v else v
                    for k, v in config.to_dict().items()}
        meta = {**recorded, "run": {
            "model": model.name, "params": int(model.count_params()),
            "data_source": (portable_path(data.source) if Path(data.source).is_absolute()
                            else data.source), "is_sample": bool(data.is_sample),
            "train_images": int(len(data.y_train)), "validation_images": int(len(data.y_val)),
            "class_names": list(data.class_names), "steps_per_epoch": steps_per_epoch,
            "resumed_from_epoch": initial_epoch, "status": "running",
            "keras": keras.__version__, "tensorflow": tf.__version__,
            "backend": keras.backend.backend(), "replicas": strategy.num_replicas_in_sync}}
        atomic_write_text(files["config"], json.dumps(meta, indent=2))

        monitor = "val_accuracy" if has_val else "accuracy"
        verbose = sys.stdout.isatty() if config.verbose is None else bool(config.verbose)
        guard = CheckpointGuard()  # no NaN checkpoint, nothing written onto a full disk
        callbacks: list[keras.callbacks.Callback] = [
            EpochInfo(),
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.CSVLogger(str(files["history"]), append=True),
            BatchCSVLogger(files["batches"]),
            AtomicModelCheckpoint(str(files["best"]), monitor=monitor, mode="max",
                                  save_best_only=True, save_weights_only=True,
                                  initial_value_threshold=best_acc, guard=guard),
            AtomicModelCheckpoint(str(files["last"]), save_weights_only=True, guard=guard),
        ]
        if not verbose:
            callbacks.append(EpochLogger())
        # Last, so that an epoch counts as done only once its rows and checkpoints are written.
        # It keeps the backup when fit ends: a crash before config.json says "finished" must
        # still resume (train removes it below).
        callbacks.append(AtomicBackupAndRestore(str(backup_dir), save_freq="epoch",
                                                delete_checkpoint=False, guard=guard))
        # A resumed run sees the data as the uninterrupted run did (same shuffles, same
        # augmentations), and its dropout masks continue from the backup: the same losses.
        fit_ds = fast_forward(train_ds, initial_epoch, steps_per_epoch,
                              repeat=config.steps_per_epoch is not None)
        try:
            model.fit(fit_ds, validation_data=val_ds, epochs=config.epochs,
                      steps_per_epoch=config.steps_per_epoch, verbose=1 if verbose else 0,
                      callbacks=callbacks, shuffle=False)
        except KeyboardInterrupt:
            _record_status(files, meta, "interrupted")
            raise
        except Exception as err:
            _record_status(files, meta, "failed", err)
            raise
    finally:
        keras.config.set_dtype_policy(previous_policy)

    if guard.disk_full is not None:
        _record_status(files, meta, "disk_full", guard.disk_full)
        raise guard.disk_full
    history = read_history(files["history"])
    best_epoch, best_acc = _best_so_far(files["history"])
    losses = history.get("loss", [])
    nan = guard.nonfinite_epoch is not None or (bool(losses) and not math.isfinite(losses[-1]))
    completed = len(history.get("epoch", []))
    try:
        if completed >= config.epochs and not nan:
            meta["run"]["final"] = _finish_run(config, model, train_ds, data, preprocess,
                                               files["last"], steps_per_epoch)
    except KeyboardInterrupt:
        _record_status(files, meta, "interrupted")
        raise
    try:
        from allcnn_lib.plots import save_run_plots

        files.update(save_run_plots(run_dir))
    except Exception as err:  # plots are a convenience: never lose a finished run over one
        _say(f"note: could not draw the training curves ({type(err).__name__}: {err})")
    seconds = time.perf_counter() - start
    meta["run"].update(status="terminated_on_nan" if nan else "finished",
                       epochs_completed=completed, best_epoch=best_epoch,
                       best_val_accuracy=best_acc, seconds=round(seconds, 1))
    if nan:
        meta["run"]["nonfinite_epoch"] = (guard.nonfinite_epoch if guard.nonfinite_epoch
                                          is not None else completed - 1)
    atomic_write_text(files["config"], json.dumps(meta, indent=2))
    if completed >= config.epochs or nan:  # done: nothing left to resume
        shutil.rmtree(backup_dir, ignore_errors=True)
    return TrainResult(run_dir=run_dir, model=model, history=history, best_epoch=best_epoch,
                       best_val_accuracy=best_acc, initial_epoch=initial_epoch,
                       epochs_completed=completed, terminated_on_nan=nan, seconds=seconds,
                       files=files)


def load_run_config(run_dir_or_file: str | os.PathLike) -> dict[str, Any] | None:
    """The ``config.json`` of a run folder, or the one beside a weights file (None if none).

    A damaged one is a ``ValueError`` that names the file and the fix."""
    p = Path(run_dir_or_file)
    cfg = p / CONFIG_JSON if p.is_dir() else p.parent / CONFIG_JSON
    if not cfg.is_file():
        return None
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{cfg}: {config_problem(err)}; restore it, or move it away and give "
                         "the network's flags (--arch, --bn, --dropout)") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg}: holds a {type(config).__name__}, not a run's settings; "
                         "restore it, or move it away and give the network's flags "
                         "(--arch, --bn, --dropout)")
    return config


def config_problem(err: BaseException) -> str:
    """What is wrong with a config.json that failed to load, in a few words."""
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON (truncated or edited? {err.msg} at line {err.lineno})"
    if isinstance(err, UnicodeDecodeError):
        return "not a text file"
    return f"unreadable ({getattr(err, 'strerror', None) or err})"


__all__ = [
    "AtomicBackupAndRestore", "AtomicModelCheckpoint", "BatchCSVLogger", "EpochInfo",
    "EpochLogger", "TrainConfig", "TrainResult", "WeightsMismatchError", "atomic_path",
    "atomic_write_text", "backup_epoch", "check_weights", "current_learning_rate", "fit_zca",
    "format_epoch_line", "gcn_zca_preprocess", "load_run_config", "load_weights",
    "make_dataset", "make_optimizer", "make_schedule", "make_strategy", "paper_boundaries",
    "read_history", "read_weights_summary", "scale_to_unit", "seed_everything", "train",
    "truncate_csv",
]
