"""Tests of allcnn_lib.analysis: parameters, MACs and receptive fields of the three "C" networks
counted by hand from Tables 1 and 2 of Springenberg et al. (2014); class maps; activation
statistics at initialization (He et al. 2015); and stock batch-norm weights loaded
into the fused layers."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from allcnn_lib import analysis as A
from allcnn_lib import models as M

ARCHS = ("modelc", "strided", "allcnn")

# Forward MACs per conv for one 32x32 image: output positions x filters x kernel area x inputs.
HAND_MACS = {
    "allcnn": {"conv1": 2_654_208, "conv2": 84_934_656, "conv3": 21_233_664,
               "conv4": 42_467_328, "conv5": 84_934_656, "conv6": 21_233_664,
               "conv7": 11_943_936, "conv8": 1_327_104, "conv9": 69_120},
    "modelc": {"conv1": 2_654_208, "conv2": 84_934_656, "conv4": 42_467_328,
               "conv5": 84_934_656, "conv7": 11_943_936, "conv8": 1_327_104, "conv9": 69_120},
    # Strided-CNN-C: conv2 and conv5 have stride 2, so they produce 16x16 and 8x8 maps.
    "strided": {"conv1": 2_654_208, "conv2": 16 * 16 * 96 * 9 * 96, "conv4": 42_467_328,
                "conv5": 8 * 8 * 192 * 9 * 192, "conv7": 11_943_936, "conv8": 1_327_104,
                "conv9": 69_120},
}
# Receptive fields by hand: r += (k - 1) * j, then j *= s, starting from r = j = 1.
HAND_RF = {
    "allcnn": {"conv1": 3, "conv2": 5, "conv3": 7, "conv4": 11, "conv5": 15, "conv6": 19,
               "conv7": 27, "conv8": 27, "conv9": 27},
    "modelc": {"conv1": 3, "conv2": 5, "pool1": 7, "conv4": 11, "conv5": 15, "pool2": 19,
               "conv7": 27, "conv8": 27, "conv9": 27},
    "strided": {"conv1": 3, "conv2": 5, "conv4": 9, "conv5": 13, "conv7": 21, "conv8": 21,
                "conv9": 21},
}
# Parameters per conv: k*k*c_in*c_out + c_out.
HAND_PARAMS = {"conv1": 9 * 3 * 96 + 96, "conv2": 9 * 96 * 96 + 96, "conv3": 9 * 96 * 96 + 96,
               "conv4": 9 * 96 * 192 + 192, "conv5": 9 * 192 * 192 + 192,
               "conv6": 9 * 192 * 192 + 192, "conv7": 9 * 192 * 192 + 192,
               "conv8": 192 * 192 + 192, "conv9": 192 * 10 + 10}


# --------------------------------------------------------------------------- layer tables


def test_all_cnn_c_forward_macs_is_0_271_gmac(paper_models):
    macs = A.total_macs(paper_models["allcnn"])
    assert macs == sum(HAND_MACS["allcnn"].values()) == 270_798_336
    assert round(2 * 3 * macs / 1e9, 2) == 1.62  # training: forward + 2 backward, 2 FLOPs/MAC


@pytest.mark.parametrize("arch", ARCHS)
def test_macs_parameters_and_receptive_fields_match_hand_counts(paper_models, repository_models,
                                                                arch):
    table = A.layer_table(paper_models[arch])
    convs = table[table["kind"] == "conv"]
    assert convs["macs"].to_dict() == HAND_MACS[arch]
    assert table.loc[table["kind"] != "conv", "macs"].sum() == 0  # pools and GAP: no MACs
    assert convs["parameters"].to_dict() == {name: HAND_PARAMS[name] for name in HAND_MACS[arch]}
    assert table["parameters"].sum() == M.ARCH_PARAM_COUNTS[arch]
    every = A.layer_table(paper_models[arch], all_layers=True)
    assert every["parameters"].sum() == M.ARCH_PARAM_COUNTS[arch]
    rf = every["receptive_field"]
    assert {name: rf[name] for name in HAND_RF[arch]} == HAND_RF[arch]
    assert rf["image"] == 1 and rf["relu9"] == rf["conv9"]  # no kernel: the input's field
    # the original repository's deviations (no ReLU after stride-2 convs, conv7 "same") add
    # no weights
    assert A.layer_table(repository_models[arch])["parameters"].sum() == M.ARCH_PARAM_COUNTS[arch]


def test_repository_variant_differs_in_conv7_to_conv9(paper_models, repository_models):
    paper = A.layer_table(paper_models["allcnn"])
    repository = A.layer_table(repository_models["allcnn"])
    assert {n for n in paper.index if repository.loc[n, "macs"] != paper.loc[n, "macs"]} == {
        "conv7", "conv8", "conv9"}
    assert repository.loc["conv7", "output_shape"] == (8, 8, 192)
    assert repository.loc["conv7", "receptive_field"] == 27
    assert repository.loc["global_average_pooling", "receptive_field"] == 27 + 7 * 4


def test_layer_macs_of_dense_and_grouped_conv():
    inputs = keras.Input((8, 8, 4))
    grouped = keras.layers.Conv2D(6, 3, padding="same", groups=2)
    dense_3d = keras.layers.Dense(5)
    dense = keras.layers.Dense(3)
    keras.Model(inputs, dense(keras.layers.Flatten()(dense_3d(grouped(inputs)))))
    assert A.layer_macs(grouped) == 8 * 8 * 6 * 3 * 3 * 4 // 2
    assert A.layer_macs(dense_3d) == 8 * 8 * 6 * 5  # applied at every position
    assert A.layer_macs(dense) == 8 * 8 * 5 * 3
    assert A.layer_macs(keras.layers.ReLU()) == 0


def test_parameters_with_batch_norm_count_all_bn_weights():
    model = M.all_cnn_c(batch_norm=True)
    table = A.layer_table(model, all_layers=True)
    assert table.loc["bn1", "parameters"] == 4 * 96
    assert table.loc["conv1", "parameters"] == 9 * 3 * 96  # no bias under batch norm
    assert table["parameters"].sum() == model.count_params()


def test_jump_centre_and_global_window_of_all_cnn_c(paper_models):
    table = A.layer_table(paper_models["allcnn"])
    assert list(table.columns) == ["kind", "output_shape", "parameters", "macs", "kernel",
                                   "stride", "receptive_field", "jump", "centre"]
    assert table.loc["conv3", "jump"] == 2 and table.loc["conv6", "jump"] == 4
    # TensorFlow's "same" padding with stride 2 on an even side pads only after the last
    # row: conv3's unit 0 is centred on pixel 1, conv6's on 3, and conv7 ("valid") on 3 + 4.
    assert table.loc["conv3", "centre"] == 1.0
    assert table.loc["conv6", "centre"] == 3.0
    assert table.loc["conv7", "centre"] == 7.0
    gap = table.loc["global_average_pooling"]
    assert gap["kernel"] == 6 and gap["output_shape"] == (10,)
    assert gap["receptive_field"] == 27 + 5 * 4  # wider than the 32-pixel image: sees it all
    assert gap["centre"] == 7.0 + 2.5 * 4
    modelc = A.layer_table(paper_models["modelc"])
    assert list(modelc.index) == ["conv1", "conv2", "pool1", "conv4", "conv5", "pool2",
                                  "conv7", "conv8", "conv9", "global_average_pooling"]


def test_receptive_field_of_dilated_conv_pool_and_fc_head():
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(2, 3, dilation_rate=2, padding="same", name="dilated")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Dense(3, name="fc")(keras.layers.Flatten(name="flatten")(x))
    rf = A.layer_table(keras.Model(inputs, x), all_layers=True)["receptive_field"]
    assert rf["dilated"] == 5  # a dilated 3x3 spans 5 pixels
    assert rf["pool"] == 6 and rf["flatten"] == 6
    assert rf["fc"] == 6 + (8 - 1) * 2  # a fully connected unit sees the whole 8x8 map


def test_branching_models_are_refused():
    inputs = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(1, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(1, 3, padding="same", name="b")(inputs)
    with pytest.raises(ValueError, match="not a chain"):
        A.layer_table(keras.Model(inputs, keras.layers.Add()([a, b])))


# --------------------------------------------------------------------------- class maps


def test_class_maps_mean_is_the_score_before_softmax():
    keras.utils.set_random_seed(1)
    model = M.all_cnn_c(batch_norm=True, dropout=False)
    images = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    maps = A.class_maps(model, images)
    assert maps.shape == (4, 6, 6, 10) and maps.dtype == np.float32
    scores = maps.mean(axis=(1, 2))
    probs = np.exp(scores - scores.max(1, keepdims=True))
    np.testing.assert_allclose(probs / probs.sum(1, keepdims=True),
                               model.predict(images, verbose=0), atol=1e-5)
    assert A.class_maps(model, images, layer="relu7").shape == (4, 6, 6, 192)


def test_upsample_maps_shapes_and_values():
    maps = np.zeros((2, 6, 6, 3), np.float32)
    maps[..., 1] = 2.5
    up = A.upsample_maps(maps, 32)
    assert up.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(up[..., 1], 2.5, atol=1e-6)  # a constant map stays constant
    np.testing.assert_allclose(up[..., 0], 0.0)
    ramp = np.arange(6, dtype=np.float32)[None, :, None] * np.ones((6, 1, 1), np.float32)
    single = A.upsample_maps(ramp, 12)
    assert single.shape == (12, 12, 1)
    assert np.all(np.diff(single[0, :, 0]) >= 0)  # bilinear keeps a ramp monotonic


# --------------------------------------------------------------------------- activation statistics

@pytest.fixture(scope="module")
def cifar(cifar_sample):
    """64 real CIFAR-10 training images, per-channel standardized, and their labels."""
    x = cifar_sample.x_train[:64].astype(np.float32) / 255.0
    x = (x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2))
    return x.astype(np.float32), cifar_sample.y_train[:64]


def test_activation_stats_defaults_order_and_post_activations(cifar):
    keras.utils.set_random_seed(0)
    y = inputs = keras.Input((32, 32, 3))
    y = keras.layers.Flatten()(y)
    for k in range(1, 4):
        dense = keras.layers.Dense(64, kernel_initializer="he_normal", name=f"dense{k}")
        y = keras.layers.ReLU(name=f"relu{k}")(dense(y))
    model = keras.Model(inputs, keras.layers.Dense(10, name="classifier")(y))
    x = cifar[0]
    assert list(A.activation_stats(model, x)) == ["dense1", "dense2", "dense3", "classifier"]
    relu, pre = A.activation_stats(model, x, ["relu2"]), A.activation_stats(model, x, ["dense2"])
    # A ReLU of a zero-mean symmetric y keeps E[y^2]/2 and has std < that of y.
    assert 0.3 * pre["dense2"] < relu["relu2"] < pre["dense2"]


def test_all_cnn_c_activations_on_real_images(cifar):
    x = cifar[0][:8]
    he = A.activation_stats(M.all_cnn_c(dropout=False, initializer="he_normal"), x)
    gaussian = A.activation_stats(M.all_cnn_c(dropout=False, initializer="gaussian"), x)
    assert list(he) == [f"conv{k}" for k in range(1, 10)]
    assert all(0.3 < s < 3.0 for s in he.values()), he
    assert gaussian["conv9"] < 1e-5 * gaussian["conv1"], gaussian


def test_activation_statistics_of_a_dead_and_a_live_channel():
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.ReLU(name="relu")(keras.layers.Conv2D(2, 1, name="conv")(inputs))
    model = keras.Model(inputs, x)
    model.get_layer("conv").set_weights([np.array([[[[1.0, -1.0]]]]), np.zeros(2)])
    positive = np.full((3, 4, 4, 1), 2.0, np.float32)  # channel 0: 2 everywhere, 1: dead
    row = A.activation_statistics(model, positive).loc["relu"]
    assert row["mean"] == 1.0 and row["std"] == 1.0
    assert row["zero fraction"] == 0.5 and row["dead channels"] == 0.5
    mixed = np.concatenate([positive, -positive])  # channel 1 now fires on the negative images
    row = A.activation_statistics(model, mixed).loc["relu"]
    assert row["zero fraction"] == 0.5 and row["dead channels"] == 0.0


def test_activation_statistics_in_training_mode_leave_the_moving_statistics(images):
    keras.utils.set_random_seed(0)
    model = M.all_cnn_c(batch_norm=True)
    before = [np.array(v) for v in model.non_trainable_variables]
    stats = A.activation_statistics(model, images, training=True)
    assert list(stats.index) == [f"relu{k}" for k in range(1, 10)]
    # batch statistics: each ReLU sees a normalized pre-activation, half of its outputs zero
    assert np.allclose(stats["zero fraction"], 0.5, atol=0.1)
    for variable, value in zip(model.non_trainable_variables, before, strict=True):
        np.testing.assert_array_equal(np.array(variable), value)


# --------------------------------------------------------------------------- batch norm


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.0, 1.0, (2, 32, 32, 3)).astype("float32")


def test_stock_batch_norm_weights_load_into_the_fused_layers_by_name(tmp_path, monkeypatch):
    """Keras files a layer's variables under its class name, so a file saved from stock
    ``BatchNormalization`` (the course's earlier shipped models) loads into
    ``FusedBatchNormalization`` only through ``load_weights``' by-name fallback."""
    from allcnn_lib.runs import load_weights

    with monkeypatch.context() as patch:
        patch.setattr(M, "FusedBatchNormalization", keras.layers.BatchNormalization)
        stock = M.all_cnn_c(batch_norm=True)
    fused = M.all_cnn_c(batch_norm=True)
    assert "FusedBatchNormalization" not in {type(layer).__name__ for layer in stock.layers}
    assert any(isinstance(layer, M.FusedBatchNormalization) for layer in fused.layers)
    rng = np.random.default_rng(0)
    for variable in stock.weights:  # every variable, moving statistics included, made distinct
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    stock.save_weights(tmp_path / "stock.weights.h5")
    load_weights(fused, tmp_path / "stock.weights.h5")
    for saved, loaded in zip(stock.weights, fused.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(loaded))
