"""One adapter among several on a PeftModel: which one the init writes (the one named, else the active one), its
forward passes seeing that adapter alone, the adapter left as it was when the init is refused, and v2's lora_A kept
frozen when PEFT's `set_adapter` turns its gradient back on."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import ConfigError
from .factors import write_residual
from .peft_layers import factor_weights

logger = logging.getLogger(__name__)


def chosen_adapter(model: nn.Module, adapter_name: str | None) -> str:
    """The adapter named; else the PeftModel's active adapter (what `set_adapter` chose); "default" for a model
    that is wrapped here."""
    if adapter_name is not None or not isinstance(model, PeftModel):
        return adapter_name or "default"
    active = model.active_adapters
    if len(active) != 1:
        raise ConfigError(
            f"This PeftModel has {len(active)} active adapters ({', '.join(active)}): pass "
            "adapter_name= to say which one to initialize."
        )
    return active[0]


@contextlib.contextmanager
def only_adapter(peft_model: PeftModel, adapter_name: str) -> Iterator[None]:
    """The init's forward passes see the adapter it writes and no other: a trained adapter beside it would otherwise
    count as a change of the model's function. The active adapters go back to what they were (PEFT's own
    set_adapter would also turn gradients on)."""
    tuner_layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(m, m._active_adapter) for m in tuner_layers]
    for m in tuner_layers:
        m._active_adapter = [adapter_name]
    try:
        yield
    finally:
        for m, active in saved:
            m._active_adapter = active


@contextlib.contextmanager
def restored_on_failure(layers: Mapping[str, LoraLayer], adapter_name: str, residual: bool) -> Iterator[None]:
    """A refused or failed init leaves the adapter as it found it: its factors, their requires_grad, and where a
    residual was written into a base weight, that weight (W_res + s·B·A: the original to its dtype's rounding)."""
    before = {
        name: [(p.detach().clone(), p.requires_grad) for p in factor_weights(layer, adapter_name)]
        for name, layer in layers.items()
    }
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for name, layer in layers.items():
                (a0, a_grad), (b0, b_grad) = before[name]
                a, b = factor_weights(layer, adapter_name)
                if residual and not torch.equal(a, a0):  # this layer's residual was written
                    write_residual(layer, a, b, -layer.scaling[adapter_name])
                a.copy_(a0), b.copy_(b0)
                a.requires_grad_(a_grad), b.requires_grad_(b_grad)
        raise


def refreeze_frozen_a(model: nn.Module) -> int:
    """v2's lora_A frozen again where something turned its gradient on (PEFT's set_adapter does, for the adapter it
    activates); the number of layers it was on in. Called when training starts, before any step."""
    thawed = 0
    for adapter_name in getattr(model, "_lora_null_frozen_a", ()):
        for module in model.modules():
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                weight = factor_weights(module, adapter_name)[0]
                thawed += int(weight.requires_grad)
                weight.requires_grad_(False)
    if thawed:
        logger.warning(
            "LoRA-Null: lora_A of %d layer(s) had its gradient turned back on (PEFT's set_adapter does "
            "this); v2 keeps it frozen, so it is frozen again before training.",
            thawed,
        )
    return thawed
