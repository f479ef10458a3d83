"""The `lora-null init` job as one function: load → initialize → save. The CLI and the demo both call it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from ..atomic import StrPath, atomic_output_dir, check_output
from ..calibration.sources import CalibrationRows, CalibrationSource, describe, load_rows, reading_task_data
from ..config import LoraNullConfig
from ..errors import LoraNullError
from ..init.api import lora_null_init
from ..init.peft_layers import check_lora_config
from ..init.streaming import decoder_blocks
from ..io.disk_offload import Checkpoint, DiskBlocks, empty_model
from ..io.saving import (
    default_device,
    load_model,
    load_tokenizer,
    loading_hint,
    save_initialized,
    torch_dtype,
    write_initial_adapter,
)
from ..layout import BASE_DIR
from ..report import InitReport


def init_to_folder(
    model_name_or_path: str,
    calibration: CalibrationSource | None,
    output_dir: StrPath,
    lora_config: LoraConfig,
    config: LoraNullConfig | None = None,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    offload: bool | str = False,
    task_data: CalibrationSource | None = None,
) -> InitReport:
    """Initialize `model_name_or_path` and write OUT/base, OUT/adapter and OUT/lora_null.json.

    offload: False keeps the model on `device`; True or "cpu" keeps the weights in CPU memory and brings one
    block at a time to `device`; "disk" reads each block from the local safetensors checkpoint in its turn,
    for models larger than CPU memory. task_data: the fine-tuning inputs, for a task-aware A."""
    # Everything that can be checked is checked before the model is loaded: fail before the expensive part.
    config = config or LoraNullConfig()
    if config.train_base == "auto":  # the folder's contract: OUT/base holds W − s·B₀A₀ and `export` maps back
        config = config.replace(train_base="residual")
    cache = config.covariance_cache
    check_output(output_dir, [model_name_or_path, _local(calibration), _local(task_data), cache], overwrite)
    check_lora_config(lora_config)
    torch_dtype(dtype)
    check_device(device)
    if cache and Path(cache).exists() and not Path(cache).is_dir():
        raise LoraNullError(f"--covariance-cache {cache} is a file; it must be a folder (it is created if missing).")
    if offload == "disk" and calibration is None:
        raise LoraNullError(
            "--offload disk never holds the whole model, and its own text is sampled from the whole "
            "model: pass --calibration with knowledge text."
        )
    if offload == "disk" and not Path(model_name_or_path).is_dir():
        raise LoraNullError(
            f"--offload disk reads a local checkpoint folder, and {model_name_or_path} is not one: "
            "download it first (huggingface-cli download NAME --local-dir DIR)."
        )
    tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
    config = fit_max_length(model_name_or_path, config, trust_remote_code)
    if calibration is not None:  # read before the model loads: a bad file fails first (None: the model's own text)
        calibration = CalibrationRows(load_rows(calibration), describe(calibration))
    if task_data is not None:
        with reading_task_data():
            task_data = CalibrationRows(load_rows(task_data), describe(task_data))
    job = InitJob(
        model_name_or_path,
        calibration,
        Path(output_dir),
        lora_config,
        config,
        tokenizer,
        dtype,
        device or default_device(),
        trust_remote_code,
        overwrite,
        task_data,
    )
    return _init_from_disk(job) if offload == "disk" else _init_in_memory(job, keep_on_cpu=bool(offload))


@dataclass(frozen=True)
class InitJob:
    """`lora-null init` as asked, checked and its texts read: the model, the knowledge text (None: the model's own),
    the output folder, LoRA's and the method's settings, and how to load and run the model."""

    model: str
    calibration: CalibrationRows | None
    output_dir: Path
    lora_config: LoraConfig
    config: LoraNullConfig
    tokenizer: Any
    dtype: str
    device: str
    trust_remote_code: bool
    overwrite: bool
    task_data: CalibrationRows | None


def _init_in_memory(job: InitJob, keep_on_cpu: bool) -> InitReport:
    """The whole model loaded; with `keep_on_cpu` (offload) its weights stay in CPU memory and each decoder block
    visits the device in turn."""
    model = load_model(job.model, job.dtype, None if keep_on_cpu else job.device, job.trust_remote_code)
    peft_model = lora_null_init(
        model,
        job.lora_config,
        job.calibration,
        job.tokenizer,
        job.config,
        execution_device=job.device,
        task_data=job.task_data,
    )
    report = peft_model.lora_null_report
    report.model = job.model
    save_initialized(peft_model, job.output_dir, job.tokenizer, overwrite=job.overwrite)
    return report


def check_device(device: str | None) -> None:
    """A device name torch knows and this machine has."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise LoraNullError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N.") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise LoraNullError(
            f"--device {device}: this machine has no CUDA GPU (or torch was built without CUDA); use --device cpu."
        )
    if (
        kind == "cuda"
        and torch.device(device).index is not None
        and torch.device(device).index >= torch.cuda.device_count()
    ):
        raise LoraNullError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s).")


def fit_max_length(model_name_or_path: str, config: LoraNullConfig, trust_remote_code: bool) -> LoraNullConfig:
    """The default max_length shrinks to the model's positions; a larger one asked for explicitly is refused (the
    extra tokens would get positions the model never saw)."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise LoraNullError(f"Could not read the config of {model_name_or_path!r}: {loading_hint(err)}") from err
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    positions = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if not positions or config.max_length <= positions:
        return config
    if config.max_length == LoraNullConfig().max_length:
        return config.replace(max_length=positions)
    raise LoraNullError(
        f"--max-length {config.max_length} exceeds the model's {positions} positions; use at most {positions}."
    )


def _local(source: CalibrationSource) -> str | None:
    return str(source) if isinstance(source, (str, os.PathLike)) else None


def _init_from_disk(job: InitJob) -> InitReport:
    """Meta model, blocks read from the shards in turn, the residual base written block by block."""
    folder = Path(job.model)
    checkpoint = Checkpoint(folder)
    model = empty_model(folder, checkpoint, torch_dtype(job.dtype), job.trust_remote_code)
    found = decoder_blocks(model)
    if found is None:  # empty_model refuses such a model already
        raise LoraNullError(f"{folder}: the model's decoder blocks cannot be streamed; use --offload cpu.")
    prefix = found[0]
    with atomic_output_dir(job.output_dir, job.overwrite) as staging:
        base_dir = staging / BASE_DIR
        base_dir.mkdir()
        loader = DiskBlocks(checkpoint, base_dir, prefix)
        peft_model = lora_null_init(
            model,
            job.lora_config,
            job.calibration,
            job.tokenizer,
            job.config.replace(streaming="on"),
            execution_device=job.device,
            block_loader=loader,
            task_data=job.task_data,
        )
        base: Any = peft_model.get_base_model()  # a transformers model
        loader.restore_lora(base)
        loader.finish(base, prefix)
        base.config.save_pretrained(base_dir)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(base_dir)
        job.tokenizer.save_pretrained(base_dir)
        peft_model.lora_null_report.model = str(folder)
        write_initial_adapter(peft_model, staging, job.output_dir.resolve() / BASE_DIR)
    return peft_model.lora_null_report
