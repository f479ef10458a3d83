"""The init loop: each step calibrates its layers (or reads their cached covariances), solves their null
bases, writes the factors, and measures held-out leakage. The whole model is one step (`WholeModel`); block
streaming is one step per decoder block (`BlockByBlock`). `lora_null_init` (initialize.py) sets the loop up."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from . import phases
from .adapters import bare_base_layers, write_adapter
from .calibrate import (
    CovarianceCollector,
    Covariances,
    InputTaps,
    Visitor,
    check_token_counts,
    finalize_covariances,
    run_activation_pass,
)
from .config import LoraNullConfig
from .console import progress
from .distributed import assign_owners, broadcast_, rank_and_world
from .leakage import LeakageCollector, leakage_from_covariance, random_like
from .null_space import null_basis
from .phases import phase
from .report import LayerReport
from .safeguards import model_logits, relative_error
from .sequential import capture_block_inputs, run_block, stream_blocks


def initialize_layers(
    layers: Mapping[str, LoraLayer], covariances: Covariances, config: LoraNullConfig, adapter_name: str,
    show_progress: bool = True,
) -> list[LayerReport]:
    """Null bases → factors → residual for a set of layers whose covariances are complete."""
    check_token_counts(covariances, config.min_tokens_per_dim)
    ranks = {name: layer.r[adapter_name] for name, layer in layers.items()}
    with phase(phases.SOLVE):
        null_bases = solve_null_bases(covariances, ranks, config.solver, show_progress)
    reports = []
    for name, layer in layers.items():
        basis = null_bases[covariances.group_of[name], layer.r[adapter_name]]
        with phase(phases.WRITE):
            lora_a = write_adapter(layer, adapter_name, basis, config.init, config.resolved_a_scale, config.residual)
        with phase(phases.REPORT):
            reports.append(layer_report(name, layer, adapter_name, covariances, lora_a, config.seed))
    return reports


@dataclass
class InitStep:
    """One turn of the init loop: the layers it initializes, how to run the calibration data past their base
    inputs, and how to run the held-out data through them once initialized. The whole model is one step;
    block streaming is one step per decoder block."""

    key: str  # the covariance cache entry
    layers: Mapping[str, LoraLayer]
    calibrate: Callable[[Mapping[str, nn.Module], Visitor], None]
    hold_out: Callable[[Mapping[str, nn.Module], Visitor], None]
    solve_progress: bool = False  # a bar over the null bases (one step holding every layer)


def run_steps(steps: Iterator[InitStep], config: LoraNullConfig, adapter_name: str, cache, cached: bool,
               device: torch.device) -> list[LayerReport]:
    """The one init loop: calibrate (or read the cache) → initialize → held-out leakage, step by step."""
    dtype = getattr(torch, config.accumulate_dtype)
    reports: list[LayerReport] = []
    writing = cache.writing() if cache is not None and not cached else contextlib.nullcontext()
    with torch.no_grad(), writing as writer:
        for step in steps:
            modules = {name: layer.get_base_layer() for name, layer in step.layers.items()}
            collector = CovarianceCollector(dtype, config.covariance_weighting)
            step.calibrate(modules, collector)
            if not step.layers:
                step.hold_out(modules, _ignore)
                continue
            if cached:
                covariances = cache.load(modules, device)
            else:
                covariances = finalize_covariances(collector.result, modules, config.covariance_weighting)
                if writer is not None:
                    writer.add(step.key, covariances)
            step_reports = initialize_layers(step.layers, covariances, config, adapter_name, step.solve_progress)
            reports += step_reports
            if not config.holdout_samples:  # the held-out hidden states still move on (streaming), unmeasured
                step.hold_out(modules, _ignore)
                continue
            lora_as = {name: layer.lora_A[adapter_name].weight.detach() for name, layer in step.layers.items()}
            leakage = LeakageCollector(lora_as, config.seed)
            step.hold_out(modules, leakage)
            set_holdout(step_reports, leakage.results())
    return reports


class WholeModel:
    """One step: a forward pass of the whole model over all data, every layer tapped, every covariance held."""

    def __init__(self, peft_model, layers, batches, holdout, probe) -> None:
        self.peft_model, self.layers, self.batches, self.holdout, self.probe = peft_model, layers, batches, holdout, probe
        self.reference: Optional[torch.Tensor] = None

    def steps(self) -> Iterator[InitStep]:
        yield InitStep("model", self.layers, self._calibrate, self._hold_out, solve_progress=True)

    def _calibrate(self, modules, visit) -> None:
        with bare_base_layers(self.peft_model.get_base_model()):
            self.reference = model_logits(self.peft_model, self.probe)
            run_activation_pass(self.peft_model, modules, self.batches, visit)

    def _hold_out(self, modules, visit) -> None:
        run_activation_pass(self.peft_model, modules, self.holdout, visit, desc="held-out leakage")

    def function_error(self) -> float:
        return relative_error(model_logits(self.peft_model, self.probe), self.reference, self.probe.attention_mask)


class BlockByBlock:
    """One step per decoder block, on the cached hidden states; the GPU holds one block and those states. The
    probe goes through the blocks twice, as the original model computes it and through the initialized blocks,
    so the function error compounds as it would in the whole model."""

    def __init__(self, peft_model, layers, plan, batches, holdout, probe, device, loader) -> None:
        self.layers = layers
        self.blocks, self.names_by_block = plan
        self.device, self.loader = device, loader
        with phase(phases.CAPTURE):
            self.calls = capture_block_inputs(peft_model, self.blocks[0], [*batches, *holdout, probe], device)
        self.calibration = range(len(batches))
        self.held_out = range(len(batches), len(batches) + len(holdout))
        self.drift = self.calls[-1]

    def steps(self) -> Iterator[InitStep]:
        calls = self.calls
        for block_step in stream_blocks(self.blocks, self.names_by_block, self.device, self.loader):
            block, before = block_step.block, {}

            def calibrate(modules, visit, block=block, before=before) -> None:
                with bare_base_layers(block):
                    with InputTaps(modules, visit) as taps:
                        for j in self.calibration:
                            taps.set_batch(calls[j].mask, calls[j].counts)
                            calls[j] = calls[j].with_hidden(run_block(block, calls[j]))
                    before["probe"] = run_block(block, calls[-1])  # as the original block computes it

            def hold_out(modules, visit, block=block) -> None:
                with InputTaps(modules, visit) as taps:
                    for j in self.held_out:
                        taps.set_batch(calls[j].mask, calls[j].counts)
                        calls[j] = calls[j].with_hidden(run_block(block, calls[j]))

            layers = {name: self.layers[name] for name in block_step.names}
            yield InitStep(f"block-{block_step.index:04d}", layers, calibrate, hold_out)
            self.drift = self.drift.with_hidden(run_block(block, self.drift))  # through the initialized block
            calls[-1] = calls[-1].with_hidden(before["probe"])

    def function_error(self) -> float:
        return relative_error(self.drift.hidden.float(), self.calls[-1].hidden.float(), self.drift.mask)


def _ignore(*_args: Any) -> None:
    pass


def set_holdout(reports: list[LayerReport], measured: Mapping[str, tuple[float, float]]) -> None:
    for entry in reports:
        if entry.name in measured and not math.isnan(measured[entry.name][0]):
            entry.leakage_holdout, entry.leakage_holdout_random = measured[entry.name]


def solve_null_bases(
    covariances: Covariances, ranks: Mapping[str, int], solver: str = "auto", show_progress: bool = True
) -> dict[tuple[str, int], torch.Tensor]:
    """Null basis per (covariance, rank) needed by the layers; with several processes each basis is solved by
    one owner rank and broadcast, so every rank holds bitwise the same bases."""
    needed = sorted({(covariances.group_of[name], rank) for name, rank in ranks.items()})
    owners = assign_owners({f"{group}|{rank}": covariances.matrices[group].shape[0] for group, rank in needed})
    my_rank = rank_and_world()[0]
    result = {}
    for group, rank in progress(needed, "null bases", "covariance") if show_progress else needed:
        matrix = covariances.matrices[group]
        owner = owners[f"{group}|{rank}"]
        if owner == my_rank:
            basis = null_basis(matrix, rank, solver)
        else:
            basis = torch.empty(matrix.shape[0], rank, dtype=torch.float64, device=matrix.device)
        result[group, rank] = basis
    # Broadcasts go after the solves, so owners work in parallel instead of in turn.
    for (group, rank), basis in result.items():
        broadcast_(basis, src=owners[f"{group}|{rank}"])
    return result


def layer_report(name, layer, adapter_name, covariances, lora_a, seed) -> LayerReport:
    covariance = covariances.of(name)
    return LayerReport(
        name=name,
        d_in=layer.in_features,
        d_out=layer.out_features,
        rank=layer.r[adapter_name],
        covariance=covariances.group_of[name],
        tokens=covariances.tokens[covariances.group_of[name]],
        leakage=leakage_from_covariance(lora_a, covariance),
        leakage_random=leakage_from_covariance(random_like(lora_a, seed), covariance),
    )
