"""Wall time of the quick-mode notebook suite (``ALLCNN_QUICK=1``, nbval), notebook by notebook.

Each notebook runs in its own ``pytest --nbval-lax`` process, as ``make nbtest`` runs them all
at once; the suite's time is the sum. Writes ``benchmarks/results/notebooks.json``. Target:
<= 10 minutes on the 2-core development machine.

    .venv/bin/python benchmarks/bench_notebooks.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, RESULTS_DIR, cpu_info, now, versions, write_json

TARGET_S = 600.0
FLAGS = ["--nbval-lax", "--nbval-current-env", "--nbval-sanitize-with",
         "notebooks/sanitize.cfg", "--nbval-cell-timeout=600", "-q", "-p", "no:cacheprovider"]


def main(argv: list[str] | None = None) -> int:
    """Run every notebook under nbval in quick mode and record the wall times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS_DIR / "notebooks.json"))
    args = parser.parse_args(argv)
    env = {**os.environ, "ALLCNN_QUICK": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
           "JUPYTER_PLATFORM_DIRS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    load_before = os.getloadavg()
    rows = []
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", *FLAGS, str(nb)], cwd=REPO,
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        summary = (proc.stdout.strip().splitlines() or [""])[-1]
        rows.append({"notebook": nb.name, "seconds": wall, "passed": proc.returncode == 0,
                     "summary": summary})
        print(f"{nb.name:40s} {wall:7.1f} s  {summary}", flush=True)
    total = sum(r["seconds"] for r in rows)
    print(f"{'quick notebook suite':40s} {total:7.1f} s  (target <= {TARGET_S:.0f} s)")
    write_json(Path(args.out), {
        "benchmark": "quick-mode notebook suite (nbval)", "date": now(), "machine": cpu_info(),
        "versions": versions(), "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "rows": rows, "total_s": total,
        "all_passed": all(r["passed"] for r in rows), "target_s": TARGET_S})
    return 0


if __name__ == "__main__":
    sys.exit(main())
