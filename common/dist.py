"""torchrun / DistributedDataParallel for the stages that train on activations (part1, part2, part5).

    torchrun --standalone --nproc_per_node=4 part1_train_topk_sae.py --preset paper --out checkpoints/paper/part1_sae

Standard engine, nothing home-made: `torch.distributed` with nccl on GPUs (one process per GPU, cuda:LOCAL_RANK)
and gloo on CPU, `DistributedDataParallel` for the gradients. How a run is split:
  - every rank draws the same shuffled order (same seed) and takes its 1/N slice of each global batch of
    `--batch-size` rows, so N processes take the same optimizer steps on the same global batches as one process;
  - losses normalised by the batch (the SAE's FVU) use the statistics of the *global* batch (one all-reduce of
    2d + 1 numbers) and are scaled by N, so DDP's gradient average is the one-process gradient;
  - the AuxK tokens-since-fired counters see every rank's firing (one all-reduce of a mask);
  - training logs are averaged over ranks; the held-out evaluation runs on every rank on the same weights
    (identical results, so all ranks keep the same best state);
  - activations are collected (and cached) by rank 0 first, the others then read the cache;
  - rank 0 alone writes checkpoints, metrics and plots, and prints.
Other stages refuse to run under torchrun (they would write the same files N times).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as td


def env_world() -> int:
    """The world size torchrun asked for (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialized() -> bool:
    return td.is_available() and td.is_initialized()


def world() -> int:
    return td.get_world_size() if initialized() else 1


def rank() -> int:
    return td.get_rank() if initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(args) -> None:
    """Join the torchrun process group (no-op for a plain `python` run). Checks the batch splits evenly."""
    from .errors import UserError
    if env_world() == 1 or initialized():
        return
    n = env_world()
    if getattr(args, "batch_size", 0) % n:
        raise UserError(f"--batch-size {args.batch_size} does not split over {n} processes; use a multiple of {n}")
    use_cuda = torch.cuda.is_available() and getattr(args, "device", "auto") in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))   # "cuda" now means this rank's GPU
    td.init_process_group("nccl" if use_cuda else "gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")   # one copy of every message (errors still reach stderr)


def shutdown() -> None:
    """The end of a torchrun run that finished normally: wait for every rank, then tear the process group down.
    Without it a rank that returns early (all but rank 0 skip the evaluation) exits while its gloo threads are
    live, and now and then the C++ runtime aborts it ("terminate called without an active exception", SIGABRT;
    seen in tests/test_ddp.py on 2 of 5 fresh-clone runs). Not called after an error: torchrun stops the others."""
    if initialized():
        td.barrier()
        td.destroy_process_group()


def barrier() -> None:
    if initialized():
        td.barrier()


def main_first(fn):
    """Run fn on rank 0 first (e.g. collecting and caching activations), then on the other ranks."""
    if not initialized():
        return fn()
    if not is_main():
        td.barrier()
    out = fn()
    if is_main():
        td.barrier()
    return out


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) of t over the ranks; a CPU tensor goes through the GPU under nccl."""
    if initialized():
        rop = {"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX}[op]
        if td.get_backend() == "nccl" and t.device.type != "cuda":
            g = t.cuda()
            td.all_reduce(g, op=rop)
            t.copy_(g.cpu())
        else:
            td.all_reduce(t, op=rop)
    return t


def scaled_loss(loss: torch.Tensor, logs: dict) -> tuple[torch.Tensor, dict]:
    """A loss that is this rank's share of a global-batch sum (SSE / global variance), times N: DDP averages
    gradients over the N ranks, so the result is the one-process gradient. Logs likewise (averaged later)."""
    n = world()
    if n == 1:
        return loss, logs
    return loss * n, {k: v * n for k, v in logs.items()}


def total_variance(x: torch.Tensor) -> torch.Tensor:
    """sum ||x - mean(x)||^2 over the global batch (this rank's rows x [b, d] plus every other rank's)."""
    if not initialized():
        return (x - x.mean(0)).pow(2).sum()
    xd = x.detach().double()
    stats = torch.cat([xd.sum(0), xd.pow(2).sum(0), xd.new_tensor([x.shape[0]])])   # [2d + 1]
    all_reduce_(stats)
    d = x.shape[1]
    s, sq, n = stats[:d], stats[d:2 * d], stats[-1]
    return (sq - s * s / n).sum().to(x.dtype)
