"""The ``allcnn`` command (also ``python -m allcnn_lib``): train, evaluate and plot.

Examples::

    allcnn train --arch allcnn --epochs 350 --batch-size 128 --id allcnn_paper
    allcnn train -id allcnn_paper -batchsize 128 -epochs 350      # the seed's spelling
    allcnn evaluate --weights runs/allcnn_paper/best.weights.h5   # the seed's test.sh
    allcnn plot runs/allcnn_paper

With no subcommand, ``train`` is assumed, so the seed's ``python train.py -id X -train 1``
becomes ``allcnn -id X -train 1``. The seed's single-dash flags (``-id -batchsize -epochs -init
-retrain -weightspath -train -bn -dropout -f``) are aliases of readable long options.

Exit codes: 0 success; 2 bad flags (argparse: a value out of range, or not finite, names its
flag); 1 a run-time error (missing weights file, unreadable CIFAR-10, weights of another
network, an unwritable output folder, a full disk, a finished run asked to train again, ...),
reported as one line on stderr, ``allcnn: error: <problem>; <fix>``; 130 Ctrl-C. Checks that
need no TensorFlow run first, before any folder is made. Set ``ALLCNN_DEBUG=1`` for the
traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from allcnn_lib import runs
from allcnn_lib.data import CIFAR10, CIFAR10Error, load_cifar10, verify_data
from allcnn_lib.recipes import RECIPES, cpu_has_bf16
from allcnn_lib.runs import (
    ARCHS,
    INITIALIZERS,
    NETWORK_DEFAULTS,
    OPTIMIZERS,
    SCHEDULES,
    VARIANTS,
    TrainConfig,
)

# No TensorFlow at import: bad flags, a missing file or a damaged config.json fail fast.
PROG = "allcnn"
COMMANDS = ("train", "evaluate", "plot", "verify-data")
DEFAULTS = TrainConfig()  # the defaults of ``allcnn train``, defined once in TrainConfig


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on", "y", "t"):
        return True
    if value in ("0", "false", "no", "off", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0 (or true/false), got {text!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _number(low: float, high: float = math.inf, *, open_low: bool = False,
            open_high: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in [low, high] (ends open as asked); argparse puts the
    flag's name before the message."""
    lo = f"> {low:g}" if open_low else f">= {low:g}"
    hi = "" if high == math.inf else (f" and < {high:g}" if open_high else f" and <= {high:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number {lo}{hi}, got {text}")
        if value < low or (open_low and value == low) or value > high or (
                open_high and value == high):
            raise argparse.ArgumentTypeError(f"expected a number {lo}{hi}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _int_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high:,}, "
                                             f"got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _limit(text: str) -> int:
    value = _positive_int(text)
    if value % 10:
        raise argparse.ArgumentTypeError(f"expected a multiple of 10 (a class-balanced subset "
                                         f"of the 10 classes), got {value}")
    return value


def _run_id(text: str) -> str:
    if not text or "/" in text or os.sep in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"expected a plain folder name, got {text!r}")
    return text


#: Largest translation in pixels (half the 32-pixel side) for --max-shift and --tta-shift.
MAX_SHIFT_PX = 16


#: Network defaults of ``allcnn train``. The parser's defaults are None, so that ``-train 0``
#: (evaluate) can tell a flag that was given from one that was not and let the run's
#: config.json decide the rest.
MODEL_DEFAULTS = NETWORK_DEFAULTS


def _model_options(p: argparse.ArgumentParser, *, training: bool) -> None:
    """Options that choose the network (None when not given; see ``MODEL_DEFAULTS``)."""
    default = (" (default: %s)" if training else
               " (default: from config.json beside the weights, else from the file)")
    p.add_argument("--arch", choices=ARCHS,
                   help="network: Model-C, Strided-CNN-C or All-CNN-C"
                        + (default % "allcnn" if training else default))
    p.add_argument("--variant", choices=VARIANTS,
                   help="paper (Table 1) or the seed repository's variant"
                        + (default % "paper" if training else ""))
    p.add_argument("-bn", "--bn", "--batch-norm", dest="batch_norm", type=_bool, nargs="?",
                   const=True, metavar="0/1",
                   help="batch normalization after every conv (seed: -bn)"
                        + (default % "0" if training else ""))
    p.add_argument("-dropout", "--dropout", type=_bool, nargs="?", const=True, metavar="0/1",
                   help="dropout 0.2 on the input and 0.5 after downsampling (seed: -dropout)"
                        + (default % "1" if training else ""))
    p.add_argument("--class-relu", type=_bool, nargs="?", const=True, metavar="0/1",
                   help="the ReLU after conv9, the class-score conv (Table 1 has it)"
                        + (default % "1" if training else ""))


def _network(args: argparse.Namespace) -> dict[str, object]:
    """The network flags of ``allcnn train``, defaults filled in."""
    return {k: v if (v := getattr(args, k)) is not None else d for k, d in MODEL_DEFAULTS.items()}


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="CIFAR-10 location: a cifar-10-batches-py folder, a folder "
                                      "holding one, or the .tar.gz (default: data/)")
    p.add_argument("--limit", type=_limit, metavar="N",
                   help="use a class-balanced subset of N images (a multiple of 10)")
    p.add_argument("-f", dest="jupyter_file", metavar="FILE",
                   help="ignored: the seed parsed sys.argv inside Jupyter, whose kernel passes "
                        "-f KERNEL.json; accepted so that such calls still work")


def _tta_options(p: argparse.ArgumentParser, evaluate: bool = False) -> None:
    where = "evaluation" if evaluate else "the final validation"
    default = "from config.json beside the weights, else off" if evaluate else "off"
    p.add_argument("--tta-flip", action=argparse.BooleanOptionalAction,
                   default=None if evaluate else False,
                   help=f"test-time augmentation in {where}: average the predictions of each "
                        f"image and its horizontal mirror (default: {default})")
    p.add_argument("--tta-shift", type=_int_range(0, MAX_SHIFT_PX), metavar="PX",
                   default=None if evaluate else 0,
                   help=f"test-time augmentation in {where}: also average the views translated "
                        f"by (PX, PX) and (-PX, -PX) with reflected borders (default: {default})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``allcnn`` (subcommands ``train``, ``evaluate``, ``plot``)."""
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Train and evaluate the All Convolutional Net (Springenberg et al. 2014) "
                    "on CIFAR-10. With no subcommand, 'train' is assumed.")
    from allcnn_lib import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,plot,verify-data}")

    t = sub.add_parser("train", allow_abbrev=False, help="train a network (writes runs/<id>/)",
                       description="Train a network on CIFAR-10 and write runs/<id>/: "
                                   "config.json, history.csv, batches.csv, best/last "
                                   "weights, accuracy.png, loss.png. Run the same command "
                                   "again after an interruption to resume.")
    t.add_argument("-id", "--id", "--run-id", dest="run_id", metavar="ID", type=_run_id,
                   help="run name: the folder runs/<ID>/ (default: from arch, init, "
                        "optimizer and seed)")
    _model_options(t, training=True)
    t.add_argument("--recipe", choices=tuple(RECIPES),
                   help="a preset of the flags below: fast = batch norm, no dropout, one-cycle "
                        "Nesterov SGD at batch 512, label smoothing 0.2, reflect-padded 4 px "
                        "translations and flips, standardization, patch-whitened conv1, EMA, "
                        "test-time flips and 1 px translations, bfloat16 where the CPU has "
                        "AVX512_BF16, 40 epochs; flags given explicitly override it")
    t.add_argument("-init", "--init", choices=INITIALIZERS, default=DEFAULTS.init,
                   help="weight initializer; lsuv = orthogonal + LSUV (default: %(default)s)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULTS.optimizer,
                   help="sgd (momentum 0.9, Nesterov), rmsprop or adam (default: %(default)s)")
    t.add_argument("--lr", "--learning-rate", dest="learning_rate",
                   type=_number(0, open_low=True),
                   help="learning rate (default: sgd 0.01, rmsprop and adam 0.001)")
    t.add_argument("--rho", type=_number(0, 1, open_high=True), default=DEFAULTS.rho,
                   help="RMSprop's rho (default %(default)s; 0.0 is the seed's unstable setting)")
    t.add_argument("--schedule", choices=SCHEDULES, default=DEFAULTS.schedule,
                   help="learning-rate schedule: paper (x0.1 at 200/250/300 of 350 epochs, "
                        "scaled), cosine (warm-up + cosine), constant, seed (Keras-2 "
                        "decay=1e-6), onecycle (linear up over 20%% of the steps, then "
                        "linear down to 0) (default: %(default)s)")
    t.add_argument("-epochs", "--epochs", type=_positive_int, default=DEFAULTS.epochs,
                   help="epochs (default: %(default)s, the paper's)")
    t.add_argument("--steps-per-epoch", type=_positive_int, metavar="N",
                   help="an epoch is N batches of an endless reshuffled stream, validated "
                        "after each (e.g. --epochs 10 --steps-per-epoch 300 = 3,000 batches); "
                        "default: one pass over the training split")
    t.add_argument("-batchsize", "--batch-size", dest="batch_size", type=_positive_int,
                   default=DEFAULTS.batch_size, help="batch size (default: %(default)s)")
    for flag, text in (  # on/off switches, each --X / --no-X
            ("--augment", "random shifts of up to 10%% and horizontal flips"),
            ("--whiten-init", "initialize conv1 with ZCA whitening filters fitted on 3x3 "
                              "training patches"),
            ("--ema", "keep an exponential moving average of the weights (momentum 0.99) and "
                      "end with it, batch norm re-estimated under it"),
            ("--normalize", "standardize each channel with the training split's mean and std "
                            "(not with --zca)"),
            ("--zca", "the paper's preprocessing: global contrast normalization (norm 55) and "
                      "ZCA whitening fitted on the training split"),
            ("--mixed-precision", "train under the mixed_bfloat16 policy (needs a CPU with "
                                  "AVX512_BF16, or a GPU)")):
        t.add_argument(flag, action=argparse.BooleanOptionalAction, help=text,
                       default=getattr(DEFAULTS, flag[2:].replace("-", "_")))
    t.add_argument("--max-shift", type=_int_range(0, MAX_SHIFT_PX), metavar="PX",
                   help="largest translation in pixels (default: 10%% of the side, 3 px)")
    t.add_argument("--shift-fill", choices=runs.SHIFT_FILLS, default=DEFAULTS.shift_fill,
                   help="border of a translated image: zeros, or the image mirrored at its "
                        "edge (= a random crop of the reflect-padded image) (default: %(default)s)")
    t.add_argument("--train-on", choices=runs.TRAIN_ON, default=DEFAULTS.train_on,
                   help="split: 45,000 training + 5,000 validation images; all: train on "
                        "all 50,000, no validation, the last epoch is the result "
                        "(default: %(default)s)")
    _tta_options(t)
    t.add_argument("--zca-epsilon", type=_number(0, open_low=True), default=DEFAULTS.zca_epsilon,
                   help="added to the covariance's eigenvalues (default %(default)s, the paper's)")
    t.add_argument("--bn-momentum", type=_number(0, 1, open_high=True),
                   default=DEFAULTS.bn_momentum,
                   help="decay of batch norm's moving statistics (default %(default)s, Keras'; 0.9 "
                        "follows the weights faster, PyTorch's default)")
    t.add_argument("--weight-decay", type=_number(0), default=DEFAULTS.weight_decay,
                   help="L2 factor on the conv kernels (default %(default)s)")
    t.add_argument("--label-smoothing", type=_number(0, 1, open_high=True),
                   default=DEFAULTS.label_smoothing,
                   help="label smoothing of the cross-entropy (default %(default)s)")
    t.add_argument("--seed", type=_int_range(0, 2**32 - 1), default=DEFAULTS.seed,
                   help="random seed (default %(default)s)")
    t.add_argument("--runs-dir", default=DEFAULTS.runs_dir,
                   help="where run folders go (default: %(default)s/)")
    t.add_argument("--backup-dir",
                   help="BackupAndRestore folder for resuming "
                        "(default: ~/.cache/allcnn/backup/<id>)")
    t.add_argument("--overwrite", action="store_true",
                   help="train runs/<id>/ again from scratch even when it holds a finished "
                        "run (without it, that is refused) or a backup to resume from")
    t.add_argument("--distribute", choices=runs.DISTRIBUTE, default=DEFAULTS.distribute,
                   help="mirrored: tf.distribute.MirroredStrategy over all GPUs (or logical "
                        "CPU devices)")
    t.add_argument("--verbose", action="store_true",
                   help="Keras' progress bar even when stdout is not a terminal")
    t.add_argument("-retrain", "--retrain", type=_bool, nargs="?", const=True, default=False,
                   metavar="0/1", help="start from trained weights: --weights, else the run's "
                                       "last.weights.h5 (seed: -retrain)")
    t.add_argument("-weightspath", "--weights", dest="weights", metavar="PATH",
                   help="weights for -retrain 1 or -train 0 (seed: -weightspath)")
    t.add_argument("-train", "--train", dest="do_train", type=_bool, nargs="?", const=True,
                   default=True, metavar="0/1",
                   help="1: train (default); 0: evaluate --weights (else the run's "
                        "best.weights.h5) on the test set, as the seed's -train 0")
    _data_options(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", allow_abbrev=False,
                       help="test accuracy, per-class accuracy and confusion matrix",
                       description="Evaluate trained weights on the CIFAR-10 test set: print "
                                   "accuracy, loss and per-class accuracy, and write "
                                   "confusion_matrix.png and evaluation.json.")
    e.add_argument("--weights", "-weightspath", dest="weights", required=True, metavar="PATH",
                   help=".weights.h5 (config.json beside it supplies the network) or .keras")
    _model_options(e, training=False)
    e.add_argument("-batchsize", "--batch-size", dest="batch_size", type=_positive_int,
                   default=256, help="batch size (default 256)")
    _tta_options(e, evaluate=True)
    e.add_argument("--out", metavar="PATH",
                   help="confusion-matrix PNG (default: confusion_matrix.png beside the weights)")
    _data_options(e)
    e.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", allow_abbrev=False, help="redraw a run's training curves",
                       description="Redraw accuracy.png and loss.png of a run folder from its "
                                   "history.csv and batches.csv.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. runs/<id>")
    p.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: RUN_DIR)")
    p.set_defaults(func=cmd_plot)

    v = sub.add_parser("verify-data", allow_abbrev=False,
                       help="check CIFAR-10 on disk: md5s, images per class, pixel statistics",
                       description="Check the CIFAR-10 that train and evaluate would load "
                                   "(without downloading): each file's md5 against the "
                                   "official release, its decoded images and labels against "
                                   "the known copies, the images per class and the pixel "
                                   "statistics. Exit 1 with one line when something is wrong.")
    v.add_argument("--data-dir", help="CIFAR-10 location: a cifar-10-batches-py folder, a "
                                      "folder holding one, or the .tar.gz (default: data/)")
    v.set_defaults(func=cmd_verify_data)
    parser.subcommands = {"train": t, "evaluate": e, "plot": p, "verify-data": v}
    return parser


# --------------------------------------------------------------------------- commands


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up chatter (CUDA probes) kept off stderr
    (``ALLCNN_DEBUG=1`` leaves stderr alone)."""
    if "tensorflow" in sys.modules or os.environ.get("ALLCNN_DEBUG"):
        return
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") == "2":  # the package's default: quieter
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    from allcnn_lib.notebook import silenced_stderr

    with silenced_stderr():
        import tensorflow  # noqa: F401


def _note_ignored(args: argparse.Namespace) -> None:
    if getattr(args, "jupyter_file", None):
        print(f"note: -f {args.jupyter_file} ignored (Jupyter's kernel file; the seed parsed "
              "it by accident)", file=sys.stderr)


def _require_file(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CLIError(f"{path}: no such weights file")
    return path


def _check_arch_early(weights: Path, arch: str | None) -> None:
    """Fail fast, before TensorFlow loads, when ``--arch`` names another network than the one
    a ``.weights.h5`` file was saved from. Anything subtler (batch norm, variant) is caught by
    the full check when the weights are loaded."""
    if arch is None or not weights.name.endswith(".h5"):
        return
    try:
        saved = runs.read_weights_summary(weights)
    except runs.WeightsMismatchError:  # unreadable: the full check reports it
        return
    want = runs.WeightsSummary(Path(), runs.MODEL_NAMES[arch], {}, frozenset())
    runs.check_weights(saved, want)


def _check_writable(folder: str | os.PathLike, flag: str, fix: str | None = None) -> None:
    """Fail, before anything slow starts, when ``folder`` (to be created if absent) cannot be
    written: a file in the way, no permission, a read-only file system."""
    folder = Path(folder).expanduser()
    fix = fix or f"choose a writable {flag}"
    existing = runs.nearest_existing(folder.absolute())
    if not existing.is_dir():
        raise CLIError(f"{flag} {folder}: cannot write there ({existing} is a file, not a "
                       f"folder); {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "read-only file system" if read_only else "permission denied"
        where = "" if existing == folder.absolute() else f" on {existing}"
        raise CLIError(f"{flag} {folder}: cannot write there ({why}{where}); {fix}")


def _refuse_finished(run_dir: Path, run_id: str) -> None:
    """A finished run is never trained again silently: stop with a line that says so."""
    fix = (f"pass --overwrite to train it again from scratch, or choose a new --id (e.g. "
           f"--id {run_id}_2)")
    config = runs.load_run_config(run_dir / runs.CONFIG_JSON,
                                  f"it belongs to the run in {run_dir}: {fix}") or {}
    run = config.get("run")
    status = run.get("status") if isinstance(run, dict) else None
    if status not in ("finished", "terminated_on_nan"):
        return
    epochs = run.get("epochs_completed")
    best = run.get("best_val_accuracy")
    what = "finished" if status == "finished" else "stopped by a NaN loss"
    detail = ", ".join(part for part in (
        f"{epochs} epochs" if epochs is not None else "",
        f"best val_accuracy {best:.4f}" if isinstance(best, float) else "") if part)
    raise CLIError(f"run {run_id} in {run_dir} is already {what}"
                   + (f" ({detail})" if detail else "") + f"; {fix}")


def _check_batches(limit: int | None, batch_size: int, train_on: str) -> None:
    """``--limit`` must leave at least one full training batch (known without the data)."""
    if limit is None:
        return

    def train_images(n: int) -> int:
        return n if train_on == "all" else n - n // 10 // 10 * 10

    if train_images(limit) < batch_size:
        needed = next(n for n in range(limit, 10 * batch_size + 20, 10)
                      if train_images(n) >= batch_size)
        raise CLIError(f"--limit {limit} leaves {train_images(limit)} training images, fewer "
                       f"than one batch of --batch-size {batch_size}; raise --limit to "
                       f"{needed} or more, or lower --batch-size")


def cmd_train(args: argparse.Namespace) -> int:
    """``allcnn train``: train (or, with ``-train 0``, evaluate) and print where things went.

    Everything that can be checked without TensorFlow is checked first, before any folder is
    made: flag combinations, a finished run in the way, writable output folders, the weights
    to start from, the data."""
    _note_ignored(args)
    run_dir = Path(args.runs_dir) / (args.run_id or "")
    if not args.do_train:
        weights = args.weights or (run_dir / runs.BEST_WEIGHTS if args.run_id else None)
        if weights is None:
            raise CLIError("-train 0 needs -weightspath PATH (or -id ID of a run)")
        eval_args = argparse.Namespace(
            weights=str(weights), arch=args.arch, variant=args.variant,
            batch_norm=args.batch_norm, dropout=args.dropout, class_relu=args.class_relu,
            batch_size=args.batch_size, tta_flip=None, tta_shift=None, out=None,
            data_dir=args.data_dir, limit=args.limit, jupyter_file=None)
        return cmd_evaluate(eval_args)
    if args.normalize and args.zca:
        raise CLIError("--normalize and --zca are two preprocessings: choose one")
    _check_batches(args.limit, args.batch_size, args.train_on)
    names = ("init", "optimizer", "learning_rate", "rho", "schedule", "epochs",
             "steps_per_epoch", "batch_size", "augment", "normalize", "zca", "zca_epsilon",
             "weight_decay", "label_smoothing", "limit", "seed", "distribute", "data_dir",
             "runs_dir", "backup_dir", "shift_fill", "whiten_init", "ema", "train_on",
             "tta_flip", "tta_shift", "bn_momentum", "recipe")
    config = TrainConfig(
        run_id=args.run_id, **{k: v if (v := getattr(args, k)) is not None else d
                               for k, d in MODEL_DEFAULTS.items()},
        **{k: getattr(args, k) for k in names}, verbose=True if args.verbose else None,
        **({} if args.max_shift is None else {"max_shift": args.max_shift}))
    if not args.overwrite:
        _refuse_finished(config.run_dir, config.run_id)
    _check_writable(args.runs_dir, "--runs-dir")
    _check_writable(config.resolved_backup_dir(), "--backup-dir")
    if args.retrain:
        initial = args.weights or (run_dir / runs.LAST_WEIGHTS if args.run_id else None)
        if initial is None:
            raise CLIError("-retrain 1 needs -weightspath PATH (or -id ID of a run)")
        initial = _require_file(initial)
        _check_arch_early(initial, config.arch)
        config.initial_weights = str(initial)
    config.mixed_precision = _resolve_mixed_precision(args.mixed_precision)
    data = _load_data(args.data_dir, args.limit, limit=args.limit, seed=args.seed,
                      validation_size=0 if args.train_on == "all" else None)
    if len(data.y_train) < args.batch_size:
        raise CLIError(f"{len(data.y_train)} training images (from {data.source}) make no "
                       f"batch of --batch-size {args.batch_size}; lower --batch-size")

    _import_tensorflow_quietly()
    from allcnn_lib.plots import save_run_plots
    from allcnn_lib.training import train

    print(f"run {config.run_id}: {config.arch} ({config.variant}), {len(data.y_train)} "
          f"training / {len(data.y_val)} validation images from {data.source}", flush=True)
    result = train(config, data, overwrite=args.overwrite)
    print(result, flush=True)
    if result.terminated_on_nan:
        good = result.epochs_completed - 1
        kept = (f"the checkpoints of epoch {good} are kept" if good > 0 else
                "no checkpoint was written")
        raise CLIError(f"the loss became NaN in epoch {good + 1}; training stopped and {kept} "
                       f"(a NaN checkpoint never replaces a good one); lower the learning rate "
                       f"and run again with --overwrite or a new --id")
    result.files.update(save_run_plots(result.run_dir))
    print(f"files in {result.run_dir}: "
          + ", ".join(sorted(p.name for p in result.files.values())), flush=True)
    return 0


def _load_data(data_dir: str | None, limit_flag: int | None, **kwargs: object) -> CIFAR10:
    """``load_cifar10`` with messages that name the flags the user passed."""
    try:
        return load_cifar10(data_dir, path_name="--data-dir", **kwargs)
    except ValueError as err:  # a --limit the data cannot fill
        if limit_flag is None:
            raise
        raise CLIError(f"--limit {limit_flag}: {err}; lower --limit") from None


def _resolve_mixed_precision(value: bool | str) -> bool:
    """``--mixed-precision`` (True), its absence (False), or the recipe's ``"auto"``: bfloat16
    only where the CPU computes it natively. An explicit request on a CPU that emulates it
    stops here, before anything slow starts."""
    native = cpu_has_bf16()
    if value == "auto":
        if native is False:
            print("note: this CPU has no AVX512_BF16, so the recipe trains in float32 "
                  "(bfloat16 would be emulated, ~14x slower)", flush=True)
        return bool(native)
    if value and native is False and not Path("/dev/nvidia0").exists():
        raise CLIError("--mixed-precision: this CPU has no AVX512_BF16, so TensorFlow would "
                       "emulate bfloat16 (~14x slower than float32); leave the flag out to "
                       "train in float32")
    return bool(value)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``allcnn evaluate``: the seed's test.sh: test accuracy, loss, per-class accuracy."""
    _note_ignored(args)
    weights = _require_file(args.weights)
    run_config = runs.load_run_config(weights) or {}  # a damaged one stops here, in one line
    _check_arch_early(weights, args.arch)
    out = Path(args.out) if args.out else weights.parent / "confusion_matrix.png"
    if args.out:
        _check_writable(out.parent, "--out")
    else:
        _check_writable(out.parent, "the weights' folder",
                        "pass --out PATH to write the confusion matrix elsewhere")
    data = _load_data(args.data_dir, args.limit, test_limit=args.limit, validation_size=0)

    _import_tensorflow_quietly()
    from allcnn_lib.evaluation import evaluate, load_trained_model, run_preprocess

    model = load_trained_model(weights, args.arch, variant=args.variant,
                               batch_norm=args.batch_norm, dropout=args.dropout,
                               class_relu=args.class_relu)
    flip = run_config.get("tta_flip", False) if args.tta_flip is None else args.tta_flip
    shift = run_config.get("tta_shift", 0) if args.tta_shift is None else args.tta_shift
    result = evaluate(model, data.x_test, data.y_test, args.batch_size,
                      preprocess=run_preprocess(weights), class_names=data.class_names,
                      flip=flip, shift=shift)
    print(f"weights: {weights} ({model.name}, {model.count_params():,} params)")
    tta = [name for name, on in (("flip", flip), (f"{shift} px translations", shift)) if on]
    print(f"test images: {result.n} from {data.source}"
          + (f"; test-time augmentation: {' and '.join(tta)}" if tta else ""))
    label = "SAMPLE accuracy" if data.is_sample else "test accuracy"
    print(f"{label} {result.accuracy:.4f}  loss {result.loss:.4f}  "
          f"(error {result.error:.2%})")
    if data.is_sample:
        print(f"note: these are the {result.n:,} test images of the shipped sample, not the "
              "10,000-image CIFAR-10 test set; for the real figure get the full data "
              "(make data, or any run with internet) and run this again")
    print("per-class accuracy:")
    print(result.per_class_table())

    import matplotlib

    matplotlib.use("Agg")
    from allcnn_lib.plots import confusion_matrix_plot, save_figure

    fig = confusion_matrix_plot(result.confusion, result.class_names,
                                title=f"{weights.name}: test accuracy {result.accuracy:.2%}")
    save_figure(fig, out, close=True)
    report = out.with_name(out.stem + ".json") if args.out else weights.parent / (
        "evaluation.json")
    runs.atomic_write_text(report, json.dumps({
        "weights": str(weights), "source": data.source, "tta_flip": bool(flip),
        "tta_shift": int(shift), **result.to_dict()}, indent=1))
    print(f"confusion matrix: {out}")
    return 0


def cmd_verify_data(args: argparse.Namespace) -> int:
    """``allcnn verify-data``: check the CIFAR-10 files on disk (``data.verify_data``)."""
    report = verify_data(args.data_dir, path_name="--data-dir")
    print("\n".join(report.lines()), flush=True)
    if report.problems:
        for problem in report.problems[1:]:
            print(f"problem: {problem}")
        more = len(report.problems) - 1
        raise CLIError(report.problems[0] + (f" (and {more} more, listed above)" if more else ""))
    matches = sorted({b.match for b in report.batches if b.match})
    print(f"data OK: {', '.join(matches) or 'counts and statistics as expected'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """``allcnn plot RUN_DIR``: redraw accuracy.png and loss.png."""
    run_dir = Path(args.run_dir)
    if not (run_dir / runs.HISTORY_CSV).is_file():
        raise CLIError(f"{run_dir}: no history.csv (not a training run folder?)")
    _check_writable(args.out or run_dir, "--out")
    import matplotlib

    matplotlib.use("Agg")
    from allcnn_lib.plots import save_figure, training_curves

    history, batches = (runs.read_columns(run_dir / name)
                        for name in (runs.HISTORY_CSV, runs.BATCHES_CSV))
    for metric in ("accuracy", "loss"):
        fig = training_curves(history, metric, batches=batches or None,
                              title=f"{run_dir.name}: {metric}")
        print(save_figure(fig, Path(args.out or run_dir) / f"{metric}.png", close=True))
    return 0


# --------------------------------------------------------------------------- entry point


def _with_default_command(argv: list[str]) -> list[str]:
    """Insert ``train`` when no subcommand is given (the seed's ``train.py -id X ...`` form)."""
    if not argv or argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    return ["train", *argv]


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    if isinstance(err, OSError) and text.startswith("[Errno"):  # the system's own wording
        text = _os_error(err)
    return " ".join(text.split("\n")[0].split())


def _os_error(err: OSError) -> str:
    """An operating-system error as ``<problem>; <fix>``."""
    where = f"{err.filename}: " if err.filename else ""
    if err.errno == errno.ENOSPC:
        return (f"{where}no space left on device; free some space, then run the same command "
                "again (a training run resumes from its last completed epoch)")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}{err.strerror.lower()}; check the path and its permissions"
    if isinstance(err, FileNotFoundError):
        return f"{where}no such file or folder; check the path"
    return f"{where}{err.strerror or err}"


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``allcnn`` arguments; ``train --recipe NAME`` makes the preset (``RECIPES``) the
    defaults, so that flags given explicitly still win."""
    parser = build_parser()
    argv = _with_default_command(list(argv))
    args = parser.parse_args(argv)
    if getattr(args, "recipe", None):
        parser.subcommands["train"].set_defaults(**RECIPES[args.recipe])
        args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``allcnn`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        resume = ("; run the same command again to resume from the last completed epoch"
                  if args.command == "train" and args.do_train else "")
        print(f"{PROG}: interrupted{resume}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `allcnn evaluate ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CLIError, CIFAR10Error, OSError, ValueError) as err:
        if os.environ.get("ALLCNN_DEBUG"):
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
