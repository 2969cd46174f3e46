"""Tests of allcnn_lib.architecture: parameters, multiply-accumulates and receptive fields of the
three "C" networks (counted here by hand from Tables 1 and 2 of Springenberg et al. 2014), the
class maps and the figure helpers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from allcnn_lib import architecture as A  # noqa: E402
from allcnn_lib import models as M  # noqa: E402
from allcnn_lib import plots  # noqa: E402

ARCHS = ("modelc", "strided", "allcnn")

# Forward multiply-accumulates per conv for one 32x32 image, worked out by hand as
# (output positions) x (filters) x (3*3 or 1*1 kernel x input channels):
#   conv1  32*32 * 96  * 9*3   =  2,654,208      conv5  16*16 * 192 * 9*192 = 84,934,656
#   conv2  32*32 * 96  * 9*96  = 84,934,656      conv6   8*8  * 192 * 9*192 = 21,233,664
#   conv3  16*16 * 96  * 9*96  = 21,233,664      conv7   6*6  * 192 * 9*192 = 11,943,936
#   conv4  16*16 * 192 * 9*96  = 42,467,328      conv8   6*6  * 192 * 192   =  1,327,104
#                                                conv9   6*6  * 10  * 192   =     69,120
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
#   All-CNN-C / Model-C: 3, 5, 7 (/2, j=2), 11, 15, 19 (/2, j=4), 27, 27, 27.
#   Strided-CNN-C: 3, 5 (/2, j=2), 9, 13 (/2, j=4), 21, 21, 21.
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


@pytest.fixture(scope="module")
def paper_models() -> dict[str, keras.Model]:
    keras.utils.set_random_seed(0)
    return {arch: M.build_model(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def seed_models() -> dict[str, keras.Model]:
    keras.utils.set_random_seed(0)
    return {arch: M.build_model(arch, variant="seed") for arch in ARCHS}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------- MACs


def test_all_cnn_c_forward_macs_is_0_271_gmac(paper_models):
    macs = A.total_macs(paper_models["allcnn"])
    assert macs == sum(HAND_MACS["allcnn"].values()) == 270_798_336
    assert round(macs / 1e9, 3) == 0.271
    # the project's training cost: forward + two backward passes, 2 FLOPs per MAC
    assert round(2 * 3 * macs / 1e9, 2) == 1.62


@pytest.mark.parametrize("arch", ARCHS)
def test_per_layer_macs_match_hand_count(paper_models, arch):
    table = A.layer_table(paper_models[arch])
    convs = table[table["kind"] == "conv"]
    assert convs["macs"].to_dict() == HAND_MACS[arch]
    assert A.total_macs(paper_models[arch]) == sum(HAND_MACS[arch].values())
    # pooling, dropout, ReLU and the global average are not multiply-accumulates
    assert table.loc[table["kind"] != "conv", "macs"].sum() == 0


def test_seed_variant_macs_grow_only_in_conv7_to_conv9(paper_models, seed_models):
    paper = A.layer_table(paper_models["allcnn"])["macs"]
    seed = A.layer_table(seed_models["allcnn"])["macs"]
    grown = {name for name in paper.index if seed[name] != paper[name]}
    assert grown == {"conv7", "conv8", "conv9"}
    assert seed["conv7"] == 8 * 8 * 192 * 9 * 192
    assert seed["conv9"] == 8 * 8 * 10 * 192


def test_layer_macs_of_dense_and_grouped_conv():
    inputs = keras.Input((8, 8, 4))
    grouped = keras.layers.Conv2D(6, 3, padding="same", groups=2)
    dense_3d = keras.layers.Dense(5)
    x = dense_3d(grouped(inputs))
    flat = keras.layers.Flatten()(x)
    dense = keras.layers.Dense(3)
    keras.Model(inputs, dense(flat))
    assert A.layer_macs(grouped) == 8 * 8 * 6 * 3 * 3 * 4 // 2
    assert A.layer_macs(dense_3d) == 8 * 8 * 6 * 5  # applied at every position
    assert A.layer_macs(dense) == 8 * 8 * 5 * 3
    assert A.layer_macs(keras.layers.ReLU()) == 0


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("arch", ARCHS)
def test_parameters_match_hand_count_and_arch_param_counts(paper_models, seed_models, arch):
    table = A.layer_table(paper_models[arch])
    convs = table[table["kind"] == "conv"]["parameters"].to_dict()
    assert convs == {name: HAND_PARAMS[name] for name in HAND_MACS[arch]}
    assert table["parameters"].sum() == M.ARCH_PARAM_COUNTS[arch]
    all_rows = A.layer_table(paper_models[arch], layers="all")
    assert all_rows["parameters"].sum() == M.ARCH_PARAM_COUNTS[arch]
    # the seed's deviations (no ReLU after stride-2 convs, conv7 "same") add no weights
    assert A.layer_table(seed_models[arch])["parameters"].sum() == M.ARCH_PARAM_COUNTS[arch]


def test_parameters_with_batch_norm_count_all_bn_weights():
    model = M.all_cnn_c(batch_norm=True)
    table = A.layer_table(model, layers="all")
    assert table.loc["bn1", "parameters"] == 4 * 96
    assert table.loc["conv1", "parameters"] == 9 * 3 * 96  # no bias under batch norm
    assert table["parameters"].sum() == model.count_params()


# --------------------------------------------------------------------------- receptive fields


@pytest.mark.parametrize("arch", ARCHS)
def test_receptive_fields_match_hand_count(paper_models, arch):
    rf = A.receptive_fields(paper_models[arch])
    assert {name: rf[name] for name in HAND_RF[arch]} == HAND_RF[arch]
    # layers without a kernel keep the field of their input
    assert rf["image"] == 1
    assert rf["relu9"] == rf["conv9"]
    assert rf["dropout2"] == rf["conv7"] - 2 * 4


def test_jump_centre_and_global_window_of_all_cnn_c(paper_models):
    table = A.layer_table(paper_models["allcnn"], layers="all")
    assert table.loc["conv3", "jump"] == 2 and table.loc["conv6", "jump"] == 4
    # TensorFlow's "same" padding with stride 2 on an even side pads only after the last
    # row: conv3's unit 0 is centred on pixel 1, conv6's on 3, and conv7 ("valid") on 3 + 4.
    assert table.loc["conv3", "centre"] == 1.0
    assert table.loc["conv6", "centre"] == 3.0
    assert table.loc["conv7", "centre"] == 7.0
    gap = table.loc["global_average_pooling"]
    assert gap["kernel"] == 6
    assert gap["receptive_field"] == 27 + 5 * 4  # wider than the 32-pixel image: sees it all
    assert gap["centre"] == 7.0 + 2.5 * 4


def test_seed_conv7_same_keeps_8x8_and_receptive_field(seed_models):
    table = A.layer_table(seed_models["allcnn"])
    assert table.loc["conv7", "output_shape"] == (8, 8, 192)
    assert table.loc["conv7", "receptive_field"] == 27
    assert table.loc["conv7", "centre"] == 3.0  # "same": no shift
    assert table.loc["global_average_pooling", "receptive_field"] == 27 + 7 * 4


def test_receptive_field_of_dilated_conv_pool_and_fc_head():
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(2, 3, dilation_rate=2, padding="same", name="dilated")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(3, name="fc")(x)
    rf = A.receptive_fields(keras.Model(inputs, x))
    assert rf["dilated"] == 5  # a dilated 3x3 spans 5 pixels
    assert rf["pool"] == 6
    assert rf["flatten"] == 6  # one flattened value is one unit
    assert rf["fc"] == 6 + (8 - 1) * 2  # a fully connected unit sees the whole 8x8 map


def test_non_square_kernel_and_branching_models_are_refused():
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(1, (1, 3))(inputs))
    with pytest.raises(ValueError, match="square"):
        A.layer_table(model)
    a = keras.layers.Conv2D(1, 3, padding="same", name="a")(inputs)
    b = keras.layers.Conv2D(1, 3, padding="same", name="b")(inputs)
    with pytest.raises(ValueError, match="not a chain"):
        A.layer_info(keras.Model(inputs, keras.layers.Add()([a, b])))


def test_layer_table_layout(paper_models):
    table = A.layer_table(paper_models["modelc"])
    assert list(table.index) == ["conv1", "conv2", "pool1", "conv4", "conv5", "pool2", "conv7",
                                 "conv8", "conv9", "global_average_pooling"]
    assert list(table.columns) == ["kind", "output_shape", "parameters", "macs", "kernel",
                                   "stride", "receptive_field", "jump", "centre"]
    assert table.loc["pool1", "output_shape"] == (16, 16, 96)
    assert table.loc["global_average_pooling", "output_shape"] == (10,)
    with pytest.raises(ValueError, match="main"):
        A.layer_table(paper_models["modelc"], layers="some")


def test_architecture_summary(paper_models):
    summary = A.architecture_summary(paper_models)
    assert summary["parameters"].to_dict() == M.ARCH_PARAM_COUNTS
    assert summary.loc["allcnn", "forward MMAC"] == 270.8
    assert summary.loc["allcnn", "training GFLOP"] == 1.62
    assert summary["conv9 receptive field (px)"].to_dict() == {"modelc": 27, "strided": 21,
                                                                "allcnn": 27}
    assert set(summary["class map"]) == {"6x6"}
    assert set(A.PAPER_TABLE3_PARAMS) == set(M.ARCH_PARAM_COUNTS)


def test_variant_differences_of_all_cnn_c(paper_models, seed_models):
    diff = A.variant_differences(paper_models["allcnn"], seed_models["allcnn"])
    assert list(diff.index) == ["input_dropout", "relu3", "relu6", "conv7", "relu7", "conv8",
                                "relu8", "conv9", "relu9"]
    assert diff.loc["relu3", "seed output"] == "absent"
    assert diff.loc["relu3", "paper output"] == (16, 16, 96)
    assert diff.loc["conv7", "paper output"] == (6, 6, 192)
    assert diff.loc["conv7", "seed output"] == (8, 8, 192)
    assert diff.loc["conv7", "paper parameters"] == diff.loc["conv7", "seed parameters"]
    assert diff.loc["conv7", "seed MACs"] == 8 * 8 * 192 * 9 * 192
    same = A.variant_differences(paper_models["modelc"], paper_models["modelc"])
    assert same.empty
    labelled = A.variant_differences(seed_models["strided"], paper_models["strided"],
                                     labels=("seed", "paper"))
    assert "relu2" in labelled.index and labelled.loc["relu2", "seed output"] == "absent"


# --------------------------------------------------------------------------- class maps


def test_class_maps_mean_is_the_score_before_softmax():
    keras.utils.set_random_seed(1)
    model = M.all_cnn_c(batch_norm=True, dropout=False)
    images = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    maps = A.class_maps(model, images)
    assert maps.shape == (4, 6, 6, 10) and maps.dtype == np.float32
    scores = maps.mean(axis=(1, 2))
    probs = np.exp(scores - scores.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, model.predict(images, verbose=0), atol=1e-5)
    conv7 = A.class_maps(model, images, layer="relu7")
    assert conv7.shape == (4, 6, 6, 192)


def test_upsample_maps_shapes_and_values():
    maps = np.zeros((2, 6, 6, 3), np.float32)
    maps[..., 1] = 2.5
    up = A.upsample_maps(maps, 32)
    assert up.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(up[..., 1], 2.5, atol=1e-6)  # a constant map stays constant
    np.testing.assert_allclose(up[..., 0], 0.0)
    ramp = np.arange(6, dtype=np.float32)[None, :, None] * np.ones((6, 1, 1), np.float32)
    single = A.upsample_maps(ramp, (12, 24))
    assert single.shape == (12, 24, 1)
    assert np.all(np.diff(single[0, :, 0]) >= 0)  # bilinear keeps a ramp monotonic


# --------------------------------------------------------------------------- figures


def _check_labelled(fig, *, n_titled: int):
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) >= n_titled
    assert fig._suptitle is not None and fig._suptitle.get_text()


def test_plot_layer_costs_and_receptive_fields(paper_models):
    tables = {arch: A.layer_table(model) for arch, model in paper_models.items()}
    fig = plots.plot_layer_costs(tables)
    _check_labelled(fig, n_titled=2)
    assert all(ax.get_ylabel() for ax in fig.axes)
    assert fig.axes[1].get_xlabel()
    bars = fig.axes[0].containers
    assert len(bars) == 3 and all(len(b) == len(plots.LAYER_SLOTS) for b in bars)
    # Strided-CNN-C has no conv3 / conv6: its bars there are empty
    strided = list(paper_models).index("strided")
    assert bars[strided][2].get_height() == 0 and bars[strided][5].get_height() == 0
    fig = plots.plot_receptive_fields(tables)
    _check_labelled(fig, n_titled=2)
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
    allcnn_line = fig.axes[0].get_lines()[list(paper_models).index("allcnn")]
    assert list(allcnn_line.get_ydata()) == list(HAND_RF["allcnn"].values())


def test_plot_class_maps_and_cams():
    maps = np.arange(8 * 8 * 10, dtype=float).reshape(8, 8, 10) / 100
    names = [f"class {i}" for i in range(10)]
    fig = plots.plot_class_maps(maps, names)
    _check_labelled(fig, n_titled=10)
    assert "mean" in fig.axes[0].get_xlabel()
    images = np.zeros((3, 32, 32, 3), np.uint8)
    cams = np.random.default_rng(0).random((3, 32, 32))
    fig = plots.plot_cams(images, cams, [0, 1, 2], [0, 2, 2], names)
    _check_labelled(fig, n_titled=3)
    wrong = fig.axes[3 + 1].xaxis.label  # second image of the bottom row was misclassified
    assert matplotlib.colors.to_hex(wrong.get_color()) == "#ff0000"
