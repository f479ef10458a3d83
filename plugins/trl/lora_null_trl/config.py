"""The TRL plugin's keys: TRL's own SFTConfig plus `adapter_init` and `lora_null_*`, each documented here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from trl import SFTConfig

from lora_null_core import LoraNullConfig
from lora_null_core.errors import ConfigError


@dataclass
class LoraNullSFTConfig(SFTConfig):
    adapter_init: str = field(
        default="default",
        metadata={"help": "'lora_null' initializes TRL's LoRA adapter in the null space of the calibration activations."},
    )
    lora_null_calibration: Optional[str] = field(
        default=None,
        metadata={"help": "Calibration data carrying the knowledge to keep: .jsonl/.json/.parquet, saved dataset or hub name."},
    )
    lora_null_variant: str = field(default="v2", metadata={"help": "v2 freezes lora_A (best retention); v1 trains both."})
    lora_null_init: str = field(default="projected", metadata={"help": "projected (paper) or basis (A = null basis, B = 0)."})
    lora_null_num_samples: int = field(default=256, metadata={"help": "Calibration samples."})
    lora_null_holdout_samples: int = field(default=32, metadata={"help": "Held-out samples for the leakage report."})
    lora_null_max_length: int = field(default=512, metadata={"help": "Tokens per calibration sample."})
    lora_null_batch_size: int = field(default=8, metadata={"help": "Calibration samples per forward pass."})
    lora_null_text_field: str = field(default="text", metadata={"help": "Column holding calibration text."})
    lora_null_covariance_cache: Optional[str] = field(
        default=None, metadata={"help": "Folder that keeps the calibration covariances; a later run with another rank or variant skips calibration."})
    lora_null_export: bool = field(
        default=True,
        metadata={"help": "v1 only (v2 and basis train on the original weights and need nothing): make every save "
                  "right for the base it names: the final folder holds the LoRA for the original model, a checkpoint "
                  "keeps its residual adapter (for resuming) beside lora_null_export/. False: leave saves as trained."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter_init not in ("default", "lora_null"):
            raise ConfigError(f"adapter_init={self.adapter_init!r}: use 'lora_null' or leave it out.")
        if self.adapter_init == "lora_null" and not self.lora_null_calibration:
            raise ConfigError("adapter_init: lora_null needs lora_null_calibration (a file or dataset of knowledge text).")
        if self.adapter_init == "lora_null":
            self.lora_null_config()  # validate the values now, not after the model is loaded

    def lora_null_config(self) -> LoraNullConfig:
        return LoraNullConfig(
            variant=self.lora_null_variant, init=self.lora_null_init, num_samples=self.lora_null_num_samples,
            holdout_samples=self.lora_null_holdout_samples, max_length=self.lora_null_max_length,
            batch_size=self.lora_null_batch_size, seed=self.seed, text_field=self.lora_null_text_field,
            covariance_cache=self.lora_null_covariance_cache,
        )
