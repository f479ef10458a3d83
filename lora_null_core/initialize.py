"""LoRA-Null initialization of a PEFT LoRA adapter: calibrate → null basis → factors → residual base.

`lora_null_init` takes a plain transformers model (it wraps it with your LoraConfig) or a PeftModel that
already holds the adapter (what TRL, Axolotl and LLaMA-Factory hand you), and overwrites that adapter in
place. The result is an ordinary PeftModel with an ordinary LoraConfig.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

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
from .console import progress, quiet_libraries
from .covariance_cache import CovarianceCache
from .data import CalibrationSource, TokenBatch, choose_texts, distinct_contexts, tokenize_batches
from .distributed import assign_owners, broadcast_, rank_and_world, shard
from .errors import (
    ConfigError,
    FunctionNotPreservedError,
    InsufficientCalibrationError,
    InvalidRankError,
    NoTargetModulesError,
    UnsupportedModelError,
)
from .leakage import LeakageCollector, holdout_leakage, leakage_from_covariance, random_like
from .null_space import basis_factors, null_basis, projected_factors, row_chunks
from .report import RESIDUAL_MARKER, InitReport, LayerReport
from .sequential import (
    BlockLoader,
    capture_block_inputs,
    decoder_blocks,
    layers_by_block,
    run_block,
    stream_blocks,
)

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
    # Small enough batches that every process gets at least one.
    world = rank_and_world()[1]
    batch_size = min(config.batch_size, -(-len(texts.calibration) // world))
    batches = tokenize_batches(texts.calibration, tokenizer, config.max_length, batch_size)
    if len(batches) < world:
        raise InsufficientCalibrationError(f"{len(texts.calibration)} calibration samples cannot feed {world} processes.")
    holdout = tokenize_batches(texts.holdout, tokenizer, config.max_length, batch_size) if texts.holdout else []
    check_distinct_contexts(batches, layers, config)
    probe = _probe(batches)

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
        lora=_lora_summary(peft_model.peft_config[adapter_name]),
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


def check_distinct_contexts(batches: list[TokenBatch], layers: Mapping[str, LoraLayer], config: LoraNullConfig) -> None:
    """Before any forward pass: calibration text too repetitive or short to span the layers' inputs is refused
    (under a quarter of the widest input: 200 copies of one question, max_length 1); below the full width it
    is only a warning, since short real questions share prefixes ("The capital of …") and the null space then
    still generalizes (held-out leakage a fraction of a random A's: the CPU-size benchmark's 200 qa_wikidata
    questions give 1,361 distinct contexts for SmolLM2's 1,536-wide down_proj inputs)."""
    if not config.min_tokens_per_dim:
        return
    widest = max(layer.in_features for layer in layers.values())
    wanted = int(config.min_tokens_per_dim * widest)
    contexts = distinct_contexts(batches)
    if contexts >= wanted:
        return
    tokens = sum(batch.num_tokens for batch in batches)
    found = (f"The calibration text holds {tokens} tokens but only {contexts} distinct contexts (a token's "
             f"activations depend only on its prefix), so the activations span at most {contexts} of the {widest} "
             "input directions")
    fix = ("more and more varied texts, or a larger max_length; min_tokens_per_dim lowers the bar "
           "(0 disables the check)")
    if contexts < wanted / 4:
        raise InsufficientCalibrationError(
            f"{found} and the null space would be picked by rounding (leakage near 0 here, that of a random A on "
            f"new text). Use at least {wanted} distinct contexts: {fix}."
        )
    logger.warning("%s: part of the null space is picked by rounding. The held-out leakage in the report shows "
                   "whether it matters; %s.", found, fix)


def check_function_preserved(function_error: float, config: LoraNullConfig, layers: Mapping[str, LoraLayer]) -> None:
    """Refuse a model that no longer computes what it did (NaN factors, a layer the init could not make exact)."""
    tolerance = config.max_function_error
    if tolerance is None:  # rounding of W − s·B·A in the weights' own dtype, and of the forward pass itself
        dtype = next(iter(layers.values())).get_base_layer().weight.dtype
        tolerance = max(1e-3, 10 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-3
    if not math.isfinite(function_error) or function_error > tolerance:
        raise FunctionNotPreservedError(
            f"After initialization the model's output changed by {function_error:.3g} (relative; tolerance "
            f"{tolerance:.3g}), so it no longer computes what it did. Nothing was saved. Check lora_alpha and the "
            "targets; in float16, load the model in bfloat16 or float32. max_function_error raises the tolerance."
        )


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
    null_bases = solve_null_bases(covariances, ranks, config.solver, show_progress)
    reports = []
    for name, layer in layers.items():
        basis = null_bases[covariances.group_of[name], layer.r[adapter_name]]
        lora_a = write_adapter(layer, adapter_name, basis, config.init, config.a_scale, config.residual)
        reports.append(_layer_report(name, layer, adapter_name, covariances, lora_a, config.seed))
    return reports


def _init_whole_model(peft_model, layers, batches, holdout, probe, config, adapter_name, cache, cached):
    """One forward pass over all data with every layer tapped; every covariance held at once."""
    modules = {name: layer.get_base_layer() for name, layer in layers.items()}
    with peft_model.disable_adapter():
        reference = _logits(peft_model, probe)
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
    function_error = _relative_error(_logits(peft_model, probe), reference, probe.attention_mask)
    if holdout or config.holdout_samples:
        lora_as = {name: layer.lora_A[adapter_name].weight.detach() for name, layer in layers.items()}
        _set_holdout(reports, holdout_leakage(peft_model, modules, lora_as, holdout, config.seed))
    return reports, function_error


def _init_streaming(peft_model, layers, plan, batches, holdout, probe, config, adapter_name, device, loader,
                    cache, cached):
    """Block by block: calibrate, initialize, measure; the GPU holds one block and the hidden states.
    With cached covariances `batches` is empty and only the held-out and probe samples go through."""
    blocks, names_by_block = plan
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
            with peft_model.disable_adapter():
                with InputTaps(modules, collector) as taps:
                    for j in calibration:
                        taps.set_batch(calls[j].mask)
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
                    taps.set_batch(calls[j].mask)
                    calls[j] = calls[j].with_hidden(run_block(step.block, calls[j]))
            if block_layers and config.holdout_samples:
                _set_holdout(block_reports, leakage.results())
            drift = drift.with_hidden(run_block(step.block, drift))
            calls[-1] = calls[-1].with_hidden(probe_before)
    return reports, _relative_error(drift.hidden.float(), calls[-1].hidden.float(), drift.mask)


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


def as_peft_model(model: nn.Module, lora_config: Optional[LoraConfig], adapter_name: str) -> PeftModel:
    """The PeftModel to initialize: `model` itself if it already holds the adapter, else a fresh wrap."""
    if isinstance(model, PeftModel) and adapter_name in getattr(model, "_lora_null_initialized", ()):
        raise UnsupportedModelError(
            f"Adapter {adapter_name!r} of this PeftModel was already initialized by lora_null_init, and its base "
            "weights are already residuals. Start again from the original model (or load the init folder with "
            "load_initialized to train it)."
        )
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if getattr(getattr(base, "config", None), RESIDUAL_MARKER, None):
        raise UnsupportedModelError(
            "This model is a LoRA-Null residual base (OUT/base of an earlier init), not an original model: "
            "initializing it again would stack two residuals. Initialize the original model instead."
        )
    if isinstance(model, PeftModel):
        if adapter_name not in model.peft_config:
            raise UnsupportedModelError(
                f"The PeftModel has no adapter {adapter_name!r} (it has {', '.join(model.peft_config)})."
            )
        existing = model.peft_config[adapter_name]
        if not isinstance(existing, LoraConfig):
            raise UnsupportedModelError(f"Adapter {adapter_name!r} is {type(existing).__name__}, not LoRA.")
        if existing.init_lora_weights not in (True, False, "gaussian"):
            raise UnsupportedModelError(
                f"Adapter {adapter_name!r} was created with init_lora_weights={existing.init_lora_weights!r}, which "
                "already rewrote the base weights; create it with init_lora_weights=True or False instead."
            )
        _refuse_dora(existing)
        check_lora_config(existing)
        return model
    if lora_config is None:
        raise UnsupportedModelError("Pass a LoraConfig, or a PeftModel that already holds the LoRA adapter.")
    _refuse_dora(lora_config)
    check_lora_config(lora_config)
    lora_config = copy.deepcopy(lora_config)
    lora_config.init_lora_weights = False  # every factor gets overwritten; skip PEFT's own init work
    if lora_config.target_modules is None:
        lora_config.target_modules = "all-linear"
    if not lora_config.target_modules:
        raise NoTargetModulesError(f"target_modules is empty. Linear layers in this model: "
                                   f"{', '.join(linear_module_suffixes(model))} (or all-linear).")
    try:
        with quiet_libraries():
            return get_peft_model(model, lora_config, adapter_name=adapter_name)
    except ValueError as err:
        if "not found in the base model" in str(err) or "No modules were targeted" in str(err):
            raise NoTargetModulesError(
                f"No module matches target_modules={lora_config.target_modules!r}. Linear layers in this model: "
                f"{', '.join(linear_module_suffixes(model))}."
            ) from err
        raise


def check_lora_config(lora_config: LoraConfig) -> None:
    """LoRA's own numbers, checked before any compute: a zero or NaN alpha would write NaN into every base weight."""
    ranks = {"r": lora_config.r, **{f"rank_pattern[{k!r}]": v for k, v in (lora_config.rank_pattern or {}).items()}}
    for name, value in ranks.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"LoRA {name}={value!r}: the rank must be a whole number of at least 1 (--rank).")
    alphas = {"lora_alpha": lora_config.lora_alpha,
              **{f"alpha_pattern[{k!r}]": v for k, v in (lora_config.alpha_pattern or {}).items()}}
    for name, value in alphas.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"LoRA {name}={value!r}: alpha must be a finite number above 0 (--alpha; default = rank).")
    dropout = lora_config.lora_dropout
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"lora_dropout={dropout!r} must be at least 0 and below 1 (--dropout).")


def _refuse_dora(lora_config: LoraConfig) -> None:
    if getattr(lora_config, "use_dora", False):
        raise UnsupportedModelError("LoRA-Null does not support DoRA adapters; set use_dora=False.")


def linear_module_suffixes(model: nn.Module) -> list[str]:
    """Distinct last name parts of linear layers (q_proj, c_attn, …): what target_modules can name."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (nn.Linear, Conv1D)) and m is not head})


def lora_layers(peft_model: PeftModel, adapter_name: str) -> dict[str, LoraLayer]:
    """Every LoRA-wrapped module that carries `adapter_name`, by its name in the base model."""
    layers = {}
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            layers[name] = module
    if not layers:
        raise NoTargetModulesError(f"Adapter {adapter_name!r} wraps no module that LoRA-Null can initialize.")
    return layers


def check_layers(
    layers: Mapping[str, LoraLayer], adapter_name: str, config: LoraNullConfig, model: Optional[nn.Module] = None
) -> None:
    """Refuse, before any compute, the layers LoRA-Null cannot initialize exactly."""
    head = model.get_output_embeddings() if model is not None and hasattr(model, "get_output_embeddings") else None
    owners = _weight_owners(model) if model is not None else {}
    for name, module in (model.named_modules() if model is not None else ()):
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_embedding_A", {}):
            raise UnsupportedModelError(
                f"{name} is an embedding; LoRA-Null initializes linear layers only, and would leave this one with "
                "PEFT's random factors. Leave it out of target_modules."
            )
    for name, layer in layers.items():
        base_layer = layer.get_base_layer()
        if not isinstance(layer.lora_A[adapter_name], nn.Linear):
            raise UnsupportedModelError(
                f"{name} is a {type(base_layer).__name__}; LoRA-Null initializes linear layers only, and would "
                "leave this one with PEFT's random factors. Leave it out of target_modules."
            )
        if head is not None and (base_layer is head or layer is head):
            raise UnsupportedModelError(
                f"{name} is the model's output layer (LM head): PEFT saves its whole weight with the adapter and, "
                "when tied, it is also the input embedding, so no exact init and export exist. Leave it out of "
                "target_modules (the default, all-linear, already does)."
            )
        weight = base_layer.weight
        sharing = owners.get(id(weight), [])
        if len(sharing) > 1:
            raise UnsupportedModelError(
                f"{name}'s weight is shared with {', '.join(n for n in sharing if n != name)} (tied weights): "
                "rewriting it into a residual would change those modules too. Leave it out of target_modules."
            )
        if not weight.is_meta and weight.dtype in _FLOAT_DTYPES and not bool(torch.isfinite(weight).all()):
            raise UnsupportedModelError(
                f"{name}'s weight contains NaN or Inf: the checkpoint is damaged. Reload or re-download the model."
            )
        quantized = type(weight) is not nn.Parameter or weight.dtype not in _FLOAT_DTYPES
        if quantized and config.init == "projected":  # its factors are read from the float weight
            raise UnsupportedModelError(
                f"{name} has a quantized base weight ({type(weight).__name__}, {weight.dtype}), which cannot hold "
                "the residual W - s·B·A exactly. Use init='basis' (--init basis): it leaves the base untouched."
            )
        d_in, d_out = layer.in_features, layer.out_features
        rank = layer.r[adapter_name]
        if rank >= d_in or (config.init == "projected" and rank > d_out):
            limit = d_in - 1 if config.init == "basis" else min(d_in - 1, d_out)
            raise InvalidRankError(
                f"rank {rank} is too large for {name} (d_in={d_in}, d_out={d_out}): the null space needs "
                f"rank < d_in. Use a rank ≤ {limit}, or leave this layer out of target_modules."
            )


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """Module names by the id of the weight tensor they hold (after unwrapping PEFT), to spot tied weights."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not isinstance(module, LoraLayer) and ".lora_" not in name:
            owners.setdefault(id(weight), []).append(name.replace(".base_layer", ""))
    return owners


def weight_matrix(layer: LoraLayer) -> torch.Tensor:
    """The base weight as (d_out, d_in), whatever the layer stores (Conv1D keeps it transposed)."""
    weight = layer.get_base_layer().weight
    return weight.T if layer.fan_in_fan_out else weight


def write_adapter(layer: LoraLayer, adapter_name: str, basis: torch.Tensor, init: str, a_scale: float = 1.0,
                  residual: bool = True) -> torch.Tensor:
    """Write A, B (and, for the projected init on the residual, the residual base) into one layer; return A.
    `a_scale` moves magnitude from B to A (B·A unchanged): with Adam a larger frozen A is a faster adapter.
    Without `residual` the projected init keeps B₀·A₀ inside the untouched base and starts B at 0: for a frozen
    A the same training, and the trained adapter is a standard LoRA for the original weights."""
    lora_a_param = layer.lora_A[adapter_name].weight
    lora_b_param = layer.lora_B[adapter_name].weight
    scaling = layer.scaling[adapter_name]
    original = weight_matrix(layer).detach()
    basis = basis.to(original.device)
    if init == "projected":
        lora_a, lora_b = projected_factors(original, basis, scaling)
    else:
        lora_a, lora_b = basis_factors(basis, original.shape[0])
    lora_a, lora_b = lora_a * a_scale, lora_b / a_scale if residual else torch.zeros_like(lora_b)
    # Rank 0's factors everywhere: identical adapters on every process, whatever the SVD's last bits did.
    broadcast_(lora_a)
    broadcast_(lora_b)
    with torch.no_grad():
        lora_a_param.copy_(lora_a.to(lora_a_param.device))
        lora_b_param.copy_(lora_b.to(lora_b_param.device))
        if init == "projected" and residual:
            _write_residual(layer, lora_a_param, lora_b_param, scaling)
    return lora_a_param.detach()


def _write_residual(layer: LoraLayer, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
    """W_res = W − s·B·A with the stored (rounded) factors, so W_res + s·B·A equals W to the precision of
    W_res's own dtype. In float64 row chunks: a full float64 copy of a 70B down_proj would be 1.9 GB."""
    original = weight_matrix(layer).detach()  # shares the parameter's storage
    lora_a = lora_a.detach().to(original.device, torch.float64)
    lora_b = lora_b.detach().to(original.device, torch.float64)
    start = 0
    for rows in row_chunks(original):
        end = start + rows.shape[0]
        rows.copy_(rows.double() - scaling * lora_b[start:end] @ lora_a)  # views: writes into the base weight
        start = end


def apply_variant(peft_model: PeftModel, variant: str, adapter_name: str = "default") -> None:
    """v2 freezes lora_A (the down-projection) so training moves only B and the update stays in the null space."""
    for layer in lora_layers(peft_model, adapter_name).values():
        layer.lora_A[adapter_name].weight.requires_grad_(variant != "v2")
        layer.lora_B[adapter_name].weight.requires_grad_(True)


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


def _probe(batches: list[TokenBatch]) -> TokenBatch:
    """A few of the shortest calibration samples, to check that init left the model's function unchanged."""
    last = batches[-1]
    return TokenBatch(last.input_ids[:4], last.attention_mask[:4])


def _logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
    finally:
        model.train(was_training)
    return out.logits.float()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.to(actual.device).bool()
    return float((actual[keep] - expected[keep]).norm() / expected[keep].norm().clamp_min(1e-30))


def _lora_summary(lora_config: LoraConfig) -> dict[str, Any]:
    targets = lora_config.target_modules
    return {
        "r": lora_config.r,
        "lora_alpha": lora_config.lora_alpha,
        "use_rslora": bool(lora_config.use_rslora),
        "lora_dropout": lora_config.lora_dropout,
        "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
        "rank_pattern": dict(lora_config.rank_pattern or {}),
        "alpha_pattern": dict(lora_config.alpha_pattern or {}),
    }
