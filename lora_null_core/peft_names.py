"""PEFT's names for a wrapped model's parameters and modules, read one way everywhere."""

from __future__ import annotations


def base_name(name: str) -> str:
    """A base-model parameter or module name as the plain model and its checkpoint spell it: PEFT's
    `.base_layer` wrapper unwrapped (`q_proj.base_layer.weight` → `q_proj.weight`)."""
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")


def is_adapter_parameter(name: str) -> bool:
    """A LoRA factor (lora_A, lora_B, lora_embedding_*), not a base-model weight."""
    return "lora_" in name
