"""Which of the model's own texts makes the best knowledge source? A sampling sweep scored without training.

    PYTHONPATH=.:benchmarks/forgetting python benchmarks/init_quality/own_text_sweep.py --model SmolLM2.gguf

For each sampling setting (start, length, temperature, top-p, sample count) the default init is built from the
model's own text alone, and its lora_A is scored by its energy (leakage², random A ≈ 1) on the frontier's
held-out qa_wikidata facts, which the samples never saw (lower keeps more), and on each frontier task's training
examples (higher leaves more room to learn). The same init calibrated on the frontier's 256 knowledge questions
is the reference row. The frontier then trains the settings worth training.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from lora_null_bench.energies import energies
from lora_null_bench.inits import lora_config
from lora_null_bench.suites import file_suite, read_examples

from lora_null_core import LoraNullConfig, lora_null_init
from lora_null_core.errors import LoraNullError
from lora_null_core.io.saving import default_device

DATA = Path(__file__).resolve().parents[1] / "data"
TASKS = ("addition", "word_reversal")
SETTINGS = {  # name → LoraNullConfig overrides of the defaults (from BOS, 128 tokens, T 1.3, top-p 0.95, 256; the
    # rows of own_text_sweep.json before 2026-12-06 ran at T 1, the default then)
    "bos": {},
    "chat": {"generated_prompt": "chat"},
    "bos_len64": {"generated_length": 64},
    "bos_len256": {"generated_length": 256},
    "chat_len256": {"generated_prompt": "chat", "generated_length": 256},
    "bos_t0.7": {"generated_temperature": 0.7},
    "bos_t1.3": {"generated_temperature": 1.3},
    "bos_top_p1": {"generated_top_p": 1.0},
    "bos_n64": {"num_samples": 64},
    "bos_n1024": {"num_samples": 1024},
    # #49: knowledge is read from short questions, all of whose tokens sit near the start of a text, where a
    # model's activations differ most; 128-token samples give those positions a tenth of the covariance
    "bos_len16_n2048": {"generated_length": 16, "num_samples": 2048},
    "bos_len32_n1024": {"generated_length": 32, "num_samples": 1024},
    "bos_len8_n4096": {"generated_length": 8, "num_samples": 4096},
    "bos_len16_n4096": {"generated_length": 16, "num_samples": 4096},
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A local model folder or .gguf file.")
    parser.add_argument("--name", default=None)
    parser.add_argument("--settings", default=",".join(["questions", *SETTINGS]))
    parser.add_argument("--cache", default=".cache/lora-null-bench")
    parser.add_argument("--output", default="runs/own_text_sweep.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = default_device()
    suite = file_suite(
        args.model,
        DATA / "bigbench_qa_wikidata" / "task.json",
        DATA / "tasks" / "addition.train.jsonl",
        DATA / "tasks" / "addition.eval.jsonl",
        "gpu",
        Path(args.cache),
        device,
        name=args.name,
    )
    texts = {"knowledge": [e.text for e in suite.knowledge]}
    for task in TASKS:
        rows = read_examples(
            DATA / "tasks" / f"{task}.train.jsonl",
            ("prompt", "question"),
            ("answer", "target"),
            prompt_format="Question: {}\nAnswer:",
        )
        texts[task] = [e.prompt + suite.separator + e.targets[0] for e in rows]
    output, rows = Path(args.output), []
    for setting in args.settings.split(","):
        start = time.perf_counter()
        model = suite.load_base()
        calibration = [e.text for e in suite.calibration] if setting == "questions" else None
        config = LoraNullConfig(seed=0, **SETTINGS.get(setting, {}))
        try:
            peft_model = lora_null_init(model, lora_config(suite, model), calibration, suite.tokenizer, config)
        except LoraNullError as err:  # e.g. chat prompts on a base model without a chat template
            rows.append(
                {"model": suite.model, "setting": setting, "overrides": SETTINGS.get(setting, {}), "error": str(err)}
            )
            print(f"{setting:12s} {err}", flush=True)
            continue
        measured = energies(peft_model, suite.tokenizer, texts)
        rows.append(
            {
                "model": suite.model,
                "setting": setting,
                "overrides": SETTINGS.get(setting, {}),
                "calibration": peft_model.lora_null_report.calibration,
                **measured,
                "seconds": round(time.perf_counter() - start, 1),
                "device": _device_name(device),
            }
        )
        print(
            f"{setting:12s} knowledge {measured['energy_knowledge']:.4f}  "
            + "  ".join(f"{t} {measured['energy_' + t]:.3f}" for t in TASKS),
            flush=True,
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"runs": rows}, indent=1) + "\n")
        del model, peft_model


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu"


if __name__ == "__main__":
    main()
