"""Layer streaming: calibrate and initialize one decoder block at a time (GPTQ-style sequential pipeline).

The inputs of block 0 are captured once (a pre-hook stops the forward pass there); then each block is
moved to the execution device, run on every cached batch with input taps, initialized, run on the held-out
and probe batches, and moved back. Its outputs are the next block's inputs. Since the init leaves each
block's function unchanged, one pass per block gives the same covariances as a whole-model pass, while the
GPU holds one block, the cached hidden states and one block's covariances.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import nn

from .console import progress
from .data import TokenBatch
from .phases import FORWARD, phase
from .taps import batch_counts, input_device
from .weights import gathered, is_zero3_partitioned

logger = logging.getLogger(__name__)


@dataclass
class BlockInput:
    """One batch's call of a decoder block: positional args, keyword args, its padding mask, and (real tokens,
    samples) counted on the host when the batch was captured, so the hooks never sync to count."""

    args: tuple
    kwargs: dict
    mask: torch.Tensor
    counts: Optional[tuple[int, int]] = None

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
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    layer_types = set(getattr(config, "layer_types", None) or [])
    if len(layer_types) > 1:
        # Per-layer masks (sliding/full attention) are built inside the model's forward; block 0's
        # keyword arguments would be wrong for the others.
        logger.info("Layers of several attention types (%s): streaming off.", ", ".join(sorted(layer_types)))
        return None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and count and len(module) == count:
            return name, module
    return None


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
                    model(input_ids=batch.input_ids.to(ids_device), attention_mask=batch.attention_mask.to(ids_device),
                          use_cache=False)
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


class BlockLoader(Protocol):
    """Brings a decoder block's weights onto the device before its turn and takes them away after."""

    def load(self, index: int, block: nn.Module, device: torch.device) -> None: ...

    def unload(self, index: int, block: nn.Module) -> None: ...


class MoveToDevice:
    """The default loader: weights live where the model put them (GPU, or CPU with --offload)."""

    def __init__(self) -> None:
        self._home: dict[int, torch.device] = {}

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        self._home[index] = next(block.parameters()).device
        block.to(device)

    def unload(self, index: int, block: nn.Module) -> None:
        block.to(self._home.pop(index))


class PrefetchToDevice:
    """The loader for weights kept in CPU memory (--offload cpu) streamed to a GPU: while block i computes, block
    i+1 is copied in on a side stream, and a finished block goes back the same way, from and into pinned memory
    (each block is pinned once, on its first trip), so the copies overlap the compute instead of stalling it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._incoming: dict[int, tuple[list, torch.cuda.Event]] = {}
        self._entries: dict[int, list] = {}  # index → [(owner, kind, name, pinned host tensor)]

    def prefetch(self, index: int, block: nn.Module) -> None:
        if index in self._incoming:
            return
        entries = []
        for owner, kind, name, tensor in _block_tensors(block):
            host = tensor if tensor.is_pinned() else tensor.pin_memory()
            entries.append((owner, kind, name, host))
            _set_tensor(owner, kind, name, host)
        with torch.cuda.stream(self.stream):
            copies = [host.to(self.device, non_blocking=True) for *_, host in entries]
            arrived = torch.cuda.Event()
            arrived.record(self.stream)
        self._entries[index] = entries
        self._incoming[index] = (copies, arrived)

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        self.prefetch(index, block)
        copies, arrived = self._incoming.pop(index)
        torch.cuda.current_stream(self.device).wait_event(arrived)
        for (owner, kind, name, _host), on_device in zip(self._entries[index], copies):
            _set_tensor(owner, kind, name, on_device)

    def unload(self, index: int, block: nn.Module) -> None:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))  # after everything the caller did to the block
        self.stream.wait_event(done)
        with torch.cuda.stream(self.stream):
            for owner, kind, name, host in self._entries.pop(index):
                on_device = _get_tensor(owner, kind, name)
                host.copy_(on_device, non_blocking=True)  # the residual written on the GPU goes home
                on_device.record_stream(self.stream)
                _set_tensor(owner, kind, name, host)

    def close(self) -> None:
        """Wait for the last copies home: the host weights are read (saved) next."""
        self.stream.synchronize()


def _block_tensors(block: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    found = []
    for owner in block.modules():
        for kind, table in (("parameter", owner._parameters), ("buffer", owner._buffers)):
            for name, tensor in table.items():
                if tensor is not None:
                    found.append((owner, kind, name, tensor.data))
    return found


def _get_tensor(owner: nn.Module, kind: str, name: str) -> torch.Tensor:
    return (owner._parameters if kind == "parameter" else owner._buffers)[name].data


def _set_tensor(owner: nn.Module, kind: str, name: str, tensor: torch.Tensor) -> None:
    if kind == "parameter":
        owner._parameters[name].data = tensor
    else:
        owner._buffers[name] = tensor


class GatherPartitions:
    """The loader under DeepSpeed ZeRO-3: a block's partitioned base weights gathered on every rank for its turn
    (its LoRA factors are gathered where they are written), so no rank holds more than a block or two."""

    def __init__(self) -> None:
        self._held: dict[int, contextlib.ExitStack] = {}

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(gathered(base_parameters(block)))
        self._held[index] = stack

    def unload(self, index: int, block: nn.Module) -> None:
        self._held.pop(index).close()


def base_parameters(module: nn.Module) -> list[torch.Tensor]:
    """The module's parameters but its LoRA factors."""
    return [p for name, p in module.named_parameters() if ".lora_" not in f".{name}"]


def default_loader(blocks: nn.ModuleList, device: torch.device) -> BlockLoader:
    """Gathering under ZeRO-3; prefetching when CPU-held blocks stream to a GPU; plain moves otherwise."""
    if is_zero3_partitioned(blocks[0].parameters()):
        return GatherPartitions()
    first = next(blocks[0].parameters(), None)
    if device.type == "cuda" and first is not None and first.device.type == "cpu":
        return PrefetchToDevice(device)
    return MoveToDevice()


def stream_blocks(
    blocks: nn.ModuleList,
    layer_names: Mapping[int, list[str]],
    device: torch.device,
    loader: Optional[BlockLoader] = None,
) -> Iterator[StreamStep]:
    """Yield each block on `device`; the caller releases it (`step.release()`), possibly after asking for the next
    one (the init solves block i while block i+1 runs), so up to two blocks are held, plus one being prefetched.
    Should the stream stop early (an error), the blocks still held go back then."""
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


def layers_by_block(prefix: str, blocks: nn.ModuleList, names: Sequence[str]) -> Optional[dict[int, list[str]]]:
    """Group module names by the block they live in; None if any lies outside every block."""
    grouped: dict[int, list[str]] = {}
    for name in names:
        head = f"{prefix}."
        if not name.startswith(head):
            return None
        index = int(name[len(head):].split(".", 1)[0])
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

