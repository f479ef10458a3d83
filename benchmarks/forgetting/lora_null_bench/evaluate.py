"""Scoring: greedy completions matched against targets, task answers, perplexity."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from .world import Example

_PUNCT = re.compile(r"[^\w\s]")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def contains_target(completion: str, targets: Sequence[str]) -> bool:
    """Closed-book match: a target appears as whole words in the completion's first line."""
    line = f" {normalize(completion.strip().splitlines()[0] if completion.strip() else '')} "
    return any(f" {normalize(t)} " in line for t in targets if normalize(t))


def final_number(text: str) -> str | None:
    """GSM8K's convention: the first number after '####' if there is one, else the last number."""
    if "####" in text:
        numbers = _NUMBER.findall(text.split("####", 1)[1])[:1]
    else:
        numbers = _NUMBER.findall(text)[-1:]
    return numbers[0].replace(",", "").rstrip(".") if numbers else None


def number_matches(completion: str, targets: Sequence[str]) -> bool:
    got = final_number(completion)
    return got is not None and any(got == final_number(t) for t in targets)


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy decoding, left-padded batches, longest prompts first."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = tokenizer([prompts[i] for i in index], return_tensors="pt", padding=True).to(device)
            with _autocast(device):
                generated = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(index, texts, strict=True):
                out[i] = text
    finally:
        tokenizer.padding_side = side
    return out


def accuracy(
    model, tokenizer, examples: Sequence[Example], max_new_tokens: int, batch_size: int, match=contains_target
) -> tuple[float, list[bool]]:
    if not examples:
        return float("nan"), []
    completions = greedy_completions(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size)
    hits = [bool(match(c, e.targets)) for c, e in zip(completions, examples, strict=True)]
    return sum(hits) / len(hits), hits


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int, max_length: int) -> float:
    """exp of the mean token negative log-likelihood over the texts."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        ).to(device)
        with _autocast(device):
            logits = model(**batch).logits.float()
        labels = batch["input_ids"][:, 1:]
        mask = batch["attention_mask"][:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
        total += float(nll[mask].sum())
        count += int(mask.sum())
    return math.exp(total / max(count, 1))


def _autocast(device: torch.device):
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
