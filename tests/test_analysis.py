"""Tests of allcnn_lib.analysis (notebooks 11 and 12): the three ReLU backward rules of
Springenberg et al. (2014), Section 4, checked exactly; the model copy whose ReLUs follow a
rule; input-gradient maps; batch norm folded into the convolutions; activation statistics;
receptive-field boxes; loading the shipped weights; and the image helpers of plots."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from allcnn_lib import analysis  # noqa: E402
from allcnn_lib.architecture import layer_table  # noqa: E402
from allcnn_lib.models import ARCH_PARAM_COUNTS, all_cnn_c  # noqa: E402
from allcnn_lib.plots import heat_overlay, image_table, tile_images  # noqa: E402

# Every case of a ReLU's backward pass: inputs x below, at and above zero, against upstream
# signals g of both signs. The expected results are written out by hand from the rules.
X = tf.constant([-2.0, -1.0, 0.0, 0.0, 1.0, 2.0, 3.0])
G = tf.constant([1.0, -1.0, 2.0, -2.0, -3.0, 4.0, 0.5])
EXPECTED = {
    "gradient": [0.0, 0.0, 0.0, 0.0, -3.0, 4.0, 0.5],  # g where x > 0
    "deconvnet": [1.0, 0.0, 2.0, 0.0, 0.0, 4.0, 0.5],  # g where g > 0
    "guided": [0.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.5],  # g where x > 0 and g > 0
}


# --------------------------------------------------------------------------- the ReLU rules


@pytest.mark.parametrize("method", analysis.RELU_BACKWARD_METHODS)
def test_relu_backward_rule_is_exact(method):
    got = np.asarray(analysis.relu_backward(X, G, method))
    np.testing.assert_array_equal(got, EXPECTED[method])


@pytest.mark.parametrize("method", analysis.RELU_BACKWARD_METHODS)
def test_custom_gradient_relu_is_a_relu_forward_and_the_rule_backward(method):
    with tf.GradientTape() as tape:
        tape.watch(X)
        y = analysis.relu_with_backward(method)(X)
    np.testing.assert_array_equal(y, tf.nn.relu(X))
    np.testing.assert_array_equal(tape.gradient(y, X, output_gradients=G), EXPECTED[method])


@pytest.mark.parametrize("method", analysis.RELU_BACKWARD_METHODS)
def test_backward_rule_relu_layer_sends_back_the_rule(method):
    layer = analysis.BackwardRuleReLU(method, name="relu_test")
    x = tf.reshape(X, (1, 7))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    np.testing.assert_array_equal(tape.gradient(y, x, output_gradients=tf.reshape(G, (1, 7)))[0],
                                  EXPECTED[method])
    assert layer.get_config()["method"] == method


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        analysis.relu_backward(X, G, "lrp")
    with pytest.raises(ValueError, match="unknown method"):
        analysis.BackwardRuleReLU("lrp")


# --------------------------------------------------------------------------- maps


def _randomize_batch_norm(model: keras.Model, seed: int = 1) -> keras.Model:
    """Batch-norm layers with non-trivial gamma, beta and moving statistics."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2.0, n), rng.normal(0.0, 0.3, n),
                               rng.normal(0.0, 0.3, n), rng.uniform(0.2, 3.0, n)])
    return model


@pytest.fixture(scope="module")
def bn_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return _randomize_batch_norm(all_cnn_c(batch_norm=True))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.0, 1.0, (2, 32, 32, 3)).astype("float32")


def test_with_relu_backward_swaps_only_the_relus_and_shares_the_weights(bn_model):
    copy = analysis.with_relu_backward(bn_model, "guided")
    assert [la.name for la in copy.layers] == [la.name for la in bn_model.layers]
    for original, copied in zip(bn_model.layers, copy.layers, strict=True):
        if isinstance(original, keras.layers.ReLU):
            assert isinstance(copied, analysis.BackwardRuleReLU) and copied.method == "guided"
        elif not isinstance(original, keras.layers.InputLayer):  # clone_model makes a new one
            assert copied is original  # the same layer: trained weights shared, not copied


def test_gradient_rule_reproduces_tensorflows_input_gradient(bn_model, images):
    scores = keras.Model(bn_model.input, bn_model.get_layer("global_average_pooling").output)
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        target = tf.reduce_sum(scores(x, training=False)[:, 3])
    expected = tape.gradient(target, x).numpy()
    got = analysis.input_gradients(bn_model, images, "global_average_pooling", "gradient",
                                   channel=3)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_guided_map_has_the_image_shape_and_differs_from_the_plain_gradient(bn_model, images):
    guided = analysis.input_gradients(bn_model, images, "relu6", "guided")
    plain = analysis.input_gradients(bn_model, images, "relu6", "gradient")
    assert guided.shape == plain.shape == images.shape
    assert np.abs(guided).max() > 0
    assert not np.allclose(guided, plain)


def test_deconvnet_map_of_a_class_score_does_not_depend_on_the_image(bn_model, images):
    maps = analysis.input_gradients(bn_model, images, "global_average_pooling", "deconvnet",
                                    channel=5)
    np.testing.assert_allclose(maps[0], maps[1], rtol=1e-5, atol=1e-9)
    guided = analysis.input_gradients(bn_model, images, "global_average_pooling", "guided",
                                      channel=5)
    assert not np.allclose(guided[0], guided[1])


def test_strongest_units_and_one_position(bn_model, images):
    units = analysis.strongest_units(bn_model, images, "relu6")
    assert units.shape == (2, 3) and (units[:, :2] < 8).all() and (units[:, 2] < 192).all()
    at = analysis.input_gradients(bn_model, images[:1], "relu6", "guided",
                                  position=tuple(units[0, :2]))
    best = analysis.input_gradients(bn_model, images[:1], "relu6", "guided")
    np.testing.assert_allclose(at, best, rtol=1e-6, atol=1e-12)


def test_a_units_gradient_stays_in_its_receptive_field():
    keras.utils.set_random_seed(0)
    model = all_cnn_c()
    table = layer_table(model)
    image = np.random.default_rng(1).uniform(0, 1, (1, 32, 32, 3)).astype("float32")
    top, left, side = analysis.receptive_field_box(table, "conv4", 3, 5)
    assert (top, left, side) == (2.0, 6.0, 11)  # centre 1 + 2 * (3, 5), minus (11 - 1) / 2
    gradient = analysis.input_gradients(model, image, "conv4", "gradient", position=(3, 5))[0]
    rows = np.flatnonzero(np.abs(gradient).sum(axis=(1, 2)))
    cols = np.flatnonzero(np.abs(gradient).sum(axis=(0, 2)))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 12, 6, 16)


def test_gradient_image_maps_zero_to_grey_and_stays_in_range():
    gradient = np.zeros((2, 4, 4, 3))
    gradient[0, 0, 0, 0], gradient[1, 1, 1, 1] = 5.0, -2.0
    shown = analysis.gradient_image(gradient, percentile=100)
    assert shown.min() >= 0 and shown.max() <= 1
    assert shown[0, 0, 0, 0] == 1.0 and shown[1, 1, 1, 1] == 0.0 and shown[0, 2, 2, 2] == 0.5


def test_kernel_images_scale_each_filter_with_zero_grey():
    kernel = np.zeros((3, 3, 3, 2))
    kernel[0, 0, 0, 0], kernel[1, 1, 1, 1] = 0.2, -4.0
    shown = analysis.kernel_images(kernel)
    assert shown.shape == (2, 3, 3, 3)
    assert shown[0, 0, 0, 0] == 1.0 and shown[1, 1, 1, 1] == 0.0 and shown[0, 2, 2, 2] == 0.5


# --------------------------------------------------------------------------- batch norm


def test_fold_batch_norm_matches_the_batch_norm_model(bn_model, images):
    folded = analysis.fold_batch_norm(bn_model)
    assert not any(isinstance(la, keras.layers.BatchNormalization) for la in folded.layers)
    assert folded.count_params() == ARCH_PARAM_COUNTS["allcnn"]  # the paper's network again
    np.testing.assert_allclose(folded.predict(images, verbose=0),
                               bn_model.predict(images, verbose=0), atol=1e-4)
    maps = [keras.Model(m.input, m.get_layer("relu9").output)(images, training=False)
            for m in (bn_model, folded)]
    np.testing.assert_allclose(maps[1], maps[0], rtol=1e-4, atol=1e-5)


def test_fold_batch_norm_keeps_a_convolutions_own_bias():
    inputs = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(3, 3, use_bias=True, bias_initializer="ones", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = _randomize_batch_norm(keras.Model(inputs, x), seed=3)
    x_test = np.random.default_rng(2).normal(size=(4, 5, 5, 2)).astype("float32")
    folded = analysis.fold_batch_norm(model)
    assert [la.name for la in folded.layers[1:]] == ["conv"]
    np.testing.assert_allclose(folded(x_test), model(x_test, training=False), rtol=1e-5,
                               atol=1e-5)


def test_activation_statistics_of_a_dead_and_a_live_channel():
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Conv2D(2, 1, name="conv")(inputs)
    x = keras.layers.ReLU(name="relu")(x)
    model = keras.Model(inputs, x)
    model.get_layer("conv").set_weights([np.array([[[[1.0, -1.0]]]]), np.zeros(2)])
    positive = np.full((3, 4, 4, 1), 2.0, np.float32)  # channel 0: 2 everywhere, 1: dead
    row = analysis.activation_statistics(model, positive).loc["relu"]
    assert row["mean"] == 1.0 and row["std"] == 1.0
    assert row["zero fraction"] == 0.5 and row["dead channels"] == 0.5


def test_activation_statistics_in_training_mode_leave_the_moving_statistics(images):
    keras.utils.set_random_seed(0)
    model = all_cnn_c(batch_norm=True)
    before = [np.array(v) for v in model.non_trainable_variables]
    stats = analysis.activation_statistics(model, images, training=True)
    assert list(stats.index) == [f"relu{k}" for k in range(1, 10)]
    # batch statistics: each ReLU sees a normalized pre-activation, half of its outputs zero
    assert np.allclose(stats["zero fraction"], 0.5, atol=0.1)
    for variable, value in zip(model.non_trainable_variables, before, strict=True):
        np.testing.assert_array_equal(np.array(variable), value)


def test_class_score_summary_of_a_network_with_constant_scores(images):
    keras.utils.set_random_seed(0)
    model = all_cnn_c()
    conv9 = model.get_layer("conv9")
    conv9.set_weights([np.zeros_like(w) for w in conv9.get_weights()])  # every score 0
    summary = analysis.class_score_summary(model, images, np.array([0, 1]))
    assert summary == {"accuracy": 0.5, "classes predicted": 1, "score spread": 0.0}


def test_inference_speed_is_a_positive_rate():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    images = np.zeros((10, 8, 8, 3), np.float32)
    assert analysis.inference_speed(model, images, batch_size=4, repeats=2) > 0


# --------------------------------------------------------------------------- loading, figures


def test_stock_batch_norm_weights_load_into_the_fused_layers_by_name(tmp_path, monkeypatch):
    """Keras files a layer's variables under its class name, so a file saved from stock
    ``BatchNormalization`` (the course's earlier shipped models) loads into
    ``FusedBatchNormalization`` only through ``load_weights``' by-name fallback."""
    import keras

    from allcnn_lib import models
    from allcnn_lib.runs import load_weights

    with monkeypatch.context() as patch:
        patch.setattr(models, "FusedBatchNormalization", keras.layers.BatchNormalization)
        stock = models.all_cnn_c(batch_norm=True)
    fused = models.all_cnn_c(batch_norm=True)
    kinds = {type(layer).__name__ for layer in stock.layers}
    assert "BatchNormalization" in kinds and "FusedBatchNormalization" not in kinds
    assert any(isinstance(layer, models.FusedBatchNormalization) for layer in fused.layers)
    rng = np.random.default_rng(0)
    for variable in stock.weights:  # every variable, moving statistics included, made distinct
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    path = tmp_path / "stock.weights.h5"
    stock.save_weights(path)
    load_weights(fused, path)
    for saved, loaded in zip(stock.weights, fused.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(loaded))


def test_image_helpers():
    images = np.random.default_rng(0).uniform(0, 1, (5, 3, 3, 3))
    mosaic = tile_images(images, columns=2, pad=1)
    assert mosaic.shape == (3 * 4 + 1, 2 * 4 + 1, 3)
    np.testing.assert_array_equal(mosaic[1:4, 5:8], images[1])
    blended = heat_overlay(np.zeros((4, 4, 3), np.uint8), np.arange(16.0).reshape(4, 4))
    assert blended.shape == (4, 4, 3) and 0 <= blended.min() and blended.max() <= 1
    fig = image_table({"a": list(images[:2]), "b": list(images[2:4])}, ["x", "y"], title="t")
    assert len(fig.axes) == 4
    plt.close(fig)
