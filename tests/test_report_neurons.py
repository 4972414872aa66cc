"""`sara report --neurons`: the `sara neurons --compare` numbers of two real tiny models, as report.md shows them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from sara_moe.analysis.neurons import NeuronsConfig, neurons
from sara_moe.reporting.report import build_report

TYPES = ("specific", "related", "agnostic")
N = 20  # eval items per language


def _eval_run(root: Path, name: str, correct: dict) -> Path:
    """A fake `sara eval` output dir: results + samples where items [0, correct[lang]) are right."""
    out = root / name / "eval"
    out.mkdir(parents=True)
    rows = [{"id": f"q{i}", "lang": lang, "acc": float(i < k)} for lang, k in correct.items() for i in range(N)]
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "results_2026-01-01T00-00-00.json").write_text(json.dumps({
        "task": "mc", "metrics": ["acc"], "data": "eval_mc.jsonl", "samples_file": "samples.jsonl",
        "per_language": {lang: {"acc": k / N, "n": N} for lang, k in correct.items()}}))
    return out


def _neurons(model_dir, corpus, out):
    # 5% of the neurons per method, so each band holds a few of every language's
    return neurons(NeuronsConfig(model=str(model_dir), data=str(corpus), output_dir=str(out), device="cpu",
                                 lnp_top_rate=0.05, lape_top_rate=0.05))


@pytest.fixture(scope="module")
def comparison(tiny_model_dir, example_corpus, tmp_path_factory):
    """`sara neurons` on a tiny Qwen3-MoE and on a copy with perturbed experts, then `--compare`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("neuron_report")
    base = tiny_model_dir("qwen3_moe")
    moved = root / "moved_model"
    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("experts.gate_up_proj"):
                param.add_(2 * param.std() * torch.randn(param.shape, generator=generator))
    model.save_pretrained(moved)
    AutoTokenizer.from_pretrained(base).save_pretrained(moved)
    _neurons(base, example_corpus, root / "base")
    _neurons(moved, example_corpus, root / "sft")
    neurons(NeuronsConfig(output_dir=str(root / "cmp"), compare=[str(root / "base"), str(root / "sft")]))
    runs = [_eval_run(root, "base-seed0", {"en": 15, "sw": 8, "es": 11}),
            _eval_run(root, "sft-seed0", {"en": 15, "sw": 12, "es": 11})]
    return root, runs


def _section(text: str, head: str) -> str:
    """The lines of `text` from the heading `head` to the next heading of the same or a higher level."""
    level = head.split(" ")[0]
    start = text.index(head + "\n")
    stop = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(head) + 1:], flags=re.M)
    return text[start:] if stop is None else text[start:start + len(head) + 1 + stop.start()]


def _table(text: str, first_head: str) -> tuple[list, list]:
    """(head, rows) of the markdown table whose header row starts `| first_head |`."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_head} |"))
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
    rows = []
    for line in lines[at + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return cells(lines[at]), rows


def _share(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def test_report_shows_the_neuron_comparison(comparison, monkeypatch):
    from matplotlib.axes import Axes

    root, runs = comparison
    found = json.loads((root / "cmp" / "neurons_compare.json").read_text())
    bars, bar = [], Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda self, x, h, *a, **kw: bars.append((self.get_title(), kw.get("label"),
                                                                               list(h))) or bar(self, x, h, *a, **kw))
    report = build_report(runs, root / "report", neurons=[str(root / "cmp")])
    text = (root / "report" / "report.md").read_text(encoding="utf-8")
    langs, bands, anchor = found["langs"], found["bands"], found["anchor"]
    assert langs == ["en", "sw", "es"] and anchor == "en" and list(bands) == ["early", "middle", "late"]

    # the band sums of the base's specific neurons, from its neurons.json lists: what the comparison summed
    base_lists = json.loads((root / "base" / "neurons.json").read_text())["classification"]
    for method in ("lnp", "lape"):
        for band, layers in bands.items():
            for lang in langs:
                listed = sum(1 for layer, kind, _, _ in base_lists[method]["neurons"][lang]["specific"]
                             if kind == "routed" and layer in layers)
                assert found["methods"][method]["base"]["counts"]["specific"][band][lang] == listed

    section = _section(text, f"## Language neurons — {root / 'cmp' / 'neurons_compare.json'}")
    assert text.index("## Outcome") < text.index("## mc:eval_mc") < text.index(section)
    changed = 0
    for method, name in (("lnp", "LNP"), ("lape", "LAPE")):
        block = _section(section, f"### {name}")
        base, run = found["methods"][method]["base"], found["methods"][method]["runs"]["sft"]
        head, rows = _table(block, "band")
        assert head == ["band", "lang"] + [f"{t}: base → sft" for t in TYPES]
        assert [row[:2] for row in rows] == [[band, lang] for band in bands for lang in langs]
        for row in rows:
            band, lang = row[:2]
            for t, cell in zip(TYPES, row[2:]):
                before, after = base["counts"][t][band][lang], run["counts"][t][band][lang]
                assert cell == f"{before} → {after} ({after - before:+d})"
        for band, layers in bands.items():
            [line] = [x for x in block.splitlines() if x.startswith(f"- **sft** vs base in band {band} (")]
            diffs = [(t, lang, base["counts"][t][band][lang], run["counts"][t][band][lang])
                     for t in TYPES for lang in langs if run["counts"][t][band][lang] != base["counts"][t][band][lang]]
            changed += len(diffs)
            assert len(re.findall(r" (?:more|fewer) ", line)) == len(diffs)
            for t, lang, before, after in diffs:
                k = abs(after - before)
                assert (f"{k} {'more' if after > before else 'fewer'} {lang}-{t} neuron{'' if k == 1 else 's'} "
                        f"({before} → {after})") in line
            if not diffs:
                assert "no type's count changed in any language" in line
        head, rows = _table(block, "lang")
        assert head == ["lang", f"overlap with {anchor}: base → sft", "specific kept: sft"]
        assert rows == [[lang, f"{_share(base['overlap_with_anchor'][lang])} → "
                               f"{_share(run['overlap_with_anchor'][lang])}", _share(run["kept_specific"][lang])]
                        for lang in langs]
        [line] = [x for x in block.splitlines() if x.startswith("- **sft**: overlap")]
        for lang in langs[1:]:
            assert f"{lang} {_share(base['overlap_with_anchor'][lang])} → {_share(run['overlap_with_anchor'][lang])}" \
                in line
    assert changed > 0  # the perturbed experts moved some counts: the sentences name real changes

    png = root / "report" / "neurons_specific.png"
    assert "![neurons_specific.png](neurons_specific.png)" in section
    # the plot's bars: per method and band, base then sft, the specific counts per language (the accuracy
    # plot's bars, of arms also called base and sft, have other titles)
    drawn = [(label, heights) for title, label, heights in bars if title.startswith(("LNP · ", "LAPE · "))]
    assert drawn == [(label, [(m["base"] if label == "base" else m["runs"]["sft"])["counts"]["specific"][band][lang]
                              for lang in langs])
                     for m in (found["methods"]["lnp"], found["methods"]["lape"]) for band in bands
                     for label in ("base", "sft")]
    from PIL import Image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    saved = json.loads((root / "report" / "report.json").read_text())
    [entry] = saved["neurons"]["comparisons"]
    assert entry["methods"] == found["methods"] and entry["plots"] == ["neurons_specific.png"]
    assert entry["runs"] == {"sft": str(root / "sft")} and entry["base"] == str(root / "base")
    assert report["neurons"]["comparisons"][0]["labels"] == ["sft"]
    assert json.loads((root / "report" / "report_config.json").read_text())["neurons"] == [str(root / "cmp")]
    page = (root / "report" / "report.html").read_text(encoding="utf-8")
    lape = found["methods"]["lape"]  # report.html: the same rows as plain tables
    pairs = [(lape["base"]["counts"][t]["middle"]["sw"], lape["runs"]["sft"]["counts"][t]["middle"]["sw"]) for t in TYPES]
    cells = [f"{b} → {r} ({r - b:+d})" for b, r in pairs]
    assert "<tr><td>middle</td><td>sw</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in page


def test_bad_neuron_files_are_refused_in_one_line(comparison, tmp_path, capsys):
    from sara_moe.cli import main

    root, runs = comparison
    empty = tmp_path / "no_comparison"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no_comparison: no neurons_compare\.json there; run `sara neurons --compare"):
        build_report(runs, tmp_path / "r1", neurons=[str(empty)])
    with pytest.raises(ValueError, match=r"neurons\.json: a `sara neurons` output, not a comparison; run `sara neurons"):
        build_report(runs, tmp_path / "r2", neurons=[str(root / "base" / "neurons.json")])
    broken = json.loads((root / "cmp" / "neurons_compare.json").read_text())
    del broken["methods"]["lape"]["runs"]["sft"]["kept_specific"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "neurons_compare.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"field 'methods\.lape\.runs\.sft\.kept_specific\.en' is missing"):
        build_report(runs, tmp_path / "r3", neurons=[str(tmp_path / "old")])
    bad_delta = json.loads((root / "cmp" / "neurons_compare.json").read_text())
    bad_delta["methods"]["lnp"]["runs"]["sft"]["delta"]["related"]["late"]["es"] += 1
    (tmp_path / "edited.json").write_text(json.dumps(bad_delta))
    with pytest.raises(ValueError, match=r"delta\.related\.late\.es' is .*not the run's count minus the base's"):
        build_report(runs, tmp_path / "r4", neurons=[str(tmp_path / "edited.json")])
    shutil.copy(root / "cmp" / "neurons_compare.json", tmp_path / "good.json")
    capsys.readouterr()
    assert main(["report", *map(str, runs), "--output-dir", str(tmp_path / "cli"),
                 "--neurons", str(tmp_path / "good.json"), str(empty)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{empty}: no neurons_compare.json there" in err
    assert not any(tmp_path.glob("r*/report.json")) and not (tmp_path / "cli").exists()  # nothing was written


def test_an_unchanged_run_and_a_second_comparison(comparison, tmp_path):
    """The base compared with itself: every count unchanged, every specific neuron kept; two comparisons, two plots."""
    root, runs = comparison
    same = tmp_path / "again" / "base"
    shutil.copytree(root / "base", same)
    neurons(NeuronsConfig(output_dir=str(tmp_path / "self_cmp"), compare=[str(root / "base"), str(same)]))
    found = json.loads((tmp_path / "self_cmp" / "neurons_compare.json").read_text())
    report = build_report(runs, tmp_path / "report", neurons=[str(root / "cmp"), str(tmp_path / "self_cmp")])
    text = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    section = _section(text, f"## Language neurons — {tmp_path / 'self_cmp' / 'neurons_compare.json'}")
    for method, name in (("lnp", "LNP"), ("lape", "LAPE")):
        block = _section(section, f"### {name}")
        for band in found["bands"]:
            assert f"- **base** vs base in band {band} (" in block
        assert block.count("no type's count changed in any language.") == len(found["bands"])
        kept = found["methods"][method]["runs"]["base"]["kept_specific"]
        assert all(v in (1.0, None) for v in kept.values())  # the same neurons: Jaccard 1 (or none at all)
        assert f"specific neurons kept from base (Jaccard): {', '.join(f'{k} {_share(v)}' for k, v in kept.items())}." \
            in block
    assert [c["plots"] for c in report["neurons"]["comparisons"]] == [["neurons_specific.png"], ["neurons_specific_2.png"]]
    assert "![neurons_specific_2.png](neurons_specific_2.png)" in section
    assert (tmp_path / "report" / "neurons_specific_2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
