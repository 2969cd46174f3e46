"""Evaluate trained networks: accuracy, loss, per-class accuracy and the confusion matrix.

``load_trained_model(path)`` rebuilds a network from a ``.weights.h5`` file (or loads a
``.keras`` model); the ``config.json`` that ``train`` writes beside the weights supplies the
architecture, variant and batch norm, and without it they are read off the file itself.
Weights of another architecture give one clear error naming both networks
(``WeightsMismatchError``). ``evaluate(model, x, y)`` feeds the images through the same
``tf.data`` pipeline as training (``make_dataset``, no augmentation).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from allcnn_lib.data import CLASS_NAMES
from allcnn_lib.models import build_model
from allcnn_lib.runs import (
    MODEL_NAMES,
    NETWORK_DEFAULTS,
    VARIANTS,
    WeightsMismatchError,
    load_run_config,
    load_weights,
    model_summary,
    read_weights_summary,
)
from allcnn_lib.training import load_or_fit_preprocess, make_dataset, scale_to_unit

__all__ = ["EvaluationResult", "WeightsMismatchError", "confusion_matrix", "evaluate",
           "load_trained_model", "predict_probabilities", "run_preprocess"]


@dataclass
class EvaluationResult:
    """Scores of a model on a labelled set (fractions, not percent).

    ``loss`` is the mean cross-entropy of the predictions alone: unlike ``model.evaluate`` it
    leaves out the weight-decay term, so it means the same for every network.
    ``confusion[i, j]`` counts images of class i predicted as class j.
    """

    accuracy: float
    loss: float
    per_class_accuracy: np.ndarray
    confusion: np.ndarray
    class_names: tuple[str, ...]
    predictions: np.ndarray
    probabilities: np.ndarray

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def error(self) -> float:
        """The error rate, 1 - accuracy (the paper's tables report it in percent)."""
        return 1.0 - self.accuracy

    def per_class_table(self) -> str:
        """One line per class: name, accuracy and number of images."""
        width = max(len(c) for c in self.class_names)
        counts = self.confusion.sum(axis=1)
        return "\n".join(f"  {name:<{width}}  {acc:6.2%}  ({int(k)} images)"
                         for name, acc, k in zip(self.class_names, self.per_class_accuracy,
                                                 counts, strict=True))

    def summary(self) -> str:
        return (f"accuracy {self.accuracy:.4f}  loss {self.loss:.4f}  ({self.n} images)\n"
                f"per-class accuracy:\n{self.per_class_table()}")

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "loss": self.loss, "images": self.n,
                "per_class_accuracy": dict(zip(self.class_names,
                                               map(float, self.per_class_accuracy),
                                               strict=True)),
                "confusion": self.confusion.tolist(), "class_names": list(self.class_names)}

    def __repr__(self) -> str:
        return f"EvaluationResult(accuracy={self.accuracy:.4f}, loss={self.loss:.4f}, n={self.n})"


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[i, j]`` of examples of true class i predicted as j (int64)."""
    y_true = np.asarray(y_true, np.int64).ravel()
    y_pred = np.asarray(y_pred, np.int64).ravel()
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def tta_views(flip: bool = False, shift: int = 0) -> list[tuple[bool, int]]:
    """The (mirrored, translation) views test-time augmentation averages: the image, its
    mirror (``flip``), and each of those translated by ``(shift, shift)`` and
    ``(-shift, -shift)`` pixels with reflected borders (``shift``; Page 2018, airbench)."""
    flips = (False, True) if flip else (False,)
    shifts = (0, shift, -shift) if shift else (0,)
    return [(f, d) for f in flips for d in shifts]


def predict_probabilities(model: keras.Model, x: np.ndarray, batch_size: int = 256, *,
                          preprocess: Callable[[tf.Tensor], tf.Tensor] | None = None,
                          flip: bool = False, shift: int = 0) -> np.ndarray:
    """Class probabilities for uint8 images, through ``make_dataset`` (autotune off).

    Test-time augmentation: the mean of the probabilities over ``tta_views(flip, shift)``.
    The training augmentation flips and translates, so every view is in-distribution.
    """
    views = tta_views(flip, shift)
    if len(views) > 1:
        from allcnn_lib.preprocessing import tf_shift_flip

        base = preprocess or scale_to_unit
        total = 0.0
        for mirrored, d in views:
            def view(images, mirrored=mirrored, d=d):  # on the uint8 images, then preprocess
                n = tf.shape(images)[:1]
                return base(tf_shift_flip(images, tf.fill(n, d), tf.fill(n, d),
                                          tf.fill(n, mirrored), "reflect"))
            total = total + predict_probabilities(model, x, batch_size, preprocess=view)
        return total / len(views)
    ds = make_dataset(x, None, batch_size, preprocess=preprocess)
    probs = np.asarray(model.predict(ds, verbose=0), np.float64)
    rows = probs.sum(axis=1)
    if probs.min() < 0 or not np.allclose(rows, 1.0, atol=1e-3):  # logits: apply softmax
        probs = np.exp(probs - probs.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
    return probs


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256, *,
             preprocess: Callable[[tf.Tensor], tf.Tensor] | None = None,
             class_names: Sequence[str] = CLASS_NAMES, flip: bool = False, shift: int = 0
             ) -> EvaluationResult:
    """Accuracy, cross-entropy, per-class accuracy and confusion matrix of ``model`` on (x, y).

    ``x``: uint8 NHWC images, preprocessed in the pipeline by ``preprocess`` (default /255; for
    a ZCA run use ``run_preprocess(weights_path)``). ``y``: integer labels. ``flip``, ``shift``:
    test-time augmentation (``predict_probabilities``).
    """
    y = np.asarray(y, np.int64).ravel()
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"need as many labels as images (> 0), got {len(x)} and {len(y)}")
    probs = predict_probabilities(model, x, batch_size, preprocess=preprocess, flip=flip,
                                  shift=shift)
    num_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, num_classes)
    per_class = np.diag(cm) / np.maximum(cm.sum(axis=1), 1)
    loss = float(np.mean(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0))))
    names = tuple(class_names) if len(class_names) == num_classes else tuple(
        str(i) for i in range(num_classes))
    return EvaluationResult(accuracy=float(np.mean(pred == y)), loss=loss,
                            per_class_accuracy=per_class, confusion=cm, class_names=names,
                            predictions=pred, probabilities=probs.astype(np.float32))


# --------------------------------------------------------------------------- loading


def _infer_from_file(path: Path) -> dict[str, Any]:
    """Architecture, batch norm, dropout and variant as far as the weights file tells them."""
    saved = read_weights_summary(path)
    if saved.arch is None:
        return {}
    found: dict[str, Any] = {
        "arch": saved.arch, "batch_norm": saved.batch_norm,
        "dropout": any(name.startswith("dropout") for name in saved.layer_names),
    }
    for variant in VARIANTS:  # the variants differ in weightless layers (ReLUs, input dropout)
        candidate = build_model(saved.arch, variant=variant, batch_norm=found["batch_norm"],
                                dropout=found["dropout"], weight_decay=0)
        if model_summary(candidate).layer_names == saved.layer_names:
            found["variant"] = variant
            break
    return found


def load_trained_model(weights_path: str | os.PathLike, arch: str | None = None, *,
                       variant: str | None = None, batch_norm: bool | None = None,
                       dropout: bool | None = None, class_relu: bool | None = None,
                       **build_kwargs: Any) -> keras.Model:
    """A network with trained weights from a ``.weights.h5`` file or a ``.keras`` model.

    For weights, each of ``arch``, ``variant``, ``batch_norm`` and ``dropout`` left as None
    comes from the ``config.json`` beside the file (written by ``train``), else from the file
    itself, else from ``build_model``'s defaults; ``build_kwargs`` go to ``build_model``.
    Raises ``FileNotFoundError`` for a missing file and ``WeightsMismatchError`` (one line,
    naming both networks and the flag to pass) for weights of another network.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".keras":
        model = keras.saving.load_model(path, compile=False)
        if arch is not None and model.name != MODEL_NAMES.get(arch, arch):
            raise WeightsMismatchError(f"{path.name} holds the model {model.name} but "
                                       f"{MODEL_NAMES.get(arch, arch)} was asked for; "
                                       "leave out --arch for .keras files")
        return model
    settings: dict[str, Any] = dict(NETWORK_DEFAULTS)
    config = load_run_config(path)
    if config is not None:
        settings.update({k: config[k] for k in settings if k in config})
    else:
        settings.update(_infer_from_file(path))
    explicit = {"arch": arch, "variant": variant, "batch_norm": batch_norm, "dropout": dropout,
                "class_relu": class_relu}
    settings.update({k: v for k, v in explicit.items() if v is not None})
    build_kwargs.setdefault("weight_decay", 0)  # no regularizer needed to predict
    model = build_model(settings["arch"], variant=settings["variant"],
                        batch_norm=bool(settings["batch_norm"]),
                        dropout=bool(settings["dropout"]),
                        class_relu=bool(settings["class_relu"]), **build_kwargs)
    return load_weights(model, path)


def run_preprocess(weights_path: str | os.PathLike) -> Callable[[tf.Tensor], tf.Tensor]:
    """The input preprocessing of the run that wrote ``weights_path`` (its ZCA or per-channel
    standardization, if it had one; /255 without a ``config.json`` beside the weights)."""
    path = Path(weights_path)
    return load_or_fit_preprocess(load_run_config(path) or {}, path.parent)
