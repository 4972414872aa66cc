"""report.html in a real headless browser: Debian's chromium driven by Selenium, from file://, offline.

The routing maps come from real `sara analyze` runs of a tiny model (before) and of the same
model with perturbed routers (after); the page must load with no severe console message and
no network request, show one heatmap per language and layer band, draw the analysis' numbers,
and redraw other numbers when the language selector changes. Chromium and its driver are
installed by `.ci/run` (apt-get); without them this test fails, it never skips.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def _browser_paths() -> tuple[str, str]:
    browser = next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("chromium or chromedriver is missing: .ci/run should have installed them "
                    "(apt-get install -y chromium chromium-driver)", pytrace=False)
    return browser, driver


@pytest.fixture()
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: .ci/run should have installed it (scripts/setup.sh, the test extra)",
                    pytrace=False)
    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", "--disable-background-networking"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def _fake_eval(root: Path, name: str, correct: dict, n: int = 20) -> Path:
    out = root / name / "eval"
    out.mkdir(parents=True)
    rows = [{"id": f"q{i}", "lang": lang, "acc": float(i < k)} for lang, k in correct.items() for i in range(n)]
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "results_2026-01-01T00-00-00.json").write_text(json.dumps({
        "task": "mc", "metrics": ["acc"], "data": "eval_mc.jsonl", "samples_file": "samples.jsonl",
        "per_language": {lang: {"acc": k / n, "n": n} for lang, k in correct.items()}}))
    return out


@pytest.fixture()
def report_page(tiny_model_dir, example_corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sara_moe.analysis.analyze import analyze
    from sara_moe.reporting.report import build_report

    base = tiny_model_dir("qwen3_moe")
    moved = tmp_path / "moved_model"  # stands in for the trained model: same model, routers perturbed
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.add_(3 * torch.randn_like(param))
    model.save_pretrained(moved)
    AutoTokenizer.from_pretrained(base).save_pretrained(moved)
    run = _fake_eval(tmp_path, "sara-seed0", {"sw": 14, "es": 12, "en": 15})
    baseline = _fake_eval(tmp_path, "sft-seed0", {"sw": 9, "es": 11, "en": 15})
    analyze(str(base), example_corpus, tmp_path / "sara-seed0" / "analysis_before", progress=False)
    analyze(str(moved), example_corpus, tmp_path / "sara-seed0" / "analysis", progress=False)
    (tmp_path / "sara-seed0" / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"step": s, "monitor/js/es": 0.3 - 0.01 * s, "monitor/js/sw": 0.5 - 0.02 * s,
         "monitor/english_drift": 0.001 * s, "monitor/load_entropy/layer_2": 1.9,
         "monitor/dead_experts/layer_2": 0.0, "monitor/seconds": 0.1} for s in (0, 5, 10)]}))
    build_report([baseline, run], tmp_path / "report")
    analyses = {state: json.loads((tmp_path / "sara-seed0" / folder / "analysis.json").read_text())
                for state, folder in (("before", "analysis_before"), ("after", "analysis"))}
    return tmp_path / "report" / "report.html", analyses


def _shares(analysis: dict, lang: str, layers: list) -> np.ndarray:
    counts = np.asarray(analysis["experts"]["counts"], dtype=float)[analysis["experts"]["langs"].index(lang)]
    rows = counts[[analysis["moe_layers"].index(x) for x in layers]]
    return rows / np.clip(rows.sum(-1, keepdims=True), 1e-12, None)


READ_HEATMAPS = """
return Array.from(document.querySelectorAll('.sara-plot[data-kind=heatmap]')).map(function (gd) {
  return {id: gd.id, band: gd.dataset.band, shown: gd.style.display !== 'none',
          drawn: gd.querySelectorAll('.heatmaplayer image').length,
          traces: gd.data.map(function (t) { return {type: t.type, lang: t.meta.lang, visible: t.visible, z: t.z}; })};
});
"""


def _visible(heatmap: dict) -> dict:
    [trace] = [t for t in heatmap["traces"] if t["visible"] is True]
    return trace


def _wait_for_language(driver, lang: str) -> list:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(
        lambda d: all(_visible(h)["lang"] == lang for h in d.execute_script(READ_HEATMAPS)))
    return driver.execute_script(READ_HEATMAPS)


def test_report_html_in_headless_chromium(browser, report_page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    page, analyses = report_page
    browser.get(page.resolve().as_uri())
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")

    after = analyses["after"]
    langs, bands = after["experts"]["langs"], analyses["before"]["all_pairs_js"]["bands"]  # bands: the base model's
    assert langs == ["en", "es", "sw"] and len(bands) >= 2
    heatmaps = browser.execute_script(READ_HEATMAPS)
    # per state (before, after) of the one arm with analyses: one figure per band, one heatmap per language
    assert len(heatmaps) == 2 * len(bands)
    for state in ("before", "after"):
        mine = [h for h in heatmaps if f"-{state}-" in h["id"]]
        assert sorted(h["band"] for h in mine) == sorted(bands)
        assert {(t["lang"], h["band"]) for h in mine for t in h["traces"] if t["type"] == "heatmap"} == \
            {(lang, band) for lang in langs for band in bands}
        assert all(h["drawn"] == 1 and h["shown"] for h in mine)  # each drew its one visible heatmap
    # the drawn values are the analysis' dispatch shares of the default language (the first non-anchor one)
    for h in heatmaps:
        state = "before" if "-before-" in h["id"] else "after"
        trace = _visible(h)
        assert trace["lang"] == "es"
        assert np.allclose(trace["z"], _shares(analyses[state], "es", bands[h["band"]]))

    Select(browser.find_element(By.ID, "lang-select")).select_by_value("sw")
    switched = _wait_for_language(browser, "sw")
    for old, new in zip(heatmaps, switched):
        state = "before" if "-before-" in new["id"] else "after"
        assert np.allclose(_visible(new)["z"], _shares(analyses[state], "sw", bands[new["band"]]))
        assert not np.allclose(_visible(new)["z"], _visible(old)["z"])  # switching changed the drawn values
    monitor = browser.execute_script("return document.getElementById('monitor-js').data.filter("
                                     "function (t) { return t.visible === true; }).map(function (t) { return t.y; });")
    assert np.allclose(monitor, [[0.5, 0.4, 0.3]])  # sw's probe JS at steps 0, 5, 10

    Select(browser.find_element(By.ID, "band-select")).select_by_value("middle")
    shown = [h for h in browser.execute_script(READ_HEATMAPS) if h["shown"]]
    assert sorted(h["band"] for h in shown) == ["middle", "middle"]

    # hover on one cell shows its value
    gd = next(h for h in shown if "-after-" in h["id"])
    browser.execute_script("Plotly.Fx.hover(arguments[0], {xval: 1, yval: 0});", gd["id"])  # expert 1, first row
    hover = WebDriverWait(browser, 10).until(lambda d: d.execute_script(
        "var n = document.querySelector('#' + arguments[0] + ' .hoverlayer'); return n && n.textContent;", gd["id"]))
    assert f"share of slots {_shares(after, 'sw', bands['middle'])[0, 1]:.4f}" in hover and hover.startswith("sw")

    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == [], severe
    requests = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
    assert urls and all(url.startswith(("file:", "data:", "blob:", "about:")) for url in urls), urls
