"""Rank, share, merge: what a sara-moe stage needs to run under a multi-process launcher.

    from sara_moe.runtime import distributed as dist
    state = dist.init()                      # joins the launcher's process group (torchrun / accelerate launch)
    mine = dist.my_chunks(num_chunks)        # chunk indices this rank computes (round-robin)
    table = dist.sum_to_main(table)          # rank 0 gets the sum of every rank's rows (others: None)
    stamp = dist.from_main(stamp_tensor)     # rank 0's value on every rank
    artifacts.write_json(...)                # every rank calls it; only rank 0 writes (see artifacts)
    artifacts.wait_for_main()                # the others wait until the outputs exist

Launchers (`accelerate launch` on GPUs, `torchrun --nproc_per_node N` on CPU) start one
process per rank with `RANK`/`WORLD_SIZE`/`LOCAL_RANK` set; `init()` hands those to
accelerate's `PartialState`, which creates the process group (NCCL on GPUs, gloo on CPU)
and picks this rank's device. Without a launcher every helper is the one-process identity,
and accelerate is not touched.

Merging goes through tensor collectives, never pickled objects: each rank fills its own rows
of a zero table and `sum_to_main` reduces the tables onto rank 0. Every row is computed by
exactly one rank, so the sum is the row itself, bit for bit (x + 0 == x in floating point).

`global_mean` is the loss-side helper: data-parallel engines (DDP, FSDP2, DeepSpeed) average
gradients over ranks, so a per-rank mean over a rank's own valid examples weights the ranks
equally however many valid examples each holds. Scaling the rank's sum by
`world_size / global count` makes the averaged gradient the global batch's mean, which is
what one process on the whole batch computes (transformers does the same for token-level CE
with `average_tokens_across_devices`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist


def launched() -> bool:
    """True when a launcher started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (torch_dist.is_available() and torch_dist.is_initialized())


def init():
    """The accelerate `PartialState` of this rank (creating the process group), or None without a launcher."""
    if not launched():
        return None
    from accelerate import PartialState

    return PartialState()


def active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return torch_dist.get_rank() if active() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if active() else 1


def is_main_process() -> bool:
    return rank() == 0


def launch_rank() -> int:
    """This process's rank: the process group's, else the launcher's `RANK` (before or without joining)."""
    return rank() if active() else int(os.environ.get("RANK", "0")) if launched() else 0


def device(requested: str = "auto") -> torch.device:
    """`requested` unless 'auto': this rank's accelerator (cuda:LOCAL_RANK under a launcher), else CPU.

    Joins the launcher's process group in every case, so a stage that asks for its device
    shares its work even when the device is named.
    """
    state = init()
    if requested != "auto":
        return torch.device(requested)
    if state is not None:
        return state.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def barrier() -> None:
    if active():
        torch_dist.barrier()


def my_chunks(num_chunks: int) -> list[int]:
    """Indices of the chunks this rank computes: rank r takes r, r + W, r + 2W, ..."""
    return list(range(rank(), num_chunks, world_size()))


def chunk_size(num_items: int, requested: int) -> int:
    """`requested`, shrunk so that every rank gets at least one chunk when the data allows it."""
    if world_size() == 1:
        return requested
    return max(1, min(requested, -(-num_items // world_size())))


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    backend = torch_dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else torch.device("cpu")


def sum_to_main(tensor: torch.Tensor) -> torch.Tensor | None:
    """Element-wise sum of `tensor` over ranks, on rank 0 (on CPU); None on other ranks."""
    if not active():
        return tensor
    work = tensor.detach().to(_collective_device()).contiguous()
    torch_dist.reduce(work, dst=0, op=torch_dist.ReduceOp.SUM)
    return work.cpu() if is_main_process() else None


def from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` on every rank (same shape and dtype on every rank)."""
    if not active():
        return tensor
    work = tensor.detach().to(_collective_device()).clone()
    torch_dist.broadcast(work, src=0)
    return work.to(tensor.device)


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks, on every rank (no gradient flows through it)."""
    if not active():
        return tensor
    work = tensor.detach().to(_collective_device()).clone()
    torch_dist.all_reduce(work, op=torch_dist.ReduceOp.SUM)
    return work.to(tensor.device)


def global_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """This rank's share of the weighted mean over the global batch (see the module docstring).

    One process: `sum(values * weights) / max(sum(weights), 1)`. W ranks: the rank's sum times
    `W / max(global sum of weights, 1)`, so the mean over ranks (of the value and of its
    gradient) equals the one-process value on the concatenated batch.
    """
    local = (values * weights).sum()
    count = weights.detach().sum()
    if not active():
        return local / count.clamp_min(1.0)
    total = all_sum(count.float())
    return local * world_size() / total.clamp_min(1.0).to(local.dtype)
