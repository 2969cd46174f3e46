"""The benchmark report: docs/performance.md is regenerated from the committed result files.

Timings are never asserted here (benchmarks are scripts that print figures); these tests check
that the report renders every row the speed issue asks for from the JSON that ships, and the
small helpers that pick settings by machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_precision  # noqa: E402
import make_report  # noqa: E402
import run_all  # noqa: E402


@pytest.fixture
def report(tmp_path, monkeypatch) -> str:
    monkeypatch.setattr(make_report, "DOC", tmp_path / "performance.md")
    monkeypatch.setattr(make_report, "PLOT", tmp_path / "performance.png")
    assert make_report.main() == 0
    return (tmp_path / "performance.md").read_text()


def test_report_has_every_target_row(report):
    for needle in ("plain PyTorch channels_last loop", "multiply-add peak", "mixed_bfloat16 >=",
                   "inference (batch 256)", "LSUV init <= 2 s", "ZCA fit (50,000 images)",
                   "quick notebook suite", "test-set evaluation <= 60 s",
                   "`make bench` <= 15 min"):
        assert needle in report, needle
    assert "not measured" not in report.split("## Targets")[1].split("##")[0]


def test_report_has_machine_profile_and_history(report):
    assert "## Machine" in report and "## Profile of a training step" in report
    assert "## Other machines" in report and "2026-11-28_avx2" in report
    for impl in make_report.IMPL_NAMES.values():
        assert impl in report


def test_report_matches_the_committed_document(report):
    committed = (BENCH.parent / "docs" / "performance.md").read_text()
    assert report == committed, "docs/performance.md drifted: run benchmarks/make_report.py"


@pytest.mark.parametrize("n, expected", [(1, [1]), (6, [1, 2, 3, 4, 5, 6]),
                                         (600, [1, 68, 134, 201, 267, 334, 400, 467, 533, 600])])
def test_shown_steps(n, expected):
    assert bench_precision.shown_steps(n) == expected


def test_machine_sentence_follows_the_flags():
    assert "AVX-512" in make_report.machine_sentence({"avx512f": True, "avx512_bf16": True})
    assert "no AVX-512" in make_report.machine_sentence({"avx512f": False, "avx2": True})
    assert make_report.onednn_is_default({"avx512_vnni": True})
    assert not make_report.onednn_is_default({"avx2": True, "avx512f": False})


@pytest.mark.parametrize("bf16, steps", [(True, "600"), (False, "6")])
def test_precision_check_length_follows_the_hardware(monkeypatch, bf16, steps):
    monkeypatch.setattr(run_all, "cpu_info",
                        lambda: {"flags": {"avx512_bf16": bf16, "amx_bf16": False}})
    args = run_all.precision_step(accuracy=False)
    assert args[args.index("--accuracy-steps") + 1] == steps
