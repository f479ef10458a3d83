"""What runs through the model for one init: the calibration texts chosen (topped up when short), tokenized into
batches, the held-out batches, the probe that checks the function, and the task batches of a task-aware init."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..calibration.batches import TokenBatch, padded_batches, token_ids_of
from ..calibration.selection import CalibrationSet, select_calibration
from ..calibration.sources import CalibrationSource, reading_task_data
from ..calibration.texts import CalibrationTexts, choose_texts
from ..config import LoraNullConfig
from ..distributed import rank_and_world
from ..errors import InsufficientCalibrationError
from .peft_layers import layer_widths
from .safeguards import check_distinct_contexts, probe_batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitInputs:
    """Every process's batches (not yet sharded): calibration, held-out, the probe (a few of the shortest calibration
    samples) and the task's; `chosen` says what the calibration texts are, `task` what the task data is (None: the
    plain null space)."""

    chosen: CalibrationSet
    batches: list[TokenBatch]
    holdout: list[TokenBatch]
    probe: TokenBatch
    task: CalibrationTexts | None = None
    task_batches: tuple[TokenBatch, ...] = ()

    @property
    def texts(self) -> CalibrationTexts:
        return self.chosen.texts


def prepare_inputs(
    model: nn.Module,
    layers: Mapping[str, LoraLayer],
    calibration: CalibrationSource | None,
    task_data: CalibrationSource | None,
    tokenizer: Any,
    config: LoraNullConfig,
    device: torch.device,
) -> InitInputs:
    """The texts chosen and tokenized by token budget, at least one batch per process; too few distinct contexts for
    the widest layer are refused here, before any forward pass."""
    chosen = select_calibration(
        model, calibration, tokenizer, config, device, widest=max(layer_widths(layer)[0] for layer in layers.values())
    )
    logger.info("Calibrating on %s.", chosen.used)
    texts = chosen.texts
    # The calibration texts were tokenized and their contexts counted while they were chosen.
    batches = _batches(chosen.token_ids, tokenizer, config, "calibration samples")
    check_distinct_contexts(chosen.contexts, sum(map(len, chosen.token_ids)), layers, config)
    holdout = _batches(token_ids_of(texts.holdout, tokenizer, config.max_length), tokenizer, config)
    task: CalibrationTexts | None = None
    task_batches: tuple[TokenBatch, ...] = ()
    if task_data is not None:
        with reading_task_data():
            task = choose_texts(task_data, tokenizer, config.task_samples, 0, config.seed, config.text_field)
        task_ids = token_ids_of(task.calibration, tokenizer, config.max_length)
        task_batches = tuple(_batches(task_ids, tokenizer, config, "task examples"))
    return InitInputs(chosen, batches, holdout, probe_batch(batches), task, task_batches)


def _batches(ids: list[list[int]], tokenizer: Any, config: LoraNullConfig, what: str = "") -> list[TokenBatch]:
    """Padded batches of token ids, at least one a process; none for no ids (no held-out texts)."""
    if not ids and not what:
        return []
    world = rank_and_world()[1]
    batches = padded_batches(
        ids,
        tokenizer,
        batch_size=config.batch_size,
        batch_tokens=config.batch_tokens,
        min_batches=world,
    )
    if what and len(batches) < world:
        raise InsufficientCalibrationError(f"{len(ids)} {what} cannot feed {world} processes.")
    return batches
