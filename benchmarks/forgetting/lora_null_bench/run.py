"""Run the forgetting benchmark: knowledge and task before, then for each seed and init: init, fine-tune, measure."""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lora_null_core.calibration.batches import tokenize_batches
from lora_null_core.calibration.leakage import holdout_leakage
from lora_null_core.init.peft_layers import lora_layers

from .evaluate import accuracy, perplexity
from .inits import build_adapter
from .suites import Suite
from .train import fine_tune

logger = logging.getLogger(__name__)


def measure(model: torch.nn.Module, suite: Suite) -> dict[str, Any]:
    """Closed-book knowledge accuracy (with per-item hits), held-out perplexity and downstream accuracy."""
    knowledge, hits = accuracy(model, suite.tokenizer, suite.knowledge, suite.knowledge_tokens, suite.eval_batch)
    downstream, _ = accuracy(
        model, suite.tokenizer, suite.task_eval, suite.task_tokens, suite.eval_batch, match=suite.task_match
    )
    ppl = perplexity(model, suite.tokenizer, suite.heldout_text, suite.eval_batch, suite.train.max_length)
    return {"knowledge": knowledge, "hits": hits, "downstream": downstream, "perplexity": ppl}


def run_benchmark(
    suite: Suite, inits: Sequence[str], seeds: Sequence[int], size: str, command: str, on_row=None
) -> list[dict[str, Any]]:
    """One row per (seed, init) in the results schema, plus the extra measurements."""
    base = suite.load_base()
    before = measure(base, suite)
    probe = _probe(suite)
    base_logits = _logits(base, probe)
    del base
    known = [i for i, hit in enumerate(before["hits"]) if hit]
    logger.info(
        "%s before fine-tuning: knowledge %.3f (%d known), downstream %.3f, perplexity %.2f",
        suite.model,
        before["knowledge"],
        len(known),
        before["downstream"],
        before["perplexity"],
    )
    rows = []
    for seed in seeds:
        for init in inits:
            start = time.perf_counter()
            model = build_adapter(init, suite.load_base(), suite, seed)
            init_seconds = time.perf_counter() - start
            init_error = float((_logits(model, probe) - base_logits).norm() / base_logits.norm())
            leakage = {
                f"leakage_{kind}": adapter_leakage(model, suite, texts)
                for kind, texts in (("knowledge", suite.knowledge), ("task", suite.task_train))
            }
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            loss, skipped, *_ = fine_tune(
                model, suite.tokenizer, suite.task_train, suite.train, seed, suite.separator, desc=init
            )
            after = measure(model, suite)
            row = {
                "init": init,
                "seed": seed,
                "size": size,
                "model": suite.model,
                **({"setting": suite.setting} if suite.setting else {}),
                "knowledge_before": before["knowledge"],
                "knowledge_after": after["knowledge"],
                "downstream": after["downstream"],
                "command": command,
                "knowledge_known_after": _mean(after["hits"][i] for i in known),
                "known_items": len(known),
                "knowledge_items": len(suite.knowledge),
                "downstream_before": before["downstream"],
                "downstream_items": len(suite.task_eval),
                "perplexity_before": before["perplexity"],
                "perplexity_after": after["perplexity"],
                "function_error_after_init": init_error,
                **leakage,
                "train_loss": loss,
                "skipped_steps": skipped,
                "rank": suite.rank,
                "steps": suite.train.steps,
                "batch_size": suite.train.batch_size,
                "learning_rate": suite.train.learning_rate,
                "trainable_parameters": trainable,
                "calibration_samples": len(suite.calibration),
                "init_seconds": round(init_seconds, 2),
                "seconds": round(time.perf_counter() - start, 2),
                "device": device_name(),
            }
            logger.info(
                "%s seed %d %-15s knowledge %.3f → %.3f  downstream %.3f  ppl %.2f",
                suite.model,
                seed,
                init,
                row["knowledge_before"],
                row["knowledge_after"],
                row["downstream"],
                row["perplexity_after"],
            )
            rows.append(row)
            if on_row:
                on_row(rows)
            del model
            free_memory()
    return rows


def free_memory() -> None:
    """Return a finished run's memory before the next run builds its model."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def adapter_leakage(model, suite: Suite, examples: Sequence, count: int = 64) -> float:
    """Mean over layers of ‖A x‖ relative to a random A of the same norm (1 ≈ random), right after init.

    On knowledge questions it is the null-space leakage; on task examples it says how much signal the
    initial A passes from the task, which bounds what a frozen A (v2) can learn."""
    layers = lora_layers(model, "default")
    modules = {name: layer.get_base_layer() for name, layer in layers.items()}
    lora_as = {name: layer.lora_A["default"].weight.detach() for name, layer in layers.items()}
    batches = tokenize_batches([e.text for e in examples[:count]], suite.tokenizer, suite.train.max_length, 32)
    measured = holdout_leakage(model, modules, lora_as, batches)
    ratios = [leak / rand for leak, rand in measured.values() if rand > 0]
    return sum(ratios) / len(ratios)


def _probe(suite: Suite) -> dict[str, torch.Tensor]:
    """A few knowledge questions to check that an init leaves the model's function unchanged."""
    texts = [e.text for e in suite.knowledge[:8]]
    return suite.tokenizer(texts, return_tensors="pt", padding=True)


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    return model(**batch).logits.float()[batch["attention_mask"].bool()].cpu()


def merge_results(path: Path, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add rows to a results file, replacing earlier rows of the same (model, size, init, setting, seed); atomic."""
    path = Path(path)
    existing = json.loads(path.read_text())["runs"] if path.exists() else []
    key = lambda r: (r["model"], r["size"], r["init"], r.get("setting", ""), r["seed"])  # noqa: E731
    new_keys = {key(r) for r in rows}
    merged = sorted([r for r in existing if key(r) not in new_keys] + list(rows), key=key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"runs": merged}, indent=1) + "\n")
    tmp.replace(path)
    return merged


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
