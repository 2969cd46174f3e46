#!/usr/bin/env python3
"""Ship a finished training run as the course's final model under ``data/final_model/``.

    python scripts/ship_final_model.py RUN_DIR --command "allcnn train ..." [--machine TEXT]

Copies the run's checkpoint as ``model.weights.h5`` (network variables only: the optimizer's
slots are dropped): by default the schedule's last epoch (``last.weights.h5``) for a run
trained on all 50,000 images (``--train-on all``, no validation split), and the checkpoint chosen
on the validation split (``best.weights.h5``) otherwise; ``--checkpoint`` overrides. Also copies
``config.json``, ``history.csv``, ``batches.csv`` and the preprocessing state
(``standardizer.npz`` or ``zca.npz``), evaluates the model **once** on the CIFAR-10 test set
(with the run's test-time augmentation, as ``allcnn evaluate`` does), and writes
``provenance.json`` (the exact command, wall time, machine, versions, test figures, md5 of every
file) and ``MD5SUMS`` (checked by ``make evaluate``). The shipped config.json records paths
relative to the repository or ``~`` (``portable_config``). Refuses a run that is unfinished,
trained on the shipped sample, or whose weights exceed 6 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_WEIGHTS_BYTES = 6_000_000
SHIPPED_WEIGHTS = "model.weights.h5"
CHECKPOINTS = {"best": "best.weights.h5", "last": "last.weights.h5"}
FILES = ("config.json", "history.csv")
OPTIONAL_FILES = ("batches.csv", "standardizer.npz", "zca.npz")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--command", required=True, help="the exact training command")
    ap.add_argument("--machine", default=None,
                    help="where it trained (default: this machine's CPU and core count)")
    ap.add_argument("--checkpoint", choices=("auto", *CHECKPOINTS), default="auto",
                    help="auto: last for a run trained on all 50,000 images, else best")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "final_model")
    args = ap.parse_args(argv)

    run = args.run_dir
    missing = [f for f in FILES if not (run / f).is_file()]
    if missing:
        print(f"error: {run} lacks {', '.join(missing)}: not a finished training run",
              file=sys.stderr)
        return 1
    config = json.loads((run / "config.json").read_text())
    info = config.get("run", {})
    trained_on_all = config.get("train_on") == "all" or info.get("validation_images") == 0
    checkpoint = args.checkpoint if args.checkpoint != "auto" else (
        "last" if trained_on_all else "best")
    source = run / CHECKPOINTS[checkpoint]
    if not source.is_file():
        print(f"error: {run} has no {source.name}: not a finished training run",
              file=sys.stderr)
        return 1
    if info.get("status") != "finished":
        print(f"error: {run} has status {info.get('status')!r}, not 'finished'; let the "
              "training finish (run the same command again to resume)", file=sys.stderr)
        return 1
    if info.get("is_sample"):
        print("error: the run trained on the shipped sample; the final model must come from "
              "the full CIFAR-10", file=sys.stderr)
        return 1
    from allcnn_lib.data import load_cifar10, md5sum
    from allcnn_lib.evaluation import evaluate, load_trained_model, run_preprocess
    from allcnn_lib.recipes import cpu_description
    from allcnn_lib.runs import portable_config, read_columns

    # Check the data before writing anything, so that a refusal leaves --out as it was.
    data = load_cifar10(validation_size=0, verbose=False)
    if data.is_sample:
        print("error: the test evaluation needs the full CIFAR-10 (make data)", file=sys.stderr)
        return 1

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # A training checkpoint also holds the optimizer's slots (as large as the weights);
    # predicting needs only the network's variables, so save those alone, and check their size
    # before anything in --out is replaced.
    staged = out / "staged.weights.h5"
    load_trained_model(source).save_weights(staged)
    size = staged.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        staged.unlink()
        print(f"error: the weights are {size / 1e6:.1f} MB, over the 6 MB limit",
              file=sys.stderr)
        return 1
    stale = [p for p in out.iterdir() if p.name.endswith(".weights.h5") and p != staged]
    for path in stale:  # an earlier shipped model's weights under another name
        path.unlink()
    files = [SHIPPED_WEIGHTS, *FILES, *(f for f in OPTIONAL_FILES if (run / f).is_file())]
    for name in files:
        if name == "config.json":  # committed: no machine's absolute paths
            (out / name).write_text(json.dumps(portable_config(config), indent=2))
        elif name != SHIPPED_WEIGHTS:
            shutil.copy2(run / name, out / name)
    os.replace(staged, out / SHIPPED_WEIGHTS)

    history = read_columns(out / "history.csv")
    epochs = int(len(history["epoch"]))
    weights = out / SHIPPED_WEIGHTS
    model = load_trained_model(weights)
    flip, shift = bool(config.get("tta_flip", False)), int(config.get("tta_shift", 0))
    result = evaluate(model, data.x_test, data.y_test, preprocess=run_preprocess(weights),
                      class_names=data.class_names, flip=flip, shift=shift)
    if checkpoint == "last":
        chosen = f"epoch {epochs} of {epochs}, the schedule's last epoch"
        val_accuracy = None
    else:
        best_epoch = int(history["val_accuracy"].argmax())
        chosen = f"epoch {best_epoch + 1} of {epochs}, the best validation accuracy"
        val_accuracy = float(history["val_accuracy"][best_epoch])
    provenance = {
        "command": args.command,
        "run_id": config.get("run_id"),
        "trained_on": f"CIFAR-10 (JPEG copy): {info['train_images']:,} training images, "
                      f"{info['validation_images']:,} for validation",
        "machine": args.machine or info.get("machine") or f"{cpu_description()}, no GPU",
        "versions": {k: info.get(k) for k in ("keras", "tensorflow", "backend")},
        "epochs": epochs,
        "wall_time_s": info.get("seconds"),
        "epochs_time_s": float(sum(history["time"])) if "time" in history else None,
        "checkpoint": chosen,
        "val_accuracy": val_accuracy,
        "test_time_augmentation": {"flip": flip, "shift_px": shift},
        "test_accuracy": result.accuracy,
        "test_loss": result.loss,
        "test_per_class_accuracy": result.to_dict()["per_class_accuracy"],
        "test_images": result.n,
        "test_evaluations": 1,
        "shipped": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "md5": {name: md5sum(out / name) for name in files},
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    (out / "MD5SUMS").write_text("".join(f"{h}  {n}\n" for n, h in provenance["md5"].items()))
    print(json.dumps({k: v for k, v in provenance.items() if k != "md5"}, indent=1))
    print(f"shipped to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
