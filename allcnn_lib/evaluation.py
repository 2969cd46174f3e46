"""Evaluate trained networks: accuracy, loss, per-class accuracy and the confusion matrix.

``load_trained_model(path)`` rebuilds a network from a ``.weights.h5`` file (the ``config.json``
beside it, else the file itself, names the network) or loads a ``.keras`` model; weights of
another network raise one clear ``WeightsMismatchError``. ``evaluate(model, x, y)`` feeds the
images through the training pipeline (``make_dataset``, no augmentation).
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
from allcnn_lib.preprocessing import load_or_fit_preprocess, scale_to_unit, tf_shift_flip
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
from allcnn_lib.training import make_dataset

__all__ = ["EvaluationResult", "WeightsMismatchError", "confusion_matrix", "evaluate",
           "load_trained_model", "predict_probabilities", "run_preprocess", "tta_views"]


@dataclass
class EvaluationResult:
    """Scores of a model on a labelled set (fractions, not percent). ``loss``: the mean
    cross-entropy of the predictions alone (no weight decay, unlike ``model.evaluate``);
    ``confusion[i, j]`` counts images of class i predicted as class j."""

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
        """1 - accuracy (the paper's tables report it in percent)."""
        return 1.0 - self.accuracy

    def __repr__(self) -> str:
        return f"EvaluationResult(accuracy={self.accuracy:.4f}, loss={self.loss:.4f}, n={self.n})"

    def per_class_table(self) -> str:
        """One line per class: name, accuracy and number of images."""
        width = max(map(len, self.class_names))
        return "\n".join(f"  {name:<{width}}  {acc:6.2%}  ({int(k)} images)" for name, acc, k
                         in zip(self.class_names, self.per_class_accuracy,
                                self.confusion.sum(axis=1), strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "loss": self.loss, "images": self.n,
                "per_class_accuracy": dict(zip(self.class_names,
                                               map(float, self.per_class_accuracy),
                                               strict=True)),
                "confusion": self.confusion.tolist(), "class_names": list(self.class_names)}


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[i, j]`` of examples of true class i predicted as j (int64)."""
    flat = np.asarray(y_true, np.int64) * num_classes + np.asarray(y_pred, np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def tta_views(flip: bool = False, shift: int = 0) -> list[tuple[bool, int]]:
    """The (mirrored, translation) views test-time augmentation averages: the image, its
    mirror (``flip``), and each translated by ``(shift, shift)`` and ``(-shift, -shift)``
    pixels with reflected borders (``shift``; Page 2018, airbench)."""
    return [(f, d) for f in ((False, True) if flip else (False,))
            for d in ((0, shift, -shift) if shift else (0,))]


def predict_probabilities(model: keras.Model, x: np.ndarray, batch_size: int = 256, *,
                          preprocess: Callable[[tf.Tensor], tf.Tensor] | None = None,
                          flip: bool = False, shift: int = 0) -> np.ndarray:
    """Class probabilities (float64) for uint8 images, through ``make_dataset``: the mean over
    the test-time augmentation views ``tta_views(flip, shift)``."""
    total = 0.0
    for mirrored, d in tta_views(flip, shift):
        def view(images, mirrored=mirrored, d=d):  # on the uint8 images, then preprocess
            n = tf.shape(images)[:1]
            moved = tf_shift_flip(images, tf.fill(n, d), tf.fill(n, d), tf.fill(n, mirrored),
                                  "reflect")
            return (preprocess or scale_to_unit)(moved)
        ds = make_dataset(x, None, batch_size, preprocess=view if (mirrored or d) else preprocess)
        total = total + np.asarray(model.predict(ds, verbose=0), np.float64)
    return total / len(tta_views(flip, shift))


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256, *,
             preprocess: Callable[[tf.Tensor], tf.Tensor] | None = None,
             class_names: Sequence[str] = CLASS_NAMES, flip: bool = False, shift: int = 0
             ) -> EvaluationResult:
    """Accuracy, cross-entropy, per-class accuracy and confusion matrix of ``model`` on uint8
    images ``x`` and integer labels ``y``. ``preprocess`` runs in the pipeline (default /255;
    a run's own: ``run_preprocess(weights_path)``); ``flip``, ``shift``: test-time augmentation.
    """
    y = np.asarray(y, np.int64).ravel()
    probs = predict_probabilities(model, x, batch_size, preprocess=preprocess, flip=flip,
                                  shift=shift)
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, probs.shape[1])
    loss = float(np.mean(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0))))
    return EvaluationResult(float(np.mean(pred == y)), loss,
                            np.diag(cm) / np.maximum(cm.sum(axis=1), 1), cm, tuple(class_names),
                            pred, probs.astype(np.float32))


def _infer_from_file(path: Path) -> dict[str, Any]:
    """Architecture, batch norm, dropout and variant as far as the weights file tells them."""
    saved = read_weights_summary(path)
    if saved.arch is None:
        return {}
    found = {"arch": saved.arch, "batch_norm": saved.batch_norm,
             "dropout": any(name.startswith("dropout") for name in saved.layer_names)}
    for variant in VARIANTS:  # the variants differ in weightless layers (ReLUs, input dropout)
        if model_summary(build_model(**found, variant=variant, weight_decay=0)
                         ).layer_names == saved.layer_names:
            return {**found, "variant": variant}
    return found


def load_trained_model(weights_path: str | os.PathLike, arch: str | None = None, *,
                       variant: str | None = None, batch_norm: bool | None = None,
                       dropout: bool | None = None, class_relu: bool | None = None,
                       **build_kwargs: Any) -> keras.Model:
    """A network with trained weights from a ``.weights.h5`` file or a ``.keras`` model.

    For weights, each network setting left as None comes from the ``config.json`` beside the
    file (written by ``train``), else from the file itself, else from ``build_model``'s
    defaults; ``build_kwargs`` go to ``build_model``. Raises ``FileNotFoundError`` for a
    missing file and ``WeightsMismatchError`` (naming both networks) for another network's.
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
    config = load_run_config(path)
    settings = {**NETWORK_DEFAULTS, **({k: config[k] for k in NETWORK_DEFAULTS if k in config}
                                       if config is not None else _infer_from_file(path))}
    explicit = {"arch": arch, "variant": variant, "batch_norm": batch_norm, "dropout": dropout,
                "class_relu": class_relu}
    settings.update({k: v for k, v in explicit.items() if v is not None})
    return load_weights(build_model(**settings, **{"weight_decay": 0, **build_kwargs}), path)


def run_preprocess(weights_path: str | os.PathLike) -> Callable[[tf.Tensor], tf.Tensor]:
    """The input preprocessing of the run that wrote ``weights_path`` (its ZCA or per-channel
    standardization, if it had one; /255 without a ``config.json`` beside the weights)."""
    path = Path(weights_path)
    return load_or_fit_preprocess(load_run_config(path) or {}, path.parent)
