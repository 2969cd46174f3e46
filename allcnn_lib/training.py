"""Optimizers, schedules, the tf.data input pipeline, checkpoints and ``train``.

``train(TrainConfig(...))`` writes one run folder (``allcnn_lib.runs``), every file atomically;
an epoch with a NaN loss or weight is never saved. A run killed mid-epoch and started again
resumes from its last completed epoch with the losses of an uninterrupted run (CPU): the backup
keeps the dropout seeds, and the endless input stream skips the batches already seen.

The original repository's Keras-2 ``SGD(lr=0.01, decay=1e-6)`` is ``make_optimizer("sgd",
schedule="inverse_time")``: lr_k = 0.01 / (1 + 1e-6 k).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np
import tensorflow as tf

from allcnn_lib import runs
from allcnn_lib.data import CIFAR10, load_cifar10
from allcnn_lib.initializers import lsuv, whiten_first_conv
from allcnn_lib.models import build_model
from allcnn_lib.preprocessing import (
    Preprocess,
    augment_dataset,
    load_or_fit_preprocess,
    scale_to_unit,
)
from allcnn_lib.runs import TrainConfig

PAPER_DROP_EPOCHS, PAPER_EPOCHS = (200, 250, 300), 350  # Sec. 3.2: lr x0.1 after these epochs
INVERSE_TIME_DECAY = 1e-6  # Keras 2's ``decay`` of the original repository's SGD
ONECYCLE_WARMUP_FRACTION = 0.2
EMA_MOMENTUM = 0.99  # the weights' moving average (``ema``): a horizon of ~100 steps
LSUV_IMAGES = 256  # LSUV's batch (the paper's is one mini-batch; 256 is steadier)
WHITENING_IMAGES = 5000  # images whose 3x3 patches ``whiten_init`` samples
BACKUP_WEIGHTS = "latest.weights.h5"

# --------------------------------------------------------------------------- optimizers


def paper_boundaries(total_steps: int) -> list[int]:
    """Steps at which the paper's schedule divides the rate by 10: epochs 200, 250 and 300 of
    350 as fractions of the run, rounded, strictly increasing."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    drops: list[int] = []
    for epoch in PAPER_DROP_EPOCHS:
        drops.append(max(round(total_steps * epoch / PAPER_EPOCHS), drops[-1] + 1 if drops else 1))
    return drops


def make_schedule(name: str, learning_rate: float, *, steps_per_epoch: int | None = None,
                  epochs: int | None = None
                  ) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate ``name`` (``SCHEDULES``) from ``learning_rate``: ``constant``,
    ``inverse_time`` (the original repository's lr / (1 + 1e-6 k)) and, given the run's length,
    ``paper`` (x0.1 at ``paper_boundaries``) or ``onecycle`` (linear up over 20%, then down to
    0)."""
    schedules = keras.optimizers.schedules
    if name == "constant":
        return float(learning_rate)
    if name == "inverse_time":
        return schedules.InverseTimeDecay(learning_rate, decay_steps=1,
                                          decay_rate=INVERSE_TIME_DECAY)
    if name not in runs.SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(runs.SCHEDULES)}")
    if not steps_per_epoch or not epochs:
        raise ValueError(f"the {name!r} schedule needs steps_per_epoch and epochs")
    total = steps_per_epoch * epochs
    if name == "paper":  # Keras' boundary b: the next value from step b + 1
        boundaries = [d - 1 for d in paper_boundaries(total)]
        return schedules.PiecewiseConstantDecay(boundaries,
                                                [learning_rate * 0.1**i for i in range(4)])
    return OneCycle(learning_rate, max(1, round(total * ONECYCLE_WARMUP_FRACTION)), total)


@keras.saving.register_keras_serializable(package="allcnn")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Piecewise linear: 0 at step 0, ``peak`` at ``peak_step``, 0 at ``total_steps``."""

    def __init__(self, peak: float, peak_step: int, total_steps: int) -> None:
        self.peak, self.peak_step, self.total_steps = float(peak), int(peak_step), int(total_steps)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        down = (self.total_steps - step) / max(1, self.total_steps - self.peak_step)
        return self.peak * keras.ops.clip(keras.ops.minimum(step / self.peak_step, down), 0, 1)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "peak_step": self.peak_step, "total_steps": self.total_steps}


def make_optimizer(name: str, *, learning_rate: float | None = None, rho: float = 0.9,
                   schedule: str | None = None, steps_per_epoch: int | None = None,
                   epochs: int | None = None, ema: bool = False) -> keras.optimizers.Optimizer:
    """``sgd`` (the original repository's: momentum 0.9, Nesterov), ``rmsprop`` (``rho=0``: the
    original's sign-like step) or ``adam`` at ``DEFAULT_LEARNING_RATES`` unless given, with a
    ``make_schedule`` schedule; ``ema``: Keras' moving average of the weights, which ``fit``
    copies into the model when it ends."""
    if name not in runs.OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(runs.OPTIMIZERS)}")
    lr = runs.DEFAULT_LEARNING_RATES[name] if learning_rate is None else float(learning_rate)
    rate = make_schedule(schedule or "constant", lr, steps_per_epoch=steps_per_epoch,
                         epochs=epochs)
    kwargs = {"learning_rate": rate, "use_ema": ema, "ema_momentum": EMA_MOMENTUM}
    if name == "sgd":
        return keras.optimizers.SGD(momentum=0.9, nesterov=True, **kwargs)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(rho=float(rho), **kwargs)
    return keras.optimizers.Adam(**kwargs)


def learning_rate_at(optimizer: keras.optimizers.Optimizer) -> Callable[[int], float]:
    """The optimizer's learning rate as a function of the step (from its public config)."""
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


def make_dataset(x: np.ndarray, y: np.ndarray | None = None, batch_size: int = 128, *,
                 training: bool = False, augment: bool = False, seed: int = 0,
                 preprocess: Preprocess | None = None, num_classes: int | None = None,
                 max_shift: int | float = runs.MAX_SHIFT, shift_fill: str = "zero",
                 repeat: bool = False) -> tf.data.Dataset:
    """A ``tf.data`` pipeline over uint8 NHWC images (and int labels) for fit/evaluate/predict.

    ``training``: shuffled (seeded, a new order each epoch) into full batches only. Then
    ``preprocess`` (default /255); ``augment``: seeded shifts of up to ``max_shift`` (a fraction
    of the side, or pixels) with ``shift_fill`` "zero" or "reflect", and flips; one-hot labels
    (``num_classes``); a prefetch of 2 batches. Autotune is off (its threads stalled the end of
    ``fit`` on this CPU) and the order deterministic. ``repeat``: an endless stream.
    """
    preprocess = preprocess or scale_to_unit

    def prepare(images: tf.Tensor, *labels: tf.Tensor) -> Any:
        if not labels:
            return preprocess(images)
        return preprocess(images), tf.one_hot(labels[0], num_classes) if num_classes else labels[0]

    ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y))
    if training:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=training and len(x) >= batch_size).map(prepare)
    if augment:
        ds = augment_dataset(ds, max_shift=max_shift, seed=seed,
                             fill_value="reflect" if shift_fill == "reflect" else 0)
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.prefetch(2).with_options(options)


def crop_first(stream: tf.data.Dataset, size: int, batches: int) -> tf.data.Dataset:
    """Progressive resizing, crop mode: the first ``batches`` batches of ``stream`` cut to their
    central ``size`` x ``size`` pixels, the later ones whole. After random shifts of up to
    ``(side - size) / 2`` px these are random crops (24 of 32 with the recipe's 4 px shifts,
    none reaching the padding); a fully convolutional network with global average pooling
    trains on them at about ``(size / side)**2`` of the cost (fast.ai's progressive resizing;
    MosaicML Composer's ``mode="crop"``). Batch indices count from the stream's start, so a
    resumed run's ``skip`` keeps them."""

    def crop(index: tf.Tensor, element: tuple) -> tuple:
        images = element[0]
        top = (tf.shape(images)[1] - size) // 2
        left = (tf.shape(images)[2] - size) // 2
        return (tf.cond(index < batches,
                        lambda: images[:, top:top + size, left:left + size], lambda: images),
                *element[1:])

    return stream.enumerate().map(crop)


# --------------------------------------------------------------------------- callbacks


class Checkpoints(keras.callbacks.Callback):
    """After each epoch: the best and last weights, then the backup a resumed run starts from,
    each written atomically (Keras' ModelCheckpoint and BackupAndRestore write in place). A
    non-finite loss or weight, or a full disk, saves nothing more and stops the training.

    The backup also holds the optimizer, the dropout seed generators and the completed epochs
    (``backup_epoch``); it is loaded when ``fit`` starts, which needs ``initial_epoch`` set.
    """

    def __init__(self, run_dir: Path, backup_dir: Path, monitor: str = "val_accuracy",
                 best: float | None = None) -> None:
        super().__init__()
        self.best_path, self.last_path = run_dir / runs.BEST_WEIGHTS, run_dir / runs.LAST_WEIGHTS
        self.backup = Path(backup_dir) / BACKUP_WEIGHTS
        self.monitor, self.best = monitor, best
        self.nonfinite_epoch: int | None = None  # the first diverged epoch, from 0
        self.disk_full: runs.DiskFullError | None = None

    def _seeds(self) -> list[keras.Variable]:  # not weights, so save_weights leaves them out
        return [v for v in self.model.variables if v.path.endswith("seed_generator_state")]

    def on_train_begin(self, logs=None):
        if not self.backup.is_file():
            return
        if not self.model.optimizer.built:  # its variables must exist to be loaded
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(self.backup)
        with h5py.File(self.backup, "r") as f:
            for i, state in enumerate(self._seeds()):
                state.assign(f["allcnn_seed_states"][str(i)][()])

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        finite = all(math.isfinite(float(logs[k])) for k in ("loss", "val_loss") if k in logs)
        if self.nonfinite_epoch is None and not (finite and all(
                np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in self.model.weights)):
            self.nonfinite_epoch = epoch
        if self.nonfinite_epoch is not None or self.disk_full is not None:
            self.model.stop_training = True
            return
        value = logs.get(self.monitor)
        try:
            if value is not None and (self.best is None or float(value) > self.best):
                self._save(self.best_path)
                self.best = float(value)
            self._save(self.last_path)
            self._save(self.backup, completed_epochs=epoch + 1)
        except runs.DiskFullError as err:
            self.disk_full, self.model.stop_training = err, True

    def _save(self, path: Path, completed_epochs: int | None = None) -> None:
        variables = [*self.model.variables, *self.model.optimizer.variables]
        size = 1.05 * sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)
        size = max(int(size) + 256 * 1024, path.stat().st_size if path.is_file() else 0)
        with runs.atomic_path(path, size_hint=size) as tmp:
            self.model.save_weights(str(tmp))
            if completed_epochs is not None:
                with h5py.File(tmp, "a") as f:
                    f.attrs["allcnn_completed_epochs"] = completed_epochs
                    for i, state in enumerate(self._seeds()):
                        f[f"allcnn_seed_states/{i}"] = keras.ops.convert_to_numpy(state)


def backup_epoch(backup_dir: str | Path) -> int:
    """The completed epochs recorded in a run's backup (0 when there is none)."""
    try:
        with h5py.File(Path(backup_dir) / BACKUP_WEIGHTS, "r") as f:
            return int(f.attrs.get("allcnn_completed_epochs", 0))
    except OSError:  # absent or unreadable
        return 0


class EpochLogger(keras.callbacks.Callback):
    """Adds ``time`` (s) and ``learning_rate`` (of the epoch's last step) to the epoch's logs,
    which the callbacks after it share, and prints one line per epoch unless ``quiet``."""

    def __init__(self, quiet: bool = False, stream: Any = None) -> None:
        super().__init__()
        self.quiet, self.stream = quiet, stream

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = {} if logs is None else logs
        logs["time"] = round(time.perf_counter() - self._start, 3)
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) - 1
        logs["learning_rate"] = current_learning_rate(self.model.optimizer, max(step, 0))
        if not self.quiet:  # epoch 3/10  loss 1.234  acc 0.456  val_loss 1.300  val_acc ...
            parts = [f"epoch {epoch + 1}/{self.params['epochs']}"] + [
                f"{label} {float(logs[key]):.3f}" for key, label in (
                    ("loss", "loss"), ("accuracy", "acc"), ("val_loss", "val_loss"),
                    ("val_accuracy", "val_acc")) if key in logs]
            print("  ".join([*parts, f"{logs['time']:.1f} s"]), file=self.stream or sys.stdout,
                  flush=True)


class BatchCSVLogger(keras.callbacks.Callback):
    """One CSV row per training batch (``runs.BATCH_COLUMNS``), appended and flushed at once.

    ``loss`` and ``accuracy`` are the batch's own, recovered from Keras' running means over
    the epoch (exact for the equal batches of ``make_dataset(training=True)``); ``step``
    counts batches from the run's start.
    """

    def __init__(self, filename: str | Path) -> None:
        super().__init__()
        self.filename = Path(filename)

    def on_train_begin(self, logs=None):
        new = not self.filename.is_file() or self.filename.stat().st_size == 0
        self._file = open(self.filename, "a", newline="")  # closed in on_train_end
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(runs.BATCH_COLUMNS)
        self._rate = learning_rate_at(self.model.optimizer)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._prev = epoch, (0.0, 0.0)

    def on_train_batch_end(self, batch, logs=None):
        loss, acc = (float((logs or {}).get(k, math.nan)) for k in ("loss", "accuracy"))
        batch_loss = (batch + 1) * loss - batch * self._prev[0]
        batch_acc = min(max((batch + 1) * acc - batch * self._prev[1], 0.0), 1.0)
        self._prev = (loss, acc)
        step = self._epoch * (self.params.get("steps") or 0) + batch
        self._writer.writerow([self._epoch, batch, step] + [
            f"{v:.6g}" for v in (batch_loss, batch_acc, loss, acc, self._rate(step))])
        self._file.flush()

    def on_train_end(self, logs=None):
        self._file.close()


def run_callbacks(run_dir: Path, backup_dir: Path, *, monitor: str = "val_accuracy",
                  best_so_far: float | None = None, verbose: bool = False
                  ) -> list[keras.callbacks.Callback]:
    """The callbacks ``train`` gives ``fit``: epoch time and rate (and a line, unless
    ``verbose``: Keras' progress bar), a stop at a NaN loss, both CSV logs and, last, so that
    an epoch counts as done only once all else is written, ``Checkpoints``."""
    return [EpochLogger(quiet=verbose), keras.callbacks.TerminateOnNaN(),
            keras.callbacks.CSVLogger(str(run_dir / runs.HISTORY_CSV), append=True),
            BatchCSVLogger(run_dir / runs.BATCHES_CSV),
            Checkpoints(run_dir, backup_dir, monitor=monitor, best=best_so_far)]


# --------------------------------------------------------------------------- training


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
    seconds: float  # of the whole run, its earlier processes included
    files: dict[str, Path] = field(default_factory=dict)

    def __repr__(self) -> str:
        best = (f"best val_accuracy {self.best_val_accuracy:.4f} at epoch {self.best_epoch + 1}"
                if self.best_epoch is not None else "no epoch with finite losses"
                if self.terminated_on_nan else "no validation")
        return (f"TrainResult({self.run_dir}: {self.epochs_completed} epochs, {best}, "
                f"{self.seconds:.1f} s)")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """``keras.utils.set_random_seed`` and TensorFlow's op determinism (CPU: bit-identical),
    which stays on for the process and turns off XLA in ``fit``."""
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def base_initializer(init: str) -> str:
    """The Keras initializer a model for ``init`` is built with: LSUV starts from orthogonal."""
    return "orthogonal" if init == "lsuv" else init


def finish_initialization(model: keras.Model, init: str, x_train: np.ndarray, *, seed: int = 0,
                          preprocess: Preprocess | None = None,
                          images: int = LSUV_IMAGES) -> keras.Model:
    """Complete ``init`` on a model built with ``base_initializer(init)``: for ``"lsuv"``, LSUV
    on ``images`` shuffled training images through ``preprocess``. Returns the model."""
    if init == "lsuv":
        batch = next(iter(make_dataset(x_train, None, images, training=True, seed=seed,
                                       preprocess=preprocess)))
        lsuv(model, batch, seed=seed)
    return model


def recalibrate_batch_norm(model: keras.Model, dataset: tf.data.Dataset,
                           batches: int = 20) -> int:
    """Set every batch norm's moving statistics to the mean over ``batches`` training batches
    for the current weights (e.g. the EMA's). Returns the batches used."""
    layers = [la for la in model.layers if isinstance(la, keras.layers.BatchNormalization)]
    saved, used = [la.momentum for la in layers], 0
    if layers:
        for used, (images, *_) in enumerate(dataset.take(batches), 1):
            for layer in layers:  # momentum (k-1)/k: the running mean of the k batches so far
                layer.momentum = (used - 1) / used
            model(images, training=True)
    for layer, momentum in zip(layers, saved, strict=True):
        layer.momentum = momentum
    return used


def make_strategy(name: str) -> tf.distribute.Strategy:
    """``"mirrored"``: ``MirroredStrategy`` over every GPU, else over every logical CPU device
    (docs/distributed.md); ``"none"``: TensorFlow's default strategy."""
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=cpus)
    if name != "none":
        raise ValueError(f"unknown distribute {name!r}; choose one of "
                         f"{', '.join(runs.DISTRIBUTE)}")
    return tf.distribute.get_strategy()


def _prepare_backup(config: TrainConfig, overwrite: bool) -> tuple[Path, int]:
    """The backup folder and the epochs to resume from (0 with ``overwrite`` or when the
    backup belongs to other settings)."""
    backup, fingerprint = config.resolved_backup_dir(), config.fingerprint()
    stamp = backup / "allcnn_run.json"
    runs.remove_stale_temporaries(backup)
    if backup.exists() and (overwrite or not stamp.is_file()
                            or json.loads(stamp.read_text()) != fingerprint):
        if backup_epoch(backup) and not overwrite:
            print(f"note: the backup in {backup} belongs to another configuration; "
                  "starting afresh", flush=True)
        shutil.rmtree(backup)
    backup.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(stamp, json.dumps(fingerprint, indent=1))
    return backup, min(backup_epoch(backup), config.epochs)


def _record_status(run_dir: Path, meta: dict[str, Any], status: str, **extra: Any) -> None:
    """Write ``status`` (and ``extra``) into the run's config.json, if the disk lets it."""
    meta["run"].update(status=status, **extra)
    meta["run"].setdefault("epochs_completed", len(
        runs.read_columns(run_dir / runs.HISTORY_CSV).get("epoch", [])))
    try:
        runs.atomic_write_text(run_dir / runs.CONFIG_JSON, json.dumps(meta, indent=2))
    except OSError:
        pass


def _build(config: TrainConfig, data: CIFAR10, steps_per_epoch: int) -> keras.Model:
    """The compiled model of ``config`` (in the current strategy's scope)."""
    model = build_model(config.arch, variant=config.variant, batch_norm=config.batch_norm,
                        dropout=config.dropout, initializer=base_initializer(config.init),
                        weight_decay=config.weight_decay, class_relu=config.class_relu,
                        input_shape=((None, None, data.x_train.shape[-1]) if config.crop_epochs
                                     else data.x_train.shape[1:]),
                        num_classes=len(data.class_names))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = config.bn_momentum
    if config.label_smoothing > 0:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
        accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    optimizer = make_optimizer(config.optimizer, learning_rate=config.learning_rate,
                               rho=config.rho, schedule=config.schedule, epochs=config.epochs,
                               steps_per_epoch=steps_per_epoch, ema=config.ema)
    model.compile(optimizer=optimizer, loss=loss, metrics=[accuracy])
    return model


def _finish_run(config: TrainConfig, model: keras.Model, train_ds: tf.data.Dataset,
                data: CIFAR10, preprocess: Preprocess, last: Path,
                history: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """After the last epoch: the final validation accuracy (and with test-time augmentation).
    With ``ema`` the averaged weights ``fit`` left in the model get batch-norm statistics of
    their own and become ``last.weights.h5`` (scored also before: ``..._stale_bn``)."""
    from allcnn_lib.evaluation import evaluate

    def score(**tta: Any) -> float:
        return evaluate(model, data.x_val, data.y_val, 512, preprocess=preprocess,
                        **tta).accuracy

    validated = len(data.y_val) > 0
    final = {"val_accuracy": float(history["val_accuracy"][-1])} if validated else {}
    if config.ema:
        if validated:
            final["val_accuracy_ema_stale_bn"] = score()
        final["bn_recalibration_batches"] = recalibrate_batch_norm(model, train_ds)
        with runs.atomic_path(last) as tmp:
            model.save_weights(str(tmp))
        if validated:
            final["val_accuracy"] = score()
    if validated and (config.tta_flip or config.tta_shift):
        final["val_accuracy_tta"] = score(flip=config.tta_flip, shift=config.tta_shift)
    return final


def train(config: TrainConfig, data: CIFAR10 | None = None, *, overwrite: bool = False,
          callbacks: Sequence[keras.callbacks.Callback] = ()) -> TrainResult:
    """Train ``config.arch`` on CIFAR-10 into ``runs/<id>/`` (``allcnn_lib.runs``).

    ``data`` defaults to ``load_cifar10(config.data_dir, limit=config.limit, ...)``. Model
    selection uses the validation split, never the test split. Run again, it resumes from the
    last completed epoch (``overwrite``: start afresh). A diverged run stops at its first
    non-finite epoch, unsaved (``terminated_on_nan``); a full disk raises ``DiskFullError``;
    Ctrl-C leaves ``status: interrupted`` in config.json. ``callbacks`` run before the
    run's own (e.g. notebook 06's activation telemetry).
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
    runs.remove_stale_temporaries(run_dir)
    backup_dir, initial_epoch = _prepare_backup(config, overwrite)
    for name in (runs.HISTORY_CSV, runs.BATCHES_CSV):  # rows after the backup's epochs go
        runs.truncate_csv(run_dir / name, initial_epoch)
    if initial_epoch:
        print(f"resuming {config.run_id} from epoch {initial_epoch + 1} "
              f"(backup in {backup_dir})", flush=True)
    else:  # nothing of an earlier run in this folder is taken for this one's
        for name in (runs.BEST_WEIGHTS, runs.LAST_WEIGHTS, runs.ZCA_FILE, runs.STANDARDIZER_FILE):
            (run_dir / name).unlink(missing_ok=True)
    preprocess = load_or_fit_preprocess(config.to_dict(), run_dir, data.x_train)
    one_hot = len(data.class_names) if config.label_smoothing > 0 else None
    train_ds = make_dataset(data.x_train, data.y_train, config.batch_size, training=True,
                            augment=config.augment, seed=config.seed, preprocess=preprocess,
                            num_classes=one_hot, repeat=True, max_shift=config.max_shift,
                            shift_fill=config.shift_fill)
    val_ds = (make_dataset(data.x_val, data.y_val, config.batch_size, preprocess=preprocess,
                           num_classes=one_hot) if len(data.y_val) else None)
    steps_per_epoch = config.steps_per_epoch or len(data.y_train) // config.batch_size
    stream = (crop_first(train_ds, config.crop_size, config.crop_epochs * steps_per_epoch)
              if config.crop_epochs else train_ds)

    previous_policy = keras.config.dtype_policy()
    if config.mixed_precision:
        keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        strategy = make_strategy(config.distribute)
        with strategy.scope():
            model = _build(config, data, steps_per_epoch)
            if not initial_epoch:  # a resumed run restores its weights from the backup
                if config.whiten_init:
                    sample = np.random.default_rng(config.seed).permutation(
                        len(data.x_train))[:WHITENING_IMAGES]
                    whiten_first_conv(model, preprocess(data.x_train[sample]).numpy(),
                                      seed=config.seed)
                finish_initialization(model, config.init, data.x_train, seed=config.seed,
                                      preprocess=preprocess)
            if config.initial_weights:
                runs.load_weights(model, config.initial_weights)
        meta = {**runs.portable_config(config.to_dict()), "run": {
            "model": model.name, "params": int(model.count_params()),
            "data_source": data.source, "is_sample": bool(data.is_sample),
            "train_images": int(len(data.y_train)), "validation_images": int(len(data.y_val)),
            "class_names": list(data.class_names), "steps_per_epoch": steps_per_epoch,
            "resumed_from_epoch": initial_epoch, "status": "running",
            "keras": keras.__version__, "tensorflow": tf.__version__,
            "backend": keras.backend.backend(), "replicas": strategy.num_replicas_in_sync}}
        runs.atomic_write_text(run_dir / runs.CONFIG_JSON, json.dumps(meta, indent=2))

        verbose = sys.stdout.isatty() if config.verbose is None else bool(config.verbose)
        earlier = runs.read_columns(run_dir / runs.HISTORY_CSV)  # earlier processes' epochs
        own = run_callbacks(run_dir, backup_dir, verbose=verbose,
                            monitor="val_accuracy" if val_ds is not None else "accuracy",
                            best_so_far=runs.best_epoch(earlier)[1])
        checkpoints = next(c for c in own if isinstance(c, Checkpoints))
        try:
            # One endless stream: a resumed run skips the batches it has seen (same order,
            # shifts and flips as without the interruption).
            model.fit(stream.skip(initial_epoch * steps_per_epoch), validation_data=val_ds,
                      epochs=config.epochs, initial_epoch=initial_epoch,
                      steps_per_epoch=steps_per_epoch, verbose=1 if verbose else 0,
                      callbacks=[*callbacks, *own], shuffle=False)
        except KeyboardInterrupt:
            _record_status(run_dir, meta, "interrupted")
            raise
        except Exception as err:
            _record_status(run_dir, meta, "failed", error=" ".join(str(err).split())[:300])
            raise
    finally:
        keras.config.set_dtype_policy(previous_policy)

    if checkpoints.disk_full is not None:
        _record_status(run_dir, meta, "disk_full", error=str(checkpoints.disk_full))
        raise checkpoints.disk_full
    history = runs.read_columns(run_dir / runs.HISTORY_CSV)
    best, best_acc = runs.best_epoch(history)
    completed = len(history.get("epoch", []))
    nan = checkpoints.nonfinite_epoch is not None or not np.isfinite(
        history.get("loss", [0.0])[-1])
    try:
        if completed >= config.epochs and not nan:
            meta["run"]["final"] = _finish_run(config, model, train_ds, data, preprocess,
                                               run_dir / runs.LAST_WEIGHTS, history)
    except KeyboardInterrupt:
        _record_status(run_dir, meta, "interrupted")
        raise
    seconds = float(np.nansum(earlier.get("time", []))) + time.perf_counter() - start
    meta["run"].update(epochs_completed=completed, best_epoch=best, best_val_accuracy=best_acc,
                       seconds=round(seconds, 1))
    if nan:
        meta["run"]["nonfinite_epoch"] = (completed - 1 if checkpoints.nonfinite_epoch is None
                                          else checkpoints.nonfinite_epoch)
    _record_status(run_dir, meta, "terminated_on_nan" if nan else "finished")
    if completed >= config.epochs or nan:  # done: nothing left to resume
        shutil.rmtree(backup_dir, ignore_errors=True)
    files = {name: run_dir / fname for name, fname in (
        ("config", runs.CONFIG_JSON), ("history", runs.HISTORY_CSV), ("batches", runs.BATCHES_CSV),
        ("best", runs.BEST_WEIGHTS), ("last", runs.LAST_WEIGHTS), ("zca", runs.ZCA_FILE),
        ("standardizer", runs.STANDARDIZER_FILE)) if (run_dir / fname).is_file()}
    return TrainResult(run_dir=run_dir, model=model, history=history, best_epoch=best,
                       best_val_accuracy=best_acc, initial_epoch=initial_epoch,
                       epochs_completed=completed, terminated_on_nan=nan, seconds=seconds,
                       files=files)
