"""The YAML keys the plugin adds to an Axolotl config (Axolotl merges this pydantic model into its schema)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, model_validator


class LoraNullArgs(BaseModel):
    """`adapter_init: lora_null` plus the calibration settings; everything else is Axolotl's own LoRA config."""

    adapter_init: Optional[Literal["default", "lora_null"]] = Field(
        default=None, json_schema_extra={"description": "lora_null: initialize the LoRA adapter with LoRA-Null."})
    lora_null_calibration: Optional[Union[str, dict[str, Any]]] = Field(
        default=None, json_schema_extra={"description": "Knowledge text: a path, or a dataset entry like `datasets:`."})
    lora_null_num_samples: int = Field(default=256, gt=0)
    lora_null_max_length: Optional[int] = Field(default=None, gt=0, json_schema_extra={
        "description": "Calibration token limit (default: sequence_len)."})
    lora_null_variant: Literal["v1", "v2"] = "v2"
    lora_null_init: Literal["projected", "basis"] = "projected"
    lora_null_text_field: str = "text"
    lora_null_covariance_cache: Optional[str] = Field(default=None, json_schema_extra={
        "description": "Folder that keeps the calibration covariances; a later run with another rank or variant skips calibration."})

    @model_validator(mode="before")
    @classmethod
    def check_lora_null(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("adapter_init") != "lora_null":
            return data
        if data.get("adapter") not in ("lora", "qlora"):
            raise ValueError(f"adapter_init: lora_null needs `adapter: lora` (or qlora), got adapter: {data.get('adapter')!r}.")
        if not data.get("lora_null_calibration"):
            raise ValueError("adapter_init: lora_null needs `lora_null_calibration`: a path to knowledge text "
                             "(jsonl/parquet/…) or a dataset entry in the same form as `datasets:`.")
        quantized = data.get("adapter") == "qlora" or data.get("load_in_4bit") or data.get("load_in_8bit")
        if quantized and data.get("lora_null_init", "projected") == "projected":
            raise ValueError("adapter_init: lora_null with a quantized base cannot hold the residual weight; "
                             "set `lora_null_init: basis` (A = null basis, B = 0, base untouched).")
        if data.get("peft_use_dora"):
            raise ValueError("adapter_init: lora_null does not support DoRA; set peft_use_dora: false.")
        if zero_stage(data.get("deepspeed")) == 3:
            raise ValueError("adapter_init: lora_null is not supported under DeepSpeed ZeRO-3 yet (weights are "
                             "partitioned at load); use DDP, FSDP or ZeRO-1/2, or run `lora-null init` first.")
        return data


def zero_stage(deepspeed: Any) -> Optional[int]:
    """The ZeRO stage of Axolotl's `deepspeed:` value (a JSON file's path or the config itself), read from its
    zero_optimization.stage, not guessed from the file name; None when there is none or it cannot be read."""
    config = deepspeed
    if isinstance(deepspeed, (str, os.PathLike)):
        path = Path(deepspeed)
        if not path.is_file():
            return None
        try:
            config = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"deepspeed: {deepspeed} is not valid JSON ({err}).") from err
    if not isinstance(config, dict):
        return None
    stage = (config.get("zero_optimization") or {}).get("stage")
    try:
        return int(stage) if stage is not None else None
    except (TypeError, ValueError):
        return None
