"""The forgetting benchmark's pipeline at its CPU size (the science is in benchmarks/results/, not asserted here)."""

import json

import pytest
import torch
from lora_null_bench import world
from lora_null_bench.cli import main as bench_main
from lora_null_bench.evaluate import contains_target, final_number, number_matches
from lora_null_bench.inits import build_adapter
from lora_null_bench.report import target_check
from lora_null_bench.run import merge_results
from lora_null_bench.suites import read_examples, synthetic_suite

from lora_null_core.init.peft_layers import lora_layers, weight_matrix

REQUIRED = {"init", "seed", "size", "model", "knowledge_before", "knowledge_after", "downstream", "command"}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    code = bench_main(
        [
            "run",
            "--size",
            "cpu",
            "--inits",
            "lora,milora,lora_null_v2",
            "--seeds",
            "0",
            "--output",
            str(root / "out"),
            "--cache",
            str(root / "cache"),
            "--device",
            "cpu",
            "--results",
            str(root / "forgetting.json"),
        ]
    )
    assert code == 0
    return root


def test_cpu_size_writes_schema_table_and_plot(cpu_run):
    rows = json.loads((cpu_run / "forgetting.json").read_text())["runs"]
    assert [r["init"] for r in rows] == ["lora", "lora_null_v2", "milora"]  # sorted by key
    for row in rows:
        assert REQUIRED <= set(row)
        assert row["size"] == "cpu" and row["seed"] == 0 and row["command"].startswith("lora-null bench run")
        for name in ("knowledge_before", "knowledge_after", "downstream"):
            assert 0.0 <= row[name] <= 1.0
    # Pretraining on the synthetic world worked: the base model answers the held-out questions.
    assert rows[0]["knowledge_before"] >= 0.9
    table = (cpu_run / "out" / "table.md").read_text()
    assert "| lora_null_v2 | 1 |" in table and "| milora | 1 |" in table
    assert (cpu_run / "out" / "plot.png").stat().st_size > 10_000


def test_inits_preserve_function_and_lora_null_is_quiet_on_knowledge(cpu_run):
    rows = {r["init"]: r for r in json.loads((cpu_run / "forgetting.json").read_text())["runs"]}
    assert rows["lora"]["function_error_after_init"] == 0.0  # B = 0
    assert rows["milora"]["function_error_after_init"] < 1e-5
    assert rows["lora_null_v2"]["function_error_after_init"] < 1e-5
    # A in the knowledge null space responds far less to knowledge questions than LoRA's random A.
    assert rows["lora_null_v2"]["leakage_knowledge"] < 0.5 * rows["lora"]["leakage_knowledge"]


def test_calibration_and_scored_questions_are_disjoint(cpu_run):
    suite = synthetic_suite("cpu", cpu_run / "cache", "cpu")
    calibration = {e.prompt for e in suite.calibration}
    assert calibration and not calibration & {e.prompt for e in suite.knowledge}
    assert not {e.prompt for e in suite.task_train} & {e.prompt for e in suite.task_eval}


def test_milora_uses_the_weights_minor_singular_directions(cpu_run):
    suite = synthetic_suite("cpu", cpu_run / "cache", "cpu")
    model = suite.load_base()
    originals = {
        name: module.weight.detach().clone() for name, module in model.named_modules() if name.endswith("q_proj")
    }
    peft_model = build_adapter("milora", model, suite, seed=0)
    for name, layer in lora_layers(peft_model, "default").items():
        if not name.endswith("q_proj"):
            continue
        original = originals[name.removeprefix("base_model.model.")].double()
        _, _, right_t = torch.linalg.svd(original)
        minor = right_t[-suite.rank :]
        a = layer.lora_A["default"].weight.double()
        # Rows of A lie in the span of the r minor right singular vectors; residual + s·B·A = W.
        assert torch.allclose(a @ minor.T @ minor, a, atol=1e-5)
        rebuilt = weight_matrix(layer).double() + layer.scaling["default"] * layer.lora_B["default"].weight.double() @ a
        assert torch.allclose(rebuilt, original, atol=1e-5)


def test_the_self_calibrated_init_samples_the_models_own_text(cpu_run):
    """lora_null_self_chat (lora_null_self differs only in where sampling starts, tested in tests/test_own_text.py)."""
    suite = synthetic_suite("cpu", cpu_run / "cache", "cpu")
    report = build_adapter("lora_null_self_chat", suite.load_base(), suite, seed=0).lora_null_report
    assert (
        report.calibration["source"].startswith("the model's own text")
        and "chat template" in report.calibration["source"]
    )


def test_the_graphed_key_alone_is_the_key_alone_off_a_gpu(cpu_run):
    """lora_null_self_graphed asks for generated_decoding graphed; on the CPU generate draws, so it is the key alone."""
    suite = synthetic_suite("cpu", cpu_run / "cache", "cpu")
    graphed = build_adapter("lora_null_self_graphed", suite.load_base(), suite, seed=0).state_dict()
    plain = build_adapter("lora_null_self", suite.load_base(), suite, seed=0).state_dict()
    assert graphed.keys() == plain.keys() and all(torch.equal(graphed[k], plain[k]) for k in plain)


def test_the_task_aware_init_reads_the_training_examples(cpu_run):
    suite = synthetic_suite("cpu", cpu_run / "cache", "cpu")
    default, plain = (
        build_adapter(init, suite.load_base(), suite, seed=0).lora_null_report
        for init in ("lora_null", "lora_null_plain")
    )  # what the plugins do, with and without task data
    assert default.calibration["task_data"]["num_samples"] == min(256, len(suite.task_train))
    assert default.config["a_scale"] == 1.0 and default.calibration["task_data"]["task_mix"] == 0.01
    assert plain.calibration["task_data"] is None and plain.config["a_scale"] == 2.0
    report = build_adapter("lora_null_task0.1", suite.load_base(), suite, seed=0).lora_null_report
    assert report.calibration["task_data"]["task_mix"] == 0.1
    assert report.calibration["task_data"]["num_samples"] == min(256, len(suite.task_train))


def test_the_key_alone_with_task_data_samples_its_own_knowledge_text(cpu_run):
    suite = synthetic_suite("cpu", cpu_run / "cache", "cpu")
    report = build_adapter("lora_null_self_task1", suite.load_base(), suite, seed=0).lora_null_report
    assert report.calibration["source"].startswith("the model's own text")
    assert report.calibration["task_data"]["num_samples"] == min(256, len(suite.task_train))
    assert report.calibration["task_data"]["task_mix"] == 1.0  # lora_null_self_task<μ>; plain: the default 0.01


def test_a_scale_suffix_on_self_and_task_inits(cpu_run):
    from lora_null_bench.inits import is_known_init

    suite = synthetic_suite("cpu", cpu_run / "cache", "cpu")
    report = build_adapter("lora_null_task0.1_x2", suite.load_base(), suite, seed=0).lora_null_report
    assert report.calibration["task_data"]["task_mix"] == 0.1 and report.config["a_scale"] == 2.0  # default: 1
    assert is_known_init("lora_null_self_t1_x3") and is_known_init("lora_null_task_x2")
    assert is_known_init("lora_null_self_task") and is_known_init("lora_null_self_task_x2")
    assert is_known_init("lora_null_self_task1") and is_known_init("lora_null_self_task0.1_x2")
    for unknown in (
        "lora_null_v2_x3",
        "lora_null_self_x0",
        "lora_null_task_xa",
        "lora_null_selfish_x2",
        "lora_null_self_task0",
        "lora_null_self_taskx",
    ):
        assert not is_known_init(unknown), unknown


def test_a_weight_prior_suffix_on_the_lora_null_inits(cpu_run):
    """_w<β> appended last: the own-text, task-aware, plain and scaled inits with the weight prior β (#49)."""
    from lora_null_bench.inits import is_known_init

    suite = synthetic_suite("cpu", cpu_run / "cache", "cpu")
    report = build_adapter("lora_null_task_x2_w0.5", suite.load_base(), suite, seed=0).lora_null_report
    assert report.config["weight_prior"] == 0.5 and report.config["a_scale"] == 2.0
    assert report.calibration["task_data"] is not None
    assert (
        build_adapter("lora_null_plain_w2", suite.load_base(), suite, seed=0).lora_null_report.config["weight_prior"]
        == 2.0
    )
    for known in (
        "lora_null_w0.1",
        "lora_null_self_w0.1",
        "lora_null_self_task0.1_w1",
        "lora_null_x3_w0.1",
        "lora_null_self_4k64_w0.3",
    ):
        assert is_known_init(known), known
    for unknown in ("lora_w0.1", "lora_null_v2_w0.1", "lora_null_self_w0", "lora_null_self_wx", "pissa_w1"):
        assert not is_known_init(unknown), unknown


def test_world_problems_are_distinct_and_correct():
    problems = world.word_problems(500, seed=3)
    assert len({p.prompt for p in problems}) == 500
    for p in problems[:50]:
        numbers = [int(w) for w in p.prompt.split() if w.isdigit()]
        assert int(p.targets[0]) == numbers[0] + numbers[1] - numbers[2]


def test_scoring():
    assert contains_target(" Paris.\nThe", ["paris"])
    assert not contains_target(" Parisian food", ["Paris"])
    assert not contains_target(" a city\nParis", ["Paris"])  # only the first line counts
    assert final_number("so 3 + 4 = 7 #### 1,234") == "1234"
    assert final_number("she has 12 then 18.") == "18"
    assert number_matches("The answer is 18.", ["... #### 18"])
    assert not number_matches("no number", ["#### 18"])


def test_merge_results_replaces_same_run(tmp_path):
    path = tmp_path / "r.json"
    row = {"model": "m", "size": "cpu", "init": "lora", "seed": 0, "downstream": 0.1}
    merge_results(path, [row, {**row, "init": "pissa"}])
    merged = merge_results(path, [{**row, "downstream": 0.5}, {**row, "setting": "lr=0.01"}])
    assert len(merged) == 3
    assert [r["downstream"] for r in merged if r["init"] == "lora" and "setting" not in r] == [0.5]


def test_target_verdict_needs_a_task_that_lora_learned():
    def summary(init, knowledge_after, downstream, std):
        return {
            "init": init,
            "knowledge_lost": 1.0 - knowledge_after,
            "downstream": downstream,
            "downstream_std": std,
            "downstream_before": 0.02,
        }

    learned = [summary("lora", 0.6, 0.90, 0.05), summary("lora_null_v2", 0.9, 0.88, 0.01)]
    assert target_check(learned).endswith("target met.")
    slow = [summary("lora", 0.6, 0.90, 0.05), summary("lora_null_v2", 1.0, 0.10, 0.01)]
    assert target_check(slow).endswith("target NOT met.")
    at_floor = [summary("lora", 0.6, 0.023, 0.005), summary("lora_null_v2", 0.9, 0.032, 0.007)]
    assert "not judged" in target_check(at_floor)


def test_read_examples_accepts_bigbench_and_jsonl(tmp_path):
    (tmp_path / "task.json").write_text(
        json.dumps({"examples": [{"input": "The capital of France is", "target": ["Paris"]}]})
    )
    (tmp_path / "task.jsonl").write_text(json.dumps({"question": "2+2?", "answer": "4 #### 4"}) + "\n")
    assert read_examples(tmp_path / "task.json", ("prompt", "input"), ("targets", "target"))[0].targets == ("Paris",)
    row = read_examples(tmp_path / "task.jsonl", ("prompt", "question"), ("answer",), "Question: {}\nAnswer:")[0]
    assert row.prompt == "Question: 2+2?\nAnswer:" and row.targets == ("4 #### 4",)
    with pytest.raises(Exception, match="row 0 needs"):
        read_examples(tmp_path / "task.jsonl", ("nope",), ("answer",))


def test_a_step_with_a_non_finite_gradient_is_skipped_and_counted(tokenizer):
    """One NaN gradient would turn every weight NaN (Qwen2.5 under bf16 autocast, benchmarks/README); the loop
    leaves the weights as they were for that step and reports it."""
    from lora_null_bench.train import TrainSettings, fine_tune
    from lora_null_bench.world import Example

    from lora_null_core.frontends.toy_world import tiny_model

    model = tiny_model("llama", len(tokenizer), seed=0)
    poisoned = model.model.layers[0].mlp.down_proj.weight
    nan_at_step = iter([False, True, False])  # the second of three steps
    poisoned.register_hook(lambda grad: grad * float("nan") if next(nan_at_step) else grad)
    examples = [Example("The capital of France is", ("Paris",))] * 4
    trained = fine_tune(
        model, tokenizer, examples, TrainSettings(steps=3, batch_size=2, learning_rate=1e-3, max_length=16), seed=0
    )
    assert trained.skipped_steps == 1 and all(torch.isfinite(p).all() for p in model.parameters())


def test_the_meter_is_read_in_training_at_its_pace_and_its_time_kept_apart(tokenizer):
    """The frontier reads the meter every 50 steps as the trainer callback does: the readings come back with their
    steps and the model in eval mode while it reads, and their time is counted apart from training's."""
    from lora_null_bench.train import TrainSettings, fine_tune
    from lora_null_bench.world import Example

    from lora_null_core.frontends.toy_world import tiny_model

    model = tiny_model("llama", len(tokenizer), seed=0)
    modes = []

    def meter() -> float:
        modes.append(model.training)
        return float(len(modes))

    examples = [Example("The capital of France is", ("Paris",))] * 4
    settings = TrainSettings(steps=5, batch_size=2, learning_rate=1e-3, max_length=16)
    trained = fine_tune(model, tokenizer, examples, settings, seed=0, meter=meter, meter_every=2)
    assert trained.meter_curve == [(2, 1.0), (4, 2.0)] and modes == [False, False] and trained.meter_seconds > 0
    assert fine_tune(model, tokenizer, examples, settings, seed=0).meter_curve == []


def test_the_meters_overhead_run_trains_with_and_without_it_and_prices_its_readings(tokenizer, knowledge):
    """meter-overhead: Hugging Face's Trainer trains the same adapter with the callback at its default pace and
    without it; the meter's logged time over the training's is the fraction, and the run with it reads at the end."""
    from lora_null_bench.overhead import meter_overhead
    from lora_null_bench.suites import Suite
    from lora_null_bench.train import TrainSettings
    from lora_null_bench.world import Example

    from lora_null_core.frontends.toy_world import tiny_model

    examples = [Example(" ".join(text.split()[:3]), (text.split()[3],)) for text in knowledge[:8]]
    suite = Suite(
        model="tiny",
        load_base=lambda: tiny_model("llama", len(tokenizer), seed=0),
        tokenizer=tokenizer,
        calibration=[],
        knowledge=[],
        heldout_text=knowledge[:4],
        task_train=examples,
        task_eval=examples,
        train=TrainSettings(steps=30, batch_size=2, learning_rate=1e-3, max_length=16),
        rank=4,
    )
    row = meter_overhead(suite, "toy", suite.train, 0, "lora-null bench meter-overhead", "cpu", profile=True)
    assert row["weights"] == "float32" and row["reading_profile"][0]["ms"] >= row["reading_profile"][-1]["ms"] > 0
    assert any("linear" in entry["op"] or "mm" in entry["op"] for entry in row["reading_profile"])
    assert row["readings"][-1] == 30 and row["reference_texts"] == 4 and row["meter_seconds"] > 0
    expected = row["meter_seconds"] / (row["seconds_with_meter"] - row["meter_seconds"])
    assert row["fraction"] == pytest.approx(expected, rel=0.01) and row["seconds_without"] > 0
    assert row["warm_reading_seconds"] > 0 and row["scoring_seconds"] > 0
