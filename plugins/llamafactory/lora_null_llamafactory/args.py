"""LLaMA-Factory's FinetuningArguments plus the LoRA-Null keys (LLaMA-Factory rejects unknown YAML keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from llamafactory.hparams import FinetuningArguments


@dataclass
class LoraNullFinetuningArguments(FinetuningArguments):
    adapter_init: Literal["default", "lora_null"] = field(
        default="default", metadata={"help": "lora_null: initialize the LoRA adapter with LoRA-Null."})
    lora_null_calibration: Optional[str] = field(
        default=None, metadata={"help": "Knowledge text: a dataset name from dataset_info.json, or a file path."})
    lora_null_num_samples: int = field(default=256, metadata={"help": "Calibration samples."})
    lora_null_max_length: Optional[int] = field(default=None, metadata={"help": "Calibration token limit (default 512)."})
    lora_null_variant: Literal["v1", "v2"] = field(default="v2", metadata={"help": "v2 freezes lora_A."})
    lora_null_init: Literal["projected", "basis"] = field(default="projected", metadata={"help": "basis: B = 0."})
    lora_null_covariance_cache: Optional[str] = field(
        default=None, metadata={"help": "Folder that keeps the calibration covariances; a later run with another rank or variant skips calibration."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter_init != "lora_null":
            return
        if self.finetuning_type != "lora":
            raise ValueError(f"adapter_init: lora_null needs finetuning_type: lora, got {self.finetuning_type!r}.")
        if not self.lora_null_calibration:
            raise ValueError("adapter_init: lora_null needs lora_null_calibration: a dataset name from "
                             "dataset_info.json (or a .jsonl/.json/.parquet path) holding knowledge text.")
        if self.pissa_init:
            raise ValueError("adapter_init: lora_null and pissa_init are two different inits; pick one.")
        if self.use_dora:
            raise ValueError("adapter_init: lora_null does not support DoRA; set use_dora: false.")
