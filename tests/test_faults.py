"""Faults end to end (issue 20): every failure is one clear line, and no run or checkpoint is
ever lost or poisoned. Real ``allcnn`` processes on 90 training and 10 validation images
(Strided-CNN-C, batch 32, 2 epochs of 2 batches): a diverging run (NaN), unwritable output
folders, a full disk (a small tmpfs where one can be mounted, else a simulated one), Ctrl-C,
``kill -9``, a finished run asked to train again. A resumed run must reproduce the
uninterrupted one to the last digit. Checks that need no TensorFlow run in a process where
importing it fails (``no_tensorflow_env``), so they provably run first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import _env, run_cli
from test_cli import assert_one_line_error as one_line_error
from test_cli import read_rows as rows
from test_cli import run_without_tensorflow as allcnn_process
from test_cli import train_args as cli_train_args

ROOT = Path(__file__).resolve().parent.parent
LIMIT, BATCH, EPOCHS = 100, 32, 2


def train_args(run_id: str, root: Path, *extra: object, epochs: int = EPOCHS) -> list[str]:
    # 24 batches an epoch of the endless stream: the last epoch lasts long enough (seconds, on
    # the fastest CPU seen) for a signal sent after its first batch to land inside it
    return cli_train_args(run_id, root, "--steps-per-epoch", 24, *extra, epochs=epochs,
                          limit=LIMIT)


def status(run_dir: Path) -> str:
    return json.loads((run_dir / "config.json").read_text())["run"]["status"]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_same_numbers(run_dir: Path, reference: Path) -> None:
    """Every logged number of a resumed run equals the uninterrupted run's (wall time aside)."""
    assert (run_dir / "batches.csv").read_text() == (reference / "batches.csv").read_text()

    def values(path: Path) -> list[dict[str, str]]:
        return [{k: v for k, v in row.items() if k != "time"} for row in rows(path)]

    assert values(run_dir / "history.csv") == values(reference / "history.csv")


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """A run that diverges (``--lr 1e6``), started in the background (overlapping the
    reference run); ``test_diverging_run_...`` collects it."""
    root = tmp_path_factory.mktemp("nan")
    proc = subprocess.Popen(
        [sys.executable, "-m", "allcnn_lib", *train_args("nan", root, "--lr", "1e6", epochs=3)],
        cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield root, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, nan_run) -> tuple[Path, list[str]]:
    """One uninterrupted run: the numbers every resumed run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    args = train_args("ref", root)
    proc = run_cli(*args, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "runs" / "ref", args


def start_and_signal(args: list[str], cwd: Path, batches_csv: Path, sig: int,
                     timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``allcnn`` and send it ``sig`` once it has logged a batch of the last epoch (rows
    an earlier process left count only once this one has rewritten the file)."""
    started = time.time_ns()
    # As in a terminal: a shell's background job (`make test &`) starts its children with SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler; a Ctrl-C gets Python's.
    with_ctrl_c = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler);"
                   " runpy.run_module('allcnn_lib', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", with_ctrl_c, *map(str, args)], cwd=cwd,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if (batches_csv.is_file() and batches_csv.stat().st_mtime_ns > started
                    and any(r["epoch"] == str(EPOCHS - 1) for r in rows(batches_csv))):
                proc.send_signal(sig)
                break
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# --------------------------------------------------------------------------- finished run


def test_finished_run_is_never_trained_again_silently(reference, no_tensorflow_env):
    """The same command again stops at once, before TensorFlow, and touches nothing."""
    run_dir, args = reference
    before = {p.name: md5(p) for p in run_dir.iterdir()}
    proc = allcnn_process(no_tensorflow_env, *args, cwd=run_dir.parent.parent)
    one_line_error(proc, "run ref in ", "already finished (2 epochs", "--overwrite", "--id")
    assert {p.name: md5(p) for p in run_dir.iterdir()} == before
    # --overwrite lets it through (here to the next check, an unwritable --backup-dir)
    blocked = run_dir / "history.csv" / "backup"
    proc = allcnn_process(no_tensorflow_env, *args, "--overwrite", "--backup-dir", blocked,
                          cwd=run_dir.parent.parent)
    one_line_error(proc, "--backup-dir", "is a file, not a folder")


# --------------------------------------------------------------------------- interruptions


def test_ctrl_c_then_kill_9_then_the_same_command_resumes_to_the_same_numbers(reference,
                                                                                tmp_path):
    ref_dir, _ = reference
    args = train_args("cut", tmp_path)
    run_dir = tmp_path / "runs" / "cut"

    # Ctrl-C in the last epoch: one line, and config.json says so
    proc = start_and_signal(args, tmp_path, run_dir / "batches.csv", signal.SIGINT)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "allcnn: interrupted; run the same command again to resume from the last completed "
        "epoch"]
    assert status(run_dir) == "interrupted"
    assert (tmp_path / "backup" / "cut" / "latest.weights.h5").is_file()

    # kill -9 in the resumed run's last epoch: nothing can be written, the backup holds
    proc = start_and_signal(args, tmp_path, run_dir / "batches.csv", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "resuming cut from epoch 2" in proc.stdout

    # the same command once more: it resumes and ends as if never interrupted
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming cut from epoch 2" in proc.stdout and "epoch 1/2" not in proc.stdout
    assert status(run_dir) == "finished"
    assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
    assert not (tmp_path / "backup" / "cut").exists()
    assert_same_numbers(run_dir, ref_dir)


# --------------------------------------------------------------------------- NaN


def test_diverging_run_never_writes_a_nan_checkpoint(nan_run):
    """``--lr 1e6``: the first epoch's weights are not finite; it is not saved, anywhere."""
    root, proc = nan_run
    stdout, stderr = proc.communicate(timeout=300)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    one_line_error(proc, "NaN", "no checkpoint was written", "lower the learning rate")
    run_dir = root / "runs" / "nan"
    assert status(run_dir) == "terminated_on_nan"
    assert not (run_dir / "best.weights.h5").exists() and not (run_dir / "last.weights.h5").exists()
    assert not (root / "backup" / "nan").exists()  # nor a backup to resume from
    assert len(rows(run_dir / "history.csv")) == 1  # it stopped at once


# --------------------------------------------------------------------------- unwritable output


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no one may write: a read-only tmpfs (root), else chmod 555; a path under a
    file where neither works."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode == 0:
        yield folder
        subprocess.run(["umount", str(folder)], check=False)
        return
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    yield blocker / "sub"


def test_unwritable_output_folders_fail_first_in_one_line(reference, read_only_dir, tmp_path,
                                                          no_tensorflow_env):
    ref_dir, _ = reference
    target = read_only_dir / "out"
    cases = [
        (train_args("w1", tmp_path, "--runs-dir", target), "--runs-dir"),
        (train_args("w2", tmp_path, "--backup-dir", target), "--backup-dir"),
        (["evaluate", "--weights", ref_dir / "best.weights.h5", "--out", target / "cm.png"],
         "--out"),
        (["plot", ref_dir, "--out", target], "--out"),
    ]
    for args, flag in cases:
        proc = allcnn_process(no_tensorflow_env, *args, cwd=tmp_path)
        one_line_error(proc, flag, "cannot write there")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "backup").exists()


# --------------------------------------------------------------------------- full disk

#: Free space for the full-disk run: room for epoch 1's best, last and backup checkpoints
#: (7.7 MB each for Strided-CNN-C with its SGD momentum, plus the 1 MB reserve), not for
#: epoch 2's next one.
DISK_BYTES = 28 << 20


def _mount_tmpfs(folder: Path, size: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_full_disk_keeps_the_previous_checkpoint_then_resumes(reference, tmp_path, monkeypatch):
    ref_dir, _ = reference
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, DISK_BYTES):
        _simulated_full_disk(disk, ref_dir, monkeypatch)
        return
    try:
        args = train_args("full", disk)
        run_dir = disk / "runs" / "full"
        proc = allcnn_process(_env(), *args, cwd=tmp_path)  # HDF5 once segfaulted at exit
        assert proc.returncode == 1, proc.stdout + proc.stderr  # not 139 (segfault)
        line = one_line_error(proc, "no space left on device for ", "needs about ",
                              " MB free", "the previous checkpoint is kept",
                              "run the same command again")
        assert "last.weights.h5" in line or "best.weights.h5" in line
        assert [int(r["epoch"]) for r in rows(run_dir / "history.csv")] == [0, 1]
        assert status(run_dir) == "disk_full"
        assert not [p for p in run_dir.iterdir() if ".tmp-" in p.name]
        from allcnn_lib.training import backup_epoch

        assert backup_epoch(disk / "backup" / "full") == 1  # epoch 1's backup is kept
        kept = md5(run_dir / "last.weights.h5")

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "resuming full from epoch 2" in proc.stdout
        assert md5(run_dir / "last.weights.h5") != kept and status(run_dir) == "finished"
        assert_same_numbers(run_dir, ref_dir)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _simulated_full_disk(disk: Path, ref_dir: Path, monkeypatch) -> None:
    """Where no tmpfs can be mounted: ``train`` in this process, on a device whose free space
    is ``DISK_BYTES`` minus the files written so far."""
    from allcnn_lib import runs, training

    def used() -> int:
        return sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())

    monkeypatch.setenv("ALLCNN_QUICK", "1")
    monkeypatch.setattr(runs, "free_bytes", lambda folder: DISK_BYTES - used())
    config = training.TrainConfig(run_id="full", arch="strided", epochs=EPOCHS, batch_size=BATCH,
                                  limit=LIMIT, seed=1, runs_dir=str(disk / "runs"),
                                  backup_dir=str(disk / "backup" / "full"), verbose=False)
    with pytest.raises(runs.DiskFullError, match="needs about .* MB free"):
        training.train(config)
    assert training.backup_epoch(disk / "backup" / "full") == 1
    monkeypatch.setattr(runs, "free_bytes", lambda folder: 1 << 40)
    result = training.train(config)
    assert result.initial_epoch == 1
    assert_same_numbers(result.run_dir, ref_dir)


# --------------------------------------------------------------------------- records


def test_committed_files_record_no_machine_paths():
    """Committed run records, benchmark results and saved notebook outputs name paths relative
    to the repository or to ``~``, never this machine's absolute paths."""
    files = [*ROOT.glob("results/**/*.json"), *ROOT.glob("data/final_model/*.json"),
             *ROOT.glob("benchmarks/results/**/*.json"), *ROOT.glob("notebooks/*.ipynb")]
    assert files
    machine = {str(ROOT), str(Path.home())}
    home_folders = re.compile(r"/(?:root|home)/")  # any machine's home folders
    for path in files:
        text = path.read_text()
        for prefix in machine:
            assert prefix not in text, (path, prefix)
        assert not home_folders.search(text), (path, home_folders.search(text).group())


# --------------------------------------------------------------------------- quiet tools


@pytest.mark.parametrize("flags, message", [
    (["--out", "{tmp}/out", "99"], "error: no notebook name starts with 99; choose from 00 01"),
    (["--inplace", "--render-only"], "error: --render-only renders saved notebooks to HTML; "
                                     "use it with --out FOLDER, not --inplace"),
    (["--out", "{tmp}/out", "--timeout", "0"], "error: --timeout must be at least 1 second, "
                                               "got 0"),
    (["--out", "{tmp}/a_file/out"], "error: --out {tmp}/a_file/out: cannot write there "
                                    "({tmp}/a_file is a file, not a folder); choose a writable "
                                    "--out"),
])
def test_notebook_runner_refuses_bad_flags_in_one_line_before_starting(tmp_path, flags, message):
    """``scripts/run_notebooks.py`` answers a flag that would run nothing, or write nowhere, with
    one argparse line (exit 2) before it imports Jupyter (blocked here: importing it would fail)
    or executes a notebook."""
    (tmp_path / "a_file").write_text("")
    argv = ["run_notebooks.py", *(flag.format(tmp=tmp_path) for flag in flags)]
    script = ROOT / "scripts" / "run_notebooks.py"
    no_jupyter = ("import runpy, sys; sys.modules.update(dict.fromkeys(('nbformat', 'nbclient', "
                  f"'nbconvert'))); sys.argv = {argv!r}; runpy.run_path({str(script)!r}, "
                  "run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", no_jupyter], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message.format(tmp=tmp_path) in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("run_notebooks.py: error:")
    assert proc.stdout == "" and not (tmp_path / "out" / "notebooks").exists()


def test_notebook_kernels_talk_over_ipc_without_the_tcp_warning(tmp_path, capfd):
    """``make run`` (scripts/run_notebooks.py) starts each kernel on IPC sockets, so Jupyter's
    "Kernel is running over TCP without encryption" warning is not printed once a notebook."""
    import nbformat

    spec = importlib.util.spec_from_file_location("run_notebooks",
                                                  ROOT / "scripts" / "run_notebooks.py")
    run_notebooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_notebooks)
    path = tmp_path / "tiny.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    nbformat.write(nb, path)
    executed, _ = run_notebooks.execute(path, timeout=120)
    assert executed.cells[0].outputs[0]["text"].strip() == "42"
    assert "without encryption" not in capfd.readouterr().err
