"""Fine-tune a frontier point the way users do: TRL's SFTTrainer through the lora_null_trl plugin.

The harness's own loop (train.py) runs every init the same way; this path checks that its numbers are what a
user gets from `adapter_init: lora_null` in TRL, with bf16 autocast and gradient checkpointing on. Same data,
steps, batch, learning rate, schedule (linear, same warmup), clipping and target modules; TRL draws its own
batch order, so the two differ by seed noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .inits import a_scale_of, is_known_init, lora_config
from .suites import Suite
from .train import TrainSettings

# plain SFTTrainer; the plugin with `adapter_init: lora_null` and the calibration file (the training set its task
# data); lora_null_plain, plus `lora_null_task_data: none`; and lora_null_x<c>, that plus `lora_null_a_scale: c`
NAMED_TRL_INITS = ("lora", "lora_null", "lora_null_plain")
TRL_INITS = (*NAMED_TRL_INITS, "lora_null_x<c>")


def runs_through_trl(init: str) -> bool:
    return init in NAMED_TRL_INITS or (init.startswith("lora_null_x") and is_known_init(init))


def fine_tune_with_trl(
    init: str, model: torch.nn.Module, suite: Suite, settings: TrainSettings, seed: int, workdir: Path
) -> tuple[torch.nn.Module, float]:
    """Train `model` (a base model) with TRL; return the trained PeftModel and its loss over the last tenth of
    the steps (TRL's last logged loss, as the harness's loop reports)."""
    from datasets import Dataset
    from lora_null_trl import LoraNullSFTConfig, LoraNullSFTTrainer

    if not runs_through_trl(init):
        raise ValueError(f"--trainer trl runs {', '.join(TRL_INITS)}, not {init!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    calibration = workdir / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"text": e.text}) + "\n" for e in suite.calibration))
    data = Dataset.from_list(
        [{"prompt": e.prompt, "completion": suite.separator + e.targets[0]} for e in suite.task_train]
    )
    cuda = next(model.parameters()).device.type == "cuda"
    keys = {"adapter_init": "lora_null", "lora_null_calibration": str(calibration)} if init != "lora" else {}
    if init == "lora_null_plain" or init.startswith("lora_null_x"):
        keys["lora_null_task_data"] = "none"
    if init.startswith("lora_null_x"):
        keys["lora_null_a_scale"] = a_scale_of(init)
    args = LoraNullSFTConfig(
        output_dir=str(workdir / "run"),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=max(1, int(settings.warmup * settings.steps)),
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=cuda,
        gradient_checkpointing=True,
        max_length=settings.max_length,
        completion_only_loss=True,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, settings.steps // 10),
        disable_tqdm=True,
        **keys,
    )
    trainer = LoraNullSFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=suite.tokenizer,
        peft_config=lora_config(suite, model),
    )
    result = trainer.train()
    trained = trainer.model
    trained.config.use_cache = True  # gradient checkpointing turned it off; evaluation generates
    trained.eval()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trained, float(logged[-1] if logged else result.training_loss)
