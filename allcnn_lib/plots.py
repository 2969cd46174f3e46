"""Figures for the notebooks and the command line (matplotlib and seaborn; PNG).

Every function draws one figure with a title and labelled axes, and returns the Figure so that
callers can save it (``fig.savefig(path)``).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from allcnn_lib.runs import read_columns  # noqa: F401 (callers read runs through plots)

# --------------------------------------------------------------------------- images


def _show(ax, image, **kwargs) -> None:
    """``imshow`` without ticks or grid."""
    ax.imshow(image, interpolation="nearest", **kwargs)
    ax.set(xticks=[], yticks=[])
    ax.grid(False)


def image_row(images: Sequence[np.ndarray], captions: Sequence[str], *, title: str = "",
              size: float = 2.8) -> Figure:
    """A row of images with a caption under each (uint8 HWC, or floats in [0, 1])."""
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
               per_class: int = 8, title: str = "", predictions: np.ndarray | None = None
               ) -> Figure:
    """A grid with one row per class and ``per_class`` images of it, class names on the left.

    With ``predictions``, each image's title gives the predicted class (red when wrong).
    """
    n_classes = len(class_names)
    fig, axes = plt.subplots(n_classes, per_class, figsize=(per_class * 0.9, n_classes * 0.95),
                             squeeze=False)
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            _show(ax, images[idx[j]] if j < len(idx) else np.ones((1, 1, 3)))
            if j < len(idx):
                if predictions is not None:
                    p = int(predictions[idx[j]])
                    ax.set_title(class_names[p], fontsize=7, color="k" if p == c else "r")
            if j == 0:
                ax.set_ylabel(class_names[c], rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(h_pad=0.2, w_pad=0.2)
    return fig


def image_table(rows: Mapping[str, Sequence[np.ndarray]], column_titles: Sequence[str], *,
                title: str = "", size: float = 1.5) -> Figure:
    """A table of images: one row per entry of ``rows`` (its label on the left), one column per
    image, ``column_titles`` above the first row (uint8 HWC, or floats in [0, 1])."""
    fig, axes = plt.subplots(len(rows), len(column_titles), squeeze=False,
                             figsize=(size * len(column_titles) + 1.2, size * len(rows) + 0.5))
    for i, (label, images) in enumerate(rows.items()):
        for j, image in enumerate(images):
            _show(axes[i, j], image)
            if i == 0:
                axes[i, j].set_title(column_titles[j], fontsize=8)
        axes[i, 0].set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(h_pad=0.3, w_pad=0.2)
    return fig


def tile_images(images: np.ndarray, columns: int, *, pad: int = 1,
                fill: float = 1.0) -> np.ndarray:
    """``(N, h, w, 3)`` images in [0, 1] as one mosaic of ``columns`` per row, ``pad`` pixels
    of ``fill`` between them (for many small images, such as first-layer filters)."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    mosaic = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), fill)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        mosaic[top:top + h, left:left + w] = image
    return mosaic


def heat_overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.5,
                 cmap: str = "jet") -> np.ndarray:
    """``image`` (uint8 HWC) blended with the colour-mapped ``heat`` (HW, scaled to [0, 1]
    here), as an RGB float image in [0, 1]."""
    heat = np.asarray(heat, np.float64)
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    colours = plt.get_cmap(cmap)(heat)[..., :3]
    return (1 - alpha) * np.asarray(image, np.float64) / 255.0 + alpha * colours


# --------------------------------------------------------------------------- data statistics


def class_balance(splits: Mapping[str, np.ndarray], class_names: Sequence[str], *,
                  title: str = "Images per class") -> Figure:
    """Grouped bars: the number of images of each class in each split."""
    import seaborn as sns

    rows = [(name, class_names[c], int(n))
            for name, labels in splits.items()
            for c, n in enumerate(np.bincount(labels, minlength=len(class_names)))]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    sns.barplot(x=[r[1] for r in rows], y=[r[2] for r in rows], hue=[r[0] for r in rows], ax=ax)
    ax.set_xlabel("class")
    ax.set_ylabel("images")
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
        ax.plot(np.arange(256), counts / counts.sum() * 100, color=color,
                label="RGB"[channel])
    ax.set_xlabel("pixel value (0-255)")
    ax.set_ylabel("share of pixels (%)")
    ax.set_xlim(0, 255)
    ax.set_title(title)
    ax.legend(title="channel")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- training runs


def smooth(values: Sequence[float], weight: float = 0.9) -> np.ndarray:
    """Exponential moving average with TensorBoard's start-up correction (``weight`` in [0, 1))."""
    values = np.asarray(values, float)
    out = np.empty_like(values)
    avg, norm = 0.0, 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = avg / norm
    return out


def training_curves(history: Mapping[str, Sequence[float]] | str | os.PathLike,
                    metric: str = "accuracy", *,
                    batches: Mapping[str, Sequence[float]] | str | os.PathLike | None = None,
                    smoothing: float = 0.9, title: str | None = None) -> Figure:
    """``metric`` ("accuracy" or "loss") against epochs: training and validation per epoch and,
    with ``batches`` (``batches.csv``), every training batch, faint, with a smoothed line.

    ``history`` is ``history.csv`` (a path) or its columns (epochs counted from 0, as Keras'
    CSVLogger writes them); each epoch's value is drawn at its end (x = epoch + 1).
    """
    if not isinstance(history, Mapping):
        history = read_columns(history)
    if batches is not None and not isinstance(batches, Mapping):
        batches = read_columns(batches)
    epochs = np.asarray(history.get("epoch", np.arange(len(history.get(metric, [])))), float)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if batches is not None and len(batches.get(metric, ())):
        steps_per_epoch = float(np.nanmax(batches["batch"])) + 1
        x = (np.asarray(batches["step"], float) + 1) / steps_per_epoch
        ax.plot(x, batches[metric], color="tab:blue", alpha=0.2, lw=0.8,
                label="training, per batch")
        ax.plot(x, smooth(batches[metric], smoothing), color="tab:blue", lw=1.2, alpha=0.7,
                label=f"training, per batch (smoothed {smoothing})")
    if metric in history:
        ax.plot(epochs + 1, history[metric], "o-", color="tab:blue", ms=3,
                label="training (epoch mean)")
    validation = np.asarray(history.get(f"val_{metric}", []), float)
    if np.isfinite(validation).any():  # none for a run trained on all 50,000 images
        ax.plot(epochs + 1, validation, "s-", color="tab:orange", ms=3, label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    if metric == "accuracy":
        ax.set_ylim(0, 1)
    ax.set_title(title or (f"Training and validation {metric}" if np.isfinite(validation).any()
                           else f"Training {metric}"))
    ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix_plot(confusion: np.ndarray, class_names: Sequence[str], *,
                          normalize: bool = True, title: str = "Confusion matrix") -> Figure:
    """A seaborn heatmap of a confusion matrix (rows: true class, columns: predicted class).

    ``normalize`` shows each row as shares of the true class (the diagonal is the per-class
    accuracy); the cells are annotated either way.
    """
    import seaborn as sns

    cm = np.asarray(confusion, float)
    values = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(8, 6.8))
    sns.heatmap(values, annot=True, fmt=".2f" if normalize else ".0f", cmap="Blues",
                xticklabels=class_names, yticklabels=class_names, square=True, cbar=True,
                vmin=0, vmax=1 if normalize else None, annot_kws={"fontsize": 8}, ax=ax)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    ax.tick_params(axis="y", rotation=0)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 120,
                close: bool = False) -> Path:
    """Save ``fig`` as PNG atomically (temporary file, then ``os.replace``); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        if close:
            plt.close(fig)
    return path


def save_run_plots(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Draw ``accuracy.png`` and ``loss.png`` of a run folder from its CSV files."""
    run_dir = Path(run_dir)
    history_csv = run_dir / "history.csv"
    if not history_csv.is_file():
        raise FileNotFoundError(f"{history_csv}: no such file (not a training run folder?)")
    history = read_columns(history_csv)
    batches_csv = run_dir / "batches.csv"
    batches = read_columns(batches_csv) if batches_csv.is_file() else None
    out = {}
    for metric in ("accuracy", "loss"):
        fig = training_curves(history, metric, batches=batches,
                              title=f"{run_dir.name}: {metric}")
        out[metric] = save_figure(fig, run_dir / f"{metric}.png", close=True)
    return out


# --------------------------------------------------------------------------- architectures

#: The nine layer slots of Tables 1 and 2: All-CNN-C's conv3 and conv6 stand where Model-C pools.
LAYER_SLOTS: tuple[tuple[str, ...], ...] = (
    ("conv1",), ("conv2",), ("conv3", "pool1"), ("conv4",), ("conv5",), ("conv6", "pool2"),
    ("conv7",), ("conv8",), ("conv9",))


def _by_slot(table, column: str) -> list:
    """``table[column]`` (a ``layer_table``) per layer slot; None where the network has none."""
    found = [[n for n in slot if n in table.index] for slot in LAYER_SLOTS]
    return [table.loc[names[0], column] if names else None for names in found]


def plot_layer_costs(tables: Mapping, *, title: str = "Parameters and MACs per layer") -> Figure:
    """Grouped bars per layer slot, one bar per network (label -> ``layer_table``): parameters
    (top) and forward MACs per image (bottom); no bar where a network lacks the layer."""
    x = np.arange(len(LAYER_SLOTS))
    width = 0.8 / max(len(tables), 1)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.4), sharex=True)
    for i, (name, table) in enumerate(tables.items()):
        for ax, column, scale in ((axes[0], "parameters", 1e3), (axes[1], "macs", 1e6)):
            values = [0.0 if v is None else v / scale for v in _by_slot(table, column)]
            ax.bar(x + (i - (len(tables) - 1) / 2) * width, values, width, label=name)
    axes[0].set(ylabel="parameters (thousands)", title="Parameters per layer")
    axes[1].set(ylabel="forward MACs per image (millions)",
                title="Multiply-accumulates per layer (one 32 x 32 image)",
                xlabel="layer (All-CNN-C numbering; Model-C pools at conv3 and conv6)")
    axes[1].set_xticks(x, [" / ".join(slot) for slot in LAYER_SLOTS], rotation=20)
    axes[0].legend(title="network", loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_receptive_fields(tables: Mapping, *, image_size: int = 32,
                          title: str = "Receptive field and feature-map size") -> Figure:
    """Per network (label -> ``layer_table``): receptive field side after each layer slot, the
    image side dashed (left), and the feature-map side (right). Coinciding curves stay visible:
    the first is wide and pale, later ones thinner and dashed."""
    x = np.arange(len(LAYER_SLOTS))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for i, (name, table) in enumerate(tables.items()):
        k = i % 4
        style = {"lw": (6, 2.2, 1.6, 1.2)[k], "ms": (12, 7, 5, 4)[k], "marker": "osD^"[k],
                 "ls": ("-", "-", "--", ":")[k], "alpha": 0.45 if k == 0 else 1.0}
        rf, shapes = _by_slot(table, "receptive_field"), _by_slot(table, "output_shape")
        keep = [k for k, v in enumerate(rf) if v is not None]
        axes[0].plot(x[keep], [rf[k] for k in keep], label=name, **style)
        axes[1].plot(x[keep], [shapes[k][0] for k in keep], label=name, **style)
    axes[0].axhline(image_size, color="0.4", ls="--", lw=1, label=f"image ({image_size} px)")
    axes[0].set(ylabel="receptive field side (pixels)", title="Receptive field of one unit")
    axes[1].set(ylabel="feature-map side (units)", title="Spatial size of the output")
    for ax in axes:
        ax.set_xticks(x, [" / ".join(slot) for slot in LAYER_SLOTS], rotation=35, ha="right")
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
    cols = min(n, 5)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(2.1 * cols + 0.8,
                                                          2.3 * -(-n // cols)), squeeze=False)
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
              predicted: Sequence[int], class_names: Sequence[str], *, alpha: float = 0.5,
              title: str = "Class activation maps of the predicted class") -> Figure:
    """Top row: the images (uint8) with their true class; bottom row: each with the class
    activation map of its predicted class on top (``heat_overlay``), red when wrong."""
    fig, axes = plt.subplots(2, len(images), figsize=(1.55 * len(images) + 0.9, 4.0),
                             squeeze=False)
    for i, (image, cam) in enumerate(zip(images, cams, strict=True)):
        _show(axes[0, i], image)
        _show(axes[1, i], heat_overlay(image, cam, alpha=alpha))
        axes[0, i].set_title(f"true: {class_names[int(true_labels[i])]}", fontsize=9)
        wrong = int(predicted[i]) != int(true_labels[i])
        axes[1, i].set_xlabel(f"pred: {class_names[int(predicted[i])]}", fontsize=9,
                              color="r" if wrong else "k")
    axes[1, 0].set_ylabel("CAM of\npredicted class", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- signal propagation


def layer_stats_figure(stats: Mapping[str, Mapping[str, float]], *, title: str, ylabel: str,
                       xlabel: str = "layer (forward order)",
                       predicted: Mapping[str, Sequence[float]] | None = None,
                       log: bool = True, legend: bool = True, ax=None) -> Figure:
    """One line per initializer (label -> {layer: value}, the same layers in each) of a
    per-layer statistic; ``predicted`` (label -> values) dashed in the same colour. With
    ``ax`` it draws there and leaves the layout to the caller. Layer names label up to 12
    layers, numbers (1 = first) label more."""
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
    if log:
        ax.set_yscale("log")
    if len(names) <= 12:
        ax.set_xticks(x, names, fontsize=9)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if legend:
        ax.legend(fontsize=9)
    if own_figure:
        fig.tight_layout()
    return fig


def weight_histograms(samples: Mapping[str, np.ndarray], *, title: str, bins: int = 120,
                      xlabel: str = "weight value") -> Figure:
    """Overlaid density histograms of sampled kernels (label -> weights), stds in the legend."""
    if not samples:
        raise ValueError("nothing to plot")
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    limit = max(float(np.max(np.abs(w))) for w in samples.values())
    for label, w in samples.items():
        w = np.ravel(w)
        ax.hist(w, bins=np.linspace(-limit, limit, bins + 1), density=True, histtype="step",
                lw=1.5, label=f"{label} (std {w.std():.4f})")
    ax.set(xlabel=xlabel, ylabel="density (1 / weight unit)", title=title)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig
