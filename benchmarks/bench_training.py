"""Speed of All-CNN-C training and inference, and of the tf.data input pipeline beside it.

For each batch size the script times, after a warm-up, the median of ``--steps`` (>= 20) steps:

- ``pipeline``: ``make_dataset(training=True, augment=True)`` alone (shuffle, uint8 -> float,
  shifts and flips, prefetch), i.e. how fast the input can be produced;
- ``train step``: ``model.train_on_batch`` on one batch already in memory (the bare step);
- ``fit``: per-batch time inside ``model.fit`` fed by the pipeline (what training gets);
- ``predict`` (batch 128 and 256): ``model.predict_on_batch`` on a batch in memory, and
  ``model.predict`` through ``make_dataset`` (evaluation / inference).

Settings are those of ``allcnn_lib.training.train``: op determinism on (which also turns XLA
off), float32, CPU or whatever device TensorFlow picks. The pipeline should be several times
faster than the step; if not, the input is the bottleneck. Prints a table and writes
``benchmarks/results/training.json``.

    python benchmarks/bench_training.py            # 5-15 minutes on a (loaded) 2-core CPU
    python benchmarks/bench_training.py --steps 30 --train-batches 32 128 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from common import batch_timer, step_times, tiled

RESULTS = Path(__file__).resolve().parent / "results" / "training.json"


def median_time(step: Callable[[], object], steps: int, warmup: int) -> float:
    """Median seconds of ``step()`` over ``steps`` calls after ``warmup`` calls."""
    return statistics.median(step_times(step, steps, warmup))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="allcnn", choices=("modelc", "strided", "allcnn"))
    parser.add_argument("--train-batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--predict-batches", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median; >= 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.steps < 20:
        parser.error("--steps must be >= 20 (the median of fewer is too noisy here)")

    import keras
    import tensorflow as tf

    from allcnn_lib.data import load_cifar10
    from allcnn_lib.models import build_model
    from allcnn_lib.training import make_dataset, make_optimizer, seed_everything

    seed_everything(0)
    data = load_cifar10()
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows: list[dict[str, object]] = []

    for bs in args.train_batches:
        need = (args.steps + args.warmup + 2) * bs
        x, y = tiled(data.x_train, data.y_train, need)
        ds = make_dataset(x, y, bs, training=True, augment=True, seed=0)
        it = iter(ds.repeat())
        t_pipe = median_time(lambda it=it: next(it), args.steps, args.warmup)

        model = build_model(args.arch)
        model.compile(optimizer=make_optimizer("sgd"),
                      loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        xb, yb = next(iter(ds))
        t_step = median_time(lambda m=model, xb=xb, yb=yb: m.train_on_batch(xb, yb),
                             args.steps, args.warmup)

        timer = batch_timer()
        model.fit(ds.repeat(), epochs=1, steps_per_epoch=args.steps + args.warmup,
                  callbacks=[timer], verbose=0, shuffle=False)
        t_fit = statistics.median(timer.times[args.warmup:])
        rows.append({"kind": "train", "batch_size": bs, "jit_compile": bool(model.jit_compile),
                     "pipeline_images_per_s": bs / t_pipe, "train_step_images_per_s": bs / t_step,
                     "fit_images_per_s": bs / t_fit, "pipeline_over_step": t_step / t_pipe})
        print(f"train batch {bs}: pipeline {bs / t_pipe:8.0f} img/s   train step "
              f"{bs / t_step:6.1f} img/s   fit {bs / t_fit:6.1f} img/s", flush=True)

    model = build_model(args.arch)
    for bs in args.predict_batches:
        x, _ = tiled(data.x_test, data.y_test, (args.steps + args.warmup) * bs)
        xb = tf.constant(x[:bs].astype(np.float32) / 255)
        t_pred = median_time(lambda m=model, xb=xb: m.predict_on_batch(xb), args.steps,
                             args.warmup)
        ds = make_dataset(x, None, bs)
        model.predict(ds.take(args.warmup), verbose=0)
        start = time.perf_counter()
        n = len(model.predict(ds.take(args.steps), verbose=0))
        t_ds = time.perf_counter() - start
        rows.append({"kind": "predict", "batch_size": bs,
                     "predict_step_images_per_s": bs / t_pred,
                     "predict_pipeline_images_per_s": n / t_ds})
        print(f"predict batch {bs}: step {bs / t_pred:6.1f} img/s   through make_dataset "
              f"{n / t_ds:6.1f} img/s", flush=True)

    result = {
        "benchmark": "bench_training", "arch": args.arch, "steps": args.steps,
        "warmup": args.warmup, "statistic": "median seconds per step -> images/s",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices())[0]
        .name, "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "tensorflow": tf.__version__,
        "keras": keras.__version__, "data": data.source, "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    print()
    print(f"{'kind':8} {'batch':>5} {'pipeline':>10} {'step':>8} {'fit':>8}   (images/s, "
          f"median of {args.steps} steps; load avg {load_before[0]:.1f} -> "
          f"{result['load_average_after'][0]:.1f} on {os.cpu_count()} CPUs)")
    print("(predict rows: 'pipeline' = model.predict through make_dataset, 'step' = "
          "predict_on_batch)")
    for r in rows:
        if r["kind"] == "train":
            print(f"{'train':8} {r['batch_size']:>5} {r['pipeline_images_per_s']:>10.0f} "
                  f"{r['train_step_images_per_s']:>8.1f} {r['fit_images_per_s']:>8.1f}")
        else:
            print(f"{'predict':8} {r['batch_size']:>5} {r['predict_pipeline_images_per_s']:>10.1f}"
                  f" {r['predict_step_images_per_s']:>8.1f} {'':>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
