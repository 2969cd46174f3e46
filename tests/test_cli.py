"""The ``allcnn`` command on a few hundred real CIFAR-10 images: in this process (``cli.main``),
and in processes of their own where the boundary is the point (SIGKILL and resume,
MirroredStrategy on logical CPUs, the entry point, checks that must pass before TensorFlow is
imported). Budgets are tiny (``--limit 200``: 180 training and 20 validation images, batch 32);
the runs check files, formats and behaviour, not accuracy.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
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
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONDONTWRITEBYTECODE": "1",
           "ALLCNN_QUICK": "1" if quick else "0"}
    env.pop("ALLCNN_DEBUG", None)
    return env


def run_cli(*args: object, cwd: Path, quick: bool = True) -> subprocess.CompletedProcess:
    """``allcnn ARGS`` run in this process (``cli.main``) in ``cwd``, its output captured."""
    out, err = io.StringIO(), io.StringIO()
    saved = os.getcwd(), os.environ.get("ALLCNN_QUICK")
    os.environ["ALLCNN_QUICK"] = "1" if quick else "0"
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([str(a) for a in args])
    finally:
        os.chdir(saved[0])
        os.environ.pop("ALLCNN_QUICK")
        if saved[1] is not None:
            os.environ["ALLCNN_QUICK"] = saved[1]
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_without_tensorflow(env: dict[str, str], *args: object, cwd: Path
                           ) -> subprocess.CompletedProcess:
    """``python -m allcnn_lib ARGS`` in a process of its own with ``env`` (``no_tensorflow_env``:
    importing TensorFlow ends it, so a check that answers there runs before TensorFlow)."""
    return subprocess.run([sys.executable, "-m", "allcnn_lib", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def train_args(run_id: str, root: Path, *extra: object, epochs: int = 2, limit: int = LIMIT
               ) -> list[str]:
    return ["train", "-id", run_id, "--arch", "strided", "-epochs", str(epochs), "-batchsize",
            str(BATCH), "--limit", str(limit), "--seed", "1", "--runs-dir", str(root / "runs"),
            "--backup-dir", str(root / "backup" / run_id), *map(str, extra)]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 1 and one line on stderr, ``allcnn: error: ...`` with every needle; the line."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("allcnn: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def mirrored_run(tmp_path_factory):
    """``allcnn train --distribute mirrored`` on two logical CPUs, started in the background
    (``test_mirrored_strategy_on_two_logical_cpus`` collects it)."""
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
    assert [(int(r["epoch"]), int(r["batch"])) for r in batches] == [
        (e, b) for e in range(2) for b in range(STEPS)]
    assert [int(r["step"]) for r in batches] == list(range(2 * STEPS))
    for png in ("accuracy.png", "loss.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    for weights in ("best.weights.h5", "last.weights.h5"):
        assert (run_dir / weights).read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
    assert not (root / "backup" / "e2e").exists()  # a finished run drops its backup


def test_steps_per_epoch_and_normalize(tmp_path):
    """``--steps-per-epoch``: epochs of N batches from an endless stream; ``--normalize``:
    standardization saved beside the weights and reused by ``evaluate``."""
    proc = run_cli(*train_args("budget", tmp_path, "--steps-per-epoch", "3", "--normalize"),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / "budget"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["steps_per_epoch"] == 3 and config["normalize"] is True
    assert [int(r["step"]) for r in read_rows(run_dir / "batches.csv")] == list(range(6))
    assert len(read_rows(run_dir / "history.csv")) == 2
    proc = run_cli("evaluate", "--weights", run_dir / "best.weights.h5", "--limit", "100",
                   "--tta-flip", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test-time augmentation: flip" in proc.stdout
    assert json.loads((run_dir / "evaluation.json").read_text())["tta_flip"] is True
    (run_dir / "standardizer.npz").unlink()
    proc = run_cli("evaluate", "--weights", run_dir / "best.weights.h5", "--limit", "100",
                   cwd=tmp_path)
    assert proc.returncode == 1 and "standardizer.npz" in proc.stderr, proc.stderr


def test_same_seed_gives_the_same_history(trained_run, monkeypatch):
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


def test_evaluate_prints_test_scores_and_writes_the_confusion_matrix(trained_run):
    root, run_dir, _ = trained_run
    proc = run_cli("evaluate", "--weights", run_dir / "best.weights.h5", "--limit", "100",
                   cwd=root)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    assert "SAMPLE accuracy " in proc.stdout and "loss " in proc.stdout
    assert "not the 10,000-image CIFAR-10 test set" in proc.stdout  # labelled as the sample's
    assert "strided_cnn_c" in proc.stdout  # the network came from config.json
    assert all(name in proc.stdout for name in ("airplane", "truck", "ship"))
    assert (run_dir / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((run_dir / "evaluation.json").read_text())
    assert report["images"] == 100 and 0.0 <= report["accuracy"] <= 1.0


def test_train_zero_evaluates_the_runs_best_weights(trained_run):
    """The original repository's ``-train 0 -f KERNEL.json``: the run's best weights on the test
    set, the network and test-time augmentation from its config.json; Jupyter's ``-f`` is
    ignored."""
    root, run_dir, _ = trained_run
    proc = run_cli("-id", "e2e", "-train", "0", "--runs-dir", root / "runs", "--limit", "100",
                   "-f", "k.json", cwd=root)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stdout + proc.stderr
    assert f"weights: {run_dir / 'best.weights.h5'} (strided_cnn_c" in proc.stdout
    assert "SAMPLE accuracy " in proc.stdout and "per-class accuracy:" in proc.stdout


def test_plot_redraws_the_curves(trained_run, tmp_path):
    root, run_dir, _ = trained_run
    proc = run_cli("plot", run_dir, "--out", tmp_path, cwd=root)
    assert proc.returncode == 0, proc.stderr
    for png in ("accuracy.png", "loss.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_weights_of_another_architecture_are_one_clear_line(trained_run):
    root, run_dir, _ = trained_run
    proc = run_cli("evaluate", "--weights", run_dir / "best.weights.h5", "--arch", "allcnn",
                   cwd=root)
    assert_one_line_error(proc, "strided_cnn_c (954,730 params)", "all_cnn_c", "--arch strided")


# --------------------------------------------------------------------------- flags and errors


def test_seed_flags_are_aliases_of_long_options():
    seed_style = ["-id", "run7", "-batchsize", "64", "-epochs", "3", "-init", "lsuv",
                  "-retrain", "1", "-weightspath", "w.weights.h5", "-train", "1", "-bn", "1",
                  "-dropout", "0", "-f", "/run/jupyter/kernel-1.json"]
    long_style = ["--id", "run7", "--batch-size", "64", "--epochs", "3", "--init", "lsuv",
                  "--retrain", "--weights", "w.weights.h5", "--train", "1", "--bn",
                  "--dropout", "0"]
    a, b = cli.parse_arguments(seed_style), cli.parse_arguments(long_style)
    assert {**vars(a), "f": None} == vars(b)
    assert (a.command, a.run_id, a.batch_size, a.epochs, a.init) == ("train", "run7", 64, 3, "lsuv")
    assert (a.retrain, a.train, a.batch_norm, a.dropout) == (True, True, True, False)


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: {train,evaluate,plot,verify-data}"),
    (["train", "--arch", "resnet"], "argument --arch: invalid choice: 'resnet'"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["evaluate"], "the following arguments are required: --weights"),
    (["plot"], "the following arguments are required: RUN_DIR"),
    (["-bn", "maybe"], "argument -bn/--bn/--batch-norm: expected 1/0 (or true/false), got maybe"),
    (["-batchsize", "zero"], "argument -batchsize/--batch-size: expected an integer >= 1"),
    (["--epochs", "0"], "argument -epochs/--epochs: expected an integer >= 1, got 0"),
    (["--lr", "nan"], "argument --lr/--learning-rate: expected a finite number > 0, got nan"),
    (["--lr", "inf"], "argument --lr/--learning-rate: expected a finite number > 0"),
    (["--lr", "0"], "argument --lr/--learning-rate: expected a finite number > 0, got 0"),
    (["--rho", "1.5"], "argument --rho: expected a number >= 0 and < 1, got 1.5"),
    (["--weight-decay", "-0.5"], "argument --weight-decay: expected a finite number >= 0"),
    (["--label-smoothing", "1"], "argument --label-smoothing: expected a number >= 0 and < 1"),
    (["--zca-epsilon", "nan"], "argument --zca-epsilon: expected a finite number > 0"),
    (["--seed", "-1"], "argument --seed: expected an integer from 0 to 4,294,967,295"),
    (["--limit", "105"], "argument --limit: expected a multiple of 10"),
    (["--max-shift", "40"], "argument --max-shift: expected an integer from 0 to 16"),
    (["--crop-epochs", "-1"], "argument --crop-epochs: expected an integer >= 0, got -1"),
    (["--crop-size", "8"], "argument --crop-size: expected an integer from 9 to 32 (pixels), "
                           "got 8"),
    (["evaluate", "--weights", "w", "--tta-shift", "-1"], "argument --tta-shift: expected an "
                                                          "integer from 0 to 16"),
    (["--id", "a/b"], "argument -id/--id/--run-id: expected a plain folder name, got a/b"),
])
def test_bad_flags_exit_2_naming_the_flag(args, message, capsys):
    """Issue 20, items 3 and 10: NaN, infinities and out-of-range values stop at the parser,
    with the flag's name (``--lr nan`` used to train to the end with NaN weights)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("usage: allcnn"), err
    assert message in err.strip().splitlines()[-1], err


@pytest.mark.parametrize("args, quick, needles", [
    (["--normalize", "--zca"], True, ["normalize", "zca", "not both"]),
    (["--epochs", "2", "--crop-epochs", "3"], True,
     ["crop_epochs 3 is not from 0 to the run's 2 epochs", "lower crop_epochs or raise epochs"]),
    (["--limit", "100", "-batchsize", "128"], True,
     ["--limit 100 leaves 90 training images", "--batch-size 128", "raise --limit to 140"]),
    (["--limit", "3000"], True, ["--limit 3000: class 0 has 200 examples", "lower --limit"]),
    (["-batchsize", "4096"], True, ["1800 training images", "no batch of --batch-size 4096"]),
    (["--data-dir", "{tmp}/nowhere"], False,
     ["nowhere (from --data-dir) does not exist", "point --data-dir at the data, or leave it out"]),
    (["-retrain", "1", "-weightspath", "{tmp}/gone.weights.h5"], True,
     ["gone.weights.h5: no such weights file"]),
    (["-train", "0"], True, ["early/best.weights.h5: no such weights file"]),
    (["evaluate", "--weights", "{tmp}/none.weights.h5"], True, ["no such weights file"]),
    (["plot", "{tmp}"], True, ["no history.csv (not a training run folder?)"]),
    (["verify-data", "--data-dir", "{tmp}/nowhere"], False, ["(from --data-dir) does not exist"]),
])
def test_run_time_errors_are_one_line_before_tensorflow(args, quick, needles, tmp_path,
                                                        monkeypatch):
    """Issue 20, items 11 and 12: one line naming the flag and the fix, before TensorFlow
    starts, with no run folder and no backup folder left behind."""
    monkeypatch.setattr(cli, "_import_tensorflow_quietly", lambda: pytest.fail("TensorFlow"))
    args = [a.format(tmp=tmp_path) for a in args]
    if args[0] not in cli.COMMANDS:
        args = ["train", "-id", "early", "--runs-dir", str(tmp_path / "runs"), "--backup-dir",
                str(tmp_path / "backup"), *args]
    assert_one_line_error(run_cli(*args, cwd=tmp_path, quick=quick), *needles)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "backup").exists()


@pytest.mark.parametrize("args, code, needle", [
    (["train", "--optimizer", "adagrad"], 2, "invalid choice: 'adagrad'"),
    (["-batchsize", "4096", "--runs-dir", "runs", "--backup-dir", "backup"], 1,
     "no batch of --batch-size 4096"),
])
def test_entry_point_checks_before_tensorflow(args, code, needle, tmp_path, no_tensorflow_env):
    """``python -m allcnn_lib`` in a process where importing TensorFlow ends it: flags, and
    everything up to loading the data, are checked without it."""
    proc = run_without_tensorflow(no_tensorflow_env, *args, cwd=tmp_path)
    assert proc.returncode == code and needle in proc.stderr, proc.stderr
    assert "TENSORFLOW WAS IMPORTED" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_truncated_config_beside_the_weights_is_named_with_its_fix(tmp_path, monkeypatch):
    """Issue 20, item 9: not "Expecting value: line 10 column 10" after TensorFlow's start-up,
    but the file, what is wrong and what to do, before TensorFlow."""
    monkeypatch.setattr(cli, "_import_tensorflow_quietly", lambda: pytest.fail("TensorFlow"))
    (tmp_path / "best.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    (tmp_path / "config.json").write_text('{\n  "run_id": "x",\n  "arch": ')
    proc = run_cli("evaluate", "--weights", tmp_path / "best.weights.h5", cwd=tmp_path)
    assert_one_line_error(proc, f"{tmp_path / 'config.json'}: not valid JSON (truncated",
                          "restore it, or move it away", "--arch")
    proc = run_cli("-id", tmp_path.name, "--runs-dir", tmp_path.parent, "--backup-dir",
                   tmp_path / "b", cwd=tmp_path)  # training into that run folder
    assert_one_line_error(proc, "config.json: not valid JSON", "--overwrite")


def test_unreadable_data_file_is_one_line(tmp_path, monkeypatch):
    """Issue 20, item 4: a data batch this user may not read is one line that names it and the
    fix, not a 37-line traceback (the refusal is simulated: root reads everything)."""
    from test_data import make_batches_dir

    folder = make_batches_dir(tmp_path / "data")
    unreadable = folder / "data_batch_2"
    read_bytes = Path.read_bytes

    def refuse(path: Path) -> bytes:
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    monkeypatch.setattr(cli, "_import_tensorflow_quietly", lambda: pytest.fail("data loaded"))
    proc = run_cli("train", "--data-dir", folder, "--runs-dir", tmp_path / "runs",
                   "--backup-dir", tmp_path / "backup", cwd=tmp_path, quick=False)
    assert proc.stderr.strip() == (f"allcnn: error: {unreadable}: permission denied (this user "
                                   f"cannot read it). Fix: chmod a+r {unreadable}, or run as "
                                   "the user who owns it")


@pytest.mark.parametrize("err, line", [
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/history.csv"),
     "runs/x/history.csv: no space left on device; free some space, then run the same command "
     "again (a training run resumes from its last completed epoch)"),
    (PermissionError(errno.EACCES, "Permission denied", "runs"),
     "runs: permission denied; check the path and its permissions"),
    (ValueError("first line\n  second line"), "first line"),
])
def test_system_errors_become_one_line_with_a_fix(err, line):
    assert cli._one_line(err) == line


def test_verify_data_finds_one_flipped_byte(tmp_path, full_cifar10_dir):
    """Issue 20, item 8: ``allcnn verify-data`` on the full set with one byte flipped in the
    pixels of data_batch_3 (which loads without complaint): exit 1, naming the file."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for source in full_cifar10_dir.iterdir():
        (folder / source.name).symlink_to(source)
    (folder / "data_batch_3").unlink()
    raw = bytearray((full_cifar10_dir / "data_batch_3").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (folder / "data_batch_3").write_bytes(bytes(raw))
    proc = run_cli("verify-data", "--data-dir", folder, cwd=tmp_path, quick=False)
    assert_one_line_error(proc, "data_batch_3: its contents differ from", "corrupt")
    assert "data_batch_1 " in proc.stdout and "5,000 to 5,000" in proc.stdout
    proc = run_cli("verify-data", "--data-dir", full_cifar10_dir, cwd=tmp_path, quick=False)
    assert proc.returncode == 0 and "data OK: " in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- reliability


def _kill_in_second_epoch(proc: subprocess.Popen, batches_csv: Path, outcome: dict) -> None:
    """Watch the per-batch log; SIGKILL ``proc`` once a batch of the second epoch is logged."""
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if batches_csv.is_file() and any(r["epoch"] == "1" for r in read_rows(batches_csv)):
                return
            time.sleep(0.05)
        outcome["error"] = "training ended, or no second epoch within 240 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """``allcnn train`` started in the background and SIGKILLed by a watcher thread in its
    second epoch (overlapping the other runs); ``test_sigkill_...`` then resumes it."""
    root = tmp_path_factory.mktemp("killed")
    args = train_args("killed", root, limit=100)
    proc = subprocess.Popen([sys.executable, "-m", "allcnn_lib", *args], cwd=root, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    outcome: dict[str, str] = {}
    watcher = threading.Thread(target=_kill_in_second_epoch, daemon=True,
                               args=(proc, root / "runs" / "killed" / "batches.csv", outcome))
    watcher.start()
    yield root, args, watcher, outcome
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigkill_mid_epoch_then_the_same_command_resumes(killed_run):
    root, args, watcher, outcome = killed_run
    steps = 90 // BATCH  # 2 batches an epoch
    run_dir = root / "runs" / "killed"
    watcher.join(timeout=300)
    assert not watcher.is_alive() and "error" not in outcome, outcome
    killed_rows = read_rows(run_dir / "batches.csv")
    assert len(read_rows(run_dir / "history.csv")) == 1
    assert steps < len(killed_rows) < 2 * steps  # killed mid-epoch

    again = run_cli(*args, cwd=root)  # the same command resumes (in this process)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming killed from epoch 2" in again.stdout
    assert "epoch 1/2" not in again.stdout and "epoch 2/2" in again.stdout
    assert [int(r["epoch"]) for r in read_rows(run_dir / "history.csv")] == [0, 1]
    rows = read_rows(run_dir / "batches.csv")
    keys = [(int(r["epoch"]), int(r["batch"])) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * steps
    assert [int(r["step"]) for r in rows] == list(range(2 * steps))
    assert rows[:steps] == killed_rows[:steps]  # epoch 1's rows survived as written
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]


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
    assert config["distribute"] == "mirrored" and config["run"]["replicas"] == 2
    history = read_rows(run_dir / "history.csv")
    assert len(history) == 1 and float(history[0]["loss"]) < 10
    assert len(read_rows(run_dir / "batches.csv")) == 2  # 90 images: 2 global batches of 32
