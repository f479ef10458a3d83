"""The texts an init calibrates on. Knowledge text short of what the widest targeted layer needs (fewer distinct
contexts than min_tokens_per_dim times its input width) is not refused: more of it is read than num_samples, and
if the source runs out, the model's own text makes up the rest (short_calibration: top_up). Without knowledge text
the model's own text is all of it."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import LoraNullConfig
from ..errors import OwnTextUnavailableError
from .batches import token_ids_of
from .contexts import Contexts
from .own_text import own_text
from .sources import CalibrationSource
from .texts import CalibrationTexts, choose_texts

logger = logging.getLogger(__name__)

# Rounds of own-text top-up before the floor is left to the checks (samples that end early at EOS can fall short).
TOP_UP_ROUNDS = 3


@dataclass(frozen=True)
class CalibrationSet:
    """The chosen texts and what they are: `used` says it in one line ("256 rows of questions.jsonl (2,093
    tokens) + 40 samples of the model's own text (5,120 tokens)"); `top_up` is None when nothing was added.
    `token_ids` are the calibration texts' tokens, in order, and `contexts` their distinct prefixes (Contexts):
    counted here once, so the batches and the safeguards need not tokenize or count again."""

    texts: CalibrationTexts
    used: str
    knowledge_samples: int
    knowledge_tokens: int
    token_ids: list[list[int]]
    contexts: int
    top_up: dict[str, Any] | None = None


def select_calibration(
    model: nn.Module,
    calibration: CalibrationSource | None,
    tokenizer: Any,
    config: LoraNullConfig,
    device: torch.device,
    widest: int,
) -> CalibrationSet:
    """`calibration` (None: the model's own text) drawn as `config` says, topped up to `widest` distinct contexts
    when it is short and short_calibration is top_up. Every process draws the same texts (own text is gathered)."""
    if calibration is None:
        calibration = own_text(model, tokenizer, config, device)
    floor = math.ceil(config.min_tokens_per_dim * widest) if config.short_calibration == "top_up" else 0
    contexts, ids = Contexts(), []

    def enough(texts: list[str]) -> bool:
        new = token_ids_of(texts, tokenizer, config.max_length)
        ids.extend(new)
        return contexts.add(new) >= floor

    texts = choose_texts(
        calibration, tokenizer, config.num_samples, config.holdout_samples, config.seed, config.text_field, until=enough
    )
    knowledge = (len(texts.calibration), sum(map(len, ids)))
    used = f"{knowledge[0]} rows of {texts.source} ({knowledge[1]:,} tokens)"
    if len(contexts) >= floor:
        return CalibrationSet(texts, used, *knowledge, ids, len(contexts))
    short = len(contexts)
    added: list[str] = []
    for attempt in range(TOP_UP_ROUNDS):
        count = math.ceil(1.25 * (floor - len(contexts)) / config.generated_length) + 1
        try:
            drawn = own_text(model, tokenizer, config.replace(seed=config.seed + 7919 * (attempt + 1)), device, count)
        except OwnTextUnavailableError as error:
            raise OwnTextUnavailableError(
                f"The calibration text holds {short} distinct contexts, fewer than the {floor} the widest targeted "
                f"input takes, and the model's own text that would top it up cannot be drawn. {error.cause}",
                f"give calibration text with at least {floor} distinct contexts (more rows, or longer ones)",
            ) from None
        added += drawn.rows
        if enough(list(drawn.rows)):
            break
    top_up = {"samples": len(added), "tokens": sum(map(len, ids)) - knowledge[1], "source": drawn.source}
    used += f" + {top_up['samples']} samples of the model's own text ({top_up['tokens']:,} tokens)"
    # Under a quarter of the floor (the old refusal's bar: one text repeated, say) the own text is nearly all of it.
    logger.log(
        logging.WARNING if short < floor / 4 else logging.INFO,
        "The calibration text holds %d distinct contexts, fewer than the %d the widest targeted input takes "
        "(short_calibration: top_up): calibrating on %s.",
        short,
        floor,
        used,
    )
    texts = CalibrationTexts([*texts.calibration, *added], texts.holdout, texts.source)
    return CalibrationSet(texts, used, *knowledge, ids, len(contexts), top_up=top_up)
