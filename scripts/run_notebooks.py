#!/usr/bin/env python3
"""Execute the course notebooks headlessly and render them to HTML.

    python scripts/run_notebooks.py --out build        # make run: copies under build/
    python scripts/run_notebooks.py --inplace          # make notebooks: refresh saved outputs
    python scripts/run_notebooks.py --out build 00 03  # only notebooks whose names start so
    python scripts/run_notebooks.py --out build --render-only   # HTML of the saved notebooks

The mode follows the environment: ``ALLCNN_QUICK=1`` runs the quick mode (shipped sample, tiny
budgets); otherwise notebooks use the default data (the full CIFAR-10 when present, else the
shipped sample with a notice). A notebook that raises stops the run with its name and error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def execute(path: Path, timeout: int) -> tuple[object, float]:
    """Run one notebook in a fresh ``python3`` kernel, in its own folder; return it and seconds.

    The kernel talks over IPC (Unix sockets in a temporary folder), not TCP: local only,
    and without the kernel's "running over TCP without encryption" warning."""
    import tempfile

    import nbformat
    from nbclient import NotebookClient
    from traitlets.config import Config

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="allcnn-kernel-") as sockets:
        ipc = Config()
        ipc.KernelManager.transport = "ipc"
        ipc.KernelManager.ip = f"{sockets}/kernel"  # absolute: the kernel runs elsewhere
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", config=ipc,
                                resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        client.execute()
        return nb, time.perf_counter() - start


def write_atomic(text: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)


def offline_mathjax(html_dir: Path) -> str:
    """Copy MathJax 2.7 (from the jupyter-server-mathjax package) beside the HTML pages and
    return the URL that makes them render math offline; the CDN default needs the internet."""
    import shutil

    try:
        import jupyter_server_mathjax
    except ImportError:  # the HTML still works online, from the CDN
        print("note: jupyter-server-mathjax is not installed; math renders from the CDN only")
        from nbconvert import HTMLExporter

        return HTMLExporter().mathjax_url
    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    shutil.copytree(static, html_dir / "mathjax", dirs_exist_ok=True)
    return "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="folder for executed copies and HTML")
    where.add_argument("--inplace", action="store_true", help="overwrite notebooks/*.ipynb")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
    ap.add_argument("--render-only", action="store_true",
                    help="with --out: render the saved notebooks to HTML without executing them")
    ap.add_argument("only", nargs="*", help="name prefixes of the notebooks to run")
    args = ap.parse_args()
    if args.render_only and args.inplace:
        ap.error("--render-only renders saved notebooks to HTML; use it with --out FOLDER, "
                 "not --inplace")
    if args.timeout < 1:
        ap.error(f"--timeout must be at least 1 second, got {args.timeout}")
    every = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    notebooks = [p for p in every if p.name.startswith(tuple(args.only or [""]))]
    if not notebooks:
        ap.error(f"no notebook name starts with {' or '.join(args.only) or 'two digits'}; "
                 f"choose from {' '.join(p.name[:2] for p in every)}")
    if args.out is not None:  # the CLI's check: fails here, not after the first notebook ran
        from allcnn_lib.cli import CLIError, check_writable

        try:
            check_writable(args.out, "--out")
        except CLIError as err:
            ap.error(str(err))

    import nbformat
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter

    mode = "quick" if os.environ.get("ALLCNN_QUICK") else "standard"
    print(f"rendering {len(notebooks)} saved notebooks" if args.render_only else
          f"executing {len(notebooks)} notebooks ({mode} mode)")
    exporter = HTMLExporter(template_name="lab")
    if not args.inplace:
        exporter.mathjax_url = offline_mathjax(args.out / "html")
    total = 0.0
    for path in notebooks:
        if args.render_only and not args.inplace:
            nb, seconds = nbformat.read(path, as_version=4), 0.0
            html, _ = exporter.from_notebook_node(nb)
            where_to = args.out / "html" / path.with_suffix(".html").name
            write_atomic(html, where_to)
            print(f"  {path.name:40s} rendered -> {where_to}")
            continue
        try:
            nb, seconds = execute(path, args.timeout)
        except CellExecutionError as err:
            print(f"FAILED {path.name}: {str(err).strip().splitlines()[-1]}", file=sys.stderr)
            return 1
        total += seconds
        text = nbformat.writes(nb)
        if args.inplace:
            write_atomic(text + "\n", path)
            where_to = path
        else:
            write_atomic(text + "\n", args.out / "notebooks" / path.name)
            html, _ = exporter.from_notebook_node(nb)
            where_to = args.out / "html" / path.with_suffix(".html").name
            write_atomic(html, where_to)
        print(f"  {path.name:40s} {seconds:7.1f} s  -> {where_to}")
    print(f"done in {total:.1f} s")
    if not args.inplace and not args.render_only:
        print(f"executed notebooks: {(args.out / 'notebooks').resolve()}")
        print(f"HTML:               {(args.out / 'html').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
