"""All-CNN-C training and inference images/s: Keras 3 on three backends, our training path and
a hand-written PyTorch loop, each implementation in its own process.

Configurations (``--impls``):

- ``keras-tensorflow``, ``keras-jax``, ``keras-torch``: ``build_model("allcnn")`` compiled with
  ``make_optimizer("sgd")`` (SGD, momentum 0.9, Nesterov) under ``KERAS_BACKEND``; training is
  ``model.train_on_batch`` on one augmented batch held in memory (the bare step), inference is
  ``model.predict_on_batch``. Backend defaults (JAX compiles with XLA; TensorFlow and torch
  run eagerly-traced graphs without XLA).
- ``ours``: the library's training path as ``allcnn_lib.training.train`` runs it: op
  determinism on, ``make_dataset(..., training=True, augment=True)`` feeding ``model.fit``
  (shuffle, uint8 -> float, random shifts and flips, prefetch), per-batch times from a
  callback; inference is ``model.predict`` through ``make_dataset``.
- ``ours-onednn``: the same with ``TF_ENABLE_ONEDNN_OPTS=1``. TensorFlow turns its oneDNN
  kernels on by default only on CPUs with AVX-512 VNNI/BF16 or AMX; ``allcnn_lib`` sets the
  variable to 1 unless it is set (since 2026-12-01), so ``ours`` has them on too and this row
  equals it on every CPU; it is kept for the history's AVX2 rows, measured before.
- ``torch-loop``: the same network written by hand in PyTorch (``channels_last`` memory format,
  input dropout 0.2, nine 3x3/1x1 convs with ReLU, dropout 0.5 after the two stride-2 convs,
  global average pooling, cross-entropy, SGD momentum 0.9 Nesterov, weight decay 1e-3 = Keras'
  L2 5e-4) with ``torch.set_num_threads(os.cpu_count())``: the outside reference.

Every training figure is the median over ``--steps`` (>= 20) steps after ``--warmup`` steps
(inference: ``--infer-steps`` batches of 256), with the
min/quartiles/max of the step times. Prints a table; writes ``benchmarks/results/speed.json``.

Each implementation runs in a fresh process (a backend is fixed at import, and TensorFlow reads
``TF_ENABLE_ONEDNN_OPTS`` once), which measures its modes one after the other, each on a newly
built model; ``--process-per config`` gives every (implementation, mode, batch) its own process
instead, at about 15 s of start-up and tracing per extra process.

    .venv/bin/python benchmarks/bench_speed.py        # ~11 min on the quiet 2-core machine
    .venv/bin/python benchmarks/bench_speed.py --impls torch-loop ours --train-batches 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import (
    RESULTS_DIR,
    TRAIN_GFLOP_PER_IMAGE,
    batch_timer,
    cpu_info,
    now,
    run_child,
    spread,
    step_times,
    tiled,
    versions,
    write_json,
)

IMPLS = ("keras-tensorflow", "keras-jax", "keras-torch", "ours", "ours-onednn", "torch-loop")
INFER_BATCH = 256


# --------------------------------------------------------------------------- children


def _data(n: int):
    """``n`` uint8 training images and labels (tiled from the shipped sample if need be)."""
    from allcnn_lib.data import load_cifar10

    data = load_cifar10(verbose=False)
    x, y = tiled(data.x_train, data.y_train, n)
    return x, y, ("shipped sample" if data.is_sample else "full CIFAR-10")


def _keras_child(impl: str, mode: str, batch: int, steps: int, warmup: int) -> dict:
    """One configuration of a Keras backend, or of our path (``impl`` "ours*")."""
    import keras
    import numpy as np

    from allcnn_lib.models import build_model
    from allcnn_lib.training import make_optimizer

    keras.utils.set_random_seed(0)
    x, y, source = _data((steps + warmup + 2) * batch)
    model = build_model("allcnn")
    extra: dict[str, object] = {"backend": keras.backend.backend(), "data": source}
    if impl.startswith("ours"):
        from allcnn_lib.training import make_dataset, seed_everything

        seed_everything(0)  # as train() does: op determinism (and so no XLA)
    if mode == "train":
        model.compile(optimizer=make_optimizer("sgd"),
                      loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        extra["jit_compile"] = bool(model.jit_compile)
        if impl.startswith("ours"):
            timer = batch_timer()
            ds = make_dataset(x, y, batch, training=True, augment=True, seed=0)
            model.fit(ds.repeat(), epochs=1, steps_per_epoch=steps + warmup,
                      callbacks=[timer], verbose=0)
            times = timer.times[warmup:]
        else:
            from allcnn_lib.preprocessing import tf_shift_flip

            rng = np.random.default_rng(0)
            xb = tf_shift_flip(x[:batch], *rng.integers(-3, 4, (2, batch)),
                               rng.random(batch) < 0.5).numpy().astype("float32") / 255
            yb = y[:batch]
            times = step_times(lambda: model.train_on_batch(xb, yb), steps, warmup)
    else:
        if impl.startswith("ours"):
            timer = batch_timer()
            ds = make_dataset(x[:(steps + warmup) * batch], None, batch)
            model.predict(ds, verbose=0, callbacks=[timer])
            times = timer.times[warmup:]
        else:
            xb = x[:batch].astype("float32") / 255
            times = step_times(lambda: model.predict_on_batch(xb), steps, warmup)
    return {**spread(times, batch), **extra}


def _torch_child(mode: str, batch: int, steps: int, warmup: int) -> dict:
    """One configuration of the hand-written PyTorch All-CNN-C (channels_last)."""
    import numpy as np
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)

    def conv(cin: int, cout: int, k: int, stride: int = 1, pad: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, stride, pad), nn.ReLU(inplace=True)]

    net = nn.Sequential(
        nn.Dropout(0.2), *conv(3, 96, 3), *conv(96, 96, 3), *conv(96, 96, 3, 2),
        nn.Dropout(0.5), *conv(96, 192, 3), *conv(192, 192, 3), *conv(192, 192, 3, 2),
        nn.Dropout(0.5), *conv(192, 192, 3, pad=0), *conv(192, 192, 1, pad=0),
        *conv(192, 10, 1, pad=0), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).to(memory_format=torch.channels_last)
    x, y, source = _data(batch)
    xb = torch.from_numpy(x[:batch].astype(np.float32) / 255).permute(0, 3, 1, 2)
    xb = xb.contiguous(memory_format=torch.channels_last)
    yb = torch.from_numpy(y[:batch].astype(np.int64))
    if mode == "train":
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                              weight_decay=1e-3)
        loss_fn = nn.CrossEntropyLoss()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
            loss.item()

    else:
        net.eval()

        def step() -> None:
            with torch.inference_mode():
                net(xb).softmax(1).numpy()

    times = step_times(step, steps, warmup)
    return {**spread(times, batch), "backend": "torch (hand-written loop)", "data": source,
            "threads": torch.get_num_threads(), "channels_last": True}


def child(impl: str, mode: str, batch: int, steps: int, warmup: int) -> dict:
    """Measure one configuration in this process; returns its row."""
    load_before = os.getloadavg()
    if impl == "torch-loop":
        row = _torch_child(mode, batch, steps, warmup)
    else:
        row = _keras_child(impl, mode, batch, steps, warmup)
    return {"impl": impl, "mode": mode, "batch_size": batch, **row,
            "load_average_before": load_before, "load_average_after": os.getloadavg()}


# --------------------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> int:
    """Run every configuration in a fresh process; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--train-batches", type=int, nargs="*", default=[32, 128])
    parser.add_argument("--infer-batch", type=int, default=INFER_BATCH)
    parser.add_argument("--no-infer", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median; >= 20)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--infer-steps", type=int, default=6,
                        help="timed inference steps of --infer-batch images (median)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "speed.json"))
    parser.add_argument("--update", action="store_true",
                        help="keep the other rows of --out and replace only the configurations "
                             "run now (to remeasure a few at a quieter moment)")
    parser.add_argument("--process-per", choices=("impl", "config"), default="impl",
                        help="a fresh process per implementation (default) or per "
                             "(implementation, mode, batch)")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "MODE:BATCH,..."),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, specs = args.child
        for spec in specs.split(","):
            mode, batch = spec.split(":")
            steps = args.steps if mode == "train" else args.infer_steps
            row = child(impl, mode, int(batch), steps, args.warmup)
            print(json.dumps(row), flush=True)  # one JSON line per configuration
        return 0
    if args.steps < 20:
        print(f"note: --steps {args.steps} < 20: a smoke run, not the benchmark")

    # The pairs that the targets compare first and back to back (a shared machine's load
    # drifts), the slowest (JAX) last; an interrupted run keeps the rows it finished.
    # In each process: the large training batch, inference, then the small batches.
    order = ["ours", "torch-loop", "ours-onednn", "keras-tensorflow", "keras-torch",
             "keras-jax"]
    impls = sorted(args.impls, key=order.index)
    big, small = max(args.train_batches, default=0), sorted(args.train_batches)[:-1]
    configs: list[tuple[str, str, int]] = []
    for i in impls:  # ours-onednn: only the batch and inference that the targets use
        configs += [(i, "train", big)] if big else []
        configs += [] if args.no_infer else [(i, "infer", args.infer_batch)]
        configs += [] if i == "ours-onednn" else [(i, "train", b) for b in small]
    load_before, started, rows = os.getloadavg(), time.perf_counter(), []
    kept: list[dict] = []
    if args.update and Path(args.out).exists():
        wanted = set(configs)
        kept = [r for r in json.loads(Path(args.out).read_text())["rows"]
                if (r["impl"], r["mode"], r["batch_size"]) not in wanted]

    def save() -> None:  # after every configuration: an interrupted run keeps what it measured
        write_json(Path(args.out), {
            "benchmark": "bench_speed", "date": now(), "machine": cpu_info(),
            "versions": versions(), "steps": args.steps, "infer_steps": args.infer_steps,
            "warmup": args.warmup,
            "statistic": "median seconds per step -> images/s; spread = min/quartiles/max",
            "train_gflop_per_image": TRAIN_GFLOP_PER_IMAGE, "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "seconds": time.perf_counter() - started,
            "complete": len(rows) == len(configs), "updated": args.update,
            "rows": kept + rows})

    groups: list[list[tuple[str, str, int]]] = []
    for config in configs:  # consecutive configurations of one implementation share a process
        if args.process_per == "impl" and groups and groups[-1][0][0] == config[0]:
            groups[-1].append(config)
        else:
            groups.append([config])
    for group in groups:
        impl = group[0][0]
        backend = impl.removeprefix("keras-") if impl.startswith("keras-") else "tensorflow"
        t0 = time.perf_counter()
        new_rows = run_child(
            [__file__, "--child", impl, ",".join(f"{m}:{b}" for _, m, b in group),
             "--steps", str(args.steps), "--infer-steps", str(args.infer_steps),
             "--warmup", str(args.warmup)],
            env={"KERAS_BACKEND": backend,
                 **({"TF_ENABLE_ONEDNN_OPTS": "1"} if impl == "ours-onednn" else {})},
            all_rows=True)
        for row in new_rows:
            row["process_s"] = time.perf_counter() - t0  # the whole process, all its modes
            row["configs_in_process"] = len(group)
            row["date"] = now()
            rows.append(row)
            print(f"{impl:17s} {row['mode']:5s} batch {row['batch_size']:3d}: "
                  f"{row['images_per_s']:7.1f} img/s  (steps {row['min_step_s']:.3f}-"
                  f"{row['max_step_s']:.3f} s, load {row['load_average_before'][0]:.1f})",
                  flush=True)
        print(f"{impl}: {len(group)} configuration(s) in one process, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        save()

    print(f"\n{'configuration':30s} {'img/s':>8s} {'GFLOP/s':>8s} {'median s':>9s} "
          f"{'min-max s':>14s}")
    for r in rows:
        gflops = r["images_per_s"] * TRAIN_GFLOP_PER_IMAGE if r["mode"] == "train" else None
        name = f"{r['impl']} {r['mode']} b{r['batch_size']}"
        print(f"{name:30s} {r['images_per_s']:8.1f} "
              f"{(f'{gflops:.1f}' if gflops else '-'):>8s} {r['median_step_s']:9.3f} "
              f"{r['min_step_s']:6.3f}-{r['max_step_s']:<7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
