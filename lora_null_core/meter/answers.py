"""The share of the answers a base model gives that the tuned model still gives, on question-and-answer rows: the
knowledge a benchmark counts (the frontier's knowledge kept). The KL and the cross-entropy rise measure drift on text;
this counts facts recalled, which the other two do not rank across inits (docs/meter.md).

A model gives an answer when greedy decoding after the question produces the answer's tokens: when each answer token
is the model's most likely next token given the question and the answer tokens before it. That is read from one
forward over question + answer, so it costs what the cross-entropy rise costs, generates nothing, and every process
of a sharded model runs the same forwards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..calibration.batches import token_ids
from ..errors import CalibrationDataError
from .scoring import padded

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
        raise CalibrationDataError(f"No row holds a question and its answer ({names} columns): answers need them.")
    return pairs


def answer_rows(
    pairs: Sequence[tuple[str, str]], tokenizer: Any, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, answer positions) of each question followed by a space and its answer, right-padded: the answer's
    tokens are those the full text has beyond the question's own."""
    sequences, flags = [], []
    for question, answer in pairs:
        asked = token_ids(question, tokenizer, 512)
        full = token_ids(f"{question} {answer}", tokenizer, 512)
        if len(full) <= len(asked) or full[: len(asked)] != asked:  # the answer merged into the question's last token
            asked = asked[:-1]
        sequences.append(full)
        flags.append([False] * len(asked) + [True] * (len(full) - len(asked)))
    return padded(sequences, flags, pad_id)


def given(hits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per row: every answer position hit (greedy decoding would produce the whole answer)."""
    return (hits | ~positions).all(dim=1) & positions.any(dim=1)
