"""Test-set evaluation time: ``allcnn_lib.evaluation.evaluate`` (``model.predict`` through
``make_dataset``, batch 256, then accuracy, loss and the confusion matrix) on the 10,000 test
images (the shipped sample's test part tiled to 10,000 when the full set is absent).

Target: <= 60 s on the 2-core development machine. Writes ``benchmarks/results/eval.json``.

    .venv/bin/python benchmarks/bench_eval.py [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from common import RESULTS_DIR, cpu_info, now, tiled, versions, write_json  # noqa: E402

TARGET_S = 60.0


def main(argv: list[str] | None = None) -> int:
    """Time ``evaluate`` on the test set; print and write the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS_DIR / "eval.json"))
    args = parser.parse_args(argv)

    from allcnn_lib.data import load_cifar10
    from allcnn_lib.evaluation import evaluate
    from allcnn_lib.models import build_model
    from allcnn_lib.training import seed_everything

    load_before = os.getloadavg()
    seed_everything(0)
    data = load_cifar10(verbose=False)
    x, y = tiled(data.x_test, data.y_test, args.images)
    x, y = x[:args.images], y[:args.images]
    model = build_model("allcnn")
    evaluate(model, x[:256], y[:256])  # warm-up: tracing, thread pools
    runs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        evaluate(model, x, y)
        runs.append(time.perf_counter() - t0)
    best = min(runs)
    print(f"evaluate() on {len(y)} test images: {', '.join(f'{s:.1f}' for s in runs)} s "
          f"({len(y) / best:.0f} img/s; target <= {TARGET_S:.0f} s: "
          f"{'holds' if best <= TARGET_S else 'missed'})")
    write_json(Path(args.out), {
        "benchmark": "test-set evaluation", "date": now(), "machine": cpu_info(),
        "versions": versions(), "images": len(y),
        "data": "shipped sample (tiled)" if data.is_sample else "full CIFAR-10",
        "seconds": runs, "median_s": sorted(runs)[len(runs) // 2], "target_s": TARGET_S,
        "load_average_before": load_before, "load_average_after": os.getloadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
