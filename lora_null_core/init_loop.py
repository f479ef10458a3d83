"""The init loop: each step calibrates its layers (or reads their cached covariances), solves their null
bases, writes the factors, and measures held-out leakage. The whole model is one step (`WholeModel`); block
streaming is one step per decoder block (`BlockByBlock`). `lora_null_init` (initialize.py) sets the loop up."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from . import phases
from .adapters import bare_base_layers, check_finite_weights
from .block_loaders import base_parameters
from .calibrate import CovarianceCollector, Covariances, check_token_counts, finalize_covariances
from .config import LoraNullConfig
from .console import progress
from .distributed import assign_owners, broadcast_, rank_and_world
from .leakage import LeakageCollector
from .null_space import null_basis
from .phases import phase
from .report import LayerReport
from .safeguards import model_logits, relative_error
from .sequential import capture_block_inputs, run_block, stream_blocks
from .taps import InputTaps, Visitor, run_activation_pass
from .weights import gathered
from .writing import set_holdout, write_layers


@dataclass
class InitStep:
    """One turn of the init loop: the layers it initializes, how to run the calibration data past their base
    inputs, how to run the held-out data through them once initialized, and what to do when it is done. The
    whole model is one step; block streaming is one step per decoder block."""

    key: str  # the covariance cache entry
    layers: Mapping[str, LoraLayer]
    calibrate: Callable[[Mapping[str, nn.Module], Visitor], None]
    hold_out: Callable[[Mapping[str, nn.Module], Visitor], None]
    solve_progress: bool = False  # a bar over the null bases (one step holding every layer)
    finish: Callable[[], None] = lambda: None  # after its held-out pass (block streaming: the probe, the block back)


@dataclass
class _Solving:
    """A step whose null bases are being solved: what finishing it needs."""

    step: InitStep
    modules: Mapping[str, nn.Module]
    covariances: Covariances
    ranks: Mapping[str, int]
    bases: Future  # this rank's own bases; the others arrive by broadcast when the step finishes


def run_steps(steps: Iterator[InitStep], config: LoraNullConfig, adapter_name: str, cache, cached: bool,
              device: torch.device, overlap: bool = False) -> list[LayerReport]:
    """The one init loop: calibrate (or read the cache) → solve → write → held-out leakage, step by step.

    With `overlap`, step i's null bases are solved on a worker thread (its own CUDA stream) while step i+1
    calibrates: the init keeps each block's function, so block i+1's inputs do not wait for block i's factors.
    Step i is finished (written, held out) before step i+1, so every pass sees the blocks before it initialized."""
    dtype = getattr(torch, config.accumulate_dtype)
    reports: list[LayerReport] = []
    writing = cache.writing() if cache is not None and not cached else contextlib.nullcontext()
    with torch.no_grad(), writing as writer, NullBasisSolver(device, overlap) as solver:
        solving: Optional[_Solving] = None
        for step in steps:
            modules = {name: layer.get_base_layer() for name, layer in step.layers.items()}
            collector = CovarianceCollector(dtype, config.covariance_weighting)
            step.calibrate(modules, collector)
            if not step.layers:
                if solving is not None:
                    reports += _finish(solving, config, adapter_name)
                    solving = None
                step.hold_out(modules, _ignore)
                step.finish()
                continue
            if cached:
                covariances = cache.load(modules, device)
            else:
                covariances = finalize_covariances(collector.result, modules, config.covariance_weighting)
                if writer is not None:
                    writer.add(step.key, covariances)
            check_token_counts(covariances, config.min_tokens_per_dim)
            ranks = {name: layer.r[adapter_name] for name, layer in step.layers.items()}
            bases = solver.submit(covariances, ranks, config.solver, step.solve_progress)
            if solving is not None:
                reports += _finish(solving, config, adapter_name)
            solving = _Solving(step, modules, covariances, ranks, bases)
            if not overlap:  # finished at once: only one step's block and covariances are ever held
                reports += _finish(solving, config, adapter_name)
                solving = None
        if solving is not None:
            reports += _finish(solving, config, adapter_name)
    return reports


def _finish(solving: _Solving, config: LoraNullConfig, adapter_name: str) -> list[LayerReport]:
    step = solving.step
    bases = share_null_bases(solving.covariances, solving.ranks, solving.bases.result())
    reports, lora_as = write_layers(step.layers, solving.covariances, bases, config, adapter_name)
    if config.holdout_samples:
        leakage = LeakageCollector(lora_as, config.seed)
        step.hold_out(solving.modules, leakage)
        set_holdout(reports, leakage.results())
    else:  # the held-out hidden states still move on (streaming), unmeasured
        step.hold_out(solving.modules, _ignore)
    step.finish()
    return reports


class NullBasisSolver:
    """Solves a step's null bases now, or (overlap) on one worker thread with its own CUDA stream, returning a
    future either way. The worker waits for the covariances on the caller's stream and hands the bases back
    synchronized and marked as used by the caller's stream, so the caching allocator never recycles them early."""

    def __init__(self, device: torch.device, overlap: bool) -> None:
        self.device, self.overlap = device, overlap
        self.cuda = device.type == "cuda"
        self._pool: Optional[ThreadPoolExecutor] = None
        self._stream = None

    def __enter__(self) -> NullBasisSolver:
        if self.overlap:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-null-solve")
            self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        return self

    def __exit__(self, *_exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def submit(self, covariances: Covariances, ranks: Mapping[str, int], solver: str, show_progress: bool) -> Future:
        if self._pool is None:
            done: Future = Future()
            with phase(phases.SOLVE):
                done.set_result(solve_owned_bases(covariances, ranks, solver, show_progress))
            return done
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        caller = torch.cuda.current_stream(self.device) if self.cuda else None
        return self._pool.submit(self._solve, covariances, ranks, solver, ready, caller)

    def _solve(self, covariances, ranks, solver, ready, caller) -> dict[tuple[str, int], torch.Tensor]:
        with torch.no_grad():
            if not self.cuda:
                return solve_owned_bases(covariances, ranks, solver, show_progress=False)
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                bases = solve_owned_bases(covariances, ranks, solver, show_progress=False)
            self._stream.synchronize()
            for basis in bases.values():
                if basis.is_cuda:
                    basis.record_stream(caller)
            return bases


def should_overlap(setting: str, device: torch.device, blocks: Optional[nn.ModuleList]) -> bool:
    """The `overlap` setting resolved for a run streaming `blocks` (None: one whole-model step, nothing to overlap).

    With several processes the worker only solves; the bases are broadcast when the step finishes, from the
    thread that issues every other collective, so all ranks keep one order. auto overlaps only on a GPU
    whose blocks already live there: measured (benchmarks/results/speed.md), a 7B gains 18.2 → 15.0 s for 1.9 GiB
    more peak, but with offloaded blocks the extra block and covariances cost 40–55 % more peak for 2 s on a 7B and
    nothing on a 70B, whose solves and forwards both fill the GPU. auto also stays off on a CPU (the solves would
    take the forward's cores) and while a profiler times the phases one after another."""
    if setting == "off" or blocks is None:
        return False
    if setting == "on":
        return True
    return device.type == "cuda" and blocks_resident(blocks, device) and not phases.observed()


def blocks_resident(blocks: nn.ModuleList, device: torch.device) -> bool:
    """Whether the blocks' weights already live on the execution device (not kept in CPU memory, on disk or meta)."""
    first = next(blocks[0].parameters(), None)
    return first is not None and first.device.type == device.type


class WholeModel:
    """One step: a forward pass of the whole model over all data, every layer tapped, every covariance held."""

    def __init__(self, peft_model, layers, batches, holdout, probe) -> None:
        self.peft_model, self.layers, self.batches, self.holdout, self.probe = peft_model, layers, batches, holdout, probe
        self.reference: Optional[torch.Tensor] = None

    def steps(self) -> Iterator[InitStep]:
        yield InitStep("model", self.layers, self._calibrate, self._hold_out, solve_progress=True)

    def _calibrate(self, modules, visit) -> None:
        with bare_base_layers(self.peft_model.get_base_model()), self._gathered():
            self.reference = model_logits(self.peft_model, self.probe)
            run_activation_pass(self.peft_model, modules, self.batches, visit)

    def _hold_out(self, modules, visit) -> None:
        with self._gathered():
            run_activation_pass(self.peft_model, modules, self.holdout, visit, desc="held-out leakage")

    def function_error(self) -> float:
        with gathered(self.peft_model.parameters()):
            return relative_error(model_logits(self.peft_model, self.probe), self.reference, self.probe.attention_mask)

    def _gathered(self):
        """Under ZeRO-3 the whole model's weights (a model whose blocks cannot stream one at a time)."""
        return gathered(base_parameters(self.peft_model))


class BlockByBlock:
    """One step per decoder block, on the cached hidden states; the GPU holds one block and those states. The
    probe goes through the blocks twice, as the original model computes it and through the initialized blocks,
    so the function error compounds as it would in the whole model."""

    def __init__(self, peft_model, layers, plan, batches, holdout, probe, device, loader) -> None:
        self.layers = layers
        self.blocks, self.names_by_block = plan
        self.device, self.loader = device, loader
        block_params = {id(p) for p in self.blocks.parameters()}
        outside = [p for p in base_parameters(peft_model) if id(p) not in block_params]  # embeddings (ZeRO-3)
        with phase(phases.CAPTURE), gathered(outside):
            self.calls = capture_block_inputs(peft_model, self.blocks[0], [*batches, *holdout, probe], device)
        self.calibration = range(len(batches))
        self.held_out = range(len(batches), len(batches) + len(holdout))
        self.drift = self.calls[-1]

    def steps(self) -> Iterator[InitStep]:
        calls = self.calls
        for block_step in stream_blocks(self.blocks, self.names_by_block, self.device, self.loader):
            block = block_step.block

            def calibrate(modules, visit, block=block) -> None:
                with bare_base_layers(block):
                    with InputTaps(modules, visit) as taps:
                        for j in self.calibration:
                            taps.set_batch(calls[j].mask, calls[j].counts)
                            calls[j] = calls[j].with_hidden(run_block(block, calls[j]))
                    calls[-1] = calls[-1].with_hidden(run_block(block, calls[-1]))  # the probe, as the original runs

            def hold_out(modules, visit, block=block) -> None:
                with InputTaps(modules, visit) as taps:
                    for j in self.held_out:
                        taps.set_batch(calls[j].mask, calls[j].counts)
                        calls[j] = calls[j].with_hidden(run_block(block, calls[j]))

            def finish(block=block, release=block_step.release) -> None:
                self.drift = self.drift.with_hidden(run_block(block, self.drift))  # through the initialized block
                release()

            layers = {name: self.layers[name] for name in block_step.names}
            check_finite_weights(layers)
            yield InitStep(f"block-{block_step.index:04d}", layers, calibrate, hold_out, finish=finish)

    def function_error(self) -> float:
        return relative_error(self.drift.hidden.float(), self.calls[-1].hidden.float(), self.drift.mask)


def _ignore(*_args: Any) -> None:
    pass


def _owners(covariances: Covariances, ranks: Mapping[str, int]) -> dict[tuple[str, int], int]:
    """The rank that solves each (covariance, rank) pair the layers need, in one order on every rank."""
    needed = sorted({(covariances.group_of[name], rank) for name, rank in ranks.items()})
    owner = assign_owners({f"{group}|{rank}": covariances.matrices[group].shape[0] for group, rank in needed})
    return {(group, rank): owner[f"{group}|{rank}"] for group, rank in needed}


def solve_owned_bases(covariances: Covariances, ranks: Mapping[str, int], solver: str = "auto",
                      show_progress: bool = True) -> dict[tuple[str, int], torch.Tensor]:
    """The null bases this rank owns (all of them in one process); no communication, so it may run on a thread."""
    my_rank = rank_and_world()[0]
    mine = [key for key, owner in _owners(covariances, ranks).items() if owner == my_rank]
    return {(group, rank): null_basis(covariances.matrices[group], rank, solver)
            for group, rank in (progress(mine, "null bases", "covariance") if show_progress else mine)}


def share_null_bases(covariances: Covariances, ranks: Mapping[str, int],
                     owned: Mapping[tuple[str, int], torch.Tensor]) -> dict[tuple[str, int], torch.Tensor]:
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
