"""QLoRA with the key alone, end to end on one GPU (#50): `adapter_init: lora_null` with no other key, through the
PEFT entry (`initialize_lora_null_weights` with no calibration text), on a Llama shape whose nf4 weights are drawn
one linear layer at a time on the device, so the bf16 weights of a 70B never exist whole.

    python benchmarks/speed/qlora_key_alone.py --shape llama2-70b

Every block runs (nothing extrapolated): the model samples its own text, calibrates, solves and writes the adapter,
which is then saved. The row (method lora_null_self_nf4) goes to benchmarks/results/speed.json with the seconds
before the first block (own-text sampling and setup), each phase's, the peak GPU memory and the build's time, which
is not counted. Random weights stand in for the real model: the init's cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from lora_null_core import LoraNullConfig, initialize_lora_null_weights

sys.path.insert(0, str(Path(__file__).parent))
from bench_speed import SHAPES, TARGETS, gpu_sync, peak_gib, reset_peak, word_tokenizer  # noqa: E402


def build_nf4_model(shape: str, device: str, compute_dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A Llama of `shape` with N(0, 0.02) weights, every decoder linear layer nf4: each drawn in `compute_dtype` on
    `device` and quantized at once (one layer's float weight alive at a time); embeddings, norms and the head in
    `compute_dtype`. Marked as loaded in 4 bits, so PEFT wraps the layers as QLoRA does."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(compute_dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    blocks = model.model.layers
    model.model.layers = torch.nn.ModuleList()
    model.to_empty(device=device)
    _draw(model, generator)
    for block in blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, torch.nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, _nf4_linear(bnb, module, device, generator, compute_dtype))
            else:  # the norms: their own parameters only, never a linear layer's float weight
                module.to_empty(device=device, recurse=False)
        _draw(block, generator)
    model.model.layers = blocks
    with torch.device(device):  # its inv_freq buffer is computed at construction, so not from meta
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model.is_loaded_in_4bit = True
    return model.eval()


def _nf4_linear(bnb, linear: torch.nn.Linear, device: str, generator: torch.Generator, dtype: torch.dtype):
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=False, compute_dtype=dtype, quant_type="nf4", device="meta"
    )
    weight = torch.empty(linear.out_features, linear.in_features, device=device, dtype=dtype)
    weight.normal_(0.0, 0.02, generator=generator)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4").to(device)
    return layer


def _draw(module: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.device.type == "meta" or param.dtype == torch.uint8:  # nf4 storage: drawn when it was made
                continue
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--samples", type=int, default=None, help="Own-text samples (default: the config's).")
    parser.add_argument("--length", type=int, default=None, help="Tokens per sample (default: the config's).")
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    parser.add_argument("--command", default=None, help="The command line to record (default: this one).")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"

    reset_peak()
    started = time.perf_counter()
    model = build_nf4_model(args.shape, device, dtype)
    gpu_sync()
    build_seconds = time.perf_counter() - started
    built_gib = peak_gib()
    tokenizer = word_tokenizer(SHAPES[args.shape]["vocab_size"])
    given = {"num_samples": args.samples, "generated_length": args.length}
    config = LoraNullConfig(**{k: v for k, v in given.items() if v is not None})  # the key alone: every default
    phases = PhaseTimer()

    from lora_null_core.init import phases as init_phases

    reset_peak()
    gpu_sync()
    start = time.perf_counter()
    with init_phases.observing(phases):
        peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
        initialize_lora_null_weights(peft_model, tokenizer=tokenizer, config=config)
        with tempfile.TemporaryDirectory() as folder:
            peft_model.save_pretrained(folder)
            saved = sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))
    gpu_sync()
    seconds = time.perf_counter() - start
    report = peft_model.lora_null_report
    row = {
        "shape": args.shape,
        "method": "lora_null_self_nf4",
        "solver": config.solver,
        "gpus": 1,
        "device": device_name,
        "seconds": round(seconds, 2),
        "peak_gpu_gib": round(max(peak_gib(), phases.peak), 2) if device == "cuda" else None,
        "calibration": f"{config.num_samples}x{config.generated_length} own text",
        "rank": args.rank,
        "command": args.command or "python " + " ".join(sys.argv),
        "blocks_timed": SHAPES[args.shape]["num_hidden_layers"],
        "seconds_before_first_block": round(phases.first - start, 2) if phases.first else None,
        "phases": {name: round(value, 2) for name, value in phases.seconds.items()},
        "build_seconds": round(build_seconds, 1),
        "built_gpu_gib": round(built_gib, 2) if device == "cuda" else None,
        "adapter_mib": round(saved / 2**20, 1),
        "function_error": report.function_error,
        "calibration_used": report.calibration.get("used"),
        "note": "every block run; nf4 weights drawn one layer at a time on the device; the build is not counted",
    }
    print(json.dumps(row, indent=1))
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {"runs": []}
    existing["runs"].append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    staging.write_text(json.dumps(existing, indent=1) + "\n")
    staging.replace(out)
    return 0


class PhaseTimer:
    """Seconds per phase of the init (lora_null_core.init.phases), when the first one began, and the peak GPU memory
    seen at the phases' ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.first: float | None = None
        self.peak = 0.0

    def begin(self, name: str) -> None:
        gpu_sync()
        self._began = time.perf_counter()
        self.first = self.first or self._began

    def end(self, name: str) -> None:
        gpu_sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._began
        if torch.cuda.is_available():
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() / 2**30)


if __name__ == "__main__":
    sys.exit(main())
