"""The presets of ``allcnn train --recipe NAME`` and the CPU facts their bfloat16 entry needs
(no TensorFlow here: the CLI reads them before anything slow starts)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: ``--recipe fast`` (notebook 10): batch norm (moving statistics' momentum 0.9, PyTorch's)
#: without dropout; Nesterov SGD, one-cycle to lr 0.4 at batch 512, L2 2.5e-4 (Page 2018's
#: weight decay 5e-4 in Keras' convention); label smoothing 0.2; 4 px reflect-padded shifts and
#: flips; per-channel standardization; conv1 from patch whitening; test-time flips and 1 px
#: shifts; mixed_bfloat16 where the CPU has AVX512_BF16. Not the EMA of the weights (``--ema``:
#: -1.0 and -1.3 points in the ablation, results/recipe/full). Flags given win; every entry is
#: also a flag of its own, off by default.
RECIPES: dict[str, dict[str, Any]] = {
    "fast": {"batch_norm": True, "dropout": False, "optimizer": "sgd", "schedule": "onecycle",
             "learning_rate": 0.4, "batch_size": 512, "weight_decay": 2.5e-4,
             "bn_momentum": 0.9, "label_smoothing": 0.2, "augment": True, "max_shift": 4,
             "shift_fill": "reflect", "normalize": True, "whiten_init": True, "ema": False,
             "tta_flip": True, "tta_shift": 1, "mixed_precision": "auto", "epochs": 40},
}

#: Training images/s on this project's 2-core AVX2-only CPU, float32 (docs/performance.md, Other
#: machines): the plain All-CNN-C at batch 128 (2026-11-28), and the recipe's whole epoch, batch
#: norm and validation included (45,000 images in 815 s, 2026-12-01), both with TensorFlow's
#: default kernels; oneDNN's (``allcnn_lib`` turns them on) train the recipe ~1.25x faster on
#: AVX2, but AVX2 instances differ: slower ones ran its whole epoch with them at 55-60
#: images/s (notebook 10, three executions, 2026-12-01). A rough figure for notebooks 06 and
#: 10's estimates.
AVX2_IMAGES_PER_S = 55


def read_cpuinfo(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, set[str]] | None:
    """The CPU's model name and feature flags, or None where ``/proc/cpuinfo`` is missing."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return None

    def first(key: str) -> str:
        return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")

    return first("model name") or "unknown CPU", set(first("flags").split())


def cpu_has_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """True when the CPU computes bfloat16 natively (AVX512_BF16 or AMX-BF16), False when not
    (TensorFlow emulates it, ~14x slower than float32), None when unknown (not Linux)."""
    info = read_cpuinfo(cpuinfo)
    return None if info is None else bool(info[1] & {"avx512_bf16", "amx_bf16"})


def cpu_description(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU in a few words, e.g. "AMD EPYC, 2 cores, AVX-512, AVX512_BF16" (", AMX-BF16"
    where it has Intel's matrix units, which oneDNN uses for bfloat16 convolutions)."""
    if (info := read_cpuinfo(cpuinfo)) is None:
        return f"{os.cpu_count()} cores"
    model, flags = info
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    extras = [name for flag, name in (("avx512_bf16", "AVX512_BF16"), ("amx_bf16", "AMX-BF16"))
              if flag in flags]
    return ", ".join([model, f"{os.cpu_count()} cores", isa, *extras])
