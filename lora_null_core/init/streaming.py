"""Layer streaming: calibrate and initialize one decoder block at a time (GPTQ-style sequential pipeline).

The inputs of block 0 are captured once (a pre-hook stops the forward pass there); then each block is
moved to the execution device, run on every cached batch with input taps, initialized, run on the held-out
and probe batches, and moved back. Its outputs are the next block's inputs. Since the init leaves each
block's function unchanged, one pass per block gives the same covariances as a whole-model pass, while the
GPU holds one block, the cached hidden states and one block's covariances.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..calibration.batches import TokenBatch
from ..calibration.taps import batch_counts
from ..console import progress
from ..model_parts import block_list, input_device
from .block_loaders import BlockLoader, default_loader
from .phases import FORWARD, phase

logger = logging.getLogger(__name__)

# A model's decoder blocks and, per block index, the names of the targeted layers inside it.
StreamingPlan = tuple[nn.ModuleList, dict[int, list[str]]]


@dataclass
class BlockInput:
    """One batch's call of a decoder block: positional args, keyword args, its padding mask, and (real tokens,
    samples) counted on the host when the batch was captured, so the hooks never sync to count."""

    args: tuple
    kwargs: dict
    mask: torch.Tensor
    counts: tuple[int, int] | None = None

    @property
    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden(self, hidden: torch.Tensor) -> BlockInput:
        if self.args:
            return BlockInput((hidden, *self.args[1:]), self.kwargs, self.mask, self.counts)
        return BlockInput(self.args, {**self.kwargs, "hidden_states": hidden}, self.mask, self.counts)


class _StopForward(Exception):
    pass


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(name, ModuleList) of the model's decoder blocks, or None where streaming cannot be trusted."""
    layer_types = set(getattr(getattr(model, "config", None), "layer_types", None) or [])
    if len(layer_types) > 1:
        # Per-layer masks (sliding/full attention) are built inside the model's forward; block 0's
        # keyword arguments would be wrong for the others.
        logger.info("Layers of several attention types (%s): streaming off.", ", ".join(sorted(layer_types)))
        return None
    return block_list(model)


def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, batches: Sequence[TokenBatch], device: torch.device
) -> list[BlockInput]:
    """Run each batch up to the first decoder block and keep that block's call, moved to `device`."""
    captured: list[BlockInput] = []
    current: dict[str, Any] = {}

    def stop(_module: nn.Module, args: tuple, kwargs: dict):
        mask = current["mask"]
        captured.append(BlockInput(_to(args, device), _to(kwargs, device), mask.to(device), batch_counts(mask)))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(stop, with_kwargs=True)
    ids_device = input_device(model)
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch.attention_mask
                try:
                    model(
                        input_ids=batch.input_ids.to(ids_device),
                        attention_mask=batch.attention_mask.to(ids_device),
                        use_cache=False,
                    )
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, call: BlockInput) -> torch.Tensor:
    with phase(FORWARD):
        out = block(*call.args, **call.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class StreamStep:
    """What the caller does at one block: its index, the block, the module names it holds, and `release`, which
    hands the block back to its loader once the caller is done with it."""

    index: int
    block: nn.Module
    names: list[str]
    release: Callable[[], None]


def stream_blocks(
    blocks: nn.ModuleList,
    layer_names: Mapping[int, list[str]],
    device: torch.device,
    loader: BlockLoader | None = None,
) -> Iterator[StreamStep]:
    """Yield each block on `device`; the caller releases it (`step.release()`), possibly after asking for the next
    ones (the init solves block i while blocks i+1 and i+2 run: loop.OVERLAP_DEPTH), so up to three blocks are
    held, plus one being prefetched. Should the stream stop early (an error), the blocks still held go back then."""
    loader = loader or default_loader(blocks, device)
    prefetch, close = getattr(loader, "prefetch", None), getattr(loader, "close", lambda: None)
    held: dict[int, nn.Module] = {}

    def release(index: int) -> None:
        if index in held:
            loader.unload(index, held.pop(index))
        if not held and index == len(blocks) - 1:
            close()

    finished = False
    try:
        for index, block in enumerate(progress(blocks, "calibrating and solving, block by block", "block")):
            loader.load(index, block, device)
            held[index] = block
            if prefetch is not None and index + 1 < len(blocks):
                prefetch(index + 1, blocks[index + 1])
            yield StreamStep(index, block, layer_names.get(index, []), functools.partial(release, index))
        finished = True
    finally:
        if not finished:
            for index in sorted(held):
                loader.unload(index, held.pop(index))
            close()


def layers_by_block(prefix: str, blocks: nn.ModuleList, names: Sequence[str]) -> dict[int, list[str]] | None:
    """Group module names by the block they live in; None if any lies outside every block."""
    grouped: dict[int, list[str]] = {}
    for name in names:
        head = f"{prefix}."
        if not name.startswith(head):
            return None
        index = int(name[len(head) :].split(".", 1)[0])
        grouped.setdefault(index, []).append(name)
    return grouped


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value
