"""`lora-null demo`: the whole workflow on a tiny local model, in about a minute on a CPU.

It builds a tiny Llama and a tokenizer, writes a 'knowledge' calibration set and an arithmetic task, runs
`init` (v2), trains a few steps on the task, exports for the original base and checks the export is exact.
For contrast it trains plain LoRA the same way and compares how much each moved the model's outputs on
held-out knowledge text. The model is random, so this shows the mechanism, not a benchmark result.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ..atomic import check_output
from ..calibration.batches import TokenBatch, tokenize_batches
from ..config import LoraNullConfig
from ..console import quiet_libraries
from ..io.export import export_for_original_base
from ..io.saving import load_initialized, load_model
from .jobs import init_to_folder
from .toy_world import arithmetic_texts, knowledge_texts, tiny_model, tiny_tokenizer, write_jsonl

logger = logging.getLogger(__name__)


def run_demo(output: Path, steps: int = 40, rank: int = 8, overwrite: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the demo into `output`; return the numbers it printed."""
    output = check_output(output, overwrite=overwrite)
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    with quiet_libraries():
        return {**_demo(output.resolve(), steps, rank, seed), "folder": str(output)}


def _demo(work: Path, steps: int, rank: int, seed: int) -> dict[str, Any]:
    knowledge, task = knowledge_texts(400, seed), arithmetic_texts(200, seed + 1)
    tokenizer = tiny_tokenizer(knowledge + task)
    model = tiny_model("llama", len(tokenizer), seed=seed, hidden=128, layers=4)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    write_jsonl(work / "calibration.jsonl", knowledge[:320])
    write_jsonl(work / "task.jsonl", task)
    heldout = tokenize_batches(knowledge[320:], tokenizer, 64, 40)
    task_batches = tokenize_batches(task, tokenizer, 64, 20)

    lora_config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    report = init_to_folder(
        str(work / "model"),
        str(work / "calibration.jsonl"),
        work / "init",
        lora_config,
        LoraNullConfig(variant="v2", num_samples=256, holdout_samples=64, batch_size=32, seed=seed),
        dtype="float32",
        device="cpu",
    )
    original = load_model(str(work / "model"), dtype="float32")
    before = _logits(original, heldout)
    _inspect_report(original, tokenizer, knowledge[320:], work)

    trained = load_initialized(work / "init", dtype="float32")
    a_before = {n: p.detach().clone() for n, p in trained.named_parameters() if "lora_A" in n}
    _train(trained, task_batches, steps, seed)
    trained.save_pretrained(str(work / "trained"))
    a_unchanged = all(torch.equal(p, a_before[n]) for n, p in trained.named_parameters() if "lora_A" in n)

    export_for_original_base(work / "init", work / "trained", work / "export")
    exported = PeftModel.from_pretrained(load_model(str(work / "model"), dtype="float32"), str(work / "export"))
    export_error = max(_relative(_logits(exported, b), _logits(trained, b)) for b in (heldout[0], task_batches[0]))

    plain = get_peft_model(load_model(str(work / "model"), dtype="float32"), lora_config)
    _train(plain, task_batches, steps, seed)
    summary = report.summary()
    return {
        "function_error_after_init": summary["function_error"],
        "leakage_heldout": summary["leakage_holdout_mean"],
        "leakage_heldout_random_a": summary["leakage_holdout_random_mean"],
        "lora_a_unchanged_by_training": a_unchanged,
        "export_error": export_error,
        "task_loss_lora_null_v2": _loss(trained, task_batches),
        "task_loss_plain_lora": _loss(plain, task_batches),
        "knowledge_output_change_lora_null_v2": _relative(_logits(trained, heldout), before),
        "knowledge_output_change_plain_lora": _relative(_logits(plain, heldout), before),
    }


def _inspect_report(model, tokenizer, heldout_texts, work: Path) -> None:
    """The `lora-null inspect` report of the demo's init, on held-out knowledge text (skipped without matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.info("matplotlib not installed: no inspect report (pip install 'lora-null[inspect]').")
        return
    from .inspection import analyze, write_report

    config = LoraNullConfig(num_samples=len(heldout_texts), holdout_samples=0, batch_size=40)
    data = analyze(model, tokenizer, heldout_texts, config, work / "init")
    write_report(data, work / "report")


def _train(model: torch.nn.Module, batches: list[TokenBatch], steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for step in range(steps):
        batch = batches[step % len(batches)]
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _logits(model: torch.nn.Module, batches) -> torch.Tensor:
    batches = batches if isinstance(batches, list) else [batches]
    with torch.no_grad():
        return torch.cat(
            [
                model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[b.attention_mask.bool()]
                for b in batches
            ]
        )


def _loss(model: torch.nn.Module, batches: list[TokenBatch]) -> float:
    with torch.no_grad():
        losses = [
            model(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                labels=b.input_ids.masked_fill(b.attention_mask == 0, -100),
            ).loss
            for b in batches
        ]
    return float(torch.stack(losses).mean())


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())
