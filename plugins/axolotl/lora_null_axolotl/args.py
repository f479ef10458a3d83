"""The YAML keys the plugin adds to an Axolotl config (Axolotl merges this pydantic model into its schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, create_model, model_validator

from lora_null_core.frontends import config_fields, front_end_help, lora_null_request


class _LoraNullKeys(BaseModel):
    """`adapter_init: lora_null` plus where the knowledge text comes from; the method's settings are the
    generated `lora_null_<field>` keys below (or a nested `lora_null:` block). Everything else is Axolotl's own
    LoRA config."""

    adapter_init: Literal["default", "lora_null"] | None = Field(
        default=None, json_schema_extra={"description": "lora_null: initialize the LoRA adapter with LoRA-Null."}
    )
    lora_null_calibration: str | dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={
            "description": front_end_help("calibration", source="a path, or a dataset entry like `datasets:`")
        },
    )
    lora_null_task_data: bool | str | dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={
            "description": front_end_help(
                "task_data", "the training set as Axolotl prepared it", "a path or a dataset entry"
            )
        },
    )
    lora_null_forgetting: bool | None = Field(
        default=None, json_schema_extra={"description": front_end_help("forgetting")}
    )
    lora_null_forgetting_steps: int | None = Field(
        default=None, ge=1, json_schema_extra={"description": front_end_help("forgetting_steps")}
    )
    lora_null: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={
            "description": "The LoRA-Null settings as one block (field: value), instead of lora_null_<field> keys."
        },
    )

    @model_validator(mode="before")
    @classmethod
    def check_lora_null(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("adapter_init") != "lora_null":
            return data
        if data.get("adapter") not in ("lora", "qlora"):
            raise ValueError(
                f"adapter_init: lora_null needs `adapter: lora` (or qlora), got adapter: {data.get('adapter')!r}."
            )
        quantized = bool(data.get("adapter") == "qlora" or data.get("load_in_4bit") or data.get("load_in_8bit"))
        lora_null_request(
            data,
            quantized=quantized,
            dora=bool(data.get("peft_use_dora")),
            dora_key="peft_use_dora",
            fallbacks=fallbacks(data),
        )
        return data


LoraNullArgs = create_model(
    "LoraNullArgs",
    __base__=_LoraNullKeys,
    __module__=__name__,
    **{
        spec.key: (
            spec.type | None,
            Field(default=None, json_schema_extra={"description": f"{spec.help} (default: {spec.default})"}),
        )
        for spec in config_fields()
    },
)


def fallbacks(cfg: Any) -> dict[str, Any]:
    """What an Axolotl config implies for settings left unset: its sequence length and seed."""
    return {"max_length": cfg.get("sequence_len"), "seed": cfg.get("seed")}
