"""The trainer lifecycle every framework plugin shares: initialize the adapter the framework built, keep its initial
factors, and make the run's final save right for the base it names. A plugin translates its own objects (model,
tokenizer, datasets, output folder) and calls these; checkpoints are the callback's (callback.LoraNullCallback)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..calibration.sources import CalibrationSource
from ..config import LoraNullConfig
from ..distributed import rank_and_world
from ..init.api import lora_null_init
from ..io.saving import save_initial_adapter
from ..io.trainer_saves import finish_saved_adapter
from ..layout import INIT_DIR
from .callback import LoraNullCallback

logger = logging.getLogger(__name__)


def initialize_for_training(
    model: Any,
    calibration: CalibrationSource | None,
    tokenizer: Any,
    config: LoraNullConfig,
    output_dir: str | Path | None,
    *,
    task_data: Any = None,
    execution_device: str | None = None,
    log: logging.Logger = logger,
) -> None:
    """Every rank: the PeftModel's active adapter initialized in place (the core shards the calibration over the
    process group the framework set up and broadcasts rank 0's factors, so every rank ends with the same weights).
    Rank 0: the initial factors written to `<output_dir>/lora_null_init`; with no `output_dir` the callback writes
    them when training begins (a framework that partitions the adapter before then)."""
    lora_null_init(
        model,
        None,
        calibration,
        tokenizer,
        config,
        adapter_name=model.active_adapter,
        execution_device=execution_device,
        task_data=task_data,
    )
    if rank_and_world()[0] != 0:
        return
    if output_dir is not None:
        save_initial_adapter(model, init_dir(output_dir), overwrite=True)
    log.info("LoRA-Null init: %s", {"variant": config.variant, **model.lora_null_report.summary()})


def training_callback(save_init: bool = False, export: bool = True) -> LoraNullCallback:
    """The callback a plugin adds to the trainer: v2's lora_A kept frozen, every checkpoint made right."""
    return LoraNullCallback(save_init=save_init, export=export)


def finish_training(saved_dir: str | Path, init_folder: str | Path | None = None, export: bool = True) -> None:
    """Rank 0, after the framework's final save into `saved_dir`: that folder made right for the base it names
    (`init_folder`: the run's init folder, by default `<saved_dir>/lora_null_init`)."""
    if rank_and_world()[0] == 0:
        finish_saved_adapter(saved_dir, init_folder or init_dir(saved_dir), final=True, export=export)


def init_dir(output_dir: str | Path) -> Path:
    """Where a training run keeps the init's record and initial adapter."""
    return Path(output_dir) / INIT_DIR
