"""Tests of allcnn_lib.models: the Model-C / Strided-CNN-C / All-CNN-C builders (Tables 1 and 2
of Springenberg et al. 2014), their seed-repository variant, and the helpers around them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from allcnn_lib import models as M

REPO_ROOT = Path(__file__).resolve().parent.parent

# (kernel size, input channels, filters) of every conv, written out from Tables 1 and 2 without
# looking at the models, for the hand count of parameters.
CONV_SHAPES = {
    "allcnn": {"conv1": (3, 3, 96), "conv2": (3, 96, 96), "conv3": (3, 96, 96),
               "conv4": (3, 96, 192), "conv5": (3, 192, 192), "conv6": (3, 192, 192),
               "conv7": (3, 192, 192), "conv8": (1, 192, 192), "conv9": (1, 192, 10)},
    "modelc": {"conv1": (3, 3, 96), "conv2": (3, 96, 96),
               "conv4": (3, 96, 192), "conv5": (3, 192, 192),
               "conv7": (3, 192, 192), "conv8": (1, 192, 192), "conv9": (1, 192, 10)},
}
CONV_SHAPES["strided"] = CONV_SHAPES["modelc"]


def hand_count(arch: str, *, bias: bool = True, bn: bool = False) -> int:
    """Kernels (k*k*c_in*c_out), biases (c_out) and BN weights (4*c_out: gamma, beta, mean, var)."""
    total = 0
    for k, c_in, c_out in CONV_SHAPES[arch].values():
        total += k * k * c_in * c_out + (c_out if bias else 0) + (4 * c_out if bn else 0)
    return total


# Every layer's (name, output shape), paper variant. "H" is the spatial size after conv6/pool2.
PAPER_SHAPES = {
    "allcnn": [
        ("image", (None, 32, 32, 3)), ("input_dropout", (None, 32, 32, 3)),
        ("conv1", (None, 32, 32, 96)), ("relu1", (None, 32, 32, 96)),
        ("conv2", (None, 32, 32, 96)), ("relu2", (None, 32, 32, 96)),
        ("conv3", (None, 16, 16, 96)), ("relu3", (None, 16, 16, 96)),
        ("dropout1", (None, 16, 16, 96)),
        ("conv4", (None, 16, 16, 192)), ("relu4", (None, 16, 16, 192)),
        ("conv5", (None, 16, 16, 192)), ("relu5", (None, 16, 16, 192)),
        ("conv6", (None, 8, 8, 192)), ("relu6", (None, 8, 8, 192)),
        ("dropout2", (None, 8, 8, 192)),
        ("conv7", (None, 6, 6, 192)), ("relu7", (None, 6, 6, 192)),
        ("conv8", (None, 6, 6, 192)), ("relu8", (None, 6, 6, 192)),
        ("conv9", (None, 6, 6, 10)), ("relu9", (None, 6, 6, 10)),
        ("global_average_pooling", (None, 10)), ("softmax", (None, 10)),
    ],
    "modelc": [
        ("image", (None, 32, 32, 3)), ("input_dropout", (None, 32, 32, 3)),
        ("conv1", (None, 32, 32, 96)), ("relu1", (None, 32, 32, 96)),
        ("conv2", (None, 32, 32, 96)), ("relu2", (None, 32, 32, 96)),
        ("pool1", (None, 16, 16, 96)), ("dropout1", (None, 16, 16, 96)),
        ("conv4", (None, 16, 16, 192)), ("relu4", (None, 16, 16, 192)),
        ("conv5", (None, 16, 16, 192)), ("relu5", (None, 16, 16, 192)),
        ("pool2", (None, 8, 8, 192)), ("dropout2", (None, 8, 8, 192)),
        ("conv7", (None, 6, 6, 192)), ("relu7", (None, 6, 6, 192)),
        ("conv8", (None, 6, 6, 192)), ("relu8", (None, 6, 6, 192)),
        ("conv9", (None, 6, 6, 10)), ("relu9", (None, 6, 6, 10)),
        ("global_average_pooling", (None, 10)), ("softmax", (None, 10)),
    ],
    "strided": [
        ("image", (None, 32, 32, 3)), ("input_dropout", (None, 32, 32, 3)),
        ("conv1", (None, 32, 32, 96)), ("relu1", (None, 32, 32, 96)),
        ("conv2", (None, 16, 16, 96)), ("relu2", (None, 16, 16, 96)),
        ("dropout1", (None, 16, 16, 96)),
        ("conv4", (None, 16, 16, 192)), ("relu4", (None, 16, 16, 192)),
        ("conv5", (None, 8, 8, 192)), ("relu5", (None, 8, 8, 192)),
        ("dropout2", (None, 8, 8, 192)),
        ("conv7", (None, 6, 6, 192)), ("relu7", (None, 6, 6, 192)),
        ("conv8", (None, 6, 6, 192)), ("relu8", (None, 6, 6, 192)),
        ("conv9", (None, 6, 6, 10)), ("relu9", (None, 6, 6, 10)),
        ("global_average_pooling", (None, 10)), ("softmax", (None, 10)),
    ],
}

MODEL_NAMES = {"allcnn": "all_cnn_c", "modelc": "model_c", "strided": "strided_cnn_c"}
STRIDE2_CONVS = {"allcnn": ("conv3", "conv6"), "strided": ("conv2", "conv5"), "modelc": ()}
ARCHS = M.ARCHS
WRAPPERS = {"modelc": M.model_c, "strided": M.strided_cnn_c, "allcnn": M.all_cnn_c}


def layer_shapes(model: keras.Model) -> list[tuple[str, tuple]]:
    return [(layer.name, tuple(layer.output.shape)) for layer in model.layers]


def next_layer(model: keras.Model, name: str) -> keras.layers.Layer:
    """The layer after ``name`` (the networks are plain chains, so layer order is graph order)."""
    names = [layer.name for layer in model.layers]
    return model.layers[names.index(name) + 1]


def real_images(cifar_sample, n: int = 16) -> np.ndarray:
    return (cifar_sample.x_test[:n].astype("float32") / 255.0)


# --------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("arch", ARCHS)
def test_param_counts_match_hand_count_and_table(paper_models, repository_models, arch):
    assert WRAPPERS[arch]().name == MODEL_NAMES[arch]
    expected = hand_count(arch)
    assert expected == M.ARCH_PARAM_COUNTS[arch]
    assert paper_models[arch].count_params() == expected
    assert repository_models[arch].count_params() == expected  # no weights in the deviations
    convs = {layer.name: layer for layer in M.conv_layers(paper_models[arch])}
    assert list(convs) == list(CONV_SHAPES[arch])  # conv_layers: in forward order
    for name, (k, c_in, c_out) in CONV_SHAPES[arch].items():
        assert tuple(convs[name].kernel.shape) == (k, k, c_in, c_out), name
        assert tuple(convs[name].bias.shape) == (c_out,), name


@pytest.mark.parametrize("arch", ARCHS)
def test_paper_layer_shapes_and_names(paper_models, arch):
    model = paper_models[arch]
    assert model.name == MODEL_NAMES[arch]
    assert layer_shapes(model) == PAPER_SHAPES[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_repository_variant_drops_input_dropout_and_stride2_relus(repository_models, arch):
    """The original repository's variant: no input dropout, no ReLU after stride-2 convs, 8x8
    maps to the end."""
    dropped = {"input_dropout"} | {c.replace("conv", "relu") for c in STRIDE2_CONVS[arch]}
    shapes = dict(layer_shapes(repository_models[arch]))
    assert list(shapes) == [name for name, _ in PAPER_SHAPES[arch] if name not in dropped]
    assert shapes["conv7"] == (None, 8, 8, 192) and shapes["relu9"] == (None, 8, 8, 10)
    assert all(conv.padding == "same" for conv in M.conv_layers(repository_models[arch]))


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_types_strides_padding_and_dropout_rates(paper_models, arch):
    model = paper_models[arch]
    for conv in M.conv_layers(model):
        assert conv.activation is keras.activations.linear, conv.name
        assert isinstance(next_layer(model, conv.name), keras.layers.ReLU), conv.name
        assert conv.padding == ("valid" if conv.name == "conv7" else "same"), conv.name
        stride = 2 if conv.name in STRIDE2_CONVS[arch] else 1
        assert conv.strides == (stride, stride), conv.name
    pools = [la for la in model.layers if isinstance(la, keras.layers.MaxPooling2D)]
    assert [(p.pool_size, p.strides) for p in pools] == [((3, 3), (2, 2))] * (
        2 if arch == "modelc" else 0)
    rates = {la.name: la.rate for la in model.layers if isinstance(la, keras.layers.Dropout)}
    assert rates == {"input_dropout": 0.2, "dropout1": 0.5, "dropout2": 0.5}
    assert model.layers[1].name == "input_dropout"  # straight on the input image


def test_errors_name_the_choices():
    with pytest.raises(ValueError, match="modelc, strided, allcnn"):
        M.build_model("all_cnn")
    with pytest.raises(ValueError, match="paper, repository"):
        M.build_model("allcnn", variant="caffe")
    with pytest.raises(ValueError, match="weight_decay"):
        M.model_c(weight_decay=-1e-4)
    with pytest.raises(ValueError, match="no_such_init"):
        M.all_cnn_c(initializer="no_such_init")


def test_custom_name_num_classes_and_no_dropout():
    model = M.all_cnn_c(num_classes=100, name="all_cnn_c_cifar100", dropout=False)
    assert model.name == "all_cnn_c_cifar100"
    assert tuple(model.output.shape) == (None, 100)
    assert tuple(model.get_layer("conv9").kernel.shape) == (1, 1, 192, 100)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)


# --------------------------------------------------------------------------- regularization


def test_l2_on_kernels_only(paper_models):
    model = paper_models["allcnn"]
    for conv in M.conv_layers(model):
        assert isinstance(conv.kernel_regularizer, keras.regularizers.L2), conv.name
        assert conv.kernel_regularizer.l2 == pytest.approx(5e-4)
        assert conv.bias_regularizer is None
    expected = sum(5e-4 * float(np.sum(np.square(keras.ops.convert_to_numpy(conv.kernel))))
                   for conv in M.conv_layers(model))
    losses = [float(keras.ops.convert_to_numpy(loss)) for loss in model.losses]
    assert len(losses) == 9
    assert sum(losses) == pytest.approx(expected, rel=1e-4)
    for weight_decay in (0, None):
        assert M.strided_cnn_c(weight_decay=weight_decay).losses == []


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_norm_variant(arch):
    model = M.build_model(arch, batch_norm=True)
    for conv in M.conv_layers(model):
        index = conv.name.removeprefix("conv")
        assert not conv.use_bias, conv.name
        bn = next_layer(model, conv.name)
        assert isinstance(bn, keras.layers.BatchNormalization) and bn.name == f"bn{index}"
        relu = next_layer(model, bn.name)
        assert isinstance(relu, keras.layers.ReLU) and relu.name == f"relu{index}"
    assert model.count_params() == hand_count(arch, bias=False, bn=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_smallest_training_crop_goes_through_every_network(arch):
    """``runs.CROP_SIZES`` starts at the smallest side the paper's networks take, built with
    ``input_shape=(None, None, 3)`` as ``train`` does for ``crop_epochs``. (A side one smaller
    fails on a fresh model; once ``predict`` has traced a graph for any side, it returns numbers
    without an error, which is why ``TrainConfig`` checks the side.)"""
    from allcnn_lib.runs import CROP_SIZES

    model = M.build_model(arch, batch_norm=True, dropout=False, input_shape=(None, None, 3))
    with pytest.raises(ValueError, match="Negative dimension size"):
        model.predict(np.zeros((2, CROP_SIZES[0] - 1, CROP_SIZES[0] - 1, 3)), verbose=0)
    for side in (CROP_SIZES[0], 24, 32):
        assert model.predict(np.zeros((2, side, side, 3)), verbose=0).shape == (2, 10)


# --------------------------------------------------------------------------- initializers


def kernels(model: keras.Model) -> dict[str, np.ndarray]:
    return {conv.name: keras.ops.convert_to_numpy(conv.kernel) for conv in M.conv_layers(model)}


def test_initializer_by_course_name():
    model = M.model_c(initializer="gaussian", weight_decay=None)  # N(0, 0.01)
    assert all(isinstance(conv.kernel_initializer, keras.initializers.RandomNormal)
               for conv in M.conv_layers(model))
    assert all(abs(k.std() / 0.01 - 1) < 0.1 for k in kernels(model).values())
    model = M.model_c(initializer="he_normal")
    assert {type(c.kernel_initializer) for c in M.conv_layers(model)} == {
        keras.initializers.HeNormal}


@pytest.mark.parametrize("initializer", [
    "glorot_uniform", keras.initializers.HeNormal(), keras.initializers.GlorotUniform(seed=7)])
def test_initializers_are_reproducible_and_distinct_per_layer(initializer):
    """Keras 3 initializers repeat their numbers on every call, seeded or not."""
    keras.utils.set_random_seed(3)
    first = kernels(M.all_cnn_c(initializer=initializer))
    keras.utils.set_random_seed(3)
    second = kernels(M.all_cnn_c(initializer=initializer))
    # conv5, conv6 and conv7 have the same shape; one shared seed would make them identical
    assert not np.array_equal(first["conv5"], first["conv6"])
    assert not np.array_equal(first["conv6"], first["conv7"])
    for name, kernel in first.items():
        np.testing.assert_array_equal(second[name], kernel)


def test_seeded_initializer_gives_layer_k_seed_plus_k():
    model = M.all_cnn_c(initializer=keras.initializers.GlorotUniform(seed=7))
    seeds = [conv.kernel_initializer.get_config()["seed"] for conv in M.conv_layers(model)]
    assert seeds == [7 + i for i in range(1, 10)]


def test_seed_generator_and_callable_initializers():
    initializer = keras.initializers.GlorotUniform(seed=keras.random.SeedGenerator(5))
    model = M.strided_cnn_c(initializer=initializer)
    assert all(conv.kernel_initializer is initializer for conv in M.conv_layers(model))
    assert not np.array_equal(*(kernels(model)[n] for n in ("conv5", "conv7")))  # it advances

    def constant_quarter(shape, dtype=None):
        return keras.ops.full(shape, 0.25, dtype=dtype)

    for kernel in kernels(M.strided_cnn_c(initializer=constant_quarter)).values():
        np.testing.assert_array_equal(kernel, 0.25)


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("arch", ARCHS)
def test_softmax_sums_to_one_on_real_images(paper_models, cifar_sample, arch):
    images = real_images(cifar_sample)
    probs = keras.ops.convert_to_numpy(paper_models[arch](images, training=False))
    assert probs.shape == (len(images), 10)
    assert np.all(np.isfinite(probs)) and np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- backends

TRAIN_SCRIPT = textwrap.dedent("""
    import math
    import keras
    import numpy as np
    from allcnn_lib.data import load_cifar10
    from allcnn_lib.models import ARCHS, build_model, conv_layers

    assert keras.backend.backend() == BACKEND, keras.backend.backend()
    data = load_cifar10(sample=True, verbose=False)
    x = data.x_train[:16].astype("float32") / 255.0
    y = data.y_train[:16]
    failures = []
    for arch in ARCHS:
        keras.utils.set_random_seed(0)
        # no weight decay: any change of the kernels must come from the data's gradient
        model = build_model(arch, weight_decay=0)
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                      loss="sparse_categorical_crossentropy")
        before = [keras.ops.convert_to_numpy(c.kernel).copy() for c in conv_layers(model)]
        history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        loss = history.history["loss"][-1]
        unchanged = [c.name for c, w in zip(conv_layers(model), before)
                     if np.array_equal(keras.ops.convert_to_numpy(c.kernel), w)]
        status = "ok" if math.isfinite(loss) and not unchanged else "FAILED"
        print(f"{BACKEND} {arch}: 2 steps, loss {loss:.4f}, unchanged kernels {unchanged}"
              f" -> {status}", flush=True)
        if status != "ok":
            failures.append(arch)
    if failures:
        raise SystemExit(f"{BACKEND}: training failed for {failures}")
""")


BACKENDS = ("tensorflow", "jax", "torch")
TRAIN_TIMEOUT_S = 300


def backend_installed(backend: str) -> bool:
    return importlib.util.find_spec(backend) is not None


def start_training_run(backend: str, folder: Path):
    """Launch TRAIN_SCRIPT under ``backend``; its output goes to files in ``folder``."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu",
           # the three runs share the CPUs with pytest: one thread each avoids spinning pools
           "OMP_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    # XLA's CPU optimizer dominates a 2-step jax run; the test checks learning, not speed.
    env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
    stdout, stderr = open(folder / "stdout", "w+"), open(folder / "stderr", "w+")
    process = subprocess.Popen([sys.executable, "-c", f"BACKEND = {backend!r}\n{TRAIN_SCRIPT}"],
                               env=env, cwd=REPO_ROOT, stdout=stdout, stderr=stderr, text=True)
    return process, stdout, stderr


@pytest.fixture(scope="module", autouse=True)
def training_runs(request, tmp_path_factory):
    """Start one training subprocess per selected backend as this module starts, so that they
    run alongside the in-process tests; each backend's test then waits for its own."""
    selected = {item.callspec.params["backend"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_each_model_trains_on_each_backend"}
    runs = {backend: start_training_run(backend, tmp_path_factory.mktemp(f"train_{backend}"))
            for backend in BACKENDS if backend in selected and backend_installed(backend)}
    yield runs
    for process, stdout, stderr in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()
        stdout.close()
        stderr.close()


def read_from_start(stream) -> str:
    stream.flush()
    stream.seek(0)
    return stream.read()


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_model_trains_on_each_backend(training_runs, backend, tmp_path):
    """All three networks take 2 SGD steps (batch 8, real images) on every Keras backend."""
    if not backend_installed(backend):
        pytest.skip(f"{backend} is not installed")
    if backend not in training_runs:
        training_runs[backend] = start_training_run(backend, tmp_path)
    process, stdout, stderr = training_runs[backend]
    try:
        returncode = process.wait(timeout=TRAIN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        returncode = f"killed after {TRAIN_TIMEOUT_S} s"
    out, err = read_from_start(stdout), read_from_start(stderr)
    report = (f"training on the {backend} backend failed (exit {returncode})\n"
              f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}")
    assert returncode == 0, report
    assert "FAILED" not in out, report
    for arch in ARCHS:
        assert f"{backend} {arch}: 2 steps" in out, report
