"""The meter's reference: texts the original model samples itself, at temperature 1 and no nucleus, with each sampled
token's log-probability under that model. The mean of log p_original(x) − log p_tuned(x) over those tokens is then a
Monte Carlo estimate of KL(original ‖ tuned) per token on the model's own distribution, and needs no second copy of
the model later. Held-out knowledge text, when given, is kept with its cross-entropy under the original model."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import StrPath
from ..calibration.batches import token_ids
from ..calibration.own_text import own_samples
from ..calibration.whole_model import whole_on
from ..config import LoraNullConfig
from ..errors import LoraNullError
from ..model_parts import model_device
from ..weights import no_cpu_repacking
from .answers import answer_rows, given
from .scoring import padded, token_logprobs, token_scores

FORMAT = 1


@dataclass
class ForgettingReference:
    """Sampled sequences (right-padded token ids), which positions hold a sampled token, and that token's
    log-probability under the original model; knowledge rows and their per-token negative log-likelihood sums."""

    ids: torch.Tensor  # (samples, length) long
    mask: torch.Tensor  # (samples, length) bool: a real token (the prompt's or a sampled one), not padding
    sampled: torch.Tensor  # (samples, length) bool: a token the model drew (not its prompt, not padding)
    logprobs: torch.Tensor  # (samples, length) float32, log p_original of each sampled token, 0 elsewhere
    settings: dict[str, Any] = field(default_factory=dict)
    text_ids: torch.Tensor | None = None  # (rows, length) long, knowledge text
    text_mask: torch.Tensor | None = None  # (rows, length) bool: real tokens
    text_scored: torch.Tensor | None = None  # (rows, length) bool: tokens predicted (all but each row's first)
    text_nll: torch.Tensor | None = None  # (rows,) float64: each row's summed NLL under the original model
    answer_ids: torch.Tensor | None = None  # (rows, length) long: question + answer, of the answers the original gave
    answer_mask: torch.Tensor | None = None  # (rows, length) bool: real tokens
    answer_scored: torch.Tensor | None = None  # (rows, length) bool: the answer's tokens

    @property
    def tokens(self) -> int:
        return int(self.sampled.sum())

    def texts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(ids, mask, scored, original summed NLL per row) of the knowledge rows, or None without any."""
        if self.text_ids is None or self.text_mask is None or self.text_scored is None or self.text_nll is None:
            return None
        return self.text_ids, self.text_mask, self.text_scored, self.text_nll

    def answers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(ids, mask, answer positions) of the question/answer rows the original model answered, or None without."""
        if self.answer_ids is None or self.answer_mask is None or self.answer_scored is None:
            return None
        return self.answer_ids, self.answer_mask, self.answer_scored

    def save(self, path: StrPath) -> Path:
        """One safetensors file (a few MB), written whole or not at all."""
        path = Path(path)
        tensors = {
            "ids": self.ids,
            "mask": self.mask.to(torch.uint8),
            "sampled": self.sampled.to(torch.uint8),
            "logprobs": self.logprobs,
        }
        texts = self.texts()
        if texts is not None:
            ids, mask, scored, nll = texts
            tensors.update(
                text_ids=ids, text_mask=mask.to(torch.uint8), text_scored=scored.to(torch.uint8), text_nll=nll
            )
        answers = self.answers()
        if answers is not None:
            ids, mask, scored = answers
            tensors.update(answer_ids=ids, answer_mask=mask.to(torch.uint8), answer_scored=scored.to(torch.uint8))
        staging = path.with_name(f".{path.name}.tmp")
        save_file(
            {k: v.contiguous().cpu() for k, v in tensors.items()},
            str(staging),
            metadata={"format": str(FORMAT), "settings": json.dumps(self.settings)},
        )
        staging.replace(path)
        return path

    @classmethod
    def load(cls, path: StrPath) -> ForgettingReference:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise LoraNullError(f"{path} does not exist: write a reference with forgetting_reference(...).save().")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != str(FORMAT):
            raise LoraNullError(f"{path} is not a lora-null forgetting reference (format {metadata.get('format')}).")
        tensors = load_file(str(path))
        optional = ("text_ids", "text_mask", "text_scored", "text_nll", "answer_ids", "answer_mask", "answer_scored")
        text = {k: tensors[k] for k in optional if k in tensors}
        for key in ("text_mask", "text_scored", "answer_mask", "answer_scored"):
            if key in text:
                text[key] = text[key].bool()
        return cls(
            tensors["ids"],
            tensors["mask"].bool(),
            tensors["sampled"].bool(),
            tensors["logprobs"],
            json.loads(metadata.get("settings", "{}")),
            **text,
        )


def forgetting_reference(
    model: nn.Module,
    tokenizer: Any,
    samples: int = 64,
    length: int = 128,
    seed: int = 0,
    texts: Sequence[str] | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    answers: Sequence[tuple[str, str]] | None = None,
) -> ForgettingReference:
    """`samples` texts of at most `length` tokens drawn from the model as it is now (a PeftModel's adapter off), from
    BOS, at temperature 1 with no nucleus (samples from the model's own distribution: what makes the KL estimate
    unbiased), with their log-probabilities; `texts`: held-out knowledge rows, kept with their cross-entropy;
    `answers`: (question, answer) pairs, of which those the model answers now are kept (meter/answers.py).
    `device`: where to run (default: where the model is; a model held in CPU memory visits it when it fits)."""
    if samples < 1 or length < 1:
        raise LoraNullError(f"samples={samples} and length={length} must be at least 1.")
    config = LoraNullConfig(
        generated_length=length, generated_temperature=1.0, generated_top_p=1.0, seed=seed, generated_prompt="bos"
    )
    where = torch.device(device) if device is not None else model_device(model)
    drawn = own_samples(model, tokenizer, config, where, count=samples, what="the forgetting meter's samples")
    ids, mask, sampled = padded(
        [prompt + generated for prompt, generated in drawn],
        [[False] * len(prompt) + [True] * len(generated) for prompt, generated in drawn],
        _pad_id(tokenizer),
    )
    settings = {
        "samples": samples,
        "length": length,
        "seed": seed,
        "temperature": 1.0,
        "top_p": 1.0,
        "model": str(getattr(getattr(model, "config", None), "name_or_path", "") or ""),
    }
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    adapter_off = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
    with whole_on(base, where), adapter_off, no_cpu_repacking(model):  # (own_samples guards its own draws)
        started = time.perf_counter()
        reference = ForgettingReference(
            ids, mask, sampled, token_logprobs(model, ids, mask, sampled, batch_size), settings
        )
        if texts:
            rows = [row for row in (token_ids(text, tokenizer, 512) for text in texts) if len(row) > 1]
            text_ids, text_mask, scored = padded(
                rows, [[False] + [True] * (len(row) - 1) for row in rows], _pad_id(tokenizer)
            )
            nll = -token_logprobs(model, text_ids, text_mask, scored, batch_size).double().sum(dim=1)
            reference.text_ids, reference.text_mask, reference.text_scored, reference.text_nll = (
                text_ids,
                text_mask,
                scored,
                nll,
            )
            reference.settings["texts"] = len(rows)
        if answers:
            ids, mask, positions = answer_rows(answers, tokenizer, _pad_id(tokenizer))
            known = given(token_scores(model, ids, mask, positions, batch_size)[1], positions)
            reference.answer_ids, reference.answer_mask, reference.answer_scored = (
                ids[known],
                mask[known],
                positions[known],
            )
            reference.settings.update(answers=len(answers), answers_base_known=int(known.sum()))
        # the forwards a reading repeats: what the first reading will cost, before any has been taken
        reference.settings["scoring_seconds"] = round(time.perf_counter() - started, 3)
    return reference


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0
