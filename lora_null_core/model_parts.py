"""Where things are in a model: its list of decoder blocks, the device it computes on, and the device its token ids
go to."""

from __future__ import annotations

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
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings.weight.device if embeddings is not None else model_device(model)
