"""The Pareto frontier of forgetting against task skill: each init over a sweep of learning rates.

Users judge an init by how much it forgets *at the task score they need*, so one shared learning rate proves
nothing: an init that learns slowly forgets little because it learned little. Here every (init, learning rate,
seed) is fine-tuned on a task the base model cannot do, then measured twice:

- task_score: exact match on held-out task questions (task_score_base: the base model's);
- knowledge_kept: of the closed-book qa_wikidata facts the base model answers correctly (disjoint from the
  calibration facts), the share still answered after fine-tuning.

The rows are summarized and drawn by frontier_report.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lora_null_core import forgetting, forgetting_reference
from lora_null_core.errors import ConfigError

from .energies import energies
from .evaluate import accuracy, normalize
from .inits import build_adapter
from .meter_report import DEFAULT_PACE
from .run import free_memory
from .suites import Suite
from .train import fine_tune

logger = logging.getLogger(__name__)

METER_TEXTS = 64  # held-out knowledge rows the meter's cross-entropy rise is read on (as many as its own samples)
# held-out questions the meter's answers are read on: an answer counts only where it comes first, stricter than the
# benchmark's match within 8 tokens, so SmolLM2 gives 4 of the first 64 (CPU); all 500 give a finer share
METER_QUESTIONS = 500


def exact_match(completion: str, targets: Sequence[str]) -> bool:
    """The completion's first line, normalized (case, punctuation, spacing), equals a target's."""
    line = completion.strip().splitlines()[0] if completion.strip() else ""
    return any(normalize(line) == normalize(t) for t in targets)


def run_frontier(
    suite: Suite,
    task: str,
    jobs: Sequence[tuple[str, float, int]],
    command: str,
    device: str,
    on_row=None,
    trainer: str = "loop",
    workdir: Path | None = None,
) -> list[dict[str, Any]]:
    """One row per (init, learning rate, seed) job, measured against the base model's answers. trainer "loop":
    the harness's own loop (every init alike); "trl": TRL's SFTTrainer through the plugin, as users run it."""
    base = suite.load_base()
    _, base_hits = accuracy(base, suite.tokenizer, suite.knowledge, suite.knowledge_tokens, suite.eval_batch)
    task_base, _ = accuracy(
        base, suite.tokenizer, suite.task_eval, suite.task_tokens, suite.eval_batch, match=exact_match
    )
    known = [e for e, hit in zip(suite.knowledge, base_hits, strict=True) if hit]
    if not known:  # every row's knowledge_kept would be NaN: a broken load, not a finding
        raise ConfigError(
            f"{suite.model} answers none of the {len(suite.knowledge)} knowledge questions, so "
            "nothing can be forgotten. Check that the model loads correctly (a Gemma-3 GGUF needs "
            "transformers >= 5.24) and that it is a pretrained model."
        )
    logger.info(
        "%s / %s: base task %.3f, %d of %d facts known", suite.model, task, task_base, len(known), len(suite.knowledge)
    )
    # The forgetting meter's reference: the base model's own samples (the same for every run of this process, so
    # the meter's reading of each run can be ranked against the knowledge it lost: benchmarks/results/meter.json),
    # and held-out knowledge rows (apart from the calibration questions and the scored facts), for the cross-entropy
    # rise a knowledge file gives a run, and the share of their answers the base gave that a run still gives.
    reference = forgetting_reference(
        base,
        suite.tokenizer,
        seed=0,
        texts=suite.heldout_text[:METER_TEXTS],
        answers=suite.heldout_answers[:METER_QUESTIONS] or None,
    )
    del base
    rows = []
    templates: dict[str, Any] = {}
    first = {}  # jobs of one (init, seed) run together, so each init is built once
    for init, _, seed in jobs:
        first.setdefault((init, seed), len(first))
    for init, lr, seed in sorted(jobs, key=lambda job: first[job[0], job[2]]):
        start = time.perf_counter()
        settings = replace(suite.train, learning_rate=lr)
        if trainer == "trl":
            from .trl_trainer import fine_tune_with_trl

            free_memory()
            model, loss = fine_tune_with_trl(
                init, suite.load_base(), suite, settings, seed, Path(workdir or "runs/trl") / f"{init}-{lr:g}-{seed}"
            )
            skipped = None
        else:
            model, (loss, skipped, *_) = _train_in_loop(init, lr, seed, suite, settings, templates, reference)
        task_score, _ = accuracy(
            model, suite.tokenizer, suite.task_eval, suite.task_tokens, suite.eval_batch, match=exact_match
        )
        kept, _ = accuracy(model, suite.tokenizer, known, suite.knowledge_tokens, suite.eval_batch)
        metered = time.perf_counter()
        meter = forgetting(model, reference)
        meter_kl = meter["kl"]
        meter_seconds = time.perf_counter() - metered
        row = {
            "model": suite.model,
            "task": task,
            "init": init,
            "lr": lr,
            "seed": seed,
            "steps": settings.steps,
            "rank": suite.rank,
            "task_score": task_score,
            "task_score_base": task_base,
            "knowledge_kept": kept,
            "knowledge_base_known": len(known),
            "command": command,
            "device": device,
            "batch_size": settings.batch_size,
            "train_loss": loss,
            "task_items": len(suite.task_eval),
            "knowledge_items": len(suite.knowledge),
            "seconds": round(time.perf_counter() - start, 1),
            # the forgetting meter's reading after training, and what one reading cost
            "meter_kl": meter_kl,
            "meter_ce_rise": meter["ce_rise"],
            "meter_answers_kept": meter["answers_kept"],
            "meter_seconds": round(meter_seconds, 3),
        }
        if trainer != "loop":
            row["trainer"] = trainer
        else:
            # The meter as the callback reads it: every 50 steps, and at the end unless the last step was read.
            curve = templates["meter_curve"]
            ended = bool(curve) and curve[-1][0] == settings.steps
            row.update(
                templates["energies"],
                skipped_steps=skipped,
                train_seconds=round(templates["train_seconds"], 2),
                meter_curve=curve if ended else [*curve, (settings.steps, meter_kl)],
                meter_seconds_at_pace=round(templates["meter_seconds"] + (0 if ended else meter_seconds), 3),
            )
        logger.info(
            "%s %s %-15s lr %-7g seed %d: task %.3f, kept %.3f", suite.model, task, init, lr, seed, task_score, kept
        )
        rows.append(row)
        if on_row:
            on_row(rows)
        del model
        free_memory()
    return rows


def _train_in_loop(
    init: str, lr: float, seed: int, suite: Suite, settings, templates: dict[str, Any], reference: Any = None
):
    """An init does not depend on the learning rate: build it once per (init, seed), keep it on the CPU, train a
    copy per learning rate. With a meter `reference`, the meter is read in training as the callback would."""
    if templates.get("key") != (init, seed):
        templates.clear()
        free_memory()
        built = build_adapter(init, suite.load_base(), suite, seed)
        measured = energies(
            built, suite.tokenizer, {"knowledge": [e.text for e in suite.knowledge], "task": suite.task_texts()}
        )
        templates.update(key=(init, seed), where=next(built.parameters()).device, model=built.cpu(), energies=measured)
    model = copy.deepcopy(templates["model"]).to(templates["where"])
    started = time.perf_counter()
    trained = fine_tune(
        model,
        suite.tokenizer,
        suite.task_train,
        settings,
        seed,
        suite.separator,
        desc=f"{init} {lr:g}",
        meter=(lambda: forgetting(model, reference)["kl"]) if reference is not None else None,
        meter_every=DEFAULT_PACE,
    )
    templates["train_seconds"] = time.perf_counter() - started - trained.meter_seconds
    templates.update(meter_curve=trained.meter_curve, meter_seconds=trained.meter_seconds)
    return model, trained


# ---------------------------------------------------------------- summary, table and plots
