"""``make bench``: every benchmark in turn, each writing its JSON, then docs/performance.md.

    .venv/bin/python benchmarks/run_all.py [--notebooks] [--accuracy] [--no-recipe-epoch]

The default set includes a mixed_bfloat16 accuracy check: 600 steps on a CPU with bfloat16
hardware (AVX512_BF16 or AMX), 6 steps elsewhere, where a bfloat16 step takes seconds;
``--notebooks`` adds the quick-mode notebook suite (~2-5 min) and ``--accuracy`` lengthens the
accuracy check to 3000 steps (40 without bfloat16 hardware, ~15 min more there); without
``--notebooks`` the report keeps the suite's last result. The recipe path (``bench_recipe.py``:
batch norm + mixed_bfloat16 against PyTorch, ~9 min on the 2-core AVX-512 machine of
2026-11-30, torch.compile's compilation included) includes a whole epoch of the recipe (~4-5
min more); ``--no-recipe-epoch`` leaves the epoch out (the report then shows no epoch figure).
``profile_convs.py`` then times each bfloat16 convolution of that step alone, in TensorFlow
and in PyTorch (~1-2 min). ``bench_crops.py`` (the recipe's step on the crops of progressive
resizing, ``--crop-epochs``; ~3 min on 2 AVX2-only cores) is not part of it: run it alone.
The wall time of the run goes to ``benchmarks/results/run_all.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, RESULTS_DIR, now, write_json

from allcnn_lib.recipes import cpu_has_bf16

HERE = Path(__file__).resolve().parent


def precision_step(accuracy: bool) -> list[str]:
    """bench_precision's arguments. With bfloat16 hardware a step costs a few tens of ms, so
    the speed is a 20-step median and the accuracy check trains 600 steps (3000 with
    ``--accuracy``, the experiments' budget) and validates on 5,000 images; without it a
    bfloat16 step takes seconds, so 3 timed steps and a 6-step (40-step) check."""
    if cpu_has_bf16():  # AVX512_BF16 or AMX: mixed_bfloat16 can be fast
        return ["bench_precision.py", "--steps", "20", "--warmup", "2", "--val-images", "5000",
                "--accuracy-steps", "3000" if accuracy else "600"]
    return ["bench_precision.py", "--steps", "3", "--warmup", "1", "--val-images", "256",
            "--accuracy-steps", "40" if accuracy else "6"]


def steps(notebooks: bool, accuracy: bool, recipe_epoch: bool = True) -> list[list[str]]:
    """The benchmark command lines (script and arguments) of this run."""
    out = [["bench_peak.py", "--repeats", "3"],
           ["bench_lsuv.py", "--repeats", "3", "--seed-repeats", "1"],
           ["bench_zca.py", "--variants", "exact64,exact32", "--repeats", "2",
            "--no-augmentation"],
           ["bench_eval.py"],
           precision_step(accuracy),
           ["bench_speed.py"],
           ["profile_step.py"],
           ["bench_recipe.py", *(["--epoch"] if recipe_epoch else [])],
           ["profile_convs.py"]]
    if notebooks:
        out.append(["bench_notebooks.py"])
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, record the wall time, regenerate the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebooks", action="store_true")
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--no-recipe-epoch", action="store_true",
                        help="leave out the whole epoch of the recipe (~4-5 min)")
    args = parser.parse_args(argv)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    started, load_before, parts, failed = time.perf_counter(), os.getloadavg(), [], []
    for cmd in steps(args.notebooks, args.accuracy, not args.no_recipe_epoch):
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
        "accuracy": args.accuracy, "recipe_epoch": not args.no_recipe_epoch,
        "parts": parts})
    print(f"\nmake bench: {total / 60:.1f} min; failed: {', '.join(failed) or 'none'}")
    rc = subprocess.run([sys.executable, str(HERE / "make_report.py")], cwd=REPO,
                        env=env).returncode
    return 1 if failed or rc else 0


if __name__ == "__main__":
    sys.exit(main())
