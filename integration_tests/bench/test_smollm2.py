"""`lora-null bench --suite smollm2` at its CPU size: a real pretrained model (GGUF from PyPI, dequantized
once), qa_wikidata probes and GSM8K shipped in benchmarks/data. Asserts the pipeline, not the science."""

import json
from pathlib import Path

import pytest
from lora_null_bench.cli import main as bench_main

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    code = bench_main(
        [
            "run",
            "--suite",
            "smollm2",
            "--size",
            "cpu",
            "--inits",
            "lora,lora_null_v2",
            "--seeds",
            "0",
            "--data-dir",
            str(DATA),
            "--output",
            str(root / "out"),
            "--cache",
            str(root / "cache"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    return root


def test_real_model_pipeline(run):
    rows = {r["init"]: r for r in json.loads((run / "out" / "results.json").read_text())["runs"]}
    assert set(rows) == {"lora", "lora_null_v2"}
    for row in rows.values():
        assert row["model"] == "smollm2-135m-instruct-q4_1"
        assert row["knowledge_items"] == 24 and row["downstream_items"] == 4
        assert 0.0 <= row["knowledge_after"] <= 1.0 and 0.0 <= row["downstream"] <= 1.0
    # The pretrained model knows some facts (a random model would know none).
    assert rows["lora"]["knowledge_before"] > 0
    assert rows["lora_null_v2"]["function_error_after_init"] < 1e-4
    assert rows["lora_null_v2"]["leakage_knowledge"] < 0.5 * rows["lora"]["leakage_knowledge"]
    # Dequantized once into a plain safetensors folder that later runs reuse.
    assert list((run / "cache").glob("*-dequantized/model.safetensors"))


def test_frontier_pipeline_on_the_real_model(tmp_path, monkeypatch):
    """`lora-null bench frontier` at its CPU size, on the shipped addition task: rows in the documented schema;
    each (init, seed) is built once and every learning rate trains a fresh copy of it."""
    from lora_null_bench import frontier

    built = []
    real_build = frontier.build_adapter
    monkeypatch.setattr(frontier, "build_adapter", lambda init, *a: built.append(init) or real_build(init, *a))
    out = tmp_path / "frontier.json"
    code = bench_main(
        [
            "frontier",
            "--task",
            "addition",
            "--size",
            "cpu",
            "--inits",
            "lora,lora_null_x3",
            "--lrs",
            "3e-2,0",
            "--seeds",
            "0",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--output",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())["runs"]
    assert built == ["lora", "lora_null_x3"]
    for row in rows:
        for key in (
            "model",
            "task",
            "init",
            "lr",
            "seed",
            "steps",
            "rank",
            "task_score",
            "task_score_base",
            "knowledge_kept",
            "knowledge_base_known",
            "command",
            "device",
            "energy_knowledge",
            "energy_task",
            "energy_knowledge_by_type",
        ):
            assert key in row, key
        assert row["task"] == "addition" and row["task_score_base"] == 0.0 and row["knowledge_base_known"] > 0
        assert 0.0 <= row["knowledge_kept"] <= 1.0
    untrained = {row["init"]: row for row in rows if row["lr"] == 0}
    # lr 0 ran after a training run of the same init: a copy the earlier run changed would forget something.
    assert untrained["lora"]["knowledge_kept"] == 1.0
    assert untrained["lora_null_x3"]["knowledge_kept"] == 1.0
    # A random A (LoRA's) picks up about an average direction's energy; the null-space A far less on knowledge.
    assert 0.5 < untrained["lora"]["energy_knowledge"] < 2.0
    assert untrained["lora_null_x3"]["energy_knowledge"] < 0.2 * untrained["lora"]["energy_knowledge"]
    # The forgetting meter reads each run: an untrained copy drifted nowhere, a trained one somewhere.
    trained = {row["init"]: row for row in rows if row["lr"] > 0}
    assert untrained["lora"]["meter_kl"] == pytest.approx(0.0, abs=1e-6)
    assert trained["lora"]["meter_kl"] > 0 and trained["lora"]["meter_seconds"] > 0
    # and its cross-entropy rise on held-out knowledge rows: none untrained, some after training at 3e-2
    assert untrained["lora"]["meter_ce_rise"] == pytest.approx(0.0, abs=1e-5)
    assert trained["lora"]["meter_ce_rise"] != pytest.approx(0.0, abs=1e-5)
    # and the held-out questions' answers: an untrained copy still gives every one the base gave (None: this size
    # holds out 8 questions, and the base may give none of them first)
    assert untrained["lora"]["meter_answers_kept"] in (None, 1.0) and "meter_answers_kept" in trained["lora"]
    assert trained["lora"]["train_seconds"] > 0
    # Read as the callback reads it: its last reading is the one after the last step, and its time is kept.
    last_step, last_kl = trained["lora"]["meter_curve"][-1]
    assert last_step == trained["lora"]["steps"] and last_kl == pytest.approx(trained["lora"]["meter_kl"])
    assert trained["lora"]["meter_seconds_at_pace"] > 0
