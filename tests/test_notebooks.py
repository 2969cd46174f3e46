"""Checks of the saved notebooks themselves (nbval runs them; this checks how they are saved).

A notebook must be readable on GitHub as saved: executed in order by a ``python3`` kernel, with
outputs and PNG figures, no error outputs, and the course structure every notebook shares.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
REQUIRED_SECTIONS = ("what you will learn", "setup", "summary", "exercises", "further reading")


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def markdown(nb: dict) -> str:
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def test_there_are_notebooks():
    assert NOTEBOOKS, "no numbered notebooks under notebooks/"
    assert NOTEBOOKS[0].name.startswith("00_")


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.stem)
def notebook(request) -> tuple[Path, dict]:
    return request.param, load(request.param)


def test_saved_with_python3_kernel(notebook):
    path, nb = notebook
    assert nb["metadata"]["kernelspec"]["name"] == "python3", path.name


def test_executed_in_order_with_real_counts(notebook):
    path, nb = notebook
    counts = [c["execution_count"] for c in code_cells(nb)]
    assert None not in counts, f"{path.name}: a code cell was saved unexecuted"
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: counts {counts}"


def test_no_error_outputs(notebook):
    path, nb = notebook
    for cell in code_cells(nb):
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"{path.name}: saved with an error output"
            assert not (out.get("name") == "stderr" and "Traceback" in "".join(out["text"]))


def test_has_outputs_and_png_figures_only(notebook):
    path, nb = notebook
    outputs = [o for c in code_cells(nb) for o in c.get("outputs", [])]
    assert outputs, f"{path.name}: saved without outputs"
    mimes = {m for o in outputs for m in o.get("data", {})}
    assert "image/png" in mimes, f"{path.name}: no PNG figure"
    assert "image/svg+xml" not in mimes, f"{path.name}: SVG outputs are compared as text"
    for o in outputs:
        text = "".join(o.get("data", {}).get("text/plain", ""))
        assert not re.search(r"<matplotlib\.\w+\.\w+ (object )?at 0x", text), (
            f"{path.name}: a stray matplotlib repr; end plotting lines with ';'")


def test_course_structure(notebook):
    path, nb = notebook
    first = "".join(nb["cells"][0]["source"])
    assert nb["cells"][0]["cell_type"] == "markdown" and first.startswith("# "), (
        f"{path.name}: the first cell must be a markdown title")
    headings = [h.strip().lower() for h in re.findall(r"^#+\s+(.*)$", markdown(nb), re.M)]
    for section in REQUIRED_SECTIONS:
        assert any(h.startswith(section) for h in headings), f"{path.name}: no '{section}'"


def test_three_exercises_with_hidden_solutions(notebook):
    path, nb = notebook
    text = markdown(nb)
    exercises = re.findall(r"^\*\*Exercise \d+", text, re.M)
    solutions = re.findall(r"<details>\s*<summary>Solution", text)
    assert len(exercises) >= 3, f"{path.name}: {len(exercises)} exercises"
    assert len(solutions) >= len(exercises), f"{path.name}: an exercise lacks a hidden solution"


def test_checked_teaching_cells_and_library_imports(notebook):
    path, nb = notebook
    sources = ["".join(c["source"]) for c in code_cells(nb)]
    assert any("# NBVAL_CHECK_OUTPUT" in s for s in sources), (
        f"{path.name}: no deterministic cell is checked exactly")
    assert any("allcnn_lib" in s for s in sources), f"{path.name}: does not use allcnn_lib"


def test_no_code_copied_between_notebooks():
    """A function or class defined in two notebooks belongs in allcnn_lib instead."""
    defined: dict[str, str] = {}
    for path in NOTEBOOKS:
        for cell in code_cells(load(path)):
            for name in re.findall(r"^(?:def|class) (\w+)", "".join(cell["source"]), re.M):
                assert defined.setdefault(name, path.name) == path.name, (
                    f"{name} is defined in {defined[name]} and {path.name}: move it to allcnn_lib")


# --------------------------------------------------------------------------- the session plan

PLAN = NOTEBOOK_DIR.parent / "docs" / "session_plan.md"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_session_plan_reading_budget_is_the_notebooks_and_fits_90_minutes(capsys, monkeypatch):
    """The plan's word counts come from running its own counting code on the saved notebooks,
    and its agenda adds up: each notebook's block holds its reading time, rounded up, plus the
    exercise, and the blocks make 90 minutes."""
    plan = PLAN.read_text(encoding="utf-8")
    code = re.search(r"To count, from the repository root:\s*```python\n(.*?)```", plan, re.S)
    assert code, "the plan's counting code is missing"
    monkeypatch.chdir(NOTEBOOK_DIR.parent)
    exec(code.group(1), {})  # prints one line per notebook
    counted = {Path(m.group(1)).stem: (int(m.group(2)), int(m.group(3)))
               for m in re.finditer(r"(\S+\.ipynb)\s+(\d+) words,\s+(\d+) in class",
                                    capsys.readouterr().out)}
    assert counted, "the counting code printed nothing"
    table = {}  # the reading-budget table, the first one whose rows start with a notebook
    for row in map(_cells, plan.splitlines()):
        if re.fullmatch(r"0\d_\w+", row[0]):
            table.setdefault(row[0], row)
    for name, (total, in_class) in counted.items():
        words, read, minutes = table[name][1:4]
        assert (int(words.replace(",", "")), int(read.replace(",", ""))) == (total, in_class), name
        assert float(minutes) == round(in_class / 150, 1), name
    total_row = next(_cells(line) for line in plan.splitlines() if "**00 to 06**" in line)
    assert total_row[2].strip("*") == f"{sum(r for _, r in counted.values()):,}"
    agenda = [_cells(line) for line in plan.splitlines() if re.match(r"\| \d:\d\d \|", line)]
    assert sum(int(row[1]) for row in agenda) == 90
    for row in agenda:
        if found := re.match(r"(0\d):", row[3]):
            name = next(n for n in counted if n.startswith(found.group(1)))
            exercise = re.search(r"(\d+) min", row[5])
            need = math.ceil(counted[name][1] / 150) + (int(exercise.group(1)) if exercise else 0)
            assert int(row[1]) >= need, (name, row[1], need)
