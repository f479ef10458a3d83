"""The TRL plugin's keys: TRL's own SFTConfig plus `adapter_init`, `lora_null_calibration`,
`lora_null_task_data`, `lora_null_export` and one `lora_null_<field>` per LoraNullConfig field (generated from the
core's config, so every setting is reachable and documented once)."""

from __future__ import annotations

from dataclasses import field, make_dataclass

from trl import SFTConfig

from lora_null_core import LoraNullConfig
from lora_null_core.frontends import front_end_help, lora_null_request, prefixed_dataclass_fields

_KEYS = [
    (
        "adapter_init",
        str,
        field(
            default="default",
            metadata={
                "help": "'lora_null' initializes TRL's LoRA adapter in the null space of the calibration activations."
            },
        ),
    ),
    (
        "lora_null_calibration",
        str | None,
        field(
            default=None,
            metadata={
                "help": front_end_help(
                    "calibration", source="a .jsonl/.json/.parquet file, a saved dataset or a hub dataset name"
                )
            },
        ),
    ),
    (
        "lora_null_task_data",
        str | None,
        field(
            default=None,
            metadata={
                "help": front_end_help(
                    "task_data", "the training data as the trainer tokenized it", "a path or a hub dataset name"
                )
            },
        ),
    ),
    (
        "lora_null_forgetting",
        bool | None,
        field(default=None, metadata={"help": front_end_help("forgetting")}),
    ),
    (
        "lora_null_forgetting_steps",
        int | None,
        field(default=None, metadata={"help": front_end_help("forgetting_steps")}),
    ),
    (
        "lora_null_export",
        bool,
        field(
            default=True,
            metadata={
                "help": "v1 only (v2 and basis train on the original weights and need nothing): make every save "
                "right for the base it names: the final folder holds the LoRA for the original model, a checkpoint's "
                "config names the residual base. False: leave saves as trained (a v2 lora_A that a ZeRO-3 save leaves "
                "out is put back either way)."
            },
        ),
    ),
    *prefixed_dataclass_fields(),
]


def _post_init(self) -> None:
    SFTConfig.__post_init__(self)
    self.lora_null_config()  # validate now, not after the model is loaded


def _lora_null_config(self) -> LoraNullConfig | None:
    """The LoraNullConfig these arguments ask for (None without `adapter_init: lora_null`); the trainer's seed
    stands in for an unset lora_null_seed."""
    return lora_null_request(vars(self), fallbacks={"seed": self.seed})


LoraNullSFTConfig = make_dataclass(
    "LoraNullSFTConfig",
    _KEYS,
    bases=(SFTConfig,),
    namespace={
        "__post_init__": _post_init,
        "lora_null_config": _lora_null_config,
        "__module__": __name__,
        "__doc__": "TRL's SFTConfig plus the LoRA-Null keys (`adapter_init: lora_null`, lora_null_*).",
    },
)
