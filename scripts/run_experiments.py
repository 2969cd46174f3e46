#!/usr/bin/env python3
"""Run the experiments of ``allcnn_lib.experiments`` one process at a time, resumably.

    python scripts/run_experiments.py --list                    # the grid and what is done
    python scripts/run_experiments.py                           # everything not done yet
    python scripts/run_experiments.py --experiments optimizers --seeds 0 1
    KERAS_BACKEND=jax python scripts/run_experiments.py         # e.g. on a GPU machine

Each (configuration, seed) is one ``allcnn train`` process writing to ``--runs-dir`` (default
``~/.cache/allcnn/experiment_runs``; weights stay there), with its ``BackupAndRestore`` backup
under ``~/.cache/allcnn/backup/``: stop the script at any time and run it again, it skips the
finished runs and resumes the interrupted one from its last epoch. A finished run's small
files (``config.json``, ``history.csv``, ``batches.csv``) are copied to
``results/<config>/seed<k>/``, which is committed. Logs go to ``<runs-dir>/<run id>.log``.

The results must come from the full CIFAR-10: without it (the shipped sample only) the script
stops, unless ``--allow-sample`` (for trying the pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from allcnn_lib import experiments as ex  # noqa: E402
from allcnn_lib.cli import POSITIVE_INT  # noqa: E402


def copy_results(run_dir: Path, target: Path) -> None:
    """Copy the run's small files to ``target`` through a temporary folder (atomic rename);
    ``config.json``'s paths are recorded relative to the repository or ``~``."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ex.RESULT_FILES + ((ex.TEST_FILE,) if (run_dir / ex.TEST_FILE).is_file()
                                   else ()):
        shutil.copy2(run_dir / name, tmp / name)
    from allcnn_lib.runs import portable_config

    config = json.loads((tmp / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps(portable_config(config), indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def record_machine(run_dir: Path) -> None:
    """Add the CPU this runner (and so the run) used to the run's ``config.json``."""
    from allcnn_lib.recipes import cpu_description

    path = run_dir / "config.json"
    config = json.loads(path.read_text())
    config.setdefault("run", {}).setdefault("machine", cpu_description())
    path.write_text(json.dumps(config, indent=2))


def evaluate_on_test(run_dir: Path, log: Path, data_flags: list[str]) -> int:
    """Score a ladder rung's last weights on the test set, once: ``run_dir/test.json``."""
    cmd = [sys.executable, "-m", "allcnn_lib", "evaluate", "--weights",
           str(run_dir / "last.weights.h5"), "--out", str(run_dir / "test.png"), *data_flags]
    with open(log, "a") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    if rc == 0:
        report = json.loads((run_dir / "test.json").read_text())
        report["weights"] = "last.weights.h5"
        (run_dir / ex.TEST_FILE).write_text(json.dumps(
            {k: report[k] for k in ("weights", "tta_flip", "tta_shift", "accuracy", "loss",
                                    "images", "per_class_accuracy")}, indent=1))
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", nargs="+", default=list(ex.EXPERIMENTS),
                    choices=[*ex.EXPERIMENTS, *ex.RECIPE_EXPERIMENTS])
    ap.add_argument("--seeds", nargs="+", type=int,
                    help="run only these of each configuration's seeds (default: all)")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--runs-dir", type=Path,
                    default=Path.home() / ".cache" / "allcnn" / "experiment_runs")
    ap.add_argument("--backup-root", type=Path,
                    default=Path.home() / ".cache" / "allcnn" / "backup",
                    help="BackupAndRestore folders, one per run (default: ~/.cache/allcnn/backup)")
    ap.add_argument("--data-dir", help="CIFAR-10 location (default: data/)")
    ap.add_argument("--allow-sample", action="store_true",
                    help="run on the shipped sample when the full data is missing (a test of "
                         "the pipeline; its results do not belong in results/)")
    ap.add_argument("--max-runs", type=POSITIVE_INT, help="stop after this many runs")
    ap.add_argument("--list", action="store_true", help="print the grid and what is done")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("extra", nargs="*", help="more flags for every run (after --)")
    args = ap.parse_args(argv)

    order = ex.run_order(args.experiments, args.seeds)
    if not order:  # e.g. --seeds 2 for experiments whose configurations have seeds 0 and 1
        offered = sorted({seed for _, seed in ex.run_order(args.experiments)})
        ap.error(f"no configuration of {', '.join(args.experiments)} has a seed in --seeds "
                 f"{' '.join(map(str, args.seeds))}; choose from {' '.join(map(str, offered))}")
    todo = [(c, s) for c, s in order
            if not ex.is_complete(ex.result_dir(args.results, c.key, s))]
    if args.list or args.dry_run:
        for config, seed in order:
            done = (config, seed) not in todo
            line = " ".join(config.command(seed, args.runs_dir, *args.extra))
            print(f"{'done' if done else 'todo'}  {config.key:20s} seed {seed}   "
                  f"{'' if args.list else 'allcnn ' + line}")
        print(f"{len(order) - len(todo)} of {len(order)} runs done")
        return 0

    from allcnn_lib.data import load_cifar10

    data = load_cifar10(args.data_dir, verbose=False)
    if data.is_sample and not args.allow_sample:
        print("error: only the shipped sample is here; the experiments need the full CIFAR-10 "
              "(make data, or load_cifar10() once with internet), or pass --allow-sample",
              file=sys.stderr)
        return 1
    data_flags = ["--data-dir", args.data_dir] if args.data_dir else []
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(order) - len(todo)} of {len(order)} runs done; {len(todo)} to go "
          f"({data.source})", flush=True)
    for config, seed in order:  # ladder rungs finished before their test was scored
        rid, target = ex.run_id(config.key, seed), ex.result_dir(args.results, config.key, seed)
        run_dir = args.runs_dir / rid
        if (config.test and (config, seed) not in todo and ex.is_complete(run_dir)
                and not (target / ex.TEST_FILE).is_file()):
            if evaluate_on_test(run_dir, args.runs_dir / f"{rid}.log", data_flags) != 0:
                print(f"  {rid}: the test evaluation failed", flush=True)
                return 1
            record_machine(run_dir)
            copy_results(run_dir, target)
            print(f"  {rid}: test set scored once -> {target / ex.TEST_FILE}", flush=True)
    batch = todo[:args.max_runs]  # this call's runs
    for n, (config, seed) in enumerate(batch, 1):
        rid = ex.run_id(config.key, seed)
        cmd = [sys.executable, "-m", "allcnn_lib",
               *config.command(seed, args.runs_dir, "--backup-dir", args.backup_root / rid,
                               *data_flags, *args.extra)]
        log = args.runs_dir / f"{rid}.log"
        start = time.perf_counter()
        print(f"[{n}/{len(batch)}] {rid}: allcnn {' '.join(cmd[3:])}  (log: {log})", flush=True)
        if ex.is_complete(args.runs_dir / rid):  # trained before its results were copied
            rc = 0  # (allcnn train refuses to retrain a finished run without --overwrite)
        else:
            with open(log, "a") as fh:
                rc = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        minutes = (time.perf_counter() - start) / 60
        run_dir = args.runs_dir / rid
        if rc != 0 or not ex.is_complete(run_dir):
            print(f"  {rid} failed (exit {rc}) after {minutes:.1f} min; see {log}", flush=True)
            return 1
        record_machine(run_dir)
        if config.test and not (run_dir / ex.TEST_FILE).is_file():
            if evaluate_on_test(run_dir, log, data_flags) != 0:
                print(f"  {rid}: the test evaluation failed; see {log}", flush=True)
                return 1
        copy_results(run_dir, ex.result_dir(args.results, config.key, seed))
        print(f"  {rid} done in {minutes:.1f} min -> "
              f"{ex.result_dir(args.results, config.key, seed)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
