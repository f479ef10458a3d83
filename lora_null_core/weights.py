"""A base layer's weight, whatever holds it: a plain float parameter, bitsandbytes 4-bit or 8-bit storage (read
dequantized, one layer at a time, never the whole model), or a DeepSpeed ZeRO-3 partition (gathered while it is
read). No framework is imported unless a weight of its kind is found."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_BNB_PARAMS = ("Params4bit", "Int8Params")


def is_quantized(weight: torch.Tensor) -> bool:
    """Stored in a format the init cannot write a residual into (bitsandbytes, or any non-float storage)."""
    return type(weight).__name__ in _BNB_PARAMS or weight.dtype not in FLOAT_DTYPES


def weight_of(module: nn.Module) -> torch.Tensor:
    """A layer's `weight` parameter (nn.Module's attribute lookup types it as a tensor or a module)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is a {type(weight).__name__}, not a tensor.")
    return weight


def float_weight(base_layer: nn.Module, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The weight as a float (d_out, d_in) matrix: the parameter itself (a view, writable) when it is stored in
    float, else a dequantized copy of this one layer (bitsandbytes' own dequantization)."""
    weight = weight_of(base_layer)
    if is_quantized(weight):
        weight = _dequantized(base_layer)
    return weight.T if fan_in_fan_out else weight


def _dequantized(base_layer: nn.Module) -> torch.Tensor:
    """bitsandbytes' own dequantization, leaving the layer's state as it was (PEFT's helper rewrites an 8-bit
    layer's state on the CPU, after which it no longer runs)."""
    weight: Any = weight_of(base_layer)  # a bitsandbytes parameter: its quantization state rides on it
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes as bnb

        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            return _dequantized_cpu_packed(weight.data, weight.quant_state)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "Int8Params":
        layer: Any = base_layer
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return weight.data.float() * (scales.float().view(-1, 1) / 127.0)
    if weight.dtype.is_floating_point:  # float8 and other float storage
        return weight
    raise TypeError(f"{type(base_layer).__name__}: no float reading of its {weight.dtype} weight is known.")


def _dequantized_cpu_packed(packed: torch.Tensor, state: Any, block_n: int = 32) -> torch.Tensor:
    """A 4-bit weight bitsandbytes repacked for the CPU: on a CPU with AVX512-BF16 its first inference forward
    interleaves the codes by `block_n` output rows and keeps absmax in bfloat16, transposed, and from then on
    `dequantize_4bit` reads the codes in the old order (relative error 1.5 measured). Read the codes back in the
    layout `bitsandbytes.functional._convert_weight_packed_for_cpu` writes (without touching the layer), then
    code × absmax: the weight that layer's forward now computes with."""
    rows, half = packed.shape
    pairs = packed.reshape(-1, 32)  # runs of 32 bytes: 32 codes in the low nibbles, then 32 in the high ones
    codes = torch.cat([pairs & 0xF, pairs >> 4], dim=-1)
    codes = codes.reshape(rows // block_n, half, block_n, 2).transpose(1, 2).reshape(rows, 2 * half)
    absmax = state.absmax.float().T  # (rows, columns / blocksize)
    scales = absmax.repeat_interleave(state.blocksize, dim=1)
    return state.code.float()[codes.long()] * scales


@contextlib.contextmanager
def no_cpu_repacking(model: nn.Module) -> Iterator[None]:
    """Keep bitsandbytes from repacking 4-bit weights for the CPU while lora-null runs the model. On a CPU with
    AVX512-BF16 a 4-bit layer's first inference forward repacks its weight, and the repacked forward has no backward:
    a QLoRA run trained afterwards passes no gradient through the base layers (measured: the input's gradient None,
    torch warning of silently incorrect results). Layers repacked before are left as they are."""
    modules = model.modules() if isinstance(model, nn.Module) else ()  # a framework's wrapper may be no module
    layers: list[Any] = [m for m in modules if getattr(m, "support_avx512bf16_for_cpu", None)]
    saved = [layer.support_avx512bf16_for_cpu for layer in layers]  # bitsandbytes sets it to 1 or 0
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for layer, value in zip(layers, saved, strict=True):
            layer.support_avx512bf16_for_cpu = value


def is_zero3_partitioned(params: Iterable[torch.Tensor]) -> bool:
    """Parameters that DeepSpeed ZeRO-3 has split over the ranks (each holds a slice, the module an empty tensor)."""
    return any(hasattr(p, "ds_id") for p in params)


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """The full parameters for the duration, on every rank, when ZeRO-3 partitions them (one module or block at a
    time, so no rank ever holds the whole model); nothing to do otherwise. With `modify`, what is written into them
    inside is kept: rank 0's values are partitioned again on the way out (every rank writes the same ones).
    Parameters already gathered by an outer `gathered` are left to it (DeepSpeed's own context does not nest)."""
    params = [p for p in params if hasattr(p, "ds_id") and _status(p) != "AVAILABLE"]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def _status(param: Any) -> str:
    """A ZeRO-3 parameter's gathering state (AVAILABLE: gathered)."""
    return getattr(param.ds_status, "name", "")
