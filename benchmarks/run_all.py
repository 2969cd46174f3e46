"""``make bench``: every benchmark in turn, each writing its JSON, then docs/performance.md.

    .venv/bin/python benchmarks/run_all.py [--notebooks] [--accuracy]

The default set includes a short mixed_bfloat16 accuracy check (6 steps); ``--notebooks`` adds
the quick-mode notebook suite (~4 min) and ``--accuracy`` lengthens the accuracy check to 40
steps (~15 min more on a CPU without bfloat16 hardware); without ``--notebooks`` the report
keeps the suite's last result. The wall time of the run goes to ``benchmarks/results/run_all.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, RESULTS_DIR, now, write_json

HERE = Path(__file__).resolve().parent


def steps(notebooks: bool, accuracy: bool) -> list[list[str]]:
    """The benchmark command lines (script and arguments) of this run."""
    out = [["bench_peak.py", "--repeats", "3"],
           ["bench_lsuv.py", "--repeats", "3", "--seed-repeats", "1"],
           ["bench_zca.py", "--variants", "exact64,exact32", "--repeats", "2",
            "--no-augmentation"],
           ["bench_eval.py"],
           ["bench_precision.py", "--steps", "3", "--warmup", "1", "--val-images", "256",
            "--accuracy-steps", "40" if accuracy else "6"],
           ["bench_speed.py"]]
    if notebooks:
        out.append(["bench_notebooks.py"])
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, record the wall time, regenerate the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebooks", action="store_true")
    parser.add_argument("--accuracy", action="store_true")
    args = parser.parse_args(argv)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    started, load_before, parts, failed = time.perf_counter(), os.getloadavg(), [], []
    for cmd in steps(args.notebooks, args.accuracy):
        print(f"\n=== {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]], cwd=REPO,
                            env=env).returncode
        parts.append({"command": " ".join(cmd), "seconds": time.perf_counter() - t0, "rc": rc})
        if rc:
            failed.append(cmd[0])
        print(f"=== {cmd[0]}: {parts[-1]['seconds']:.0f} s, rc {rc}", flush=True)
    total = time.perf_counter() - started
    write_json(RESULTS_DIR / "run_all.json", {
        "date": now(), "seconds": total, "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "notebooks": args.notebooks,
        "accuracy": args.accuracy, "parts": parts})
    print(f"\nmake bench: {total / 60:.1f} min; failed: {', '.join(failed) or 'none'}")
    rc = subprocess.run([sys.executable, str(HERE / "make_report.py")], cwd=REPO,
                        env=env).returncode
    return 1 if failed or rc else 0


if __name__ == "__main__":
    sys.exit(main())
