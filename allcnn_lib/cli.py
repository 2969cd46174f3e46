"""The ``allcnn`` command (``python -m allcnn_lib``): ``train``, ``evaluate``, ``plot``,
``verify-data``. With no subcommand ``train`` is assumed, and the original repository's flags
(``-id -batchsize -epochs -init -retrain -weightspath -train -bn -dropout``) are aliases of long
options (``-f``, Jupyter's kernel file, is ignored): the original repository's
``train.py -id X -train 1`` is ``allcnn -id X``.

Exit codes: 0 done; 2 a bad flag (argparse names it); 1 a run-time error, one line
``allcnn: error: <problem>; <fix>`` (``ALLCNN_DEBUG=1``: the traceback); 130 Ctrl-C. Checks that
need no TensorFlow come first, before any folder is made.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import itertools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from allcnn_lib import runs
from allcnn_lib.data import CIFAR10, CIFAR10Error, load_cifar10, verify_data
from allcnn_lib.recipes import RECIPES, cpu_has_bf16
from allcnn_lib.runs import TrainConfig

# No TensorFlow at import: bad flags, a missing file or a damaged config.json fail fast.
PROG = "allcnn"
COMMANDS = ("train", "evaluate", "plot", "verify-data")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


def _checked(convert: Callable[[str], Any], expected: str,
             ok: Callable[[Any], bool] = lambda value: True) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)`` when it passes ``ok``, else "expected <expected>"
    (argparse puts the flag's name first). NaN fails every comparison, so it is refused."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
BOOL = _checked(lambda t: _BOOLS.get(t.lower()), "1/0 (or true/false)")
POSITIVE_INT = _checked(int, "an integer >= 1", lambda v: v >= 1)
COUNT = _checked(int, "an integer >= 0", lambda v: v >= 0)
CROP = _checked(int, f"an integer from {runs.CROP_SIZES[0]} to {runs.CROP_SIZES[-1]} (pixels)",
                lambda v: v in runs.CROP_SIZES)
SHIFT = _checked(int, "an integer from 0 to 16 (pixels)", lambda v: 0 <= v <= 16)
SEED = _checked(int, f"an integer from 0 to {2**32 - 1:,}", lambda v: 0 <= v < 2**32)
LIMIT = _checked(int, "a multiple of 10 (a class-balanced subset of the 10 classes)",
                 lambda v: v > 0 and v % 10 == 0)
RUN_ID = _checked(str, "a plain folder name", lambda v: v not in ("", ".", "..") and "/" not in v)
POSITIVE = _checked(float, "a finite number > 0", lambda v: 0 < v < math.inf)
NONNEGATIVE = _checked(float, "a finite number >= 0", lambda v: 0 <= v < math.inf)
FRACTION = _checked(float, "a number >= 0 and < 1", lambda v: 0 <= v < 1)


#: Options as (flags, kind, help); kind: a tuple of choices, bool (--X and --no-X), "0/1" (the
#: original repository's switches) or an argparse type. The dest is the last flag's name.
NETWORK_FLAGS = (
    ("--arch", runs.ARCHS, "Model-C, Strided-CNN-C or All-CNN-C"),
    ("--variant", runs.VARIANTS, "paper (Tables 1 and 2) or the original repository's deviations"),
    ("-bn --bn --batch-norm", "0/1", "batch normalization after every conv"),
    ("-dropout --dropout", "0/1", "dropout 0.2 on the input and 0.5 after downsampling"),
    ("--class-relu", "0/1", "the ReLU after conv9, the class-score conv"))
TTA_FLAGS = (
    ("--tta-flip", bool, "test-time augmentation: average with the mirror image's prediction"),
    ("--tta-shift", SHIFT, "test-time augmentation: also the views shifted diagonally by N px"))
DATA_FLAGS = (
    ("--data-dir", str, "CIFAR-10: a cifar-10-batches-py folder, a folder holding one, or the "
                        ".tar.gz (default: data/)"),
    ("--limit", LIMIT, "a class-balanced subset of N images"))
TRAIN_FLAGS = (
    ("-id --id --run-id", RUN_ID, "the run's folder name (default: arch_init_optimizer_seedN)"),
    ("--recipe", tuple(RECIPES), "a preset of these flags (recipes.RECIPES); flags given win"),
    ("-init --init", runs.INITIALIZERS, "weight initializer; lsuv = orthogonal + LSUV"),
    ("--optimizer", runs.OPTIMIZERS, "sgd (Nesterov momentum 0.9), rmsprop or adam"),
    ("--lr --learning-rate", POSITIVE, "learning rate (default: runs.DEFAULT_LEARNING_RATES)"),
    ("--rho", FRACTION, "RMSprop's rho (0.0: the original repository's unstable setting)"),
    ("--schedule", runs.SCHEDULES, "paper: x0.1 at 200, 250, 300 of 350 epochs (scaled); "
                                   "inverse_time: the original repository's Keras-2 decay 1e-6; "
                                   "onecycle: up 20%%, then down to 0"),
    ("-epochs --epochs", POSITIVE_INT, "epochs"),
    ("--steps-per-epoch", POSITIVE_INT, "batches an epoch, of an endless reshuffled stream "
                                        "(default: one pass)"),
    ("-batchsize --batch-size", POSITIVE_INT, "batch size"),
    ("--augment", bool, "random translations and horizontal flips"),
    ("--max-shift", SHIFT, "largest translation in pixels (default: 10%% of the side)"),
    ("--shift-fill", runs.SHIFT_FILLS, "border of a translated image"),
    ("--crop-epochs", COUNT, "train the first N epochs on --crop-size crops, random with "
                             "--augment, central without (progressive resizing: cheaper epochs)"),
    ("--crop-size", CROP, "side of those crops in pixels"),
    ("--normalize", bool, "standardize each channel (not with --zca)"),
    ("--zca", bool, "the paper's global contrast normalization and ZCA whitening"),
    ("--zca-epsilon", POSITIVE, "added to the covariance's eigenvalues"),
    ("--whiten-init", bool, "conv1 from ZCA filters of 3x3 training patches"),
    ("--ema", bool, "end with an exponential moving average of the weights"),
    ("--bn-momentum", FRACTION, "decay of batch norm's moving statistics"),
    ("--weight-decay", NONNEGATIVE, "L2 factor on the conv kernels"),
    ("--label-smoothing", FRACTION, "label smoothing of the cross-entropy"),
    ("--mixed-precision", bool, "mixed_bfloat16 (needs a CPU with AVX512_BF16, or a GPU)"),
    ("--train-on", runs.TRAIN_ON, "split: 45,000 + 5,000 validation; all: 50,000, no validation"),
    ("--seed", SEED, "random seed"),
    ("--distribute", runs.DISTRIBUTE, "mirrored: MirroredStrategy over the GPUs (or CPUs)"),
    ("--runs-dir", str, "where run folders go"),
    ("--backup-dir", str, "BackupAndRestore folder (default: ~/.cache/allcnn/backup/<id>)"),
    ("--overwrite", bool, "train a finished run again, from scratch"),
    ("-retrain --retrain", "0/1", "start from --weights, else the run's last.weights.h5"),
    ("-weightspath --weights", str, "weights for -retrain 1 or -train 0"),
    ("-train --train", "0/1", "0: evaluate --weights (else the run's best.weights.h5)"))


def _add(p: argparse.ArgumentParser, rows: Sequence[tuple], defaults: dict[str, Any]) -> None:
    """Add the options ``rows`` (see ``TRAIN_FLAGS``) with the defaults ``defaults``."""
    for flags, kind, text in rows:
        dest = flags.split()[-1].lstrip("-").replace("-", "_")
        kw = ({"choices": kind} if isinstance(kind, (tuple, list)) else
              {"action": argparse.BooleanOptionalAction} if kind is bool else
              {"type": BOOL, "nargs": "?", "const": True, "metavar": "0/1"} if kind == "0/1"
              else {"type": kind})
        default = defaults.get(dest)
        p.add_argument(*flags.split(), dest=dest, default=default, **kw,
                       help=text + ("" if default is None else " (default: %(default)s)"))
    p.add_argument("-f", help=argparse.SUPPRESS)  # Jupyter's kernel file (original sys.argv)


def build_parser(recipe: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The parser of ``allcnn``; ``recipe`` (a ``RECIPES`` preset) replaces train's defaults."""
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Train and evaluate the All Convolutional Net (Springenberg et al. 2014) "
                    "on CIFAR-10. With no subcommand, 'train' is assumed.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}",
                                required=True)
    t = sub.add_parser("train", allow_abbrev=False, help="train a network into runs/<id>/",
                       description="Train a network on CIFAR-10 into runs/<id>/: config.json, "
                       "history.csv, batches.csv, best/last weights, accuracy.png, loss.png. The "
                       "same command again resumes an interrupted run. Network flags left out: "
                       + ", ".join(f"{k} {v}" for k, v in runs.NETWORK_DEFAULTS.items()) + ".")
    defaults = {**dataclasses.asdict(TrainConfig()), "run_id": None, "max_shift": None,
                **dict.fromkeys(runs.NETWORK_DEFAULTS)}  # None: not given
    _add(t, NETWORK_FLAGS + TRAIN_FLAGS + TTA_FLAGS + DATA_FLAGS, defaults)
    t.set_defaults(func=cmd_train, train=True, **(recipe or {}))

    e = sub.add_parser("evaluate", allow_abbrev=False, help="test accuracy, per-class accuracy, "
                       "confusion_matrix.png and evaluation.json", description="Network and "
                       "test-time flags left out come from the config.json beside the weights.")
    e.add_argument("--weights", "-weightspath", required=True, metavar="PATH",
                   help=".weights.h5 (config.json beside it supplies the network) or .keras")
    e.add_argument("--out", metavar="PATH",
                   help="confusion-matrix PNG (default: confusion_matrix.png beside the weights)")
    _add(e, NETWORK_FLAGS + TTA_FLAGS + DATA_FLAGS
         + (("-batchsize --batch-size", POSITIVE_INT, "batch size"),), {"batch_size": 256})
    e.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", allow_abbrev=False, help="redraw a run's accuracy.png, loss.png")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. runs/<id>")
    p.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: RUN_DIR)")
    p.set_defaults(func=cmd_plot)

    v = sub.add_parser("verify-data", allow_abbrev=False, help="check the CIFAR-10 on disk: "
                       "md5s, known copies, images per class, pixel statistics (no download)")
    v.add_argument("--data-dir", help=DATA_FLAGS[0][2])
    v.set_defaults(func=cmd_verify_data)
    return parser


# --------------------------------------------------------------------------- checks


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up chatter kept off stderr (not with ALLCNN_DEBUG)."""
    if "tensorflow" in sys.modules or os.environ.get("ALLCNN_DEBUG"):
        return
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") == "2":  # the package's default: quieter
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    from allcnn_lib.notebook import silenced_stderr

    with silenced_stderr():
        import tensorflow  # noqa: F401


def _weights_file(path: str | os.PathLike, arch: str | None) -> Path:
    """``path``, checked without TensorFlow: it exists and, for ``--arch``, a ``.weights.h5``
    holds that network (batch norm and variant are checked when the weights are loaded)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CLIError(f"{path}: no such weights file")
    if arch and path.suffix == ".h5":
        want = runs.WeightsSummary(Path(), runs.MODEL_NAMES[arch], {}, frozenset())
        runs.check_weights(runs.read_weights_summary(path), want)
    return path


def check_writable(folder: str | os.PathLike, flag: str, label: str | None = None) -> None:
    """Stop when ``folder`` (made later if absent) cannot be written."""
    folder = Path(folder).expanduser()
    existing = runs.nearest_existing(folder.absolute())
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    if not existing.is_dir():
        why = f"{existing} is a file, not a folder"
    else:
        why = ("read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY
               else "permission denied") + ("" if existing == folder.absolute()
                                            else f" on {existing}")
    raise CLIError(f"{label or flag} {folder}: cannot write there ({why}); "
                   f"choose a writable {flag}")


def _refuse_finished(run_dir: Path, run_id: str) -> None:
    """A finished run is never trained again silently."""
    fix = (f"pass --overwrite to train it again from scratch, or choose a new --id (e.g. "
           f"--id {run_id}_2)")
    config = runs.load_run_config(run_dir / runs.CONFIG_JSON,
                                  f"it belongs to the run in {run_dir}: {fix}") or {}
    run = config.get("run") or {}
    if run.get("status") in ("finished", "terminated_on_nan"):
        what = "finished" if run["status"] == "finished" else "stopped by a NaN loss"
        best = run.get("best_val_accuracy")
        best = f", best val_accuracy {best:.4f}" if isinstance(best, float) else ""
        raise CLIError(f"run {run_id} in {run_dir} is already {what} "
                       f"({run.get('epochs_completed')} epochs{best}); {fix}")


def _check_batches(limit: int | None, batch_size: int, train_on: str) -> None:
    """``--limit`` must leave one full training batch (the split keeps 10% for validation)."""

    def train_images(n: int) -> int:
        return n if train_on == "all" else n - n // 100 * 10

    if limit and train_images(limit) < batch_size:
        needed = next(n for n in itertools.count(limit, 10) if train_images(n) >= batch_size)
        raise CLIError(f"--limit {limit} leaves {train_images(limit)} training images, fewer "
                       f"than one batch of --batch-size {batch_size}; raise --limit to "
                       f"{needed} or more, or lower --batch-size")


def _load_data(args: argparse.Namespace, **kwargs: Any) -> CIFAR10:
    """``load_cifar10`` with messages that name the flags given."""
    try:
        return load_cifar10(args.data_dir, path_name="--data-dir", **kwargs)
    except ValueError as err:  # a --limit the data cannot fill
        if args.limit is None:
            raise
        raise CLIError(f"--limit {args.limit}: {err}; lower --limit") from None


def _resolve_mixed_precision(value: bool | str) -> bool:
    """``--mixed-precision``, or the recipe's ``"auto"``: bfloat16 only where the CPU computes it
    natively (emulated, it is ~14x slower) or a GPU is there."""
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


# --------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    """``allcnn train`` (``-train 0``: evaluate); every check without TensorFlow comes first."""
    if not args.train:  # the original repository's -train 0
        weights = args.weights or (args.run_id and Path(args.runs_dir, args.run_id,
                                                        runs.BEST_WEIGHTS))
        if not weights:
            raise CLIError("-train 0 needs -weightspath PATH (or -id ID of a run)")
        args.weights, args.out, args.tta_flip, args.tta_shift = weights, None, None, None
        return cmd_evaluate(args)
    _check_batches(args.limit, args.batch_size, args.train_on)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items()
                            if k in fields and v is not None})
    if not args.overwrite:
        _refuse_finished(config.run_dir, config.run_id)
    check_writable(config.runs_dir, "--runs-dir")
    check_writable(config.resolved_backup_dir(), "--backup-dir")
    if args.retrain:
        weights = args.weights or (args.run_id and config.run_dir / runs.LAST_WEIGHTS)
        if not weights:
            raise CLIError("-retrain 1 needs -weightspath PATH (or -id ID of a run)")
        config.initial_weights = str(_weights_file(weights, config.arch))
    config.mixed_precision = _resolve_mixed_precision(args.mixed_precision)
    data = _load_data(args, limit=args.limit, seed=args.seed,
                      validation_size=0 if args.train_on == "all" else None)
    if len(data.y_train) < args.batch_size:
        raise CLIError(f"{len(data.y_train)} training images (from {data.source}) make no "
                       f"batch of --batch-size {args.batch_size}; lower --batch-size")

    _import_tensorflow_quietly()
    from allcnn_lib.plots import save_run_plots
    from allcnn_lib.training import train

    print(f"run {config.run_id}: {config.arch} ({config.variant}), {len(data.y_train)} "
          f"training / {len(data.y_val)} validation images from {data.source}", flush=True)
    result = train(config, data, overwrite=bool(args.overwrite))
    print(result, flush=True)
    if result.terminated_on_nan:
        good = result.epochs_completed - 1
        kept = f"the checkpoints of epoch {good} are kept" if good else "no checkpoint was written"
        raise CLIError(f"the loss became NaN in epoch {good + 1}; training stopped and {kept} "
                       f"(a NaN checkpoint never replaces a good one); lower the learning rate "
                       f"and run again with --overwrite or a new --id")
    files = {**result.files, **save_run_plots(result.run_dir)}
    print(f"files in {result.run_dir}: " + ", ".join(sorted(p.name for p in files.values())))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``allcnn evaluate`` (the original repository's test.sh): test accuracy, loss, per-class
    accuracy."""
    weights = _weights_file(args.weights, args.arch)
    run_config = runs.load_run_config(weights) or {}  # a damaged one stops here, in one line
    out = Path(args.out or weights.parent / "confusion_matrix.png")
    check_writable(out.parent, "--out", None if args.out else "the weights' folder")
    data = _load_data(args, test_limit=args.limit, validation_size=0)

    _import_tensorflow_quietly()
    from allcnn_lib.evaluation import evaluate, load_trained_model, run_preprocess
    from allcnn_lib.plots import confusion_matrix_plot, save_figure

    model = load_trained_model(weights, args.arch, variant=args.variant,
                               batch_norm=args.batch_norm, dropout=args.dropout,
                               class_relu=args.class_relu)
    flip = run_config.get("tta_flip", False) if args.tta_flip is None else args.tta_flip
    shift = run_config.get("tta_shift", 0) if args.tta_shift is None else args.tta_shift
    result = evaluate(model, data.x_test, data.y_test, args.batch_size,
                      preprocess=run_preprocess(weights), class_names=data.class_names,
                      flip=flip, shift=shift)
    tta = [name for name, on in (("flip", flip), (f"{shift} px translations", shift)) if on]
    print(f"weights: {weights} ({model.name}, {model.count_params():,} params)\n"
          f"test images: {result.n} from {data.source}"
          + (f"; test-time augmentation: {' and '.join(tta)}" if tta else ""))
    label = "SAMPLE accuracy" if data.is_sample else "test accuracy"
    print(f"{label} {result.accuracy:.4f}  loss {result.loss:.4f}  (error {result.error:.2%})")
    if data.is_sample:
        print(f"note: these are the {result.n:,} test images of the shipped sample, not the "
              "10,000-image CIFAR-10 test set; get the full data (make data) for the real figure")
    print(f"per-class accuracy:\n{result.per_class_table()}")
    fig = confusion_matrix_plot(result.confusion, result.class_names,
                                title=f"{weights.name}: test accuracy {result.accuracy:.2%}")
    save_figure(fig, out, close=True)
    report = out.with_name(out.stem + ".json") if args.out else weights.parent / "evaluation.json"
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
    matches = sorted({match for *_, match in report.batches if match})
    print(f"data OK: {', '.join(matches) or 'counts and statistics as expected'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """``allcnn plot RUN_DIR``: redraw accuracy.png and loss.png."""
    run_dir = Path(args.run_dir)
    if not (run_dir / runs.HISTORY_CSV).is_file():
        raise CLIError(f"{run_dir}: no history.csv (not a training run folder?)")
    out = Path(args.out or run_dir)
    check_writable(out, "--out")
    from allcnn_lib.plots import save_run_plots

    for path in save_run_plots(run_dir, out).values():
        print(path)
    return 0


# --------------------------------------------------------------------------- entry point


def _one_line(err: BaseException) -> str:
    """``err`` as one line; an operating-system error as ``<file>: <problem>; <fix>``."""
    text = str(err)
    if isinstance(err, OSError) and text.startswith("[Errno"):  # the system's own wording
        fix = ("free some space, then run the same command again (a training run resumes "
               "from its last completed epoch)" if err.errno == errno.ENOSPC
               else "check the path and its permissions")
        where = f"{err.filename}: " if err.filename else ""
        text = f"{where}{str(err.strerror).lower()}; {fix}"
    lines = text.strip().splitlines() or [type(err).__name__]
    return " ".join(lines[0].split())


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``allcnn`` arguments (``train`` when no subcommand is given); ``--recipe NAME``
    makes the preset the defaults, so that flags given explicitly still win."""
    argv = list(argv)
    if argv and argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "train")
    args = build_parser().parse_args(argv)
    if getattr(args, "recipe", None):
        args = build_parser(RECIPES[args.recipe]).parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``allcnn`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("MPLBACKEND", "Agg")  # figures go to files, never to a window
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        resume = ("; run the same command again to resume from the last completed epoch"
                  if args.command == "train" and args.train else "")
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
