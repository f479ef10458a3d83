"""The frontier's report: rows of `lora-null bench frontier` grouped per model × task into curves (mean and spread
over seeds at each learning rate), summarized against LoRA (the bar is QUALITY_BAR × LoRA's best mean task score;
each init's smallest knowledge loss at or above it, and what it gets at LoRA's own rate), written as markdown with
the scoreboard first, and drawn."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .inits import INITS
from .plan_lines import point_key
from .scoreboard import energy_lines, scoreboard

QUALITY_BAR = 0.95  # "the task score users need": within 5 % of LoRA's best


def panel(row: dict[str, Any]) -> tuple[str, str]:
    """(model, task) a row is drawn and summarized in; another rank than the frontier's 16 is its own panel, with
    its own LoRA reference."""
    rank = row.get("rank", 16)
    return row["model"], row["task"] if rank == 16 else f"{row['task']}, r {rank}"


def curves(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[dict[str, float]]]]:
    """(model, task) → init → points sorted by learning rate: mean and spread over seeds of both axes."""
    grouped: dict[tuple[str, str], dict[str, dict[float, list[dict]]]] = {}
    for row in rows:
        if row.get("trainer", "loop") != "loop":  # other trainers are compared with the loop, not drawn (trainer_table)
            continue
        grouped.setdefault(panel(row), {}).setdefault(row["init"], {}).setdefault(row["lr"], []).append(row)
    out: dict[tuple[str, str], dict[str, list[dict[str, float]]]] = {}
    for key, inits in grouped.items():
        out[key] = {}
        for init, by_lr in inits.items():
            points = []
            for lr in sorted(by_lr):
                task = [r["task_score"] for r in by_lr[lr]]
                kept = [r["knowledge_kept"] for r in by_lr[lr]]
                points.append(
                    {
                        "lr": lr,
                        "task": statistics.fmean(task),
                        "task_sd": _sd(task),
                        "kept": statistics.fmean(kept),
                        "kept_sd": _sd(kept),
                        "seeds": len(task),
                    }
                )
            out[key][init] = points
    return out


def summary(points_by_init: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """At task ≥ 0.95 × LoRA's best mean task score: each init's smallest knowledge loss, and its ratio to LoRA's."""
    if "lora" not in points_by_init:
        return {}
    best = max(p["task"] for p in points_by_init["lora"])
    bar = QUALITY_BAR * best
    result: dict[str, Any] = {"lora_best_task": best, "bar": bar, "inits": {}}
    for init, points in points_by_init.items():
        good = [p for p in points if p["task"] >= bar]
        if not good:
            result["inits"][init] = {"loss": None, "lr": None, "best_task": max(p["task"] for p in points)}
            continue
        chosen = min(good, key=lambda p: 1 - p["kept"])
        result["inits"][init] = {
            "loss": 1 - chosen["kept"],
            "lr": chosen["lr"],
            "task": chosen["task"],
            "best_task": max(p["task"] for p in points),
        }
    lora_loss = result["inits"]["lora"]["loss"]
    for entry in result["inits"].values():
        entry["ratio"] = entry["loss"] / lora_loss if entry["loss"] is not None and lora_loss else None
    result["at_lora_lr"] = at_lora_learning_rate(points_by_init, result)
    return result


def at_lora_learning_rate(points_by_init: dict[str, list[dict[str, float]]], result: dict[str, Any]) -> dict[str, Any]:
    """What a user who keeps LoRA's learning rate gets: LoRA's reference rate is its point at the bar with the
    smallest loss; each init measured at that same rate passes if its task ≥ the bar and its loss ≤ 0.5 × LoRA's."""
    lr = result["inits"]["lora"]["lr"]
    lora_loss = result["inits"]["lora"]["loss"]
    out: dict[str, Any] = {"lr": lr, "inits": {}}
    if lr is None:
        return out
    for init, points in points_by_init.items():
        point = next((p for p in points if p["lr"] == lr), None)
        if point is None:
            out["inits"][init] = None
            continue
        loss = 1 - point["kept"]
        ratio = loss / lora_loss if lora_loss else None
        out["inits"][init] = {
            "task": point["task"],
            "loss": loss,
            "ratio": ratio,
            "passes": point["task"] >= result["bar"] and ratio is not None and ratio <= 0.5,
        }
    return out


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "# Forgetting on the Pareto frontier",
        "",
        "Each init fine-tuned at several learning rates (seeds per point: last column). **task**: exact match "
        "on held-out task "
        "questions; **kept**: share of the facts the base model knew that are still answered. Summary: at task "
        f"≥ {QUALITY_BAR} × LoRA's best mean task score, the smallest knowledge loss (1 − kept) each init "
        "reaches, and its ratio to LoRA's (goal for the default: ≤ 0.5).",
        "",
    ]
    panels = sorted(curves(rows).items())
    samples = {key: next(r for r in rows if panel(r) == key) for key, _ in panels}
    lines += scoreboard(
        [
            (model, task, samples[model, task]["task_score_base"], summary(by_init))
            for (model, task), by_init in panels
            if samples[model, task].get("rank", 16) == 16
        ]
    )
    lines += energy_lines(rows)
    for (model, task), by_init in panels:
        sample = samples[model, task]
        lines += [
            f"## {model} × {task}",
            "",
            f"Base: task {sample['task_score_base']:.3f}; {sample['knowledge_base_known']} of "
            f"{sample['knowledge_items']} facts known. r = {sample['rank']}, {sample['steps']} steps, batch "
            f"{sample['batch_size']}; device: {sample['device']}.",
            "",
        ]
        result = summary(by_init)
        if result:
            lines += [
                f"LoRA's best mean task score {result['lora_best_task']:.3f}; bar {result['bar']:.3f}.",
                "",
                "| init | knowledge loss at the bar | at lr | task there | ratio to LoRA | best task |",
                "| --- | ---: | ---: | ---: | ---: | ---: |",
            ]
            for init, entry in sorted(result["inits"].items(), key=lambda kv: _order(kv[0])):
                if entry["loss"] is None:
                    lines.append(f"| {init} | never reaches the bar | – | – | – | {entry['best_task']:.3f} |")
                else:
                    ratio = f"{entry['ratio']:.2f}" if entry["ratio"] is not None else "–"
                    lines.append(
                        f"| {init} | {entry['loss']:.3f} | {entry['lr']:g} | {entry['task']:.3f} | {ratio} | "
                        f"{entry['best_task']:.3f} |"
                    )
            lines.append("")
            same = result["at_lora_lr"]
            if same["lr"] is not None:
                lines += [
                    f"At LoRA's own learning rate ({same['lr']:g}, its point at the bar with the smallest loss): "
                    "passes = task ≥ the bar and knowledge loss ≤ 0.5 × LoRA's.",
                    "",
                    "| init | task | knowledge loss | ratio to LoRA | passes |",
                    "| --- | ---: | ---: | ---: | --- |",
                ]
                for init, entry in sorted(same["inits"].items(), key=lambda kv: _order(kv[0])):
                    if entry is None:
                        lines.append(f"| {init} | not measured at {same['lr']:g} | – | – | – |")
                    else:
                        ratio = f"{entry['ratio']:.2f}" if entry["ratio"] is not None else "–"
                        verdict = "reference" if init == "lora" else "yes" if entry["passes"] else "no"
                        lines.append(f"| {init} | {entry['task']:.3f} | {entry['loss']:.3f} | {ratio} | {verdict} |")
                lines.append("")
        lines += trainer_table([r for r in rows if panel(r) == (model, task)])
        lines += ["| init | lr | task (mean ± sd) | kept (mean ± sd) | seeds |", "| --- | ---: | ---: | ---: | ---: |"]
        for init, points in sorted(by_init.items(), key=lambda kv: _order(kv[0])):
            for p in points:
                lines.append(
                    f"| {init} | {p['lr']:g} | {p['task']:.3f} ± {p['task_sd']:.3f} | "
                    f"{p['kept']:.3f} ± {p['kept_sd']:.3f} | {p['seeds']} |"
                )
        lines.append("")
    return "\n".join(lines) + "\n"


def trainer_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Points also trained through a framework plugin (row "trainer"), beside the harness loop's at the same
    (init, lr): what a user of that framework gets, and whether it matches within seed noise."""
    others = sorted({r["trainer"] for r in rows if r.get("trainer", "loop") != "loop"})
    lines: list[str] = []
    for trainer in others:
        lines += [
            f"The same points through the {trainer.upper()} plugin (its own trainer: bf16, gradient "
            "checkpointing) beside the harness loop (mean ± sd over seeds):",
            "",
            "| init | lr | task: loop | task: " + trainer + " | kept: loop | kept: " + trainer + " | seeds |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        points: dict[tuple[str, float], dict[str, list[dict]]] = {}
        for r in rows:
            points.setdefault((r["init"], r["lr"]), {}).setdefault(r.get("trainer", "loop"), []).append(r)
        for (init, lr), by in sorted(points.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])):
            if trainer not in by:
                continue

            def cell(key: str, name: str, by: dict = by) -> str:
                values = [r[key] for r in by.get(name, [])]
                return f"{statistics.fmean(values):.3f} ± {_sd(values):.3f}" if values else "–"

            seeds = f"{len(by.get('loop', []))} / {len(by[trainer])}"
            lines.append(
                f"| {init} | {lr:g} | {cell('task_score', 'loop')} | {cell('task_score', trainer)} | "
                f"{cell('knowledge_kept', 'loop')} | {cell('knowledge_kept', trainer)} | {seeds} |"
            )
        lines.append("")
    return lines


def plot(rows: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """One PNG per model × task: x task score, y knowledge kept, a line per init through its learning rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (model, task), by_init in sorted(curves(rows).items()):
        figure, axes = plt.subplots(figsize=(7, 5))
        axes.set_prop_cycle(color=plt.cm.tab20.colors)  # more inits than tab10's ten colours
        for init, points in sorted(by_init.items(), key=lambda kv: _order(kv[0])):
            style = "-" if init.startswith("lora_null") else "--"
            default = {"color": "black", "linewidth": 2.4, "zorder": 5} if init == "lora_null" else {"linewidth": 1.2}
            axes.errorbar(
                [p["task"] for p in points],
                [p["kept"] for p in points],
                xerr=[p["task_sd"] for p in points],
                yerr=[p["kept_sd"] for p in points],
                fmt="o" + style,
                capsize=2,
                label=init + (" (default)" if init == "lora_null" else ""),
                **default,
            )
            for p in points:
                axes.annotate(f"{p['lr']:g}", (p["task"], p["kept"]), fontsize=6, alpha=0.6)
        result = summary(by_init)
        if result:
            axes.axvline(result["bar"], color="grey", linestyle=":", label=f"{QUALITY_BAR} × LoRA's best task")
            # Runs that diverged (task far below the bar) would squash the region that matters: left of the axis.
            axes.set_xlim(max(0.0, result["bar"] - 0.3), 1.01)
        axes.set_xlabel("task score (exact match, held out)")
        axes.set_ylabel("knowledge kept (share of facts the base knew)")
        axes.set_title(
            f"{model} × {task}: each init over its learning rates\n(points labelled by learning rate; "
            "diverged runs lie left of the axis)",
            fontsize=9,
        )
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="lower left")
        path = Path(folder) / f"frontier-{_slug(model)}-{_slug(task)}.png"
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def merge_results(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Rows of several result files; a later row for the same (model, task, init, lr, seed, steps, rank, trainer)
    wins."""
    rows: dict[tuple, dict[str, Any]] = {}
    for path in paths:
        for row in json.loads(Path(path).read_text())["runs"]:
            rows[point_key(row)] = row
    return list(rows.values())


def _order(init: str) -> tuple[int, str]:
    """Tables list the named inits in INITS' order (LoRA first), then the variants by name."""
    return (INITS.index(init) if init in INITS else len(INITS), init)


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
