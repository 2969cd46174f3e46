"""Progressive resizing's speed: training images/s of the fast recipe's path on random crops of
each side (``allcnn train --crop-epochs N --crop-size S``) against whole 32 x 32 images.

One process, one network for any input side (``input_shape=(None, None, 3)``, as ``train``
builds it when ``crop_epochs`` is set), the recipe's precision (mixed_bfloat16 where the CPU
computes it, float32 elsewhere). For each side: ``make_dataset`` (standardization, 4 px
reflect-padded shifts, flips, one-hot) -> ``crop_first`` (every batch cut; 32: whole images) ->
``model.fit``. The sides take turns for ``--rounds`` rounds so that drift of the machine's speed
reaches each alike; each cell is the median of all its timed steps. The ideal speed-up is the
ratio of conv multiply-adds (``common.conv_macs`` of the network built at each side), about
(32 / side)^2.

Prints a table; writes ``benchmarks/results/crops.json``.

    .venv/bin/python benchmarks/bench_crops.py   # ~3 min on 2 AVX2-only cores (float32)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench_recipe import _data, _keras_model, _keras_setup, _train_dataset
from common import RESULTS_DIR, batch_timer, conv_macs, cpu_info, now, spread, versions, write_json


def measure(sides: list[int], batch: int, steps: int, warmup: int, rounds: int,
            threads: int, bf16: bool) -> list[dict]:
    """Rows of images/s per side (the first is the reference, normally 32)."""
    policy = "mixed_bfloat16" if bf16 else "float32"
    _keras_setup("recipe", policy, threads)
    from allcnn_lib.models import build_model
    from allcnn_lib.preprocessing import Standardizer, standardize_preprocess
    from allcnn_lib.training import crop_first

    x, y, _, _, source = _data(max(2000, batch * 4))
    preprocess = standardize_preprocess(Standardizer().fit(x))
    model = _keras_model(len(x) // batch, input_shape=(None, None, 3))
    times: dict[int, list[float]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side in sides:
            ds = _train_dataset(x, y, batch, preprocess, repeat=True)
            if side < x.shape[1]:
                ds = crop_first(ds, side, 2**31 - 1)
            timer = batch_timer()
            model.fit(ds, epochs=1, steps_per_epoch=steps + warmup, callbacks=[timer],
                      verbose=0, shuffle=False)
            times[side] += timer.times[warmup:]
    macs = {side: conv_macs(build_model("allcnn", batch_norm=True, dropout=False,
                                        input_shape=(side, side, 3))) for side in sides}
    stats = {side: spread(times[side], batch) for side in sides}
    return [{"side": side, **stats[side], "batch_size": batch, "precision": policy,
             "data": source, "conv_macs_per_image": macs[side],
             "speedup": stats[side]["images_per_s"] / stats[sides[0]]["images_per_s"],
             "ideal_speedup": macs[sides[0]] / macs[side]} for side in sides]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 28, 24, 20, 16],
                        help="crop sides; the first is the reference")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS_DIR / "crops.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from allcnn_lib.recipes import cpu_has_bf16

    bf16, started, load_before = bool(cpu_has_bf16()), time.perf_counter(), os.getloadavg()
    rows = measure(args.sides, args.batch, args.steps, args.warmup, args.rounds, args.threads,
                   bf16)
    result = {"benchmark": "bench_crops", "date": now(), "machine": cpu_info(),
              "versions": versions(), "threads": args.threads, "batch_size": args.batch,
              "steps_per_side": args.steps * args.rounds, "warmup": args.warmup,
              "rounds": args.rounds,
              "statistic": "median seconds per step -> images/s; spread = min/quartiles/max",
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "seconds": time.perf_counter() - started, "rows": rows}
    write_json(Path(args.out), result)
    print(f"{result['machine'].get('model', '?')}, {rows[0]['precision']}, batch {args.batch}, "
          f"{args.steps * args.rounds} steps per side; load {load_before[0]:.1f} -> "
          f"{result['load_average_after'][0]:.1f}")
    print("side  images/s  (step s min-max)   speed-up  ideal (conv MACs)")
    for r in rows:
        print(f"{r['side']:4d}  {r['images_per_s']:8.1f}  ({r['min_step_s']:.2f}-"
              f"{r['max_step_s']:.2f})  {r['speedup']:8.2f}x  {r['ideal_speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
