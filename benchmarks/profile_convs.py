"""Where the recipe's bfloat16 training step spends its time: each convolution of All-CNN-C
timed alone, in TensorFlow and in PyTorch, against the bfloat16 dot-product peak.

The recipe path (``bench_recipe.py``) and the hand-written PyTorch loop both reach about 70%
of the ``vdpbf16ps`` loop. This script asks whether the convolution kernels themselves set
that ceiling: for each ``Conv2D`` of the recipe's model (``build_model("allcnn",
batch_norm=True)``: shapes, strides and padding read from the model) it times the three
products a training step needs, on random bfloat16 tensors at the recipe's batch:

- ``forward``: the convolution (``tf.nn.conv2d`` / ``torch.nn.functional.conv2d``);
- ``backward data``: the gradient with respect to the layer's input
  (``Conv2DBackpropInput`` / ``aten.convolution_backward``); conv1 needs none in training;
- ``backward filter``: the gradient with respect to the kernel.

Each framework runs in its own process with ``--threads`` threads (PyTorch: channels_last
tensors, TensorFlow: NHWC, both through oneDNN). The sum over the layers is the step's
convolution time; ``make_report.py`` sets it against the whole step of ``recipe.json``, so
what is left (batch norm, ReLU, casts, loss, optimizer, EMA, input) shows beside it.

    .venv/bin/python benchmarks/profile_convs.py [--batch 256] [--steps 10]

Prints a table; writes ``benchmarks/results/profile_convs.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common import (
    RESULTS_DIR,
    bf16_peak,
    cpu_info,
    now,
    run_child,
    step_times,
    versions,
    write_json,
)

PRODUCTS = ("forward", "backward data", "backward filter")


def tf_child(batch: int, steps: int, warmup: int, threads: int) -> None:
    """Print one JSON line per conv layer: its shape and the median seconds of each product."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras

    from allcnn_lib.models import build_model

    model = build_model("allcnn", batch_norm=True, dropout=False, weight_decay=0.0)
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Conv2D):
            continue
        (_, h, w, cin), (_, oh, ow, cout) = layer.input.shape, layer.output.shape
        (kh, kw), s, pad = layer.kernel_size, layer.strides[0], layer.padding.upper()
        x = tf.random.normal((batch, h, w, cin), dtype=tf.bfloat16)
        k = tf.random.normal((kh, kw, cin, cout), dtype=tf.bfloat16) * 0.05
        dy = tf.random.normal((batch, oh, ow, cout), dtype=tf.bfloat16)
        ops = _tf_products(x, k, dy, s, pad)
        row = {"layer": layer.name, "in": [h, w, cin], "out": [oh, ow, cout],
               "kernel": [kh, kw], "stride": s, "padding": pad}
        for name, op in ops.items():
            fn = tf.function(op)
            row[name] = _median(step_times(lambda fn=fn: fn().numpy(), steps, warmup))
        print(json.dumps(row), flush=True)


def _tf_products(x, k, dy, stride: int, padding: str) -> dict:
    """The three products of one convolution as TensorFlow callables."""
    import tensorflow as tf

    strides = [1, stride, stride, 1]
    return {"forward": lambda: tf.nn.conv2d(x, k, stride, padding),
            "backward data": lambda: tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(x), filter=k, out_backprop=dy, strides=strides,
                padding=padding),
            "backward filter": lambda: tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=tf.shape(k), out_backprop=dy, strides=strides,
                padding=padding)}


def torch_child(layers: list[dict], batch: int, steps: int, warmup: int, threads: int) -> None:
    """The same products with PyTorch's bfloat16 channels_last convolutions."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    last = torch.channels_last
    for spec in layers:
        (h, w, cin), (oh, ow, cout), (kh, kw) = spec["in"], spec["out"], spec["kernel"]
        s = spec["stride"]
        pad = kh // 2 if spec["padding"] == "SAME" else 0
        x = torch.randn(batch, cin, h, w).to(memory_format=last).bfloat16()
        k = (torch.randn(cout, cin, kh, kw) * 0.05).to(memory_format=last).bfloat16()
        dy = torch.randn(batch, cout, oh, ow).to(memory_format=last).bfloat16()

        def backward(mask: list[bool], x=x, k=k, dy=dy, s=s, pad=pad):
            return torch.ops.aten.convolution_backward(
                dy, x, k, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1, mask)

        ops = {"forward": lambda x=x, k=k, s=s, pad=pad: F.conv2d(x, k, stride=s, padding=pad),
               "backward data": lambda: backward([True, False, False]),
               "backward filter": lambda: backward([False, True, False])}
        row = {key: spec[key] for key in ("layer", "in", "out", "kernel", "stride", "padding")}
        with torch.no_grad():
            for name, op in ops.items():
                row[name] = _median(step_times(op, steps, warmup))
        print(json.dumps(row), flush=True)


def _median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def gflop(row: dict, batch: int) -> float:
    """FLOP of one product of this layer for a batch (each product costs the same)."""
    (oh, ow, cout), (kh, kw), cin = row["out"], row["kernel"], row["in"][2]
    return 2 * batch * oh * ow * kh * kw * cin * cout / 1e9


def main(argv: list[str] | None = None) -> int:
    """Run both children, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", choices=("tf", "torch"))
    parser.add_argument("--layers", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS_DIR / "profile_convs.json"))
    args = parser.parse_args(argv)
    common = [str(a) for a in ("--batch", args.batch, "--steps", args.steps, "--warmup",
                               args.warmup, "--threads", args.threads)]
    if args.child == "tf":
        tf_child(args.batch, args.steps, args.warmup, args.threads)
        return 0
    if args.child == "torch":
        torch_child(json.loads(args.layers), args.batch, args.steps, args.warmup, args.threads)
        return 0

    peak_file = RESULTS_DIR / "peak.json"
    peak = bf16_peak(json.loads(peak_file.read_text()) if peak_file.exists() else None)
    load_before, script = os.getloadavg(), str(Path(__file__).resolve())
    env = {"OMP_NUM_THREADS": str(args.threads)}
    frameworks = {"tensorflow": run_child([script, "--child", "tf", *common], env,
                                          all_rows=True)}
    layers = json.dumps([{k: r[k] for k in ("layer", "in", "out", "kernel", "stride",
                                            "padding")} for r in frameworks["tensorflow"]])
    try:
        frameworks["torch"] = run_child([script, "--child", "torch", "--layers", layers,
                                         *common], env, all_rows=True)
    except (RuntimeError, OSError) as err:  # no PyTorch here: TensorFlow's column alone
        print(f"torch: {str(err).splitlines()[0]}")
    print(f"bfloat16 convolutions of All-CNN-C, batch {args.batch}, median of {args.steps}; "
          f"bf16 peak {peak or float('nan'):.0f} GFLOP/s; % of peak per framework")
    print(f"{'layer':8s} {'product':16s} " + " ".join(f"{f:>16s}" for f in frameworks))
    totals = {f: 0.0 for f in frameworks}
    for i, tf_row in enumerate(frameworks["tensorflow"]):
        for product in PRODUCTS:
            if i == 0 and product == "backward data":
                continue  # the input image needs no gradient
            cells = []
            for f, rows in frameworks.items():
                t = rows[i][product]
                totals[f] += t
                rate = gflop(tf_row, args.batch) / t
                cells.append(f"{t * 1e3:7.1f} ms {100 * rate / peak if peak else 0:4.0f}%")
            print(f"{tf_row['layer']:8s} {product:16s} " + " ".join(f"{c:>16s}" for c in cells))
    step_gflop = sum(gflop(r, args.batch) * (2 if i == 0 else 3)
                     for i, r in enumerate(frameworks["tensorflow"]))
    for f, t in totals.items():
        print(f"{f}: the step's convolutions {t:.3f} s, {step_gflop / t:.0f} GFLOP/s"
              + (f", {100 * step_gflop / t / peak:.0f}% of the bf16 peak" if peak else ""))
    write_json(Path(args.out), {
        "benchmark": "bfloat16 convolution profile", "date": now(), "machine": cpu_info(),
        "versions": versions(), "batch_size": args.batch, "steps": args.steps,
        "threads": args.threads, "peak_gflops": peak, "step_conv_gflop": step_gflop,
        "conv_seconds": totals, "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "frameworks": frameworks})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
