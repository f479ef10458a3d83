"""SFTTrainer with LoRA-Null: TRL builds the PeftModel as usual, then the adapter is rewritten in place
before any optimizer exists, so the optimizer only ever sees trainable parameters (v2: lora_B alone)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from peft import PeftModel
from trl import SFTTrainer

from lora_null_core import ConfigError
from lora_null_core.frontends import (
    ForgettingCallback,
    finish_training,
    init_dir,
    initialize_for_training,
    meter_wanted,
    task_data_for,
    training_callback,
)

logger = logging.getLogger(__name__)


class LoraNullSFTTrainer(SFTTrainer):
    """Drop-in SFTTrainer: with `args.adapter_init == "lora_null"` (a LoraNullSFTConfig) the LoRA adapter
    is LoRA-Null-initialized; otherwise it behaves exactly like SFTTrainer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        adapter_init = getattr(self.args, "adapter_init", "default")
        metered, every = meter_wanted(vars(self.args), adapter_init)
        if metered:  # drawn before the init: the reference is the original model's
            knowledge = getattr(self.args, "lora_null_calibration", None)  # its held-out rows: forgetting/ce_rise
            config = self.args.lora_null_config() if knowledge is not None else None
            meter = ForgettingCallback(every).draw(self.model, self.processing_class, knowledge, config)
            self.add_callback(meter.attach(self))
        if adapter_init == "lora_null":
            self._initialize_lora_null()
            # Checkpoints, as in every plugin; the final save is save_model's.
            self.add_callback(training_callback(export=self.args.lora_null_export))

    @property
    def lora_null_init_dir(self) -> Path:
        return init_dir(self.args.output_dir)

    def _initialize_lora_null(self) -> None:
        if not isinstance(self.model, PeftModel):
            raise ConfigError(
                "adapter_init: lora_null needs a LoRA adapter: pass peft_config=LoraConfig(...) to the trainer "
                "(in a TRL YAML: use_peft: true, lora_r, lora_alpha, lora_target_modules)."
            )
        initialize_for_training(
            self.model,
            self.args.lora_null_calibration,
            self.processing_class,
            self.args.lora_null_config(),
            self.args.output_dir,
            task_data=self._task_data(),
            log=logger,
        )

    def _task_data(self) -> Any:
        """lora_null_task_data (task_data_for): by default the training set as this trainer tokenized it (chat
        template, prompt and completion: what the adapter will see) whenever lora_null_calibration is given."""
        return task_data_for(
            self.args.lora_null_task_data,
            self.args.lora_null_calibration,
            lambda: self.train_dataset,
            self.processing_class,
            read=lambda source: source,
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The run's final save (a user's `trainer.save_model()`, after training, where no callback sees it) ends
        up right for the base its adapter_config.json names; checkpoints are LoraNullCallback's."""
        super().save_model(output_dir, _internal_call)
        if getattr(self.args, "adapter_init", "default") != "lora_null":
            return
        if not _internal_call:
            finish_training(
                output_dir or self.args.output_dir, self.lora_null_init_dir, export=self.args.lora_null_export
            )
