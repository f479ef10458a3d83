"""LLaMA-Factory's FinetuningArguments plus the LoRA-Null keys (LLaMA-Factory rejects unknown YAML keys):
`adapter_init`, `lora_null_calibration`, `lora_null_task_data`, and one `lora_null_<field>` per LoraNullConfig
field, generated from the core's config so every setting is reachable."""

from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Literal

from llamafactory.hparams import FinetuningArguments

from lora_null_core import LoraNullConfig
from lora_null_core.frontends import front_end_help, lora_null_request, prefixed_dataclass_fields

_KEYS = [
    (
        "adapter_init",
        Literal["default", "lora_null"],
        field(default="default", metadata={"help": "lora_null: initialize the LoRA adapter with LoRA-Null."}),
    ),
    (
        "lora_null_calibration",
        str | None,
        field(
            default=None,
            metadata={
                "help": front_end_help("calibration", source="a dataset name from dataset_info.json, or a file path")
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
                    "task_data", "the SFT training set as LLaMA-Factory tokenized it", "a dataset name or a path"
                )
            },
        ),
    ),
    ("lora_null_forgetting", bool | None, field(default=None, metadata={"help": front_end_help("forgetting")})),
    (
        "lora_null_forgetting_steps",
        int | None,
        field(default=None, metadata={"help": front_end_help("forgetting_steps")}),
    ),
    *prefixed_dataclass_fields(),
]


def _post_init(self) -> None:
    FinetuningArguments.__post_init__(self)
    if self.adapter_init != "lora_null":
        return
    if self.finetuning_type != "lora":
        raise ValueError(f"adapter_init: lora_null needs finetuning_type: lora, got {self.finetuning_type!r}.")
    if self.pissa_init:
        raise ValueError("adapter_init: lora_null and pissa_init are two different inits; pick one.")
    self.lora_null_config()


def _lora_null_config(self) -> LoraNullConfig | None:
    return lora_null_request(vars(self), dora=bool(self.use_dora), dora_key="use_dora")


LoraNullFinetuningArguments = make_dataclass(
    "LoraNullFinetuningArguments",
    _KEYS,
    bases=(FinetuningArguments,),
    namespace={
        "__post_init__": _post_init,
        "lora_null_config": _lora_null_config,
        "__module__": __name__,
        "__doc__": "FinetuningArguments plus `adapter_init: lora_null` and the lora_null_* keys.",
    },
)
