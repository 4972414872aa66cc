"""The benchmark scripts run against the current library, and their ratios are computed from the measured times."""

import importlib.util
import json
import re
import statistics
import subprocess
import sys

import pytest
from conftest import REPO


def bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arm_order_rotates_so_each_arm_takes_each_position_equally():
    bench = bench_train()
    orders = [bench.arm_order(bench.ARMS, r) for r in range(6)]
    assert orders[:3] == [["sft", "cached", "online"], ["cached", "online", "sft"], ["online", "sft", "cached"]]
    assert orders[3:] == orders[:3]
    for position in range(3):
        assert sorted(order[position] for order in orders[:3]) == sorted(bench.ARMS)


def test_step_time_ratios_are_medians_of_per_round_ratios():
    bench = bench_train()
    # the machine slows down in round 2: a ratio of medians would say 1.5/1.0, the per-round ratios say 1.2
    times = {"sft": [1.0, 1.0, 3.0], "cached": [1.2, 1.5, 3.6], "online": [2.0, 2.6, 6.3]}
    ratios = bench.step_time_ratios(times)
    assert ratios == pytest.approx({"cached": 1.2, "online": 2.1})
    assert set(ratios) == {"cached", "online"}
    with pytest.raises(ValueError, match="every arm needs one time per round"):
        bench.step_time_ratios({"sft": [1.0, 2.0], "cached": [1.0]})


def test_bench_train_prints_the_ratios_of_its_measured_times(tmp_path):
    times_json = tmp_path / "times.json"
    # one torch thread: two OpenMP threads stall on a loaded 2-core machine (a CI run beside other jobs
    # once took over 300 s here instead of ~9 s)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--steps", "3", "--hidden", "32",
           "--experts", "4", "--seq", "64", "--batch", "2", "--times-json", str(times_json), "--threads", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads(times_json.read_text())
    assert [order[0] for order in saved["orders"]] == ["sft", "cached", "online"]  # rotated each round
    for arm in ("cached", "online"):
        per_round = [t / b for t, b in zip(saved["times"][arm], saved["times"]["sft"])]
        printed = re.search(arm + r" / SFT step time = (\d+\.\d+)", result.stdout)
        assert printed and float(printed.group(1)) == round(statistics.median(per_round), 3), result.stdout[-1500:]
    for label in ("prior extraction", "cached / SFT ="):
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
