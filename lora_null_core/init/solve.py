"""Solving a step's null bases: now, or on a worker thread with its own CUDA stream while the next step
calibrates (`overlap`); each basis by one owner rank and shared by broadcast. A basis is the plain null basis of
the knowledge covariance, or, with task covariances, the task-aware one (null_space.task_aware_basis)."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..calibration.covariances import Covariances
from ..console import progress
from ..distributed import assign_owners, broadcast_, rank_and_world
from ..null_space import null_basis, task_aware_basis
from . import phases
from .phases import phase


class NullBasisSolver:
    """Solves a step's null bases now, or (overlap) on one worker thread with its own CUDA stream, returning a
    future either way. The worker waits for the covariances on the caller's stream and hands the bases back
    synchronized and marked as used by the caller's stream, so the caching allocator never recycles them early."""

    def __init__(self, device: torch.device, overlap: bool) -> None:
        self.device, self.overlap = device, overlap
        self.cuda = device.type == "cuda"
        self._pool: ThreadPoolExecutor | None = None
        self._stream: torch.cuda.Stream | None = None

    def __enter__(self) -> NullBasisSolver:
        if self.overlap:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-null-solve")
            # High priority: the solves are chains of small dependent kernels; each is dispatched as soon as an SM
            # frees up instead of queueing behind the forward's matrix products, which lose little to them (on an
            # H100 this alone took the 7B shape's init from 8.9–9.1 s to 8.5–8.7 s; the forward's stream at high
            # priority instead was slower).
            self._stream = torch.cuda.Stream(self.device, priority=-1) if self.cuda else None
        return self

    def __exit__(self, *_exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def submit(
        self,
        covariances: Covariances,
        ranks: Mapping[str, int],
        solver: str,
        show_progress: bool,
        task: Covariances | None = None,
        task_mix: float = 0.0,
    ) -> Future:
        if self._pool is None:
            done: Future = Future()
            with phase(phases.SOLVE):
                done.set_result(solve_owned_bases(covariances, ranks, solver, show_progress, task, task_mix))
            return done
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        caller = torch.cuda.current_stream(self.device) if self.cuda else None
        return self._pool.submit(self._solve, covariances, ranks, solver, ready, caller, task, task_mix)

    def _solve(self, covariances, ranks, solver, ready, caller, task, task_mix) -> dict[tuple[str, int], torch.Tensor]:
        with torch.no_grad():
            if not self.cuda:
                return solve_owned_bases(covariances, ranks, solver, False, task, task_mix)
            stream = self._stream
            assert stream is not None  # made in __enter__ whenever the worker runs on a GPU
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                bases = solve_owned_bases(covariances, ranks, solver, False, task, task_mix)
            stream.synchronize()
            for basis in bases.values():
                if basis.is_cuda:
                    basis.record_stream(caller)
            return bases


def _owners(covariances: Covariances, ranks: Mapping[str, int]) -> dict[tuple[str, int], int]:
    """The rank that solves each (covariance, rank) pair the layers need, in one order on every rank."""
    needed = sorted({(covariances.group_of[name], rank) for name, rank in ranks.items()})
    owner = assign_owners({f"{group}|{rank}": covariances.matrices[group].shape[0] for group, rank in needed})
    return {(group, rank): owner[f"{group}|{rank}"] for group, rank in needed}


def solve_owned_bases(
    covariances: Covariances,
    ranks: Mapping[str, int],
    solver: str = "auto",
    show_progress: bool = True,
    task: Covariances | None = None,
    task_mix: float = 0.0,
) -> dict[tuple[str, int], torch.Tensor]:
    """The bases this rank owns (all of them in one process); no communication, so it may run on a thread. With
    `task` covariances (the fine-tuning inputs') each is the task-aware basis, else the plain null basis."""
    my_rank = rank_and_world()[0]
    mine = [key for key, owner in _owners(covariances, ranks).items() if owner == my_rank]

    def basis(group: str, rank: int) -> torch.Tensor:
        if task is None:
            return null_basis(covariances.matrices[group], rank, solver)
        return task_aware_basis(covariances.matrices[group], task.matrices[group], rank, task_mix, solver)

    return {
        (group, rank): basis(group, rank)
        for group, rank in (progress(mine, "null bases", "covariance") if show_progress else mine)
    }


def share_null_bases(
    covariances: Covariances, ranks: Mapping[str, int], owned: Mapping[tuple[str, int], torch.Tensor]
) -> dict[tuple[str, int], torch.Tensor]:
    """Every needed basis on every rank: each owner broadcasts its own (a no-op in one process). Called from the
    thread that issues the other collectives, so every rank issues them in the same order."""
    result = {}
    for (group, rank), owner in _owners(covariances, ranks).items():
        if (group, rank) in owned:
            basis = owned[group, rank]
        else:
            matrix = covariances.matrices[group]
            basis = torch.empty(matrix.shape[0], rank, dtype=torch.float64, device=matrix.device)
        result[group, rank] = broadcast_(basis, src=owner)
    return result
