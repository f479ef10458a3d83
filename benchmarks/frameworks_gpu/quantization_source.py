"""Does a 4-bit base depend on the dtype its weights had when they were quantized? Loads one float32 checkpoint in nf4
(bf16 compute, double quantization) twice: cast to bf16 first (what `run.py`'s standard reload did) and kept in
float32 (what LLaMA-Factory does with `torch_dtype: auto`), and compares the 4-bit codes, one dequantized weight and
the logits of two sentences under bf16 autocast. Runs on the CPU (bitsandbytes >= 0.49) or a GPU.

    python benchmarks/frameworks_gpu/quantization_source.py --model FOLDER_OR_GGUF
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

SENTENCES = [
    "The capital of France is Paris, and the river that runs through it is the Seine.",
    "def add(a, b):\n    return a + b  # the sum of two numbers",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A float32 model folder, or a GGUF file (dequantized first).")
    parser.add_argument("--cache", default="/tmp/quantization_source", help="Where a GGUF is dequantized to.")
    args = parser.parse_args(argv)
    import bitsandbytes.functional as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    folder = args.model
    if folder.endswith(".gguf"):
        sys.path.insert(0, str(Path(__file__).parents[1] / "forgetting"))
        from lora_null_bench.suites import _local_model

        folder = str(_local_model(folder, Path(args.cache)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True).to(device)

    def load(dtype: torch.dtype):
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, quantization_config=quantization, device_map={"": device}
        )

    def logits(model) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            return model(**batch).logits.float()

    from_bf16, from_float32 = load(torch.bfloat16), load(torch.float32)
    a = from_bf16.get_submodule("model.layers.0.self_attn.q_proj").weight
    b = from_float32.get_submodule("model.layers.0.self_attn.q_proj").weight
    wa, wb = (bnb.dequantize_4bit(w.data, w.quant_state).float() for w in (a, b))
    la, lb, again = logits(from_bf16), logits(from_float32), logits(load(torch.float32))
    row = {
        "model": folder,
        "codes_differing": float((a.data != b.data).float().mean()),
        "q_proj_0_rel_diff": float((wa - wb).norm() / wb.norm()),
        "logits_rel_err": float((la - lb).norm() / lb.norm()),
        "logits_rel_err_same_source_twice": float((again - lb).norm() / lb.norm()),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
