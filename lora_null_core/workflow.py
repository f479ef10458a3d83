"""The `lora-null init` job as one function: load → initialize → save. The CLI and the demo both call it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from peft import LoraConfig

from .atomic import atomic_output_dir
from .config import LoraNullConfig
from .data import CalibrationSource
from .errors import LoraNullError, OutputExistsError
from .initialize import lora_null_init
from .lazy import Checkpoint, DiskBlocks, empty_model
from .report import InitReport
from .saving import (
    BASE_DIR,
    default_device,
    load_model,
    load_tokenizer,
    save_initialized,
    torch_dtype,
    write_initial_adapter,
)
from .sequential import decoder_blocks


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
    offload: Union[bool, str] = False,
) -> InitReport:
    """Initialize `model_name_or_path` and write OUT/base, OUT/adapter and OUT/lora_null.json.

    offload: False keeps the model on `device`; True or "cpu" keeps the weights in CPU memory and brings one
    block at a time to `device`; "disk" reads each block from the local safetensors checkpoint in its turn,
    for models larger than CPU memory."""
    if Path(output_dir).exists() and not overwrite:  # fail before the expensive part, not after it
        raise OutputExistsError(f"{output_dir} already exists; choose another --output or pass --overwrite.")
    if offload == "disk" and not Path(model_name_or_path).is_dir():
        raise LoraNullError(f"--offload disk reads a local checkpoint folder, and {model_name_or_path} is not one: "
                            "download it first (huggingface-cli download NAME --local-dir DIR).")
    tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
    device = device or default_device()
    if offload == "disk":
        return _init_from_disk(Path(model_name_or_path), calibration, Path(output_dir), lora_config, config, dtype,
                               device, trust_remote_code, overwrite, tokenizer)
    # offload: weights stay in CPU memory and each decoder block visits the device in turn.
    model = load_model(model_name_or_path, dtype, None if offload else device, trust_remote_code)
    peft_model = lora_null_init(model, lora_config, calibration, tokenizer, config, execution_device=device)
    report = peft_model.lora_null_report
    report.model = str(model_name_or_path)
    save_initialized(peft_model, Path(output_dir), tokenizer, overwrite=overwrite)
    return report


def _init_from_disk(folder, calibration, output_dir, lora_config, config, dtype, device, trust_remote_code, overwrite,
                    tokenizer) -> InitReport:
    """Meta model, blocks read from the shards in turn, the residual base written block by block."""
    checkpoint = Checkpoint(folder)
    model = empty_model(folder, checkpoint, torch_dtype(dtype), trust_remote_code)
    prefix = decoder_blocks(model)[0]
    config = (config or LoraNullConfig()).replace(streaming="on")
    with atomic_output_dir(output_dir, overwrite) as staging:
        base_dir = staging / BASE_DIR
        base_dir.mkdir()
        loader = DiskBlocks(checkpoint, base_dir, prefix)
        peft_model = lora_null_init(model, lora_config, calibration, tokenizer, config, execution_device=device,
                                    block_loader=loader)
        base = peft_model.get_base_model()
        loader.restore_lora(base)
        loader.finish(base, prefix)
        base.config.save_pretrained(base_dir)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        peft_model.lora_null_report.model = str(folder)
        write_initial_adapter(peft_model, staging)
    return peft_model.lora_null_report
