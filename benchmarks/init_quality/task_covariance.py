"""How far from positive semi-definite a real model's task covariance comes out, and whether the task-aware solve
gets through it: the frameworks' setting (bf16 weights, the frontier's addition training set as task data, the
knowledge questions, with the held-out probes for a wide model, as knowledge).

    PYTHONPATH=.:benchmarks/forgetting python benchmarks/init_quality/task_covariance.py --model qwen.gguf \
        --with-heldout --output runs/task_covariance.json

Covariances summed in float32 from bf16 activations carry rounding, and a model whose few massive channels hold
most of the trace (Qwen2.5) shows it as negative eigenvalues larger than task_mix in the unit-trace scale the solve
works in: a Cholesky factor of C_t + task_mix·I then fails (it stopped TRL's and Axolotl's Qwen2.5 rows on a GPU,
2026-12-05). For each task-aware solve this records the smallest eigenvalue of the unit-trace task covariance and
whether the plain factor fails (so the repair in null_space._cholesky_of_shifted ran); then whether the init
completed, and its function error.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from lora_null_bench.inits import lora_config
from lora_null_bench.suites import file_suite
from transformers import AutoModelForCausalLM

from lora_null_core import LoraNullConfig, lora_null_init, null_space
from lora_null_core.io.saving import default_device

DATA = Path(__file__).resolve().parents[1] / "data"


def watch_task_solves(records: list[dict]):
    """Wrap the factorization the task-aware solve uses; each call appends what it met to `records`."""
    factor = null_space._cholesky_of_shifted

    def watched(covariance: torch.Tensor, shift: float, eye: torch.Tensor) -> torch.Tensor:
        smallest = float(torch.linalg.eigvalsh(covariance)[0])
        plain_fails = int(torch.linalg.cholesky_ex(covariance + shift * eye)[1]) > 0
        records.append(
            {
                "d_in": covariance.shape[0],
                "smallest_eigenvalue": smallest,
                "task_mix": shift,
                "plain_cholesky_fails": plain_fails,
            }
        )
        return factor(covariance, shift, eye)

    null_space._cholesky_of_shifted = watched


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A local model folder or .gguf file.")
    parser.add_argument("--name", default=None)
    parser.add_argument(
        "--with-heldout",
        action="store_true",
        help="Add the 500 held-out probes to the knowledge text (a model wider than 256 questions).",
    )
    parser.add_argument("--cache", default=".cache/lora-null-bench")
    parser.add_argument("--output", default="runs/task_covariance.json")
    args = parser.parse_args(argv)
    device = default_device()
    tasks = DATA / "tasks"
    suite = file_suite(
        args.model,
        DATA / "bigbench_qa_wikidata" / "task.json",
        tasks / "addition.train.jsonl",
        tasks / "addition.eval.jsonl",
        "gpu",
        Path(args.cache),
        device,
        name=args.name,
    )
    folder = next(Path(args.cache).glob("*-dequantized")) if str(args.model).endswith(".gguf") else args.model
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
    knowledge = [e.text for e in suite.calibration] + (suite.heldout_text if args.with_heldout else [])
    records: list[dict] = []
    watch_task_solves(records)
    start, row = time.perf_counter(), {"model": suite.model, "device": _device_name(device), "dtype": "bfloat16"}
    try:
        peft_model = lora_null_init(
            model,
            lora_config(suite, model),
            knowledge,
            suite.tokenizer,
            LoraNullConfig(num_samples=len(knowledge) - 32),
            task_data=suite.task_texts(),
        )
        row.update(completed=True, function_error=peft_model.lora_null_report.function_error)
    except Exception as err:  # the finding is that it stopped, and where
        row.update(completed=False, error=f"{type(err).__name__}: {err}")
    row.update(
        seconds=round(time.perf_counter() - start, 1),
        task_solves=len(records),
        plain_cholesky_fails=sum(r["plain_cholesky_fails"] for r in records),
        smallest_eigenvalue=min((r["smallest_eigenvalue"] for r in records), default=None),
        solves=records,
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"runs": [row]}, indent=1) + "\n")
    print({k: v for k, v in row.items() if k != "solves"}, flush=True)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if str(device).startswith("cuda") else "cpu"


if __name__ == "__main__":
    main()
