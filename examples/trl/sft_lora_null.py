"""A plain TRL SFT script switched to LoRA-Null by its import line (see the comment) and two config keys.

    python examples/trl/sft_lora_null.py --model Qwen/Qwen2.5-0.5B --dataset trl-lib/Capybara \
        --calibration questions.jsonl --output Qwen2.5-0.5B-SFT-LoRA-Null
Runs under `accelerate launch` / `torchrun` unchanged.
"""

import argparse

from datasets import load_dataset

# Before: from trl import SFTConfig, SFTTrainer
from lora_null_trl import LoraNullSFTConfig as SFTConfig
from lora_null_trl import LoraNullSFTTrainer as SFTTrainer
from peft import LoraConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B")
    parser.add_argument("--dataset", default="trl-lib/Capybara")
    parser.add_argument("--calibration", required=True, help="Knowledge text to preserve (jsonl with a 'text' field).")
    parser.add_argument("--output", default="sft-lora-null")
    parser.add_argument("--max-steps", type=int, default=-1)
    args = parser.parse_args()

    trainer = SFTTrainer(
        model=args.model,
        train_dataset=load_dataset(args.dataset, split="train"),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        args=SFTConfig(
            output_dir=args.output,
            max_steps=args.max_steps,
            adapter_init="lora_null",  # the two LoRA-Null keys
            lora_null_calibration=args.calibration,
        ),
    )
    trainer.train()
    trainer.save_model()  # a standard LoRA for the original model (v1: the exact export, made in place)


if __name__ == "__main__":
    main()
