"""The process group ``torchrun`` describes: ranks, element-wise maxima and gathers across them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _init_distributed(device_name: str) -> _Dist:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE > 1``), if any."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns_group=True)


def _all_max(values: Sequence[float], dist_ctx: _Dist) -> list[float]:
    """Element-wise maximum over ranks (identity in one process)."""
    if not dist_ctx.active:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def _gather(obj: Any, dist_ctx: _Dist) -> list[Any]:
    if not dist_ctx.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist_ctx.world
    dist.all_gather_object(out, obj)
    return out



def _finish_dist(dist_ctx: _Dist) -> None:
    if dist_ctx.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


def _barrier(dist_ctx: _Dist) -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if dist_ctx.active:
        import torch.distributed as dist

        dist.barrier()
