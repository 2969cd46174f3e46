"""The three "C" networks of Springenberg et al. (2014), "Striving for Simplicity: The All
Convolutional Net", as Keras 3 functional models: Model-C (base model C of Table 1) and the two
networks derived from it in Table 2, Strided-CNN-C and All-CNN-C. Dropout and weight decay follow
the experimental setup of Section 3.1.

=============  ======================  ======================  ======================
 layer          Model-C                 Strided-CNN-C           All-CNN-C
=============  ======================  ======================  ======================
 input          dropout 0.2             dropout 0.2             dropout 0.2
 conv1          3x3 conv 96             3x3 conv 96             3x3 conv 96
 conv2          3x3 conv 96             3x3 conv 96 stride 2    3x3 conv 96
 conv3 / pool1  3x3 max-pool stride 2   (removed)               3x3 conv 96 stride 2
 dropout1       dropout 0.5             dropout 0.5             dropout 0.5
 conv4          3x3 conv 192            3x3 conv 192            3x3 conv 192
 conv5          3x3 conv 192            3x3 conv 192 stride 2   3x3 conv 192
 conv6 / pool2  3x3 max-pool stride 2   (removed)               3x3 conv 192 stride 2
 dropout2       dropout 0.5             dropout 0.5             dropout 0.5
 conv7          3x3 conv 192 valid      3x3 conv 192 valid      3x3 conv 192 valid
 conv8          1x1 conv 192            1x1 conv 192            1x1 conv 192
 conv9          1x1 conv 10             1x1 conv 10             1x1 conv 10
 head           global average pooling over 6x6, 10-way softmax (all three)
=============  ======================  ======================  ======================

Every conv, the stride-2 ones and conv9 included, is followed by a ReLU (Tables 1, 2); all use
``same`` padding except conv7. Spatial sizes: 32 -> 16 -> 8 -> 6 (conv7) -> 1 (pooling).

Layer names are stable and follow the paper's numbering of All-CNN-C in every network, so the
same name means the same place everywhere: Model-C has ``conv1, conv2, pool1, conv4, conv5,
pool2, conv7, conv8, conv9`` (its pooling layers stand where All-CNN-C's conv3 and conv6 are) and
Strided-CNN-C has ``conv1, conv2, conv4, conv5, conv7, conv8, conv9``. Every convolution is a
linear ``Conv2D`` named ``convK``, followed by ``bnK`` (only with ``batch_norm=True``) and a
separate ``keras.layers.ReLU`` named ``reluK``; the conv layer's own output is therefore the
pre-activation that LSUV (Mishkin & Matas 2015) normalizes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import keras

#: Trainable parameters of the paper-faithful networks (no batch norm), counted from the layer
#: shapes of Tables 1 and 2 (kernels plus biases).
ARCH_PARAM_COUNTS: dict[str, int] = {
    "modelc": 954_730,
    "strided": 954_730,
    "allcnn": 1_369_738,
}

VARIANTS = ("paper", "seed")

#: Dropout rates of Section 3.1: 20% on the input image, 50% after each (replaced) pooling layer.
INPUT_DROPOUT_RATE = 0.2
HIDDEN_DROPOUT_RATE = 0.5

InitializerLike = str | keras.initializers.Initializer | Callable[..., Any]


# --------------------------------------------------------------------------- building blocks


@keras.saving.register_keras_serializable(package="allcnn")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` that runs TensorFlow's fused kernel
    (``FusedBatchNormV3``: one op forward, one backward; bfloat16 in, float32 statistics)
    on the TensorFlow backend, for 4-D channels-last inputs. Keras 3 builds batch norm from
    separate moment and arithmetic ops and computes bfloat16 inputs in float32: on a 2-core
    AVX-512 CPU this layer trains All-CNN-C in mixed_bfloat16 about 1.35x faster
    (docs/performance.md). Same variables, same weight files; other backends and shapes use
    the stock layer. The moving variance takes the kernel's unbiased batch variance (Keras' own
    takes the biased one: a factor n / (n - 1) with n >= 2,048 pixels a batch)."""

    def call(self, inputs, training=None, mask=None):
        if keras.backend.backend() != "tensorflow" or len(inputs.shape) != 4 or \
                self.axis not in (-1, 3) or not self.center or not self.scale:
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        training = bool(training) and self.trainable
        empty = tf.constant([], tf.float32)
        y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=tf.cast(self.gamma, tf.float32),
            offset=tf.cast(self.beta, tf.float32),
            mean=empty if training else tf.cast(self.moving_mean, tf.float32),
            variance=empty if training else tf.cast(self.moving_variance, tf.float32),
            epsilon=self.epsilon, data_format="NHWC", is_training=training)
        if training:
            for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                moving.assign(moving * self.momentum + tf.cast(batch, moving.dtype)
                              * (1.0 - self.momentum))
        return y


def _resolve_initializer(initializer: InitializerLike) -> keras.initializers.Initializer | Callable:
    """A string through ``allcnn_lib.initializers.get_initializer`` when that module knows it,
    else through ``keras.initializers.get``; instances and callables pass through unchanged."""
    if not isinstance(initializer, str):
        if not callable(initializer):
            raise TypeError(f"initializer must be a name, a keras Initializer or a callable, "
                            f"got {type(initializer).__name__}")
        return initializer
    try:  # imported here, not at the top: allcnn_lib.initializers may import this module
        from allcnn_lib.initializers import get_initializer
    except ImportError as err:
        if err.name != "allcnn_lib.initializers":  # a broken import inside it: show it
            raise
        get_initializer = None  # not written yet, or without get_initializer
    if get_initializer is not None:
        try:
            return get_initializer(initializer)
        except (ValueError, KeyError):
            pass  # not one of the course's names: try Keras' own
    try:
        return keras.initializers.get(initializer)
    except ValueError as err:
        raise ValueError(f"unknown initializer {initializer!r}: neither "
                         f"allcnn_lib.initializers nor keras.initializers knows it") from err


def _initializer_for_layer(base: keras.initializers.Initializer | Callable,
                           layer_index: int) -> keras.initializers.Initializer | Callable:
    """A copy of ``base`` for conv layer ``layer_index``, with its own seed.

    In Keras 3 a random initializer holds an integer seed (drawn once at construction when none
    is given) and draws the same numbers on every call, so one shared instance would start the
    equal-shaped conv5, conv6 and conv7 identical. Each layer gets a shallow copy seeded
    ``seed + layer_index``: distinct layers, reproducible after ``keras.utils.set_random_seed``.
    Initializers seeded with a ``SeedGenerator`` (which advances by itself), initializers without
    an integer ``seed`` attribute and plain callables are shared as they are.
    """
    seed = getattr(base, "seed", None)
    if not isinstance(base, keras.initializers.Initializer) or type(seed) is not int:
        return base
    layer_initializer = copy.copy(base)
    layer_initializer.seed = seed + layer_index
    if type(getattr(base, "_init_seed", None)) is int:  # keeps get_config() truthful
        layer_initializer._init_seed = seed + layer_index
    return layer_initializer


class _Builder:
    """Appends named layers to a functional graph; one instance builds one model."""

    def __init__(self, *, num_classes: int, variant: str, batch_norm: bool, dropout: bool,
                 initializer: InitializerLike, weight_decay: float | None,
                 class_relu: bool = True) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.num_classes = int(num_classes)
        self.variant = variant
        self.batch_norm = bool(batch_norm)
        self.dropout = bool(dropout)
        self.class_relu = bool(class_relu)
        self.initializer = _resolve_initializer(initializer)
        self.weight_decay = float(weight_decay) if weight_decay else 0.0
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")

    def conv(self, x, index: int, filters: int, kernel_size: int, *, strides: int = 1,
             padding: str = "same", relu: bool = True):
        """``convK`` (linear) -> ``bnK`` (batch_norm only) -> ``reluK`` (when ``relu``)."""
        x = keras.layers.Conv2D(
            filters, kernel_size, strides=strides, padding=padding, activation=None,
            use_bias=not self.batch_norm,  # BN's beta takes the bias' place
            kernel_initializer=_initializer_for_layer(self.initializer, index),
            bias_initializer="zeros",
            kernel_regularizer=(keras.regularizers.L2(self.weight_decay)
                                if self.weight_decay > 0 else None),
            name=f"conv{index}",
        )(x)
        if self.batch_norm:
            x = FusedBatchNormalization(name=f"bn{index}")(x)
        if relu:
            x = keras.layers.ReLU(name=f"relu{index}")(x)
        return x

    def strided_conv(self, x, index: int, filters: int):
        """A 3x3 stride-2 conv that downsamples. The paper follows every conv with a ReLU; the
        seed repository left it out after the stride-2 convs (``variant="seed"``)."""
        return self.conv(x, index, filters, 3, strides=2, relu=self.variant == "paper")

    def input_dropout(self, x):
        if self.dropout and self.variant == "paper":
            x = keras.layers.Dropout(INPUT_DROPOUT_RATE, name="input_dropout")(x)
        return x

    def hidden_dropout(self, x, index: int):
        if self.dropout:
            x = keras.layers.Dropout(HIDDEN_DROPOUT_RATE, name=f"dropout{index}")(x)
        return x

    def classifier(self, x):
        """conv7 (3x3 192, ``valid`` in the paper: 8x8 -> 6x6; ``same`` in the seed repo),
        conv8 (1x1 192), conv9 (1x1 ``num_classes``, with ReLU as in Table 1), global average
        pooling and softmax. ``class_relu=False`` leaves out the ReLU on conv9 (a documented
        switch: with it, a class score that goes negative everywhere has zero gradient)."""
        conv7_padding = "valid" if self.variant == "paper" else "same"
        x = self.conv(x, 7, 192, 3, padding=conv7_padding)
        x = self.conv(x, 8, 192, 1)
        x = self.conv(x, 9, self.num_classes, 1, relu=self.class_relu)
        x = keras.layers.GlobalAveragePooling2D(name="global_average_pooling")(x)
        # float32 softmax keeps probabilities exact under a mixed-precision policy.
        return keras.layers.Activation("softmax", dtype="float32", name="softmax")(x)


def _build(arch_name: str, body: Callable[[_Builder, Any], Any], *,
           input_shape: tuple[int, int, int], num_classes: int, variant: str,
           batch_norm: bool, dropout: bool, initializer: InitializerLike,
           weight_decay: float | None, name: str | None, class_relu: bool = True
           ) -> keras.Model:
    builder = _Builder(num_classes=num_classes, variant=variant, batch_norm=batch_norm,
                       dropout=dropout, initializer=initializer, weight_decay=weight_decay,
                       class_relu=class_relu)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = builder.input_dropout(inputs)
    x = body(builder, x)
    outputs = builder.classifier(x)
    return keras.Model(inputs, outputs, name=name or arch_name)


_COMMON_DOC = """
    Args (keyword-only, the same for all three builders):
        input_shape: (height, width, channels) of the images, NHWC.
        num_classes: outputs of conv9 and the softmax.
        variant: ``"paper"`` (default) follows Table 1: a ReLU after every conv, including the
            stride-2 ones; conv7 ``valid`` so the global average runs over 6x6; dropout on the
            input. ``"seed"`` reproduces the old seed repository for comparison: no ReLU after
            stride-2 convs, conv7 ``same`` (global average over 8x8), no input dropout.
        batch_norm: Conv -> BatchNormalization -> ReLU for every conv (conv9 included). The convs
            then have no bias (BN's beta replaces it), so the parameter count differs from
            ``ARCH_PARAM_COUNTS``: each conv loses ``filters`` biases and each BN adds
            ``4 * filters`` weights (2 trainable).
        dropout: dropout 0.2 on the input and 0.5 after each downsampling layer (Section 3.1).
        initializer: a name (first looked up in ``allcnn_lib.initializers``, then in Keras), a
            ``keras.initializers.Initializer`` (copied per layer, convK seeded ``seed + K``, so
            equal-shaped layers differ) or a callable ``f(shape, dtype)``.
        weight_decay: L2 factor on the conv kernels only (biases and BN are not decayed).
            Keras' ``L2(l)`` adds ``l * sum(w**2)`` to the loss (gradient ``2 l w``); Caffe's
            ``weight_decay`` adds the gradient ``wd * w``, so the default 5e-4 equals the
            paper's Caffe weight decay of 1e-3. 0 or None: no regularizer.
        name: the model's name (default: the architecture's name).
        class_relu: the ReLU after conv9, the class-score conv (Table 1 has one; default True).
"""


def _with_common_doc(builder: Callable) -> Callable:
    builder.__doc__ = (builder.__doc__ or "") + _COMMON_DOC
    return builder


@_with_common_doc
def model_c(*, input_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10,
            variant: str = "paper", batch_norm: bool = False, dropout: bool = True,
            initializer: InitializerLike = "glorot_uniform", weight_decay: float | None = 5e-4,
            name: str | None = None, class_relu: bool = True) -> keras.Model:
    """Model-C (base model C of Table 1; 954,730 parameters): two 3x3 conv pairs, each followed by
    "3 x 3 max-pooling stride 2". The pooling uses ``padding="same"`` so that it halves the size
    exactly (32 -> 16 -> 8) as the stride-2 convs of All-CNN-C do; ``valid`` pooling would give
    15 and 7. The pooling layers are named ``pool1`` and ``pool2`` and stand where All-CNN-C has
    conv3 and conv6, whose numbers the convs keep (conv1, conv2, pool1, conv4, conv5, pool2,
    conv7, conv8, conv9). Nothing here has a stride-2 conv, so ``variant="seed"`` only changes
    conv7's padding and drops the input dropout.
    """

    def body(b: _Builder, x):
        x = b.conv(x, 1, 96, 3)
        x = b.conv(x, 2, 96, 3)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
        x = b.hidden_dropout(x, 1)
        x = b.conv(x, 4, 192, 3)
        x = b.conv(x, 5, 192, 3)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool2")(x)
        return b.hidden_dropout(x, 2)

    return _build("model_c", body, input_shape=input_shape, num_classes=num_classes,
                  variant=variant, batch_norm=batch_norm, dropout=dropout,
                  initializer=initializer, weight_decay=weight_decay, name=name,
                  class_relu=class_relu)


@_with_common_doc
def strided_cnn_c(*, input_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10,
                  variant: str = "paper", batch_norm: bool = False, dropout: bool = True,
                  initializer: InitializerLike = "glorot_uniform",
                  weight_decay: float | None = 5e-4, name: str | None = None,
                  class_relu: bool = True) -> keras.Model:
    """Strided-CNN-C (Table 2, left column; 954,730 parameters): Model-C with the max-pooling
    removed and the conv before each pooling (conv2, conv5) given stride 2 (Section 3.1).
    Layers: conv1, conv2 (/2), conv4, conv5 (/2), conv7, conv8, conv9; dropout 0.5 follows
    each stride-2 conv (after its ReLU).
    """

    def body(b: _Builder, x):
        x = b.conv(x, 1, 96, 3)
        x = b.strided_conv(x, 2, 96)
        x = b.hidden_dropout(x, 1)
        x = b.conv(x, 4, 192, 3)
        x = b.strided_conv(x, 5, 192)
        return b.hidden_dropout(x, 2)

    return _build("strided_cnn_c", body, input_shape=input_shape, num_classes=num_classes,
                  variant=variant, batch_norm=batch_norm, dropout=dropout,
                  initializer=initializer, weight_decay=weight_decay, name=name,
                  class_relu=class_relu)


@_with_common_doc
def all_cnn_c(*, input_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10,
              variant: str = "paper", batch_norm: bool = False, dropout: bool = True,
              initializer: InitializerLike = "glorot_uniform", weight_decay: float | None = 5e-4,
              name: str | None = None, class_relu: bool = True) -> keras.Model:
    """All-CNN-C (Table 2, right column; 1,369,738 parameters): Model-C with each max-pooling
    replaced by a 3x3 conv with stride 2 (conv3: 96 filters, conv6: 192), each followed by a
    ReLU like every other conv. Spatial sizes: 32 -> 16 (conv3) -> 8 (conv6) -> 6 (conv7).
    """

    def body(b: _Builder, x):
        x = b.conv(x, 1, 96, 3)
        x = b.conv(x, 2, 96, 3)
        x = b.strided_conv(x, 3, 96)
        x = b.hidden_dropout(x, 1)
        x = b.conv(x, 4, 192, 3)
        x = b.conv(x, 5, 192, 3)
        x = b.strided_conv(x, 6, 192)
        return b.hidden_dropout(x, 2)

    return _build("all_cnn_c", body, input_shape=input_shape, num_classes=num_classes,
                  variant=variant, batch_norm=batch_norm, dropout=dropout,
                  initializer=initializer, weight_decay=weight_decay, name=name,
                  class_relu=class_relu)


ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {
    "modelc": model_c,
    "strided": strided_cnn_c,
    "allcnn": all_cnn_c,
}


def build_model(arch: str, **kwargs: Any) -> keras.Model:
    """Build ``ARCHITECTURES[arch]`` ("modelc", "strided" or "allcnn") with the builder's
    keyword arguments (see ``all_cnn_c``)."""
    try:
        builder = ARCHITECTURES[arch]
    except (KeyError, TypeError):
        raise ValueError(f"unknown architecture {arch!r}; choose one of "
                         f"{', '.join(ARCHITECTURES)}") from None
    return builder(**kwargs)


# --------------------------------------------------------------------------- model helpers


def conv_layers(model: keras.Model) -> list[keras.layers.Conv2D]:
    """The model's ``Conv2D`` layers in forward order (conv1 ... conv9), e.g. for LSUV, which
    scales each conv's kernel so that the conv's own (pre-activation) output has unit variance.
    """
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def class_activation_maps_model(model: keras.Model) -> keras.Model:
    """A model from the input image to the ``num_classes``-channel map that the global average
    pooling averages (the output of relu9: 6x6 in the paper variant, 8x8 in the seed variant).
    The softmax of its spatial mean is the full model's prediction (Section 3: the last layers
    are convolutions, so each channel is a spatial map of one class' evidence)."""
    try:
        class_maps = model.get_layer("relu9").output
    except ValueError:
        raise ValueError(f"model {model.name!r} has no layer 'relu9'; build it with "
                         "allcnn_lib.models") from None
    return keras.Model(model.input, class_maps, name=f"{model.name}_class_maps")
