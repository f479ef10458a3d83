"""Where the GPU spends a LoRA-Null init, kernel by kernel: one warm-up init, then one under torch's profiler, on a
model shape with random weights. The phase profile (`bench_speed.py --methods profile`) says which phase takes the
time; this says whether the GPU is busy meanwhile: the kernels' summed time against the wall time (the solves run on
a second stream, so the sum can exceed the wall), and the kernels and host calls that take the most.

    python benchmarks/speed/trace_init.py --shape llama2-7b --output trace.json

Writes one JSON row (`--output`) and prints it. The profiler adds host time to every launch, so the wall time here
is not a speed figure: compare the kernels' time with the wall only within one row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).parent))
from bench_speed import SHAPES, TARGETS, build_model, random_texts, word_tokenizer  # noqa: E402

from lora_null_core import LoraNullConfig, lora_null_init  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--top", type=int, default=20, help="How many kernels and host calls to list.")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tokenizer = word_tokenizer(SHAPES[args.shape]["vocab_size"])
    texts = random_texts(args.num_samples, args.seq_len, SHAPES[args.shape]["vocab_size"])
    config = LoraNullConfig(num_samples=args.num_samples, holdout_samples=0, max_length=args.seq_len, streaming="on")
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)

    def model():
        return build_model(args.shape, device, torch.bfloat16 if cuda else torch.float32)

    def init(built) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        lora_null_init(built, lora, texts, tokenizer, config, execution_device=device)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warm = init(model())
    built = model()  # built before tracing: only the init is traced
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        traced = init(built)
    events = prof.key_averages()
    device_key = "self_device_time_total" if cuda else "self_cpu_time_total"

    def top(key: str) -> list[dict]:
        ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[: args.top]
        return [{"op": e.key, "ms": round(getattr(e, key) / 1000, 1), "calls": e.count} for e in ranked]

    row = {
        "shape": args.shape,
        "calibration": f"{args.num_samples}x{args.seq_len}",
        "rank": args.rank,
        "seconds_warm_up": round(warm, 2),
        "seconds_traced": round(traced, 2),
        "kernel_seconds": round(sum(getattr(e, device_key) for e in events) / 1e6, 2),
        "top_kernels": top(device_key),
        "top_host": top("self_cpu_time_total"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(row), flush=True)
    if args.output:
        args.output.write_text(json.dumps({"runs": [row]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
