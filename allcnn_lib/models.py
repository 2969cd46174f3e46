"""Model-C, Strided-CNN-C and All-CNN-C of Springenberg et al. (2014), "Striving for Simplicity:
The All Convolutional Net" (Tables 1 and 2; dropout and weight decay of Section 3.1).

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

Each ``convK`` is a linear ``Conv2D`` (the pre-activation LSUV normalizes), then ``bnK`` (batch
norm only) and ``reluK``; Model-C's ``pool1``/``pool2`` stand where conv3/conv6 are.
"""

from __future__ import annotations

from typing import Any

import keras

from allcnn_lib.initializers import get_initializer
from allcnn_lib.runs import ARCHS, MODEL_NAMES, VARIANTS

#: Parameters of the paper's networks (no batch norm), from Tables 1 and 2.
ARCH_PARAM_COUNTS = {"modelc": 954_730, "strided": 954_730, "allcnn": 1_369_738}


@keras.saving.register_keras_serializable(package="allcnn")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """``BatchNormalization`` through TensorFlow's fused kernel for 4-D channels-last inputs:
    about 1.35x faster training in mixed_bfloat16 on CPU (docs/performance.md). Same weights;
    other backends use the stock layer. The moving variance takes the unbiased batch variance
    (Keras': the biased)."""

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


def _layer_initializer(base: Any, index: int) -> Any:
    """A Keras 3 initializer with an int seed draws the same numbers on every call (unseeded
    ones pick an int at creation), so each conv gets a copy seeded ``seed + index``."""
    if isinstance(base, keras.initializers.Initializer) and type(base.seed) is int:
        return base.from_config({**base.get_config(), "seed": base.seed + index})
    return base


def build_model(arch: str, *, input_shape: tuple[int, int, int] = (32, 32, 3),
                num_classes: int = 10, variant: str = "paper", batch_norm: bool = False,
                dropout: bool = True, initializer: Any = "glorot_uniform",
                weight_decay: float | None = 5e-4, name: str | None = None,
                class_relu: bool = True) -> keras.Model:
    """Build ``arch`` (``ARCHS``; see the table above) as a chain of layers.

    ``variant="repository"``: the original repository's deviations (no input dropout, no ReLU after
    stride-2 convs, conv7 ``same``). ``batch_norm``: conv -> batch norm -> ReLU, no conv bias.
    ``initializer``: a course name, a Keras initializer or ``f(shape, dtype)``.
    ``weight_decay``: Keras ``L2`` (gradient ``2 l w``: 5e-4 is the paper's Caffe 1e-3).
    ``class_relu``: the ReLU on conv9 (Table 1 has it).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if weight_decay and weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    paper = variant == "paper"
    base = get_initializer(initializer) if isinstance(initializer, str) else initializer
    regularizer = keras.regularizers.L2(weight_decay) if weight_decay else None

    def conv(x, index, filters, size=3, strides=1, padding="same", relu=True):
        x = keras.layers.Conv2D(filters, size, strides=strides, padding=padding,
                                use_bias=not batch_norm, name=f"conv{index}",
                                kernel_initializer=_layer_initializer(base, index),
                                kernel_regularizer=regularizer)(x)
        if batch_norm:
            x = FusedBatchNormalization(name=f"bn{index}")(x)
        return keras.layers.ReLU(name=f"relu{index}")(x) if relu else x

    x = inputs = keras.Input(shape=tuple(input_shape), name="image")
    if dropout and paper:
        x = keras.layers.Dropout(0.2, name="input_dropout")(x)
    for stage, (first, filters) in enumerate(((1, 96), (4, 192)), start=1):
        x = conv(x, first, filters)
        if arch == "strided":
            x = conv(x, first + 1, filters, strides=2, relu=paper)
        else:
            x = conv(x, first + 1, filters)
            if arch == "allcnn":
                x = conv(x, first + 2, filters, strides=2, relu=paper)
            else:  # "same" pooling halves the side exactly, as stride 2 does
                x = keras.layers.MaxPooling2D(3, strides=2, padding="same",
                                              name=f"pool{stage}")(x)
        if dropout:
            x = keras.layers.Dropout(0.5, name=f"dropout{stage}")(x)
    x = conv(x, 7, 192, padding="valid" if paper else "same")  # 8x8 -> 6x6 in the paper
    x = conv(x, 8, 192, 1)
    x = conv(x, 9, num_classes, 1, relu=class_relu)
    x = keras.layers.GlobalAveragePooling2D(name="global_average_pooling")(x)
    # a float32 softmax keeps probabilities exact under a mixed-precision policy
    outputs = keras.layers.Activation("softmax", dtype="float32", name="softmax")(x)
    return keras.Model(inputs, outputs, name=name or MODEL_NAMES[arch])


def model_c(**options: Any) -> keras.Model:
    """Model-C (Table 1; 954,730 parameters); ``options`` as ``build_model``'s."""
    return build_model("modelc", **options)


def strided_cnn_c(**options: Any) -> keras.Model:
    """Strided-CNN-C (Table 2; 954,730 parameters): no pooling, conv2 and conv5 stride 2."""
    return build_model("strided", **options)


def all_cnn_c(**options: Any) -> keras.Model:
    """All-CNN-C (Table 2; 1,369,738 parameters): each pooling is a 3x3 stride-2 conv."""
    return build_model("allcnn", **options)


def conv_layers(model: keras.Model) -> list[keras.layers.Conv2D]:
    """The model's ``Conv2D`` layers in forward order (conv1 ... conv9)."""
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
