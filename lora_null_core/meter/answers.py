"""The share of the answers a base model gives that the tuned model still gives: greedy decoding on question-and-answer
rows, the knowledge a benchmark counts (the frontier's knowledge kept). Slower than the KL, since it generates, so
asked for (`lora-null forgetting --answers`). The KL and the cross-entropy rise measure drift on text; this counts
facts recalled, which the other two do not rank across inits (docs/meter.md)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import GenerationConfig

from ..errors import CalibrationDataError
from ..model_parts import input_device

QA_FIELDS = (("question", "answer"), ("prompt", "completion"))  # the pairs of columns a row may hold


def qa_pairs(rows: Sequence[Any]) -> list[tuple[str, str]]:
    """(question, answer) of every row that holds one of QA_FIELDS' pairs as text, answers stripped; a clear error
    where none does."""
    pairs = []
    for row in rows:
        if not isinstance(row, Mapping):
            continue
        for question, answer in QA_FIELDS:
            if isinstance(row.get(question), str) and isinstance(row.get(answer), str) and row[answer].strip():
                pairs.append((row[question], row[answer].strip()))
                break
    if not pairs:
        names = " or ".join(f"'{q}' and '{a}'" for q, a in QA_FIELDS)
        raise CalibrationDataError(f"No row holds a question and its answer ({names} columns): --answers needs them.")
    return pairs


def answers_given(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 16) -> list[bool]:
    """Whether `model`, decoding greedily after each question, begins its continuation with that row's answer
    (whitespace stripped), generating as many tokens as the answer has, plus two. The model is left as it was."""
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    given: list[bool] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            prompts = [tokenizer(question, add_special_tokens=True)["input_ids"] for question, _ in batch]
            new = max(len(tokenizer(" " + answer, add_special_tokens=False)["input_ids"]) for _, answer in batch) + 2
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            # a config of its own: the model's (sampling, temperature) would otherwise be merged in
            settings = GenerationConfig(
                do_sample=False, max_new_tokens=new, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id
            )
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
            for row, (_, answer) in zip(out[:, width:].tolist(), batch, strict=True):
                given.append(tokenizer.decode(row, skip_special_tokens=True).strip().startswith(answer))
    finally:
        model.train(was_training)
    return given


def answers_kept(base: Sequence[bool], tuned: Sequence[bool]) -> dict[str, float | int | None]:
    """{"answers_kept": the share of the base's correct answers the tuned model still gives (None where the base
    gave none), "answers_base_known": how many the base gave, "answers": rows asked}."""
    known = sum(base)
    still = sum(b and t for b, t in zip(base, tuned, strict=True))
    return {"answers_kept": still / known if known else None, "answers_base_known": known, "answers": len(base)}
