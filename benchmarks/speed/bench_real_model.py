"""Time `lora_null_init` on a real small model with many short calibration prompts (what users calibrate with).

    python benchmarks/speed/bench_real_model.py --model SmolLM2-135M-Instruct.Q4_1.gguf --questions 2048 \
        --name smollm2-135m-2048q --label after

The model is a local folder or a .gguf file (dequantized once into --cache); the prompts are the first N
BIG-bench qa_wikidata questions shipped in benchmarks/data. r = 16 on all 7 linear layer types. The timed span
is the init alone (tokenizing, calibration, solving, writing, the function check), after one warm-up run on 64
questions; the model is loaded before. Rows go to the results JSON with the label, so a run of the code before a
change and one after, on the same machine in the same call, give the ratio. `--batch-size 8` reproduces the
old default batching (8 rows per forward pass) on the new code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig

DATA = Path(__file__).resolve().parents[1] / "data" / "bigbench_qa_wikidata" / "task.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Local model folder or .gguf file.")
    parser.add_argument("--name", required=True, help="The shape name written in the row, e.g. smollm2-135m-2048q.")
    parser.add_argument("--questions", type=int, default=2048)
    parser.add_argument("--label", default="", help="Which code ran (e.g. before / after), written in the row.")
    parser.add_argument("--batch-size", type=int, default=None, help="Pass batch_size (default: the config's).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs; the row keeps the fastest and all.")
    parser.add_argument("--cache", default=".cache/lora-null-bench")
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args(argv)

    from bench_speed import TARGETS  # this script's folder: the same seven layer types as the shapes

    import lora_null_core
    from lora_null_core import LoraNullConfig, lora_null_init
    from lora_null_core.io.saving import load_model, load_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "forgetting"))
    from lora_null_bench.suites import _local_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = _local_model(args.model, Path(args.cache))
    tokenizer = load_tokenizer(str(folder))
    questions = [e["input"] for e in json.loads(DATA.read_text())["examples"][: args.questions]]
    extra = {"batch_size": args.batch_size} if args.batch_size else {}
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS)
    seconds, peaks = [], []
    for repeat in range(args.repeats + 1):  # the first run warms up kernels and the allocator
        texts = questions[:64] if repeat == 0 else questions
        warmup = {"min_tokens_per_dim": 0} if repeat == 0 else {}  # 64 short prompts: too few tokens to check
        config = LoraNullConfig(num_samples=len(texts), holdout_samples=0, **extra, **warmup)
        model = load_model(str(folder), dtype="bfloat16" if device == "cuda" else "float32").to(device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        lora_null_init(model, lora, texts, tokenizer, config)
        if device == "cuda":
            torch.cuda.synchronize()
        if repeat:
            seconds.append(time.perf_counter() - start)
            peaks.append(torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
        del model
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    row = {
        "shape": args.name,
        "method": "lora_null",
        "solver": "auto",
        "gpus": 1,
        "device": device_name,
        "seconds": round(min(seconds), 2),
        "seconds_all": [round(s, 2) for s in seconds],
        "peak_gpu_gib": round(min(p for p in peaks), 2) if peaks[0] is not None else None,
        "calibration": f"{len(questions)} qa_wikidata questions",
        "rank": 16,
        "note": f"{args.label}: lora_null_core {Path(lora_null_core.__file__).parent}; "
        f"{', '.join(f'{k}={v}' for k, v in extra.items()) or 'default batching'}",
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(row))
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {"runs": []}
    existing["runs"].append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(existing, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
