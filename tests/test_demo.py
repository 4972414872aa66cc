"""`sara demo --size ci` runs end to end and writes a report that states its outcome."""

from __future__ import annotations

import json

from sara_moe.cli import main


def test_demo_ci_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--size", "ci", "--seeds", "1", "--output-dir", str(out)]) == 0
    md = out / "report" / "report.md"
    assert str(md) in capsys.readouterr().out
    text = md.read_text()
    assert "## What this demo shows" in text and "sara vs sft" in text and "en_other" in text
    report = json.loads((out / "report" / "report.json").read_text())
    assert {b["name"] for b in report["benchmarks"]} == {"mc:eval_mc_shared", "mc:eval_mc_en_only"}
    assert set(report["arms"]) == {"sft", "base", "sara"}
    for arm in ("sft-seed0", "sara-seed0"):
        assert (out / "runs" / arm / "model.safetensors").is_file()
    assert json.loads((out / "demo_config.json").read_text())["size"] == "ci"
