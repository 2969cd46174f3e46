"""The original repository's four experiments and the fast recipe's ablation, as grids of runs.

Each run is ``allcnn train`` with one setting changed from a reference.
``scripts/run_experiments.py`` runs a grid and copies each run's small files to
``results/<config>/seed<k>/``; notebooks 08 and 10 read them back and tabulate them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The budget of the original repository's README experiments: 3,000 batches of 32 images.
BUDGET_BATCHES = 3000
BATCH_SIZE = 32
STEPS_PER_EPOCH = 300  # validation every 300 batches: 10 points per run
EPOCHS = BUDGET_BATCHES // STEPS_PER_EPOCH
SEEDS = (0, 1)

#: Flags every run shares: All-CNN-C (paper), the original repository's schedule, batch size and
#: SGD-Nesterov.
COMMON_FLAGS = ("--arch", "allcnn", "--variant", "paper", "--schedule", "inverse_time",
                "--batch-size", str(BATCH_SIZE), "--epochs", str(EPOCHS),
                "--steps-per-epoch", str(STEPS_PER_EPOCH))

RESULT_FILES = ("config.json", "history.csv", "batches.csv")
TEST_FILE = "test.json"  # a ladder rung's one evaluation on the test set


@dataclass(frozen=True)
class Config:
    """One configuration: a folder name, a label for plots and the flags that differ."""

    key: str
    label: str
    flags: tuple[str, ...] = ()
    common: tuple[str, ...] = COMMON_FLAGS
    test: bool = False  # a rung of the time-to-accuracy ladder: the test set is scored once
    seeds: tuple[int, ...] = SEEDS  # a third where two seeds disagree

    def command(self, seed: int, runs_dir: str | os.PathLike, *extra: str | os.PathLike
                ) -> list[str]:
        """``allcnn train`` arguments of this run; ``extra`` flags come last and win."""
        return ["train", "--id", run_id(self.key, seed), *self.common, *self.flags,
                "--seed", str(seed), "--runs-dir", str(runs_dir), *map(str, extra)]


CONFIGS: dict[str, Config] = {c.key: c for c in (
    Config("baseline", "SGD-Nesterov, Glorot uniform, shifts+flips, dropout"),
    Config("init_lsuv", "LSUV", ("--init", "lsuv")),
    Config("init_glorot_normal", "Glorot normal", ("--init", "glorot_normal"), seeds=(0, 1, 2)),
    Config("init_he_uniform", "He uniform", ("--init", "he_uniform")),
    Config("init_gaussian", "Gaussian 0.01", ("--init", "gaussian")),
    Config("no_augment", "no augmentation", ("--no-augment",)),
    Config("normalize", "shifts+flips, per-channel normalization", ("--normalize",)),
    Config("zca_0.1", "shifts+flips, GCN + ZCA (eps 0.1)", ("--zca", "--zca-epsilon", "0.1")),
    Config("zca_1e-6", "shifts+flips, GCN + ZCA (eps 1e-6, the original's)",
           ("--zca", "--zca-epsilon", "1e-6")),
    Config("batch_norm", "batch norm, no dropout", ("--bn", "1", "--dropout", "0")),
    Config("batch_norm_dropout", "batch norm and dropout", ("--bn", "1")),
    Config("no_dropout", "neither", ("--dropout", "0"), seeds=(0, 1, 2)),
    Config("rmsprop_rho0", "RMSprop, rho 0.0 (the original's)",
           ("--optimizer", "rmsprop", "--rho", "0.0")),
    Config("rmsprop", "RMSprop, rho 0.9", ("--optimizer", "rmsprop")),
    Config("adam", "Adam", ("--optimizer", "adam")),
    # Controls: each removes the cause notebook 08 names for a collapse.
    Config("init_lsuv_normalize", "LSUV on standardized inputs", ("--init", "lsuv", "--normalize")),
    Config("init_lsuv_no_class_relu", "LSUV, no ReLU on conv9",
           ("--init", "lsuv", "--class-relu", "0")),
    Config("init_he_uniform_no_class_relu", "He uniform, no ReLU on conv9",
           ("--init", "he_uniform", "--class-relu", "0")),
    Config("adam_no_l2", "Adam without L2", ("--optimizer", "adam", "--weight-decay", "0"),
           seeds=(0, 1, 2)),
    Config("adam_lr_1e-4", "Adam at lr 1e-4 (not 1e-3)", ("--optimizer", "adam", "--lr", "1e-4")),
    Config("adam_lr_3e-4", "Adam at lr 3e-4", ("--optimizer", "adam", "--lr", "3e-4")),
    Config("rmsprop_no_l2", "RMSprop, rho 0.9, without L2",
           ("--optimizer", "rmsprop", "--weight-decay", "0"), seeds=(0, 1, 2)),
    Config("rmsprop_lr_1e-4", "RMSprop, rho 0.9, at lr 1e-4 (not 1e-3)",
           ("--optimizer", "rmsprop", "--lr", "1e-4")),
)}

#: The fast recipe's ablation (``allcnn train --recipe fast``): the whole recipe, then the recipe
#: with one trick removed, each for ``RECIPE_ABLATION_EPOCHS`` epochs on the 45k/5k split.
RECIPE_ABLATION_EPOCHS = 5
RECIPE_FLAGS = ("--recipe", "fast", "--epochs", str(RECIPE_ABLATION_EPOCHS))
_REMOVALS = (  # in the order they run; "no EMA" needs no run of its own (ablation_table)
    ("no_class_relu", "without the ReLU on conv9", ("--class-relu", "0")),
    ("bn_momentum_0.99", "batch-norm momentum 0.99 (Keras' default, not 0.9)",
     ("--bn-momentum", "0.99")),
    ("batch_128", "batch 128, lr 0.1 (not 512, 0.4)", ("--batch-size", "128", "--lr", "0.1")),
    ("no_label_smoothing", "without label smoothing", ("--label-smoothing", "0")),
    ("no_whiten", "without patch-whitening init", ("--no-whiten-init",)),
    ("no_bn", "without batch norm", ("--bn", "0")),
    ("constant_lr", "constant learning rate (no one-cycle)", ("--schedule", "constant")),
    ("no_augment", "without translations and flips", ("--no-augment",)),
    ("zero_fill", "zero-filled translations (not reflect)", ("--shift-fill", "zero")),
    ("float32", "float32 (not mixed bfloat16)", ("--no-mixed-precision",)),
    ("no_normalize", "without per-channel standardization", ("--no-normalize",)),
    ("weight_decay_5e-4", "L2 5e-4 (twice the recipe's 2.5e-4)", ("--weight-decay", "5e-4")),
)
#: The recipe's configurations (``make recipe``); kept apart from the README experiments'.
RECIPE_CONFIGS: dict[str, Config] = {c.key: c for c in (
    Config("recipe/full", "fast recipe", (), RECIPE_FLAGS, test=True),
    *(Config(f"recipe/{key}", label, flags, RECIPE_FLAGS) for key, label, flags in _REMOVALS),
    *(Config(f"recipe/ladder_{e}", f"fast recipe, {e} epochs", ("--epochs", str(e)),
             RECIPE_FLAGS, test=True) for e in (10, 20)),
    # The final runs, on all 50,000 images, each sized to about two hours: the first shipped
    # model (2-core AMD EPYC), then the shipped one, with batch 128 and lr 0.1 (the ablation's
    # best variation) for 40 epochs (2-core Intel Xeon with AMX-BF16).
    Config("recipe/final_all_24", "fast recipe, all 50,000 images, 24 epochs (first shipped)",
           ("--train-on", "all", "--epochs", "24"), RECIPE_FLAGS, test=True),
    Config("recipe/final_all_b128_40",
           "fast recipe, batch 128 and lr 0.1, all 50,000 images, 40 epochs (shipped)",
           ("--train-on", "all", "--epochs", "40", "--batch-size", "128", "--lr", "0.1"),
           RECIPE_FLAGS, test=True),
    # The recipe's first draft, kept as the control that found the lag of batch norm's moving
    # statistics: Keras' momentum 0.99 and L2 5e-4 (run as recipe_full_seed0 before the fix).
    Config("recipe/draft", "first draft: batch-norm momentum 0.99 and L2 5e-4",
           ("--bn-momentum", "0.99", "--weight-decay", "5e-4"), RECIPE_FLAGS),
)}

#: Progressive resizing (``--crop-epochs``), not yet part of the recipe nor of notebook 10: rungs
#: of the ladder sized for notebook 06's 15-minute target (the 10-epoch rung's budget with the
#: first epochs on random 24 x 24 crops, about 0.56 of a whole epoch's multiply-adds each, and
#: a rung of about the cost of 8 whole epochs), and a pilot on 20,000 images (18,000 + 2,000
#: validation) at batch 128 and lr 0.1: crops against whole images at the same epochs, and at
#: about the same cost.
RESIZING_CONFIGS: dict[str, Config] = {c.key: c for c in (
    *(Config(f"recipe/crop24_{e}", f"fast recipe, {e} epochs, the first {c} on 24 px crops",
             ("--epochs", str(e), "--crop-epochs", str(c), "--crop-size", "24"),
             RECIPE_FLAGS, test=True) for e, c in ((10, 7), (12, 9))),
    *(Config(f"recipe/pilot_{name}", f"pilot, 20,000 images, {label}",
             ("--limit", "20000", "--batch-size", "128", "--lr", "0.1", "--epochs", str(e),
              "--crop-epochs", str(c)), RECIPE_FLAGS)
      for name, label, e, c in (("whole_4", "4 epochs", 4, 0),
                                ("crop24_4", "4 epochs, the first 3 on 24 px crops", 4, 3),
                                ("crop24_6", "6 epochs, the first 5 on 24 px crops", 6, 5))),
)}

#: Every configuration a run of ``run_order`` may name.
ALL_CONFIGS: dict[str, Config] = {**CONFIGS, **RECIPE_CONFIGS, **RESIZING_CONFIGS}

#: Each experiment's configurations, the reference first. The original repository's runs of
#: experiment 1 were all Glorot uniform (its -init flag never reached the model), so the baseline
#: is that.
EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "initialization": ("baseline", "init_lsuv", "init_glorot_normal", "init_he_uniform",
                       "init_gaussian"),
    "augmentation": ("no_augment", "baseline", "normalize", "zca_0.1", "zca_1e-6"),
    "regularization": ("baseline", "batch_norm", "batch_norm_dropout", "no_dropout"),
    "optimizers": ("baseline", "rmsprop_rho0", "rmsprop", "adam"),
    # The controls: the collapsed configuration, then the same without the suspected cause.
    "adaptive_steps": ("adam", "adam_no_l2", "adam_lr_3e-4", "adam_lr_1e-4", "rmsprop",
                       "rmsprop_no_l2", "rmsprop_lr_1e-4"),
    "lsuv_inputs": ("init_lsuv", "init_lsuv_normalize", "normalize"),
    "class_relu": ("init_lsuv", "init_lsuv_no_class_relu", "init_he_uniform",
                   "init_he_uniform_no_class_relu"),
}
#: The fast recipe's ablation, time-to-accuracy ladder (``make recipe``), progressive
#: resizing and final runs.
RECIPE_EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "recipe_ablation": ("recipe/full", *(f"recipe/{key}" for key, _, _ in _REMOVALS)),
    "recipe_ladder": ("recipe/ladder_10", "recipe/ladder_20"),
    "recipe_crops": ("recipe/crop24_10", "recipe/crop24_12"),
    "recipe_crop_pilot": ("recipe/pilot_whole_4", "recipe/pilot_crop24_6",
                          "recipe/pilot_crop24_4"),
    "recipe_final": ("recipe/final_all_24", "recipe/final_all_b128_40"),
}


def run_id(key: str, seed: int) -> str:
    """The run id of configuration ``key`` with ``seed`` (committed results are named so)."""
    return f"{key.replace('/', '_')}_seed{seed}"


def result_dir(results: str | os.PathLike, key: str, seed: int) -> Path:
    """Where the small files of a run are kept: ``results/<key>/seed<k>``."""
    return Path(results) / key / f"seed{seed}"


def run_order(experiments: Sequence[str] = tuple(EXPERIMENTS),
              seeds: Sequence[int] | None = None) -> list[tuple[Config, int]]:
    """(configuration, seed) pairs, each once, experiment by experiment, the seeds of a
    configuration together: a partial grid completes whole experiments. ``seeds`` keeps only
    those of each configuration's seeds."""
    grids = {**EXPERIMENTS, **RECIPE_EXPERIMENTS}
    unknown = [e for e in experiments if e not in grids]
    if unknown:
        raise ValueError(f"unknown experiment {unknown[0]!r}; choose from {', '.join(grids)}")
    pairs = [(ALL_CONFIGS[key], seed) for e in experiments for key in grids[e]
             for seed in ALL_CONFIGS[key].seeds if seeds is None or seed in seeds]
    return list(dict.fromkeys(pairs))


def _finished_config(folder: Path) -> dict | None:
    """The ``config.json`` of a finished run in ``folder`` (``is_complete``), else None."""
    try:
        config = json.loads((folder / "config.json").read_text())
        rows = (folder / "history.csv").read_text().strip().splitlines()
    except (OSError, ValueError):
        return None
    status = config.get("run", {}).get("status")
    epochs_done = len(rows) - 1 >= int(config.get("epochs", EPOCHS))
    finished = (status == "finished" and epochs_done) or status == "terminated_on_nan"
    return config if finished and (folder / "batches.csv").is_file() else None


def is_complete(folder: str | os.PathLike) -> bool:
    """A finished run (every epoch in its history), or one stopped by a NaN loss."""
    return _finished_config(Path(folder)) is not None


def finished_runs(results: str | os.PathLike, keys: Iterable[str]
                  ) -> Iterator[tuple[str, int, Path, dict]]:
    """Each finished run (``is_complete``) under ``results/<key>/seed<k>``, key by key, seeds in
    order: the key, the seed, the folder and its ``config.json`` (notebooks 08 and 10)."""
    for key in keys:
        seeds = sorted((int(f.name[4:]), f) for f in Path(results, key).glob("seed*")
                       if f.name[4:].isdigit())
        for seed, folder in seeds:
            if (config := _finished_config(folder)) is not None:
                yield key, seed, folder, config


#: Accuracies the time-to-accuracy ladder is read at: 85%, the original repository's 90.88%, the
#: paper's 92.75%.
LADDER_TARGETS = (0.85, 0.9088, 0.9275)


def time_to_accuracy(history, targets: Sequence[float] = LADDER_TARGETS) -> dict[float, float]:
    """Minutes of training (``time`` summed) until validation accuracy first reaches each
    target; NaN for a target never reached (notebooks 06 and 10)."""
    minutes = np.cumsum(np.asarray(history["time"], float)) / 60
    acc = np.asarray(history["val_accuracy"], float)
    return {t: float(minutes[np.argmax(acc >= t)]) if (acc >= t).any() else float("nan")
            for t in targets}
