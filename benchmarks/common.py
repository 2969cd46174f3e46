"""Shared helpers of the benchmark scripts: timing statistics, machine facts, JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
#: Forward + backward FLOP of one 32x32 All-CNN-C (paper variant) training image:
#: 0.271 GMAC forward, x2 FLOP per MAC, x3 for forward + both backward products.
TRAIN_GFLOP_PER_IMAGE = 1.62
#: Forward-only FLOP of one image (inference).
INFER_GFLOP_PER_IMAGE = 0.542


def step_times(step: Callable[[], object], steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def spread(times: Sequence[float], batch: int) -> dict[str, float]:
    """images/s at the median step time, plus the min, quartiles and max of the step times."""
    t = np.asarray(times, dtype=float)
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return {"images_per_s": batch / float(med), "median_step_s": float(med),
            "min_step_s": float(t.min()), "q1_step_s": float(q1), "q3_step_s": float(q3),
            "max_step_s": float(t.max()), "steps": len(t)}


def tiled(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """At least ``n`` images, repeating the set when it is smaller (the shipped sample)."""
    reps = -(-n // len(x))
    k = max(n, len(x))
    return np.concatenate([x] * reps)[:k], np.concatenate([y] * reps)[:k]


def cpu_info() -> dict[str, object]:
    """CPU model, SIMD flags of interest, core count and platform of this machine."""
    from allcnn_lib.recipes import read_cpuinfo

    model, flags = read_cpuinfo() or (platform.processor() or "unknown", set())
    wanted = ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
              "amx_bf16", "amx_tile"]
    return {"model": model, "cpus": os.cpu_count(),
            "flags": {f: f in flags for f in wanted}, "platform": platform.platform()}


def versions() -> dict[str, str]:
    """Versions of Python and of the numerical packages that are importable (no imports)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("numpy", "tensorflow", "keras", "jax", "jaxlib", "torch", "scipy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def now() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, result: dict) -> None:
    """Write ``result`` to ``path`` atomically (a temporary beside it, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


def run_child(argv: Sequence[str], env: dict[str, str] | None = None,
              timeout: float | None = None, all_rows: bool = False):
    """Run ``python argv...`` in a fresh process that prints JSON objects on stdout lines.

    Returns the last object, or with ``all_rows`` the list of all of them.
    """
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    proc = subprocess.run([sys.executable, *argv], env=full_env, cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"{' '.join(argv)} failed (rc {proc.returncode}):\n{tail}")
    return [json.loads(ln) for ln in lines] if all_rows else json.loads(lines[-1])


def fma_peak(peak: dict | None) -> float | None:
    """The multiply-add ceiling in GFLOP/s: the loop's rate per second of CPU time (which
    other jobs cannot lower), else its best wall-clock repetition."""
    if not peak or "fma loop" not in peak["rows"]:
        return None
    r = peak["rows"]["fma loop"]
    return r.get("cpu_time_gflops", r["best_gflops"])


def bf16_peak(peak: dict | None) -> float | None:
    """The bfloat16 dot-product ceiling in GFLOP/s (the ``vdpbf16ps`` loop per second of CPU
    time), or None where it was not measured or the CPU has no AVX512_BF16."""
    loop = (peak or {}).get("bf16_dot_loop") or {}
    return loop.get("cpu_time_gflops") if loop.get("available") else None


def conv_macs(model) -> int:
    """Multiply-adds of one image's forward pass through the ``Conv2D`` layers of a built
    Keras model (output height x width x kernel height x width x in x out channels).

    For All-CNN-C (paper variant) this is the 0.271 GMAC behind ``TRAIN_GFLOP_PER_IMAGE``;
    a training step costs ``3 * 2 * conv_macs`` FLOP per image (forward + two backward
    products)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, _ = layer.output.shape
            kh, kw, cin, cout = layer.kernel.shape
            total += int(h) * int(w) * int(kh) * int(kw) * int(cin) * int(cout)
    return total


def batch_timer():
    """A Keras callback that records the seconds of every training or prediction batch in
    ``.times``, and Keras' running mean of the training loss after each batch in ``.losses``."""
    import keras

    class BatchTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._start)
            self.losses.append(float((logs or {}).get("loss", float("nan"))))

        on_predict_batch_begin = on_train_batch_begin

        def on_predict_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._start)

    return BatchTimer()
