"""Each token's log-probability under a model, for sequences of token ids: the one scoring both the reference and the
tuned model go through, so the two sides of the estimate are computed alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..model_parts import input_device

# float32 logits scored at once: a reading runs inside a user's training, on a GPU the run may have filled, and
# 16 rows of 128 tokens over a 152k vocabulary (Qwen2.5's) would take 1.2 GiB in float32, twice over in the loss
LOSS_CHUNK_BYTES = 256 * 2**20


def padded(
    sequences: Sequence[Sequence[int]], flags: Sequence[Sequence[bool]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, flags) right-padded to the longest sequence: mask marks real tokens, flags the given positions."""
    width = max((len(s) for s in sequences), default=1)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    marked = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (sequence, flag) in enumerate(zip(sequences, flags, strict=True)):
        ids[row, : len(sequence)] = torch.tensor(list(sequence), dtype=torch.long)
        mask[row, : len(sequence)] = True
        marked[row, : len(flag)] = torch.tensor(list(flag), dtype=torch.bool)
    return ids, mask, marked


def token_logprobs(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor, batch_size: int = 16
) -> torch.Tensor:
    """log p(x_t | x_<t) at the `scored` positions (0 elsewhere; position 0 has no prediction), in float32, on the
    CPU. The model runs in eval mode and is left as it was."""
    return token_scores(model, ids, mask, scored, batch_size, hits_too=False)[0]


def token_scores(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, scored: torch.Tensor, batch_size: int = 16, hits_too: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_logprobs, hits) from the same forwards: hits marks the `scored` positions whose token is the model's
    most likely one there, so a row whose scored positions all hit is what greedy decoding would produce (all False
    unless `hits_too`: the argmax is another pass over the logits)."""
    device = input_device(model)
    out = torch.zeros(ids.shape, dtype=torch.float32)
    hits = torch.zeros(ids.shape, dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                rows = slice(start, start + batch_size)
                batch_ids, batch_mask = ids[rows].to(device), mask[rows].to(device)
                logits = model(input_ids=batch_ids, attention_mask=batch_mask.long(), use_cache=False).logits
                out[rows, 1:] = -_nll(logits[:, :-1], batch_ids[:, 1:]).cpu()
                if hits_too:
                    hits[rows, 1:] = (logits[:, :-1].argmax(-1) == batch_ids[:, 1:]).cpu()
    finally:
        model.train(was_training)
    return out * scored, hits & scored


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at each position in float32, a few rows at a time (LOSS_CHUNK_BYTES of float32 logits), each
    chunk flattened to (positions, vocabulary): the softmax then runs over contiguous memory, where one over the
    transposed (rows, vocabulary, positions) view took 105-108x as long on an H100 (16 x 128 x 151,936 logits) and
    3.0-3.6x on a CPU (benchmarks/speed/nll_layout.py)."""
    rows = max(1, LOSS_CHUNK_BYTES // max(1, 4 * logits.shape[1] * logits.shape[2]))
    vocabulary = logits.shape[-1]
    return torch.cat(
        [
            F.cross_entropy(part.float().reshape(-1, vocabulary), goal.reshape(-1), reduction="none").view(goal.shape)
            for part, goal in zip(logits.split(rows), targets.split(rows), strict=True)
        ]
    )
