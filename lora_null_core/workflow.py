"""The `lora-null init` job as one function: load → initialize → save. The CLI and the demo both call it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from peft import LoraConfig

from .config import LoraNullConfig
from .data import CalibrationSource
from .errors import OutputExistsError
from .initialize import lora_null_init
from .report import InitReport
from .saving import default_device, load_model, load_tokenizer, save_initialized


def init_to_folder(
    model_name_or_path: str,
    calibration: CalibrationSource,
    output_dir: os.PathLike,
    lora_config: LoraConfig,
    config: Optional[LoraNullConfig] = None,
    dtype: str = "auto",
    device: Optional[str] = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    offload: bool = False,
) -> InitReport:
    """Initialize `model_name_or_path` and write OUT/base, OUT/adapter and OUT/lora_null.json."""
    if Path(output_dir).exists() and not overwrite:  # fail before the expensive part, not after it
        raise OutputExistsError(f"{output_dir} already exists; choose another --output or pass --overwrite.")
    tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
    device = device or default_device()
    # offload: weights stay in CPU memory and each decoder block visits the device in turn.
    model = load_model(model_name_or_path, dtype, None if offload else device, trust_remote_code)
    peft_model = lora_null_init(model, lora_config, calibration, tokenizer, config, execution_device=device)
    report = peft_model.lora_null_report
    report.model = str(model_name_or_path)
    save_initialized(peft_model, Path(output_dir), tokenizer, overwrite=overwrite)
    return report
