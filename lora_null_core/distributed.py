"""Several processes (torchrun, accelerate launch, a framework's own launcher): reuse their process group.

Calibration samples are sharded across ranks and the covariance sums all-reduced; each distinct covariance is
decomposed by one owner rank (bin-packed on d³, the cost of eigh) and only its small null basis is broadcast.
Without an initialized process group every function here is a no-op, so single-process code is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_alone = False  # set while rank 0 initializes by itself (`alone`)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized() and not _alone:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Run as if this process were the only one: no sharding, no collectives (rank 0, when it alone holds the
    weights and the others receive them later from the framework, as FSDP's sync_module_states does)."""
    global _alone
    _alone, before = True, _alone
    try:
        yield
    finally:
        _alone = before


def collective_device() -> torch.device | None:
    """The device the process group's collectives need (NCCL: this rank's GPU); None in one process or on gloo."""
    if rank_and_world()[1] > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    if rank_and_world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], device=collective_device() or "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def least_on_any_rank(value: int) -> int:
    """The smallest of every rank's `value`, on every rank (what all can agree on, e.g. rows that fit everywhere)."""
    if rank_and_world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=collective_device() or "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share, round-robin (the items come sorted by length, so shares stay balanced)."""
    rank, world = rank_and_world()
    return list(items[rank::world])


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if rank_and_world()[1] > 1:
        # A strided view would send the bytes of its whole storage, silently: refuse it.
        if not tensor.is_contiguous():
            raise ValueError("broadcast_ needs a contiguous tensor")
        dist.broadcast(tensor, src=src)
    return tensor


def assign_owners(sizes: Mapping[str, int]) -> dict[str, int]:
    """Owner rank per key, greedy largest-first bin packing on d³ so the eigh work is spread evenly."""
    world = rank_and_world()[1]
    load = [0.0] * world
    owners = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[key] = owner
        load[owner] += float(sizes[key]) ** 3
    return owners
