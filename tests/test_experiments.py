"""allcnn_lib.experiments and scripts/run_experiments.py: the grid, the commands it runs,
reading results back, the summary table, and one real run end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from allcnn_lib import cli
from allcnn_lib import experiments as ex

ROOT = Path(__file__).resolve().parent.parent


def test_grid_runs_each_configuration_once_per_seed():
    order = ex.run_order()
    keys = [(c.key, s) for c, s in order]
    assert len(keys) == len(set(keys)) == sum(len(c.seeds) for c in ex.CONFIGS.values()) == 50
    assert keys[:2] == [("baseline", 0), ("baseline", 1)]
    # a third seed where the first two disagree; --seeds keeps only the given ones
    assert [(c.key, s) for c, s in ex.run_order(seeds=[2])] == [
        ("init_glorot_normal", 2), ("no_dropout", 2), ("adam_no_l2", 2), ("rmsprop_no_l2", 2)]
    assert {c.key for c, _ in ex.run_order(["class_relu"], seeds=[0])} == {
        "init_lsuv", "init_lsuv_no_class_relu", "init_he_uniform",
        "init_he_uniform_no_class_relu"}
    assert all(k in ex.CONFIGS for keys_ in ex.EXPERIMENTS.values() for k in keys_)
    assert ex.EPOCHS * ex.STEPS_PER_EPOCH == ex.BUDGET_BATCHES == 3000
    with pytest.raises(ValueError, match="unknown experiment"):
        ex.run_order(["dropout"])


@pytest.mark.parametrize("key, expected", [
    ("baseline", {"init": "glorot_uniform", "optimizer": "sgd", "augment": True,
                  "dropout": None, "batch_norm": None, "zca": False, "normalize": False}),
    ("init_lsuv", {"init": "lsuv"}),
    ("init_gaussian", {"init": "gaussian"}),
    ("no_augment", {"augment": False}),
    ("normalize", {"normalize": True, "zca": False}),
    ("zca_1e-6", {"zca": True, "zca_epsilon": 1e-6}),
    ("zca_0.1", {"zca": True, "zca_epsilon": 0.1}),
    ("batch_norm", {"batch_norm": True, "dropout": False}),
    ("batch_norm_dropout", {"batch_norm": True, "dropout": None}),
    ("no_dropout", {"dropout": False}),
    ("rmsprop_rho0", {"optimizer": "rmsprop", "rho": 0.0}),
    ("rmsprop", {"optimizer": "rmsprop", "rho": 0.9}),
    ("adam", {"optimizer": "adam"}),
    ("init_lsuv_normalize", {"init": "lsuv", "normalize": True}),
    ("init_lsuv_no_class_relu", {"init": "lsuv", "class_relu": False}),
    ("init_he_uniform_no_class_relu", {"init": "he_uniform", "class_relu": False}),
    ("adam_no_l2", {"optimizer": "adam", "weight_decay": 0.0}),
    ("rmsprop_no_l2", {"optimizer": "rmsprop", "rho": 0.9, "weight_decay": 0.0}),
    ("adam_lr_1e-4", {"optimizer": "adam", "learning_rate": 1e-4, "weight_decay": 5e-4}),
    ("adam_lr_3e-4", {"optimizer": "adam", "learning_rate": 3e-4, "weight_decay": 5e-4}),
    ("rmsprop_lr_1e-4", {"optimizer": "rmsprop", "rho": 0.9, "learning_rate": 1e-4,
                         "weight_decay": 5e-4}),
])
def test_each_configuration_parses_to_its_settings(key, expected):
    args = cli.build_parser().parse_args(ex.CONFIGS[key].command(1, "runs"))
    common = {"arch": "allcnn", "variant": "paper", "schedule": "inverse_time", "batch_size": 32,
              "epochs": 10, "steps_per_epoch": 300, "seed": 1, "run_id": f"{key}_seed1"}
    for name, value in {**common, **expected}.items():
        assert getattr(args, name) == value, (key, name, getattr(args, name))


def _fake_run(folder: Path, val: list[float], *, status: str = "finished", epochs: int = 3,
              steps: int = 4) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(
        {"epochs": epochs, "run": {"status": status, "steps_per_epoch": steps}}))
    with open(folder / "history.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "accuracy", "loss", "val_accuracy", "val_loss"])
        for e, v in enumerate(val):
            w.writerow([e, 0.5, 1.0, v, 1.0])
    with open(folder / "batches.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "batch", "step", "loss", "accuracy", "mean_loss", "mean_accuracy",
                    "learning_rate"])
        for step in range(len(val) * steps):
            w.writerow([step // steps, step % steps, step, 2.0 - step / 10, step / 20, 0, 0,
                        0.01])


def test_is_complete_keeps_finished_runs_only(tmp_path):
    _fake_run(ex.result_dir(tmp_path, "baseline", 0), [0.2, 0.3, 0.40])
    _fake_run(ex.result_dir(tmp_path, "adam", 1), [0.3, 0.4], status="running")  # unfinished
    _fake_run(ex.result_dir(tmp_path, "rmsprop", 0), [0.3, 0.4, 0.5], epochs=5)  # short
    _fake_run(ex.result_dir(tmp_path, "adam", 0), [0.3, 0.4], status="terminated_on_nan")
    assert ex.is_complete(ex.result_dir(tmp_path, "baseline", 0))
    assert ex.is_complete(ex.result_dir(tmp_path, "adam", 0))  # stopped by a NaN: done
    assert not ex.is_complete(ex.result_dir(tmp_path, "adam", 1))
    assert not ex.is_complete(ex.result_dir(tmp_path, "rmsprop", 0))
    (ex.result_dir(tmp_path, "baseline", 0) / "batches.csv").unlink()
    assert not ex.is_complete(ex.result_dir(tmp_path, "baseline", 0))
    assert not ex.is_complete(tmp_path / "nothing")


def test_finished_runs_walks_the_keys_in_order_and_skips_unfinished_runs(tmp_path):
    for seed in (10, 2, 0):
        _fake_run(ex.result_dir(tmp_path, "baseline", seed), [0.2, 0.3, 0.4 + seed / 100])
    _fake_run(ex.result_dir(tmp_path, "adam", 0), [0.3, 0.4], status="running")  # unfinished
    _fake_run(ex.result_dir(tmp_path, "adam", 1), [0.3, 0.4, 0.5])
    _fake_run(tmp_path / "adam" / "seed1.old", [0.3, 0.4, 0.5])  # not a seed folder
    runs = list(ex.finished_runs(tmp_path, ["adam", "baseline", "rmsprop"]))  # no rmsprop folder
    assert [(key, seed) for key, seed, _, _ in runs] == [
        ("adam", 1), ("baseline", 0), ("baseline", 2), ("baseline", 10)]
    assert all(folder == ex.result_dir(tmp_path, key, seed) for key, seed, folder, _ in runs)
    assert all(config["run"]["status"] == "finished" for *_, config in runs)


def _runner(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALLCNN_QUICK": "1", "KERAS_BACKEND": "tensorflow"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run_experiments.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_runner_refuses_the_sample_and_runs_one_tiny_configuration(tmp_path):
    common = ["--experiments", "optimizers", "--seeds", "0", "--results", str(tmp_path / "res"),
              "--runs-dir", str(tmp_path / "runs"), "--backup-root", str(tmp_path / "backup")]
    proc = _runner(*common, cwd=tmp_path)  # quick mode: only the shipped sample
    assert proc.returncode == 1 and "full CIFAR-10" in proc.stderr, proc.stderr

    tiny = ["--", "--epochs", "1", "--steps-per-epoch", "2", "--limit", "100", "--arch",
            "strided"]
    proc = _runner(*common, "--allow-sample", "--max-runs", "1", *tiny, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 to go" in proc.stdout and "[1/1] baseline_seed0" in proc.stdout, proc.stdout
    out = ex.result_dir(tmp_path / "res", "baseline", 0)
    assert sorted(p.name for p in out.iterdir()) == sorted(ex.RESULT_FILES)
    assert ex.is_complete(out)
    assert "1 of 4 runs done" in _runner(*common, "--list", cwd=tmp_path).stdout


@pytest.mark.parametrize("flags, message", [
    (["--max-runs", "0"], "argument --max-runs: expected an integer >= 1, got 0"),
    (["--max-runs", "-1"], "argument --max-runs: expected an integer >= 1, got -1"),
    (["--seeds", "7"], "error: no configuration of optimizers has a seed in --seeds 7; "
                       "choose from 0 1"),
])
def test_runner_refuses_flags_that_would_run_nothing_or_the_wrong_runs(tmp_path, flags, message):
    proc = _runner("--experiments", "optimizers", "--results", str(tmp_path / "res"), *flags,
                   "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()[-1]) <= 160


# --------------------------------------------------------------------------- the fast recipe


@pytest.mark.parametrize("key, expected", [
    ("recipe/full", {"batch_norm": True, "schedule": "onecycle", "ema": False, "epochs": 5,
                     "bn_momentum": 0.9, "weight_decay": 2.5e-4}),
    ("recipe/bn_momentum_0.99", {"bn_momentum": 0.99}),
    ("recipe/weight_decay_5e-4", {"weight_decay": 5e-4}),
    ("recipe/draft", {"bn_momentum": 0.99, "weight_decay": 5e-4}),
    ("recipe/no_bn", {"batch_norm": False}),
    ("recipe/constant_lr", {"schedule": "constant", "learning_rate": 0.4}),
    ("recipe/no_whiten", {"whiten_init": False}),
    ("recipe/no_label_smoothing", {"label_smoothing": 0.0}),
    ("recipe/no_augment", {"augment": False}),
    ("recipe/zero_fill", {"shift_fill": "zero", "max_shift": 4}),
    ("recipe/batch_128", {"batch_size": 128, "learning_rate": 0.1}),
    ("recipe/float32", {"mixed_precision": False}),
    ("recipe/no_normalize", {"normalize": False}),
    ("recipe/no_class_relu", {"class_relu": False}),
    ("recipe/ladder_20", {"epochs": 20, "tta_shift": 1}),
    ("recipe/crop24_10", {"epochs": 10, "crop_epochs": 7, "crop_size": 24}),
    ("recipe/crop24_12", {"epochs": 12, "crop_epochs": 9, "crop_size": 24}),
    ("recipe/pilot_whole_4", {"epochs": 4, "limit": 20000, "batch_size": 128,
                              "learning_rate": 0.1}),
    ("recipe/pilot_crop24_6", {"epochs": 6, "crop_epochs": 5, "limit": 20000,
                               "batch_size": 128, "learning_rate": 0.1}),
])
def test_each_recipe_configuration_removes_one_trick(key, expected):
    args = cli.parse_arguments(ex.ALL_CONFIGS[key].command(0, "runs"))
    assert args.recipe == "fast" and args.run_id == ex.run_id(key, 0)
    assert args.run_id == key.replace("/", "_") + "_seed0"
    for name, value in expected.items():
        assert getattr(args, name) == value, (key, name, getattr(args, name))
    full = cli.parse_arguments(ex.RECIPE_CONFIGS["recipe/full"].command(0, "runs"))
    differ = {k for k in vars(args) if getattr(args, k) != getattr(full, k)}
    assert differ - {"run_id", "epochs"} <= set(expected), differ


def test_committed_configs_record_portable_paths():
    from allcnn_lib.runs import portable_config

    config = portable_config({"runs_dir": str(Path.home() / ".cache" / "runs"),
                              "data_dir": None, "run": {"data_source": str(ROOT / "data" / "x")}})
    assert config["runs_dir"] == "~/.cache/runs" and config["run"]["data_source"] == "data/x"


def test_time_to_accuracy_reads_minutes_until_each_target():
    history = {"time": [60] * 5, "val_accuracy": [0.5, 0.7, 0.86, 0.9, 0.8]}
    reached = ex.time_to_accuracy(history)
    assert reached[0.85] == 3 and np.isnan(reached[0.9088]) and np.isnan(reached[0.9275])
    assert ex.time_to_accuracy(history, [0.7]) == {0.7: 2.0}  # the first epoch that reaches it
