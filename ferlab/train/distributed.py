"""Data-parallel training under ``torchrun``: the process group, the device, and the few collectives fit needs.

``torchrun`` sets WORLD_SIZE, RANK and LOCAL_RANK (and MASTER_ADDR/PORT) in every worker's environment;
:func:`session` reads them, so the same ``ferlab train`` command runs single-process or distributed:

    torchrun --standalone --nproc_per_node 2 -m ferlab train --config configs/X.toml --out runs/X

Backend: NCCL when CUDA is available (one GPU per process, ``cuda:LOCAL_RANK``), gloo on CPU.
Without WORLD_SIZE > 1 everything here is a no-op and training runs in one process.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_GENERATION = itertools.count()  # sessions opened by this process; the same sequence on every rank


def env_rank() -> int:
    """This process' global rank from the launcher's environment (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True in the process that prints and writes files (rank 0, or the only process)."""
    return env_rank() == 0


def default_device(local_rank: int = 0) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available (hide GPUs with CUDA_VISIBLE_DEVICES=''), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass(frozen=True)
class Session:
    """Where this process stands: rank among world_size processes, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` wrapped in DistributedDataParallel (which broadcasts rank 0's weights now), or as it is."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64), e.g. loss sums and counts."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def mean(self, stats: dict[str, Any], keys: Sequence[str] = ("loss", "acc")) -> dict[str, Any]:
        """Per-rank means ``stats[k]`` over ``stats['n']`` items -> the means over all ranks' items."""
        if not self.distributed:
            return stats
        sums = self.sum([stats[k] * stats["n"] for k in keys] + [stats["n"]])
        return {**stats, **{k: v / sums[-1] for k, v in zip(keys, sums, strict=False)}, "n": int(sums[-1])}

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. the resume state, read by rank 0 only)."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to all ranks.

        DDP does this at the start of every forward; after the last training step each rank holds its own
        statistics, so fit calls this before evaluating and saving.
        """
        if self.distributed:
            for b in model.buffers():
                torch.distributed.broadcast(b, src=0)

    def spread(self, model: nn.Module) -> float:
        """The largest difference of any parameter or buffer between ranks: 0.0 when all ranks are in sync."""
        if not self.distributed:
            return 0.0
        flat = torch.cat([t.detach().float().reshape(-1) for t in model.state_dict().values()])
        hi, lo = flat.clone(), flat.clone()
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        return float((hi - lo).max()) if flat.numel() else 0.0


@contextlib.contextmanager
def session() -> Iterator[Session]:
    """The process group of a torchrun launch (created here and always destroyed on exit), or a single process.

    An already initialised process group (a caller's own) is used and left alone.
    """
    world = env_world_size()
    if world <= 1:
        yield Session(device=default_device())
        return
    dist = torch.distributed
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device(local_rank)
    owned = not dist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Each session's keys get their own prefix in the launcher's store: a second group in the same
        # workers (fit called again) must not read the first group's stale addresses.
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"ferlab-session-{next(_GENERATION)}", store)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    try:
        yield Session(rank, world, local_rank, device)
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
