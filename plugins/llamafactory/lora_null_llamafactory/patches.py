"""Where LoRA-Null enters LLaMA-Factory: its argument parser, `init_adapter` and the SFT stage's `get_dataset`
(private names, checked at import so an unsupported version fails with a clear message instead of training plain
LoRA)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lora_null_core.frontends import (
    ForgettingCallback,
    LoraNullCallback,
    attach_meters,
    finish_training,
    init_dir,
    initialize_for_training,
    load_rows,
    meter_wanted,
    task_data_for,
)

LOG = logging.getLogger(__name__)
SUPPORTED = "LLaMA-Factory 0.9.2 to 0.9.5"
_installed = False


def install() -> None:
    """Swap in the extended FinetuningArguments, wrap init_adapter and the SFT stage's get_dataset; idempotent."""
    global _installed
    if _installed:
        return
    try:
        from llamafactory.hparams import FinetuningArguments, parser
        from llamafactory.model import loader
        from llamafactory.train.sft import workflow
    except ImportError as err:
        raise ImportError(f"lora-null's LLaMA-Factory plugin needs {SUPPORTED} ({err}).") from err
    if (
        not hasattr(parser, "_TRAIN_ARGS")
        or FinetuningArguments not in parser._TRAIN_ARGS
        or not hasattr(loader, "init_adapter")
        or not hasattr(workflow, "get_dataset")
    ):
        raise ImportError(
            "This LLaMA-Factory has no parser._TRAIN_ARGS / loader.init_adapter / sft workflow "
            f"get_dataset; supported: {SUPPORTED}."
        )
    from .args import LoraNullFinetuningArguments

    parser._TRAIN_ARGS[parser._TRAIN_ARGS.index(FinetuningArguments)] = LoraNullFinetuningArguments
    original = loader.init_adapter

    def init_adapter(config, model, model_args, finetuning_args, is_trainable):
        model = original(config, model, model_args, finetuning_args, is_trainable)
        meter = _meter["value"]
        if is_trainable and meter is not None and meter.reference is None:  # the original model's, before the init
            from llamafactory.model import load_tokenizer

            knowledge = calibration_rows(finetuning_args.lora_null_calibration, _dataset_dir())  # for ce_rise
            config = finetuning_args.lora_null_config() if knowledge is not None else None
            meter.draw(model, load_tokenizer(model_args)["tokenizer"], knowledge, config)
        if is_trainable and getattr(finetuning_args, "adapter_init", "default") == "lora_null":
            initialize(model, model_args, finetuning_args)
        return model

    loader.init_adapter = init_adapter
    workflow.get_dataset = remembering_the_training_set(workflow.get_dataset)
    workflow.CustomSeq2SeqTrainer = attaching_meters(workflow.CustomSeq2SeqTrainer)
    _installed = True


_training_set: dict[str, Any] = {"value": None}
_meter: dict[str, ForgettingCallback | None] = {"value": None}


def forgetting_meter(args: dict[str, Any]) -> ForgettingCallback | None:
    """The forgetting meter of an SFT run whose keys ask for it (lora_null_forgetting, or adapter_init: lora_null):
    its reference is drawn in init_adapter, and the trainer LLaMA-Factory builds is attached to it."""
    wanted, every = meter_wanted(args, args.get("adapter_init"))
    _meter["value"] = ForgettingCallback(every) if wanted and args.get("stage", "sft") == "sft" else None
    return _meter["value"]


def attaching_meters(trainer_class: type) -> type:
    """The SFT stage's trainer class, attaching itself to the forgetting meter among its callbacks."""

    class WithMeters(trainer_class):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            attach_meters(self)

    WithMeters.__name__ = WithMeters.__qualname__ = trainer_class.__name__
    return WithMeters


def remembering_the_training_set(get_dataset):
    """run_sft tokenizes its dataset before it loads the model, but init_adapter is not given it: keep the last
    training set SFT built, for lora_null_task_data."""

    def wrapped(*args, **kwargs):
        module = get_dataset(*args, **kwargs)
        _training_set["value"] = module.get("train_dataset")
        return module

    return wrapped


def initialize(model: Any, model_args: Any, finetuning_args: Any) -> None:
    from llamafactory.model import load_tokenizer

    tokenizer = load_tokenizer(model_args)["tokenizer"]
    config = finetuning_args.lora_null_config()
    source = calibration_rows(finetuning_args.lora_null_calibration, _dataset_dir())
    # No output folder: the callback writes the initial factors when training begins (DeepSpeed has partitioned
    # them by then, and the callback gathers them).
    initialize_for_training(
        model, source, tokenizer, config, None, task_data=task_rows(finetuning_args, tokenizer), log=LOG
    )


def task_rows(finetuning_args: Any, tokenizer: Any) -> Any:
    """lora_null_task_data (task_data_for): by default the SFT training set as LLaMA-Factory tokenized it (template,
    prompt and response: what the adapter will see) whenever lora_null_calibration is given; a dataset name or a
    path is read like the calibration."""
    return task_data_for(
        finetuning_args.lora_null_task_data,
        finetuning_args.lora_null_calibration,
        lambda: _training_set["value"],
        tokenizer,
        read=lambda name: calibration_rows(name, _dataset_dir(), key="lora_null_task_data"),
    )


def calibration_rows(name: str | None, dataset_dir: str, key: str = "lora_null_calibration") -> Any:
    """A dataset_info.json entry (alpaca: prompt [+ query] columns; sharegpt: messages) or a path as is; None (no
    lora_null_calibration) asks the core for the model's own text."""
    if not name:
        return None
    info_path = Path(dataset_dir) / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if name not in info:
        if Path(name).exists() or "/" in name:
            return name
        raise ValueError(f"{key}: {name!r} is neither in {info_path} nor a file.")
    entry = info[name]
    if "file_name" in entry:
        rows = load_rows(str(Path(dataset_dir) / entry["file_name"]))
    elif "hf_hub_url" in entry:
        rows = load_rows(f"{entry['hf_hub_url']}:{entry.get('split', 'train')}")
    else:
        raise ValueError(f"{key}: dataset {name!r} needs file_name or hf_hub_url.")
    columns = entry.get("columns", {})
    if entry.get("formatting") == "sharegpt":
        key = columns.get("messages", "conversations")
        return [
            {
                "messages": [
                    {"role": m.get("role", m.get("from")), "content": m.get("content", m.get("value"))}
                    for m in row[key]
                ]
            }
            for row in rows
        ]
    prompt, query = columns.get("prompt", "instruction"), columns.get("query", "input")
    return [" ".join(str(row[c]) for c in (prompt, query) if row.get(c)) for row in rows]


_dataset_dir_setting = {"value": "data"}


def set_dataset_dir(path: str) -> None:
    """Where dataset_info.json lives (the run's `dataset_dir`); init_adapter is not given the data args."""
    _dataset_dir_setting["value"] = path


def _dataset_dir() -> str:
    return _dataset_dir_setting["value"]


def export_final(output_dir: str) -> None:
    """After LLaMA-Factory's final save: the output folder made right for the base it names (a run that trained
    nothing wrote no init folder)."""
    if init_dir(output_dir).exists():
        finish_training(output_dir)


__all__ = ["LoraNullCallback", "export_final", "forgetting_meter", "install", "set_dataset_dir"]
