"""Every figure of the notebooks and the command line (matplotlib and seaborn). Each function
draws one titled figure with labelled axes and returns it; ``save_figure`` writes a PNG."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from allcnn_lib.runs import read_columns

# --------------------------------------------------------------------------- images


def _show(ax, image, **kwargs) -> None:
    ax.imshow(image, interpolation="nearest", **kwargs)
    ax.set(xticks=[], yticks=[])
    ax.grid(False)


def image_row(images: Sequence[np.ndarray], captions: Sequence[str], *, title: str = "",
              size: float = 2.8) -> Figure:
    """A row of images (uint8 HWC, or floats in [0, 1]) with a caption under each."""
    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size + 0.6),
                             squeeze=False)
    for ax, image, caption in zip(axes[0], images, captions, strict=True):
        _show(ax, image)
        ax.set_xlabel(textwrap.fill(caption, width=int(size * 10)), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
               per_class: int = 8, title: str = "") -> Figure:
    """One row per class of ``per_class`` of its images, class names on the left."""
    n = len(class_names)
    fig, axes = plt.subplots(n, per_class, figsize=(per_class * 0.9, n * 0.95), squeeze=False)
    for c in range(n):
        idx = np.flatnonzero(labels == c)[:per_class]
        axes[c, 0].set_ylabel(class_names[c], rotation=0, ha="right", va="center", fontsize=9)
        for j, ax in enumerate(axes[c]):
            _show(ax, images[idx[j]] if j < len(idx) else np.ones((1, 1, 3)))
    if title:
        fig.suptitle(title)
    fig.tight_layout(h_pad=0.2, w_pad=0.2)
    return fig


def image_table(rows: Mapping[str, Sequence[np.ndarray]], column_titles: Sequence[str], *,
                title: str = "", size: float = 1.5) -> Figure:
    """One row of images per entry of ``rows`` (its label on the left), ``column_titles``
    above the first row (uint8 HWC, or floats in [0, 1])."""
    fig, axes = plt.subplots(len(rows), len(column_titles), squeeze=False,
                             figsize=(size * len(column_titles) + 1.2, size * len(rows) + 0.5))
    for i, (label, images) in enumerate(rows.items()):
        for ax, image in zip(axes[i], images, strict=False):
            _show(ax, image)
        axes[i, 0].set_ylabel(label, fontsize=9)
    for ax, column in zip(axes[0], column_titles, strict=True):
        ax.set_title(column, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(h_pad=0.3, w_pad=0.2)
    return fig


def tile_images(images: np.ndarray, columns: int) -> np.ndarray:
    """``(N, h, w, c)`` images in [0, 1] as one mosaic of ``columns`` per row, white lines of
    one pixel between them (for many small images, such as first-layer filters)."""
    n, h, w, c = images.shape
    mosaic = np.ones((-(-n // columns) * (h + 1) + 1, columns * (w + 1) + 1, c))
    for i, image in enumerate(images):
        top, left = 1 + (i // columns) * (h + 1), 1 + (i % columns) * (w + 1)
        mosaic[top:top + h, left:left + w] = image
    return mosaic


def heat_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``image`` (uint8 HWC) half and half with the colour-mapped ``heat`` (HW, scaled to
    [0, 1] here), as an RGB float image in [0, 1]."""
    heat = np.asarray(heat, np.float64) - np.min(heat)
    colours = plt.get_cmap("jet")(heat / heat.max() if heat.max() > 0 else heat)[..., :3]
    return 0.5 * np.asarray(image, np.float64) / 255.0 + 0.5 * colours


# --------------------------------------------------------------------------- data


def class_balance(splits: Mapping[str, np.ndarray], class_names: Sequence[str], *,
                  title: str = "Images per class") -> Figure:
    """Grouped bars: the number of images of each class in each split."""
    counts = pd.DataFrame([(split, class_names[c], n) for split, labels in splits.items()
                           for c, n in enumerate(np.bincount(labels, minlength=len(class_names)))],
                          columns=["split", "class", "images"])
    fig, ax = plt.subplots(figsize=(9, 3.8))
    sns.barplot(counts, x="class", y="images", hue="split", ax=ax)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    ax.legend(title="split", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def pixel_histograms(images: np.ndarray, *, title: str = "Pixel values") -> Figure:
    """Histograms of the 8-bit values of each colour channel."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for channel, color in enumerate(("tab:red", "tab:green", "tab:blue")):
        counts = np.bincount(images[..., channel].ravel(), minlength=256)
        ax.plot(np.arange(256), counts / counts.sum() * 100, color=color, label="RGB"[channel])
    ax.set(xlabel="pixel value (0-255)", ylabel="share of pixels (%)", xlim=(0, 255),
           title=title)
    ax.legend(title="channel")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- training runs


def training_curves(history: Mapping[str, Sequence[float]] | str | os.PathLike,
                    metric: str = "accuracy", *,
                    batches: Mapping[str, Sequence[float]] | str | os.PathLike | None = None,
                    title: str | None = None) -> Figure:
    """``metric`` against epochs: training and validation per epoch (``history.csv`` or its
    columns) and, with ``batches`` (``batches.csv``), every batch, faint, and its exponential
    moving average (weight 0.9, bias-corrected as TensorBoard's). Epoch e is drawn at e + 1."""
    history = history if isinstance(history, Mapping) else read_columns(history)
    batches = batches if batches is None or isinstance(batches, Mapping) else read_columns(batches)
    epochs = np.asarray(history.get("epoch", np.arange(len(history.get(metric, [])))), float) + 1
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if batches is not None and len(batches.get(metric, ())):
        x = (np.asarray(batches["step"], float) + 1) / (np.nanmax(batches["batch"]) + 1)
        ax.plot(x, batches[metric], color="tab:blue", alpha=0.2, lw=0.8,
                label="training, per batch")
        ax.plot(x, pd.Series(batches[metric]).ewm(alpha=0.1).mean(), color="tab:blue", lw=1.2,
                alpha=0.7, label="training, per batch (smoothed 0.9)")
    if metric in history:
        ax.plot(epochs, history[metric], "o-", color="tab:blue", ms=3,
                label="training (epoch mean)")
    validation = np.asarray(history.get(f"val_{metric}", []), float)
    has_validation = bool(np.isfinite(validation).any())  # none when trained on all images
    if has_validation:
        ax.plot(epochs, validation, "s-", color="tab:orange", ms=3, label="validation")
    ax.set(xlabel="epoch", ylabel=metric, title=title or (
        f"Training and validation {metric}" if has_validation else f"Training {metric}"))
    if metric == "accuracy":
        ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix_plot(confusion: np.ndarray, class_names: Sequence[str], *,
                          title: str = "Confusion matrix") -> Figure:
    """A heat map of a confusion matrix (rows: true class, columns: predicted class), each row
    as shares of its true class (the diagonal is the per-class accuracy)."""
    cm = np.asarray(confusion, float)
    fig, ax = plt.subplots(figsize=(8, 6.8))
    sns.heatmap(cm / np.maximum(cm.sum(axis=1, keepdims=True), 1), annot=True, fmt=".2f",
                cmap="Blues", xticklabels=class_names, yticklabels=class_names, square=True,
                vmin=0, vmax=1, annot_kws={"fontsize": 8}, ax=ax)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    ax.tick_params(axis="x", rotation=45)
    ax.tick_params(axis="y", rotation=0)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, close: bool = False) -> Path:
    """Save ``fig`` as PNG atomically (a temporary file, then ``os.replace``); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if close:
            plt.close(fig)
    return path


def save_run_plots(run_dir: str | os.PathLike,
                   out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Draw ``accuracy.png`` and ``loss.png`` of a run folder into ``out_dir`` (default: the
    run folder) from its ``history.csv`` and ``batches.csv``."""
    run_dir = Path(run_dir)
    history = read_columns(run_dir / "history.csv")
    if not history:
        raise FileNotFoundError(f"{run_dir}: no history.csv (not a training run folder?)")
    batches = read_columns(run_dir / "batches.csv") or None
    return {metric: save_figure(training_curves(history, metric, batches=batches,
                                                title=f"{run_dir.name}: {metric}"),
                                Path(out_dir or run_dir) / f"{metric}.png", close=True)
            for metric in ("accuracy", "loss")}


# --------------------------------------------------------------------------- architectures

#: The nine layer slots of Tables 1 and 2: All-CNN-C's conv3 and conv6 stand where Model-C pools.
LAYER_SLOTS = (("conv1",), ("conv2",), ("conv3", "pool1"), ("conv4",), ("conv5",),
               ("conv6", "pool2"), ("conv7",), ("conv8",), ("conv9",))


def _by_slot(table: pd.DataFrame, column: str) -> list:
    """``table[column]`` (a ``layer_table``) per layer slot; None where the network has none."""
    found = [[n for n in slot if n in table.index] for slot in LAYER_SLOTS]
    return [table.loc[names[0], column] if names else None for names in found]


def _slot_ticks(ax, **kwargs) -> None:
    ax.set_xticks(range(len(LAYER_SLOTS)), [" / ".join(s) for s in LAYER_SLOTS], **kwargs)


def plot_layer_costs(tables: Mapping[str, pd.DataFrame], *,
                     title: str = "Parameters and MACs per layer") -> Figure:
    """Grouped bars per layer slot, one per network (label -> ``layer_table``): parameters
    (top) and forward MACs per image (bottom); no bar where a network lacks the layer."""
    x, width = np.arange(len(LAYER_SLOTS)), 0.8 / max(len(tables), 1)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.4), sharex=True)
    for i, (name, table) in enumerate(tables.items()):
        for ax, column, scale in ((axes[0], "parameters", 1e3), (axes[1], "macs", 1e6)):
            values = [0.0 if v is None else v / scale for v in _by_slot(table, column)]
            ax.bar(x + (i - (len(tables) - 1) / 2) * width, values, width, label=name)
    axes[0].set(ylabel="parameters (thousands)", title="Parameters per layer")
    axes[1].set(ylabel="forward MACs per image (millions)",
                title="Multiply-accumulates per layer (one 32 x 32 image)",
                xlabel="layer (All-CNN-C numbering; Model-C pools at conv3 and conv6)")
    _slot_ticks(axes[1], rotation=20)
    axes[0].legend(title="network", loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_receptive_fields(tables: Mapping[str, pd.DataFrame], *, image_size: int = 32,
                          title: str = "Receptive field and feature-map size") -> Figure:
    """Per network (label -> ``layer_table``): the receptive field side after each layer slot
    with the image side dashed (left), and the feature-map side (right). Coinciding curves
    stay visible: the first is wide and pale, later ones thinner and dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for i, (name, table) in enumerate(tables.items()):
        style = {"lw": 6 if i == 0 else 2, "ms": 12 if i == 0 else 6, "marker": "osD^"[i % 4],
                 "ls": ("-", "-", "--", ":")[i % 4], "alpha": 0.45 if i == 0 else 1.0}
        rf, shapes = _by_slot(table, "receptive_field"), _by_slot(table, "output_shape")
        keep = [j for j, v in enumerate(rf) if v is not None]
        axes[0].plot(keep, [rf[j] for j in keep], label=name, **style)
        axes[1].plot(keep, [shapes[j][0] for j in keep], label=name, **style)
    axes[0].axhline(image_size, color="0.4", ls="--", lw=1, label=f"image ({image_size} px)")
    axes[0].set(ylabel="receptive field side (pixels)", title="Receptive field of one unit")
    axes[1].set(ylabel="feature-map side (units)", title="Spatial size of the output")
    for ax in axes:
        _slot_ticks(ax, rotation=35, ha="right")
        ax.set_xlabel("layer")
        ax.legend(title="network")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_class_maps(maps: np.ndarray, class_names: Sequence[str], *,
                    title: str = "Class maps and their global averages") -> Figure:
    """One heat map per channel of an ``(h, w, classes)`` map, with its mean (the score that
    global average pooling gives) under it."""
    maps = np.asarray(maps, np.float64)
    n = maps.shape[-1]
    cols, rows = min(n, 5), -(-n // min(n, 5))
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols + 0.8, 2.3 * rows), squeeze=False)
    for c, ax in enumerate(axes.flat):
        if c >= n:
            ax.set_axis_off()
            continue
        _show(ax, maps[..., c], vmin=maps.min(), vmax=maps.max())
        ax.set_title(f"{c}: {class_names[c]}", fontsize=9)
        ax.set_xlabel(f"mean {maps[..., c].mean():.4f}", fontsize=9)
    fig.colorbar(axes.flat[0].images[0], ax=axes, label="map value", shrink=0.8)
    fig.suptitle(title)
    return fig


def plot_cams(images: np.ndarray, cams: np.ndarray, true_labels: Sequence[int],
              predicted: Sequence[int], class_names: Sequence[str], *,
              title: str = "Class activation maps of the predicted class") -> Figure:
    """Top row: the images (uint8) with their true class; bottom row: each with the class
    activation map of its predicted class on top (``heat_overlay``), red when wrong."""
    fig, axes = plt.subplots(2, len(images), figsize=(1.55 * len(images) + 0.9, 4.0),
                             squeeze=False)
    for i, (image, cam, true, pred) in enumerate(zip(images, cams, true_labels, predicted,
                                                     strict=True)):
        _show(axes[0, i], image)
        _show(axes[1, i], heat_overlay(image, cam))
        axes[0, i].set_title(f"true: {class_names[int(true)]}", fontsize=9)
        axes[1, i].set_xlabel(f"pred: {class_names[int(pred)]}", fontsize=9,
                              color="r" if int(pred) != int(true) else "k")
    axes[1, 0].set_ylabel("CAM of\npredicted class", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- signal propagation


def layer_stats_figure(stats: Mapping[str, Mapping[str, float]], *, title: str, ylabel: str,
                       xlabel: str = "layer (forward order)",
                       predicted: Mapping[str, Sequence[float]] | None = None,
                       legend: bool = True, ax=None) -> Figure:
    """One line per initializer (label -> {layer: value}, the same layers in each) of a
    per-layer statistic on a log scale, ``predicted`` (label -> values) dashed in the same
    colour; into ``ax`` if given (the caller lays it out). Names label up to 12 layers."""
    if not stats:
        raise ValueError("nothing to plot")
    own_figure = ax is None
    fig, ax = plt.subplots(figsize=(7.5, 4.4)) if own_figure else (ax.figure, ax)
    names = list(next(iter(stats.values())))
    x = np.arange(1, len(names) + 1)
    for i, (label, values) in enumerate(stats.items()):
        if list(values) != names:
            raise ValueError(f"{label!r} has layers {list(values)}, expected {names}")
        line, = ax.plot(x, list(values.values()), marker="osD^vP*X"[i % 8], ms=4, label=label)
        if predicted and label in predicted:
            ax.plot(x, predicted[label], ls="--", color=line.get_color(), alpha=0.8)
    if predicted:
        ax.plot([], [], ls="--", color="grey", label="predicted (He et al., Eq. 9)")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, yscale="log")
    if len(names) <= 12:
        ax.set_xticks(x, names, fontsize=9)
    if legend:
        ax.legend(fontsize=9)
    if own_figure:
        fig.tight_layout()
    return fig


def weight_histograms(samples: Mapping[str, np.ndarray], *, title: str,
                      xlabel: str = "weight value") -> Figure:
    """Overlaid density histograms of sampled kernels (label -> weights), stds in the legend."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    limit = max(float(np.max(np.abs(w))) for w in samples.values())
    for label, w in samples.items():
        w = np.ravel(w)
        ax.hist(w, bins=np.linspace(-limit, limit, 121), density=True, histtype="step",
                lw=1.5, label=f"{label} (std {w.std():.4f})")
    ax.set(xlabel=xlabel, ylabel="density (1 / weight unit)", title=title)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig
