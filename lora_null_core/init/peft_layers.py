"""The PEFT side of the init: wrap a model with its LoraConfig, find and check the LoRA layers to rewrite, and
write the factors (and, for the residual form, the base weight) into them. No calibration, no math."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ..config import LoraNullConfig
from ..console import quiet_libraries
from ..errors import ConfigError, InvalidRankError, NoTargetModulesError, UnsupportedModelError
from ..layout import RESIDUAL_MARKER
from ..peft_names import base_name
from ..weights import float_weight, is_quantized, weight_of


def as_peft_model(model: nn.Module, lora_config: LoraConfig | None, adapter_name: str) -> PeftModel:
    """The PeftModel to initialize: `model` itself if it already holds the adapter, else a fresh wrap."""
    done = getattr(model, "_lora_null_initialized", {}) if isinstance(model, PeftModel) else {}
    if adapter_name in done:
        state = (
            "its base weights are already residuals"
            if done[adapter_name]
            else "its lora_A already holds the null basis (the base weights are untouched)"
        )
        raise UnsupportedModelError(
            f"Adapter {adapter_name!r} of this PeftModel was already initialized by lora_null_init: {state}. Train "
            "it as it is, or start again from the original model (or load the init folder with load_initialized)."
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
        raise NoTargetModulesError(
            f"target_modules is empty. Linear layers in this model: "
            f"{', '.join(linear_module_suffixes(model))} (or all-linear)."
        )
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
    alphas = {
        "lora_alpha": lora_config.lora_alpha,
        **{f"alpha_pattern[{k!r}]": v for k, v in (lora_config.alpha_pattern or {}).items()},
    }
    for name, value in alphas.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(
                f"LoRA {name}={value!r}: alpha must be a finite number above 0 (--alpha; default = rank)."
            )
    dropout = lora_config.lora_dropout
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"lora_dropout={dropout!r} must be at least 0 and below 1 (--dropout).")


def _refuse_dora(lora_config: LoraConfig) -> None:
    if getattr(lora_config, "use_dora", False):
        raise UnsupportedModelError("LoRA-Null does not support DoRA adapters; set use_dora=False.")


def linear_module_suffixes(model: nn.Module) -> list[str]:
    """Distinct last name parts of linear layers (q_proj, c_attn, …): what target_modules can name."""
    from transformers.pytorch_utils import Conv1D

    head = output_layer(model)
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m is not head
        }
    )


def lora_layers(peft_model: PeftModel, adapter_name: str) -> dict[str, LoraLayer]:
    """Every LoRA-wrapped module that carries `adapter_name`, by its name in the base model."""
    layers = {}
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            layers[name] = module
    if not layers:
        embeddings = [
            name
            for name, module in peft_model.get_base_model().named_modules()
            if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_embedding_A", {})
        ]
        if embeddings:
            raise NoTargetModulesError(
                f"Adapter {adapter_name!r} wraps only embeddings ({', '.join(embeddings)}): LoRA-Null initializes "
                "linear layers, whose inputs it calibrates, and embeddings are not supported. Target the linear "
                "layers instead (target_modules all-linear, the default, or q_proj,v_proj,...)."
            )
        raise NoTargetModulesError(f"Adapter {adapter_name!r} wraps no module that LoRA-Null can initialize.")
    return layers


def check_layers(
    layers: Mapping[str, LoraLayer], adapter_name: str, config: LoraNullConfig, model: nn.Module | None = None
) -> None:
    """Refuse, before any compute, the layers LoRA-Null cannot initialize exactly."""
    head = output_layer(model) if model is not None else None
    owners = _weight_owners(model) if model is not None else {}
    for name, module in model.named_modules() if model is not None else ():
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
        weight = weight_of(base_layer)
        sharing = owners.get(id(weight), [])
        if len(sharing) > 1:
            raise UnsupportedModelError(
                f"{name}'s weight is shared with {', '.join(n for n in sharing if n != name)} (tied weights): "
                "rewriting it into a residual would change those modules too. Leave it out of target_modules."
            )
        if (
            is_quantized(weight) and config.residual
        ):  # the factors are read from each layer's dequantized weight; writes are not
            raise UnsupportedModelError(
                f"{name} has a quantized base weight ({type(weight).__name__}, {weight.dtype}), which cannot hold "
                f"the residual W − s·B·A that {config.variant} with train_base={config.train_base!r} writes. Keep the "
                "default (v2, trained on the original weights) or init basis: both leave the base untouched."
            )
        d_in, d_out = layer_widths(layer)
        rank = layer.r[adapter_name]
        if rank >= d_in or (config.init == "projected" and rank > d_out):
            limit = d_in - 1 if config.init == "basis" else min(d_in - 1, d_out)
            raise InvalidRankError(
                f"rank {rank} is too large for {name} (d_in={d_in}, d_out={d_out}): the null space needs "
                f"rank < d_in. Use a rank ≤ {limit}, or leave this layer out of target_modules."
            )


def output_layer(model: nn.Module) -> nn.Module | None:
    """The model's output layer (LM head), where the model says which it is."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    return head if isinstance(head, nn.Module) else None


def layer_widths(layer: LoraLayer) -> tuple[int, int]:
    """(d_in, d_out) of a LoRA layer (PEFT sets them from the base layer when it wraps it)."""
    d_in, d_out = layer.in_features, layer.out_features
    if d_in is None or d_out is None:
        raise UnsupportedModelError(
            f"{type(layer.get_base_layer()).__name__} does not say its input and output widths."
        )
    return int(d_in), int(d_out)


def factor_weights(layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's lora_A and lora_B weights in one layer."""
    return weight_of(layer.lora_A[adapter_name]), weight_of(layer.lora_B[adapter_name])


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """Module names by the id of the weight tensor they hold (after unwrapping PEFT), to spot tied weights."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not isinstance(module, LoraLayer) and ".lora_" not in name:
            owners.setdefault(id(weight), []).append(base_name(name))
    return owners


def weight_matrix(layer: LoraLayer) -> torch.Tensor:
    """The base weight as (d_out, d_in), whatever the layer stores (Conv1D keeps it transposed; a quantized layer
    gives a dequantized copy). Under ZeRO-3, read it inside `gathered`."""
    return float_weight(layer.get_base_layer(), bool(getattr(layer, "fan_in_fan_out", False)))


def check_finite_weights(layers: Mapping[str, LoraLayer]) -> None:
    """Refuse a damaged checkpoint (NaN or Inf in a targeted weight) by the layer's name, before it is computed with.
    Called where the weights are computed on (a block streamed to a GPU is checked there: a 7B's check on the
    CPU took ~6 s), with one synchronization for all the layers."""
    weights = {name: weight_of(layer.get_base_layer()) for name, layer in layers.items()}
    checked = {name: w for name, w in weights.items() if not w.is_meta and not is_quantized(w) and w.numel()}
    if not checked:
        return
    device = next(iter(checked.values())).device  # a block's weights share one
    finite = torch.stack([torch.isfinite(w).all().to(device) for w in checked.values()])
    if bool(finite.all()):
        return
    name = list(checked)[int((~finite).nonzero()[0])]
    raise UnsupportedModelError(
        f"{name}'s weight contains NaN or Inf: the checkpoint is damaged. Reload or re-download the model."
    )


def apply_variant(peft_model: PeftModel, variant: str, adapter_name: str = "default") -> None:
    """v2 freezes lora_A (the down-projection) so training moves only B and the update stays in the null space."""
    for layer in lora_layers(peft_model, adapter_name).values():
        layer.lora_A[adapter_name].weight.requires_grad_(variant != "v2")
        layer.lora_B[adapter_name].weight.requires_grad_(True)


def lora_summary(lora_config: Any) -> dict[str, Any]:
    """A LoraConfig's numbers for the report (PEFT holds it as a PeftConfig)."""
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


@contextlib.contextmanager
def bare_base_layers(module: nn.Module) -> Iterator[None]:
    """While calibrating, run `module` through its base layers: every LoRA wrapper inside it is swapped for its
    base layer (the hooks sit on the base layers, and a calibration pass wants the original function anyway),
    so thousands of forward calls skip PEFT's per-call dispatch. The wrappers are put back on the way out."""
    swaps = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                swaps.append((parent, name, child))
    try:
        for parent, name, child in swaps:
            setattr(parent, name, child.get_base_layer())
        yield
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)
