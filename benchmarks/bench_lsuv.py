"""Time LSUV (Mishkin & Matas 2015, Algorithm 1) on All-CNN-C: ``allcnn_lib.initializers.lsuv``
against ``lsuv_repository_rebuild``, the original repository's approach (a new probe model and a
``predict`` from the input image on every iteration of every layer), written here as in
notebook 03.

    .venv/bin/python benchmarks/bench_lsuv.py [--images 256] [--repeats 3] [--repository-repeats 3]

Each run builds a fresh All-CNN-C (paper variant) and initializes it on the same batch of real
CIFAR-10 training images (per-channel standardized). For scale, the table also times one plain
forward pass of the whole network on that batch: LSUV cannot be cheaper than that. Prints a
table and writes ``benchmarks/results/lsuv.json``. Timings depend on the machine and on what
else runs on it; the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from allcnn_lib.data import load_cifar10  # noqa: E402
from allcnn_lib.initializers import lsuv  # noqa: E402
from allcnn_lib.models import all_cnn_c  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lsuv.json"
TARGET_S = 2.0  # the goal for ours on the 2-core development machine


def repository_orthonormal(shape, rng: np.random.Generator) -> np.ndarray:
    """The original repository's (and LSUV-keras') ``svd_orthonormal``: it flattens to
    ``(shape[0], rest)``, right for Theano's (cout, cin, kh, kw) kernels, wrong for Keras'
    (kh, kw, cin, cout)."""
    flat_shape = (shape[0], math.prod(shape[1:]))
    u, _, v = np.linalg.svd(rng.standard_normal(flat_shape), full_matrices=False)
    return (u if u.shape == flat_shape else v).reshape(shape).astype(np.float32)


def lsuv_repository_rebuild(model: keras.Model, batch, *, tol_var: float = 0.1, t_max: int = 10,
                            seed: int | None = None) -> dict[str, dict[str, float]]:
    """The original repository's LSUV (after LSUV-keras), slow by design: it skips layers with
    fewer than 32 outputs per image, pre-initializes with ``repository_orthonormal``, and builds
    a new model and calls ``predict`` to measure Var on every iteration. Returns ``lsuv``'s
    report."""
    rng = np.random.default_rng(seed)
    report = {}
    for layer in model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) \
                or math.prod(layer.output.shape[1:]) < 32:
            continue
        layer.kernel.assign(repository_orthonormal(layer.kernel.shape, rng))
        probe = keras.Model(model.inputs, layer.output)
        var = var_before = float(np.var(probe.predict(batch, verbose=0)))
        iterations, scale = 0, 1.0
        while abs(var - 1.0) > tol_var and iterations < t_max and math.sqrt(var) >= 1e-7:
            layer.kernel.assign(layer.kernel / math.sqrt(var))
            scale, iterations = scale / math.sqrt(var), iterations + 1
            probe = keras.Model(model.inputs, layer.output)  # rebuilt, as the original does
            var = float(np.var(probe.predict(batch, verbose=0)))
        report[layer.name] = {"var_before": var_before, "var_after": var,
                              "iterations": iterations, "scale": scale}
    return report


def lsuv_table(report: dict[str, dict[str, float]]) -> str:
    """An aligned text table of an ``lsuv`` report, one line per layer."""
    lines = [f"{'layer':8s} {'Var before':>10s} {'Var after':>10s} {'divisions':>9s} "
             f"{'scale':>7s}"]
    lines += [f"{name:8s} {r['var_before']:10.4g} {r['var_after']:10.4f} "
              f"{r['iterations']:9d} {r['scale']:7.4g}" for name, r in report.items()]
    return "\n".join(lines)


def real_batch(images: int) -> tuple[np.ndarray, str]:
    """``images`` real training images, per-channel standardized with the batch's statistics."""
    data = load_cifar10(limit=max(10 * images, 2000), validation_size=0, verbose=False)
    x = data.x_train[:images].astype(np.float32) / 255.0
    x = (x - x.mean(axis=(0, 1, 2))) / x.std(axis=(0, 1, 2))
    source = "shipped sample" if data.is_sample else "full CIFAR-10"
    return x.astype(np.float32), source


def fresh_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return all_cnn_c(variant="paper")


def time_runs(label: str, fn, repeats: int) -> list[float]:
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        seconds.append(time.perf_counter() - start)
        print(f"  {label} run {i + 1}/{repeats}: {seconds[-1]:.2f} s", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repository-repeats", type=int, default=3,
                        help="runs of the original repository's slow version (0 skips it)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    x, source = real_batch(args.images)
    print(f"All-CNN-C, {len(x)} real images ({source}), backend {keras.backend.backend()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)

    model = fresh_model(0)
    model(x[:8], training=False)  # warm-up: kernels, thread pools
    forward = time_runs("forward pass", lambda i: model(x, training=False), args.repeats)

    reports = {}

    def timed(key: str, method, repeats: int) -> list[float]:
        """Model building is not LSUV: time the call alone, on a fresh model each run."""
        seconds = []
        for i in range(repeats):
            m = fresh_model(i)
            start = time.perf_counter()
            reports[key] = method(m, x, seed=i)
            seconds.append(time.perf_counter() - start)
            print(f"  {method.__name__} run {i + 1}/{repeats}: {seconds[-1]:.2f} s", flush=True)
        return seconds

    ours_s = timed("lsuv", lsuv, args.repeats)
    repository_s = timed("repository", lsuv_repository_rebuild, args.repository_repeats)

    med = {"forward": statistics.median(forward), "lsuv": statistics.median(ours_s)}
    if repository_s:
        med["lsuv_repository_rebuild"] = statistics.median(repository_s)
    rows = [("one forward pass", forward), ("lsuv (ours)", ours_s)]
    if repository_s:
        rows.append(("lsuv_repository_rebuild", repository_s))

    print()
    print(lsuv_table(reports["lsuv"]))
    if repository_s:
        print()
        print(lsuv_table(reports["repository"]))
    print()
    print(f"{'':20s} {'median s':>9s} {'runs':>22s}  {'x forward':>9s}")
    for label, secs in rows:
        runs = ", ".join(f"{s:.2f}" for s in secs)
        print(f"{label:20s} {statistics.median(secs):9.2f} {runs:>22s}  "
              f"{statistics.median(secs) / med['forward']:9.2f}")
    if repository_s:
        print(f"speed-up of lsuv over the original repository's rebuild-every-iteration: "
              f"{med['lsuv_repository_rebuild'] / med['lsuv']:.1f}x")
    print(f"target for lsuv: <= {TARGET_S:.1f} s -> "
          f"{'met' if med['lsuv'] <= TARGET_S else 'not met'} on this machine now")

    result = {
        "benchmark": "lsuv on All-CNN-C (paper variant)",
        "images": len(x),
        "data": source,
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "seconds": {"forward": forward, "lsuv": ours_s, "lsuv_repository_rebuild": repository_s},
        "median_seconds": med,
        "speedup": (med["lsuv_repository_rebuild"] / med["lsuv"]) if repository_s else None,
        "target_seconds": TARGET_S,
        "reports": reports,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
