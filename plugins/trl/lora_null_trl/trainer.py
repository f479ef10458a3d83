"""SFTTrainer with LoRA-Null: TRL builds the PeftModel as usual, then the adapter is rewritten in place
before any optimizer exists, so the optimizer only ever sees trainable parameters (v2: lora_B alone)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from peft import PeftModel
from trl import SFTTrainer

from lora_null_core import lora_null_init, save_initial_adapter
from lora_null_core.callbacks import LoraNullCallback
from lora_null_core.errors import ConfigError
from lora_null_core.export import INIT_DIR, finish_saved_adapter
from lora_null_core.integration import task_data_for

logger = logging.getLogger(__name__)


class LoraNullSFTTrainer(SFTTrainer):
    """Drop-in SFTTrainer: with `args.adapter_init == "lora_null"` (a LoraNullSFTConfig) the LoRA adapter
    is LoRA-Null-initialized; otherwise it behaves exactly like SFTTrainer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self.args, "adapter_init", "default") == "lora_null":
            self._initialize_lora_null()
            # Checkpoints, as in every plugin; the final save is save_model's.
            self.add_callback(LoraNullCallback(save_init=False, export=self.args.lora_null_export))

    @property
    def lora_null_init_dir(self) -> Path:
        return Path(self.args.output_dir) / INIT_DIR

    def _initialize_lora_null(self) -> None:
        if not isinstance(self.model, PeftModel):
            raise ConfigError(
                "adapter_init: lora_null needs a LoRA adapter: pass peft_config=LoraConfig(...) to the trainer "
                "(in a TRL YAML: use_peft: true, lora_r, lora_alpha, lora_target_modules)."
            )
        # Every process runs this; the core shards calibration over the process group the trainer set up
        # and broadcasts rank 0's factors, so every rank holds identical weights.
        lora_null_init(
            self.model, None, self.args.lora_null_calibration, self.processing_class,
            self.args.lora_null_config(), adapter_name=self.model.active_adapter, task_data=self._task_data(),
        )
        if self.is_world_process_zero():
            save_initial_adapter(self.model, self.lora_null_init_dir, overwrite=True)
            logger.info("LoRA-Null init: %s", self.model.lora_null_report.summary())

    def _task_data(self) -> Any:
        """lora_null_task_data (task_data_for): by default the training set as this trainer tokenized it (chat
        template, prompt and completion: what the adapter will see) whenever lora_null_calibration is given."""
        return task_data_for(self.args.lora_null_task_data, self.args.lora_null_calibration,
                             lambda: self.train_dataset, self.processing_class, read=lambda source: source)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """The run's final save (a user's `trainer.save_model()`, after training, where no callback sees it) ends
        up right for the base its adapter_config.json names; checkpoints are LoraNullCallback's."""
        super().save_model(output_dir, _internal_call)
        if getattr(self.args, "adapter_init", "default") != "lora_null":
            return
        if not _internal_call and self.is_world_process_zero():
            finish_saved_adapter(output_dir or self.args.output_dir, self.lora_null_init_dir, final=True,
                                 export=self.args.lora_null_export)

