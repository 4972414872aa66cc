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
    arms = bench.ARMS
    assert arms == ("sft", "cached", "online", "sft_packed", "sara_packed")
    orders = [bench.arm_order(arms, r) for r in range(2 * len(arms))]
    assert orders[0] == list(arms) and orders[1] == ["cached", "online", "sft_packed", "sara_packed", "sft"]
    assert orders[len(arms):] == orders[:len(arms)]
    for position in range(len(arms)):
        assert sorted(order[position] for order in orders[:len(arms)]) == sorted(arms)


def test_step_time_ratios_are_medians_of_per_round_ratios():
    bench = bench_train()
    # the machine slows down in round 2: a ratio of medians would say 1.5/1.0, the per-round ratios say 1.2
    times = {"sft": [1.0, 1.0, 3.0], "cached": [1.2, 1.5, 3.6], "online": [2.0, 2.6, 6.3]}
    ratios = bench.step_time_ratios(times)
    assert ratios == pytest.approx({"cached": 1.2, "online": 2.1})
    assert set(ratios) == {"cached", "online"}
    assert bench.spread([1.2, 1.5, 1.2]) == "1.200 (min 1.200, max 1.500, 3 rounds)"
    with pytest.raises(ValueError, match="every arm needs one time per round"):
        bench.step_time_ratios({"sft": [1.0, 2.0], "cached": [1.0]})


def test_bench_train_prints_the_ratios_of_its_measured_times(tmp_path):
    times_json = tmp_path / "times.json"
    # one torch thread: two OpenMP threads stall on a loaded 2-core machine (a CI run beside other jobs
    # once took over 300 s here instead of ~9 s)
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), "--tiny", "--times-json", str(times_json),
           "--threads", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads(times_json.read_text())
    bench = bench_train()
    assert saved["orders"] == [bench.arm_order(bench.ARMS, r) for r in range(5)]  # rotated each round
    times, tokens = saved["times"], saved["tokens"]
    for arm, base in (("cached", "sft"), ("online", "sft"), ("sara_packed", "sft_packed")):
        per_round = [t / b for t, b in zip(times[arm], times[base])]
        printed = re.search(rf"{arm} / {base} step time = (\d+\.\d+) \(min (\d+\.\d+), max (\d+\.\d+), 5 rounds",
                            result.stdout)
        assert printed, result.stdout[-1500:]
        assert [float(x) for x in printed.groups()] == [round(statistics.median(per_round), 3),
                                                        round(min(per_round), 3), round(max(per_round), 3)]
    # tokens/s of packed vs padded SFT, per round, from the real tokens of each arm's batch
    assert tokens["sft_packed"] > 0 and tokens["sft"] > 0
    per_round = [(tokens["sft_packed"] / p) / (tokens["sft"] / s) for p, s in zip(times["sft_packed"], times["sft"])]
    printed = re.search(r"sft_packed / SFT tokens/s = (\d+\.\d+)", result.stdout)
    assert printed and float(printed.group(1)) == round(statistics.median(per_round), 3)
    match = re.search(r"prior extraction: .*? = (\d+\.\d+)", result.stdout)
    assert match and float(match.group(1)) > 0, result.stdout[-1500:]
    for arm, base in (("cached", "sft"), ("online", "sft"), ("sara_packed", "sft_packed")):
        match = re.search(rf"peak memory \(saved-for-backward \+ params/grads/Adam bytes\): {arm} / {base} = "
                          r"(\d+\.\d+)", result.stdout)
        assert match and float(match.group(1)) >= 1.0, (arm, result.stdout[-1500:])  # SARA never saves less


def test_gpu_smoke_is_a_prepared_script_that_refuses_without_cuda():
    """The GPU script is never run by tests (no GPU here); its CPU path refuses in one line."""
    if importlib.util.find_spec("torch") and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal path does not apply")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_smoke.py")], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "no CUDA device" in result.stderr


def test_bench_analyze_runs_and_prints_both_ratios():
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_analyze.py"), "--groups", "12", "--langs", "3",
           "--hidden", "32", "--layers", "2", "--experts", "4", "--batch", "4", "--slices", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    for label in ("analysis without writing / plain", "analysis end to end (one writing) / plain"):
        match = re.search(re.escape(label) + r" = (\d+\.\d+)", result.stdout)
        assert match and float(match.group(1)) > 0, (label, result.stdout[-1500:])


def test_bench_monitor_prints_the_ratios_of_its_measured_times(tmp_path):
    times_json = tmp_path / "times.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_monitor.py"), "--tiny", "--times-json", str(times_json),
           "--threads", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads(times_json.read_text())
    arms = ["plain", "monitor@default", "monitor@2"]
    assert saved["orders"] == [arms, arms[1:] + arms[:1]]  # rotated each round
    assert saved["every"] == {"monitor@default": 1, "monitor@2": 2}  # default cadence: logging_steps 1
    times = saved["times"]
    for arm in arms[1:]:
        per_round = [t / b for t, b in zip(times[arm], times["plain"])]
        printed = re.search(rf"{arm} / plain wall time = (\d+\.\d+) \(min (\d+\.\d+), max (\d+\.\d+), 2 rounds\)",
                            result.stdout)
        assert printed, result.stdout[-1500:]
        assert [float(x) for x in printed.groups()] == [round(statistics.median(per_round), 3),
                                                        round(min(per_round), 3), round(max(per_round), 3)]
        assert all(0 < m < t for m, t in zip(saved["monitor_seconds"][arm], times[arm]))  # passes ran, inside the run
    assert saved["monitor_seconds"]["plain"] == [0.0, 0.0]
    # every 2 of 4 steps (priors are the baseline: no step-0 pass); the default cadence runs as the budget allows
    assert saved["passes"]["monitor@2"] == [2, 2]
    assert all(1 <= p <= 4 for p in saved["passes"]["monitor@default"])
