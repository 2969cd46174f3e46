"""Train the All-CNN family: optimizers, schedules, the tf.data pipeline, callbacks, ``train``.

``train(TrainConfig(...))`` writes one run folder (``allcnn_lib.runs``: config.json,
history.csv, batches.csv, best/last weights). Every file is written atomically. A run killed
mid-epoch and started again with the same config resumes from its last completed epoch
(``AtomicBackupAndRestore``), with the same losses as an uninterrupted run on the CPU: the
backup carries the dropout seed generators' state and ``fast_forward`` brings the input pipeline
to the epoch's shuffle and augmentation seeds. An epoch with a NaN loss or weight is never saved
(``CheckpointGuard``); a checkpoint that would not fit on the disk stops the run with
``DiskFullError`` and keeps the previous one.

The seed's ``SGD(lr=0.01, momentum=0.9, nesterov=True, decay=1e-6)`` used Keras 2's ``decay``,
which Keras 3 no longer has; ``make_optimizer("sgd", schedule="seed")`` states it explicitly as
``InverseTimeDecay(0.01, decay_steps=1, decay_rate=1e-6)``: lr_k = 0.01 / (1 + 1e-6 k).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from allcnn_lib.data import CIFAR10, load_cifar10, portable_path
from allcnn_lib.models import build_model
from allcnn_lib.preprocessing import (
    PAPER_GCN_SCALE,
    Standardizer,
    ZCAWhitening,
    augment_dataset,
    global_contrast_normalize,
)
from allcnn_lib.runs import (  # noqa: F401 (names used here and re-exported for callers)
    BATCH_COLUMNS,
    BATCHES_CSV,
    BEST_WEIGHTS,
    CONFIG_JSON,
    DEFAULT_LEARNING_RATES,
    DISTRIBUTE,
    HISTORY_CSV,
    INITIALIZERS,
    LAST_WEIGHTS,
    MAX_SHIFT,
    MODEL_NAMES,
    OPTIMIZERS,
    PATH_FIELDS,
    SCHEDULES,
    STANDARDIZER_FILE,
    ZCA_FILE,
    DiskFullError,
    TrainConfig,
    atomic_path,
    atomic_write_text,
    best_epoch,
    load_run_config,
    load_weights,
    read_columns,
    remove_stale_temporaries,
    truncate_csv,
)

#: The paper's schedule (Section 3.2): x0.1 after epochs 200, 250 and 300 of 350.
PAPER_DROP_EPOCHS = (200, 250, 300)
PAPER_EPOCHS = 350
PAPER_DROP_FACTOR = 0.1
#: Keras 2's ``decay`` of the seed's SGD.
SEED_DECAY = 1e-6
#: Share of the run spent warming up in the "cosine" schedule.
COSINE_WARMUP_FRACTION = 0.05
#: Share of the run the "onecycle" schedule spends warming up linearly from 0 to the peak.
ONECYCLE_WARMUP_FRACTION = 0.2
#: Decay of the weights' exponential moving average (``ema=True``): a horizon of ~100 steps.
EMA_MOMENTUM = 0.99
#: Training batches that re-estimate the batch-norm statistics under the averaged weights.
BN_RECALIBRATION_BATCHES = 20
#: Batches the input pipeline prepares ahead of the train step (a fixed, small buffer).
PREFETCH_BATCHES = 2
#: Training images whose 3x3 patches ``whiten_init`` samples (``initializers.whiten_first_conv``).
WHITENING_IMAGES = 5000
#: Training images LSUV calibrates on (Mishkin & Matas use one mini-batch; 256 gives a steadier
#: variance estimate: 0.5 s on a 2-core AVX-512 CPU, docs/performance.md).
LSUV_IMAGES = 256


# --------------------------------------------------------------------------- optimizers


def paper_boundaries(total_steps: int) -> list[int]:
    """Steps (from 0) at which the paper's schedule divides the rate by 10: the same fractions
    of the run as epochs 200, 250 and 300 of 350 (Sec. 3.2), rounded, strictly increasing."""
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
    """The learning-rate schedule ``name`` (``SCHEDULES``) starting from ``learning_rate``:
    ``constant`` (a float); ``seed``, the Keras-2 ``decay=1e-6``: lr / (1 + 1e-6 k); and, given
    ``steps_per_epoch`` and ``epochs``, ``paper`` (x0.1 at ``paper_boundaries``), ``cosine``
    (5% linear warm-up, then cosine to 0) and ``onecycle`` (linear up over 20%, then linear
    down to 0; Smith 2018, Page 2018)."""
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
    """``sgd`` (the seed's: momentum 0.9, Nesterov), ``rmsprop`` (``rho=0.0`` is the seed's
    unstable sign-like step) or ``adam``, at ``DEFAULT_LEARNING_RATES`` unless given, with the
    ``make_schedule`` schedule (default constant). ``ema``: Keras' average of the weights
    (``EMA_MOMENTUM``), which ``fit`` copies into the model when training ends."""
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


def learning_rate_at(optimizer: keras.optimizers.Optimizer) -> Callable[[int], float]:
    """A function of the step giving the optimizer's learning rate (from its public config)."""
    rate = optimizer.get_config()["learning_rate"]
    if not isinstance(rate, dict):
        return lambda step: float(rate)
    schedule = keras.optimizers.schedules.deserialize(rate)
    return lambda step: float(keras.ops.convert_to_numpy(schedule(step)))


def current_learning_rate(optimizer: keras.optimizers.Optimizer, step: int | None = None) -> float:
    """The learning rate the optimizer uses at ``step`` (default: its next step)."""
    if step is None:
        step = int(keras.ops.convert_to_numpy(optimizer.iterations))
    return learning_rate_at(optimizer)(step)


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



# --------------------------------------------------------------------------- checkpoints


def finite_state(model: keras.Model, logs: Mapping[str, Any] | None = None) -> bool:
    """True when the epoch's losses in ``logs`` and every weight of ``model`` are finite."""
    for key in ("loss", "val_loss"):
        if logs and key in logs and not math.isfinite(float(logs[key])):
            return False
    return all(bool(np.isfinite(keras.ops.convert_to_numpy(w)).all()) for w in model.weights)


def checkpoint_bytes(model: keras.Model, path: str | Path | None = None) -> int:
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
    checkpoint: an epoch with a non-finite loss or weight is not saved, and after a full disk
    nothing more is written. Either stops the training."""

    def __init__(self) -> None:
        self.nonfinite_epoch: int | None = None  # the first diverged epoch, counted from 0
        self.disk_full: DiskFullError | None = None

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

    def save(self, model: keras.Model, path: Path,
             extra: Callable[[Path], None] | None = None) -> None:
        """``model.save_weights`` to ``path`` atomically (then ``extra(temporary file)``); a
        full disk keeps the old file and stops the training."""
        try:
            with atomic_path(path, size_hint=checkpoint_bytes(model, path)) as tmp:
                model.save_weights(str(tmp))
                if extra is not None:
                    extra(tmp)
        except DiskFullError as err:
            self.disk_full = err
            model.stop_training = True


class AtomicModelCheckpoint(keras.callbacks.Callback):
    """``keras.callbacks.ModelCheckpoint`` for weights (``mode="max"``) whose file appears
    atomically, and never from a diverged state or onto a full disk (``CheckpointGuard``).

    Keras' own writes in place, so a crash mid-write breaks the last good file, and it has no
    public hook to write elsewhere; hence this short callback.
    """

    def __init__(self, filepath: str | Path, monitor: str = "val_accuracy", mode: str = "max",
                 save_best_only: bool = False, save_weights_only: bool = True,
                 initial_value_threshold: float | None = None,
                 guard: CheckpointGuard | None = None) -> None:
        super().__init__()
        if mode != "max" or not save_weights_only:
            raise ValueError("AtomicModelCheckpoint saves weights, best by the largest value")
        self.filepath, self.monitor, self.save_best_only = Path(filepath), monitor, save_best_only
        self.best = initial_value_threshold
        self.guard = guard or CheckpointGuard()

    def on_epoch_end(self, epoch, logs=None):
        if not self.guard.allows(self.model, epoch, logs):
            return
        if self.save_best_only:
            value = (logs or {}).get(self.monitor)
            if value is None or (self.best is not None and not float(value) > self.best):
                return
            self.best = float(value)
        self.guard.save(self.model, self.filepath)


_EPOCH_ATTR = "allcnn_completed_epochs"
_SEED_STATES = "allcnn_seed_states"
BACKUP_WEIGHTS = "latest.weights.h5"


def seed_states(model: keras.Model) -> list[keras.Variable]:
    """The state variables of the model's random seed generators (dropout's): not weights, so
    ``save_weights`` leaves them out, but a resumed run needs them to draw the same masks."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


class AtomicBackupAndRestore(keras.callbacks.Callback):
    """``keras.callbacks.BackupAndRestore`` with an atomic, self-describing, never-poisoned
    backup (Keras' writes in place through private hooks; this is the public-API version).

    After each epoch the weights, the optimizer state and the dropout layers' seed-generator
    states go to one file that also records the completed epochs (``backup_epoch``), which
    replaces the previous backup atomically; not after a NaN epoch or a full disk
    (``CheckpointGuard``). At the start of ``fit`` a backup is loaded; ``fit`` must then be
    given ``initial_epoch=backup_epoch(backup_dir)`` (``train`` does). ``save_freq`` and
    ``delete_checkpoint`` are accepted as Keras' names, only as "epoch" and False.
    """

    def __init__(self, backup_dir: str | Path, save_freq: str = "epoch",
                 delete_checkpoint: bool = False, guard: CheckpointGuard | None = None) -> None:
        super().__init__()
        if save_freq != "epoch" or delete_checkpoint:
            raise ValueError("AtomicBackupAndRestore backs up every epoch and keeps the backup")
        self.weights = Path(backup_dir) / BACKUP_WEIGHTS
        self.guard = guard or CheckpointGuard()

    def on_train_begin(self, logs=None):
        if not self.weights.is_file():
            return
        if not self.model.optimizer.built:  # its variables must exist to be loaded
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(self.weights)
        import h5py

        with h5py.File(self.weights, "r") as f:
            group, states = f.get(_SEED_STATES), seed_states(self.model)
            if group is not None and len(group) == len(states):
                for i, state in enumerate(states):
                    state.assign(group[str(i)][()])

    def on_epoch_end(self, epoch, logs=None):
        if not self.guard.allows(self.model, epoch, logs):
            return

        def record(tmp: Path) -> None:
            import h5py

            with h5py.File(tmp, "a") as f:
                f.attrs[_EPOCH_ATTR] = epoch + 1
                group = f.create_group(_SEED_STATES)
                for i, state in enumerate(seed_states(self.model)):
                    group[str(i)] = keras.ops.convert_to_numpy(state)

        self.guard.save(self.model, self.weights, record)


def backup_epoch(backup_dir: str | Path) -> int:
    """Completed epochs recorded in an ``AtomicBackupAndRestore`` backup (0 when none)."""
    import h5py

    try:
        with h5py.File(Path(backup_dir) / BACKUP_WEIGHTS, "r") as f:
            return int(f.attrs.get(_EPOCH_ATTR, 0))
    except OSError:  # absent or unreadable
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
    """

    def __init__(self, filename: str | Path) -> None:
        super().__init__()
        self.filename = Path(filename)
        self._file = None

    def on_train_begin(self, logs=None):
        new = not self.filename.is_file() or self.filename.stat().st_size == 0
        self._file = open(self.filename, "a", newline="")  # closed in on_train_end
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(BATCH_COLUMNS)
        self._rate = learning_rate_at(self.model.optimizer)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._prev = epoch, (0.0, 0.0)

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        loss = float(logs.get("loss", math.nan))
        acc = float(logs.get("accuracy", math.nan))
        batch_loss = (batch + 1) * loss - batch * self._prev[0]
        batch_acc = min(max((batch + 1) * acc - batch * self._prev[1], 0.0), 1.0)
        self._prev = (loss, acc)
        step = self._epoch * (self.params.get("steps") or 0) + batch
        self._writer.writerow([self._epoch, batch, step] + [f"{v:.6g}" for v in (
            batch_loss, batch_acc, loss, acc, self._rate(step))])
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None


class EpochLogger(keras.callbacks.Callback):
    """A quiet one-line-per-epoch log (``format_epoch_line``) for notebooks and log files."""

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


def run_callbacks(run_dir: Path, backup_dir: Path, *, monitor: str = "val_accuracy",
                  best_so_far: float | None = None, verbose: bool = False,
                  guard: CheckpointGuard | None = None) -> list[keras.callbacks.Callback]:
    """The callbacks ``train`` gives ``fit``: epoch time and rate, NaN stop, both CSV logs, the
    best and last checkpoints, a log line per epoch (unless ``verbose``: Keras' progress bar),
    and the backup, last, so that an epoch counts as done only once all else is written."""
    guard = guard or CheckpointGuard()
    callbacks = [
        EpochInfo(), keras.callbacks.TerminateOnNaN(),
        keras.callbacks.CSVLogger(str(run_dir / HISTORY_CSV), append=True),
        BatchCSVLogger(run_dir / BATCHES_CSV),
        AtomicModelCheckpoint(run_dir / BEST_WEIGHTS, monitor=monitor, save_best_only=True,
                              initial_value_threshold=best_so_far, guard=guard),
        AtomicModelCheckpoint(run_dir / LAST_WEIGHTS, guard=guard),
    ]
    return [*callbacks, *([] if verbose else [EpochLogger()]),
            AtomicBackupAndRestore(backup_dir, guard=guard)]


@dataclass
class TrainResult:
    """What ``train`` returns: the run folder, the model (last epoch's weights) and history."""

    run_dir: Path
    model: keras.Model
    history: dict[str, np.ndarray]
    best_epoch: int | None  # counted from 0, as in history.csv
    best_val_accuracy: float | None
    initial_epoch: int  # > 0 when resumed from a backup
    epochs_completed: int
    terminated_on_nan: bool
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)

    def __repr__(self) -> str:
        best = (f"best val_accuracy {self.best_val_accuracy:.4f} at epoch {self.best_epoch + 1}"
                if self.best_epoch is not None else "no epoch with finite losses"
                if self.terminated_on_nan else "no validation")
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
    """The paper's whitening fitted on the training images (Sec. 3.2, after Goodfellow et al.
    2013): global contrast normalization to an L2 norm of ``scale`` (55), then ZCA with
    ``epsilon`` (0.1) added to the covariance's eigenvalues."""
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


def load_or_fit_preprocess(config: Mapping[str, Any], run_dir: str | Path,
                   x_train: np.ndarray | None = None) -> Callable[[tf.Tensor], tf.Tensor]:
    """The input preprocessing of a run with ``config`` (a ``TrainConfig.to_dict()``): its
    ZCA or per-channel standardization, loaded from ``run_dir``, else (given ``x_train``)
    fitted on the training images and saved there; /255 when the run had neither."""
    zca, normalize = config.get("zca"), config.get("normalize")
    if not (zca or normalize):
        return scale_to_unit
    path = Path(run_dir) / (ZCA_FILE if zca else STANDARDIZER_FILE)
    if path.is_file():
        state = (ZCAWhitening if zca else Standardizer).load(path)
    elif x_train is None:
        what = "ZCA whitening" if zca else "per-channel standardization"
        raise FileNotFoundError(f"{path}: the run used {what} but its {path.name} is missing")
    else:
        state = (fit_zca(x_train, config["zca_epsilon"]) if zca
                 else Standardizer().fit(x_train))
        state.save(path)  # atomic
    return gcn_zca_preprocess(state) if zca else standardize_preprocess(state)


def recalibrate_batch_norm(model: keras.Model, dataset: tf.data.Dataset,
                           batches: int = BN_RECALIBRATION_BATCHES) -> int:
    """Re-estimate every ``BatchNormalization`` layer's moving mean and variance as the plain
    average over ``batches`` training batches, for the weights the model has now (e.g. after
    the EMA of the weights replaced them). Returns the batches used."""
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
                history: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """After the last epoch: the final weights' validation accuracy for ``config.json`` (the
    last epoch's, which ``fit`` scored; with test-time augmentation too). With ``ema`` the
    averaged weights (which ``fit`` put in the model) first get batch-norm statistics of their
    own, become ``last.weights.h5`` and are scored (also before that re-estimate)."""
    from allcnn_lib.evaluation import evaluate

    if not len(data.y_val):
        final: dict[str, Any] = {}
        if config.ema:
            final["bn_recalibration_batches"] = recalibrate_batch_norm(model, train_ds)
            with atomic_path(last) as tmp:
                model.save_weights(tmp)
        return final

    def score(**tta: Any) -> float:
        return evaluate(model, data.x_val, data.y_val, 512, preprocess=preprocess,
                        **tta).accuracy

    final = {"val_accuracy": float(history["val_accuracy"][-1])}
    if config.ema:
        final["val_accuracy_ema_stale_bn"] = score()
        final["bn_recalibration_batches"] = recalibrate_batch_norm(model, train_ds)
        with atomic_path(last) as tmp:
            model.save_weights(tmp)
        final["val_accuracy"] = score()
    if config.tta_flip or config.tta_shift:
        final["val_accuracy_tta"] = score(flip=config.tta_flip, shift=config.tta_shift)
    return final


def base_initializer(init: str) -> str:
    """The Keras initializer a model for ``init`` is built with: LSUV starts from orthogonal."""
    return "orthogonal" if init == "lsuv" else init


def finish_initialization(model: keras.Model, init: str, x_train: np.ndarray, *, seed: int = 0,
                          preprocess: Callable[[tf.Tensor], tf.Tensor] | None = None,
                          images: int = LSUV_IMAGES) -> keras.Model:
    """Complete ``init`` on a model built with ``base_initializer(init)``: for ``"lsuv"``, LSUV
    on ``images`` training images (shuffled with ``seed``, through ``preprocess``, no
    augmentation); other initializers are complete already. Returns the model."""
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


def _prepare_backup(config: TrainConfig, overwrite: bool = False) -> tuple[Path, int]:
    """The backup folder and the completed epochs to resume from (0: start afresh, always so
    with ``overwrite``, or when the backup belongs to other settings)."""
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
                print(f"note: the backup in {backup} belongs to another configuration; "
                      "starting afresh", flush=True)
            shutil.rmtree(backup)
    backup.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps(fingerprint, indent=1))
    return backup, min(backup_epoch(backup), config.epochs)


def fast_forward(dataset: tf.data.Dataset, epochs: int, steps_per_epoch: int, *,
                 repeat: bool) -> tf.data.Dataset:
    """The training pipeline as a run resumed after ``epochs`` completed epochs must see it, so
    that it shuffles and augments as the uninterrupted run did.

    A finite pipeline draws new shuffle and augmentation seeds whenever an iterator over it is
    made, and ``fit`` makes two in each epoch (one to read, one ready for the next): Keras' own
    epoch iterator is walked through ``epochs`` epochs without reading a batch, which makes the
    same iterators. An endless pipeline (``repeat``) skips the batches already trained on.
    (Under ``distribute="mirrored"`` the strategy copies the pipeline: a resumed run reshuffles.)
    """
    if not epochs:
        return dataset
    if repeat:
        return dataset.skip(epochs * steps_per_epoch)
    # Private Keras API, kept because nothing public makes the iterators fit makes: without it
    # a resumed run sees other shuffles than the uninterrupted one (bit-identical resume).
    from keras.src.backend.tensorflow.trainer import TFEpochIterator

    walker = TFEpochIterator(x=dataset, distribute_strategy=tf.distribute.get_strategy(),
                             steps_per_execution=1)
    for _ in range(epochs):
        for _ in walker:  # yields (step, step, iterator) without reading a batch
            pass
    return dataset


def _record_status(run_dir: Path, meta: dict[str, Any], status: str, **extra: Any) -> None:
    """Write ``status`` (and ``extra``) into the run's config.json, if the disk lets it."""
    meta["run"].update(status=status, **extra)
    meta["run"].setdefault("epochs_completed", len(read_columns(run_dir / HISTORY_CSV)
                                                   .get("epoch", [])))
    try:
        atomic_write_text(run_dir / CONFIG_JSON, json.dumps(meta, indent=2))
    except OSError:
        pass


def _build(config: TrainConfig, data: CIFAR10, steps_per_epoch: int) -> keras.Model:
    """The compiled model of ``config`` (built in the current strategy's scope)."""
    model = build_model(config.arch, variant=config.variant, batch_norm=config.batch_norm,
                        dropout=config.dropout, initializer=base_initializer(config.init),
                        weight_decay=config.weight_decay, class_relu=config.class_relu,
                        input_shape=data.x_train.shape[1:], num_classes=len(data.class_names))
    for layer in model.layers:  # the moving statistics' decay (Keras' default 0.99)
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = config.bn_momentum
    if config.label_smoothing > 0:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    optimizer = make_optimizer(config.optimizer, learning_rate=config.learning_rate,
                               rho=config.rho, schedule=config.schedule,
                               steps_per_epoch=steps_per_epoch, epochs=config.epochs,
                               ema=config.ema)
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics)
    return model


def train(config: TrainConfig, data: CIFAR10 | None = None, *,
          overwrite: bool = False) -> TrainResult:
    """Train ``config.arch`` on CIFAR-10 and write ``runs/<id>/`` (``allcnn_lib.runs``).

    ``data`` is a ``CIFAR10``; by default it is loaded from ``config.data_dir`` with
    ``config.limit`` and ``config.seed``. Model selection uses the validation split; the test
    split is never used. ``overwrite``: start afresh even when a backup could be resumed.

    A diverged run stops at the first non-finite epoch, which is not saved
    (``terminated_on_nan``); a full disk stops it with ``DiskFullError`` and keeps its backup;
    Ctrl-C leaves ``status: interrupted`` in config.json. Running it again resumes from the
    last completed epoch, with the same losses as an uninterrupted run (CPU, default strategy).
    Draw the curves with ``plots.save_run_plots(run_dir)``.
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
    for name in ("history", "batches"):
        truncate_csv(files[name], initial_epoch)
    if initial_epoch:
        print(f"resuming {config.run_id} from epoch {initial_epoch + 1} "
              f"(backup in {backup_dir})", flush=True)
    else:  # a fresh start: nothing of an earlier run in this folder is taken for this one's
        for fname in (BEST_WEIGHTS, LAST_WEIGHTS, ZCA_FILE, STANDARDIZER_FILE):
            (run_dir / fname).unlink(missing_ok=True)
    # Fitted on the training split only; a resumed run loads its own.
    preprocess = load_or_fit_preprocess(config.to_dict(), run_dir, data.x_train)
    for name, fname in (("zca", ZCA_FILE), ("standardizer", STANDARDIZER_FILE)):
        if (run_dir / fname).is_file():
            files[name] = run_dir / fname

    one_hot = len(data.class_names) if config.label_smoothing > 0 else None
    repeat = config.steps_per_epoch is not None
    train_ds = make_dataset(data.x_train, data.y_train, config.batch_size, training=True,
                            augment=config.augment, seed=config.seed, preprocess=preprocess,
                            num_classes=one_hot, repeat=repeat, max_shift=config.max_shift,
                            shift_fill=config.shift_fill)
    val_ds = (make_dataset(data.x_val, data.y_val, config.batch_size, preprocess=preprocess,
                           num_classes=one_hot) if len(data.y_val) else None)
    steps_per_epoch = config.steps_per_epoch or int(train_ds.cardinality().numpy())

    previous_policy = keras.config.dtype_policy()
    if config.mixed_precision:
        keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        strategy = make_strategy(config.distribute)
        with strategy.scope():
            model = _build(config, data, steps_per_epoch)
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
        recorded = {k: portable_path(v) if k in PATH_FIELDS and v else v
                    for k, v in config.to_dict().items()}
        source = data.source
        meta = {**recorded, "run": {
            "model": model.name, "params": int(model.count_params()),
            "data_source": portable_path(source) if Path(source).is_absolute() else source,
            "is_sample": bool(data.is_sample), "train_images": int(len(data.y_train)),
            "validation_images": int(len(data.y_val)), "class_names": list(data.class_names),
            "steps_per_epoch": steps_per_epoch, "resumed_from_epoch": initial_epoch,
            "status": "running", "keras": keras.__version__, "tensorflow": tf.__version__,
            "backend": keras.backend.backend(), "replicas": strategy.num_replicas_in_sync}}
        atomic_write_text(files["config"], json.dumps(meta, indent=2))

        guard = CheckpointGuard()
        verbose = sys.stdout.isatty() if config.verbose is None else bool(config.verbose)
        earlier = read_columns(files["history"])  # the epochs a resumed run already has
        earlier_seconds = float(np.nansum(earlier.get("time", [])))
        callbacks = run_callbacks(run_dir, backup_dir, guard=guard, verbose=verbose,
                                  monitor="val_accuracy" if val_ds is not None else "accuracy",
                                  best_so_far=best_epoch(earlier)[1])
        # A resumed run sees the data as the uninterrupted run did (same shuffles, same
        # augmentations), and its dropout masks continue from the backup: the same losses.
        fit_ds = fast_forward(train_ds, initial_epoch, steps_per_epoch, repeat=repeat)
        try:
            model.fit(fit_ds, validation_data=val_ds, epochs=config.epochs,
                      initial_epoch=initial_epoch, steps_per_epoch=config.steps_per_epoch,
                      verbose=1 if verbose else 0, callbacks=callbacks, shuffle=False)
        except KeyboardInterrupt:
            _record_status(run_dir, meta, "interrupted")
            raise
        except Exception as err:
            _record_status(run_dir, meta, "failed", error=" ".join(str(err).split())[:300])
            raise
    finally:
        keras.config.set_dtype_policy(previous_policy)

    if guard.disk_full is not None:
        _record_status(run_dir, meta, "disk_full", error=str(guard.disk_full))
        raise guard.disk_full
    history = read_columns(files["history"])
    best, best_acc = best_epoch(history)
    losses = history.get("loss", np.array([]))
    nan = guard.nonfinite_epoch is not None or bool(len(losses) and not np.isfinite(losses[-1]))
    completed = len(history.get("epoch", []))
    try:
        if completed >= config.epochs and not nan:
            meta["run"]["final"] = _finish_run(config, model, train_ds, data, preprocess,
                                               files["last"], history)
    except KeyboardInterrupt:
        _record_status(run_dir, meta, "interrupted")
        raise
    # the whole run's: the epochs of earlier processes (a resumed run) and this process
    seconds = earlier_seconds + time.perf_counter() - start
    meta["run"].update(epochs_completed=completed, best_epoch=best, best_val_accuracy=best_acc,
                       seconds=round(seconds, 1))
    if nan:
        meta["run"]["nonfinite_epoch"] = (guard.nonfinite_epoch if guard.nonfinite_epoch
                                          is not None else completed - 1)
    _record_status(run_dir, meta, "terminated_on_nan" if nan else "finished")
    if completed >= config.epochs or nan:  # done: nothing left to resume
        shutil.rmtree(backup_dir, ignore_errors=True)
    return TrainResult(run_dir=run_dir, model=model, history=history, best_epoch=best,
                       best_val_accuracy=best_acc, initial_epoch=initial_epoch,
                       epochs_completed=completed, terminated_on_nan=nan,
                       seconds=seconds, files=files)
