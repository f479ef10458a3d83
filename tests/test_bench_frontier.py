"""The frontier summary: the bar, each init's smallest loss at or above it, and the ratio to LoRA's."""

import json
import math

import pytest
from lora_null_bench.frontier import exact_match
from lora_null_bench.frontier_report import curves, markdown, summary


def row(init, lr, seed, task, kept):
    return {
        "model": "m",
        "task": "t",
        "init": init,
        "lr": lr,
        "seed": seed,
        "task_score": task,
        "knowledge_kept": kept,
        "task_score_base": 0.0,
        "knowledge_base_known": 100,
        "knowledge_items": 400,
        "rank": 16,
        "steps": 150,
        "batch_size": 32,
        "device": "cpu",
    }


ROWS = [
    # LoRA: best mean task 0.90 at 3e-3 (bar 0.855); at 1e-3 it is over the bar and keeps 0.6 → loss 0.4
    row("lora", 1e-3, 0, 0.86, 0.62),
    row("lora", 1e-3, 1, 0.88, 0.58),
    row("lora", 3e-3, 0, 0.90, 0.40),
    row("lora", 3e-3, 1, 0.90, 0.40),
    # v2 reaches the bar only at 3e-3 (keeps 0.9 → loss 0.1); 1e-3 keeps more but learns too little
    row("lora_null_v2", 1e-3, 0, 0.70, 0.97),
    row("lora_null_v2", 3e-3, 0, 0.86, 0.90),
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


def test_the_scoreboard_reads_each_pair_against_both_issues_bars():
    """At LoRA's rate (1e-3: loss 0.40, bar 0.855): the default (loss 0.15, 0.375×) and the key alone (0.12, 0.30×)
    pass #47; the key alone loses more than the plain null space (0.10), so #49 fails; without the plain null space
    #49 is open. A task LoRA lifts by less than 0.3 is not a pair."""
    at_rate = [row("lora_null", 1e-3, 0, 0.86, 0.85), row("lora_null_self", 1e-3, 0, 0.87, 0.88)]
    plain = row("lora_null_plain", 1e-3, 0, 0.86, 0.90)
    learned = next(line for line in markdown([*ROWS, *at_rate, plain]).splitlines() if line.startswith("| m × t |"))
    assert learned == (
        "| m × t | 0.001: 0.870 / 0.400 | 0.855 | 0.860 / 0.150 (0.38×) | 0.870 / 0.120 (0.30×, 1.20× plain) | "
        "passes | fails |"
    )
    assert markdown([*ROWS, *at_rate]).count("| passes | open |") == 1
    unlearned = [{**r, "task_score_base": 0.7} for r in [*ROWS, *at_rate]]
    assert "| m × t | 0.001: 0.870 / 0.400 | 0.855 | not a pair: LoRA lifts the task by 0.20 |" in markdown(unlearned)


def test_the_energies_table_averages_each_inits_seeds_once_whatever_the_rates():
    """An init's A is built once per seed and trained at each rate: its energies count once per seed."""

    def measured(init, lr, seed, knowledge, task):
        return {**row(init, lr, seed, 0.86, 0.9), "energy_knowledge": knowledge, "energy_task": task}

    rows = [
        *ROWS,
        measured("lora_null", 1e-3, 0, 0.05, 3.0),
        measured("lora_null", 1e-3, 1, 0.07, 5.0),
        measured("lora_null_self", 1e-3, 0, 0.12, 0.10),
        measured("lora_null_self", 3e-3, 0, 0.12, 0.10),
        measured("lora_null_self", 1e-3, 1, 0.10, 0.20),
    ]
    table = markdown(rows)
    assert "| m × t | 0.060 / 4.000 (2) | – | 0.110 / 0.150 (2) |" in table
    assert "energy on the held-out facts" not in markdown(ROWS)  # no energies measured: no table


def test_at_loras_learning_rate_each_init_is_judged_against_the_bar_and_half_loras_loss():
    rows = [*ROWS, row("lora_null", 1e-3, 0, 0.86, 0.85), row("lora_null_x3", 1e-3, 0, 0.80, 0.95)]
    same = summary(curves(rows)[("m", "t")])["at_lora_lr"]
    assert same["lr"] == 1e-3  # LoRA's point at the bar with the smallest loss
    assert same["inits"]["lora"]["ratio"] == pytest.approx(1.0) and not same["inits"]["lora"]["passes"]
    assert same["inits"]["lora_null"]["passes"]  # task 0.86 ≥ 0.855, loss 0.15 ≤ 0.5 × 0.40
    assert not same["inits"]["lora_null_x3"]["passes"]  # keeps more, but under the bar
    assert not same["inits"]["lora_null_v2"]["passes"]  # 0.70 at 1e-3
    assert same["inits"]["pissa"] is None  # never run at 1e-3
    table = markdown(rows)
    assert "| lora_null | 0.860 | 0.150 | 0.38 | yes |" in table and "| pissa | not measured at 0.001 |" in table


def test_exact_match_reads_the_first_line_only():
    assert exact_match(" hall, energy, the\nmore text", ["hall, energy, the"])
    assert exact_match("883.", ["883"]) and not exact_match("8830", ["883"])
    assert not exact_match("", ["883"])


def test_a_base_model_that_knows_no_facts_is_refused_not_reported_as_nan(monkeypatch):
    """A broken load (e.g. a GGUF dequantized wrongly) answers nothing: kept would be NaN in every row."""
    from types import SimpleNamespace

    from lora_null_bench import frontier

    from lora_null_core.errors import ConfigError

    monkeypatch.setattr(frontier, "accuracy", lambda model, tok, examples, *a, **k: (0.0, [False] * len(examples)))
    suite = SimpleNamespace(
        model="broken",
        load_base=lambda: None,
        tokenizer=None,
        knowledge=[object()] * 5,
        knowledge_tokens=4,
        task_eval=[object()] * 3,
        task_tokens=4,
        eval_batch=2,
    )
    with pytest.raises(ConfigError, match="answers none of the 5 knowledge questions"):
        frontier.run_frontier(suite, "addition", [("lora", 1e-3, 0)], "cmd", "cpu")


def test_rows_through_a_framework_trainer_are_compared_with_the_loop_not_drawn_as_a_curve():
    trl = [
        {**row("lora_null", 3e-3, seed, task, kept), "trainer": "trl"}
        for seed, task, kept in ((0, 0.1, 1.0), (1, 0.3, 0.8))
    ]
    rows = [*ROWS, row("lora_null", 3e-3, 0, 0.88, 0.90), *trl]
    assert [p["task"] for p in curves(rows)[("m", "t")]["lora_null"]] == [0.88]  # the loop's point alone
    table = markdown(rows)
    assert "through the TRL plugin" in table
    assert "| lora_null | 0.003 | 0.880 ± 0.000 | 0.200 ± 0.141 | 0.900 ± 0.000 | 0.900 ± 0.141 | 1 / 2 |" in table


def test_another_rank_is_its_own_panel_with_its_own_lora_reference():
    wide = [
        {**row(init, lr, 0, task, kept), "rank": 64}
        for init, lr, task, kept in (("lora", 1e-3, 0.9, 0.5), ("lora_null", 1e-3, 0.9, 0.9))
    ]
    panels = curves([*ROWS, *wide])
    assert set(panels) == {("m", "t"), ("m", "t, r 64")}
    assert [p["task"] for p in panels[("m", "t, r 64")]["lora"]] == [0.9]
    assert summary(panels[("m", "t, r 64")])["inits"]["lora_null"]["ratio"] == pytest.approx(0.2)
    assert "## m × t, r 64" in markdown([*ROWS, *wide])


def test_the_meters_rank_correlation_and_overhead():
    from lora_null_bench.meter_report import meter_summary, ranks, spearman

    assert ranks([3.0, 1.0, 2.0, 1.0]) == [4.0, 1.5, 3.0, 1.5]  # ties share their mean rank
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    rows = [
        {
            "model": "m",
            "task": "t",
            "init": i,
            "lr": lr,
            "knowledge_kept": kept,
            "meter_kl": kl,
            "device": "H100",
            "steps": 150,
            "batch_size": 32,
            "train_seconds": 60.0,
            "meter_seconds": 0.5,
        }
        for i, lr, kept, kl in [
            ("lora", 1e-3, 0.6, 0.30),
            ("lora", 3e-4, 0.8, 0.10),
            ("x", 1e-3, 0.9, 0.05),
            ("x", 3e-4, 0.95, 0.02),
        ]
    ]
    summary = meter_summary(rows + [{"model": "m", "task": "t", "knowledge_kept": 0.5}])  # a row without a reading
    assert summary["pairs"] == [
        {
            "model": "m",
            "task": "t",
            "spearman": pytest.approx(1.0),
            "runs": 4,
            "device": "H100",
            "spearman_within_init": {},  # no init has 3 runs
            "spearman_within_init_mean": pytest.approx(math.nan, nan_ok=True),
            "spearman_ce_rise": pytest.approx(math.nan, nan_ok=True),  # no run read it
            "runs_ce_rise": 0,
            "spearman_answers": pytest.approx(math.nan, nan_ok=True),
            "runs_answers": 0,
        }
    ]
    # 150 steps at one reading per 50, and one at the end: 4 readings of 0.5 s over 60 s of training
    assert summary["overhead"][0]["fraction"] == pytest.approx(4 * 0.5 / 60)


def test_the_meter_ranks_each_inits_rates_even_where_inits_disagree():
    """An init that protects the meter's own samples reads low at every rate (the smollm2 rows of 2026-12-06): the
    ranking across inits is weak while each init's rates are ranked right."""
    from lora_null_bench.meter_report import meter_summary

    rows = [
        {"model": "m", "task": "t", "init": init, "lr": lr, "knowledge_kept": kept, "meter_kl": kl}
        for init, lr, kept, kl in [
            ("lora", 3e-4, 0.85, 0.05),
            ("lora", 1e-3, 0.64, 0.16),
            ("lora", 3e-3, 0.47, 0.37),
            ("self", 3e-4, 0.94, 0.002),
            ("self", 1e-3, 0.90, 0.010),
            ("self", 3e-3, 0.82, 0.043),
            ("null", 3e-4, 0.95, 0.012),
            ("null", 1e-3, 0.94, 0.078),
            ("null", 3e-3, 0.93, 0.12),  # its loss ties its neighbours' in rank order only
        ]
    ]
    for row in rows:  # the rise on held-out knowledge rows follows the facts lost, whatever the init protects
        row["meter_ce_rise"] = 2 * (1 - row["knowledge_kept"])
    for row in rows[:6]:  # the held-out answers too, where the runs read them: kept answers, lost facts
        row["meter_answers_kept"] = row["knowledge_kept"] - 0.01
    (pair,) = meter_summary(rows)["pairs"]
    assert pair["spearman"] < 0.8 and pair["spearman_ce_rise"] == pytest.approx(1.0) and pair["runs_ce_rise"] == 9
    assert pair["spearman_answers"] == pytest.approx(1.0) and pair["runs_answers"] == 6
    assert pair["spearman_within_init"] == {
        "lora": pytest.approx(1.0),
        "null": pytest.approx(1.0),
        "self": pytest.approx(1.0),
    }
    assert pair["spearman_within_init_mean"] == pytest.approx(1.0)


def test_a_measured_overhead_and_the_meters_curve_at_loras_own_rate(tmp_path):
    """Rows that read the meter in training give the overhead as measured, and the curve plot takes LoRA's own
    learning rate (the frontier summary's: 1e-3 here) for every init drawn."""
    pytest.importorskip("matplotlib")
    from lora_null_bench.meter_report import meter_summary, plot_meter_curves

    rows = [
        {
            **row(init, lr, seed, task, kept),
            "meter_kl": kl,
            "train_seconds": 50.0,
            "meter_seconds": 0.5,
            "meter_seconds_at_pace": 2.0,  # readings at 50, 100 and 150 (the last step: no extra one)
            "meter_curve": [[50, kl / 3], [100, kl / 2], [150, kl]],
        }
        for init, lr, seed, task, kept, kl in [
            ("lora", 1e-3, 0, 0.86, 0.62, 0.3),
            ("lora", 1e-3, 1, 0.88, 0.58, 0.4),
            ("lora", 3e-3, 0, 0.90, 0.40, 0.9),
            ("lora_null", 1e-3, 0, 0.87, 0.90, 0.1),
            ("lora_null", 3e-3, 0, 0.89, 0.80, 0.2),
        ]
    ]
    overhead = meter_summary(rows)["overhead"][0]
    assert overhead["measured"] and overhead["fraction"] == pytest.approx(2.0 / 50)
    framework_row = {"framework": "trl", "setup": "bf16", "model": "m", "meter_seconds": 2.0, "train_runtime": 80.0}
    older = meter_summary(rows, [framework_row])["overhead"][-1]  # a row from before the pace budgeted the whole run
    assert older["pace"] == "default before the whole-run budget"
    framework_row["meter_pace"] = "default"  # collect's rows since
    last = meter_summary(rows, [framework_row, {"framework": "trl", "setup": "qlora4"}])["overhead"]
    assert len(last) == 2 and last[-1]["fraction"] == pytest.approx(2.0 / 80) and last[-1]["pace"] == "default"
    alone = {"model": "m", "task": "t", "steps": 600, "batch_size": 32, "fraction": 0.03, "device": "d"}
    alone.update(pace="default", runtime_rise=0.04, command="lora-null bench meter-overhead")
    older, entry = meter_summary([], [], [alone, {**alone, "weights": "bfloat16"}])["overhead"]
    assert entry["setup"] == "m × t, Trainer, 600 steps, batch 32, bfloat16 weights" and entry["fraction"] == 0.03
    assert older["setup"].endswith("float32 weights")  # rows from before the bench held bf16 weights
    path = plot_meter_curves(rows, "m", "t", tmp_path / "meter.png")
    assert path.stat().st_size > 1000
    from lora_null_core.errors import ConfigError

    with pytest.raises(ConfigError, match="no LoRA point.*Pairs in these results: m t"):
        plot_meter_curves(rows, "m", "other task", tmp_path / "none.png")


def test_meter_json_writes_a_correlation_it_cannot_take_as_null(tmp_path):
    import json

    from lora_null_bench.cli import main

    results = tmp_path / "frontier.json"
    row = {"model": "m", "task": "t", "init": "lora", "lr": 1e-3, "seed": 0, "steps": 150, "rank": 16}
    row.update(knowledge_kept=0.6, meter_kl=0.3)
    results.write_text(json.dumps({"runs": [row]}))  # one run: no correlation
    main(["meter", "--results", str(results), "--output", str(tmp_path / "meter.json")])

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    pair = json.loads((tmp_path / "meter.json").read_text(), parse_constant=refuse)["pairs"][0]
    assert pair["spearman"] is None and pair["runs"] == 1


def test_a_plan_is_cut_to_the_points_no_row_holds(tmp_path):
    """device.sh start … missing: a line keeps only the rates its (init, seed) still lacks, split by (init, seed);
    other models, sweeps and comments pass through; a row at another rank or step count, or of another trainer, is
    another point."""
    from lora_null_bench.plan_lines import main, missing_lines

    plan = [
        "# a comment",
        "q spell lora,lora_null_self 1e-4,3e-4,1e-3 0,1",
        "q words lora 3e-4 0 64",
        "g spell lora 1e-3 0",
        "q sweep",
    ]
    done = [("lora", 0.0001, 0), ("lora", 0.0003, 0), ("lora", 0.001, 0), ("lora_null_self", 0.001, 1)]
    rows = [{**row(init, lr, seed, 0.5, 0.9), "model": "Q", "task": "spell"} for init, lr, seed in done]
    rows.append({**row("lora", 3e-4, 0, 0.5, 0.9), "model": "Q", "task": "words"})  # rank 16: not the rank-64 point
    rows.append({**row("lora", 1e-4, 1, 0.5, 0.9), "model": "Q", "task": "spell", "trainer": "trl"})  # not the loop's
    assert missing_lines(plan, "q", "Q", rows) == [
        "# a comment",
        "q spell lora 1e-4,3e-4,1e-3 1",
        "q spell lora_null_self 1e-4,3e-4,1e-3 0",
        "q spell lora_null_self 1e-4,3e-4 1",
        "q words lora 3e-4 0 64",
        "g spell lora 1e-3 0",
        "q sweep",
    ]
    results = tmp_path / "rows.json"
    results.write_text(json.dumps({"runs": rows}))
    (tmp_path / "plan.txt").write_text("\n".join(plan) + "\n")
    assert main([str(tmp_path / "plan.txt"), "q", "Q", str(results), str(tmp_path / "absent.json")]) == 0
