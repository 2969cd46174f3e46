"""Tests of allcnn_lib.analysis: parameters, MACs and receptive fields of the three "C" networks
counted by hand from Tables 1 and 2 of Springenberg et al. (2014); class maps; activation and
gradient statistics at initialization (He et al. 2015); batch norm folding; and the ReLU backward
rules of Springenberg et al., Section 4, checked exactly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from allcnn_lib import analysis as A
from allcnn_lib import models as M
from allcnn_lib.initializers import INITIALIZERS, expected_std, fans, uniform_limit

REPO = Path(__file__).resolve().parent.parent
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
def test_macs_parameters_and_receptive_fields_match_hand_counts(paper_models, seed_models, arch):
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
    # the seed's deviations (no ReLU after stride-2 convs, conv7 "same") add no weights
    assert A.layer_table(seed_models[arch])["parameters"].sum() == M.ARCH_PARAM_COUNTS[arch]


def test_seed_variant_differs_in_conv7_to_conv9(paper_models, seed_models):
    paper = A.layer_table(paper_models["allcnn"])
    seed = A.layer_table(seed_models["allcnn"])
    assert {n for n in paper.index if seed.loc[n, "macs"] != paper.loc[n, "macs"]} == {
        "conv7", "conv8", "conv9"}
    assert seed.loc["conv7", "output_shape"] == (8, 8, 192)
    assert seed.loc["conv7", "receptive_field"] == 27
    assert seed.loc["global_average_pooling", "receptive_field"] == 27 + 7 * 4
    diff = A.variant_differences(paper_models["allcnn"], seed_models["allcnn"])
    assert list(diff.index) == ["input_dropout", "relu3", "relu6", "conv7", "relu7", "conv8",
                                "relu8", "conv9", "relu9"]
    assert diff.loc["relu3", "seed output"] == "absent"
    assert diff.loc["relu3", "paper output"] == (16, 16, 96)
    assert diff.loc["conv7", "seed output"] == (8, 8, 192)
    assert diff.loc["conv7", "paper parameters"] == diff.loc["conv7", "seed parameters"]
    assert diff.loc["conv7", "seed MACs"] == 8 * 8 * 192 * 9 * 192
    assert A.variant_differences(paper_models["modelc"], paper_models["modelc"]).empty


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


def test_architecture_summary(paper_models):
    summary = A.architecture_summary(paper_models)
    assert summary["parameters"].to_dict() == M.ARCH_PARAM_COUNTS
    assert summary.loc["allcnn", "forward MMAC"] == 270.8
    assert summary.loc["allcnn", "training GFLOP"] == 1.62
    assert summary["conv9 receptive field (px)"].to_dict() == {"modelc": 27, "strided": 21,
                                                                "allcnn": 27}
    assert set(summary["class map"]) == {"6x6"}
    assert set(A.PAPER_TABLE3_PARAMS) == set(M.ARCH_PARAM_COUNTS)


def test_receptive_field_box_bounds_a_units_gradient():
    keras.utils.set_random_seed(0)
    model = M.all_cnn_c()
    image = np.random.default_rng(1).uniform(0, 1, (1, 32, 32, 3)).astype("float32")
    top, left, side = A.receptive_field_box(A.layer_table(model), "conv4", 3, 5)
    assert (top, left, side) == (2.0, 6.0, 11)  # centre 1 + 2 * (3, 5), minus (11 - 1) / 2
    gradient = A.input_gradients(model, image, "conv4", "gradient", position=(3, 5))[0]
    rows = np.flatnonzero(np.abs(gradient).sum(axis=(1, 2)))
    cols = np.flatnonzero(np.abs(gradient).sum(axis=(0, 2)))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 12, 6, 16)


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


def test_class_score_summary_of_a_network_with_constant_scores(images):
    keras.utils.set_random_seed(0)
    model = M.all_cnn_c()
    conv9 = model.get_layer("conv9")
    conv9.set_weights([np.zeros_like(w) for w in conv9.get_weights()])  # every score 0
    summary = A.class_score_summary(model, images, np.array([0, 1]))
    assert summary == {"accuracy": 0.5, "classes predicted": 1, "score spread": 0.0}


# --------------------------------------------------------------------------- signal propagation

DEPTH, WIDTH = 20, 256
HIDDEN = [f"dense{k}" for k in range(1, DEPTH + 1)]
#: Keras' truncated normal: cut at 2 stds of a normal whose std is divided by this constant.
TRUNCATED_STD = 0.87962566103423978


@pytest.fixture(scope="module")
def cifar(cifar_sample):
    """64 real CIFAR-10 training images, per-channel standardized, and their labels."""
    x = cifar_sample.x_train[:64].astype(np.float32) / 255.0
    x = (x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2))
    return x.astype(np.float32), cifar_sample.y_train[:64]


@pytest.fixture(scope="module")
def stacks():
    """20-layer, 256-wide dense ReLU stacks, one per initializer."""
    return {name: A.deep_relu_stack(DEPTH, WIDTH, name)
            for name in ("gaussian", "glorot_normal", "he_normal")}


@pytest.fixture(scope="module")
def stack_stats(stacks, cifar):
    """Pre-activation stds of the 20 hidden layers (the classifier left out) per initializer."""
    return {name: A.activation_stats(model, cifar[0], HIDDEN) for name, model in stacks.items()}


def test_deep_relu_stack_layout_and_per_layer_seeds():
    model = A.deep_relu_stack(3, 16, "he_normal", seed=5)
    assert [layer.name for layer in model.layers] == [
        "image", "flatten", "dense1", "relu1", "dense2", "relu2", "dense3", "relu3",
        "classifier", "softmax"]
    assert [la.name for la in A.linear_layers(model)] == ["dense1", "dense2", "dense3",
                                                          "classifier"]
    k2, k3 = (model.get_layer(n).kernel.numpy() for n in ("dense2", "dense3"))
    assert not np.allclose(k2, k3), "equal-shaped layers must not start identical"
    again = A.deep_relu_stack(3, 16, "he_normal", seed=5).get_layer("dense2").kernel.numpy()
    np.testing.assert_array_equal(again, k2)
    other = A.deep_relu_stack(3, 16, "he_normal", seed=6).get_layer("dense2").kernel.numpy()
    assert not np.allclose(other, k2)
    keras_init = A.deep_relu_stack(3, 16, keras.initializers.HeNormal(seed=0))
    k2, k3 = (keras_init.get_layer(n).kernel.numpy() for n in ("dense2", "dense3"))
    assert not np.allclose(k2, k3), "a Keras initializer is reseeded per layer"


def test_deep_relu_stack_conv_kind_and_bad_arguments():
    model = A.deep_relu_stack(2, 8, "glorot_uniform", kind="conv")
    assert [la.name for la in A.linear_layers(model)] == ["conv1", "conv2", "classifier"]
    assert tuple(model.get_layer("conv2").kernel.shape) == (3, 3, 8, 8)
    np.testing.assert_allclose(np.sum(model(np.ones((2, 32, 32, 3), np.float32)), axis=-1),
                               1.0, rtol=1e-5)
    for kwargs in (dict(depth=0, width=4), dict(depth=2, width=0), dict(depth=2, width=4,
                                                                          kind="pool")):
        with pytest.raises(ValueError, match="depth >= 1"):
            A.deep_relu_stack(**kwargs)


def test_he_keeps_relu_activation_std_gaussian_collapses_it(stack_stats):
    """He init keeps the pre-activation std within a factor 2 over 20 ReLU layers; Glorot
    halves the variance per layer (std x 2**-0.5); N(0, 0.01^2) shrinks it by ~0.11 a layer."""
    he, glorot, gaussian = (stack_stats[n] for n in ("he_normal", "glorot_normal", "gaussian"))
    assert all(0.5 < s < 2.5 for s in he.values()), he
    assert 0.5 < A.std_ratio(he) < 2.0
    assert 1e-4 < A.std_ratio(glorot) < 1e-2  # 2 ** (-19 / 2) = 1.4e-3
    assert A.std_ratio(gaussian) < 1e-15  # 0.113 ** 19 = 1e-18
    assert all(math.isfinite(s) and s > 0 for s in gaussian.values())


def test_measured_stds_follow_he_recursion(stacks, stack_stats, cifar):
    for name, stats in stack_stats.items():
        shapes = [tuple(stacks[name].get_layer(n).kernel.shape) for n in stats]
        predicted = A.predicted_preactivation_std(
            [expected_std(name, *fans(s)) for s in shapes], [s[0] for s in shapes],
            float(np.mean(cifar[0].astype(np.float64) ** 2)))
        ratio = np.asarray(list(stats.values())) / predicted
        assert np.all((ratio > 0.5) & (ratio < 2.0)), (name, ratio)


def test_activation_stats_defaults_order_and_post_activations(stacks, cifar):
    model, x = stacks["he_normal"], cifar[0]
    assert list(A.activation_stats(model, x)) == HIDDEN + ["classifier"]
    relu, pre = A.activation_stats(model, x, ["relu5"]), A.activation_stats(model, x, ["dense5"])
    # A ReLU of a zero-mean symmetric y keeps E[y^2]/2 and has std < that of y.
    assert 0.3 * pre["dense5"] < relu["relu5"] < pre["dense5"]


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


def _small_problem(seed: int = 1):
    model = A.deep_relu_stack(2, 6, "he_normal", seed=seed)
    rng = np.random.default_rng(0)
    return model, rng.standard_normal((7, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 7)


def test_kernel_gradient_std_matches_finite_differences():
    """The std that gradient_stats reports is that of the true gradient of the mean loss."""
    model, x, y = _small_problem()
    stats = A.gradient_stats(model, x, y)
    assert list(stats) == ["dense1", "dense2", "classifier"]

    def loss() -> float:
        p = keras.ops.convert_to_numpy(model(x, training=False)).astype(np.float64)
        return float(np.mean(-np.log(p[np.arange(len(y)), y])))

    for name in ("dense2", "classifier"):
        kernel = model.get_layer(name).kernel
        w = kernel.numpy()
        numeric = np.zeros(w.shape)
        for idx in np.ndindex(w.shape):
            for sign in (1, -1):
                shifted = w.copy()
                shifted[idx] += sign * 1e-2
                kernel.assign(shifted)
                numeric[idx] += sign * loss() / 2e-2
        kernel.assign(w)
        assert stats[name] == pytest.approx(numeric.std(), rel=2e-2), name


def test_gradient_reductions_mean_for_kernels_sum_for_outputs(stacks, cifar):
    """Duplicating the batch keeps the kernel gradient (mean loss) and the per-example
    output gradients (summed loss): both are independent of the batch size."""
    x, y = cifar
    one, two = (x[:4], y[:4]), (np.concatenate([x[:4]] * 2), np.concatenate([y[:4]] * 2))
    for wrt in ("kernel", "output"):
        a = A.gradient_stats(stacks["he_normal"], *one, ["dense3", "classifier"], wrt=wrt)
        b = A.gradient_stats(stacks["he_normal"], *two, ["dense3", "classifier"], wrt=wrt)
        assert b == pytest.approx(a, rel=1e-4), wrt
    with pytest.raises(ValueError, match="wrt"):
        A.gradient_stats(stacks["he_normal"], x[:2], y[:2], wrt="bias")


def test_backpropagated_gradient_he_flat_glorot_vanishes_toward_input(stacks, cifar):
    he, glorot, gaussian = (A.gradient_stats(stacks[name], *cifar, HIDDEN, wrt="output")
                            for name in ("he_normal", "glorot_normal", "gaussian"))
    assert list(he) == HIDDEN
    assert 0.5 < A.std_ratio(he) < 2.0, he
    assert A.std_ratio(glorot) > 100  # ~2 ** (19 / 2) = 724: smaller toward the input
    assert A.std_ratio(gaussian) > 1e15  # x 0.113 a layer toward the input: 0.113 ** -19


def test_propagation_stats_gives_the_three_statistics(stacks, cifar):
    x, y = cifar
    stats = A.propagation_stats(stacks["he_normal"], x[:8], y[:8], ["dense1", "classifier"])
    assert list(stats) == ["activation", "output_gradient", "kernel_gradient"]
    assert all(list(v) == ["dense1", "classifier"] for v in stats.values())
    assert stats["activation"] == A.activation_stats(stacks["he_normal"], x[:8],
                                                     ["dense1", "classifier"])


@pytest.mark.parametrize("name", sorted(INITIALIZERS))
def test_sampled_std_matches_expected_std(name):
    shape = (3, 3, 96, 192)  # conv4 of All-CNN-C: 331,776 weights
    expected = expected_std(name, *fans(shape), columns=shape[-1])
    assert np.std(A.sample_kernel(name, shape, seed=3)) == pytest.approx(expected, rel=0.01)


def test_sample_kernel_shapes_limits_and_seeds():
    shape = (3, 3, 192, 192)
    fan_in, fan_out = fans(shape)
    he_uniform = A.sample_kernel("he_uniform", shape, seed=0)
    assert he_uniform.shape == shape and he_uniform.dtype == np.float32
    limit = uniform_limit("he_uniform", fan_in, fan_out)
    assert 0.999 * limit < np.abs(he_uniform).max() <= limit * (1 + 1e-6)
    he_normal = A.sample_kernel("he_normal", shape, seed=0)
    cut = 2 * expected_std("he_normal", fan_in, fan_out) / TRUNCATED_STD
    assert np.abs(he_normal).max() <= cut * (1 + 1e-6)  # truncated at 2 (rescaled) stds
    assert np.abs(A.sample_kernel("gaussian", shape, seed=0)).max() > 4 * 0.01  # untruncated
    np.testing.assert_array_equal(A.sample_kernel("he_normal", shape, seed=0), he_normal)
    assert not np.array_equal(A.sample_kernel("he_normal", shape, seed=1), he_normal)
    assert np.std(A.sample_kernel(keras.initializers.Constant(0.5), (4, 4))) == 0.0


def test_predicted_preactivation_std_and_std_ratio():
    # He: the first layer sees the input (no ReLU), then n Var(w) / 2 = 1 per layer.
    he = A.predicted_preactivation_std([math.sqrt(2 / 100)] * 4, [100] * 4, 3.0)
    np.testing.assert_allclose(he, math.sqrt(6.0))
    # A hand-computed chain: Var(y1) = 10 * 0.01 * 2 = 0.2; Var(y2) = 20 * 0.04 * 0.2 / 2.
    np.testing.assert_allclose(A.predicted_preactivation_std([0.1, 0.2], [10, 20], 2.0),
                               [math.sqrt(0.2), math.sqrt(0.08)])
    assert A.std_ratio({"a": 2.0, "b": 3.0, "c": 1.0}) == 0.5
    assert math.isnan(A.std_ratio({"a": 0.0, "b": 1.0}))


BACKEND_SCRIPT = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    from allcnn_lib.analysis import deep_relu_stack, gradient_stats

    model = deep_relu_stack(2, 6, "he_normal")
    model.set_weights([np.asarray(w, np.float32) for w in json.loads(sys.stdin.read())])
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 7)
    result = {"backend": keras.backend.backend(), "kernel": gradient_stats(model, x, y)}
    try:
        result["output"] = gradient_stats(model, x, y, wrt="output")
    except NotImplementedError:
        result["output"] = None
    print("RESULT " + json.dumps(result))
""")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_gradient_stats_agree_across_backends(backend):
    """The same weights and batch give the same gradient stds on another backend (run in a
    subprocess) as on this process' TensorFlow backend. torch (~12 CPU seconds) is opt-in."""
    if find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    if backend == "torch" and os.environ.get("ALLCNN_TEST_TORCH", "") not in {"1", "true"}:
        pytest.skip("the torch run is opt-in: set ALLCNN_TEST_TORCH=1")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("compares with the TensorFlow backend in this process")
    model, x, y = _small_problem(seed=2)
    expected = {"kernel": A.gradient_stats(model, x, y),
                "output": A.gradient_stats(model, x, y, wrt="output")}
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", BACKEND_SCRIPT], cwd=REPO, env=env,
                          input=json.dumps([w.tolist() for w in model.get_weights()]),
                          capture_output=True, text=True, timeout=240)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-2000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["backend"] == backend
    assert result["kernel"] == pytest.approx(expected["kernel"], rel=1e-4)
    if backend == "jax":
        assert result["output"] is None  # wrt="output" is TensorFlow and PyTorch only
    else:
        assert result["output"] == pytest.approx(expected["output"], rel=1e-4)


# --------------------------------------------------------------------------- batch norm


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
    return _randomize_batch_norm(M.all_cnn_c(batch_norm=True))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.0, 1.0, (2, 32, 32, 3)).astype("float32")


def test_fold_batch_norm_matches_the_batch_norm_model(bn_model, images):
    folded = A.fold_batch_norm(bn_model)
    assert not any(isinstance(la, keras.layers.BatchNormalization) for la in folded.layers)
    assert folded.count_params() == M.ARCH_PARAM_COUNTS["allcnn"]  # the paper's network again
    np.testing.assert_allclose(folded.predict(images, verbose=0),
                               bn_model.predict(images, verbose=0), atol=1e-4)
    np.testing.assert_allclose(A.class_maps(folded, images), A.class_maps(bn_model, images),
                               rtol=1e-4, atol=1e-5)


def test_fold_batch_norm_keeps_a_convolutions_own_bias():
    inputs = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(3, 3, use_bias=True, bias_initializer="ones", name="conv")(inputs)
    model = _randomize_batch_norm(keras.Model(inputs, keras.layers.BatchNormalization()(x)), 3)
    x_test = np.random.default_rng(2).normal(size=(4, 5, 5, 2)).astype("float32")
    folded = A.fold_batch_norm(model)
    assert [la.name for la in folded.layers[1:]] == ["conv"]
    np.testing.assert_allclose(folded(x_test), model(x_test, training=False), rtol=1e-5,
                               atol=1e-5)


def test_inference_speed_is_a_positive_rate():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    assert A.inference_speed(model, np.zeros((10, 8, 8, 3), np.float32), batch_size=4) > 0


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


# --------------------------------------------------------------------------- saliency

# Every case of a ReLU's backward pass: inputs x below, at and above zero, against upstream
# signals g of both signs. The expected results are written out by hand from the rules.
X = tf.constant([-2.0, -1.0, 0.0, 0.0, 1.0, 2.0, 3.0])
G = tf.constant([1.0, -1.0, 2.0, -2.0, -3.0, 4.0, 0.5])
EXPECTED = {
    "gradient": [0.0, 0.0, 0.0, 0.0, -3.0, 4.0, 0.5],  # g where x > 0
    "deconvnet": [1.0, 0.0, 2.0, 0.0, 0.0, 4.0, 0.5],  # g where g > 0
    "guided": [0.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.5],  # g where x > 0 and g > 0
}


@pytest.mark.parametrize("method", A.RELU_BACKWARD_METHODS)
def test_relu_backward_rules_are_exact(method):
    np.testing.assert_array_equal(np.asarray(A.relu_backward(X, G, method)), EXPECTED[method])
    with tf.GradientTape() as tape:
        tape.watch(X)
        y = A.relu_with_backward(method)(X)
    np.testing.assert_array_equal(y, tf.nn.relu(X))
    np.testing.assert_array_equal(tape.gradient(y, X, output_gradients=G), EXPECTED[method])
    x = tf.reshape(X, (1, 7))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = A.BackwardRuleReLU(method, name="relu_test")(x)
    np.testing.assert_array_equal(tape.gradient(y, x, output_gradients=tf.reshape(G, (1, 7)))[0],
                                  EXPECTED[method])


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown method"):
        A.relu_backward(X, G, "lrp")
    with pytest.raises(ValueError, match="unknown method"):
        A.BackwardRuleReLU("lrp")


def test_with_relu_backward_swaps_only_the_relus_and_shares_the_weights(bn_model):
    copy = A.with_relu_backward(bn_model, "guided")
    assert [la.name for la in copy.layers] == [la.name for la in bn_model.layers]
    for original, copied in zip(bn_model.layers, copy.layers, strict=True):
        if isinstance(original, keras.layers.ReLU):
            assert isinstance(copied, A.BackwardRuleReLU) and copied.method == "guided"
        elif not isinstance(original, keras.layers.InputLayer):  # clone_model makes a new one
            assert copied is original  # the same layer: trained weights shared, not copied


def test_gradient_rule_reproduces_tensorflows_input_gradient(bn_model, images):
    scores = keras.Model(bn_model.input, bn_model.get_layer("global_average_pooling").output)
    x = tf.constant(images)
    with tf.GradientTape() as tape:
        tape.watch(x)
        target = tf.reduce_sum(scores(x, training=False)[:, 3])
    got = A.input_gradients(bn_model, images, "global_average_pooling", "gradient", channel=3)
    np.testing.assert_allclose(got, tape.gradient(target, x).numpy(), rtol=1e-6, atol=1e-12)


def test_guided_and_deconvnet_maps(bn_model, images):
    guided = A.input_gradients(bn_model, images, "relu6", "guided")
    plain = A.input_gradients(bn_model, images, "relu6", "gradient")
    assert guided.shape == plain.shape == images.shape
    assert np.abs(guided).max() > 0 and not np.allclose(guided, plain)
    # the deconvnet map of a class score does not depend on the image; the guided one does
    maps = {method: A.input_gradients(bn_model, images, "global_average_pooling", method,
                                      channel=5) for method in ("deconvnet", "guided")}
    np.testing.assert_allclose(maps["deconvnet"][0], maps["deconvnet"][1], rtol=1e-5, atol=1e-9)
    assert not np.allclose(maps["guided"][0], maps["guided"][1])


def test_strongest_units_and_one_position(bn_model, images):
    units = A.strongest_units(bn_model, images, "relu6")
    assert units.shape == (2, 3) and (units[:, :2] < 8).all() and (units[:, 2] < 192).all()
    at = A.input_gradients(bn_model, images[:1], "relu6", "guided", position=tuple(units[0, :2]))
    best = A.input_gradients(bn_model, images[:1], "relu6", "guided")
    np.testing.assert_allclose(at, best, rtol=1e-6, atol=1e-12)


def test_gradient_and_kernel_images_map_zero_to_grey():
    gradient = np.zeros((2, 4, 4, 3))
    gradient[0, 0, 0, 0], gradient[1, 1, 1, 1] = 5.0, -2.0
    shown = A.gradient_image(gradient)
    assert shown.min() >= 0 and shown.max() <= 1
    assert shown[0, 0, 0, 0] == 1.0 and shown[1, 1, 1, 1] == 0.0 and shown[0, 2, 2, 2] == 0.5
    kernel = np.zeros((3, 3, 3, 2))
    kernel[0, 0, 0, 0], kernel[1, 1, 1, 1] = 0.2, -4.0
    shown = A.kernel_images(kernel)
    assert shown.shape == (2, 3, 3, 3)
    assert shown[0, 0, 0, 0] == 1.0 and shown[1, 1, 1, 1] == 0.0 and shown[0, 2, 2, 2] == 0.5
