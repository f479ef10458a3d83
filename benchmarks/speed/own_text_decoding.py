"""Where the key alone's sampling time goes: own_samples on a model shape with random weights, per sample length,
each timed after one warm-up draw (the shape's tokenizer never samples EOS on purpose, so every sample runs its full
length, the worst case).

    python benchmarks/speed/own_text_decoding.py --shape llama2-7b --lengths 128,512 --output decoding.json
    python benchmarks/speed/own_text_decoding.py --shape llama2-7b --lengths 128 --decoders generate,graphed

`--decoders generate,graphed` times both of own_text's decoders (`generated_decoding`) in one call. Prints one JSON
row per decoder and length (seconds, milliseconds per decoding step, peak GPU memory) as it is measured, and writes
the rows so far after each. A static KV cache with compiled decoding (generate's `cache_implementation="static"`)
was measured too and dropped: 45.1 s against 9.4 s for 256 samples of 128 tokens on the Llama-2-7B shape,
compilation included (H100, 2026-12-06).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_speed import SHAPES, build_model, word_tokenizer  # noqa: E402

from lora_null_core import LoraNullConfig  # noqa: E402
from lora_null_core.calibration import graphed_decoding, own_text  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--output", type=Path, default=None, help="Also write the rows here (JSON).")
    parser.add_argument("--decoders", default="generate", help="Comma list of generated_decoding values.")
    parser.add_argument(
        "--profile", type=int, default=0, help="Also profile a draw of this many steps: its top CUDA and CPU ops."
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.shape, device.type, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = word_tokenizer(SHAPES[args.shape]["vocab_size"])
    rows = []
    # a replay that fixed a position or a mask at capture would be fast and wrong: checked once against eager decoding
    replay_gap = None
    if "graphed" in args.decoders.split(",") and graphed_decoding.supported():
        replay_gap = replay_vs_eager(model, tokenizer.bos_token_id)
    for decoder in args.decoders.split(","):
        for length in (int(n) for n in args.lengths.split(",")):
            config = LoraNullConfig(
                num_samples=args.samples, holdout_samples=0, generated_length=length, generated_decoding=decoder
            )
            draw = timed_draw(model, tokenizer, device)
            draw(config.replace(num_samples=8))  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            steps, extra = draw(config)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None
            rows.append(
                {
                    "shape": args.shape,
                    "decoder": decoder,
                    "samples": args.samples,
                    "length": length,
                    "steps": steps,
                    "seconds": round(seconds, 2),
                    "ms_per_step": round(1000 * seconds / max(steps, 1), 2),
                    **extra,
                    **({"replay_vs_eager": replay_gap} if decoder == "graphed" else {}),
                    "peak_gib": peak,
                    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "command": "python " + " ".join(sys.argv),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            if args.output:  # after each row: a call that runs out of time keeps what it measured
                args.output.write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    if args.profile:
        rows.append(profiled(model, tokenizer, device, args.samples, args.profile))
        print(json.dumps(rows[-1]), flush=True)
        if args.output:
            args.output.write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    return 0


def replay_vs_eager(model: Any, start_id: int, batch: int = 2, length: int = 16) -> float | None:
    """How far a replayed decoding differs from the eager one, greedy (top-p near 0) from the same start: the
    largest relative difference over every layer's cached keys and values (written at each step's position, from
    hidden states that went through each step's attention mask), so a position or mask the capture fixed shows even
    where the greedy tokens agree. None when the step could not be captured."""
    replayed, graphed, replay_cache = graphed_decoding.decode(model, batch, length, start_id, 1.0, 1e-9, True)
    if not graphed:
        return None
    eager, _, eager_cache = graphed_decoding.decode(model, batch, length, start_id, 1.0, 1e-9, False)
    if not torch.equal(replayed, eager):
        return float("inf")
    worst = 0.0
    for ours, theirs in zip(replay_cache.layers, eager_cache.layers, strict=True):
        for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            worst = max(worst, float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)))
    return worst


def timed_draw(model, tokenizer, device: torch.device):
    """A function drawing a config's samples as own_text does, returning (decoding steps: the longest sample, what
    else to record: how many distinct samples there are, which would drop if a replayed draw reused its noise)."""

    def draw(config: LoraNullConfig) -> tuple[int, dict]:
        samples = own_text.own_samples(model, tokenizer, config, device)
        distinct = len({tuple(generated) for _, generated in samples})
        return max(len(generated) for _, generated in samples), {"distinct_samples": distinct}

    return draw


def profiled(model, tokenizer, device: torch.device, samples: int, steps: int) -> dict:
    """Where a draw's time goes: the ops that take the most device and host time, and the wall time beside them."""
    from torch.profiler import ProfilerActivity, profile

    config = LoraNullConfig(num_samples=samples, holdout_samples=0, generated_length=steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        own_text.own_samples(model, tokenizer, config, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    averages = prof.key_averages()

    def top(key: str) -> list[dict]:
        ranked = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:15]
        return [{"op": e.key, "ms": round(getattr(e, key) / 1000, 1), "calls": e.count} for e in ranked]

    device_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {
        "profile_steps": steps,
        "samples": samples,
        "seconds_profiled": round(seconds, 2),
        "device_ms_total": round(sum(getattr(e, device_key) for e in averages) / 1000, 1),
        "top_device": top(device_key),
        "top_host": top("self_cpu_time_total"),
    }


if __name__ == "__main__":
    raise SystemExit(main())
