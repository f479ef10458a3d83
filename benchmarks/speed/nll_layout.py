"""Per-token cross-entropy over a model's logits in the two layouts the forgetting meter has used: the transposed
(rows, vocabulary, positions) view it scored before, and the flattened (positions, vocabulary) rows it scores now
(`lora_null_core/meter/scoring._nll`). Prints one JSON line: the mean seconds of each and their ratio.

    python benchmarks/speed/nll_layout.py --rows 4 --positions 128 --vocabulary 49152 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--positions", type=int, default=128)
    parser.add_argument("--vocabulary", type=int, default=49152, help="SmolLM2's; Qwen2.5's is 151,936.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.positions, args.vocabulary, device=args.device)
    targets = torch.randint(0, args.vocabulary, (args.rows, args.positions), device=args.device)
    layouts = {
        "transposed": lambda: F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"),
        "flattened": lambda: F.cross_entropy(
            logits.reshape(-1, args.vocabulary), targets.reshape(-1), reduction="none"
        ).view(targets.shape),
    }
    seconds = {}
    for name, score in layouts.items():
        score()  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.repeats):
            score()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds[name] = (time.perf_counter() - started) / args.repeats
    gap = float((layouts["transposed"]() - layouts["flattened"]()).abs().max())
    print(json.dumps({**vars(args), **seconds, "ratio": seconds["transposed"] / seconds["flattened"], "max_diff": gap}))


if __name__ == "__main__":
    main()
