"""LoRA-Null initialization of a PEFT LoRA adapter: calibrate → null basis → factors → residual base.

`lora_null_init` takes a plain transformers model (it wraps it with your LoraConfig) or a PeftModel that
already holds the adapter (what TRL, Axolotl and LLaMA-Factory hand you), and overwrites that adapter in
place. The result is an ordinary PeftModel with an ordinary LoraConfig.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any, Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from tqdm.auto import tqdm

from .calibrate import Covariances, check_token_counts, collect_covariances, model_device
from .config import LoraNullConfig
from .data import CalibrationSource, TokenBatch, choose_texts, tokenize_batches
from .distributed import assign_owners, broadcast_, rank_and_world, shard
from .errors import InsufficientCalibrationError, InvalidRankError, NoTargetModulesError, UnsupportedModelError
from .leakage import holdout_leakage, leakage_from_covariance, random_like
from .null_space import basis_factors, null_basis, projected_factors
from .report import InitReport, LayerReport

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def lora_null_init(
    model: nn.Module,
    lora_config: Optional[LoraConfig],
    calibration: CalibrationSource,
    tokenizer: Any,
    config: Optional[LoraNullConfig] = None,
    adapter_name: str = "default",
    **overrides: Any,
) -> PeftModel:
    """Initialize a LoRA adapter in the null space of the calibration activations; return the PeftModel.

    `overrides` replace LoraNullConfig fields, e.g. `lora_null_init(model, cfg, data, tok, variant="v2")`.
    The PeftModel carries the measurements as `.lora_null_report` (an InitReport).
    """
    config = (config or LoraNullConfig()).replace(**overrides)
    peft_model = as_peft_model(model, lora_config, adapter_name)
    layers = lora_layers(peft_model, adapter_name)
    check_layers(layers, adapter_name, config)

    texts = choose_texts(
        calibration, tokenizer, config.num_samples, config.holdout_samples, config.seed, config.text_field
    )
    # Small enough batches that every process gets at least one.
    world = rank_and_world()[1]
    batch_size = min(config.batch_size, -(-len(texts.calibration) // world))
    batches = tokenize_batches(texts.calibration, tokenizer, config.max_length, batch_size)
    if len(batches) < world:
        raise InsufficientCalibrationError(f"{len(texts.calibration)} calibration samples cannot feed {world} processes.")
    probe = _probe(batches)
    bases = {name: layer.get_base_layer() for name, layer in layers.items()}

    with peft_model.disable_adapter():
        reference = _logits(peft_model, probe)
        covariances = collect_covariances(
            peft_model, bases, shard(batches), getattr(torch, config.accumulate_dtype), config.covariance_weighting
        )
    check_token_counts(covariances, config.min_tokens_per_dim)

    null_bases = solve_null_bases(covariances, {name: layer.r[adapter_name] for name, layer in layers.items()})
    report_layers = []
    for name, layer in tqdm(layers.items(), desc="null-space init", unit="layer", leave=False):
        basis = null_bases[covariances.group_of[name], layer.r[adapter_name]]
        lora_a = write_adapter(layer, adapter_name, basis, config.init)
        report_layers.append(_layer_report(name, layer, adapter_name, covariances, lora_a, config.seed))
    apply_variant(peft_model, config.variant, adapter_name)

    function_error = _relative_error(_logits(peft_model, probe), reference, probe.attention_mask)
    logger.info("Function preserved after init: relative logit error %.2e.", function_error)
    if texts.holdout:
        _add_holdout_leakage(peft_model, layers, adapter_name, texts.holdout, tokenizer, config, report_layers)

    peft_model.lora_null_report = InitReport(
        variant=config.variant,
        init=config.init,
        adapter_name=adapter_name,
        model=str(getattr(peft_model.get_base_model().config, "name_or_path", "") or ""),
        lora=_lora_summary(peft_model.peft_config[adapter_name]),
        calibration={
            "source": texts.source,
            "num_samples": len(texts.calibration),
            "holdout_samples": len(texts.holdout),
            "max_length": config.max_length,
            "tokens": max(covariances.tokens.values()),
        },
        config=config.to_dict(),
        function_error=function_error,
        layers=report_layers,
    )
    return peft_model


def solve_null_bases(covariances: Covariances, ranks: Mapping[str, int]) -> dict[tuple[str, int], torch.Tensor]:
    """Null basis per (covariance, rank) needed by the layers; with several processes each basis is solved by
    one owner rank and broadcast, so every rank holds bitwise the same bases."""
    needed = sorted({(covariances.group_of[name], rank) for name, rank in ranks.items()})
    owners = assign_owners({f"{group}|{rank}": covariances.matrices[group].shape[0] for group, rank in needed})
    my_rank = rank_and_world()[0]
    result = {}
    for group, rank in tqdm(needed, desc="null bases", unit="covariance", leave=False):
        matrix = covariances.matrices[group]
        owner = owners[f"{group}|{rank}"]
        if owner == my_rank:
            basis = null_basis(matrix, rank)
        else:
            basis = torch.empty(matrix.shape[0], rank, dtype=torch.float64, device=matrix.device)
        result[group, rank] = basis
    # Broadcasts go after the solves, so owners work in parallel instead of in turn.
    for (group, rank), basis in result.items():
        broadcast_(basis, src=owners[f"{group}|{rank}"])
    return result


def as_peft_model(model: nn.Module, lora_config: Optional[LoraConfig], adapter_name: str) -> PeftModel:
    """The PeftModel to initialize: `model` itself if it already holds the adapter, else a fresh wrap."""
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
        return model
    if lora_config is None:
        raise UnsupportedModelError("Pass a LoraConfig, or a PeftModel that already holds the LoRA adapter.")
    _refuse_dora(lora_config)
    lora_config = copy.deepcopy(lora_config)
    lora_config.init_lora_weights = False  # every factor gets overwritten; skip PEFT's own init work
    if lora_config.target_modules is None:
        lora_config.target_modules = "all-linear"
    try:
        return get_peft_model(model, lora_config, adapter_name=adapter_name)
    except ValueError as err:
        if "not found in the base model" in str(err) or "No modules were targeted" in str(err):
            raise NoTargetModulesError(
                f"No module matches target_modules={lora_config.target_modules!r}. Linear layers in this model: "
                f"{', '.join(linear_module_suffixes(model))}."
            ) from err
        raise


def _refuse_dora(lora_config: LoraConfig) -> None:
    if getattr(lora_config, "use_dora", False):
        raise UnsupportedModelError("LoRA-Null does not support DoRA adapters; set use_dora=False.")


def linear_module_suffixes(model: nn.Module) -> list[str]:
    """Distinct last name parts of linear layers (q_proj, c_attn, …): what target_modules can name."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


def lora_layers(peft_model: PeftModel, adapter_name: str) -> dict[str, LoraLayer]:
    """Every LoRA-wrapped module that carries `adapter_name`, by its name in the base model."""
    layers = {}
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            layers[name] = module
    if not layers:
        raise NoTargetModulesError(f"Adapter {adapter_name!r} wraps no module that LoRA-Null can initialize.")
    return layers


def check_layers(layers: Mapping[str, LoraLayer], adapter_name: str, config: LoraNullConfig) -> None:
    """Refuse, before any compute, the layers LoRA-Null cannot initialize correctly."""
    for name, layer in layers.items():
        if not isinstance(layer.lora_A[adapter_name], nn.Linear):
            raise UnsupportedModelError(
                f"{name} is a {type(layer.get_base_layer()).__name__}; LoRA-Null supports linear layers only. "
                "Leave it out of target_modules."
            )
        weight = layer.get_base_layer().weight
        quantized = type(weight) is not nn.Parameter or weight.dtype not in _FLOAT_DTYPES
        if quantized and config.init == "projected":
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


def weight_matrix(layer: LoraLayer) -> torch.Tensor:
    """The base weight as (d_out, d_in), whatever the layer stores (Conv1D keeps it transposed)."""
    weight = layer.get_base_layer().weight
    return weight.T if layer.fan_in_fan_out else weight


def write_adapter(layer: LoraLayer, adapter_name: str, basis: torch.Tensor, init: str) -> torch.Tensor:
    """Write A, B (and, for the projected init, the residual base) into one layer; return A as stored."""
    base_weight = layer.get_base_layer().weight
    lora_a_param = layer.lora_A[adapter_name].weight
    lora_b_param = layer.lora_B[adapter_name].weight
    scaling = layer.scaling[adapter_name]
    original = weight_matrix(layer).detach()
    basis = basis.to(original.device)
    if init == "projected":
        lora_a, lora_b = projected_factors(original, basis, scaling)
    else:
        lora_a, lora_b = basis_factors(basis, original.shape[0])
    # Rank 0's factors everywhere: identical adapters on every process, whatever the SVD's last bits did.
    broadcast_(lora_a)
    broadcast_(lora_b)
    with torch.no_grad():
        lora_a_param.copy_(lora_a.to(lora_a_param.device))
        lora_b_param.copy_(lora_b.to(lora_b_param.device))
        if init == "projected":
            # Subtract what the stored (rounded) factors add back, so W_res + s·B·A equals W to the
            # precision of W_res's own dtype.
            stored = scaling * lora_b_param.double().to(original.device) @ lora_a_param.double().to(original.device)
            residual = (original.double() - stored).to(base_weight.dtype)
            base_weight.copy_(residual.T if layer.fan_in_fan_out else residual)
    return lora_a_param.detach()


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


def _add_holdout_leakage(peft_model, layers, adapter_name, texts, tokenizer, config, report_layers) -> None:
    batches = tokenize_batches(texts, tokenizer, config.max_length, config.batch_size)
    bases = {name: layer.get_base_layer() for name, layer in layers.items()}
    lora_as = {name: layer.lora_A[adapter_name].weight.detach() for name, layer in layers.items()}
    # Adapters stay enabled: the initialized model computes the original function, so each layer sees the
    # activations it saw before init.
    measured = holdout_leakage(peft_model, bases, lora_as, shard(batches), config.seed)
    for layer_report in report_layers:
        layer_report.leakage_holdout, layer_report.leakage_holdout_random = measured[layer_report.name]


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
