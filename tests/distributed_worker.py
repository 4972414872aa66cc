"""One rank of the multi-process tests (tests/test_distributed.py); run by `torchrun --nproc_per_node 2`.

    torchrun --nproc_per_node 2 tests/distributed_worker.py fsdp MODEL CORPUS PRIORS OUT_DIR
    torchrun --nproc_per_node 2 tests/distributed_worker.py zero3 MODEL CORPUS PRIORS OUT_DIR
    torchrun --nproc_per_node 2 tests/distributed_worker.py priors MODEL CORPUS OUT_FILE CHUNK_GROUPS
    torchrun --nproc_per_node 2 tests/distributed_worker.py outputs MODEL CORPUS EVAL_MC EVAL_GEN OUT_DIR RANKS_FILE
    python tests/distributed_worker.py outputs ...     # the same stages in one process, the reference

`fsdp`: builds SaraTrainer on every rank (its accelerate state joins torchrun's gloo group),
shards the model with accelerate's own FSDP2 preparation (`fsdp2_apply_ac`: non-reentrant
activation checkpointing per decoder layer, then `fsdp2_prepare_model`: one `fully_shard` per
decoder layer, embeddings, tail, root), runs `SaraTrainer.compute_loss` on
this rank's half of the global batch and backward, then two `trainer.train()` steps on fresh
trainers: under accelerate's CPU engine (DDP) and under FSDP2 through `Accelerator.prepare`. Rank 0 writes what the test compares.
`zero3`: the same loss and backward through a DeepSpeed ZeRO-3 engine (`deepspeed.initialize`,
MoE blocks as ZeRO-3 leaves); accelerate's own DeepSpeed path cannot run on CPU (its state
sees no GPU backend and counts one process while DeepSpeed runs two).
`priors`: `sara priors` itself, sharded across the ranks.
`outputs`: priors, analyze (twice), eval (MC twice, generation once) and report with every
output on, into one folder (tests/test_multiprocess_outputs.py compares it with one process).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

from distributed_cases import global_batch_rows, sara_config  # noqa: E402


def fsdp_case(model_dir, corpus, priors, out_dir):
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FSDPModule

    from sara_moe.architectures import find_routers
    from sara_moe.priors import load_priors
    from sara_moe.runtime import distributed as dist
    from sara_moe.train import build_trainer

    out_dir = Path(out_dir)
    trainer, _ = build_trainer(sara_config(out_dir / "fsdp", model_dir, corpus, priors))
    rank, world = dist.rank(), dist.world_size()
    assert world == 2, f"expected 2 ranks from torchrun, got {world}"
    layers_before = [(s.layer, s.name) for s in find_routers(trainer.model)]

    # Priors: every rank reads the shared file itself; its table is the file's aligned columns.
    cache = load_priors(priors)
    cols = [cache.layers.index(layer) for layer in trainer.align_layers]
    priors_equal_file = bool(torch.equal(trainer.prior_table, cache.table[:, cols, :]))

    # FSDP2 exactly as accelerate prepares it (its CPU state drops the plugin, so call its preparer).
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Qwen3MoeDecoderLayer"],
                                            reshard_after_forward=True, cpu_ram_efficient_loading=False,
                                            activation_checkpointing=True)  # as configs/accelerate/fsdp2.yaml
    stand_in = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                               mixed_precision="no", is_main_process=rank == 0, device=torch.device("cpu"))
    model = fsdp2_prepare_model(stand_in, fsdp2_apply_ac(stand_in, trainer.model))  # Accelerator.prepare's order
    trainer.model = trainer.model_wrapped = model
    sharded_layers = sum(isinstance(layer, FSDPModule) for layer in model.model.layers)
    sites = find_routers(model)
    inputs, num_items, rows = half_batch(trainer, rank, world)
    model.train()
    loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=num_items)
    js_local = trainer._metrics["train"]["js_loss"][-1]
    loss.backward()
    grads = {f"router_grad.{s.layer}": s.module.weight.grad.full_tensor().contiguous() for s in sites}
    mean_loss = dist.all_sum(loss.detach()) / world
    # each rank's own prior table: equal to the file, and the same on both ranks (checksums summed over ranks)
    prior_checks = dist.all_sum(torch.tensor([float(priors_equal_file), (trainer.prior_table.double() ** 2).sum().item()],
                                             dtype=torch.float64))

    # Two real optimisation steps through Trainer.train(): under accelerate's CPU engine (DDP), then
    # under FSDP2 through Accelerator.prepare. accelerate's CPU state drops the FSDP plugin; we set the
    # two fields its GPU branch sets (distributed_type, fsdp_plugin), nothing else.
    ddp, _ = build_trainer(sara_config(out_dir / "train", model_dir, corpus, priors, max_steps=2))
    ddp.train()
    engines = [str(ddp.accelerator.distributed_type)]  # read now: accelerate's state is one per process
    sharded_run, _ = build_trainer(sara_config(out_dir / "train_fsdp", model_dir, corpus, priors, max_steps=2))
    state = sharded_run.accelerator.state
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Qwen3MoeDecoderLayer"],
        reshard_after_forward=True, cpu_ram_efficient_loading=False, activation_checkpointing=True)
    sharded_run.is_fsdp_enabled = True
    engines.append(str(sharded_run.accelerator.distributed_type))
    sharded_run.train()
    logs = {name: [{k: h[k] for k in ("loss", "ce_loss", "js_loss", "grad_norm")}
                   for h in run.state.log_history if "js_loss" in h] for name, run in (("ddp", ddp), ("fsdp2", sharded_run))}
    if rank == 0:
        save_file({"loss": mean_loss.reshape(1), **grads}, str(out_dir / "fsdp.safetensors"))
        (out_dir / "fsdp.json").write_text(json.dumps({
            "world_size": world, "layers_before": layers_before, "layers_after": [(s.layer, s.name) for s in sites],
            "sharded_decoder_layers": sharded_layers, "router_weight_is_dtensor":
                type(sites[0].module.weight).__name__, "ranks_whose_priors_equal_file": prior_checks[0].item(),
            "prior_square_sum_over_ranks": prior_checks[1].item(), "js_logged": js_local, "rows": rows,
            "train_logs": logs, "train_world_size": ddp.args.world_size,
            "train_engines": engines,
            "fsdp2_train_wrapped": isinstance(sharded_run.model_wrapped, FSDPModule)
            and sum(isinstance(layer, FSDPModule) for layer in sharded_run.model.model.layers) == 4}))


def half_batch(trainer, rank, world):
    rows = global_batch_rows(trainer.train_dataset)
    mine = rows[rank * len(rows) // world: (rank + 1) * len(rows) // world]
    # HF Trainer internals with no public equivalent (see test_train.first_batch), as `training_step` uses them
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in mine]))
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets for one micro-batch per step
    return inputs, trainer._get_num_items_in_batch([inputs], torch.device("cpu")), rows


def zero3_case(model_dir, corpus, priors, out_dir):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from safetensors.torch import save_file

    from sara_moe.architectures import find_routers
    from sara_moe.runtime import distributed as dist
    from sara_moe.train import build_trainer

    out_dir = Path(out_dir)
    trainer, _ = build_trainer(sara_config(out_dir / "zero3", model_dir, corpus, priors))
    leaves = dist.mark_zero3_leaf_modules(trainer.model)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=trainer.model, config=config,
                                      optimizer=torch.optim.SGD(trainer.model.parameters(), lr=0.0))
    trainer.model = trainer.model_wrapped = engine.module
    inputs, num_items, rows = half_batch(trainer, dist.rank(), dist.world_size())
    engine.train()
    loss = trainer.compute_loss(engine, dict(inputs), num_items_in_batch=num_items)
    js_logged = trainer._metrics["train"]["js_loss"][-1]
    engine.backward(loss)
    sites = find_routers(engine.module)
    grads = {f"router_grad.{s.layer}": safe_get_full_grad(s.module.weight).contiguous() for s in sites}
    partitioned = [tuple(s.module.weight.shape) for s in sites]  # outside a forward ZeRO-3 holds empty shards
    mean_loss = dist.all_sum(loss.detach()) / dist.world_size()
    if dist.rank() == 0:
        save_file({"loss": mean_loss.reshape(1), **grads}, str(out_dir / "zero3.safetensors"))
        (out_dir / "zero3.json").write_text(json.dumps({
            "world_size": dist.world_size(), "leaf_classes": leaves, "rows": rows, "js_logged": js_logged,
            "layers_after": [(s.layer, s.name) for s in sites], "router_shapes_outside_forward": partitioned,
            "deepspeed_version": deepspeed.__version__}))


def priors_case(model_dir, corpus, out_file, chunk_groups):
    from sara_moe import priors
    from sara_moe.runtime import distributed as dist

    counted = {"tokenized": 0, "forwarded": 0}
    encode, forward = priors.encode, priors.pooled_routing  # the public functions priors calls, per anchor text

    def counting_encode(value, *args, **kwargs):
        counted["tokenized"] += 1
        return encode(value, *args, **kwargs)

    def counting_forward(model, recorder, sequences, *args):
        counted["forwarded"] += len(sequences)
        return forward(model, recorder, sequences, *args)

    priors.encode, priors.pooled_routing = counting_encode, counting_forward
    out = priors.extract_priors(model_dir, corpus, out_file, chunk_groups=int(chunk_groups), batch_size=3,
                                progress=False)
    counts = dist.all_sum(torch.tensor([[counted["tokenized"], counted["forwarded"]] if r == dist.rank() else [0, 0]
                                        for r in range(dist.world_size())]))
    if dist.rank() == 0:
        Path(out_file + ".ranks.json").write_text(json.dumps({
            "world_size": dist.world_size(), "per_rank": counts.tolist(), "exists_on_return": Path(out).is_file()}))
    assert Path(out).is_file(), f"rank {dist.rank()}: {out} missing after extract_priors returned"


def outputs_case(model_dir, corpus, eval_mc, eval_gen, out_dir, ranks_file):
    """Every stage that writes files, every output on, into `out_dir` given as relative paths (so the
    files of a one-process and a two-process run can be compared byte for byte). `ranks_file`: what
    each rank computed (encode calls of analyze, items scored by eval), outside the compared folder."""
    import os

    from sara_moe import priors
    from sara_moe.analysis import analyze as A
    from sara_moe.evaluation import evaluate as E
    from sara_moe.reporting.report import build_report
    from sara_moe.runtime import distributed as dist

    counted = {"encoded": 0, "scored": 0}
    encode, pad_batch = A.encode, E.pad_batch  # the public functions the stages call per text / per batch

    def counting_encode(*args, **kwargs):
        counted["encoded"] += 1
        return encode(*args, **kwargs)

    def counting_pad(tokenizer, sequences, *args, **kwargs):
        counted["scored"] += len(sequences)
        return pad_batch(tokenizer, sequences, *args, **kwargs)

    A.encode, E.pad_batch = counting_encode, counting_pad
    os.chdir(out_dir)
    priors.extract_priors(model_dir, corpus, "priors.safetensors", chunk_groups=3, batch_size=3, progress=False)
    A.analyze(model_dir, corpus, "base/analysis", batch_size=2, chunk_groups=3, progress=False)
    A.analyze(model_dir, corpus, "other/analysis", batch_size=3, chunk_groups=4, routing="dispatched",
              progress=False)
    analyzed = counted["encoded"]
    for arm in ("base", "other"):
        E.evaluate(E.EvalConfig(model=model_dir, output_dir=f"{arm}/eval", data=eval_mc, batch_size=4, arm=arm))
    E.evaluate(E.EvalConfig(model=model_dir, output_dir="base/eval_gen", data=eval_gen, batch_size=4,
                            max_new_tokens=4))
    build_report(["base/eval", "other/eval"], "report", before_analysis="base/analysis")
    counts = dist.all_sum(torch.tensor([[analyzed, counted["scored"]] if r == dist.rank() else [0, 0]
                                        for r in range(dist.world_size())]))
    if dist.rank() == 0:
        Path(ranks_file).write_text(json.dumps({"world_size": dist.world_size(), "per_rank": counts.tolist()}))


if __name__ == "__main__":
    case, *args = sys.argv[1:]
    {"fsdp": fsdp_case, "zero3": zero3_case, "priors": priors_case, "outputs": outputs_case}[case](*args)
