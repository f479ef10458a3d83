"""The init loop: each step calibrates its layers (or reads their cached covariances), solves their null
bases, writes the factors, and measures held-out leakage. The whole model is one step (`WholeModel`); block
streaming is one step per decoder block (`BlockByBlock`). `lora_null_init` (api.py) sets the loop up."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from ..calibration.batches import TokenBatch
from ..calibration.cache import CovarianceCache
from ..calibration.covariances import CovarianceCollector, Covariances, check_token_counts, finalize_covariances
from ..calibration.leakage import LeakageCollector
from ..calibration.taps import InputTaps, Visitor, run_activation_pass
from ..config import LoraNullConfig
from ..report import LayerReport
from ..weights import gathered
from . import phases
from .block_loaders import BlockLoader, base_parameters
from .factors import set_holdout, write_layers
from .peft_layers import bare_base_layers, check_finite_weights
from .phases import phase
from .safeguards import model_logits, relative_error
from .solve import NullBasisSolver, share_null_bases
from .streaming import StreamingPlan, capture_block_inputs, run_block, stream_blocks
from .weight_prior import with_weight_prior

# Steps in flight while solves overlap: step i is finished after step i + OVERLAP_DEPTH calibrated. At 1 the caller
# waited on block i's solve before queueing block i+2's forward, and the GPU's forward stream stood idle whenever a
# solve outlasted a forward. Each step more holds one more block's covariances: the Llama-2-7B shape's peak went
# from 18.3 to 19.0 GiB, its init (with the blocked solves and the worker's high-priority stream) from 8.9–9.1 s to
# 7.4–7.6 s on an H100 (benchmarks/results/speed.md).
OVERLAP_DEPTH = 2


@dataclass(frozen=True)
class StepData:
    """This rank's share of what the steps run through the model: calibration batches (none when the covariances
    come from the cache), held-out batches, the probe that checks the function, and the task batches."""

    batches: Sequence[TokenBatch]
    holdout: Sequence[TokenBatch]
    probe: TokenBatch
    task: Sequence[TokenBatch] = ()


@dataclass(frozen=True)
class LoopSettings:
    """How the loop runs: the method's settings, the adapter written, where the math runs, the covariance cache
    (and whether it already holds this run's entries), whether solves overlap the next step, and whether A is
    task-aware."""

    config: LoraNullConfig
    adapter_name: str
    device: torch.device
    cache: CovarianceCache | None = None
    cached: bool = False
    overlap: bool = False
    task_aware: bool = False


@dataclass
class InitStep:
    """One turn of the init loop: the layers it initializes, how to run the calibration data (and the task data,
    to the second visitor) past their base inputs, how to run the held-out data through them once initialized,
    and what to do when it is done. The whole model is one step; block streaming is one step per decoder block."""

    key: str  # the covariance cache entry
    layers: Mapping[str, LoraLayer]
    calibrate: Callable[[Mapping[str, nn.Module], Visitor, Visitor], None]
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


def run_steps(steps: Iterator[InitStep], settings: LoopSettings) -> list[LayerReport]:
    """The one init loop: calibrate (or read the cache) → solve → write → held-out leakage, step by step.

    With `overlap`, step i's null bases are solved on a worker thread (its own CUDA stream) while steps i+1 and
    i+2 calibrate: the init keeps each block's function, so later blocks' inputs do not wait for block i's
    factors, and the caller finishes step i only after step i+2's forward is queued, so the GPU always has a
    forward to run while the worker solves (`OVERLAP_DEPTH`). Steps are finished (written, held out) in order, so
    every held-out pass sees the blocks before it initialized. With `task_aware` the bases are task-aware
    (solve.solve_owned_bases)."""
    config, adapter_name, cache, cached = settings.config, settings.adapter_name, settings.cache, settings.cached
    dtype = getattr(torch, config.accumulate_dtype)
    reports: list[LayerReport] = []
    writing = cache.writing() if cache is not None and not cached else contextlib.nullcontext()
    depth = OVERLAP_DEPTH if settings.overlap else 0
    with torch.no_grad(), writing as writer, NullBasisSolver(settings.device, settings.overlap) as solver:
        solving: deque[_Solving] = deque()  # submitted, not yet finished, oldest first
        for step in steps:
            modules = {name: layer.get_base_layer() for name, layer in step.layers.items()}
            collector = CovarianceCollector(dtype, config.covariance_weighting)
            task_collector = CovarianceCollector(dtype, config.covariance_weighting)
            step.calibrate(modules, collector, task_collector)
            if not step.layers:
                while solving:
                    reports += _finish(solving.popleft(), config, adapter_name)
                step.hold_out(modules, _ignore)
                step.finish()
                continue
            if cache is not None and cached:
                covariances = cache.load(modules, settings.device)
            else:
                with phase(phases.FINALIZE):
                    covariances = finalize_covariances(collector.result, modules, config.covariance_weighting)
                if writer is not None:
                    writer.add(step.key, covariances)
            check_token_counts(covariances, config.min_tokens_per_dim)
            ranks = {name: layer.r[adapter_name] for name, layer in step.layers.items()}
            task_covariances = (
                finalize_covariances(task_collector.result, modules, config.covariance_weighting)
                if settings.task_aware
                else None
            )
            # With a weight prior the bases are solved from C/tr + β·WᵀW/tr; the reports keep the measured C.
            solve_from = (
                with_weight_prior(covariances, step.layers, config.weight_prior) if config.weight_prior else covariances
            )
            bases = solver.submit(
                solve_from, ranks, config.solver, step.solve_progress, task_covariances, config.task_mix
            )
            solving.append(_Solving(step, modules, covariances, ranks, bases))
            while len(solving) > depth:  # without overlap at once: one step's block and covariances are ever held
                reports += _finish(solving.popleft(), config, adapter_name)
        while solving:
            reports += _finish(solving.popleft(), config, adapter_name)
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


def should_overlap(setting: str, device: torch.device, blocks: nn.ModuleList | None) -> bool:
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

    def __init__(self, peft_model: PeftModel, layers: Mapping[str, LoraLayer], data: StepData) -> None:
        self.peft_model, self.layers, self.data = peft_model, layers, data
        self.reference: torch.Tensor | None = None

    def steps(self) -> Iterator[InitStep]:
        yield InitStep("model", self.layers, self._calibrate, self._hold_out, solve_progress=True)

    def _calibrate(self, modules, visit, task_visit) -> None:
        with bare_base_layers(self.peft_model.get_base_model()), self._gathered():
            self.reference = model_logits(self.peft_model, self.data.probe)
            run_activation_pass(self.peft_model, modules, self.data.batches, visit)
            if self.data.task:
                run_activation_pass(self.peft_model, modules, self.data.task, task_visit, desc="task inputs")

    def _hold_out(self, modules, visit) -> None:
        with self._gathered():
            run_activation_pass(self.peft_model, modules, self.data.holdout, visit, desc="held-out leakage")

    def function_error(self) -> float:
        with gathered(self.peft_model.parameters()):
            probe = self.data.probe
            if self.reference is None:
                raise RuntimeError("the function error is measured after the calibration step ran")
            return relative_error(model_logits(self.peft_model, probe), self.reference, probe.attention_mask)

    def _gathered(self):
        """Under ZeRO-3 the whole model's weights (a model whose blocks cannot stream one at a time)."""
        return gathered(base_parameters(self.peft_model))


class BlockByBlock:
    """One step per decoder block, on the cached hidden states; the GPU holds one block and those states. The
    probe goes through the blocks twice, as the original model computes it and through the initialized blocks,
    so the function error compounds as it would in the whole model."""

    def __init__(
        self,
        peft_model: PeftModel,
        layers: Mapping[str, LoraLayer],
        plan: StreamingPlan,
        data: StepData,
        device: torch.device,
        loader: BlockLoader | None,
    ) -> None:
        self.layers = layers
        self.blocks, self.names_by_block = plan
        self.device, self.loader = device, loader
        block_params = {id(p) for p in self.blocks.parameters()}
        outside = [p for p in base_parameters(peft_model) if id(p) not in block_params]  # embeddings (ZeRO-3)
        ordered = [*data.batches, *data.holdout, *data.task, data.probe]
        with phase(phases.CAPTURE), gathered(outside):
            self.calls = capture_block_inputs(peft_model, self.blocks[0], ordered, device)
        self.calibration = range(len(data.batches))
        self.held_out = range(len(data.batches), len(data.batches) + len(data.holdout))
        self.task = range(self.held_out.stop, self.held_out.stop + len(data.task))
        self.drift = self.calls[-1]

    def steps(self) -> Iterator[InitStep]:
        calls = self.calls
        for block_step in stream_blocks(self.blocks, self.names_by_block, self.device, self.loader):
            block = block_step.block

            def calibrate(modules, visit, task_visit, block=block) -> None:
                with bare_base_layers(block):
                    for indices, visitor in ((self.calibration, visit), (self.task, task_visit)):
                        with InputTaps(modules, visitor) as taps:
                            for j in indices:
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
