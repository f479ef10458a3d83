"""One fine-tuning loop for every init: same data order, steps, learning rate and schedule."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .world import Example


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    learning_rate: float
    max_length: int
    warmup: float = 0.05


def encode(tokenizer, example: Example, separator: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels: the loss covers the answer (and EOS), never the prompt."""
    prompt = tokenizer(example.prompt)["input_ids"]
    answer = tokenizer(separator + example.targets[0], add_special_tokens=False)["input_ids"]
    ids = (prompt + answer + [tokenizer.eos_token_id])[:max_length]
    labels = ([-100] * len(prompt) + answer + [tokenizer.eos_token_id])[:max_length]
    return ids, labels


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


class Trained(NamedTuple):
    loss: float  # mean over the last tenth of the steps
    skipped_steps: int  # steps whose gradients were not finite, so no update was made
    meter_curve: list[tuple[int, float]]  # (step, the meter's reading) every meter_every steps, when metered
    meter_seconds: float  # time the readings took, not counted as training


def fine_tune(
    model,
    tokenizer,
    examples: Sequence[Example],
    settings: TrainSettings,
    seed: int,
    separator: str = " ",
    desc: str = "fine-tune",
    meter: Callable[[], float] | None = None,
    meter_every: int = 50,
) -> Trained:
    """Train the model's trainable parameters with AdamW, linear warmup then linear decay. A step whose gradient
    norm is not finite is skipped (as AMP's GradScaler does): on Qwen2.5-0.5B under bf16 autocast one such step
    turned every weight to NaN (H100, word reversal at lr 3e-4, step 37); the count is returned to be reported.
    `meter`: read every `meter_every` steps, as the trainer callback does (the model in eval mode meanwhile)."""
    device = next(model.parameters()).device
    encoded = [encode(tokenizer, e, separator, settings.max_length) for e in examples]
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, int(settings.warmup * settings.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (settings.steps - s) / max(1, settings.steps - warmup)))
    )
    order: list[int] = []
    model.train()
    losses: list[float] = []
    skipped = 0
    curve: list[tuple[int, float]] = []
    metering = 0.0
    for step in tqdm(range(1, settings.steps + 1), desc=desc, leave=False):
        if len(order) < settings.batch_size:
            order += rng.sample(range(len(encoded)), len(encoded))
        batch = collate([encoded[i] for i in order[: settings.batch_size]], tokenizer.pad_token_id, device)
        del order[: settings.batch_size]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if torch.isfinite(norm):
            optimizer.step()
        else:
            skipped += 1
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if meter is not None and step % meter_every == 0:
            started = time.perf_counter()
            model.eval()
            curve.append((step, meter()))
            model.train()
            metering += time.perf_counter() - started
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return Trained(sum(tail) / len(tail), skipped, curve, metering)
