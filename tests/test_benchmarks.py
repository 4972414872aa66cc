"""The benchmark scripts still run against the current library (smoke run; no timing asserted)."""

import re
import subprocess
import sys

from conftest import REPO


def test_bench_train_runs_and_prints_every_ratio():
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--steps", "2", "--hidden", "32",
           "--experts", "4", "--seq", "64", "--batch", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    for label in ("prior extraction", "cached / SFT step time", "online / SFT step time", "cached / SFT ="):
        match = re.search(re.escape(label) + r".*?= (\d+\.\d+)", result.stdout)
        assert match and float(match.group(1)) > 0, (label, result.stdout[-1500:])


def test_bench_analyze_runs_and_prints_both_ratios():
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_analyze.py"), "--groups", "12", "--langs", "3",
           "--hidden", "32", "--layers", "2", "--experts", "4", "--batch", "4", "--slices", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    for label in ("analysis without writing / plain", "analysis end to end (one writing) / plain"):
        match = re.search(re.escape(label) + r" = (\d+\.\d+)", result.stdout)
        assert match and float(match.group(1)) > 0, (label, result.stdout[-1500:])
