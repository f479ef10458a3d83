"""Where things are in a model: its list of decoder blocks, the device it computes on, and the device its token ids
go to."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(name, ModuleList) holding one module per hidden layer, or None: the decoder blocks, whatever calls them."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and count and len(module) == count:
            return name, module
    return None


def model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def input_device(model: nn.Module) -> torch.device:
    """Where token ids must go: the input embedding's device (which may differ from the blocks')."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    return embeddings.weight.device if embeddings is not None else model_device(model)


def keep_on(model: nn.Module, name: str, value: Any) -> None:
    """A plain value kept on a model as an attribute (what nn.Module.__setattr__ does with one, without its typing,
    which admits only tensors and modules)."""
    object.__setattr__(model, name, value)
