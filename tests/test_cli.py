"""The ``allcnn`` command end to end, in subprocesses, on a few hundred real CIFAR-10 images.

Budgets are tiny (``--limit 200``: 180 training and 20 validation images of the shipped sample,
batch 32, 1-3 epochs); the runs check files, formats and behaviour, not accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from allcnn_lib import cli

LIMIT = 200
BATCH = 32
STEPS = (LIMIT - LIMIT // 10) // BATCH  # 180 training images, full batches only: 5


def _env(quick: bool = True) -> dict[str, str]:
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONDONTWRITEBYTECODE": "1"}
    env["ALLCNN_QUICK"] = "1" if quick else "0"
    env.pop("ALLCNN_DEBUG", None)
    return env


def run_cli(*args: str, cwd: Path, quick: bool = True, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "allcnn_lib", *map(str, args)], cwd=cwd,
                          env=_env(quick), capture_output=True, text=True, timeout=timeout)


def train_args(run_id: str, root: Path, *extra: str, epochs: int = 2, arch: str = "strided",
               limit: int = LIMIT) -> list[str]:
    return ["train", "-id", run_id, "--arch", arch, "-epochs", str(epochs), "-batchsize",
            str(BATCH), "--limit", str(limit), "--seed", "1", "--runs-dir", str(root / "runs"),
            "--backup-dir", str(root / "backup" / run_id), *extra]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("allcnn: error: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def mirrored_run(tmp_path_factory):
    """``allcnn train --distribute mirrored`` on two logical CPUs, started in the background
    (it overlaps the other runs; ``test_mirrored_strategy_on_two_logical_cpus`` collects it)."""
    root = tmp_path_factory.mktemp("mirrored")
    args = train_args("mirrored", root, "--distribute", "mirrored", epochs=1, limit=100)
    proc = subprocess.Popen([sys.executable, "-c", MIRRORED, *args], cwd=root, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield root, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mirrored_run, killed_run):
    """One real run of ``allcnn train``: Strided-CNN-C (the cheapest), 2 epochs, augmented."""
    root = tmp_path_factory.mktemp("cli")
    proc = run_cli(*train_args("e2e", root), cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, root / "runs" / "e2e", proc


# --------------------------------------------------------------------------- train, evaluate, plot


def test_train_writes_every_output(trained_run):
    root, run_dir, proc = trained_run
    assert "epoch 1/2  loss " in proc.stdout and "epoch 2/2  loss " in proc.stdout
    config = json.loads((run_dir / "config.json").read_text())
    for key in ("run_id", "arch", "variant", "batch_norm", "dropout", "init", "optimizer",
                "schedule", "epochs", "batch_size", "augment", "zca", "seed", "limit", "run"):
        assert key in config, key
    assert (config["arch"], config["epochs"], config["batch_size"]) == ("strided", 2, BATCH)
    assert config["run"]["status"] == "finished"
    assert config["run"]["model"] == "strided_cnn_c"
    assert config["run"]["steps_per_epoch"] == STEPS
    assert config["run"]["train_images"] == 180 and config["run"]["validation_images"] == 20

    history = read_rows(run_dir / "history.csv")
    assert [int(r["epoch"]) for r in history] == [0, 1]
    for r in history:
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
            assert 0 <= float(r[key]) < 100, (key, r[key])

    batches = read_rows(run_dir / "batches.csv")
    assert len(batches) == 2 * STEPS
    keys = [(int(r["epoch"]), int(r["batch"])) for r in batches]
    assert keys == [(e, b) for e in range(2) for b in range(STEPS)]
    assert [int(r["step"]) for r in batches] == list(range(2 * STEPS))
    for r in batches:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and float(r["loss"]) > 0

    for png in ("accuracy.png", "loss.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    for weights in ("best.weights.h5", "last.weights.h5"):
        assert (run_dir / weights).read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
    assert not (root / "backup" / "e2e").exists()  # a finished run drops its backup


def test_steps_per_epoch_and_normalize(tmp_path):
    """``--steps-per-epoch``: epochs of N batches from an endless stream (a batch budget);
    ``--normalize``: per-channel standardization, saved beside the weights and reused by
    ``evaluate``."""
    proc = run_cli(*train_args("budget", tmp_path, "--steps-per-epoch", "3", "--normalize",
                                epochs=2), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / "budget"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["steps_per_epoch"] == 3 and config["normalize"] is True
    assert config["run"]["steps_per_epoch"] == 3
    assert [int(r["step"]) for r in read_rows(run_dir / "batches.csv")] == list(range(6))
    assert len(read_rows(run_dir / "history.csv")) == 2
    assert (run_dir / "standardizer.npz").is_file()
    proc = run_cli("evaluate", "--weights", run_dir / "best.weights.h5", "--limit", "100",
                   "--tta-flip", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test-time flip: on" in proc.stdout
    assert json.loads((run_dir / "evaluation.json").read_text())["tta_flip"] is True
    (run_dir / "standardizer.npz").unlink()
    proc = run_cli("evaluate", "--weights", run_dir / "best.weights.h5", "--limit", "100",
                   cwd=tmp_path)
    assert proc.returncode == 1 and "standardizer.npz" in proc.stderr, proc.stderr


def test_normalize_and_zca_together_is_one_clear_line(tmp_path):
    proc = run_cli(*train_args("both", tmp_path, "--normalize", "--zca"), cwd=tmp_path)
    assert_one_line_error(proc, "--normalize", "--zca")


@pytest.fixture(scope="module")
def evaluated_run(trained_run):
    """``allcnn evaluate`` on the trained run's best weights, started in the background."""
    root, run_dir, _ = trained_run
    proc = subprocess.Popen([sys.executable, "-m", "allcnn_lib", "evaluate", "--weights",
                             str(run_dir / "best.weights.h5"), "--limit", "100"], cwd=root,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    yield run_dir, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_same_seed_gives_the_same_history(trained_run, evaluated_run, monkeypatch):
    """An in-process ``train`` with the CLI run's settings reproduces it exactly (CPU)."""
    from allcnn_lib.training import TrainConfig, train

    root, run_dir, _ = trained_run
    monkeypatch.setenv("ALLCNN_QUICK", "1")
    config = TrainConfig(run_id="again", arch="strided", epochs=2, batch_size=BATCH, limit=LIMIT,
                         seed=1, runs_dir=str(root / "runs"),
                         backup_dir=str(root / "backup" / "again"), verbose=False)
    result = train(config)

    def values(path: Path) -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k != "time"} for row in read_rows(path)]

    assert values(result.run_dir / "history.csv") == values(run_dir / "history.csv")
    assert (result.run_dir / "batches.csv").read_text() == (run_dir / "batches.csv").read_text()


def test_evaluate_prints_test_scores_and_writes_the_confusion_matrix(evaluated_run):
    run_dir, proc = evaluated_run
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "SAMPLE accuracy " in stdout and "loss " in stdout
    assert "not the 10,000-image CIFAR-10 test set" in stdout  # labelled as the sample's
    assert "strided_cnn_c" in stdout  # the network came from config.json
    assert sum(name in stdout for name in ("airplane", "truck", "ship")) == 3
    assert (run_dir / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((run_dir / "evaluation.json").read_text())
    assert report["images"] == 100 and 0.0 <= report["accuracy"] <= 1.0
    assert stderr.strip() == ""


def test_plot_redraws_the_curves(trained_run, tmp_path):
    root, run_dir, _ = trained_run
    proc = run_cli("plot", run_dir, "--out", tmp_path, cwd=root)
    assert proc.returncode == 0, proc.stderr
    for png in ("accuracy.png", "loss.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- errors


def test_weights_of_another_architecture_are_one_clear_line(trained_run):
    root, run_dir, _ = trained_run
    proc = run_cli("evaluate", "--weights", run_dir / "best.weights.h5", "--arch", "allcnn",
                   cwd=root)
    assert_one_line_error(proc, "strided_cnn_c (954,730 params)", "all_cnn_c",
                          "--arch strided")
    assert "Traceback" not in proc.stderr


def test_missing_weights_are_one_clear_line(tmp_path):
    proc = run_cli("evaluate", "--weights", tmp_path / "none.weights.h5", cwd=tmp_path)
    assert_one_line_error(proc, "none.weights.h5", "no such weights file")
    proc = run_cli("-id", "x", "-retrain", "1", "-weightspath", tmp_path / "gone.weights.h5",
                   cwd=tmp_path)
    assert_one_line_error(proc, "gone.weights.h5")


def test_missing_data_is_one_clear_line(tmp_path):
    proc = run_cli("train", "--data-dir", tmp_path / "nowhere", "--runs-dir", tmp_path,
                   cwd=tmp_path, quick=False)
    assert_one_line_error(proc, "nowhere")


@pytest.mark.parametrize("args", [
    ["train", "--arch", "resnet"],
    ["train", "-batchsize", "zero"],
    ["train", "--epochs", "0"],
    ["train", "--bogus"],
    ["-bn", "maybe"],
    ["evaluate"],
    ["plot"],
])
def test_bad_flags_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    assert "usage: allcnn" in capsys.readouterr().err


def test_bad_flag_exits_2_from_the_shell(tmp_path):
    proc = run_cli("train", "--optimizer", "adagrad", cwd=tmp_path)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


# --------------------------------------------------------------------------- the seed's flags


def test_seed_flags_are_aliases_of_long_options():
    seed_style = ["-id", "run7", "-batchsize", "64", "-epochs", "3", "-init", "lsuv",
                  "-retrain", "1", "-weightspath", "w.weights.h5", "-train", "1", "-bn", "1",
                  "-dropout", "0", "-f", "/run/jupyter/kernel-1.json"]
    long_style = ["--id", "run7", "--batch-size", "64", "--epochs", "3", "--init", "lsuv",
                  "--retrain", "--weights", "w.weights.h5", "--train", "1", "--bn",
                  "--dropout", "0"]
    parser = cli.build_parser()
    a = parser.parse_args(cli._with_default_command(seed_style))
    b = parser.parse_args(cli._with_default_command(long_style))
    for key in ("command", "run_id", "batch_size", "epochs", "init", "retrain", "weights",
                "do_train", "batch_norm", "dropout"):
        assert getattr(a, key) == getattr(b, key), key
    assert (a.command, a.run_id, a.batch_size, a.epochs) == ("train", "run7", 64, 3)
    assert (a.retrain, a.do_train, a.batch_norm, a.dropout) == (True, True, True, False)
    assert a.jupyter_file == "/run/jupyter/kernel-1.json"  # accepted, then ignored


def test_train_zero_evaluates_the_runs_best_weights(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(cli, "cmd_evaluate", lambda args: seen.setdefault("args", args) and 0)
    assert cli.main(["-id", "r1", "-train", "0", "--runs-dir", str(tmp_path), "-f", "k.json"]) \
        == 0
    assert Path(seen["args"].weights) == tmp_path / "r1" / "best.weights.h5"
    assert seen["args"].arch is None  # not given: the run's config.json decides
    assert "-f k.json ignored" in capsys.readouterr().err


# --------------------------------------------------------------------------- reliability


def _kill_in_second_epoch(proc: subprocess.Popen, batches_csv: Path, outcome: dict) -> None:
    """Watch the per-batch log; SIGKILL ``proc`` once a batch of the second epoch is logged."""
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                outcome["error"] = "training ended before it could be killed"
                return
            if time.monotonic() > deadline:
                outcome["error"] = "no second epoch within 240 s"
                return
            if batches_csv.is_file() and any(r["epoch"] == "1" for r in read_rows(batches_csv)):
                return
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """``allcnn train`` started in the background and SIGKILLed by a watcher thread in its
    second epoch (overlapping the other runs); ``test_sigkill_...`` then resumes it."""
    root = tmp_path_factory.mktemp("killed")
    args = train_args("killed", root, epochs=2, limit=100)
    batches_csv = root / "runs" / "killed" / "batches.csv"
    proc = subprocess.Popen([sys.executable, "-m", "allcnn_lib", *args], cwd=root, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    outcome: dict[str, str] = {}
    watcher = threading.Thread(target=_kill_in_second_epoch, args=(proc, batches_csv, outcome),
                               daemon=True)
    watcher.start()
    yield root, args, watcher, outcome
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigkill_mid_epoch_then_the_same_command_resumes(killed_run):
    tmp_path, args, watcher, outcome = killed_run
    steps = 90 // BATCH  # 2 batches an epoch
    batches_csv = tmp_path / "runs" / "killed" / "batches.csv"
    watcher.join(timeout=300)
    assert not watcher.is_alive() and "error" not in outcome, outcome
    killed_rows = read_rows(batches_csv)
    assert len(read_rows(tmp_path / "runs" / "killed" / "history.csv")) == 1
    assert steps < len(killed_rows) < 2 * steps  # killed mid-epoch

    again = subprocess.run([sys.executable, "-m", "allcnn_lib", *args], cwd=tmp_path,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming killed from epoch 2" in again.stdout
    assert "epoch 1/2" not in again.stdout  # the finished epoch was not trained again
    assert "epoch 2/2" in again.stdout
    run_dir = tmp_path / "runs" / "killed"
    assert [int(r["epoch"]) for r in read_rows(run_dir / "history.csv")] == [0, 1]
    rows = read_rows(run_dir / "batches.csv")
    keys = [(int(r["epoch"]), int(r["batch"])) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * steps
    assert [int(r["step"]) for r in rows] == list(range(2 * steps))
    assert rows[:steps] == killed_rows[:steps]  # epoch 1's rows survived as written
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- scale-out

MIRRORED = textwrap.dedent("""
    import sys
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    from allcnn_lib.cli import main

    sys.exit(main(sys.argv[1:]))
""")


def test_mirrored_strategy_on_two_logical_cpus(mirrored_run):
    root, proc = mirrored_run
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    run_dir = root / "runs" / "mirrored"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["distribute"] == "mirrored"
    assert config["run"]["replicas"] == 2
    history = read_rows(run_dir / "history.csv")
    assert len(history) == 1 and float(history[0]["loss"]) < 10
    assert len(read_rows(run_dir / "batches.csv")) == 2  # 90 images: 2 global batches of 32
