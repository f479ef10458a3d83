"""The frontier summary: the bar, each init's smallest loss at or above it, and the ratio to LoRA's."""

import pytest
from lora_null_bench.frontier import curves, exact_match, markdown, summary


def row(init, lr, seed, task, kept):
    return {"model": "m", "task": "t", "init": init, "lr": lr, "seed": seed, "task_score": task, "knowledge_kept": kept,
            "task_score_base": 0.0, "knowledge_base_known": 100, "knowledge_items": 400, "rank": 16, "steps": 150,
            "batch_size": 32, "device": "cpu"}


ROWS = [
    # LoRA: best mean task 0.90 at 3e-3 (bar 0.855); at 1e-3 it is over the bar and keeps 0.6 → loss 0.4
    row("lora", 1e-3, 0, 0.86, 0.62), row("lora", 1e-3, 1, 0.88, 0.58),
    row("lora", 3e-3, 0, 0.90, 0.40), row("lora", 3e-3, 1, 0.90, 0.40),
    # v2 reaches the bar only at 3e-3 (keeps 0.9 → loss 0.1); 1e-3 keeps more but learns too little
    row("lora_null_v2", 1e-3, 0, 0.70, 0.97), row("lora_null_v2", 3e-3, 0, 0.86, 0.90),
    row("pissa", 1e-4, 0, 0.50, 0.90),  # never reaches the bar
]


def test_summary_picks_the_smallest_loss_at_or_above_the_bar():
    result = summary(curves(ROWS)[("m", "t")])
    assert result["lora_best_task"] == pytest.approx(0.90) and result["bar"] == pytest.approx(0.855)
    assert result["inits"]["lora"]["loss"] == pytest.approx(0.40) and result["inits"]["lora"]["lr"] == 1e-3
    assert result["inits"]["lora_null_v2"]["loss"] == pytest.approx(0.10)
    assert result["inits"]["lora_null_v2"]["ratio"] == pytest.approx(0.25)
    assert result["inits"]["pissa"]["loss"] is None
    table = markdown(ROWS)
    assert "| pissa | never reaches the bar |" in table and "| lora_null_v2 | 0.100 | 0.003 | 0.860 | 0.25 |" in table


def test_exact_match_reads_the_first_line_only():
    assert exact_match(" hall, energy, the\nmore text", ["hall, energy, the"])
    assert exact_match("883.", ["883"]) and not exact_match("8830", ["883"])
    assert not exact_match("", ["883"])
