"""LoRA-Null initialization of a PEFT LoRA adapter: calibrate → null basis → factors → residual base (the
steps themselves run in loop.py, on the inputs inputs.py prepares; this module checks the request, sets the loop up
and records the report).

`lora_null_init` takes a plain transformers model (it wraps it with your LoraConfig) or a PeftModel that
already holds the adapter (what TRL, Axolotl and LLaMA-Factory hand you), and overwrites that adapter in
place. The result is an ordinary PeftModel with an ordinary LoraConfig.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from ..calibration.cache import CovarianceCache
from ..calibration.sources import CalibrationSource
from ..config import LoraNullConfig
from ..distributed import alone, any_rank, collective_device, rank_and_world, shard
from ..errors import ConfigError, UnsupportedModelError
from ..layout import RESIDUAL_MARKER
from ..model_parts import keep_on, model_device
from ..report import InitReport, LayerReport
from ..weights import is_zero3_partitioned, no_cpu_repacking
from . import phases
from .adapter_scope import chosen_adapter, only_adapter, restored_on_failure
from .block_loaders import BlockLoader
from .inputs import InitInputs, prepare_inputs
from .loop import BlockByBlock, LoopSettings, StepData, WholeModel, run_steps, should_overlap
from .peft_layers import apply_variant, as_peft_model, check_finite_weights, check_layers, lora_layers, lora_summary
from .phases import phase
from .safeguards import check_function_preserved
from .streaming import StreamingPlan, decoder_blocks, layers_by_block

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitRequest:
    """One init, checked: the PeftModel and the adapter's LoRA layers to write, where the knowledge text and the task
    data come from (None: the model's own text; no task data), and how to run it."""

    peft_model: PeftModel
    layers: Mapping[str, LoraLayer]
    adapter_name: str
    config: LoraNullConfig
    tokenizer: Any
    calibration: CalibrationSource | None = None
    task_data: CalibrationSource | None = None
    execution_device: str | None = None
    block_loader: BlockLoader | None = None


def lora_null_init(
    model: nn.Module,
    lora_config: LoraConfig | None,
    calibration: CalibrationSource | None,
    tokenizer: Any,
    config: LoraNullConfig | None = None,
    adapter_name: str | None = None,
    execution_device: str | None = None,
    block_loader: BlockLoader | None = None,
    task_data: CalibrationSource | None = None,
    **overrides: Any,
) -> PeftModel:
    """Initialize a LoRA adapter in the null space of the calibration activations; return the PeftModel.

    `calibration`: knowledge text to keep (a path, hub name, Dataset or list of rows); None samples the model's own
    text instead (calibration/own_text.py; the `generated_*` settings say how). `task_data`: the fine-tuning inputs
    (same forms); with it A is task-aware, where knowledge inputs are weak relative to these
    (null_space.task_aware_basis).

    `overrides` replace LoraNullConfig fields, e.g. `lora_null_init(model, cfg, data, tok, variant="v2")`.
    The PeftModel carries the measurements as `.lora_null_report` (an InitReport). With streaming, blocks
    run on `execution_device` (default: where the model is), so a model kept on the CPU is initialized
    on a GPU one block at a time; `block_loader` brings in blocks whose weights live elsewhere (disk, meta).
    `adapter_name` (default: the PeftModel's active adapter) is the one written; other adapters are left alone.
    """
    config = (config or LoraNullConfig()).replace(**overrides)
    adapter_name = chosen_adapter(model, adapter_name)
    with phase(phases.WRAP):
        peft_model = as_peft_model(model, lora_config, adapter_name)
    layers = lora_layers(peft_model, adapter_name)
    check_layers(layers, adapter_name, config, peft_model.get_base_model())
    request = InitRequest(
        peft_model, layers, adapter_name, config, tokenizer, calibration, task_data, execution_device, block_loader
    )
    # FSDP's cpu_ram_efficient_loading: only rank 0 holds weights (the others hold meta tensors until FSDP
    # broadcasts rank 0's, adapter included, when it wraps the model), so rank 0 initializes alone. (A block loader
    # brings meta blocks in itself: --offload disk.)
    if (
        block_loader is None
        and rank_and_world()[1] > 1
        and any_rank(any(p.is_meta for p in peft_model.get_base_model().parameters()))
    ):
        if rank_and_world()[0] != 0:
            _mark_initialized(peft_model, config, adapter_name)
            return peft_model
        if any(p.is_meta for layer in layers.values() for p in layer.get_base_layer().parameters()):
            raise UnsupportedModelError(
                "The model's weights are on the meta device (not loaded), on rank 0 too: "
                "load the weights before initializing."
            )
        device = execution_device or str(execution_device_for(peft_model))  # this rank's GPU, found before alone()
        with alone(), no_cpu_repacking(peft_model):
            return _initialize(replace(request, execution_device=device))
    # In memory, a refused init leaves the adapter as it was (blocks a loader brings in are written where they live;
    # ZeRO-3 partitions are not held whole).
    in_memory = block_loader is None and not is_zero3_partitioned(peft_model.parameters())
    restored = restored_on_failure(layers, adapter_name, config.residual) if in_memory else contextlib.nullcontext()
    with only_adapter(peft_model, adapter_name), restored, no_cpu_repacking(peft_model):
        return _initialize(request)


def _initialize(request: InitRequest) -> PeftModel:
    peft_model, layers, config = request.peft_model, request.layers, request.config
    device = torch.device(request.execution_device) if request.execution_device else execution_device_for(peft_model)
    with phase(phases.DATA):
        inputs = prepare_inputs(
            peft_model, layers, request.calibration, request.task_data, request.tokenizer, config, device
        )
    config = config.replace(a_scale=config.applied_a_scale(task_aware=inputs.task is not None))
    plan = streaming_plan(peft_model, layers, config)
    if plan is None:  # block by block, each block's weights are checked on arrival, where they are computed on
        check_finite_weights(layers)
    # The cache holds the knowledge covariances; task data, when given, is run through the model every time.
    cache = CovarianceCache.open(config.covariance_cache, peft_model.get_base_model(), inputs.batches, config)
    cached = cache is not None and cache.has(list(layers), device)
    # with cached covariances only the held-out data and the probe run
    data = StepData(
        [] if cached else shard(inputs.batches), shard(inputs.holdout), inputs.probe, shard(inputs.task_batches)
    )
    settings = LoopSettings(
        config,
        request.adapter_name,
        device,
        cache,
        cached,
        should_overlap(config.overlap, device, plan[0] if plan is not None else None),
        inputs.task is not None,
    )
    was_training = peft_model.training
    peft_model.eval()
    try:
        source = (
            BlockByBlock(peft_model, layers, plan, data, device, request.block_loader)
            if plan is not None
            else WholeModel(peft_model, layers, data)
        )
        report_layers = run_steps(source.steps(), settings)
        function_error = source.function_error()
    finally:
        peft_model.train(was_training)
    check_function_preserved(function_error, config, layers)
    _mark_initialized(peft_model, config, request.adapter_name)
    if config.residual:  # the base now holds residuals; saved with it, so it is never initialized twice
        setattr(peft_model.get_base_model().config, RESIDUAL_MARKER, {"variant": config.variant, "init": config.init})
    logger.info("Function preserved after init: relative error %.2e.", function_error)
    report = _report(request, config, inputs, report_layers, function_error, plan is not None)
    keep_on(peft_model, "lora_null_report", report)
    return peft_model


def _report(
    request: InitRequest,
    config: LoraNullConfig,
    inputs: InitInputs,
    layers: list[LayerReport],
    function_error: float,
    streamed: bool,
) -> InitReport:
    texts, task, base = inputs.texts, inputs.task, request.peft_model.get_base_model()
    return InitReport(
        variant=config.variant,
        init=config.init,
        train_base="residual" if config.residual else "original",
        adapter_name=request.adapter_name,
        model=str(getattr(base.config, "name_or_path", "") or ""),
        lora=lora_summary(request.peft_model.peft_config[request.adapter_name]),
        calibration={
            "source": texts.source,
            "used": inputs.chosen.used,  # what the covariances were summed over, in one line
            # own text added to knowledge text short of the widest input (short_calibration: top_up), else None
            "top_up": inputs.chosen.top_up,
            "num_samples": len(texts.calibration),
            "holdout_samples": len(texts.holdout),
            "max_length": config.max_length,
            "tokens": max(layer.tokens for layer in layers),
            # None: the plain null space; else the task data that made A task-aware
            "task_data": {"source": task.source, "num_samples": len(task.calibration), "task_mix": config.task_mix}
            if task
            else None,
        },
        function_error_measure="last_block_output" if streamed else "logits",
        config=config.to_dict(),  # a_scale as applied
        function_error=function_error,
        layers=layers,
    )


def _mark_initialized(peft_model: PeftModel, config: LoraNullConfig, adapter_name: str) -> None:
    apply_variant(peft_model, config.variant, adapter_name)
    # adapter → whether its base weights became residuals (what a second init would stack on)
    initialized = {**getattr(peft_model, "_lora_null_initialized", {}), adapter_name: config.residual}
    keep_on(peft_model, "_lora_null_initialized", initialized)
    if config.variant == "v2":  # kept frozen when training starts (adapter_scope.refreeze_frozen_a)
        frozen = {*getattr(peft_model, "_lora_null_frozen_a", ()), adapter_name}
        keep_on(peft_model, "_lora_null_frozen_a", frozen)


def execution_device_for(peft_model: PeftModel) -> torch.device:
    """Where the model is; but a model still on the CPU under NCCL (FSDP and ZeRO-3 place it only when they wrap
    it) streams its blocks through this rank's GPU, where the collectives need the covariances anyway."""
    device = model_device(peft_model)
    return (collective_device() or device) if device.type == "cpu" else device


def initialize_lora_null_weights(
    peft_model: PeftModel,
    calibration: CalibrationSource | None = None,
    tokenizer: Any = None,
    config: LoraNullConfig | None = None,
    adapter_name: str | None = None,
    **overrides: Any,
) -> PeftModel:
    """The PEFT-native entry, shaped like PEFT's own data-driven inits (`initialize_lora_eva_weights`): build
    the PeftModel with `get_peft_model(model, LoraConfig(..., init_lora_weights=False))` as usual, then call
    this once on it, before the optimizer exists. Same as `lora_null_init(peft_model, None, ...)`. Without
    calibration text (`initialize_lora_null_weights(peft_model, tokenizer=tok)`) the model's own text is used."""
    if not isinstance(peft_model, PeftModel):
        raise ConfigError(
            "initialize_lora_null_weights takes the PeftModel get_peft_model returned; for a plain "
            "model use lora_null_init(model, LoraConfig(...), ...)."
        )
    return lora_null_init(peft_model, None, calibration, tokenizer, config, adapter_name=adapter_name, **overrides)


def streaming_plan(
    peft_model: PeftModel, layers: Mapping[str, LoraLayer], config: LoraNullConfig
) -> StreamingPlan | None:
    """(blocks, layer names per block) when block-by-block calibration applies, else None."""
    if config.streaming == "off":
        return None
    found = decoder_blocks(peft_model.get_base_model())
    grouped = layers_by_block(found[0], found[1], list(layers)) if found is not None else None
    if found is None or grouped is None:
        if config.streaming == "on":
            raise UnsupportedModelError(
                "streaming='on' needs every target inside the decoder blocks of a model whose blocks share one "
                "attention type; use streaming='auto' or 'off' for this model or these targets."
            )
        return None
    return found[1], grouped
