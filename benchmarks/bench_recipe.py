"""The fast recipe's training path (batch norm, mixed_bfloat16, batch 256-512) side by side with
a hand-written PyTorch loop of the same network, and a whole epoch of the recipe with its
breakdown.

Variants (``--variants``), each in its own process with ``--threads`` threads (TensorFlow's
intra- and inter-op pools, ``torch.set_num_threads``, ``OMP_NUM_THREADS``), each batch size on a
newly built model:

- ``recipe``: what ``allcnn train --recipe fast`` trains: ``build_model("allcnn",
  batch_norm=True, dropout=False, weight_decay=...)`` with the recipe's L2 (2.5e-4;
  ``FusedBatchNormalization``) under
  ``mixed_bfloat16`` where the CPU has AVX512_BF16 or AMX (float32 elsewhere), compiled with
  the recipe's optimizer (SGD Nesterov, one-cycle lr 0.4, the preset's EMA setting) and loss
  (label smoothing 0.2), fed by ``make_dataset(training=True, augment=True)`` with per-channel
  standardization, 4 px reflect-padded shifts, flips and one-hot labels, through
  ``model.fit``. Images/s is the median of the per-batch times (callbacks) after the warm-up;
  ``pipeline`` is the same ``make_dataset`` alone (``next()`` on its iterator).
- ``recipe-stock-bn``: the same with ``keras.layers.BatchNormalization`` in place of the fused
  layer (``allcnn_lib.models.FusedBatchNormalization`` patched in that process): the fused
  layer's gain, measured in the same run.
- ``torch-loop``: the same network by hand in PyTorch: nine convs without bias, each followed
  by ``BatchNorm2d`` and ReLU, conv7 ``valid``, global average pooling; ``channels_last``,
  ``torch.autocast("cpu", torch.bfloat16)`` (float32 where the Keras path is float32), SGD
  Nesterov momentum 0.9, weight decay 2 x the recipe's L2 on the conv kernels only, label
  smoothing 0.2, one standardized batch held in memory (the bare step; no EMA).
- ``torch-compile``: the same loop through ``torch.compile`` (its first step, compilation
  included, is ``compile_s``); an exception is recorded as the row's ``error``.

FLOP per training image: 3 x 2 x the forward multiply-adds of the conv layers, counted from
each model (``common.conv_macs``; the torch loop counts its own); the fraction divides by the
``vdpbf16ps`` loop of ``peak.json`` (``bench_peak.py``) for bfloat16 rows, by the FMA loop for
float32 rows.

``--epoch``: a whole epoch of the recipe at its batch (512): ``model.fit`` for one epoch of
the 45,000 training images with the 5,000-image validation pass, timed from the call to its
return, with the callbacks ``train()`` uses (CSV loggers, best/last checkpoints, backup,
epoch log; written to a temporary folder) between two timing callbacks. The fit follows a
short warm-up fit (2 steps, 1 validation batch: the graph tracing of a run's first epoch,
reported as ``warmup_fit_s``), so the timed epoch is any later epoch of a run. Its breakdown:
set-up, train steps (first step, step time above the epoch's median), batch callbacks, gaps
between a batch's end and the next batch's begin, validation, epoch-end callbacks and
checkpoints, train end (EMA copy). In Keras 3 on TensorFlow the input iterator's ``get_next``
runs inside the step's function, so a wait for the pipeline shows as step time above the
median, not as a gap; ``pipeline_epoch_s`` is the same pipeline alone for one epoch. The report
sets the epoch against 45,000 / the steady-state images/s of the ``recipe`` row at that batch.

Prints a table; writes ``benchmarks/results/recipe.json``.

    .venv/bin/python benchmarks/bench_recipe.py --epoch   # ~14 min on 2 cores (2026-11-30)
    .venv/bin/python benchmarks/bench_recipe.py --variants recipe torch-loop --batches 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (
    REPO,
    RESULTS_DIR,
    batch_timer,
    bf16_peak,
    conv_macs,
    cpu_info,
    fma_peak,
    now,
    run_child,
    spread,
    step_times,
    tiled,
    versions,
    write_json,
)

VARIANTS = ("recipe", "recipe-stock-bn", "torch-loop", "torch-compile")
#: The fast recipe's settings that a speed measurement depends on (``RECIPES["fast"]``).
RECIPE_KEYS = ("batch_norm", "dropout", "weight_decay", "label_smoothing", "max_shift",
               "shift_fill", "learning_rate", "batch_size", "ema", "epochs", "mixed_precision")
#: Training and validation images of a whole epoch (the full split of ``load_cifar10``).
EPOCH_IMAGES, VAL_IMAGES = 45_000, 5_000


# --------------------------------------------------------------------------- children


def _fix_threads(threads: int) -> None:
    """TensorFlow's thread pools to ``threads`` (before any op runs)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def _recipe() -> dict:
    from allcnn_lib.recipes import RECIPES

    return RECIPES["fast"]


def _data(n_train: int, n_val: int = 0):
    """uint8 training (and validation) images and labels, tiled from the shipped sample if the
    full set is absent; the source's name."""
    from allcnn_lib.data import load_cifar10

    data = load_cifar10(verbose=False)
    x, y = tiled(data.x_train, data.y_train, n_train)
    xv, yv = tiled(data.x_val, data.y_val, n_val) if n_val else (data.x_val[:0], data.y_val[:0])
    source = "shipped sample (tiled)" if data.is_sample else "full CIFAR-10"
    return x[:n_train], y[:n_train], xv[:n_val], yv[:n_val], source


def _keras_model(steps_per_epoch: int, input_shape: tuple = (32, 32, 3)):
    """The recipe's model, compiled with its optimizer, loss and metric (policy already set);
    ``input_shape=(None, None, 3)``: for any side, as ``train`` builds it for ``crop_epochs``."""
    import keras

    from allcnn_lib.models import build_model
    from allcnn_lib.training import make_optimizer

    r = _recipe()
    model = build_model("allcnn", batch_norm=r["batch_norm"], dropout=r["dropout"],
                        weight_decay=r["weight_decay"], input_shape=input_shape)
    model.compile(
        optimizer=make_optimizer("sgd", learning_rate=r["learning_rate"], schedule="onecycle",
                                 steps_per_epoch=steps_per_epoch, epochs=r["epochs"],
                                 ema=r["ema"]),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=r["label_smoothing"]),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    return model


def _keras_setup(variant: str, policy: str, threads: int) -> None:
    """Threads, op determinism (as ``train()``), the dtype policy and, for
    ``recipe-stock-bn``, Keras' own batch norm in place of the fused layer."""
    _fix_threads(threads)
    import keras

    import allcnn_lib.models as models
    from allcnn_lib.training import seed_everything

    if variant == "recipe-stock-bn":
        models.FusedBatchNormalization = keras.layers.BatchNormalization
    seed_everything(0)
    keras.config.set_dtype_policy(policy)


def _train_dataset(x, y, batch: int, preprocess, repeat: bool):
    from allcnn_lib.training import make_dataset

    r = _recipe()
    return make_dataset(x, y, batch, training=True, augment=True, seed=0,
                        preprocess=preprocess, num_classes=10, max_shift=r["max_shift"],
                        shift_fill=r["shift_fill"], repeat=repeat)


def _bn_layer(model) -> str:
    names = {type(layer).__name__ for layer in model.layers if "Normalization" in
             type(layer).__name__}
    return ", ".join(sorted(names)) or "none"


def _keras_child(variant: str, batches: list[int], steps: int, warmup: int, threads: int,
                 policy: str, images: int) -> list[dict]:
    """Steady-state images/s of the recipe path (``variant`` recipe or recipe-stock-bn)."""
    _keras_setup(variant, policy, threads)

    from allcnn_lib.preprocessing import Standardizer, standardize_preprocess

    x, y, _, _, source = _data(max(images, max(batches)))
    preprocess = standardize_preprocess(Standardizer().fit(x))
    rows = []
    for batch in batches:
        ds = _train_dataset(x, y, batch, preprocess, repeat=True)
        it = iter(ds)
        pipe = spread(step_times(lambda it=it: next(it), steps, warmup), batch)
        del it
        model = _keras_model(max(1, len(x) // batch))
        timer = batch_timer()
        model.fit(ds, epochs=1, steps_per_epoch=steps + warmup, callbacks=[timer], verbose=0)
        times = timer.times
        macs = conv_macs(model)
        rows.append({**spread(times[warmup:], batch), "warmup_step_s": times[:warmup],
                     "batch_size": batch, "precision": policy, "bn_layer": _bn_layer(model),
                     "conv_macs_per_image": macs, "gflop_per_image": 6 * macs / 1e9,
                     "pipeline_images_per_s": pipe["images_per_s"], "data": source,
                     "jit_compile": bool(model.jit_compile)})
    return rows


def _torch_net():
    """All-CNN-C with batch norm in PyTorch (the Keras model's layers, NCHW weights)."""
    from torch import nn

    def block(cin: int, cout: int, k: int, stride: int = 1, pad: int = 1) -> list:
        return [nn.Conv2d(cin, cout, k, stride, pad, bias=False),
                nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 96, 3), *block(96, 96, 3), *block(96, 96, 3, 2),
        *block(96, 192, 3), *block(192, 192, 3), *block(192, 192, 3, 2),
        *block(192, 192, 3, pad=0), *block(192, 192, 1, pad=0), *block(192, 10, 1, pad=0),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _torch_macs(net) -> int:
    """Forward multiply-adds per image of the net's convolutions (one traced image)."""
    import torch
    from torch import nn

    total = [0]

    def hook(mod, _inp, out):
        kh, kw = mod.kernel_size
        total[0] += (out.shape[2] * out.shape[3] * kh * kw * mod.in_channels
                     * mod.out_channels // mod.groups)

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net.eval()
        net(torch.zeros(1, 3, 32, 32))
        net.train()
    for h in handles:
        h.remove()
    return total[0]


def _torch_child(variant: str, batches: list[int], steps: int, warmup: int, threads: int,
                 bf16: bool) -> list[dict]:
    """Steady-state images/s of the hand-written loop (eager or ``torch.compile``)."""
    import numpy as np
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, y, _, _, source = _data(max(batches))
    mean = x.reshape(-1, 3).mean(0, dtype=np.float64)
    std = x.reshape(-1, 3).std(0, dtype=np.float64)
    r = _recipe()
    rows = []
    for batch in batches:
        xb = torch.from_numpy(((x[:batch] - mean) / std).astype(np.float32)).permute(0, 3, 1, 2)
        xb = xb.contiguous(memory_format=torch.channels_last)
        yb = torch.from_numpy(y[:batch].astype(np.int64))
        net = _torch_net()
        macs = _torch_macs(net)
        net = net.to(memory_format=torch.channels_last).train()
        kernels = [p for p in net.parameters() if p.ndim == 4]
        others = [p for p in net.parameters() if p.ndim != 4]
        opt = torch.optim.SGD([{"params": kernels, "weight_decay": 2 * r["weight_decay"]},
                               {"params": others, "weight_decay": 0.0}],
                              lr=r["learning_rate"], momentum=0.9, nesterov=True)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=r["label_smoothing"])
        row: dict[str, object] = {
            "batch_size": batch, "precision": "bfloat16 autocast" if bf16 else "float32",
            "conv_macs_per_image": macs, "gflop_per_image": 6 * macs / 1e9, "data": source,
            "threads": torch.get_num_threads(), "channels_last": True}
        try:
            model = torch.compile(net) if variant == "torch-compile" else net

            def step(model=model, opt=opt, xb=xb, yb=yb, loss_fn=loss_fn) -> None:
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = model(xb)
                loss = loss_fn(logits.float(), yb)
                loss.backward()
                opt.step()
                loss.item()

            t0 = time.perf_counter()
            step()
            row["first_step_s"] = time.perf_counter() - t0
            if variant == "torch-compile":
                row["compile_s"] = row["first_step_s"]
            row.update(spread(step_times(step, steps, max(0, warmup - 1)), batch))
        except Exception as err:  # torch.compile may not work on this CPU: record why
            row["error"] = f"{type(err).__name__}: {err}"[:3000]
        rows.append(row)
    return rows


class _Marks:
    """Timestamps of Keras callback events, shared by the first and the last callback."""

    def __init__(self) -> None:
        self.events: dict[tuple[str, str], list[float]] = {}

    def callback(self, tag: str):
        """A callback that records every event it sees under ``(tag, event)``."""
        import keras

        marks = self

        class Mark(keras.callbacks.Callback):
            pass

        for event in ("train_begin", "epoch_begin", "train_batch_begin", "train_batch_end",
                      "test_begin", "test_end", "epoch_end", "train_end"):
            def hook(self, *args, _event=event, **kwargs):
                marks.events.setdefault((tag, _event), []).append(time.perf_counter())
            setattr(Mark, f"on_{event}", hook)
        return Mark()

    def __call__(self, tag: str, event: str) -> list[float]:
        return self.events.get((tag, event), [])


def _library_callbacks(folder: Path) -> list:
    """The callbacks ``allcnn_lib.training.train`` gives ``fit`` (not on a terminal, no epoch
    line), writing into ``folder``."""
    from allcnn_lib.training import run_callbacks

    return run_callbacks(folder, folder / "backup", verbose=True)


def _epoch_child(batch: int, images: int, val_images: int, threads: int, policy: str
                 ) -> dict:
    """One whole epoch of the recipe through ``model.fit``, with its breakdown."""
    _keras_setup("recipe", policy, threads)
    from allcnn_lib.preprocessing import Standardizer, standardize_preprocess
    from allcnn_lib.training import make_dataset

    x, y, xv, yv, source = _data(images, val_images)
    preprocess = standardize_preprocess(Standardizer().fit(x))
    train_ds = _train_dataset(x, y, batch, preprocess, repeat=False)
    val_ds = make_dataset(xv, yv, batch, preprocess=preprocess, num_classes=10)
    steps = len(x) // batch
    model = _keras_model(steps)
    t0 = time.perf_counter()
    model.fit(train_ds, validation_data=val_ds, epochs=1, steps_per_epoch=min(2, steps),
              validation_steps=1, verbose=0)
    warmup_fit = time.perf_counter() - t0

    marks = _Marks()
    with tempfile.TemporaryDirectory(prefix="allcnn-bench-epoch-") as tmp:
        callbacks = [marks.callback("a"), *_library_callbacks(Path(tmp)), marks.callback("z")]
        load_before = os.getloadavg()
        t_call = time.perf_counter()
        model.fit(train_ds, validation_data=val_ds, epochs=1, callbacks=callbacks, verbose=0,
                  shuffle=False)
        t_return = time.perf_counter()
        files = {p.name: p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()}
    load_after = os.getloadavg()

    t0 = time.perf_counter()
    n_pipe = sum(1 for _ in train_ds)
    pipeline_epoch = time.perf_counter() - t0

    a_bb, z_bb = marks("a", "train_batch_begin"), marks("z", "train_batch_begin")
    a_be, z_be = marks("a", "train_batch_end"), marks("z", "train_batch_end")
    step_s = [end - begin for begin, end in zip(z_bb, a_be, strict=True)]
    median = statistics.median(step_s)
    val_begin, val_end = marks("a", "test_begin")[0], marks("z", "test_end")[0]
    parts = {
        "setup_s": a_bb[0] - t_call,
        "steps_s": sum(step_s),
        "first_step_s": step_s[0],
        "steps_above_median_s": sum(max(0.0, s - median) for s in step_s),
        "batch_callbacks_s": sum(z - a for a, z in zip(a_bb, z_bb, strict=True))
        + sum(z - a for a, z in zip(a_be, z_be, strict=True)),
        "gaps_between_batches_s": sum(nxt - end for end, nxt in zip(z_be, a_bb[1:], strict=False)),
        "to_validation_s": val_begin - z_be[-1],
        "validation_s": val_end - val_begin,
        "epoch_end_callbacks_s": marks("z", "epoch_end")[0] - val_end,
        "train_end_s": t_return - marks("z", "epoch_end")[0],
    }
    total = t_return - t_call
    parts["unaccounted_s"] = total - sum(v for k, v in parts.items()
                                         if k not in ("first_step_s", "steps_above_median_s"))
    return {"batch_size": batch, "precision": policy, "bn_layer": _bn_layer(model),
            "train_images": len(x), "val_images": len(xv), "steps": len(step_s),
            "images_trained": len(step_s) * batch, "data": source, "fit_s": total,
            "warmup_fit_s": warmup_fit, "median_step_s": median,
            "own_steady_images_per_s": batch / median,
            "own_ideal_s": len(x) / (batch / median), **parts,
            "pipeline_epoch_s": pipeline_epoch, "pipeline_batches": n_pipe,
            "files_written": files, "step_times_s": step_s,
            "load_average_before": load_before, "load_average_after": load_after}


def child(variant: str, spec: dict) -> list[dict]:
    """Measure one variant in this process; its rows."""
    load_before = os.getloadavg()
    policy = "mixed_bfloat16" if spec["bf16"] else "float32"
    if variant == "epoch":
        rows = [_epoch_child(spec["epoch_batch"], spec["epoch_images"], spec["val_images"],
                             spec["threads"], policy)]
    elif variant.startswith("torch"):
        rows = _torch_child(variant, spec["batches"], spec["steps"], spec["warmup"],
                            spec["threads"], spec["bf16"])
    else:
        rows = _keras_child(variant, spec["batches"], spec["steps"], spec["warmup"],
                            spec["threads"], policy, spec["images"])
    return [{"variant": variant, **r, "load_average_before": r.get("load_average_before",
                                                                   load_before),
             "load_average_after": r.get("load_average_after", os.getloadavg())}
            for r in rows]


# --------------------------------------------------------------------------- parent


def peak_for(precision: str, peak: dict | None) -> tuple[str, float | None]:
    """The ceiling a row of ``precision`` is measured against: the bfloat16 dot-product loop
    for bfloat16 rows, the FMA loop for float32 ones (GFLOP/s per CPU second)."""
    if "bfloat16" in precision:
        return "bf16 dot loop", bf16_peak(peak)
    return "fma loop", fma_peak(peak)


def print_table(result: dict) -> None:
    """The rows, the ratios the targets use, and the epoch's breakdown."""
    print(f"\n{'variant':16s} {'precision':18s} {'batch':>5s} {'img/s':>7s} {'GFLOP/s':>8s} "
          f"{'% peak':>7s} {'step s min-max':>15s}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['variant']:16s} {r['precision']:18s} {r['batch_size']:5d}  error: "
                  f"{r['error'].splitlines()[0][:70]}")
            continue
        frac = r.get("fraction_of_peak")
        print(f"{r['variant']:16s} {r['precision']:18s} {r['batch_size']:5d} "
              f"{r['images_per_s']:7.1f} {r['gflops']:8.1f} "
              f"{'-' if frac is None else f'{100 * frac:6.0f}%':>7s} "
              f"{r['min_step_s']:7.3f}-{r['max_step_s']:<7.3f}")
    for key, label in (("recipe_over_torch", "recipe / torch-loop"),
                       ("recipe_over_torch_compile", "recipe / torch-compile"),
                       ("fused_over_stock_bn", "fused / stock batch norm")):
        if result["ratios"].get(key):
            print(f"{label}: " + ", ".join(f"{v:.2f}x (b{b})"
                                           for b, v in result["ratios"][key].items()))
    ep = result.get("epoch")
    if ep and "error" not in ep:
        print(f"\nwhole epoch, {ep['train_images']} + {ep['val_images']} images, batch "
              f"{ep['batch_size']}: fit {ep['fit_s']:.1f} s (warm-up fit before it "
              f"{ep['warmup_fit_s']:.1f} s)")
        for k in ("setup_s", "steps_s", "first_step_s", "steps_above_median_s",
                  "batch_callbacks_s", "gaps_between_batches_s", "to_validation_s",
                  "validation_s", "epoch_end_callbacks_s", "train_end_s", "unaccounted_s"):
            print(f"  {k.removesuffix('_s'):24s} {ep[k]:8.2f} s")
        if ep.get("ideal_s"):
            print(f"  {ep['train_images']} / steady-state {ep['steady_images_per_s']:.1f} "
                  f"img/s = {ep['ideal_s']:.1f} s; the epoch takes "
                  f"{ep['fit_s'] / ep['ideal_s']:.2f}x that")
        print(f"  pipeline alone, one epoch: {ep['pipeline_epoch_s']:.1f} s")
    elif ep:
        print(f"\nwhole epoch: error: {ep['error'].splitlines()[0][:100]}")


def main(argv: list[str] | None = None) -> int:
    """Run each variant in a fresh process; print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median; >= 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=EPOCH_IMAGES,
                        help="training images behind the steady-state pipeline")
    parser.add_argument("--precision", choices=("auto", "mixed_bfloat16", "float32"),
                        default="auto", help="auto: mixed_bfloat16 where the CPU has "
                        "AVX512_BF16 or AMX (as the recipe), float32 elsewhere")
    parser.add_argument("--epoch", action="store_true",
                        help="also time a whole epoch of the recipe (~4-5 min on 2 cores)")
    parser.add_argument("--epoch-images", type=int, default=EPOCH_IMAGES)
    parser.add_argument("--val-images", type=int, default=VAL_IMAGES)
    parser.add_argument("--epoch-batch", type=int, default=None,
                        help="batch of the whole epoch (default: the recipe's, 512)")
    parser.add_argument("--peak", default=str(RESULTS_DIR / "peak.json"),
                        help="bench_peak.py's result: the ceilings of the fractions")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds one variant's process may take")
    parser.add_argument("--out", default=str(RESULTS_DIR / "recipe.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        for row in child(args.child, json.loads(args.spec)):
            print(json.dumps(row), flush=True)
        return 0
    if args.steps < 20:
        print(f"note: --steps {args.steps} < 20: a smoke run, not the benchmark")

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from allcnn_lib.recipes import RECIPES, cpu_has_bf16

    machine, hw_bf16 = cpu_info(), bool(cpu_has_bf16())
    bf16 = hw_bf16 if args.precision == "auto" else args.precision == "mixed_bfloat16"
    recipe = {k: RECIPES["fast"].get(k) for k in RECIPE_KEYS}
    spec = {"batches": args.batches, "steps": args.steps, "warmup": args.warmup,
            "threads": args.threads, "bf16": bf16, "images": args.images,
            "epoch_batch": args.epoch_batch or recipe["batch_size"],
            "epoch_images": args.epoch_images, "val_images": args.val_images}
    peak_path = Path(args.peak)
    peak = json.loads(peak_path.read_text()) if peak_path.exists() else None
    t = str(args.threads)
    env = {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t,
           "KERAS_BACKEND": "tensorflow"}
    order = [v for v in ("recipe", "torch-loop", "recipe-stock-bn", "torch-compile")
             if v in args.variants] + (["epoch"] if args.epoch else [])
    started, load_before = time.perf_counter(), os.getloadavg()
    rows: list[dict] = []
    result: dict = {}

    def finish(done: bool) -> None:
        by = {(r["variant"], r["batch_size"]): r for r in rows if "error" not in r}
        for r in rows:
            if "error" in r or "images_per_s" not in r:
                continue
            kind, ceiling = peak_for(r["precision"], peak)
            r["gflops"] = r["images_per_s"] * r["gflop_per_image"]
            r["peak"], r["peak_gflops"] = kind, ceiling
            r["fraction_of_peak"] = r["gflops"] / ceiling if ceiling else None
        ratios: dict[str, dict[int, float]] = {}
        for key, num, den in (("recipe_over_torch", "recipe", "torch-loop"),
                              ("recipe_over_torch_compile", "recipe", "torch-compile"),
                              ("fused_over_stock_bn", "recipe", "recipe-stock-bn")):
            ratios[key] = {b: by[(num, b)]["images_per_s"] / by[(den, b)]["images_per_s"]
                           for b in args.batches if (num, b) in by and (den, b) in by}
        result.update({
            "benchmark": "bench_recipe", "date": now(), "machine": machine,
            "versions": versions(), "threads": args.threads, "bf16_hardware": hw_bf16,
            "precision": "mixed_bfloat16" if bf16 else "float32", "recipe": recipe,
            "batches": args.batches, "steps": args.steps, "warmup": args.warmup,
            "statistic": "median seconds per step -> images/s; spread = min/quartiles/max",
            "peak_file": (str(peak_path.resolve().relative_to(REPO))
                          if peak_path.resolve().is_relative_to(REPO) else peak_path.name),
            "peak_date": (peak or {}).get("date"),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "seconds": time.perf_counter() - started, "complete": done,
            "rows": rows, "ratios": ratios})
        ep = result.get("epoch")
        if ep and "error" not in ep:
            steady = by.get(("recipe", ep["batch_size"]))
            ips = steady["images_per_s"] if steady else ep["own_steady_images_per_s"]
            ep["steady_source"] = ("recipe row" if steady else "the epoch's own median step")
            ep["steady_images_per_s"] = ips
            ep["ideal_s"] = ep["train_images"] / ips
            ep["over_ideal"] = ep["fit_s"] / ep["ideal_s"] - 1
        write_json(Path(args.out), result)

    for variant in order:
        t0 = time.perf_counter()
        try:
            new = run_child([__file__, "--child", variant, "--spec", json.dumps(spec)],
                            env=env, timeout=args.timeout, all_rows=True)
        except Exception as err:  # a failed variant is recorded, the others still run
            new = [{"variant": variant, "error": f"{type(err).__name__}: {err}"[-3000:],
                    "batch_size": spec["epoch_batch"], "precision": "?"}]
            if variant != "epoch":
                new = [{**new[0], "batch_size": b} for b in args.batches]
        for r in new:
            r["process_s"], r["date"] = time.perf_counter() - t0, now()
        if variant == "epoch":
            result["epoch"] = new[0]
        else:
            rows.extend(new)
        print(f"{variant}: {time.perf_counter() - t0:.0f} s", flush=True)
        finish(False)
    finish(True)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
