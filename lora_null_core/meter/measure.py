"""The tuned model's drift on the reference: KL(original ‖ tuned) per token on the original model's own samples,
and the cross-entropy rise on held-out knowledge text. Under several processes each scores a share and the sums are
all-reduced, so every rank gets the same numbers; every rank runs as many forwards, which a sharded model (ZeRO-3,
FSDP) needs."""

from __future__ import annotations

from typing import Any

import torch

from ..distributed import all_reduce_sum_, collective_device, rank_and_world
from ..weights import no_cpu_repacking
from .answers import given
from .reference import ForgettingReference
from .scoring import token_logprobs, token_scores


def forgetting(model: Any, reference: ForgettingReference, batch_size: int = 16) -> dict[str, float | None]:
    """{"kl": KL(original ‖ tuned) per sampled token, "ce_rise": the rise of cross-entropy per token on the
    reference's knowledge text (None without), "answers_kept": the share of the answers the original gave that the
    tuned model still gives (None without), "tokens": sampled tokens scored}. `model` as it trains: a PeftModel with
    its adapter on, or whatever wraps it for the framework."""
    with no_cpu_repacking(model):  # a reading inside a QLoRA run on the CPU must leave its backward intact
        return _forgetting(model, reference, batch_size)


def _forgetting(model: Any, reference: ForgettingReference, batch_size: int) -> dict[str, float | None]:
    rows, kept = _share(len(reference.ids))
    sampled = reference.sampled[rows] & kept[:, None]
    tuned = token_logprobs(model, reference.ids[rows], reference.mask[rows], sampled, batch_size)
    sums = [float(((reference.logprobs[rows] - tuned) * sampled).sum()), float(sampled.sum())]
    texts = reference.texts()
    if texts is not None:
        ids, mask, scored, original = texts
        rows, kept = _share(len(ids))
        scored = scored[rows] & kept[:, None]
        nll = -token_logprobs(model, ids[rows], mask[rows], scored, batch_size).double().sum()
        sums += [float(nll - (original[rows] * kept).sum()), float(scored.sum())]
    else:
        sums += [0.0, 0.0]
    answers = reference.answers()
    if answers is not None:
        ids, mask, positions = answers
        rows, kept = _share(len(ids))
        hits = token_scores(model, ids[rows], mask[rows], positions[rows], batch_size)[1]
        sums += [float((given(hits, positions[rows]) & kept).sum()), float(kept.sum())]
    totals = all_reduce_sum_(torch.tensor(sums, dtype=torch.float64, device=collective_device() or "cpu")).tolist()
    return {
        "kl": totals[0] / max(totals[1], 1.0),
        "ce_rise": totals[2] / max(totals[3], 1.0) if texts is not None else None,
        "answers_kept": totals[4] / totals[5] if answers is not None and totals[5] else None,
        "tokens": totals[1],
    }


def _share(count: int) -> tuple[list[int], torch.Tensor]:
    """This rank's rows, round-robin, padded with row 0 so that every rank scores as many; and which are its own
    (the padding counts for nothing)."""
    rank, world = rank_and_world()
    rows = list(range(rank, count, world))
    padding = -(-count // world) - len(rows)
    return rows + [0] * padding, torch.tensor([True] * len(rows) + [False] * padding, dtype=torch.bool)
