"""Where a float32 training step of All-CNN-C spends its time, against the FMA peak.

A brief profile for the "85% of the multiply-add peak" target: the same network and batch,
timed in stages that add one part of the step at a time (TensorFlow backend, op determinism
on as in ``train()``, median of ``--steps`` after ``--warmup``):

1. ``forward``: the model called in inference mode (the convolutions and ReLUs only);
2. ``forward + backward``: loss and gradients in one ``tf.function``, no dropout, no L2, no
   update: the convolution passes a step needs, and nothing else;
3. ``+ dropout + L2``: the same with the paper's dropout and weight decay (training mode);
4. ``train_on_batch``: the whole Keras step, SGD Nesterov update included.

Each stage prints images/s and GFLOP/s as a fraction of the FMA loop's rate in
``benchmarks/results/peak.json``, and the script writes ``benchmarks/results/profile.json``.

    .venv/bin/python benchmarks/profile_step.py [--batch 128] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from common import (  # noqa: E402
    INFER_GFLOP_PER_IMAGE,
    RESULTS_DIR,
    TRAIN_GFLOP_PER_IMAGE,
    cpu_info,
    fma_peak,
    now,
    spread,
    step_times,
    versions,
    write_json,
)


def main(argv: list[str] | None = None) -> int:
    """Time the four stages; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS_DIR / "profile.json"))
    args = parser.parse_args(argv)

    import keras
    import numpy as np
    import tensorflow as tf

    from allcnn_lib.models import build_model
    from allcnn_lib.training import make_optimizer, seed_everything

    seed_everything(0)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((args.batch, 32, 32, 3), dtype=np.float32))
    y = tf.constant(rng.integers(0, 10, args.batch))
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    bare = build_model("allcnn", dropout=False, weight_decay=0.0)
    paper = build_model("allcnn")

    @tf.function
    def forward() -> tf.Tensor:
        return bare(x, training=False)

    def gradients(model: keras.Model):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
                if model.losses:
                    loss = loss + tf.add_n(model.losses)
            return tape.gradient(loss, model.trainable_variables)
        return step

    paper.compile(optimizer=make_optimizer("sgd"), loss=loss_fn)
    stages = [("forward", forward, INFER_GFLOP_PER_IMAGE),
              ("forward + backward (no dropout, no L2, no update)", gradients(bare),
               TRAIN_GFLOP_PER_IMAGE),
              ("+ dropout + L2 (no update)", gradients(paper), TRAIN_GFLOP_PER_IMAGE),
              ("train_on_batch (whole Keras step)",
               lambda: paper.train_on_batch(x, y), TRAIN_GFLOP_PER_IMAGE)]
    peak_file = RESULTS_DIR / "peak.json"
    peak = fma_peak(json.loads(peak_file.read_text()) if peak_file.exists() else None)
    load_before, rows = os.getloadavg(), []
    print(f"All-CNN-C, batch {args.batch}, median of {args.steps} steps; FMA peak "
          f"{peak or float('nan'):.0f} GFLOP/s")
    print(f"{'stage':52s} {'img/s':>7s} {'GFLOP/s':>8s} {'% peak':>7s}")
    for name, fn, gflop in stages:
        stats = spread(step_times(lambda fn=fn: _block(fn()), args.steps, args.warmup),
                       args.batch)
        gflops = stats["images_per_s"] * gflop
        frac = gflops / peak if peak else None
        rows.append({"stage": name, "gflop_per_image": gflop, "gflops": gflops,
                     "fraction_of_peak": frac, **stats})
        print(f"{name:52s} {stats['images_per_s']:7.1f} {gflops:8.1f} "
              f"{'-' if frac is None else f'{100 * frac:6.0f}%':>7s}", flush=True)
    write_json(Path(args.out), {
        "benchmark": "training-step profile", "date": now(), "machine": cpu_info(),
        "versions": versions(), "batch_size": args.batch, "peak_gflops": peak,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "rows": rows})
    return 0


def _block(result: object) -> object:
    """Wait for TensorFlow's result (tensors, a list of them, or a number)."""
    import tensorflow as tf

    for t in tf.nest.flatten(result):
        if hasattr(t, "numpy"):
            t.numpy()
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
