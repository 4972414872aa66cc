"""Every file of priors, analyze, eval and report, written under 2 processes, equals a one-process run's.

`pytest -k distributed` selects it with tests/test_distributed.py. One `torchrun
--nproc_per_node 2` launch and one plain process run `tests/distributed_worker.py outputs`:
the same stages, every output on, into two folders; then every file is compared. Only the
run-metadata fields named in `VARYING` may differ (and the eval timestamp in file names and
the fields that repeat them); PNGs are compared by their decoded pixels.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import REPO, WORKER, torchrun  # noqa: E402

# run-metadata fields that legitimately differ between two runs of the same stage
VARYING = {"time", "command", "world_size"}
STAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(-\d+)?")


def one_process(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def without_varying(value):
    """`value` with the VARYING keys dropped wherever they occur and eval timestamps replaced."""
    if isinstance(value, dict):
        return {k: without_varying(v) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [without_varying(v) for v in value]
    if isinstance(value, str):
        return STAMP.sub("<stamp>", value)
    return value


def files(root: Path) -> dict[str, Path]:
    return {STAMP.sub("<stamp>", str(p.relative_to(root))): p for p in sorted(root.rglob("*")) if p.is_file()}


def comparable(path: Path):
    """What must be equal between the runs: pixels of a PNG, tensors + metadata of safetensors, the text
    (JSON parsed, with VARYING dropped) of everything else."""
    if path.suffix == ".png":
        import matplotlib.image

        return matplotlib.image.imread(str(path))
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as fh:
            meta = {k: without_varying(json.loads(v)) if v[:1] in "[{" else v for k, v in fh.metadata().items()}
            return meta, {k: fh.get_tensor(k).numpy().tobytes() for k in fh.keys()}
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return without_varying(json.loads(text))
    if path.suffix == ".jsonl":
        return [without_varying(json.loads(line)) for line in text.splitlines()]
    return STAMP.sub("<stamp>", text)


def test_distributed_every_output_written_once_equals_one_process(tiny_model_dir, example_corpus, tmp_path):
    model = tiny_model_dir("qwen3_moe")
    sets = REPO / "examples"
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one_dir.mkdir()
    two_dir.mkdir()
    one_process("outputs", model, example_corpus, sets / "eval_mc.jsonl", sets / "eval_gen.jsonl", one_dir,
                tmp_path / "one_ranks.json")
    torchrun("outputs", model, example_corpus, sets / "eval_mc.jsonl", sets / "eval_gen.jsonl", two_dir,
             tmp_path / "two_ranks.json")

    one, two = files(one_dir), files(two_dir)
    assert sorted(two) == sorted(one)  # no file twice (a second stamp), none missing, no staging left over
    expected = {"priors.safetensors", "priors.safetensors.config.json", "report/report.json", "report/report.md",
                "report/report_config.json", "report/routing_js.png", "base/eval/results_<stamp>.json",
                "base/eval/samples_<stamp>.jsonl", "base/eval/eval_config_<stamp>.json",
                "base/eval_gen/results_<stamp>.json"}
    expected |= {f"{arm}/analysis/{name}" for arm in ("base", "other") for name in (
        "analysis.json", "analysis.csv", "analyze_config.json", "routing_js_heatmap.png", "routing_js_by_layer.png",
        "routing_entropy.png", "all_pairs_js.png", "expert_language_map.png", "hidden_alignment.png")}
    assert expected <= set(one), sorted(expected - set(one))
    assert not any(part.startswith(".") for name in one for part in Path(name).parts)
    assert len(list((two_dir / "base" / "eval").glob("results_*.json"))) == 1  # one rank wrote, once
    different = []
    for name in sorted(one):
        a, b = comparable(one[name]), comparable(two[name])
        same = (a.shape == b.shape and np.array_equal(a, b)) if isinstance(a, np.ndarray) else a == b
        if not same:
            different.append(name)
    assert not different, different
    # the run-metadata fields that were dropped are there, and world_size says what ran
    with safe_open(str(two_dir / "priors.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["metadata"])["world_size"] == 2
    analysis = json.loads((two_dir / "base" / "analysis" / "analysis.json").read_text())
    assert {"time", "command"} <= set(analysis["metadata"])
    assert analysis["hidden_alignment"]["mexa"] and analysis["num_examples"] == 20

    # every rank did a share: analyze's texts and eval's items split between the ranks, summing to one process's
    ref = json.loads((tmp_path / "one_ranks.json").read_text())
    ranks = json.loads((tmp_path / "two_ranks.json").read_text())
    assert ref["world_size"] == 1 and ranks["world_size"] == 2
    (ref_encoded, ref_scored), = ref["per_rank"]
    encoded, scored = zip(*ranks["per_rank"])
    assert sum(encoded) == ref_encoded and min(encoded) > 0 and max(encoded) < ref_encoded
    assert min(scored) > 0 and max(scored) < ref_scored  # MC batches are shared (generation runs on both)
    print(f"analyze texts per rank {encoded} (one process {ref_encoded}); eval rows per rank {scored} "
          f"(one process {ref_scored}); {len(one)} files equal")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
