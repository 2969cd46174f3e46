"""allcnn_lib.evaluation: scores, confusion matrix, loading weights with clear errors."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from allcnn_lib import runs
from allcnn_lib.evaluation import (
    EvaluationResult,
    WeightsMismatchError,
    confusion_matrix,
    evaluate,
    load_trained_model,
)
from allcnn_lib.models import build_model
from allcnn_lib.runs import MODEL_NAMES, load_weights


def test_the_run_folders_names_match_the_library():
    """``allcnn_lib.runs`` holds the choice lists without TensorFlow; they match the modules
    that implement them."""
    from allcnn_lib import initializers, models, preprocessing, runs

    for arch, name in MODEL_NAMES.items():
        assert build_model(arch).name == name
    assert runs.VARIANTS == models.VARIANTS
    assert set(runs.INITIALIZERS) == {*initializers.INITIALIZERS, "lsuv"}
    assert runs.TrainConfig.zca_epsilon == preprocessing.PAPER_ZCA_EPSILON


def test_confusion_matrix_counts():
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


class _Oracle(keras.layers.Layer):
    """Predicts class (mean red value // 26): a model whose answers the test can compute."""

    def call(self, images):
        red = keras.ops.mean(images[..., 0], axis=(1, 2)) * 255.0
        cls = keras.ops.minimum(keras.ops.floor(red / 26.0), 9.0)
        one_hot = keras.ops.one_hot(keras.ops.cast(cls, "int32"), 10)
        return one_hot * 0.9 + 0.01  # rows sum to 1


def test_evaluate_scores_a_known_model(cifar_sample):
    x, y = cifar_sample.x_test[:300], cifar_sample.y_test[:300]
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, _Oracle()(inputs))
    red = (x[..., 0].astype(np.float64) / 255).mean(axis=(1, 2)) * 255
    expected = np.minimum(np.floor(red / 26), 9).astype(int)
    result = evaluate(model, x, y, batch_size=128)
    assert isinstance(result, EvaluationResult)
    assert result.n == 300
    np.testing.assert_array_equal(result.predictions, expected)
    assert result.accuracy == pytest.approx(np.mean(expected == y))
    np.testing.assert_array_equal(result.confusion, confusion_matrix(y, expected, 10))
    for c in range(10):
        mask = y == c
        assert result.per_class_accuracy[c] == pytest.approx(np.mean(expected[mask] == c))
    p_true = np.where(expected == y, 0.91, 0.01)
    assert result.loss == pytest.approx(np.mean(-np.log(p_true)), rel=1e-5)
    assert "airplane" in result.per_class_table()
    assert json.dumps(result.to_dict())


def test_evaluate_matches_keras_predict(cifar_sample):
    x, y = cifar_sample.x_test[:40], cifar_sample.y_test[:40]
    model = build_model("strided")
    result = evaluate(model, x, y, batch_size=16)
    probs = model.predict(x.astype(np.float32) / 255, verbose=0)
    np.testing.assert_allclose(result.probabilities, probs, atol=1e-5)
    assert result.accuracy == pytest.approx(np.mean(probs.argmax(1) == y))


def test_test_time_flip_averages_image_and_mirror(cifar_sample):
    x, y = cifar_sample.x_test[:24], cifar_sample.y_test[:24]
    keras.utils.set_random_seed(3)
    model = build_model("strided")
    plain = model.predict(x.astype(np.float32) / 255, verbose=0)
    mirrored = model.predict(x[:, :, ::-1].astype(np.float32) / 255, verbose=0)
    assert not np.allclose(plain, mirrored, atol=1e-6)  # the network is not flip-invariant
    result = evaluate(model, x, y, batch_size=16, flip=True)
    np.testing.assert_allclose(result.probabilities, (plain + mirrored) / 2, atol=1e-5)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1, atol=1e-5)


@pytest.fixture(scope="module")
def strided_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "best.weights.h5"
    model = build_model("strided")
    model.save_weights(path)
    return path, model


def test_load_trained_model_reads_the_network_off_the_file(strided_weights):
    path, original = strided_weights
    model = load_trained_model(path)
    assert model.name == "strided_cnn_c"
    for a, b in zip(model.weights, original.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_load_trained_model_uses_config_json(tmp_path):
    model = build_model("modelc", batch_norm=True, variant="repository")
    path = tmp_path / "best.weights.h5"
    model.save_weights(path)
    (tmp_path / "config.json").write_text(json.dumps(
        {"arch": "modelc", "variant": "repository", "batch_norm": True, "dropout": True}))
    loaded = load_trained_model(path)
    assert loaded.name == "model_c"
    assert any(layer.name == "bn1" for layer in loaded.layers)


def test_config_json_of_older_runs_names_the_repository_variant_seed(tmp_path):
    """Run folders written before the rename say "seed" for the original repository's variant."""
    build_model("allcnn", variant="repository").save_weights(tmp_path / "best.weights.h5")
    (tmp_path / "config.json").write_text(json.dumps(
        {"arch": "allcnn", "variant": "seed", "schedule": "seed"}))
    assert {k: runs.load_run_config(tmp_path)[k] for k in ("variant", "schedule")} == {
        "variant": "repository", "schedule": "inverse_time"}
    loaded = load_trained_model(tmp_path / "best.weights.h5")
    assert "input_dropout" not in [layer.name for layer in loaded.layers]
    assert loaded.get_layer("conv7").padding == "same"


def test_weights_of_another_architecture_name_both(strided_weights):
    path, _ = strided_weights
    with pytest.raises(WeightsMismatchError) as err:
        load_trained_model(path, arch="allcnn")
    message = str(err.value)
    assert "\n" not in message
    assert "strided_cnn_c (954,730 params)" in message
    assert "all_cnn_c (1,369,738 params)" in message
    assert "--arch strided" in message


def test_model_c_and_strided_weights_are_told_apart(strided_weights):
    """Equal shapes, different networks: the model name in the file decides."""
    path, _ = strided_weights
    with pytest.raises(WeightsMismatchError, match="but the model is model_c.*--arch strided"):
        load_weights(build_model("modelc"), path)


def test_batch_norm_mismatch_suggests_the_flag(strided_weights):
    path, _ = strided_weights
    with pytest.raises(WeightsMismatchError, match="--bn 0"):
        load_trained_model(path, arch="strided", batch_norm=True)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        load_trained_model(tmp_path / "absent.weights.h5")
    broken = tmp_path / "broken.weights.h5"
    broken.write_bytes(b"not hdf5")
    with pytest.raises(WeightsMismatchError, match="not a readable"):
        load_trained_model(broken, arch="strided")


def test_keras_model_files_load(tmp_path):
    model = build_model("strided")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = load_trained_model(path)
    assert loaded.name == "strided_cnn_c"
    with pytest.raises(WeightsMismatchError, match="strided_cnn_c"):
        load_trained_model(path, arch="allcnn")


def test_confusion_matrix_plot(tmp_path):
    from allcnn_lib.plots import confusion_matrix_plot

    cm = np.diag(np.arange(1, 11)) + 1
    fig = confusion_matrix_plot(cm, [f"c{i}" for i in range(10)], title="CM")
    ax = fig.axes[0]
    assert ax.get_title() == "CM"
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["c0", "c1"]
    fig.savefig(tmp_path / "cm.png")
