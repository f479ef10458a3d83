"""What one 7B decoder block's trip between CPU memory and a GPU costs, by route: the numbers for choosing how the
`--offload cpu` loader (lora_null_core.init.block_loaders.PrefetchToDevice) moves blocks.

    python benchmarks/speed/offload_copies.py            # prints JSON: seconds per block for each route

A Llama-2-7B block holds 202 M bf16 weights (405 MB). Routes timed, each averaged over several blocks:
- pin_fresh: `tensor.pin_memory()` of the block's tensors, every copy kept (page-locking new host memory, as
  pinning the model block by block does);
- pin_cached: the same, each copy dropped at once (torch's caching host allocator hands the same pages back);
- pageable_h2d / pageable_d2h: plain copies from and into ordinary (pageable) memory;
- pinned_h2d / pinned_d2h: asynchronous copies from and into pinned memory;
- stage_h2d: a host memcpy of the block into a pinned buffer allocated once, then the asynchronous copy.
"""

from __future__ import annotations

import json
import time

import torch

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # q k v o, gate up, down


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(repeats: int = 4) -> dict:
    host = [torch.randn(shape, dtype=torch.bfloat16) for shape in SHAPES]
    pinned = [t.pin_memory() for t in host]
    on_gpu = [t.cuda() for t in host]
    staging = [torch.empty_like(t).pin_memory() for t in host]

    def stage_h2d():
        for src, buf, dst in zip(host, staging, on_gpu, strict=True):
            buf.copy_(src)
            dst.copy_(buf, non_blocking=True)

    kept = []
    routes = {
        "pin_fresh": lambda: kept.append([t.pin_memory() for t in host]),
        "pin_cached": lambda: [t.pin_memory() for t in host],
        "pageable_h2d": lambda: [d.copy_(t) for d, t in zip(on_gpu, host, strict=True)],
        "pageable_d2h": lambda: [t.copy_(d) for d, t in zip(on_gpu, host, strict=True)],
        "pinned_h2d": lambda: [d.copy_(t, non_blocking=True) for d, t in zip(on_gpu, pinned, strict=True)],
        "pinned_d2h": lambda: [t.copy_(d, non_blocking=True) for d, t in zip(on_gpu, pinned, strict=True)],
        "stage_h2d": stage_h2d,
    }
    result = {name: round(timed(fn, repeats), 4) for name, fn in routes.items()}
    result["block_mb"] = round(sum(t.numel() * 2 for t in host) / 1e6, 1)
    result["device"] = torch.cuda.get_device_name()
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
