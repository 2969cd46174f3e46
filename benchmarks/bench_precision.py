"""mixed_bfloat16 against float32 for All-CNN-C training on this CPU: speed and accuracy.

Each policy runs in its own process through our training path (``seed_everything(0)``,
``make_dataset(..., training=True, augment=True)``, ``model.fit``, SGD Nesterov):

- speed: the median per-batch time of ``--steps`` batches of ``--batch`` after ``--warmup``;
- accuracy (``--accuracy-steps N`` > 0): both policies train N steps from the same initial
  weights on the same batches; the parent compares their training-loss trajectories step by
  step (the largest gap), then each reports the validation accuracy and loss on
  ``--val-images`` validation images (evaluated in the policy it was trained in). A few steps
  leave the network near chance, so the loss gap is the sensitive check; the validation
  accuracy only catches a policy that diverges.

Without bfloat16 hardware (AVX-512 BF16 or AMX) TensorFlow cannot use fast bf16 kernels and
mixed_bfloat16 runs far slower than float32; the JSON records the CPU flags. Writes
``benchmarks/results/precision.json``.

    .venv/bin/python benchmarks/bench_precision.py                      # speed only, ~2 min
    .venv/bin/python benchmarks/bench_precision.py --accuracy-steps 6   # + short check, ~3 min
    .venv/bin/python benchmarks/bench_precision.py --accuracy-steps 40  # longer, ~15 min
    # with bfloat16 hardware (AVX512_BF16, AMX) a step takes tens of ms, not seconds:
    .venv/bin/python benchmarks/bench_precision.py --steps 20 --accuracy-steps 600 \
        --val-images 5000                                               # ~3 min there
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common import (
    RESULTS_DIR,
    batch_timer,
    cpu_info,
    now,
    run_child,
    spread,
    tiled,
    versions,
    write_json,
)

POLICIES = ("float32", "mixed_bfloat16")


def child(policy: str, batch: int, steps: int, warmup: int, accuracy_steps: int,
          val_images: int) -> dict:
    """Time (and optionally train and validate) All-CNN-C under ``policy`` in this process."""
    import keras
    import numpy as np

    from allcnn_lib.data import load_cifar10
    from allcnn_lib.evaluation import evaluate
    from allcnn_lib.models import build_model
    from allcnn_lib.training import make_dataset, make_optimizer, seed_everything

    load_before = os.getloadavg()
    seed_everything(0)
    keras.config.set_dtype_policy(policy)
    data = load_cifar10(verbose=False)
    total = max(steps + warmup, accuracy_steps)
    x, y = tiled(data.x_train, data.y_train, total * batch)
    model = build_model("allcnn")
    model.compile(optimizer=make_optimizer("sgd"),
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    timer = batch_timer()
    ds = make_dataset(x, y, batch, training=True, augment=True, seed=0)
    history = model.fit(ds.repeat(), epochs=1, steps_per_epoch=total, callbacks=[timer],
                        verbose=0)
    row: dict[str, object] = {"policy": policy, "batch_size": batch,
                              "compute_dtype": model.layers[2].compute_dtype,
                              **spread(timer.times[warmup:steps + warmup], batch),
                              "data": "shipped sample" if data.is_sample else "full CIFAR-10"}
    if accuracy_steps:
        n = min(val_images, len(data.y_val))
        result = evaluate(model, data.x_val[:n], data.y_val[:n])
        row.update({"accuracy_steps": accuracy_steps, "val_images": n,
                    "val_accuracy": result.accuracy, "val_loss": result.loss,
                    "train_loss_last": float(np.asarray(history.history["loss"][-1])),
                    "train_loss_per_step": timer.losses[:accuracy_steps]})
    return {**row, "load_average_before": load_before, "load_average_after": os.getloadavg()}


def shown_steps(n: int, most: int = 10) -> list[int]:
    """Step numbers (1-based) to print of an ``n``-step loss trajectory: all of a short one,
    ``most`` evenly spaced ones (the last included) of a long one."""
    if n <= most:
        return list(range(1, n + 1))
    return sorted({round(1 + k * (n - 1) / (most - 1)) for k in range(most)})


def main(argv: list[str] | None = None) -> int:
    """Run each policy in its own process; print the comparison and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--accuracy-steps", type=int, default=0)
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--out", default=str(RESULTS_DIR / "precision.json"))
    parser.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.steps, args.warmup,
                               args.accuracy_steps, args.val_images)), flush=True)
        return 0
    load_before, rows = os.getloadavg(), {}
    for policy in POLICIES:
        rows[policy] = run_child([__file__, "--child", policy, *(argv or sys.argv[1:])],
                                 env={"KERAS_BACKEND": "tensorflow"})
        r = rows[policy]
        acc = (f", val accuracy {r['val_accuracy']:.3f} after {r['accuracy_steps']} steps"
               if "val_accuracy" in r else "")
        print(f"{policy:15s} {r['images_per_s']:7.1f} img/s (batch {args.batch}, steps "
              f"{r['min_step_s']:.2f}-{r['max_step_s']:.2f} s){acc}", flush=True)
    speedup = rows["mixed_bfloat16"]["images_per_s"] / rows["float32"]["images_per_s"]
    print(f"mixed_bfloat16 / float32 speed: {speedup:.2f}x (target >= 1.5x)")
    gap = None
    if all("train_loss_per_step" in r for r in rows.values()):
        f32, b16 = (rows[p]["train_loss_per_step"] for p in POLICIES)
        gap = max(abs(a - b) for a, b in zip(f32, b16, strict=True))
        print("training loss per step (running mean), float32 vs mixed_bfloat16:")
        for i in shown_steps(len(f32)):
            a, b = f32[i - 1], b16[i - 1]
            print(f"  step {i:4d}: {a:.4f}  {b:.4f}  ({b - a:+.4f})")
        print(f"largest gap {gap:.4f}")
    write_json(Path(args.out), {
        "benchmark": "mixed_bfloat16 vs float32", "date": now(), "machine": cpu_info(),
        "versions": versions(), "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "rows": rows, "speedup": speedup,
        "train_loss_max_gap": gap})
    return 0


if __name__ == "__main__":
    sys.exit(main())
