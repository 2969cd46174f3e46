"""allcnn_lib.training: optimizers, schedules, the input pipeline, atomic checkpoints, CSV logs.

End-to-end training, resume after SIGKILL, determinism and MirroredStrategy run through the CLI
in ``test_cli.py``.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from allcnn_lib import runs, training
from allcnn_lib.runs import atomic_write_text, truncate_csv
from allcnn_lib.training import (
    Checkpoints,
    EpochLogger,
    TrainConfig,
    backup_epoch,
    base_initializer,
    crop_first,
    current_learning_rate,
    finish_initialization,
    make_dataset,
    make_optimizer,
    make_schedule,
    paper_boundaries,
)

# --------------------------------------------------------------------------- optimizers


def test_sgd_is_the_seeds_nesterov_momentum():
    opt = make_optimizer("sgd")
    assert isinstance(opt, keras.optimizers.SGD)
    assert opt.momentum == pytest.approx(0.9)
    assert opt.nesterov is True
    assert current_learning_rate(opt, 0) == pytest.approx(0.01)


def test_default_learning_rates_and_override():
    assert current_learning_rate(make_optimizer("adam"), 0) == pytest.approx(0.001)
    assert isinstance(make_optimizer("adam"), keras.optimizers.Adam)
    rms = make_optimizer("rmsprop")
    assert isinstance(rms, keras.optimizers.RMSprop)
    assert current_learning_rate(rms, 0) == pytest.approx(0.001)
    assert rms.rho == pytest.approx(0.9)
    assert current_learning_rate(make_optimizer("sgd", learning_rate=0.05), 0) == \
        pytest.approx(0.05)


@pytest.mark.parametrize("k", [0, 1, 10, 1000, 390 * 350, 10**6])
def test_inverse_time_schedule_is_the_seeds_keras2_decay(k):
    """lr_k = 0.01 / (1 + 1e-6 k): what Keras 2's SGD(decay=1e-6) did and Keras 3 dropped."""
    opt = make_optimizer("sgd", schedule="inverse_time")
    schedule = opt.get_config()["learning_rate"]  # the public, serialized schedule
    assert schedule["class_name"] == "InverseTimeDecay"
    assert schedule["config"] | {"name": None} == {
        "initial_learning_rate": 0.01, "decay_steps": 1, "decay_rate": 1e-6, "staircase": False,
        "name": None}
    assert current_learning_rate(opt, k) == pytest.approx(0.01 / (1 + 1e-6 * k), rel=1e-6)


def test_paper_boundaries_at_350_epochs_are_the_papers_epochs():
    assert paper_boundaries(350) == [200, 250, 300]
    assert paper_boundaries(350 * 390) == [200 * 390, 250 * 390, 300 * 390]


def test_paper_boundaries_scale_to_the_run_length():
    assert paper_boundaries(1000) == [571, 714, 857]  # 200/350, 250/350, 300/350 of the run
    assert paper_boundaries(3) == [2, 3, 4]  # tiny runs: still strictly increasing
    with pytest.raises(ValueError):
        paper_boundaries(0)


@pytest.mark.parametrize("steps_per_epoch,epochs", [(1, 350), (7, 20), (390, 350)])
def test_paper_schedule_divides_by_ten_at_each_boundary(steps_per_epoch, epochs):
    schedule = make_schedule("paper", 0.1, steps_per_epoch=steps_per_epoch, epochs=epochs)
    drops = paper_boundaries(steps_per_epoch * epochs)
    assert float(schedule(0)) == pytest.approx(0.1)
    for i, d in enumerate(drops):
        assert float(schedule(d - 1)) == pytest.approx(0.1 * 0.1**i), (i, d)
        assert float(schedule(d)) == pytest.approx(0.1 * 0.1 ** (i + 1)), (i, d)


def test_paper_schedule_on_350_epochs_drops_after_epoch_200():
    spe = 10
    opt = make_optimizer("sgd", schedule="paper", steps_per_epoch=spe, epochs=350)
    assert current_learning_rate(opt, 200 * spe - 1) == pytest.approx(0.01)  # last of epoch 200
    assert current_learning_rate(opt, 200 * spe) == pytest.approx(0.001)  # first of epoch 201
    assert current_learning_rate(opt, 350 * spe - 1) == pytest.approx(1e-5)


def test_constant_schedule_and_errors():
    assert make_schedule("constant", 0.3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_schedule("paper", 0.1)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("step", 0.1, steps_per_epoch=1, epochs=1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("adagrad")


def _rmsprop_steps(rho: float, gradients: list[float]) -> list[float]:
    opt = make_optimizer("rmsprop", rho=rho)
    var = keras.Variable([0.0])
    steps, before = [], 0.0
    for g in gradients:
        opt.apply_gradients([(keras.ops.convert_to_tensor([g]), var)])
        now = float(var.numpy()[0])
        steps.append(abs(now - before))
        before = now
    return steps


def test_rmsprop_rho_zero_takes_sign_like_steps_of_size_lr():
    """rho=0: the denominator is the last |g| alone, so a tiny gradient after a large one
    still moves the weight by about lr; with rho=0.9 the memory of the large one keeps the
    step tiny."""
    lr = 0.001
    small_after_large = _rmsprop_steps(0.0, [10.0, 0.01])
    assert small_after_large[1] == pytest.approx(lr, rel=0.1)
    assert _rmsprop_steps(0.9, [10.0, 0.01])[1] < 0.01 * lr
    assert make_optimizer("rmsprop", rho=0.0).rho == 0.0


# --------------------------------------------------------------------------- input pipeline


def _batches(ds) -> list[tuple[np.ndarray, ...]]:
    return [tuple(np.asarray(t) for t in batch) for batch in ds]


def test_make_dataset_evaluation_keeps_order_and_scales(cifar_sample):
    x, y = cifar_sample.x_val[:70], cifar_sample.y_val[:70]
    ds = make_dataset(x, y, 32)
    options = ds.options()
    assert options.autotune.enabled is False
    assert options.deterministic is True
    batches = _batches(ds)
    assert [len(b[0]) for b in batches] == [32, 32, 6]  # evaluation keeps the remainder
    images = np.concatenate([b[0] for b in batches])
    assert images.dtype == np.float32
    np.testing.assert_allclose(images, x.astype(np.float32) / 255, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)


def test_make_dataset_predict_without_labels(cifar_sample):
    ds = make_dataset(cifar_sample.x_val[:10], None, 4)
    shapes = [np.asarray(b).shape for b in ds]
    assert shapes == [(4, 32, 32, 3), (4, 32, 32, 3), (2, 32, 32, 3)]


def test_make_dataset_training_is_seeded_and_reshuffles(cifar_sample):
    x, y = cifar_sample.x_train[:64], cifar_sample.y_train[:64]
    a = make_dataset(x, y, 16, training=True, augment=True, seed=3)
    b = make_dataset(x, y, 16, training=True, augment=True, seed=3)
    epoch1, epoch2 = _batches(a), _batches(a)
    assert [len(batch[0]) for batch in epoch1] == [16] * 4
    for u, v in zip(epoch1, _batches(b), strict=True):  # same seed: the same epoch
        np.testing.assert_array_equal(u[0], v[0])
        np.testing.assert_array_equal(u[1], v[1])
    assert not np.array_equal(epoch1[0][1], epoch2[0][1])  # a new order every epoch
    other = _batches(make_dataset(x, y, 16, training=True, augment=True, seed=4))
    assert not np.array_equal(other[0][0], epoch1[0][0])


def test_make_dataset_repeat_streams_every_image_once_per_pass(cifar_sample):

    x, y = cifar_sample.x_train[:40], cifar_sample.y_train[:40]
    ds = make_dataset(x, y, 16, training=True, augment=False, seed=1, repeat=True)
    assert int(ds.cardinality().numpy()) == int(tf.data.INFINITE_CARDINALITY)
    images = np.concatenate([np.asarray(b[0]) for b in ds.take(5)])  # 80 images: two passes
    key = lambda a: sorted(map(bytes, (np.round(a * 255).astype(np.uint8))))  # noqa: E731
    assert key(images[:40]) == key(x.astype(np.float32) / 255)
    assert key(images[40:]) == key(x.astype(np.float32) / 255)
    assert not np.array_equal(images[:40], images[40:])  # reshuffled on the second pass


def test_standardize_preprocess_matches_the_standardizer(cifar_sample):
    from allcnn_lib.preprocessing import Standardizer, standardize_preprocess

    x = cifar_sample.x_train[:50]
    std = Standardizer().fit(cifar_sample.x_train[:500])
    got = np.concatenate([np.asarray(b) for b in make_dataset(
        x, None, 16, preprocess=standardize_preprocess(std))])
    np.testing.assert_allclose(got, std.transform(x), rtol=1e-5, atol=1e-5)
    whole = std.transform(cifar_sample.x_train[:500])
    np.testing.assert_allclose(whole.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(whole.std(axis=(0, 1, 2)), 1, atol=1e-4)


def test_make_dataset_augmentation_shifts_and_flips(cifar_sample):
    """Every augmented image is its original, maybe flipped, shifted by at most 3 px (10%)."""
    from allcnn_lib.preprocessing import tf_shift_flip

    x = cifar_sample.x_train[:32]
    y = np.arange(32)  # labels as indices: find each image's original
    plain = x.astype(np.float32) / 255
    images, idx = _batches(make_dataset(x, y, 32, training=True, augment=True, seed=0))[0]
    moves = [(dy, dx, f) for dy in range(-3, 4) for dx in range(-3, 4) for f in (False, True)]
    found = []
    for image, j in zip(images, idx, strict=True):
        candidates = tf_shift_flip(np.repeat(plain[j][None], len(moves), axis=0),
                                   *map(np.array, zip(*moves, strict=True))).numpy()
        match = [m for m, c in zip(moves, candidates, strict=True) if np.allclose(c, image)]
        assert match, f"image {j} is no shift/flip of its original"
        found.append(match[0])
    assert sum(m != (0, 0, False) for m in found) > len(found) // 2
    assert any(m[2] for m in found) and any(not m[2] for m in found)


def test_make_dataset_drop_remainder_and_one_hot(cifar_sample):
    x, y = cifar_sample.x_train[:70], cifar_sample.y_train[:70]
    batches = _batches(make_dataset(x, y, 32, training=True, num_classes=10))
    assert [len(b[0]) for b in batches] == [32, 32]  # training batches are all full
    labels = batches[0][1]
    assert labels.shape == (32, 10)
    np.testing.assert_array_equal(labels.sum(axis=1), 1)


def test_crop_first_cuts_the_first_batches_of_the_same_stream(cifar_sample):
    """The first 3 batches are the central 24 x 24 pixels of the batches the stream yields
    anyway (after 4 px shifts: random crops); later ones are whole; ``skip`` keeps the count."""
    x, y = cifar_sample.x_train[:40], cifar_sample.y_train[:40]

    def stream():
        return make_dataset(x, y, 8, training=True, augment=True, seed=5, repeat=True,
                            max_shift=4, shift_fill="reflect")

    whole = [b[0].numpy() for b in stream().take(6)]
    cut = crop_first(stream(), 24, 3)
    assert cut.element_spec[0].shape.as_list() == [8, None, None, 3]
    got = [b[0].numpy() for b in cut.take(6)]
    assert [g.shape[1:3] for g in got] == [(24, 24)] * 3 + [(32, 32)] * 3
    for w, g in zip(whole[:3], got[:3], strict=True):
        np.testing.assert_array_equal(g, w[:, 4:28, 4:28])
    for w, g in zip(whole[3:], got[3:], strict=True):
        np.testing.assert_array_equal(g, w)
    assert [b[0].shape[1] for b in cut.skip(2).take(2)] == [24, 32]
    odd = next(iter(crop_first(stream(), 9, 1)))[0]  # the smallest crop, off-centre by half
    np.testing.assert_array_equal(odd.numpy(), whole[0][:, 11:20, 11:20])


# --------------------------------------------------------------------------- initialization


def test_base_initializer_starts_lsuv_from_orthogonal():
    assert base_initializer("lsuv") == "orthogonal"
    for name in ("glorot_uniform", "glorot_normal", "he_uniform", "gaussian"):
        assert base_initializer(name) == name


def _conv_output_variances(model: keras.Model, images: np.ndarray) -> list[float]:
    from allcnn_lib.analysis import activation_stats
    from allcnn_lib.models import conv_layers

    return [std**2 for std in activation_stats(model, images, conv_layers(model)).values()]


def test_finish_initialization_runs_lsuv_for_lsuv_only():
    from allcnn_lib.models import build_model

    x = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    keras.utils.set_random_seed(0)
    glorot = build_model("allcnn", initializer=base_initializer("glorot_uniform"))
    before = [w.copy() for w in glorot.get_weights()]
    assert finish_initialization(glorot, "glorot_uniform", x) is glorot
    assert all(np.array_equal(a, b) for a, b in zip(before, glorot.get_weights(), strict=True))
    assert max(abs(v - 1.0) for v in _conv_output_variances(glorot, x / 255.0)) > 0.5

    lsuv_models = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        model = build_model("allcnn", initializer=base_initializer("lsuv"))
        lsuv_models.append(finish_initialization(model, "lsuv", x, seed=3))
    # all 48 images (fewer than LSUV_IMAGES) through /255: every conv output has unit variance
    variances = _conv_output_variances(lsuv_models[0], (x / 255.0).astype("float32"))
    assert all(abs(v - 1.0) < 0.1 for v in variances), variances
    for a, b in zip(lsuv_models[0].get_weights(), lsuv_models[1].get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_train_sets_up_lsuv_through_finish_initialization(cifar_sample, tmp_path, monkeypatch):
    calls = []
    original = training.finish_initialization

    def spy(model, init, x_train, **kwargs):
        calls.append((init, len(x_train), kwargs["seed"]))
        return original(model, init, x_train, **kwargs)

    monkeypatch.setattr(training, "finish_initialization", spy)
    config = TrainConfig(run_id="lsuv", arch="strided", init="lsuv", epochs=1, steps_per_epoch=2,
                         batch_size=16, seed=5, runs_dir=str(tmp_path / "runs"), verbose=False)
    result = training.train(config, data=cifar_sample)
    assert calls == [("lsuv", len(cifar_sample.x_train), 5)]
    assert len(result.history["loss"]) and np.isfinite(result.history["loss"][-1])


# --------------------------------------------------------------------------- atomic files


def _tiny_model() -> keras.Model:
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs), name="tiny")
    model.compile(optimizer="sgd", loss="mse")
    return model


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if runs.TMP_MARK in p.name)


def _checkpoints(tmp_path: Path, model: keras.Model) -> Checkpoints:
    cb = Checkpoints(tmp_path, tmp_path / "backup")
    cb.set_model(model)
    return cb


def _files(tmp_path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(tmp_path.rglob("*.h5"))}


def test_checkpoints_replace_files_atomically_and_keep_the_best(tmp_path):
    model = _tiny_model()
    cb = _checkpoints(tmp_path, model)
    cb.on_epoch_end(0, {"val_accuracy": 0.5})
    assert set(_files(tmp_path)) == {"best.weights.h5", "last.weights.h5", "latest.weights.h5"}
    best, last = (tmp_path / "best.weights.h5").stat().st_ino, (tmp_path / "last.weights.h5")
    cb.on_epoch_end(1, {"val_accuracy": 0.4})  # no improvement: best untouched
    assert (tmp_path / "best.weights.h5").stat().st_ino == best
    model.get_layer("dense").kernel.assign(np.ones((4, 2)))
    before = last.stat().st_ino
    cb.on_epoch_end(2, {"val_accuracy": 0.6})
    assert (tmp_path / "best.weights.h5").stat().st_ino != best  # moved into place
    assert last.stat().st_ino != before
    assert _leftovers(tmp_path) == []
    fresh = _tiny_model()
    fresh.load_weights(tmp_path / "best.weights.h5")
    np.testing.assert_array_equal(fresh.get_layer("dense").kernel.numpy(), np.ones((4, 2)))


def test_checkpoint_failure_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    model = _tiny_model()
    cb = _checkpoints(tmp_path, model)
    cb.on_epoch_end(0, {})
    good = _files(tmp_path)

    def crash(filepath, overwrite=True, **kwargs):
        Path(filepath).write_bytes(b"half a checkpoint")  # the write starts ...
        raise OSError("I/O error")  # ... and dies

    monkeypatch.setattr(model, "save_weights", crash)
    with pytest.raises(OSError, match="I/O error"):
        cb.on_epoch_end(1, {})
    assert _files(tmp_path) == good and _leftovers(tmp_path) == []
    _tiny_model().load_weights(tmp_path / "last.weights.h5")  # still a valid checkpoint


def test_atomic_write_text_and_stale_temporaries(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}"
    (tmp_path / f".config.json{runs.TMP_MARK}abc.json").write_text("junk")
    assert len(runs.remove_stale_temporaries(tmp_path)) == 1
    assert _leftovers(tmp_path) == []


def test_backup_records_the_completed_epochs_and_restores_the_weights(tmp_path):
    model = _tiny_model()
    model.get_layer("dense").kernel.assign(np.ones((4, 2)))
    assert backup_epoch(tmp_path / "backup") == 0
    _checkpoints(tmp_path, model).on_epoch_end(2, {})
    assert backup_epoch(tmp_path / "backup") == 3
    restored = _tiny_model()
    _checkpoints(tmp_path, restored).on_train_begin()
    for a, b in zip(restored.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_nan_state_never_replaces_a_good_checkpoint_or_backup(tmp_path):
    """Issue 20, item 2: the epoch after a good one diverges (NaN weights, and a validation
    accuracy that would count as an improvement); best, last and the backup keep the good
    epoch, and training is told to stop."""
    model = _tiny_model()
    cb = _checkpoints(tmp_path, model)
    cb.on_epoch_end(0, {"loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.3})
    good = _files(tmp_path)
    kernel = model.get_layer("dense").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    cb.on_epoch_end(1, {"loss": 0.5, "val_loss": 0.5, "val_accuracy": 0.9})  # finite losses
    assert _files(tmp_path) == good
    assert cb.nonfinite_epoch == 1 and model.stop_training
    assert backup_epoch(tmp_path / "backup") == 1
    # and a NaN loss alone is enough
    cb2 = _checkpoints(tmp_path / "two", _tiny_model())
    cb2.on_epoch_end(0, {"loss": float("nan")})
    assert cb2.nonfinite_epoch == 0 and not (tmp_path / "two" / "last.weights.h5").exists()


def test_disk_full_mid_write_keeps_the_checkpoint_and_stops(tmp_path, monkeypatch):
    """Issue 20, item 6: ENOSPC in the middle of a checkpoint: the previous file stays, no
    temporary is left, the error names the file and the space, and training stops."""
    model = _tiny_model()
    cb = _checkpoints(tmp_path, model)
    cb.on_epoch_end(0, {"loss": 1.0})
    good = _files(tmp_path)

    def full(filepath, overwrite=True, **kwargs):
        Path(filepath).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(filepath))

    monkeypatch.setattr(model, "save_weights", full)
    cb.on_epoch_end(1, {"loss": 0.9})
    assert _files(tmp_path) == good and _leftovers(tmp_path) == []
    assert backup_epoch(tmp_path / "backup") == 1  # the backup was not attempted after it
    assert isinstance(cb.disk_full, runs.DiskFullError) and model.stop_training
    message = str(cb.disk_full)
    assert "no space left on device for " in message and "last.weights.h5" in message
    assert "MB free" in message and "\n" not in message


def test_checkpoint_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    model = _tiny_model()
    cb = _checkpoints(tmp_path, model)
    monkeypatch.setattr(runs, "free_bytes", lambda folder: 1000)
    cb.on_epoch_end(0, {"loss": 1.0})
    assert "needs about 1.3 MB, 0.0 MB free" in str(cb.disk_full)
    assert not (tmp_path / "last.weights.h5").exists() and _leftovers(tmp_path) == []
    with pytest.raises(runs.DiskFullError, match="config.json"):
        runs.atomic_path(tmp_path / "config.json", size_hint=10).__enter__()


def test_backup_carries_the_dropout_seed_state(tmp_path):
    """Issue 20, item 15: a resumed run draws the dropout masks the uninterrupted run drew."""
    def model_with_dropout() -> keras.Model:
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dropout(0.5, seed=1)(inputs))
        model.compile(optimizer="sgd", loss="mse")
        return model

    model = model_with_dropout()
    x = np.ones((8, 4), "float32")
    model(x, training=True)  # advances the seed generator
    _checkpoints(tmp_path, model).on_epoch_end(0, {})
    expected = keras.ops.convert_to_numpy(model(x, training=True))
    resumed = model_with_dropout()
    _checkpoints(tmp_path, resumed).on_train_begin()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(resumed(x, training=True)),
                                  expected)


# --------------------------------------------------------------------------- logs


def test_truncate_csv_keeps_only_completed_epochs(tmp_path):
    path = tmp_path / "batches.csv"
    path.write_text("epoch,batch,loss\n0,0,1.0\n0,1,0.9\n1,0,0.8\n1,1,0.7\n2,0,0.6\n2,1")
    assert truncate_csv(path, 2) == 4
    rows = list(csv.reader(io.StringIO(path.read_text())))
    assert rows[0] == ["epoch", "batch", "loss"]
    assert [r[:2] for r in rows[1:]] == [["0", "0"], ["0", "1"], ["1", "0"], ["1", "1"]]
    assert truncate_csv(path, 0) == 0
    assert not path.exists()  # a fresh run starts with no rows
    assert truncate_csv(tmp_path / "absent.csv", 3) == 0


def test_epoch_logger_adds_time_and_rate_and_prints_one_line():
    out = io.StringIO()
    logger = EpochLogger(stream=out)
    logger.set_model(_tiny_model())
    logger.set_params({"epochs": 10})
    logs = {"loss": 1.2341, "accuracy": 0.4561, "val_loss": 1.3, "val_accuracy": 0.42}
    logger.on_epoch_begin(2)
    logger.on_epoch_end(2, logs)
    assert logs["learning_rate"] == pytest.approx(0.01) and 0 <= logs["time"] < 10
    assert out.getvalue() == (f"epoch 3/10  loss 1.234  acc 0.456  val_loss 1.300  "
                              f"val_acc 0.420  {logs['time']:.1f} s\n")
    quiet = io.StringIO()
    logger = EpochLogger(quiet=True, stream=quiet)
    logger.set_model(_tiny_model())
    logger.on_epoch_begin(0)
    logger.on_epoch_end(0, {})
    assert quiet.getvalue() == ""


def test_train_config_validates_and_names_runs(tmp_path):
    cfg = TrainConfig(arch="strided", init="he_normal", optimizer="adam", seed=3,
                      runs_dir=str(tmp_path))
    assert cfg.run_id == "strided_he_normal_adam_seed3"
    assert cfg.run_dir == tmp_path / cfg.run_id
    assert cfg.resolved_backup_dir() == Path.home() / ".cache/allcnn/backup" / cfg.run_id
    for bad in ({"arch": "resnet"}, {"schedule": "step"}, {"init": "zeros"},
                {"distribute": "tpu"}, {"epochs": 0}, {"label_smoothing": 1.0},
                {"run_id": "../x"}, {"steps_per_epoch": 0},
                {"normalize": True, "zca": True}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="crop_epochs 6 is not from 0 to the run's 5 epochs; "
                                         "lower crop_epochs or raise epochs"):
        TrainConfig(epochs=5, crop_epochs=6)
    for side in (8, 33):
        with pytest.raises(ValueError, match=f"crop_size must be from 9 to 32 pixels, got {side}"):
            TrainConfig(epochs=5, crop_epochs=1, crop_size=side)
    assert TrainConfig(epochs=5, crop_epochs=5, crop_size=9).crop_epochs == 5


def test_training_curves_figure(tmp_path):
    from allcnn_lib.plots import save_figure, training_curves

    history = {"epoch": [0, 1, 2], "accuracy": [0.2, 0.3, 0.4], "val_accuracy": [0.25, 0.3, 0.35],
               "loss": [2.0, 1.8, 1.6], "val_loss": [1.9, 1.8, 1.7]}
    batches = {"epoch": [0, 0, 1, 1, 2, 2], "batch": [0, 1, 0, 1, 0, 1],
               "step": [0, 1, 2, 3, 4, 5], "accuracy": [0.1, 0.3, 0.2, 0.4, 0.3, 0.5]}
    fig = training_curves(history, "accuracy", batches=batches)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "accuracy"
    assert "accuracy" in ax.get_title()
    assert len(ax.lines) == 4  # per batch, smoothed, training, validation
    path = save_figure(fig, tmp_path / "acc.png", close=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["acc.png"]
    # a run trained on all 50,000 images has no validation: no empty "validation" entry
    history["val_accuracy"] = [float("nan")] * 3
    ax = training_curves(history, "accuracy", batches=batches).axes[0]
    assert len(ax.lines) == 3 and ax.get_title() == "Training accuracy"
    assert "validation" not in [text.get_text() for text in ax.get_legend().get_texts()]


def test_gcn_zca_in_the_pipeline_matches_the_numpy_reference(cifar_sample):
    from allcnn_lib.preprocessing import ZCAWhitening, gcn_zca_preprocess, global_contrast_normalize

    rng = np.random.default_rng(0)
    zca = ZCAWhitening(epsilon=0.1)  # a stand-in "fit": any mean and symmetric matrix will do
    zca.mean_ = rng.normal(0, 0.1, 3072)
    w = rng.normal(0, 0.02, (3072, 3072)).astype(np.float32)
    zca.whitening_matrix_ = (w + w.T) / 2 + np.eye(3072, dtype=np.float32)
    zca.feature_shape_ = (32, 32, 3)
    x = cifar_sample.x_val[:20]
    expected = zca.transform(global_contrast_normalize(x))
    got = np.concatenate([np.asarray(b) for b in make_dataset(
        x, None, 8, preprocess=gcn_zca_preprocess(zca))])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("crop_epochs", [0, 1])
def test_an_interrupted_train_resumes_to_the_same_numbers(cifar_sample, tmp_path, monkeypatch,
                                                          crop_epochs):
    """Ctrl-C in epoch 2, then ``train`` again: it resumes from the backup (weights, optimizer,
    dropout seeds, the data pipeline's position) and logs what an uninterrupted run logs. With
    ``crop_epochs=1`` epoch 1 trains on 24 x 24 crops and the resumed epoch 2 on whole images."""
    from allcnn_lib.data import CIFAR10

    data = CIFAR10(cifar_sample.x_train[:96], cifar_sample.y_train[:96],
                   cifar_sample.x_val[:20], cifar_sample.y_val[:20], cifar_sample.x_test[:10],
                   cifar_sample.y_test[:10], cifar_sample.class_names, cifar_sample.source,
                   cifar_sample.is_sample)

    def config(run_id: str) -> TrainConfig:
        return TrainConfig(run_id=run_id, arch="strided", epochs=2, batch_size=32, seed=2,
                           runs_dir=str(tmp_path / "runs"), backup_dir=str(tmp_path / run_id),
                           verbose=False, crop_epochs=crop_epochs)

    reference = training.train(config("ref"), data)
    side = None if crop_epochs else 32  # a network for any side when it trains on crops
    assert reference.model.input_shape == (None, side, side, 3)

    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self.model.optimizer.iterations.numpy() == 4:  # epoch 2 of 3 batches
                raise KeyboardInterrupt

    callbacks = training.run_callbacks

    def interrupted(*args, **kwargs):  # Ctrl-C before the backup of epoch 2
        found = callbacks(*args, **kwargs)
        return [*found[:-1], Interrupt(), found[-1]]

    monkeypatch.setattr(training, "run_callbacks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        training.train(config("cut"), data)
    assert json.loads((tmp_path / "runs/cut/config.json").read_text())["run"]["status"] == \
        "interrupted"
    monkeypatch.setattr(training, "run_callbacks", callbacks)
    # the first process's epoch, made long: the run's seconds must count it, not only the
    # resuming process's own time
    history = tmp_path / "runs/cut/history.csv"
    rows = list(csv.DictReader(io.StringIO(history.read_text())))
    rows[0]["time"] = "1000.0"
    with history.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    resumed = training.train(config("cut"), data)
    assert resumed.initial_epoch == 1 and resumed.epochs_completed == 2
    recorded = json.loads((tmp_path / "runs/cut/config.json").read_text())["run"]["seconds"]
    assert 1000 < resumed.seconds < 1000 + 600 and 1000 < recorded < 1000 + 600
    for name in ("history.csv", "batches.csv"):
        rows = [[v for k, v in row.items() if k != "time"]
                for row in csv.DictReader(io.StringIO((tmp_path / "runs/cut" / name).read_text()))]
        assert rows == [[v for k, v in row.items() if k != "time"] for row in csv.DictReader(
            io.StringIO((reference.run_dir / name).read_text()))]
