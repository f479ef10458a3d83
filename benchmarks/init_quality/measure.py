"""Function preservation and leakage right after init, per architecture, on tiny random models (CPU).

    python benchmarks/init_quality/measure.py

Prints one row per architecture: the relative logit error of the initialized model against the original
(float32), and the mean leakage of lora_A on calibration and on held-out activations next to a random A of
the same norm (≈ 1). The same settings as tests/test_initialize.py.
"""

import logging

import torch
from peft import LoraConfig

from lora_null_core import lora_null_init
from lora_null_core.frontends.toy_world import (
    ARCHITECTURES,
    arithmetic_texts,
    knowledge_texts,
    tiny_model,
    tiny_tokenizer,
)


def main() -> None:
    logging.disable(logging.INFO)
    knowledge = knowledge_texts(240, seed=0)
    tokenizer = tiny_tokenizer(knowledge + arithmetic_texts(64, seed=1))
    probe = tokenizer(knowledge[200:204], return_tensors="pt", padding=True)
    print("| architecture | logit error after init | leakage (calib.) | random A | leakage (held-out) | random A |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for architecture in ARCHITECTURES:
        model = tiny_model(architecture, len(tokenizer), seed=0)
        with torch.no_grad():
            before = model(**probe).logits
        peft_model = lora_null_init(
            model,
            LoraConfig(r=4, lora_alpha=8),
            knowledge[:200],
            tokenizer,
            num_samples=160,
            holdout_samples=40,
            batch_size=16,
        ).eval()
        with torch.no_grad():
            after = peft_model(**probe).logits
        error = float((after - before).norm() / before.norm())
        s = peft_model.lora_null_report.summary()
        print(
            f"| {architecture} | {error:.1e} | {s['leakage_mean']:.3f} | {s['leakage_random_mean']:.3f} | "
            f"{s['leakage_holdout_mean']:.3f} | {s['leakage_holdout_random_mean']:.3f} |"
        )


if __name__ == "__main__":
    main()
