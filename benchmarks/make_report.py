"""Regenerate ``docs/performance.md`` and ``docs/performance.png`` from benchmarks/results/*.json.

The document is never edited by hand: ``make bench`` ends by running this script, and it can be
rerun alone at any time (``.venv/bin/python benchmarks/make_report.py``). A result file that is
missing shows as "not measured".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_precision import shown_steps
from bench_recipe import peak_for
from common import REPO, RESULTS_DIR, TRAIN_GFLOP_PER_IMAGE, fma_peak

DOC = REPO / "docs" / "performance.md"
PLOT = REPO / "docs" / "performance.png"
IMPL_NAMES = {
    "keras-tensorflow": "Keras 3 / TensorFlow (train_on_batch)",
    "keras-jax": "Keras 3 / JAX (train_on_batch, XLA)",
    "keras-torch": "Keras 3 / PyTorch (train_on_batch)",
    "ours": "allcnn_lib path (make_dataset + augment + fit)",
    "ours-onednn": "allcnn_lib path, TF_ENABLE_ONEDNN_OPTS=1",
    "torch-loop": "plain PyTorch loop, channels_last",
}
RECIPE_NAMES = {
    "recipe": "recipe path: FusedBatchNormalization, make_dataset + augment + fit",
    "recipe-stock-bn": "recipe path with Keras' stock BatchNormalization",
    "torch-loop": "plain PyTorch loop, BatchNorm2d, channels_last",
    "torch-compile": "the same PyTorch loop through torch.compile",
}
#: The "Targets" rows of the recipe path (issue 21); they read "not measured yet" until
#: ``benchmarks/results/recipe.json`` exists.
RECIPE_TARGETS = ("recipe path (batch norm", "bfloat16 dot-product peak",
                  "whole epoch of the recipe")
NOT_YET = "not measured yet"
EPOCH_PARTS = (
    ("setup_s", "fit call to the first step (set-up, on_train_begin, on_epoch_begin)"),
    ("steps_s", "train steps"),
    ("first_step_s", "of which the first step (new iterator: shuffle buffer, oneDNN caches)"),
    ("steps_above_median_s", "of which step time above the epoch's median step (input "
     "waits, load, noise)"),
    ("batch_callbacks_s", "batch callbacks (per-batch CSV log, ...)"),
    ("gaps_between_batches_s", "gaps between a batch's end and the next batch's begin"),
    ("to_validation_s", "last step to the validation's begin"),
    ("validation_s", "validation pass"),
    ("epoch_end_callbacks_s", "epoch-end callbacks: CSV, best/last checkpoints, backup"),
    ("train_end_s", "train end (EMA weights copied, on_train_end)"),
    ("unaccounted_s", "unaccounted (a check: should be ~0)"),
)


def load(name: str, folder: Path = RESULTS_DIR) -> dict | None:
    """The JSON result ``name`` (in ``folder``) or None when it has not been measured."""
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def load_avg(r: dict | None, before: str = "load_average_before",
             after: str = "load_average_after") -> str:
    """'a -> b' of the 1-minute load averages recorded in ``r``."""
    if not r or before not in r:
        return "?"
    return f"{r[before][0]:.1f} -> {r[after][0]:.1f}"


def speed_rows(speed: dict | None) -> dict[tuple[str, str, int], dict]:
    """(impl, mode, batch) -> row."""
    return {(r["impl"], r["mode"], r["batch_size"]): r for r in (speed or {}).get("rows", [])}


def cell(r: dict | None) -> str:
    """'img/s (min-max step s)' of one row."""
    if r is None:
        return "not measured"
    return (f"**{r['images_per_s']:.1f}** ({r['min_step_s']:.2f}-{r['max_step_s']:.2f} s, "
            f"IQR {r['q1_step_s']:.2f}-{r['q3_step_s']:.2f})")


def plot(speed: dict | None, peak: dict | None) -> bool:
    """Bar charts of training and inference images/s; False when nothing is measured."""
    rows = speed_rows(speed)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = [i for i in IMPL_NAMES if any(k[0] == i for k in rows)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.38
    for j, batch in enumerate((32, 128)):
        vals = [rows.get((i, "train", batch), {}).get("images_per_s", 0) for i in impls]
        errs = [[v - batch / rows[(i, "train", batch)]["max_step_s"] if v else 0
                 for v, i in zip(vals, impls, strict=True)],
                [batch / rows[(i, "train", batch)]["min_step_s"] - v if v else 0
                 for v, i in zip(vals, impls, strict=True)]]
        xs = [k + (j - 0.5) * width for k in range(len(impls))]
        ax1.bar(xs, vals, width, yerr=errs, capsize=3, label=f"batch {batch}")
    if fma_peak(peak):
        fma = fma_peak(peak) / TRAIN_GFLOP_PER_IMAGE
        ax1.axhline(0.85 * fma, color="k", ls="--", lw=1,
                    label=f"85% of FMA peak ({0.85 * fma:.0f} img/s)")
    ax1.set_title("All-CNN-C training step, float32")
    ax1.set_ylabel("images / s (median; bars: min-max step)")
    ax1.set_xticks(range(len(impls)), impls, rotation=20)
    ax1.set_ylim(0, ax1.get_ylim()[1] * 1.25)
    ax1.legend(fontsize=8, loc="upper left")
    vals = [rows.get((i, "infer", 256), {}).get("images_per_s", 0) for i in impls]
    ax2.bar(range(len(impls)), vals, 0.6, color="tab:green")
    ax2.set_title("All-CNN-C inference, batch 256, float32")
    ax2.set_ylabel("images / s (median)")
    ax2.set_xticks(range(len(impls)), impls, rotation=20)
    machine = speed["machine"]
    fig.suptitle(f"{machine['model']}, {machine['cpus']} CPUs, {speed['date'][:10]} "
                 f"(load {load_avg(speed)})", fontsize=10)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)
    return True


def verdict(ok: bool | None) -> str:
    """holds / MISSED / not measured."""
    return "not measured" if ok is None else ("holds" if ok else "**missed**")


def speedup_row(label: str, ours: dict | None, base: dict | None, digits: int) -> list[tuple]:
    """A ">= 1.1x" target row: the ratio of two result rows' images/s (none if one is missing)."""
    if not (ours and base):
        return []
    x = ours["images_per_s"] / base["images_per_s"]
    return [(label, f"{x:.2f}x ({ours['images_per_s']:.{digits}f} vs "
             f"{base['images_per_s']:.{digits}f} img/s)", x >= 1.1)]


def onednn_is_default(flags: dict) -> bool:
    """TensorFlow 2.21 switches its oneDNN kernels on by itself on x86 CPUs with AVX-512 VNNI,
    AVX512_BF16 or AMX (it prints "oneDNN custom operations are on")."""
    return any(flags.get(f) for f in ("avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"))


def machine_sentence(flags: dict) -> str:
    """What the measured SIMD flags mean for the figures (the machines of this workplace vary:
    the same "AMD EPYC" name has come with and without AVX-512)."""
    if flags.get("avx512f"):
        bf16 = ("bfloat16 dot products (AVX512_BF16)" if flags.get("avx512_bf16")
                else "no bfloat16 dot-product instructions")
        return ("This machine has **AVX-512** (16 float32 lanes per FMA) and " + bf16
                + "; TensorFlow 2.21 turns its oneDNN kernels on by default on such a CPU "
                "(\"oneDNN custom operations are on\"). The issue's baselines were measured "
                "on a machine of this kind.")
    return ("This machine has **no AVX-512 and no bfloat16 hardware** (no AVX512_BF16, no AMX): "
            "its widest float32 instruction is the 8-lane AVX2 FMA, and TensorFlow keeps its "
            "oneDNN kernels off by default. The issue's baselines were measured on an AVX-512 "
            "BF16 machine, so absolute figures and the bfloat16 target do not carry over.")


def simd_name(flags: dict) -> str:
    """The widest SIMD of a machine's flags: "AVX-512 + BF16", "AVX-512" or "AVX2+FMA"."""
    return ("AVX-512" + (" + BF16" if flags.get("avx512_bf16") else "")
            if flags.get("avx512f") else "AVX2+FMA" if flags.get("avx2") else "?")


def summary(folder: Path) -> dict[str, str]:
    """The headline figures of one set of result files (the current one or a history folder)."""
    speed, lsuv, zca, ev, run, rec, peak = (
        load(n, folder) for n in ("speed", "lsuv", "zca", "eval", "run_all", "recipe", "peak"))
    rows = speed_rows(speed)
    # date and machine from the first file present: a partial run may lack speed.json
    first = next((r for r in (speed, rec, peak) if r), {})
    machine = first.get("machine", {})
    flags = machine.get("flags", {})

    def ips(impl: str, mode: str, batch: int) -> str:
        r = rows.get((impl, mode, batch))
        return f"{r['images_per_s']:.1f}" if r else "-"

    return {
        "date": first.get("date", "?")[:10],
        "machine": f"{machine.get('model', '?')}, {machine.get('cpus', '?')} CPUs, "
                   f"{simd_name(flags)}",
        "ours / torch train b128": f"{ips('ours', 'train', 128)} / "
                                   f"{ips('torch-loop', 'train', 128)}",
        "ours / torch inference b256": f"{ips('ours', 'infer', 256)} / "
                                       f"{ips('torch-loop', 'infer', 256)}",
        "Keras-JAX train b128": ips("keras-jax", "train", 128),
        "recipe precision": (rec or {}).get("precision", "-"),
        "recipe / torch train b256 (BN)": recipe_ratio_text(rec, 256),
        "recipe / torch train b512 (BN)": recipe_ratio_text(rec, 512),
        "recipe epoch s (45k + val.) / ideal": (
            f"{rec['epoch']['fit_s']:.0f} / {rec['epoch']['ideal_s']:.0f}"
            if (rec or {}).get("epoch", {}).get("ideal_s") else "-"),
        "LSUV s": f"{lsuv['median_seconds']['lsuv']:.2f}" if lsuv else "-",
        "ZCA fit s": (f"{min(r['median_wall_s'] for r in zca['fit']):.2f}" if zca else "-"),
        "evaluation s": f"{ev['median_s']:.1f}" if ev else "-",
        "make bench min": f"{run['seconds'] / 60:.1f}" if run else "-",
    }


def history_section() -> list[str]:
    """A table of the headline figures on this machine and on the earlier machines whose
    result files were kept under ``benchmarks/results/history/<date>_<machine>/``."""
    folders = sorted(p for p in (RESULTS_DIR / "history").glob("*") if p.is_dir())
    if not folders:
        return []
    columns = [("this page", RESULTS_DIR)] + [(f.name, f) for f in reversed(folders)]
    sums = [(name, summary(folder)) for name, folder in columns]
    out = ["## Other machines\n",
           "The machines of this workplace vary from session to session under the same CPU "
           "name. Each earlier `make bench` is kept with its result files under "
           "`benchmarks/results/history/`; these are their headline figures (images/s, "
           "seconds, minutes), regenerated from those files.\n",
           "| | " + " | ".join(name for name, _ in sums) + " |",
           "|---|" + "---|" * len(sums)]
    for key in sums[0][1]:
        out.append(f"| {key} | " + " | ".join(s[key] for _, s in sums) + " |")
    out.append("")
    return out


def bf16_peak_row(peak: dict) -> str:
    """The peak table's row of the ``vdpbf16ps`` loop (or why there is none)."""
    loop = peak.get("bf16_dot_loop")
    name = "bf16 dot-product loop (`vdpbf16ps`), per second of thread CPU time"
    if loop is None:
        return f"| {name} | {NOT_YET} | `benchmarks/bench_peak.py` |"
    if not loop.get("available"):
        return f"| {name} | not available | {loop.get('reason', '?')} |"
    return (f"| {name} | **{loop['cpu_time_gflops']:.1f}** (wall {loop['gflops']:.1f}, "
            f"best {loop['best_gflops']:.1f}) | `{loop['compile']}`, 12 independent chains per "
            "thread, 64 FLOP per instruction (16 lanes x 2 bfloat16 products x 2): the "
            "ceiling of the mixed_bfloat16 rows |")


def recipe_rows(rec: dict | None) -> dict[tuple[str, int], dict]:
    """(variant, batch) -> row of ``recipe.json``."""
    return {(r["variant"], r["batch_size"]): r for r in (rec or {}).get("rows", [])}


def recipe_fraction(r: dict, peak: dict | None) -> float | None:
    """A row's GFLOP/s over its ceiling (bfloat16 loop or FMA loop of ``peak.json``; the one
    recorded with the row when ``peak.json`` lacks it)."""
    if "images_per_s" not in r:
        return None
    _, ceiling = peak_for(r["precision"], peak)
    ceiling = ceiling or r.get("peak_gflops")
    return r["images_per_s"] * r["gflop_per_image"] / ceiling if ceiling else None


def recipe_ratio_text(rec: dict | None, batch: int) -> str:
    """'recipe / torch-loop' images/s at ``batch`` (for the history table)."""
    rows = recipe_rows(rec)
    a, b = rows.get(("recipe", batch), {}), rows.get(("torch-loop", batch), {})
    if "images_per_s" not in a or "images_per_s" not in b:
        return "-"
    return f"{a['images_per_s']:.1f} / {b['images_per_s']:.1f}"


def _error_text(r: dict) -> str:
    first = r["error"].strip().splitlines()
    return "error: " + (first[-1] if first else "?")[:160].replace("|", "\\|")


def conv_profile_section(prof: dict | None, rec: dict | None) -> list[str]:
    """The bfloat16 convolutions of the recipe's step, timed alone per framework
    (``profile_convs.py``), set against the whole step of ``recipe.json`` at the same batch."""
    out = ["### The recipe's bfloat16 convolutions, one at a time\n"]
    if not prof:
        return out + ["not measured yet (`benchmarks/profile_convs.py`, part of `make bench`)\n"]
    batch, peak, fws = prof["batch_size"], prof["peak_gflops"], prof["frameworks"]
    out.append(f"`benchmarks/profile_convs.py`, {prof['date']}: every convolution of the "
               "recipe's All-CNN-C timed alone on random bfloat16 tensors, batch "
               f"{batch}, median of {prof['steps']}, each framework in its own process with "
               f"{prof['threads']} threads; load {load_avg(prof)}. Cells: milliseconds and % "
               "of the bfloat16 dot-product peak.\n")
    names = list(fws)
    out.append("| layer | product | " + " | ".join(names) + " |")
    out.append("|---|---|" + "---:|" * len(names))
    for i, row in enumerate(fws["tensorflow"]):
        (oh, ow, cout), (kh, kw), cin = row["out"], row["kernel"], row["in"][2]
        flop = 2 * batch * oh * ow * kh * kw * cin * cout / 1e9
        for product in ("forward", "backward data", "backward filter"):
            if i == 0 and product == "backward data":
                continue
            cells = [f"{1e3 * fws[f][i][product]:.1f} ms, "
                     f"{100 * flop / fws[f][i][product] / peak:.0f}%" if peak else "-"
                     for f in names]
            out.append(f"| {row['layer']} ({kh}x{kw}, {cin}->{cout}, {oh}x{ow}) | {product} | "
                       + " | ".join(cells) + " |")
    gflop = prof["step_conv_gflop"]
    out.append("")
    steps = {"tensorflow": ("recipe", "the recipe path's"), "torch": ("torch-loop",
                                                                      "the PyTorch loop's")}
    for f in names:
        conv_s = prof["conv_seconds"][f]
        line = (f"- {f}: the step's convolutions take **{conv_s:.2f} s** together "
                f"({100 * gflop / conv_s / peak:.0f}% of the peak)" if peak else f"- {f}")
        step = next((r for r in (rec or {}).get("rows", [])
                     if r.get("variant") == steps[f][0] and r.get("batch_size") == batch), None)
        if step:
            whole = step["median_step_s"]
            line += (f"; {steps[f][1]} whole step takes {whole:.2f} s, so everything else "
                     f"(batch norm, ReLU, casts, loss, update, input) costs "
                     f"{whole - conv_s:.2f} s ({100 * (whole - conv_s) / whole:.0f}%)")
        out.append(line + ".")
    return out + [""]


def crop_section(crops: dict | None) -> list[str]:
    """Progressive resizing (``bench_crops.py``): the recipe's training step on crops of each
    side against whole images, on the machine that measured it (named: it may not be this
    page's)."""
    out = ["### Progressive resizing: the recipe's step on smaller crops\n"]
    if not crops:
        return out + ["not measured yet (`benchmarks/bench_crops.py`, not part of `make bench`)\n"]
    machine, rows = crops["machine"], crops["rows"]
    out.append(f"`benchmarks/bench_crops.py`, {crops['date']}, on {machine.get('model', '?')} "
               f"with {machine.get('cpus', '?')} CPUs ({simd_name(machine.get('flags', {}))}), "
               f"{rows[0]['precision']}: the recipe's path (`make_dataset`, `crop_first`, `fit`) "
               f"through one network built for any side, as `allcnn train --crop-epochs N "
               f"--crop-size S` trains its first N epochs; batch {crops['batch_size']}, median of "
               f"{crops['steps_per_side']} steps per side, the sides taking turns; load "
               f"{load_avg(crops)}.\n")
    out.append("| crop side | images/s | step s (min-max) | speed-up | ideal (conv MACs) |")
    out.append("|---:|---:|---|---:|---:|")
    out += [f"| {r['side']} | **{r['images_per_s']:.1f}** | {r['min_step_s']:.2f}-"
            f"{r['max_step_s']:.2f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x |"
            for r in rows]
    return out + [""]


def recipe_section(rec: dict | None, peak: dict | None) -> list[str]:
    """The recipe path (batch norm + mixed_bfloat16) against PyTorch, and a whole epoch."""
    out = ["## The recipe path: batch norm + mixed_bfloat16, against PyTorch\n"]
    if not rec:
        return out + [f"{NOT_YET} (`benchmarks/bench_recipe.py --epoch`, part of "
                      "`make bench`).\n"]
    rows, batches = recipe_rows(rec), rec["batches"]
    prec = rec["precision"]
    kind = "bfloat16 dot-product loop" if "bfloat16" in prec else "FMA loop"
    out.append(
        f"`benchmarks/bench_recipe.py`, {rec['date']}: the model and input pipeline of "
        f"`allcnn train --recipe fast` in **{prec}**"
        + ("" if rec.get("bf16_hardware") else " (no bfloat16 hardware here)")
        + f", each variant in its own process with {rec['threads']} threads; median of "
        f"{rec['steps']} steps after {rec['warmup']} warm-up steps; whole run load "
        f"{load_avg(rec)}. Training FLOP per image = 3 x 2 x the conv layers' forward "
        "multiply-adds, counted from each model; the fractions divide by the "
        f"{kind} of the peak table. The PyTorch loop trains one batch held in memory; "
        "the recipe path reads every batch from its tf.data pipeline and keeps an EMA of "
        "the weights.\n")
    out.append("| configuration | precision | "
               + " | ".join(f"batch {b}" for b in batches)
               + " | % of peak (" + " / ".join(map(str, batches)) + ") | load |")
    out.append("|---|---|" + "---|" * len(batches) + "---:|---|")
    for variant, label in RECIPE_NAMES.items():
        got = [rows.get((variant, b)) for b in batches]
        if not any(got):
            continue
        cells = []
        for r in got:
            if r is None:
                cells.append("not measured")
            elif "error" in r:
                cells.append(_error_text(r))
            else:
                extra = (f"; compile {r['compile_s']:.0f} s" if r.get("compile_s") else "")
                cells.append(cell(r).replace(")", extra + ")", 1) if extra else cell(r))
        fracs = [recipe_fraction(r, peak) if r else None for r in got]
        frac = " / ".join("-" if f is None else f"{100 * f:.0f}%" for f in fracs)
        loads = [r["load_average_before"][0] for r in got
                 if r and "load_average_before" in r]
        precs = {r["precision"] for r in got if r and "error" not in r}
        out.append(f"| {label} | {', '.join(sorted(precs)) or '-'} | {' | '.join(cells)} | "
                   f"{frac} | {min(loads, default=0):.1f}-{max(loads, default=0):.1f} |")
    out.append("")
    notes = []
    for key, text in (("fused_over_stock_bn", "fused batch norm against Keras' own"),
                      ("recipe_over_torch", "recipe path against the PyTorch loop"),
                      ("recipe_over_torch_compile", "recipe path against torch.compile")):
        ratios = rec.get("ratios", {}).get(key) or {}
        if ratios:
            notes.append(f"- {text}: " + ", ".join(
                f"**{v:.2f}x** at batch {b}" for b, v in ratios.items()) + ".")
    pipes = [(b, rows[("recipe", b)]["pipeline_images_per_s"]) for b in batches
             if "pipeline_images_per_s" in rows.get(("recipe", b), {})]
    if pipes:
        notes.append("- the recipe's input pipeline alone (standardize, reflect-padded "
                     "shifts, flips, one-hot): " + ", ".join(
                         f"{v:,.0f} images/s at batch {b}" for b, v in pipes) + ".")
    out.extend(notes + ([""] if notes else []))

    out.append("### A whole epoch of the recipe\n")
    ep = rec.get("epoch")
    if not ep:
        out.append(f"{NOT_YET} (`benchmarks/bench_recipe.py --epoch`).\n")
        return out
    if "error" in ep:
        out.append(_error_text(ep) + "\n")
        return out
    out.append(
        f"`model.fit` for one epoch of {ep['train_images']:,} training images "
        f"({ep['steps']} steps of {ep['batch_size']}, {ep['data']}) and the "
        f"{ep['val_images']:,}-image validation pass, with the callbacks `train()` uses, "
        f"from the call to its return: **{ep['fit_s']:.1f} s** (load {load_avg(ep)}). A "
        f"short fit before it (2 steps, 1 validation batch) took {ep['warmup_fit_s']:.1f} s: "
        "the graph tracing that only a run's first epoch pays. The same pipeline alone "
        f"produces the epoch's batches in {ep['pipeline_epoch_s']:.1f} s.\n")
    out.append("| part | seconds | % of the fit |\n|---|---:|---:|")
    for key, label in EPOCH_PARTS:
        if key in ep:
            out.append(f"| {label} | {ep[key]:.2f} | {100 * ep[key] / ep['fit_s']:.1f}% |")
    out.append("")
    if ep.get("ideal_s"):
        out.append(
            f"{ep['train_images']:,} / the steady-state {ep['steady_images_per_s']:.1f} "
            f"images/s ({ep['steady_source']}, batch {ep['batch_size']}) = "
            f"{ep['ideal_s']:.1f} s; the epoch took **{ep['fit_s'] / ep['ideal_s']:.2f}x** "
            f"that (the epoch's own median step: {ep['own_steady_images_per_s']:.1f} "
            "images/s).\n")
    return out


def recipe_targets(rec: dict | None, peak: dict | None) -> list[tuple[str, str, object]]:
    """The Targets rows of issue 21: (target, measured, verdict or bool)."""
    rows = recipe_rows(rec)
    batches = (rec or {}).get("batches", [256, 512])
    prec = (rec or {}).get("precision", "mixed_bfloat16")
    loop = "bfloat16" if "bfloat16" in prec else "float32"
    out: list[tuple[str, str, object]] = []
    for b in batches:
        name = (f"recipe path (batch norm, {prec}, batch {b}) >= 1.2x the PyTorch {loop} "
                "loop at the same batch")
        ours, torch = rows.get(("recipe", b), {}), rows.get(("torch-loop", b), {})
        if "images_per_s" in ours and "images_per_s" in torch:
            x = ours["images_per_s"] / torch["images_per_s"]
            out.append((name, f"{x:.2f}x ({ours['images_per_s']:.1f} vs "
                              f"{torch['images_per_s']:.1f} img/s)", x >= 1.2))
        else:
            out.append((name, NOT_YET, NOT_YET))
    big = max(batches)
    name = f"recipe path (batch {big}) >= 70% of the bfloat16 dot-product peak"
    r = rows.get(("recipe", big), {})
    frac = recipe_fraction(r, peak) if r else None
    if rec and loop == "float32":
        out.append((name, "no bfloat16 hardware here: float32, "
                    + ("-" if frac is None else f"{100 * frac:.0f}% of the FMA peak"),
                    "not applicable"))
    elif frac is not None:
        gf = r["images_per_s"] * r["gflop_per_image"]
        out.append((name, f"{100 * frac:.0f}% ({gf:.0f} of {gf / frac:.0f} GFLOP/s)",
                    frac >= 0.7))
    else:
        out.append((name, NOT_YET, NOT_YET))
    ep = (rec or {}).get("epoch") or {}
    name = ("whole epoch of the recipe (45,000 + 5,000 validation images) within 10% of "
            "45,000 / steady-state images/s")
    if ep.get("ideal_s"):
        x = ep["fit_s"] / ep["ideal_s"]
        out.append((name, f"{ep['fit_s']:.0f} s against {ep['ideal_s']:.0f} s "
                          f"({x:.2f}x; {ep['train_images']:,} training images)", x <= 1.1))
    else:
        out.append((name, NOT_YET, NOT_YET))
    return out


def main() -> int:
    """Write the document (and the plot) from the JSON results."""
    peak, speed, prec = load("peak"), load("speed"), load("precision")
    lsuv, zca, ev, nbs, run = load("lsuv"), load("zca"), load("eval"), load("notebooks"), \
        load("run_all")
    rec = load("recipe")
    rows = speed_rows(speed)
    machine = (speed or peak or {}).get("machine", {})
    vers = (speed or peak or {}).get("versions", {})
    fma = fma_peak(peak)
    out: list[str] = []
    w = out.append
    w("# Performance: the speed table\n")
    w("<!-- Generated by benchmarks/make_report.py from benchmarks/results/*.json; do not edit."
      " Rerun `make bench` (or the script alone) to refresh. -->\n")
    w("Measured by `make bench` (`benchmarks/run_all.py`): every script prints its table and "
      "writes a JSON file under `benchmarks/results/`; this page is regenerated from those "
      "files. Each implementation (a Keras backend, our path, our path with oneDNN, the "
      "PyTorch loop) runs in its own process, which builds a fresh model for each of its "
      "configurations. Figures are "
      "medians of step times; the spread is the min-max (and interquartile range) of the step "
      "times. The machine is shared, so every result records the 1-minute load average before "
      "and after it: on 2 cores a load above 2 means the figure is pessimistic.\n")
    flags = machine.get("flags", {})
    w("## Machine\n")
    w("| | |\n|---|---|")
    w(f"| CPU | {machine.get('model', '?')}, {machine.get('cpus', '?')} logical CPUs |")
    w("| SIMD | " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in flags.items()) + " |")
    w(f"| platform | {machine.get('platform', '?')} |")
    w("| versions | " + ", ".join(f"{k} {v}" for k, v in vers.items()) + " |")
    if run:
        w(f"| last `make bench` | {run['date']}, {run['seconds'] / 60:.1f} min wall "
          f"(load {load_avg(run)}) |")
    w("")
    w(machine_sentence(flags) + "\n")

    w("## Float32 and bfloat16 peak\n")
    if peak:
        w(f"{peak['threads']} threads, median of repeats (best in brackets); load "
          f"{load_avg(peak)}; {peak['date']}.\n")
        w("| measurement | GFLOP/s | |\n|---|---:|---|")
        for name, r in peak["rows"].items():
            note = (f"`{r['compile']}`, {r['isa']}, 12 independent FMA chains per thread"
                    if name == "fma loop" else "2 x 4096^3 FLOP per product")
            w(f"| {name} | {r['gflops']:.1f} ({r['best_gflops']:.1f}) | {note} |")
        if "cpu_time_gflops" in peak["rows"].get("fma loop", {}):
            w(f"| fma loop, per second of thread CPU time | "
              f"**{peak['rows']['fma loop']['cpu_time_gflops']:.1f}** | summed over the "
              "threads: the cores' own rate, which other jobs cannot lower |")
        w(bf16_peak_row(peak))
        w("")
        lanes = 16 if peak["rows"].get("fma loop", {}).get("isa") == "AVX-512F" else 8
        w(f"The fractions below divide by **{fma:.0f} GFLOP/s**, the FMA loop's rate per "
          "second of CPU time (wall-clock figures fall with the load; this one does not). "
          f"That is 2 cores x 2 FMA units x {lanes} lanes x 2 FLOP x the clock.\n")
        w(f"One All-CNN-C training image costs {TRAIN_GFLOP_PER_IMAGE} GFLOP (0.271 GMAC "
          "forward, x2 FLOP/MAC, x3 for forward + two backward products), so the multiply-add "
          f"peak is worth {fma / TRAIN_GFLOP_PER_IMAGE:.0f} training images/s.\n")
    else:
        w("not measured\n")

    w("## Training and inference, float32\n")
    if speed:
        w(f"{speed['date']}; training: median of {speed['steps']} steps after "
          f"{speed['warmup']} warm-up steps; inference: median of {speed.get('infer_steps')} "
          f"batches of 256. Whole run: load {load_avg(speed)}. Cells: **images/s** (min-max "
          "and IQR of the step seconds).\n")
        w("| configuration | train batch 32 | train batch 128 | % of FMA peak (b128) | "
          "inference batch 256 | load |")
        w("|---|---|---|---:|---|---|")
        for impl, label in IMPL_NAMES.items():
            r128 = rows.get((impl, "train", 128))
            frac = (f"{100 * r128['images_per_s'] * TRAIN_GFLOP_PER_IMAGE / fma:.0f}%"
                    if r128 and fma else "-")
            loads = [r["load_average_before"][0] for k, r in rows.items() if k[0] == impl]
            w(f"| {label} | {cell(rows.get((impl, 'train', 32)))} | {cell(r128)} | {frac} | "
              f"{cell(rows.get((impl, 'infer', 256)))} | "
              f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f} |")
        w("")
        if plot(speed, peak):
            w(f"![training and inference images/s]({PLOT.name})\n")
    else:
        w("not measured\n")

    prof = load("profile")
    w("## Profile of a training step\n")
    if prof:
        w(f"`benchmarks/profile_step.py`: All-CNN-C, batch {prof['batch_size']}, the same "
          "random batch, median of 20 steps per stage, each stage adding one part of the "
          f"step; {prof['date']}, load {load_avg(prof)}. GFLOP per image: "
          "0.542 forward, 1.62 for a training step.\n")
        w("| stage | images/s | GFLOP/s | % of FMA peak |\n|---|---:|---:|---:|")
        for r in prof["rows"]:
            frac = r.get("fraction_of_peak")
            w(f"| {r['stage']} | {r['images_per_s']:.1f} | {r['gflops']:.0f} | "
              f"{'-' if frac is None else f'{100 * frac:.0f}%'} |")
        w("")
    else:
        w("not measured\n")

    w("## mixed_bfloat16 against float32\n")
    if prec:
        w(f"Our training path, batch {prec['rows']['float32']['batch_size']}, each policy in "
          f"its own process; {prec['date']}, load {load_avg(prec)}.\n")
        w("| policy | images/s | step s (min-max) | validation accuracy | validation loss |")
        w("|---|---:|---|---|---|")
        for pol, r in prec["rows"].items():
            acc = (f"{r['val_accuracy']:.3f} ({r['val_images']} images, after "
                   f"{r['accuracy_steps']} steps)" if "val_accuracy" in r else "not run")
            loss = f"{r['val_loss']:.3f}" if "val_loss" in r else "-"
            w(f"| {pol} | {r['images_per_s']:.2f} | {r['min_step_s']:.2f}-"
              f"{r['max_step_s']:.2f} ({r['steps']} steps) | {acc} | {loss} |")
        w(f"\nmixed_bfloat16 runs at **{prec['speedup']:.2f}x** the float32 speed here.\n")
        if prec.get("train_loss_max_gap") is not None:
            f32 = prec["rows"]["float32"]["train_loss_per_step"]
            b16 = prec["rows"]["mixed_bfloat16"]["train_loss_per_step"]
            shown = shown_steps(len(f32))
            w(f"Accuracy check: both policies trained {len(f32)} steps from the same initial "
              "weights on the same batches. Training loss (Keras' running mean) "
              + ("per step" if len(shown) == len(f32) else "at steps "
                 + ", ".join(map(str, shown)))
              + ", float32 / mixed_bfloat16: "
              + ", ".join(f"{f32[i - 1]:.3f} / {b16[i - 1]:.3f}" for i in shown)
              + f"; largest gap over all steps **{prec['train_loss_max_gap']:.4f}**. "
              + ("After so few steps the network is still near chance, so the loss gap is the "
                 "sensitive figure; the validation accuracy only shows that neither policy "
                 "diverged.\n" if len(f32) < 100 else
                 "The two runs see the same data in the same order; their validation "
                 "accuracies differ by rounding alone (bfloat16 keeps 8 bits of mantissa), "
                 "which is the accuracy this check is about.\n"))
    else:
        w("not measured\n")

    out.extend(recipe_section(rec, peak))
    out.extend(conv_profile_section(load("profile_convs"), rec))
    out.extend(crop_section(load("crops")))

    w("## Other timings\n")
    w("| what | measured | load |\n|---|---|---|")
    if lsuv:
        med = lsuv["median_seconds"]
        w(f"| LSUV init, ours (`lsuv`, {lsuv['images']} images, {lsuv['data']}) | "
          f"{med['lsuv']:.2f} s (runs {', '.join(f'{s:.2f}' for s in lsuv['seconds']['lsuv'])})"
          f" | end {lsuv['load_average_1min_at_end']:.1f} |")
        if "lsuv_repository_rebuild" in med:
            w(f"| LSUV init, the original repository's rebuild-per-iteration "
              f"| {med['lsuv_repository_rebuild']:.1f} s "
              f"({lsuv['speedup']:.1f}x slower) | |")
        w(f"| one forward pass of those images | {med['forward']:.2f} s | |")
    if zca:
        for r in zca["fit"]:
            w(f"| ZCA fit on {zca['n_images']:,} images, {r['variant']} | "
              f"{r['median_wall_s']:.2f} s wall ({r['median_cpu_s']:.1f} s CPU) | "
              f"{zca['machine']['load_avg_before'][0]:.1f} -> "
              f"{zca['machine']['load_avg_after'][0]:.1f} |")
    if ev:
        w(f"| test-set evaluation (`evaluate`, {ev['images']:,} images) | "
          f"{ev['median_s']:.1f} s ({ev['images'] / ev['median_s']:.0f} img/s) | "
          f"{load_avg(ev)} |")
    if nbs:
        per = ", ".join(f"{r['notebook'].split('_')[0]} {r['seconds']:.0f} s" for r in nbs["rows"])
        w(f"| quick-mode notebook suite (nbval, {len(nbs['rows'])} notebooks; "
          f"{nbs['date'][:10]}) | {nbs['total_s'] / 60:.1f} min ({per}); "
          f"{'all passed' if nbs['all_passed'] else 'FAILURES'} | {load_avg(nbs)} |")
    if run:
        parts = ", ".join(f"{p['command'].split('.py')[0].removeprefix('bench_')} "
                          f"{p['seconds']:.0f} s" for p in run["parts"])
        w(f"| `make bench` wall time | {run['seconds'] / 60:.1f} min ({parts}) | "
          f"{load_avg(run)} |")
    w("")

    w("## Targets\n")
    w("| target | measured | verdict |\n|---|---|---|")
    t = []
    o128, p128 = rows.get(("ours", "train", 128)), rows.get(("torch-loop", "train", 128))
    onednn_default = ("TensorFlow's default on this CPU" if onednn_is_default(flags)
                      else "not the default here")
    t += speedup_row("our training path (augmentation, fp32, batch 128) >= 1.1x plain PyTorch "
                     "channels_last loop", o128, p128, 1)
    t += speedup_row(f"the same with TF_ENABLE_ONEDNN_OPTS=1 ({onednn_default})",
                     rows.get(("ours-onednn", "train", 128)), p128, 1)
    if o128 and fma:
        frac = o128["images_per_s"] * TRAIN_GFLOP_PER_IMAGE / fma
        t.append(("training compute (fp32) >= 85% of the measured multiply-add peak",
                  f"{100 * frac:.0f}% ({o128['images_per_s'] * TRAIN_GFLOP_PER_IMAGE:.0f} of "
                  f"{fma:.0f} GFLOP/s)", frac >= 0.85))
    if prec:
        rr = prec["rows"]
        acc = ""
        kept = None
        if "val_accuracy" in rr["float32"] and "val_accuracy" in rr["mixed_bfloat16"]:
            d = rr["mixed_bfloat16"]["val_accuracy"] - rr["float32"]["val_accuracy"]
            gap = prec.get("train_loss_max_gap")
            kept = d >= -0.01 and (gap is None or gap < 0.05)
            acc = f"; validation accuracy difference {100 * d:+.1f} points"
            acc += "" if gap is None else f", largest training-loss gap {gap:.3f}"
        t.append(("mixed_bfloat16 >= 1.5x float32, accuracy kept",
                  f"{prec['speedup']:.2f}x{acc}", prec["speedup"] >= 1.5 and kept is not False))
    t.extend(recipe_targets(rec, peak))
    pi = rows.get(("torch-loop", "infer", 256))
    t += speedup_row("inference (batch 256) >= 1.1x PyTorch channels_last",
                     rows.get(("ours", "infer", 256)), pi, 0)
    t += speedup_row(f"the same with TF_ENABLE_ONEDNN_OPTS=1 ({onednn_default})",
                     rows.get(("ours-onednn", "infer", 256)), pi, 0)
    if lsuv:
        t.append(("LSUV init <= 2 s", f"{lsuv['median_seconds']['lsuv']:.2f} s",
                  lsuv["median_seconds"]["lsuv"] <= 2.0))
    if zca:
        best = min(r["median_wall_s"] for r in zca["fit"])
        t.append(("ZCA fit (50,000 images) <= 10 s", f"{best:.2f} s (fastest variant)",
                  best <= 10.0))
    if nbs:
        t.append(("quick notebook suite <= 10 min", f"{nbs['total_s'] / 60:.1f} min",
                  nbs["total_s"] <= 600))
    if ev:
        t.append(("test-set evaluation <= 60 s", f"{ev['median_s']:.1f} s",
                  ev["median_s"] <= 60))
    if run:
        minutes = run["seconds"] / 60
        extra = " (with the notebook suite)" if run.get("notebooks") else ""
        t.append(("`make bench` <= 15 min", f"{minutes:.1f} min{extra}", minutes <= 15))
    for name, value, ok in t:
        w(f"| {name} | {value} | {ok if isinstance(ok, str) else verdict(ok)} |")
    w("")
    out.extend(history_section())
    notes = REPO / "benchmarks" / "notes.md"
    if notes.exists():
        w(notes.read_text().strip() + "\n")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(out))
    print(f"wrote {DOC}" + (f" and {PLOT}" if PLOT.exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
