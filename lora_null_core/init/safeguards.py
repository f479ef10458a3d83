"""The checks that refuse a bad init before anything is saved: calibration text too repetitive to span the
layers' inputs, and a model that no longer computes what it did."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from ..calibration.batches import TokenBatch
from ..config import LoraNullConfig
from ..errors import FunctionNotPreservedError, InsufficientCalibrationError
from ..model_parts import model_device
from ..weights import weight_of
from .peft_layers import layer_widths

logger = logging.getLogger(__name__)


def check_distinct_contexts(
    contexts: int, tokens: int, layers: Mapping[str, LoraLayer], config: LoraNullConfig
) -> None:
    """Before any forward pass: calibration text whose `tokens` hold too few distinct `contexts` (Contexts) to span
    the layers' inputs is refused (under a quarter of the widest input: 200 copies of one question, max_length 1);
    below the full width it is only a warning, since short real questions share prefixes ("The capital of …") and
    the null space then still generalizes (held-out leakage a fraction of a random A's: the CPU-size benchmark's
    200 qa_wikidata questions give 1,361 distinct contexts for SmolLM2's 1,536-wide down_proj inputs)."""
    if not config.min_tokens_per_dim:
        return
    widest = max(layer_widths(layer)[0] for layer in layers.values())
    wanted = int(config.min_tokens_per_dim * widest)
    if contexts >= wanted:
        return
    found = (
        f"The calibration text holds {tokens} tokens but only {contexts} distinct contexts (a token's "
        f"activations depend only on its prefix), so the activations span at most {contexts} of the {widest} "
        "input directions"
    )
    fix = (
        "more and more varied texts, a larger max_length, or short_calibration top_up (the model's own text "
        "makes up the rest); min_tokens_per_dim lowers the bar (0 disables the check)"
    )
    if contexts < wanted / 4:
        raise InsufficientCalibrationError(
            f"{found} and the null space would be picked by rounding (leakage near 0 here, that of a random A on "
            f"new text). Use at least {wanted} distinct contexts: {fix}."
        )
    logger.warning(
        "%s: part of the null space is picked by rounding. The held-out leakage in the report shows "
        "whether it matters; %s.",
        found,
        fix,
    )


def check_function_preserved(function_error: float, config: LoraNullConfig, layers: Mapping[str, LoraLayer]) -> None:
    """Refuse a model that no longer computes what it did (NaN factors, a layer the init could not make exact)."""
    tolerance = config.max_function_error
    if tolerance is None:  # rounding of W − s·B·A in the weights' own dtype, and of the forward pass itself
        dtype = weight_of(next(iter(layers.values())).get_base_layer()).dtype
        tolerance = max(1e-3, 10 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-3
    if not math.isfinite(function_error) or function_error > tolerance:
        raise FunctionNotPreservedError(
            f"After initialization the model's output changed by {function_error:.3g} (relative; tolerance "
            f"{tolerance:.3g}), so it no longer computes what it did. Nothing was saved. Check lora_alpha and the "
            "targets; in float16, load the model in bfloat16 or float32. max_function_error raises the tolerance."
        )


def probe_batch(batches: list[TokenBatch]) -> TokenBatch:
    """A few of the shortest calibration samples, to check that init left the model's function unchanged."""
    last = batches[-1]
    return TokenBatch(last.input_ids[:4], last.attention_mask[:4])


def model_logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False
            )
    finally:
        model.train(was_training)
    return out.logits.float()


def relative_error(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.to(actual.device).bool()
    return float((actual[keep] - expected[keep]).norm() / expected[keep].norm().clamp_min(1e-30))
