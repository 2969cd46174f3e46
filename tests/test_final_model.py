"""The shipped final model (``data/final_model/``): its files and checksums, ``make evaluate``
and ``scripts/ship_final_model.py``'s refusals."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from allcnn_lib.data import md5sum

ROOT = Path(__file__).resolve().parent.parent
FINAL = ROOT / "data" / "final_model"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
needs_make = pytest.mark.skipif(not VENV_PYTHON.exists() or shutil.which("make") is None,
                                reason="make evaluate runs the project's .venv")


def provenance() -> dict:
    return json.loads((FINAL / "provenance.json").read_text())


def make_evaluate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALLCNN_QUICK": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(["make", "-s", "-o", ".venv/.setup-stamp", "evaluate", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_shipped_files_match_their_checksums():
    prov = provenance()
    listed = {name: digest for digest, name in
              (line.split() for line in (FINAL / "MD5SUMS").read_text().splitlines())}
    assert listed == prov["md5"]
    assert {"model.weights.h5", "config.json", "history.csv"} <= set(listed)
    for name, digest in listed.items():
        assert md5sum(FINAL / name) == digest, name
    assert (FINAL / "model.weights.h5").stat().st_size <= 6_000_000


def test_provenance_records_command_machine_time_and_one_test_evaluation():
    prov = provenance()
    assert prov["command"].startswith("allcnn train ")
    assert prov["machine"] and prov["wall_time_s"] > 0 and prov["epochs"] >= 1
    assert prov["test_evaluations"] == 1 and prov["test_images"] == 10_000
    assert 0.1 < prov["test_accuracy"] <= 1
    assert prov["val_accuracy"] is None or 0.1 < prov["val_accuracy"] <= 1
    if prov["val_accuracy"] is None:  # trained on all 50,000 images: the last epoch ships
        assert "last epoch" in prov["checkpoint"] and "50,000 training" in prov["trained_on"]
    history = (FINAL / "history.csv").read_text().strip().splitlines()
    assert len(history) - 1 == prov["epochs"]


def test_shipped_weights_hold_the_network_only():
    h5py = pytest.importorskip("h5py")
    with h5py.File(FINAL / "model.weights.h5", "r") as f:
        groups = set(f.keys())
    assert "layers" in groups and "optimizer" not in groups  # no momentum slots to ship


def test_the_config_rebuilds_the_network_the_weights_were_saved_from():
    from allcnn_lib.evaluation import load_trained_model

    config = json.loads((FINAL / "config.json").read_text())
    model = load_trained_model(FINAL / "model.weights.h5")
    assert model.name == config["run"]["model"]
    assert model.count_params() == config["run"]["params"]


@needs_make
def test_make_evaluate_prints_the_samples_accuracy_clearly_labelled():
    proc = make_evaluate()
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r"SAMPLE accuracy (\d\.\d+)\s+loss (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout
    assert "not the 10,000-image CIFAR-10 test set" in proc.stdout
    # 1,000 real test images: within a few standard errors (1.6 points) of the full test set
    assert abs(float(found.group(1)) - provenance()["test_accuracy"]) < 0.06


@needs_make
def test_make_evaluate_refuses_damaged_weights_in_one_line(tmp_path):
    copy = tmp_path / "final_model"
    shutil.copytree(FINAL, copy)
    weights = copy / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = make_evaluate(f"FINAL_MODEL={copy}")
    assert proc.returncode != 0
    assert "do not match its MD5SUMS" in proc.stderr and "git checkout" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "accuracy" not in proc.stdout


def _fake_run(tmp_path: Path, **run: object) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "best.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    (folder / "history.csv").write_text("epoch,val_accuracy\n0,0.5\n")
    (folder / "config.json").write_text(json.dumps({"run": run}))
    return folder


@pytest.mark.parametrize("run, message", [
    ({"status": "running", "is_sample": False}, "not 'finished'"),
    ({"status": "finished", "is_sample": True}, "shipped sample"),
    # trained on all 50,000 images: the last epoch ships, and this run has none
    ({"status": "finished", "is_sample": False, "validation_images": 0}, "no last.weights.h5"),
])
def test_ship_refuses_unfinished_or_sample_runs(tmp_path, run, message):
    folder = _fake_run(tmp_path, **run)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "ship_final_model.py"),
                           str(folder), "--command", "allcnn train", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
