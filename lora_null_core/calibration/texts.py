"""Which texts calibrate and which are held out: rows rendered as text (a text field, or chat messages through the
template), drawn disjointly from one seeded permutation, so leakage on held-out text is an honest check. The texts
should carry the knowledge to preserve (the paper: NQ-open questions)."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import LoraNullConfig
from ..errors import CalibrationDataError
from .sources import CalibrationSource, describe, load_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationTexts:
    calibration: list[str]
    holdout: list[str]
    source: str


def row_to_text(row: Any, tokenizer: Any, text_field: str) -> str:
    """One row's text: the text field, or chat messages rendered with the tokenizer's chat template."""
    if isinstance(row, str):
        return row
    if not isinstance(row, Mapping):
        raise CalibrationDataError(f"Calibration row of type {type(row).__name__} is neither a string nor a mapping.")
    if text_field in row and isinstance(row[text_field], str):
        return row[text_field]
    if text_field in row and row[text_field] is not None:
        value = row[text_field]
        raise CalibrationDataError(
            f"Calibration column {text_field!r} holds {type(value).__name__} values (e.g. {value!r:.60}), not text; "
            "pass --text-field with the column that holds the text."
        )
    if "messages" in row and isinstance(row["messages"], list):
        if not getattr(tokenizer, "chat_template", None):
            raise CalibrationDataError(
                "Calibration rows hold 'messages' but the tokenizer has no chat template; set one, or point "
                "--text-field at a plain-text column."
            )
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    if text_field in row:  # None: a row of a .jsonl that lacks the field, skipped as empty
        return ""
    raise CalibrationDataError(
        f"Calibration row has no text field {text_field!r} (columns: {', '.join(map(str, row))}); "
        "pass --text-field with the column that holds the text, or use a 'messages' column."
    )


def choose_texts(
    source: CalibrationSource,
    tokenizer: Any,
    num_samples: int,
    holdout_samples: int,
    seed: int,
    text_field: str,
    until: Callable[[list[str]], bool] | None = None,
) -> CalibrationTexts:
    """Draw `num_samples` calibration texts and up to `holdout_samples` disjoint held-out texts. `until` is told of
    the calibration texts, the first `num_samples` at once, and says whether there are enough: when it has not,
    more calibration texts are drawn one by one (after the held-out ones, which stay the same) until it does or the
    source runs out."""
    rows = load_rows(source)
    if len(rows) == 0:
        raise CalibrationDataError(f"Calibration source {describe(source)} is empty; it needs at least one text.")
    order = _texts_in_random_order(rows, tokenizer, text_field, seed)
    calibration = list(itertools.islice(order, num_samples))
    holdout = list(itertools.islice(order, holdout_samples))
    if not calibration:
        raise CalibrationDataError(f"Calibration source {describe(source)} holds only empty texts.")
    if until is not None and not until(list(calibration)):
        for text in order:
            calibration.append(text)
            if until([text]):
                break
    if len(calibration) < num_samples:
        logger.info("Calibration source has %d non-empty texts; asked for %d.", len(calibration), num_samples)
    if holdout_samples and len(holdout) < holdout_samples:
        logger.info("Only %d held-out texts left after calibration (asked for %d).", len(holdout), holdout_samples)
    return CalibrationTexts(calibration, holdout, describe(source))


def held_out_texts(source: CalibrationSource, tokenizer: Any, config: LoraNullConfig) -> list[str]:
    """The rows an init from `source` with `config` holds out for its leakage check: knowledge the null space never
    saw, so the forgetting meter's cross-entropy rise on them is an honest one (a top-up reads more rows after
    them, never them)."""
    return choose_texts(
        source, tokenizer, config.num_samples, config.holdout_samples, config.seed, config.text_field
    ).holdout


def _texts_in_random_order(rows: Sequence[Any], tokenizer: Any, text_field: str, seed: int) -> Iterator[str]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    for index in order:
        text = row_to_text(rows[index], tokenizer, text_field)
        if text.strip():
            yield text
