"""The fast recipe (``allcnn train --recipe fast``): each trick on its own, then the preset end to
end through the command line on the shipped sample (tiny budgets: behaviour, not accuracy)."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from allcnn_lib import cli
from allcnn_lib.evaluation import predict_probabilities, tta_views
from allcnn_lib.initializers import patch_whitening_kernel, whiten_first_conv
from allcnn_lib.models import ARCH_PARAM_COUNTS, build_model
from allcnn_lib.preprocessing import standardize_preprocess
from allcnn_lib.recipes import RECIPES, cpu_description, cpu_has_bf16
from allcnn_lib.training import (
    TrainConfig,
    make_optimizer,
    make_schedule,
    recalibrate_batch_norm,
)

# --------------------------------------------------------------------------- one-cycle, EMA


def test_onecycle_rises_linearly_to_the_peak_then_falls_to_zero():
    schedule = make_schedule("onecycle", 0.4, steps_per_epoch=10, epochs=10)  # 100 steps
    lr = [float(schedule(k)) for k in (0, 10, 20, 60, 100, 150)]
    assert lr == pytest.approx([0.0, 0.2, 0.4, 0.2, 0.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="needs steps_per_epoch"):
        make_schedule("onecycle", 0.4)


def test_ema_is_keras_use_ema():
    opt = make_optimizer("sgd", learning_rate=0.1, ema=True)
    assert opt.use_ema and opt.ema_momentum == pytest.approx(0.99)
    assert not make_optimizer("sgd").use_ema


# --------------------------------------------------------------------------- patch whitening


def _standardized(cifar_sample, images):
    from allcnn_lib.preprocessing import Standardizer

    return standardize_preprocess(Standardizer().fit(cifar_sample.x_train))(images).numpy()


def test_patch_whitening_whitens_held_out_patches(cifar_sample):
    train = _standardized(cifar_sample, cifar_sample.x_train)
    kernel = patch_whitening_kernel(train, epsilon=1e-4, seed=0)
    assert kernel.shape == (3, 3, 3, 54)
    np.testing.assert_allclose(kernel[..., 27:], -kernel[..., :27])
    # conv1 with these filters on held-out images: the 27 outputs are decorrelated, unit variance
    held_out = _standardized(cifar_sample, cifar_sample.x_test)
    out = tf.nn.conv2d(held_out, kernel[..., :27], 1, "VALID").numpy().reshape(-1, 27)
    cov = np.cov(out, rowvar=False)
    assert np.abs(np.diag(cov) - 1).max() < 0.25
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 0.25
    # ... unlike the raw patches, whose neighbouring pixels are strongly correlated
    raw = tf.image.extract_patches(held_out, [1, 3, 3, 1], [1, 1, 1, 1], [1, 1, 1, 1],
                                   "VALID").numpy().reshape(-1, 27)
    raw_corr = np.corrcoef(raw, rowvar=False)
    assert np.abs(raw_corr - np.eye(27)).max() > 0.8


def test_whiten_first_conv_sets_54_filters_and_keeps_the_rest(cifar_sample):
    model = build_model("allcnn", batch_norm=True, dropout=False)
    before = keras.ops.convert_to_numpy(model.get_layer("conv1").kernel).copy()
    images = _standardized(cifar_sample, cifar_sample.x_train[:500])
    assert whiten_first_conv(model, images) == 54
    after = keras.ops.convert_to_numpy(model.get_layer("conv1").kernel)
    np.testing.assert_array_equal(after[..., 54:], before[..., 54:])
    whitening = patch_whitening_kernel(images)
    ratio = after[..., :54] / whitening
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)  # one global scale
    assert np.sqrt(np.mean(after[..., :54] ** 2)) == pytest.approx(
        np.sqrt(np.mean(before**2)), rel=0.05)


# --------------------------------------------------------------------------- batch norm, TTA


def test_recalibrated_batch_norm_holds_the_mean_of_the_batch_statistics():
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0 * k, 1.0 + k, size=(64, 4)).astype("float32") for k in range(3)]
    ds = tf.data.Dataset.from_tensor_slices(
        (np.concatenate(batches), np.zeros(192))).batch(64)
    assert recalibrate_batch_norm(model, ds, batches=10) == 3
    bn = model.layers[0]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean),
                               np.mean([b.mean(0) for b in batches], 0), rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance),
                               np.mean([b.var(0) for b in batches], 0), rtol=1e-4)
    assert bn.momentum == pytest.approx(0.99)  # restored


def test_tta_views():
    assert tta_views() == [(False, 0)]
    assert tta_views(flip=True) == [(False, 0), (True, 0)]
    assert len(tta_views(flip=True, shift=1)) == 6


def test_tta_averages_the_predictions_of_the_translated_and_mirrored_images(cifar_sample):
    model = build_model("strided", weight_decay=0)
    x = cifar_sample.x_test[:16]
    got = predict_probabilities(model, x, 8, flip=True, shift=1)
    views = []
    for mirrored in (False, True):
        source = x[:, :, ::-1] if mirrored else x
        padded = np.pad(source, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        for d in (0, 1, -1):
            views.append(padded[:, 1 - d:33 - d, 1 - d:33 - d])
    want = np.mean([predict_probabilities(model, v, 8) for v in views], axis=0)
    np.testing.assert_allclose(got, want, atol=1e-6)


# --------------------------------------------------------------------------- the network switch


def test_class_relu_switch_removes_only_relu9():
    plain = build_model("allcnn")
    without = build_model("allcnn", class_relu=False)
    assert without.count_params() == plain.count_params() == ARCH_PARAM_COUNTS["allcnn"]
    assert "relu9" in [la.name for la in plain.layers]
    assert "relu9" not in [la.name for la in without.layers]
    assert [la.name for la in without.layers] == [
        la.name for la in plain.layers if la.name != "relu9"]


# --------------------------------------------------------------------------- the command line


def parse(*argv: str):
    return cli.parse_arguments(list(argv))


def test_recipe_fast_sets_every_trick_and_explicit_flags_win():
    args = parse("train", "--recipe", "fast")
    for key, value in RECIPES["fast"].items():
        assert getattr(args, key) == value, key
    args = parse("train", "--recipe", "fast", "--bn", "0", "--no-ema", "--epochs", "7",
                 "--lr", "0.1")
    assert (args.batch_norm, args.ema, args.epochs, args.learning_rate) == (False, False, 7, 0.1)
    assert args.whiten_init is True
    plain = parse("train")  # without the preset every trick is off
    assert (plain.batch_norm, plain.ema, plain.whiten_init, plain.schedule, plain.shift_fill,
            plain.tta_shift, plain.mixed_precision) == (None, False, False, "paper", "zero", 0,
                                                        False)


def test_cpu_bf16_check_reads_the_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("flags : fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_bf16(info) is True
    info.write_text("flags : fpu avx2 fma\n")
    assert cpu_has_bf16(info) is False
    assert cpu_has_bf16(tmp_path / "missing") is None


def test_cpu_description_names_the_model_and_the_bf16_units(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name : Xeon\nflags : avx2 avx512f avx512_bf16 amx_bf16\n")
    assert cpu_description(info).split(", ")[2:] == ["AVX-512", "AVX512_BF16", "AMX-BF16"]
    info.write_text("model name : EPYC\nflags : avx2 fma\n")
    assert cpu_description(info).startswith("EPYC, ") and cpu_description(info).endswith("AVX2")


def test_mixed_precision_on_a_cpu_without_bf16_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(cli, "load_cifar10", lambda *a, **k: pytest.fail("loaded data"))
    code = cli.main(["train", "--mixed-precision", "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "no AVX512_BF16" in err[0] and "float32" in err[0]
    assert cli._resolve_mixed_precision("auto") is False  # the recipe falls back, with a note
    assert "trains in float32" in capsys.readouterr().out


def test_train_config_rejects_unknown_recipe_and_fill():
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainConfig(recipe="slow")
    with pytest.raises(ValueError, match="unknown shift_fill"):
        TrainConfig(shift_fill="wrap")
    with pytest.raises(ValueError, match="unknown train_on"):
        TrainConfig(train_on="test")


def _run(*args, cwd, timeout=600):
    import os

    env = {**os.environ, "ALLCNN_QUICK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "allcnn_lib", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    proc = _run("train", "--recipe", "fast", "--ema", "--epochs", "2", "--batch-size", "64",
                "--limit", "400", "--id", "fast", "--runs-dir", root / "runs", "--backup-dir",
                root / "backup", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, root / "runs" / "fast"


def test_recipe_run_records_its_settings_and_final_scores(recipe_run):
    root, run_dir = recipe_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["recipe"] == "fast" and config["schedule"] == "onecycle"
    assert config["whiten_init"] and config["ema"] and config["batch_norm"]
    assert config["mixed_precision"] == bool(cpu_has_bf16())
    final = config["run"]["final"]
    assert final["bn_recalibration_batches"] == 20  # of the endless training stream (default)
    for key in ("val_accuracy", "val_accuracy_tta", "val_accuracy_ema_stale_bn"):
        assert 0.0 <= final[key] <= 1.0
    assert config["run"]["data_source"] == "data/cifar10_sample.npz"


def test_evaluate_takes_test_time_augmentation_from_the_run(recipe_run):
    root, run_dir = recipe_run
    proc = _run("evaluate", "--weights", run_dir / "last.weights.h5", "--limit", "100",
                cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "test-time augmentation: flip and 1 px translations" in proc.stdout
    report = json.loads((run_dir / "evaluation.json").read_text())
    assert report["tta_flip"] is True and report["tta_shift"] == 1
    proc = _run("evaluate", "--weights", run_dir / "last.weights.h5", "--limit", "100",
                "--no-tta-flip", "--tta-shift", "0", cwd=root)
    assert proc.returncode == 0 and "test-time" not in proc.stdout


def test_train_on_all_has_no_validation(tmp_path):
    proc = _run("train", "--recipe", "fast", "--epochs", "1", "--batch-size", "64", "--limit",
                "200", "--train-on", "all", "--no-mixed-precision", "--id", "all",
                "--runs-dir", tmp_path / "runs", "--backup-dir", tmp_path / "b", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((tmp_path / "runs" / "all" / "config.json").read_text())
    assert config["run"]["train_images"] == 200 and config["run"]["validation_images"] == 0
    assert "val_accuracy" not in config["run"]["final"]
    assert (tmp_path / "runs" / "all" / "last.weights.h5").is_file()
