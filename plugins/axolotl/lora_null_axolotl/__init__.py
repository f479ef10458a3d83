"""Axolotl plugin for LoRA-Null: `plugins: [lora_null_axolotl.LoraNullPlugin]` and `adapter_init: lora_null`."""

from .plugin import LoraNullPlugin

__all__ = ["LoraNullPlugin"]
