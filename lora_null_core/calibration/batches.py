"""Texts as the calibration pass reads them: tokenized, sorted by length, right-padded into batches by a token
budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CalibrationDataError


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor  # (batch, seq), right-padded
    attention_mask: torch.Tensor  # (batch, seq), 1 on real tokens

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def tokenize_batches(
    texts: Sequence[str],
    tokenizer: Any,
    max_length: int,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
    min_batches: int = 1,
) -> list[TokenBatch]:
    """Tokenize, sort by length, right-pad into batches with an attention mask (`padded_batches`)."""
    return padded_batches(token_ids_of(texts, tokenizer, max_length), tokenizer, batch_size, batch_tokens, min_batches)


def padded_batches(
    sequences: Sequence[Sequence[int]],
    tokenizer: Any,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
    min_batches: int = 1,
) -> list[TokenBatch]:
    """Token sequences sorted by length and right-padded into batches with an attention mask.

    Batches are filled up to `batch_tokens` padded tokens (rows × the batch's longest row), so thousands of
    short prompts cost a few forward passes, not thousands; `batch_size` also caps the rows when given.
    `min_batches`: at least this many batches (one per process) when there are that many texts."""
    sequences = sorted((ids for ids in sequences if ids), key=len, reverse=True)
    if not sequences:
        raise CalibrationDataError("Every calibration text tokenized to zero tokens.")
    if not batch_size and not batch_tokens:
        raise ValueError("padded_batches needs batch_size or batch_tokens")
    most_rows = -(-len(sequences) // max(1, min_batches))
    if batch_size:
        most_rows = min(most_rows, batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches, start = [], 0
    while start < len(sequences):
        width = len(sequences[start])  # the longest left: sorted
        rows = min(most_rows, max(1, batch_tokens // width)) if batch_tokens else most_rows
        chunk = sequences[start : start + rows]
        start += len(chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        batches.append(TokenBatch(ids, mask))
    return batches


def token_ids(text: str, tokenizer: Any, max_length: int) -> list[int]:
    """A text's tokens as calibration reads them: cut at max_length, with the tokenizer's special tokens."""
    return token_ids_of([text], tokenizer, max_length)[0]


def token_ids_of(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    """`token_ids` of each text, in order, from one tokenizer call per kind of text: a fast tokenizer encodes a
    batch in parallel, where a call per text costs more in the call than in its tokens (thousands of short
    questions are how users calibrate)."""
    ids: list[list[int]] = [[] for _ in texts]
    # A rendered chat template already carries its special tokens; adding them again would double BOS.
    for special in (True, False):
        chosen = [i for i, text in enumerate(texts) if _starts_with_special(text, tokenizer) != special]
        if chosen:
            encoded = tokenizer(
                [texts[i] for i in chosen], truncation=True, max_length=max_length, add_special_tokens=special
            )["input_ids"]
            for i, row in zip(chosen, encoded, strict=True):
                ids[i] = list(row)
    return ids


def _starts_with_special(text: str, tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return isinstance(bos, str) and bool(bos) and text.startswith(bos)
