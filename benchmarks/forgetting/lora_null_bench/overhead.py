"""The forgetting meter's cost in a training run as users run one (issue #48: "default cost <= 5 % of training time").

Hugging Face's Trainer, which TRL, Axolotl and LLaMA-Factory build on, fine-tunes plain LoRA on a task three times
in one process: a few steps to warm the device up, then with the meter's callback at its default pace (64 own-text
samples, and the held-out knowledge rows a knowledge file gives: as many as an init holds out), then without it.
The row gives the meter's own logged time over the training's (`fraction`) and the two runtimes; the frontier's
runs read the meter every 50 steps instead, a pace a user would have to ask for.

The base's weights are held as the front ends hold them on a GPU: bfloat16 (TRL's, Axolotl's and LLaMA-Factory's
`bf16: true`). `weights="float32"` keeps float32 weights under the Trainer's bf16 autocast, where training's matrix
products run in bfloat16 but a reading (no autocast, like the reference it is compared with) runs in float32.
`profile=True` adds the heaviest GPU operations of one warm reading (torch's profiler) to the row.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from typing import Any

import torch

from lora_null_core import LoraNullConfig, forgetting, forgetting_reference
from lora_null_core.frontends import ForgettingCallback

from .inits import lora_config
from .suites import Suite
from .train import TrainSettings, collate, encode

WARM_UP_STEPS = 20


def meter_overhead(
    suite: Suite,
    task: str,
    settings: TrainSettings,
    seed: int,
    command: str,
    device: str,
    weights: str = "auto",
    profile: bool = False,
) -> dict:
    """One row: the run with the meter at its default pace beside the same run without it. `weights`: "auto"
    (bfloat16 on a GPU, float32 elsewhere), "bfloat16" or "float32"."""
    from peft import get_peft_model

    base = suite.load_base()
    cuda = next(base.parameters()).device.type == "cuda"
    weights = ("bfloat16" if cuda else "float32") if weights == "auto" else weights
    base = base.to(getattr(torch, weights))
    model = get_peft_model(base, lora_config(suite, base))
    texts = suite.heldout_text[: LoraNullConfig().holdout_samples]
    reference = forgetting_reference(model, suite.tokenizer, seed=seed, texts=texts)
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def train(steps: int, meter: ForgettingCallback | None) -> float:
        with torch.no_grad():  # every run starts from the same adapter
            for name, p in model.named_parameters():
                if name in initial:
                    p.copy_(initial[name])
        trainer = _trainer(model, suite, replace(settings, steps=steps), seed, [meter] if meter else [])
        if meter is not None:
            meter.attach(trainer)
        started = time.perf_counter()
        trainer.train()
        return time.perf_counter() - started

    train(WARM_UP_STEPS, None)
    meter = ForgettingCallback(reference=reference)
    with_meter = train(settings.steps, meter)
    without = train(settings.steps, None)
    logged = [entry for entry in meter.trainer.state.log_history if "forgetting/kl" in entry]
    meter_seconds = logged[-1]["forgetting/seconds"]
    started = time.perf_counter()  # a reading outside the trainer, warm: what a reading costs once it has run
    forgetting(model, reference)
    warm_reading = time.perf_counter() - started
    heaviest = _profiled_reading(model, reference) if profile else None
    return {
        "model": suite.model,
        "task": task,
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "lr": settings.learning_rate,
        "weights": weights,
        "readings": [entry["step"] for entry in logged],
        "meter_seconds": meter_seconds,
        "seconds_with_meter": round(with_meter, 2),
        "seconds_without": round(without, 2),
        "fraction": meter_seconds / (with_meter - meter_seconds),
        "runtime_rise": with_meter / without - 1,
        "reference_texts": len(texts),
        # what scoring the reference took when drawn (the default pace's price of a first reading), and a reading
        # after both runs
        "scoring_seconds": round(float(reference.settings.get("scoring_seconds", 0.0)), 3),
        "warm_reading_seconds": round(warm_reading, 3),
        **({"reading_profile": heaviest} if heaviest is not None else {}),
        "pace": "default",
        "command": command,
        "device": device,
    }


def _profiled_reading(model: Any, reference: Any, top: int = 12) -> list[dict]:
    """The `top` operations of one reading by their own device time (CUDA where there is one, else CPU), in ms."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with torch_profile(activities=activities) as profiler:
        forgetting(model, reference)
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [{"op": e.key, "ms": round(getattr(e, key) / 1000, 2), "calls": e.count} for e in events]


def _trainer(model: Any, suite: Suite, settings: TrainSettings, seed: int, callbacks: list) -> Any:
    from transformers import Trainer, TrainingArguments

    rows = [encode(suite.tokenizer, e, suite.separator, settings.max_length) for e in suite.task_train]
    cuda = next(model.parameters()).device.type == "cuda"
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="meter-overhead-"),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=max(1, int(settings.warmup * settings.steps)),
        max_grad_norm=1.0,
        bf16=cuda,
        use_cpu=not cuda,
        seed=seed,
        save_strategy="no",
        report_to="none",
        logging_steps=max(1, settings.steps // 10),
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=lambda batch: collate(batch, suite.tokenizer.pad_token_id, "cpu"),
        callbacks=callbacks,
    )
