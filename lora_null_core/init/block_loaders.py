"""Block loaders: how a decoder block's weights come onto the execution device for its turn and go back after
(moved, streamed from CPU memory with prefetching, gathered from ZeRO-3 partitions). sequential.stream_blocks
drives them; `--offload disk` brings its own (lazy.DiskBlocks), the speed benchmark one for random weights."""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from torch import nn

from ..weights import gathered, is_zero3_partitioned


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
    i+1 is copied in on a side stream, and a finished block goes back the same way, so the copies overlap the
    compute instead of stalling it. Every trip passes through pinned staging buffers from torch's caching host
    allocator, reused trip after trip: pinning the model itself costs ~0.3 s per 7B block (page-locking fresh
    memory), a memcpy into a reused buffer a tenth of that. A block's copies home land in its host tensors at the
    next unload, before it is read again, or at close."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._incoming: dict[int, tuple[list, torch.cuda.Event]] = {}
        self._entries: dict[int, list] = {}  # index → [(owner, kind, name, host tensor)]
        self._homing: tuple = (None, None, [])  # (index, copies done, [(host, staging)]) of the last unload

    def prefetch(self, index: int, block: nn.Module) -> None:
        if index in self._incoming:
            return
        if self._homing[0] == index:  # going back and forth: read it once it is home
            self._land()
        entries = _block_tensors(block)
        with torch.cuda.stream(self.stream):
            # The allocator records the copy on this stream: a freed staging buffer is reused only after it.
            copies = [_staged(host).to(self.device, non_blocking=True) for *_, host in entries]
            arrived = torch.cuda.Event()
            arrived.record(self.stream)
        self._entries[index] = entries
        self._incoming[index] = (copies, arrived)

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        self.prefetch(index, block)
        copies, arrived = self._incoming.pop(index)
        torch.cuda.current_stream(self.device).wait_event(arrived)
        for (owner, kind, name, _host), on_device in zip(self._entries[index], copies, strict=True):
            _set_tensor(owner, kind, name, on_device)

    def unload(self, index: int, block: nn.Module) -> None:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))  # after everything the caller did to the block
        self.stream.wait_event(done)
        homing = []
        with torch.cuda.stream(self.stream):
            for owner, kind, name, host in self._entries.pop(index):
                on_device = _get_tensor(owner, kind, name)  # the residual written on the GPU goes home
                staging = host if host.is_pinned() else torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
                staging.copy_(on_device, non_blocking=True)
                on_device.record_stream(self.stream)
                homing.append((host, staging))
                _set_tensor(owner, kind, name, host)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        self._land()  # the block before: its copies finished while this one computed
        self._homing = (index, copied, homing)

    def close(self) -> None:
        """Land the last copies home: the host weights are read (saved) next."""
        self.stream.synchronize()
        self._land()

    def _land(self) -> None:
        _, copied, homing = self._homing
        if copied is not None:
            copied.synchronize()
        for host, staging in homing:
            if staging is not host:
                host.copy_(staging)
        self._homing = (None, None, [])


def _staged(host: torch.Tensor) -> torch.Tensor:
    """`host` in pinned memory: itself if pinned, else a copy in a (reused) pinned buffer."""
    if host.is_pinned():
        return host
    return torch.empty(host.shape, dtype=host.dtype, pin_memory=True).copy_(host)


def _block_tensors(block: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    found = []
    for owner in block.modules():
        for kind, table in (("parameter", owner._parameters), ("buffer", owner._buffers)):
            for name, tensor in table.items():
                if tensor is not None:
                    found.append((owner, kind, name, tensor.data))
    return found


def _get_tensor(owner: nn.Module, kind: str, name: str) -> torch.Tensor:
    table: dict[str, Any] = owner._parameters if kind == "parameter" else owner._buffers
    return table[name].data


def _set_tensor(owner: nn.Module, kind: str, name: str, tensor: torch.Tensor) -> None:
    if kind == "parameter":
        parameter: Any = owner._parameters[name]
        parameter.data = tensor
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
