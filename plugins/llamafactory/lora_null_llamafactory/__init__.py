"""LLaMA-Factory plugin for LoRA-Null: `lora-null-llamafactory train cfg.yaml` with `adapter_init: lora_null`."""
