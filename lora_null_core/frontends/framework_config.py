"""What every front end shares: LoraNullConfig read from a framework's config, one validation of a LoRA-Null
request, and the config's fields described once, so the CLI and each plugin generate their keys from them.

A framework config names the method's settings `lora_null_<field>` (TRL, Axolotl, LLaMA-Factory YAML) or nests
them in a `lora_null:` block; both reach every LoraNullConfig field. A plugin then only translates its own
objects (model, tokenizer, datasets, output dir) and calls `lora_null_request`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from ..calibration.sources import TokenizedRows
from ..config import LoraNullConfig, literal_choices
from ..errors import ConfigError

logger = logging.getLogger(__name__)

PREFIX = "lora_null_"
NESTED_KEY = "lora_null"
# Keys a front end reads itself (they are not LoraNullConfig fields): where the knowledge text and the task data come
# from, the forgetting meter's switch and pace, and the TRL plugin's switch for making saves right for the base they
# name.
FRONT_END_KEYS = ("calibration", "task_data", "forgetting", "forgetting_steps", "export")
# lora_null_task_data values: unset or "auto" (see task_data_for), "train", a source, or one of these for none
TASK_DATA_AUTO = "auto"
TASK_DATA_OFF = ("none", "off", "false")


@dataclass(frozen=True)
class ConfigField:
    """One LoraNullConfig field as front ends see it: its value type (None-able types unwrapped), allowed values
    for a Literal, default and help text."""

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[Any, ...] | None

    @property
    def key(self) -> str:
        return PREFIX + self.name

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def config_fields() -> list[ConfigField]:
    hints = typing.get_type_hints(LoraNullConfig)
    out = []
    for spec in dataclasses.fields(LoraNullConfig):
        kind = _unwrap_optional(hints[spec.name])
        choices = literal_choices().get(spec.name)
        out.append(ConfigField(spec.name, kind, spec.default, spec.metadata.get("help", ""), choices))
    return out


def config_from_mapping(values: Mapping[str, Any], fallbacks: Mapping[str, Any] | None = None) -> LoraNullConfig:
    """LoraNullConfig from a framework config (a dict, or `vars()` of a dataclass): `lora_null_<field>` keys, or
    the fields of a nested `lora_null:` block. A key left out or set to None takes `fallbacks[field]` (what the
    framework implies, e.g. its sequence length) and then the config's own default. Unknown `lora_null_*` keys
    are refused with the closest valid one, so a typo cannot silently train with the default."""
    nested = values.get(NESTED_KEY)
    if nested is not None and not isinstance(nested, Mapping):
        raise ConfigError(f"{NESTED_KEY}: must be a mapping of LoraNullConfig fields, got {type(nested).__name__}.")
    nested = dict(nested or {})
    names = [f.name for f in config_fields()]
    _refuse_unknown([k[len(PREFIX) :] for k in values if isinstance(k, str) and k.startswith(PREFIX)], names, PREFIX)
    _refuse_unknown(list(nested), names, NESTED_KEY + ".")
    chosen: dict[str, Any] = {}
    for name in names:
        for source in (nested.get(name), values.get(PREFIX + name), (fallbacks or {}).get(name)):
            if source is not None:
                chosen[name] = source
                break
    both = sorted(
        n
        for n in names
        if nested.get(n) is not None and values.get(PREFIX + n) is not None and nested[n] != values[PREFIX + n]
    )
    if both:
        raise ConfigError(
            f"{', '.join(PREFIX + n for n in both)} and the {NESTED_KEY}: block disagree; set each "
            "setting in one place."
        )
    return LoraNullConfig(**chosen)


def lora_null_request(
    values: Mapping[str, Any],
    *,
    fallbacks: Mapping | None = None,
    quantized: bool = False,
    dora: bool = False,
    dora_key: str = "use_dora",
    adapter_key: str = "adapter_init",
) -> LoraNullConfig | None:
    """The one validation every front end runs. None when the config does not ask for LoRA-Null; else the
    LoraNullConfig, after checking what the method needs from the framework's side (no DoRA, a base that can hold
    a residual). Without lora_null_calibration the model's own text is the knowledge source (own_text.py)."""
    wanted = values.get(adapter_key)
    if wanted in (None, "default"):
        return None
    if wanted != "lora_null":
        raise ConfigError(f"{adapter_key}: {wanted!r} is not an init lora-null knows; use lora_null or leave it out.")
    config = config_from_mapping(values, fallbacks)
    if dora:
        raise ConfigError(f"{adapter_key}: lora_null does not support DoRA; set {dora_key}: false.")
    if quantized and config.residual:
        raise ConfigError(
            f"{adapter_key}: lora_null with variant {config.variant} and train_base "
            f"{config.train_base} rewrites the base weights into a residual, which a quantized base "
            f"cannot hold. Leave {PREFIX}variant and {PREFIX}train_base unset (v2 trains on the "
            "original weights), or set lora_null_init: basis."
        )
    return config


def task_data_for(
    setting: Any, calibration: Any, training_set: Callable[[], Any], tokenizer: Any, read: Callable[[Any], Any]
) -> Any:
    """The task data a front end passes the core, from its `lora_null_task_data` key.

    Unset (or "auto"): the training set as the trainer prepared it whenever knowledge text is given
    (lora_null_calibration): there the task-aware A lost less knowledge than the plain null space on the frontier
    (README, "Task-aware"). With the key alone (the model's own text) it lost more on addition, so the plain null
    space stays; without a training set with a length (streamed, or none) it falls back to it too, with a log line.
    "train" asks for the training set and refuses a streamed one; "none" (or off, false) is the plain null space;
    anything else is a source, handed to `read`; YAML's true and false mean train and none. `training_set` returns
    the trainer's tokenized dataset (None when it has none)."""
    if setting is False or (isinstance(setting, str) and setting.lower() in TASK_DATA_OFF):
        return None
    if setting is True:
        setting = "train"
    auto = setting is None or setting == TASK_DATA_AUTO
    if auto and calibration is None:
        return None
    if not auto and setting != "train":
        return read(setting)
    dataset = training_set()
    if dataset is not None and hasattr(dataset, "__len__"):
        return TokenizedRows(dataset, tokenizer)
    if auto:
        logger.info(
            "LoRA-Null: no training set with a length to read as task data (a streamed one, or none handed "
            "over here), so A is the plain null space. Give lora_null_task_data a file for a task-aware A."
        )
        return None
    raise ConfigError(
        "lora_null_task_data: train reads the training set as the trainer prepared it, which needs one "
        "with a length (not a streamed or iterable one); give the task data as a file instead, or set "
        "lora_null_task_data: none."
    )


def front_end_help(
    key: str,
    training_set: str = "the training set as the trainer prepared it",
    source: str = "a path or a hub dataset name",
) -> str:
    """The help of a front end's own key (`calibration` or `task_data`), written once: each plugin names how its
    framework holds the training set and which sources it reads."""
    if key == "calibration":
        return f"Knowledge text to keep: {source} (default: text the model generates itself)."
    if key == "forgetting":
        return (
            "The forgetting meter: log forgetting/kl, KL(original ‖ tuned) per token on the original model's "
            "own samples, while training (default: on with adapter_init lora_null; works on plain LoRA too)."
        )
    if key == "forgetting_steps":
        return (
            "Steps between two readings of the forgetting meter (default: 50, fewer where readings would take "
            "more than 5% of training time)."
        )
    if key == "task_data":
        return (
            f"Task-aware A: put A where knowledge inputs are weak relative to the fine-tuning inputs. Unset "
            f"(auto): {training_set} whenever lora_null_calibration is given, the plain null space with the "
            f"model's own text; 'train': the training set always; {source}: task data read like "
            "lora_null_calibration; 'none': the plain null space."
        )
    raise KeyError(key)


def prefixed_dataclass_fields() -> list[tuple[str, Any, Any]]:
    """`lora_null_<field>` entries for `dataclasses.make_dataclass` (TRL's and LLaMA-Factory's argument
    dataclasses): each None by default, meaning "the core's default" (or what the framework implies)."""
    out = []
    for spec in config_fields():
        help_text = f"{spec.help} (default: {spec.default})"
        out.append((spec.key, spec.type | None, dataclasses.field(default=None, metadata={"help": help_text})))
    return out


def _unwrap_optional(kind: Any) -> Any:
    if typing.get_origin(kind) in (Union, types.UnionType):  # Optional[X], or X | None
        rest = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return kind


def _refuse_unknown(keys: list[str], names: list[str], prefix: str) -> None:
    unknown = [k for k in keys if k not in names and k not in FRONT_END_KEYS]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, [*names, *FRONT_END_KEYS], n=1)
        hints.append(prefix + key + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
    raise ConfigError(
        f"Unknown LoRA-Null setting(s): {', '.join(hints)}. Valid: {', '.join(prefix + n for n in names)}."
    )
