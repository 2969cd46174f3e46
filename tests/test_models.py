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
ARCHS = tuple(M.ARCHITECTURES)


@pytest.fixture(scope="module")
def paper_models() -> dict[str, keras.Model]:
    keras.utils.set_random_seed(0)
    return {arch: M.build_model(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def seed_models() -> dict[str, keras.Model]:
    keras.utils.set_random_seed(0)
    return {arch: M.build_model(arch, variant="seed") for arch in ARCHS}


def layer_shapes(model: keras.Model) -> list[tuple[str, tuple]]:
    return [(layer.name, tuple(layer.output.shape)) for layer in model.layers]


def next_layer(model: keras.Model, name: str) -> keras.layers.Layer:
    """The layer after ``name`` (the networks are plain chains, so layer order is graph order)."""
    names = [layer.name for layer in model.layers]
    return model.layers[names.index(name) + 1]


def real_images(cifar_sample, n: int = 16) -> np.ndarray:
    return (cifar_sample.x_test[:n].astype("float32") / 255.0)


# --------------------------------------------------------------------------- registry


def test_registry_and_param_table():
    assert M.ARCHITECTURES == {"modelc": M.model_c, "strided": M.strided_cnn_c,
                               "allcnn": M.all_cnn_c}
    assert M.ARCH_PARAM_COUNTS == {"modelc": 954_730, "strided": 954_730, "allcnn": 1_369_738}


@pytest.mark.parametrize("arch", ARCHS)
def test_param_counts_match_hand_count_and_table(paper_models, seed_models, arch):
    expected = hand_count(arch)
    assert expected == M.ARCH_PARAM_COUNTS[arch]
    assert paper_models[arch].count_params() == expected
    assert seed_models[arch].count_params() == expected  # the seed deviations add no weights
    convs = {layer.name: layer for layer in M.conv_layers(paper_models[arch])}
    assert list(convs) == list(CONV_SHAPES[arch])
    for name, (k, c_in, c_out) in CONV_SHAPES[arch].items():
        assert tuple(convs[name].kernel.shape) == (k, k, c_in, c_out), name
        assert tuple(convs[name].bias.shape) == (c_out,), name


@pytest.mark.parametrize("arch", ARCHS)
def test_paper_layer_shapes_and_names(paper_models, arch):
    model = paper_models[arch]
    assert model.name == MODEL_NAMES[arch]
    assert layer_shapes(model) == PAPER_SHAPES[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_seed_layers_drop_input_dropout_and_stride2_relus(seed_models, arch):
    """The seed variant: no input dropout, no ReLU after stride-2 convs, 8x8 maps to the end."""
    dropped = {"input_dropout"} | {c.replace("conv", "relu") for c in STRIDE2_CONVS[arch]}
    shapes = dict(layer_shapes(seed_models[arch]))
    assert list(shapes) == [name for name, _ in PAPER_SHAPES[arch] if name not in dropped]
    assert shapes["conv7"] == (None, 8, 8, 192) and shapes["relu9"] == (None, 8, 8, 10)


def test_build_model_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="modelc, strided, allcnn"):
        M.build_model("all_cnn")


@pytest.mark.parametrize("arch", ARCHS)
def test_unknown_variant_raises(arch):
    with pytest.raises(ValueError, match="paper, seed"):
        M.build_model(arch, variant="caffe")


def test_custom_name_and_num_classes():
    model = M.all_cnn_c(num_classes=100, name="all_cnn_c_cifar100")
    assert model.name == "all_cnn_c_cifar100"
    assert tuple(model.output.shape) == (None, 100)
    assert tuple(model.get_layer("conv9").kernel.shape) == (1, 1, 192, 100)


# --------------------------------------------------------------------------- paper vs seed


@pytest.mark.parametrize("arch", ["allcnn", "strided"])
def test_relu_after_stride2_convs_in_paper_not_in_seed(paper_models, seed_models, arch):
    for conv in STRIDE2_CONVS[arch]:
        assert paper_models[arch].get_layer(conv).strides == (2, 2)
        after = next_layer(paper_models[arch], conv)
        assert isinstance(after, keras.layers.ReLU), (arch, conv, after.name)
        assert after.name == conv.replace("conv", "relu")
        after_seed = next_layer(seed_models[arch], conv)
        assert not isinstance(after_seed, keras.layers.ReLU), (arch, conv, after_seed.name)
        assert after_seed.name.startswith("dropout")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_conv_is_linear_and_followed_by_relu_in_paper(paper_models, arch):
    for conv in M.conv_layers(paper_models[arch]):
        assert conv.activation is keras.activations.linear, conv.name
        assert isinstance(next_layer(paper_models[arch], conv.name), keras.layers.ReLU), conv.name


@pytest.mark.parametrize("arch", ARCHS)
def test_only_conv7_is_valid(paper_models, seed_models, arch):
    for conv in M.conv_layers(paper_models[arch]):
        assert conv.padding == ("valid" if conv.name == "conv7" else "same"), conv.name
    assert all(conv.padding == "same" for conv in M.conv_layers(seed_models[arch]))


def test_model_c_max_pooling(paper_models):
    for name in ("pool1", "pool2"):
        pool = paper_models["modelc"].get_layer(name)
        assert isinstance(pool, keras.layers.MaxPooling2D)
        assert pool.pool_size == (3, 3) and pool.strides == (2, 2)
    assert not any(isinstance(layer, keras.layers.MaxPooling2D)
                   for arch in ("allcnn", "strided") for layer in paper_models[arch].layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_layers_and_rates(paper_models, seed_models, arch):
    paper, seed = paper_models[arch], seed_models[arch]
    rates = {layer.name: layer.rate for layer in paper.layers
             if isinstance(layer, keras.layers.Dropout)}
    assert rates == {"input_dropout": 0.2, "dropout1": 0.5, "dropout2": 0.5}
    assert paper.layers[1].name == "input_dropout"  # straight on the input image
    seed_rates = {layer.name: layer.rate for layer in seed.layers
                  if isinstance(layer, keras.layers.Dropout)}
    assert seed_rates == {"dropout1": 0.5, "dropout2": 0.5}


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_false_removes_all_dropout(arch):
    model = M.build_model(arch, dropout=False)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    assert model.count_params() == M.ARCH_PARAM_COUNTS[arch]


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


@pytest.mark.parametrize("weight_decay", [0, None])
def test_no_weight_decay_means_no_regularizer(weight_decay):
    model = M.strided_cnn_c(weight_decay=weight_decay)
    assert all(conv.kernel_regularizer is None for conv in M.conv_layers(model))
    assert model.losses == []


def test_negative_weight_decay_raises():
    with pytest.raises(ValueError, match="weight_decay"):
        M.model_c(weight_decay=-1e-4)


# --------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_norm_variant(arch):
    model = M.build_model(arch, batch_norm=True)
    convs = M.conv_layers(model)
    for conv in convs:
        index = conv.name.removeprefix("conv")
        assert not conv.use_bias, conv.name
        bn = next_layer(model, conv.name)
        assert isinstance(bn, keras.layers.BatchNormalization) and bn.name == f"bn{index}"
        relu = next_layer(model, bn.name)
        assert isinstance(relu, keras.layers.ReLU) and relu.name == f"relu{index}"
    assert model.count_params() == hand_count(arch, bias=False, bn=True)
    assert tuple(model.output.shape) == (None, 10)


# --------------------------------------------------------------------------- initializers


def test_initializer_by_keras_name():
    model = M.model_c(initializer="he_normal")
    kernels = {type(conv.kernel_initializer) for conv in M.conv_layers(model)}
    assert kernels == {keras.initializers.HeNormal}


def test_seeded_initializer_is_reproducible_and_distinct_per_layer():
    first = M.all_cnn_c(initializer=keras.initializers.GlorotUniform(seed=7))
    second = M.all_cnn_c(initializer=keras.initializers.GlorotUniform(seed=7))
    kernels = {conv.name: keras.ops.convert_to_numpy(conv.kernel)
               for conv in M.conv_layers(first)}
    for conv in M.conv_layers(second):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(conv.kernel),
                                      kernels[conv.name])
    # conv5, conv6 and conv7 have the same shape; one shared seed would make them identical
    assert not np.array_equal(kernels["conv5"], kernels["conv6"])
    assert not np.array_equal(kernels["conv6"], kernels["conv7"])
    seeds = [conv.kernel_initializer.get_config()["seed"] for conv in M.conv_layers(first)]
    assert seeds == [7 + i for i in range(1, 10)]


@pytest.mark.parametrize("initializer", ["glorot_uniform", keras.initializers.HeNormal()])
def test_unseeded_initializer_gives_distinct_reproducible_layers(initializer):
    """Keras 3 initializers repeat their numbers on every call, seeded or not."""
    keras.utils.set_random_seed(3)
    first = M.all_cnn_c(initializer=initializer)
    keras.utils.set_random_seed(3)
    second = M.all_cnn_c(initializer=initializer)
    kernels = {conv.name: keras.ops.convert_to_numpy(conv.kernel)
               for conv in M.conv_layers(first)}
    assert not np.array_equal(kernels["conv5"], kernels["conv6"])
    assert not np.array_equal(kernels["conv6"], kernels["conv7"])
    for conv in M.conv_layers(second):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(conv.kernel),
                                      kernels[conv.name])


def test_seed_generator_initializer_is_shared():
    initializer = keras.initializers.GlorotUniform(seed=keras.random.SeedGenerator(5))
    model = M.strided_cnn_c(initializer=initializer)
    assert all(conv.kernel_initializer is initializer for conv in M.conv_layers(model))
    kernels = [keras.ops.convert_to_numpy(model.get_layer(name).kernel)
               for name in ("conv5", "conv7")]
    assert not np.array_equal(*kernels)  # the generator advances between layers


def test_callable_initializer():
    def constant_quarter(shape, dtype=None):
        return keras.ops.full(shape, 0.25, dtype=dtype)

    model = M.strided_cnn_c(initializer=constant_quarter)
    for conv in M.conv_layers(model):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(conv.kernel), 0.25)


def test_unknown_initializer_name_raises():
    with pytest.raises(ValueError, match="no_such_init"):
        M.all_cnn_c(initializer="no_such_init")


def test_initializer_names_go_to_allcnn_initializers_first():
    model = M.model_c(initializer="gaussian")  # a course name: N(0, 0.01)
    assert all(isinstance(conv.kernel_initializer, keras.initializers.RandomNormal)
               for conv in M.conv_layers(model))
    fallback = M.model_c(initializer="orthogonal")  # unknown there: Keras' own
    assert isinstance(M.conv_layers(fallback)[0].kernel_initializer,
                      keras.initializers.Orthogonal)


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("arch", ARCHS)
def test_softmax_sums_to_one_on_real_images(paper_models, cifar_sample, arch):
    images = real_images(cifar_sample)
    probs = keras.ops.convert_to_numpy(paper_models[arch](images, training=False))
    assert probs.shape == (len(images), 10)
    assert np.all(np.isfinite(probs)) and np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_conv_layers_in_order(paper_models):
    assert [c.name for c in M.conv_layers(paper_models["allcnn"])] == [
        f"conv{i}" for i in range(1, 10)]
    assert [c.name for c in M.conv_layers(paper_models["modelc"])] == [
        "conv1", "conv2", "conv4", "conv5", "conv7", "conv8", "conv9"]


# --------------------------------------------------------------------------- backends

TRAIN_SCRIPT = textwrap.dedent("""
    import math
    import keras
    import numpy as np
    from allcnn_lib.data import load_cifar10
    from allcnn_lib.models import ARCHITECTURES, build_model, conv_layers

    assert keras.backend.backend() == BACKEND, keras.backend.backend()
    data = load_cifar10(sample=True, verbose=False)
    x = data.x_train[:16].astype("float32") / 255.0
    y = data.y_train[:16]
    failures = []
    for arch in ARCHITECTURES:
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
