"""LoRA-Null for TRL. Change one import line of an SFT script:

    from lora_null_trl import LoraNullSFTConfig as SFTConfig, LoraNullSFTTrainer as SFTTrainer

then add `adapter_init="lora_null", lora_null_calibration="questions.jsonl"` to the config. YAML users run
`lora-null-trl sft --config cfg.yaml` with the same keys next to TRL's own.
"""

from lora_null_core.frontends import EXPORT_DIR, INIT_DIR

from .config import LoraNullSFTConfig
from .trainer import LoraNullSFTTrainer

__all__ = ["EXPORT_DIR", "INIT_DIR", "LoraNullSFTConfig", "LoraNullSFTTrainer"]
