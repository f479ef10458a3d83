"""LoRA-Null initialization of a PEFT LoRA adapter: calibrate → null basis → factors → residual base.

`lora_null_init` takes a plain transformers model (it wraps it with your LoraConfig) or a PeftModel that
already holds the adapter (what TRL, Axolotl and LLaMA-Factory hand you), and overwrites that adapter in
place. The result is an ordinary PeftModel with an ordinary LoraConfig.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from . import phases
from .adapters import (
    apply_variant,
    as_peft_model,
    bare_base_layers,
    check_layers,
    lora_layers,
    lora_summary,
    write_adapter,
)
from .calibrate import (
    CovarianceCollector,
    Covariances,
    InputTaps,
    check_token_counts,
    collect_covariances,
    finalize_covariances,
    model_device,
)
from .config import LoraNullConfig
from .console import progress
from .covariance_cache import CovarianceCache
from .data import CalibrationSource, choose_texts, tokenize_batches
from .distributed import assign_owners, broadcast_, rank_and_world, shard
from .errors import (
    ConfigError,
    InsufficientCalibrationError,
    UnsupportedModelError,
)
from .leakage import LeakageCollector, holdout_leakage, leakage_from_covariance, random_like
from .null_space import null_basis
from .phases import phase
from .report import RESIDUAL_MARKER, InitReport, LayerReport
from .safeguards import check_distinct_contexts, check_function_preserved, model_logits, probe_batch, relative_error
from .sequential import (
    BlockLoader,
    capture_block_inputs,
    decoder_blocks,
    layers_by_block,
    run_block,
    stream_blocks,
)

logger = logging.getLogger(__name__)


def lora_null_init(
    model: nn.Module,
    lora_config: Optional[LoraConfig],
    calibration: CalibrationSource,
    tokenizer: Any,
    config: Optional[LoraNullConfig] = None,
    adapter_name: str = "default",
    execution_device: Optional[str] = None,
    block_loader: Optional[BlockLoader] = None,
    **overrides: Any,
) -> PeftModel:
    """Initialize a LoRA adapter in the null space of the calibration activations; return the PeftModel.

    `overrides` replace LoraNullConfig fields, e.g. `lora_null_init(model, cfg, data, tok, variant="v2")`.
    The PeftModel carries the measurements as `.lora_null_report` (an InitReport). With streaming, blocks
    run on `execution_device` (default: where the model is), so a model kept on the CPU is initialized
    on a GPU one block at a time; `block_loader` brings in blocks whose weights live elsewhere (disk, meta).
    """
    config = (config or LoraNullConfig()).replace(**overrides)
    peft_model = as_peft_model(model, lora_config, adapter_name)
    layers = lora_layers(peft_model, adapter_name)
    check_layers(layers, adapter_name, config, peft_model.get_base_model())

    texts = choose_texts(
        calibration, tokenizer, config.num_samples, config.holdout_samples, config.seed, config.text_field
    )
    # Batches by token budget, and at least one per process.
    world = rank_and_world()[1]
    batching = {"batch_size": config.batch_size, "batch_tokens": config.batch_tokens, "min_batches": world}
    batches = tokenize_batches(texts.calibration, tokenizer, config.max_length, **batching)
    if len(batches) < world:
        raise InsufficientCalibrationError(f"{len(texts.calibration)} calibration samples cannot feed {world} processes.")
    holdout = tokenize_batches(texts.holdout, tokenizer, config.max_length, **batching) if texts.holdout else []
    check_distinct_contexts(batches, layers, config)
    probe = probe_batch(batches)

    plan = streaming_plan(peft_model, layers, config)
    device = torch.device(execution_device) if execution_device else model_device(peft_model)
    cache = CovarianceCache.open(config.covariance_cache, peft_model.get_base_model(), batches, config)
    cached = cache is not None and cache.has(list(layers), device)
    was_training = peft_model.training
    peft_model.eval()
    try:
        if plan is not None:
            report_layers, function_error = _init_streaming(
                peft_model, layers, plan, [] if cached else shard(batches), shard(holdout), probe, config,
                adapter_name, device, block_loader, cache, cached,
            )
        else:
            report_layers, function_error = _init_whole_model(
                peft_model, layers, [] if cached else shard(batches), shard(holdout), probe, config, adapter_name,
                cache, cached,
            )
    finally:
        peft_model.train(was_training)
    check_function_preserved(function_error, config, layers)
    apply_variant(peft_model, config.variant, adapter_name)
    peft_model._lora_null_initialized = {*getattr(peft_model, "_lora_null_initialized", ()), adapter_name}
    if config.residual:  # the base now holds residuals; saved with it, so it is never initialized twice
        setattr(peft_model.get_base_model().config, RESIDUAL_MARKER, {"variant": config.variant, "init": config.init})
    logger.info("Function preserved after init: relative error %.2e.", function_error)

    peft_model.lora_null_report = InitReport(
        variant=config.variant,
        init=config.init,
        train_base="residual" if config.residual else "original",
        adapter_name=adapter_name,
        model=str(getattr(peft_model.get_base_model().config, "name_or_path", "") or ""),
        lora=lora_summary(peft_model.peft_config[adapter_name]),
        calibration={
            "source": texts.source,
            "num_samples": len(texts.calibration),
            "holdout_samples": len(texts.holdout),
            "max_length": config.max_length,
            "tokens": max(layer.tokens for layer in report_layers),
        },
        function_error_measure="last_block_output" if plan is not None else "logits",
        config=config.to_dict(),
        function_error=function_error,
        layers=report_layers,
    )
    return peft_model


def initialize_lora_null_weights(peft_model: PeftModel, calibration: CalibrationSource, tokenizer: Any,
                                 config: Optional[LoraNullConfig] = None, adapter_name: str = "default",
                                 **overrides: Any) -> PeftModel:
    """The PEFT-native entry, shaped like PEFT's own data-driven inits (`initialize_lora_eva_weights`): build
    the PeftModel with `get_peft_model(model, LoraConfig(..., init_lora_weights=False))` as usual, then call
    this once on it, before the optimizer exists. Same as `lora_null_init(peft_model, None, ...)`."""
    if not isinstance(peft_model, PeftModel):
        raise ConfigError("initialize_lora_null_weights takes the PeftModel get_peft_model returned; for a plain "
                          "model use lora_null_init(model, LoraConfig(...), ...).")
    return lora_null_init(peft_model, None, calibration, tokenizer, config, adapter_name=adapter_name, **overrides)


def streaming_plan(peft_model: PeftModel, layers: Mapping[str, LoraLayer], config: LoraNullConfig):
    """(blocks, layer names per block) when block-by-block calibration applies, else None."""
    if config.streaming == "off":
        return None
    found = decoder_blocks(peft_model.get_base_model())
    grouped = layers_by_block(found[0], found[1], list(layers)) if found else None
    if grouped is None:
        if config.streaming == "on":
            raise UnsupportedModelError(
                "streaming='on' needs every target inside the decoder blocks of a model whose blocks share one "
                "attention type; use streaming='auto' or 'off' for this model or these targets."
            )
        return None
    return found[1], grouped


def _initialize_layers(
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
            lora_a = write_adapter(layer, adapter_name, basis, config.init, config.a_scale, config.residual)
        with phase(phases.REPORT):
            reports.append(_layer_report(name, layer, adapter_name, covariances, lora_a, config.seed))
    return reports


def _init_whole_model(peft_model, layers, batches, holdout, probe, config, adapter_name, cache, cached):
    """One forward pass over all data with every layer tapped; every covariance held at once."""
    modules = {name: layer.get_base_layer() for name, layer in layers.items()}
    with bare_base_layers(peft_model.get_base_model()):
        reference = model_logits(peft_model, probe)
        if cached:
            covariances = cache.load(modules)
        else:
            covariances = collect_covariances(
                peft_model, modules, batches, getattr(torch, config.accumulate_dtype), config.covariance_weighting
            )
            if cache is not None:
                with cache.writing() as writer:
                    writer.add("model", covariances)
    reports = _initialize_layers(layers, covariances, config, adapter_name)
    function_error = relative_error(model_logits(peft_model, probe), reference, probe.attention_mask)
    if holdout or config.holdout_samples:
        lora_as = {name: layer.lora_A[adapter_name].weight.detach() for name, layer in layers.items()}
        _set_holdout(reports, holdout_leakage(peft_model, modules, lora_as, holdout, config.seed))
    return reports, function_error


def _init_streaming(peft_model, layers, plan, batches, holdout, probe, config, adapter_name, device, loader,
                    cache, cached):
    """Block by block: calibrate, initialize, measure; the GPU holds one block and the hidden states.
    With cached covariances `batches` is empty and only the held-out and probe samples go through."""
    blocks, names_by_block = plan
    with phase(phases.CAPTURE):
        calls = capture_block_inputs(peft_model, blocks[0], [*batches, *holdout, probe], device)
    calibration, held_out = range(len(batches)), range(len(batches), len(batches) + len(holdout))
    dtype = getattr(torch, config.accumulate_dtype)
    reports = []
    # The probe goes through the blocks twice: as the original model computes it (calls[-1]) and through the
    # initialized blocks (drift), so the error compounds as it would in the whole model.
    drift = calls[-1]
    writing = cache.writing() if cache is not None and not cached else contextlib.nullcontext()
    with torch.no_grad(), writing as writer:
        for step in stream_blocks(blocks, names_by_block, device, loader):
            block_layers = {name: layers[name] for name in step.names}
            modules = {name: layer.get_base_layer() for name, layer in block_layers.items()}
            collector = CovarianceCollector(dtype, config.covariance_weighting)
            with bare_base_layers(step.block):
                with InputTaps(modules, collector) as taps:
                    for j in calibration:
                        taps.set_batch(calls[j].mask, calls[j].counts)
                        calls[j] = calls[j].with_hidden(run_block(step.block, calls[j]))
                probe_before = run_block(step.block, calls[-1])
            if block_layers:
                if cached:
                    covariances = cache.load(modules, device)
                else:
                    covariances = finalize_covariances(collector.result, modules, config.covariance_weighting)
                    if writer is not None:
                        writer.add(f"block-{step.index:04d}", covariances)
                block_reports = _initialize_layers(block_layers, covariances, config, adapter_name, False)
                reports += block_reports
                lora_as = {name: layer.lora_A[adapter_name].weight.detach() for name, layer in block_layers.items()}
                leakage = LeakageCollector(lora_as, config.seed)
            with InputTaps(modules, leakage if block_layers else _ignore) as taps:
                for j in held_out:
                    taps.set_batch(calls[j].mask, calls[j].counts)
                    calls[j] = calls[j].with_hidden(run_block(step.block, calls[j]))
            if block_layers and config.holdout_samples:
                _set_holdout(block_reports, leakage.results())
            drift = drift.with_hidden(run_block(step.block, drift))
            calls[-1] = calls[-1].with_hidden(probe_before)
    return reports, relative_error(drift.hidden.float(), calls[-1].hidden.float(), drift.mask)


def _ignore(*_args: Any) -> None:
    pass


def _set_holdout(reports: list[LayerReport], measured: Mapping[str, tuple[float, float]]) -> None:
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


def _layer_report(name, layer, adapter_name, covariances, lora_a, seed) -> LayerReport:
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


