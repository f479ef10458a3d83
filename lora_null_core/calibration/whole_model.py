"""The whole model on one device for the own-text sampling: where it is; moved from CPU memory to the execution
device when it fits there, and back afterwards; or, under DeepSpeed ZeRO-3, its partitions gathered: the whole
model at once where it fits on every rank, else each decoder block for each of its forwards."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..distributed import any_rank
from ..errors import OwnTextUnavailableError
from ..model_parts import block_list
from ..weights import gathered, is_zero3_partitioned

logger = logging.getLogger(__name__)

# Under ZeRO-3 the whole model is gathered for sampling when it takes at most this share of the free memory on
# every rank; else each block is gathered for its own forwards only (slower: a gather per block per token).
GATHER_WHOLE_SHARE = 0.8
CALIBRATION_FIX = "pass calibration text (lora_null_calibration, or --calibration)"


@contextlib.contextmanager
def whole_on(model: nn.Module, device: torch.device) -> Iterator[torch.device]:
    """Sampling needs every weight on one device: the model's own, or the execution device for a model held in CPU
    memory (offload, or before FSDP places it) when it fits there, and back afterwards; under ZeRO-3, gathered."""
    params = list(model.parameters())
    if is_zero3_partitioned(params):
        with _zero3_gathered(model, device):
            yield params[0].device
        return
    if any(p.is_meta for p in params):
        raise OwnTextUnavailableError(
            "The model's weights are not all here (some are on the meta device), and its own text is sampled from "
            "the whole model",
            f"load the weights, or {CALIBRATION_FIX}",
        )
    home = params[0].device
    offloaded = sorted(
        {str(place) for place in (getattr(model, "hf_device_map", None) or {}).values()} & {"cpu", "disk"}
    )
    if offloaded:  # accelerate's hooks move those weights to the GPU for every decoding step
        logger.warning(
            "The model is partly offloaded (device_map puts layers on %s), so sampling its own text moves "
            "them to the GPU at every token and is slow. Load it whole on the GPU, or pass calibration "
            "text (lora_null_calibration, or --calibration).",
            " and ".join(offloaded),
        )
    if home.type != "cpu" or device.type == "cpu":
        yield home
        return
    needed = sum(p.numel() * p.element_size() for p in params) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    free, total = torch.cuda.mem_get_info(device)
    if needed > 0.8 * free:
        raise OwnTextUnavailableError(
            f"The model's own text is sampled from the whole model, whose {needed / 2**30:.1f} GiB of weights are in "
            f"CPU memory and do not fit the {free / 2**30:.1f} GiB free on {device} (of {total / 2**30:.1f} GiB: "
            "other processes may hold the rest)",
            CALIBRATION_FIX,
        )
    model.to(device)
    try:
        yield device
    finally:
        model.to(home)


@contextlib.contextmanager
def _zero3_gathered(model: nn.Module, device: torch.device) -> Iterator[None]:
    """ZeRO-3 partitions gathered for sampling: the whole model at once where it fits on every rank, else the
    weights outside the decoder blocks for the whole time and each block for each of its forwards (slower, but no
    rank ever holds more than the rest of the model and one block)."""
    params = list(model.parameters())
    whole = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)
    if not any_rank(whole > GATHER_WHOLE_SHARE * _free_bytes(device)):
        with gathered(params):
            yield
        return
    found = block_list(model)
    if found is None:
        raise OwnTextUnavailableError(
            f"The model's own text is sampled from the whole model, whose {whole / 2**30:.1f} GiB does not fit "
            f"beside the rest on {device}, and its decoder blocks could not be found to gather one at a time",
            CALIBRATION_FIX,
        )
    inside = {id(p) for p in found[1].parameters()}
    with gathered([p for p in params if id(p) not in inside]), _gathered_per_forward(found[1]):
        yield


@contextlib.contextmanager
def _gathered_per_forward(blocks: nn.ModuleList) -> Iterator[None]:
    """Each block's partitions gathered for the length of each of its forwards, then released."""
    held: dict[int, contextlib.ExitStack] = {}

    def enter(block: nn.Module, *_: Any) -> None:
        held[id(block)] = stack = contextlib.ExitStack()
        stack.enter_context(gathered(list(block.parameters())))

    def leave(block: nn.Module, *_: Any) -> None:
        held.pop(id(block)).close()

    handles = [
        hook
        for block in blocks
        for hook in (block.register_forward_pre_hook(enter), block.register_forward_hook(leave))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in held.values():  # a forward that raised never reached its release
            stack.close()


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # accelerate's dependency, so here wherever DeepSpeed is

    return psutil.virtual_memory().available
