"""Multi-process SARA on CPU: 2 ranks under torchrun (gloo) against one process on the same data.

`pytest -k distributed` selects these. Each test launches `tests/distributed_worker.py` with
`python -m torch.distributed.run --nproc_per_node 2` (accelerate launch --cpu starts one
process on a machine without MPI) and compares what rank 0 wrote with a one-process run
computed here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sara_moe import priors as P
from sara_moe.architectures import find_routers
from sara_moe.train import build_trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_cases import global_batch_rows, sara_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def torchrun(*args, timeout=240):
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(WORKER), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def qwen_priors(tiny_model_dir, example_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_priors") / "priors.safetensors"
    return P.extract_priors(str(tiny_model_dir("qwen3_moe")), example_corpus, out, progress=False)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, example_corpus, qwen_priors, tmp_path_factory):
    """One process, the whole global batch, the code path the ranks run (SaraTrainer.compute_loss + backward)."""
    trainer, _ = build_trainer(sara_config(tmp_path_factory.mktemp("one") / "run", tiny_model_dir("qwen3_moe"),
                                           example_corpus, qwen_priors))
    rows = global_batch_rows(trainer.train_dataset)
    # HF/TRL Trainer internals with no public equivalent (see test_train.first_batch): the batch preparation
    # and label-token count `training_step` uses, and TRL's per-call metric buffer
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in rows]))
    num_items = trainer._get_num_items_in_batch([inputs], torch.device("cpu"))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=num_items)
    loss.backward()
    sites = find_routers(trainer.model)
    return {"rows": rows, "loss": loss.item(), "js": trainer._metrics["train"]["js_loss"][-1],
            "sites": [[s.layer, s.name] for s in sites], "prior_table": trainer.prior_table,
            "grads": {s.layer: s.module.weight.grad.clone() for s in sites}}


def assert_matches_one_process(report, sharded, one):
    assert report["world_size"] == 2 and report["rows"] == one["rows"]
    # routers found through the wrappers (FSDP2 + checkpoint wrapper rename the path, not the layer)
    assert [layer for layer, _ in report["layers_after"]] == [layer for layer, _ in one["sites"]]
    assert [name.replace("._checkpoint_wrapped_module", "") for _, name in report["layers_after"]] == \
        [name for _, name in one["sites"]]
    assert one["js"] > 0.01 and abs(report["js_logged"] - one["js"]) < 1e-5, (report["js_logged"], one["js"])
    assert abs(sharded["loss"].item() - one["loss"]) < 1e-5, (sharded["loss"].item(), one["loss"])
    diffs = {}
    for layer, grad in one["grads"].items():
        assert grad.abs().max() > 1e-4  # the comparison is not between zeros
        diffs[layer] = (sharded[f"router_grad.{layer}"] - grad).abs().max().item()
        assert diffs[layer] < 1e-5, (layer, diffs[layer])
    print(f"loss {sharded['loss'].item():.8f} vs one process {one['loss']:.8f}; max |router grad diff| per layer {diffs}")


def test_distributed_fsdp2_sara_loss_and_router_grads_match_one_process(tiny_model_dir, example_corpus, qwen_priors,
                                                                       one_process, tmp_path):
    from safetensors.torch import load_file

    torchrun("fsdp", tiny_model_dir("qwen3_moe"), example_corpus, qwen_priors, tmp_path)
    report = json.loads((tmp_path / "fsdp.json").read_text())
    assert_matches_one_process(report, load_file(str(tmp_path / "fsdp.safetensors")), one_process)
    assert report["sharded_decoder_layers"] == 4 and report["router_weight_is_dtensor"] == "DTensor"
    assert report["layers_before"] == one_process["sites"]
    assert all("._checkpoint_wrapped_module." in name for _, name in report["layers_after"])
    # priors: each rank read the shared file itself and holds the same aligned table as this process
    assert report["ranks_whose_priors_equal_file"] == 2
    table = one_process["prior_table"].double()
    assert report["prior_square_sum_over_ranks"] == pytest.approx(2 * (table ** 2).sum().item(), rel=1e-12)
    # two real steps through Trainer.train() with both ranks: DDP (accelerate's CPU engine) and FSDP2
    # (Accelerator.prepare's FSDP2 path); same batches, so the same losses and gradient norms
    assert report["train_world_size"] == 2 and report["fsdp2_train_wrapped"]
    assert report["train_engines"] == ["DistributedType.MULTI_CPU", "DistributedType.FSDP"]
    ddp, fsdp2 = report["train_logs"]["ddp"], report["train_logs"]["fsdp2"]
    assert len(ddp) == len(fsdp2) == 2 and ddp[0]["js_loss"] > 0.01
    for a, b in zip(ddp, fsdp2):
        for key in ("loss", "ce_loss", "js_loss", "grad_norm"):
            assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (key, a, b)
    print(f"Trainer.train() DDP vs FSDP2 logs: {ddp} vs {fsdp2}")


@pytest.fixture(scope="module")
def deepspeed():  # module scope and first in the test's arguments: skip before the reference is computed
    return pytest.importorskip("deepspeed", reason="optional: DeepSpeed is not installed (pip install deepspeed)")


def test_distributed_zero3_sara_loss_and_router_grads_match_one_process(deepspeed, tiny_model_dir, example_corpus,
                                                                       qwen_priors, one_process, tmp_path):
    from safetensors.torch import load_file

    torchrun("zero3", tiny_model_dir("qwen3_moe"), example_corpus, qwen_priors, tmp_path)
    report = json.loads((tmp_path / "zero3.json").read_text())
    assert_matches_one_process(report, load_file(str(tmp_path / "zero3.safetensors")), one_process)
    assert report["leaf_classes"] == ["Qwen3MoeSparseMoeBlock"]
    assert all(shape == [0] for shape in report["router_shapes_outside_forward"])  # really partitioned


def test_distributed_priors_split_across_ranks_equal_one_process(tiny_model_dir, example_corpus, qwen_priors, tmp_path):
    # chunks of 3 groups, several per rank and an uneven split (one run: each torchrun costs ~15 s in CI)
    out = tmp_path / "priors2.safetensors"
    torchrun("priors", tiny_model_dir("qwen3_moe"), example_corpus, out, 3)
    one, two = P.load_priors(qwen_priors), P.load_priors(out)
    assert two.ids == one.ids and two.layers == one.layers and two.text_sha == one.text_sha
    assert two.fingerprint == one.fingerprint
    assert (two.table - one.table).abs().max().item() < 1e-6
    ranks = json.loads(Path(str(out) + ".ranks.json").read_text())
    tokenized, forwarded = zip(*ranks["per_rank"])
    # each rank did only its share: 20 groups in 7 chunks of at most 3, dealt round-robin (3+3+3+2 | 3+3+3)
    assert sum(tokenized) == sum(forwarded) == len(one.ids) == 20
    assert list(tokenized) == list(forwarded) == [11, 9]
    config = json.loads(Path(str(out) + ".config.json").read_text())  # the resolved PriorsConfig
    assert config["chunk_groups"] == 3 and config["output"] == str(out)
    with safe_open(str(out), "pt") as fh:  # the run record rides in the file's metadata
        assert json.loads(fh.metadata()["metadata"])["world_size"] == 2 and ranks["exists_on_return"]
    assert not Path(str(out) + ".partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["priors2.safetensors", "priors2.safetensors.config.json",
                                                          "priors2.safetensors.ranks.json"]
