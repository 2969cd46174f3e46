"""Repository-wide pytest hooks: print each notebook's wall time at the end of the run."""

from __future__ import annotations

from collections import defaultdict

_notebook_seconds: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _notebook_seconds[path] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _notebook_seconds:
        return
    terminalreporter.section("notebook wall time (nbval)")
    for path, seconds in sorted(_notebook_seconds.items()):
        terminalreporter.write_line(f"{path:50s} {seconds:7.1f} s")
    terminalreporter.write_line(f"{'all notebooks':50s} {sum(_notebook_seconds.values()):7.1f} s")
