"""Is the forgetting meter right? For each model × task pair of the frontier, the Spearman correlation between the
meter's reading after training (`meter_kl`) and the knowledge the run lost (1 − knowledge_kept), over every init and
learning rate, and within each init over its learning rates (what a user choosing a rate reads it for); the same for
the cross-entropy rise on held-out knowledge rows (`meter_ce_rise`) and the share of their answers still given
(`meter_answers_kept`), where the runs read them; what the meter
costs a run at its default pace (one reading per 50 steps, and one at the end); and its curve over the steps of one
pair."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_null_core.errors import ConfigError

DEFAULT_PACE = 50  # lora_null_forgetting_steps' default


def ranks(values: Sequence[float]) -> list[float]:
    """Each value's rank (1-based), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start : end + 1]:
            result[i] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The Pearson correlation of the ranks (NaN with fewer than 3 pairs or a constant side)."""
    if len(xs) < 3:
        return math.nan
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sx = math.sqrt(sum((r - mx) ** 2 for r in rx))
    sy = math.sqrt(sum((r - my) ** 2 for r in ry))
    if sx == 0 or sy == 0:
        return math.nan
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True)) / (sx * sy)


def meter_summary(
    rows: Sequence[dict[str, Any]],
    framework_rows: Sequence[dict[str, Any]] = (),
    overhead_rows: Sequence[dict[str, Any]] = (),
) -> dict[str, list[dict[str, Any]]]:
    """meter.json: {"pairs": [{model, task, spearman, runs, device}], "overhead": [{setup, fraction, device}]}.
    The overhead comes from the frontier's runs (read every 50 steps), from the framework matrix's rows
    (`framework_rows`, frameworks_gpu.json: the callback at its default pace, in each framework's own one-minute
    run, beside others on the GPU) and from `overhead_rows` (meter-overhead: the default pace in a run alone, with
    and without the meter in one process)."""
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("meter_kl") is not None and row.get("knowledge_kept") is not None:
            by_pair[row["model"], row["task"]].append(row)
    pairs = []
    for (model, task), runs in sorted(by_pair.items()):
        by_init: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for run in runs:
            by_init[run["init"]].append(run)
        within = {init: _rho(rows) for init, rows in sorted(by_init.items()) if len(rows) >= 3}
        with_texts = [r for r in runs if r.get("meter_ce_rise") is not None]
        with_answers = [r for r in runs if r.get("meter_answers_kept") is not None]
        pairs.append(
            {
                "model": model,
                "task": task,
                "spearman": _rho(runs),
                "runs": len(runs),
                "device": _devices(runs),
                # one init over its learning rates (>= 3 runs); the mean leaves out an init whose losses all tie
                "spearman_within_init": within,
                "spearman_within_init_mean": _mean_finite(within.values()),
                # the cross-entropy rise on held-out knowledge rows, where the runs read it
                "spearman_ce_rise": _rho(with_texts, "meter_ce_rise"),
                "runs_ce_rise": len(with_texts),
                # the share of the held-out rows' base answers still given: lost is 1 minus it, like the facts'
                "spearman_answers": spearman(
                    [1 - r["meter_answers_kept"] for r in with_answers], [1 - r["knowledge_kept"] for r in with_answers]
                ),
                "runs_answers": len(with_answers),
            }
        )
    overhead = []
    for (model, task), runs in sorted(by_pair.items()):
        timed = [r for r in runs if r.get("train_seconds") and r.get("meter_seconds") is not None]
        if timed:
            overhead.append(
                {
                    "setup": f"{model} × {task}, {timed[0]['steps']} steps, batch {timed[0]['batch_size']}",
                    "fraction": statistics.fmean(_overhead(r) for r in timed),
                    "device": _devices(timed),
                    "measured": all("meter_seconds_at_pace" in r for r in timed),
                    "pace": f"every {DEFAULT_PACE} steps",
                }
            )
    for row in framework_rows:
        if row.get("meter_seconds") is not None and row.get("train_runtime"):
            overhead.append(
                {
                    "setup": f"{row['framework']} {row['setup']}, {row.get('model')}",
                    "fraction": row["meter_seconds"] / row["train_runtime"],
                    "device": row.get("device"),
                    "measured": True,
                    # rows from before 2026-12-07's pace, which capped each interval but read the end on top
                    "pace": row.get("meter_pace", "default before the whole-run budget"),
                }
            )
    for row in overhead_rows:
        overhead.append(
            {
                "setup": f"{row['model']} × {row['task']}, Trainer, {row['steps']} steps, batch {row['batch_size']}, "
                f"{row.get('weights', 'float32')} weights",
                "fraction": row["fraction"],
                "device": row["device"],
                "measured": True,
                "pace": row["pace"],
                "runtime_rise": row["runtime_rise"],
                "command": row["command"],
            }
        )
    return {"pairs": pairs, "overhead": overhead}


def _rho(runs: Sequence[dict[str, Any]], reading: str = "meter_kl") -> float:
    return spearman([r[reading] for r in runs], [1 - r["knowledge_kept"] for r in runs])


def _mean_finite(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def _overhead(row: dict[str, Any]) -> float:
    """The meter's time over the training's: what its readings at the default pace took where the run read them so
    (meter_seconds_at_pace), else one reading's time times the readings that pace makes."""
    if "meter_seconds_at_pace" in row:
        return row["meter_seconds_at_pace"] / row["train_seconds"]
    return (row["steps"] // DEFAULT_PACE + 1) * row["meter_seconds"] / row["train_seconds"]


def plot_meter_curves(
    rows: Sequence[dict[str, Any]],
    model: str,
    task: str,
    path: Path,
    inits: Sequence[str] = ("lora", "lora_null", "lora_null_self"),
) -> Path:
    """The meter over training steps for `inits` on one pair, at LoRA's own learning rate (its point at the task bar
    with the smallest knowledge loss, as the frontier's summary picks it), mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .frontier_report import curves, summary
    from .report import save_figure

    panels = curves(rows)
    lr = summary(panels.get((model, task), {})).get("at_lora_lr", {}).get("lr")
    if lr is None:
        raise ConfigError(
            f"{model} × {task}: no LoRA point at the task bar to take the learning rate from. Pairs in these "
            f"results: {', '.join(f'{m} {t}' for m, t in sorted(panels)) or 'none'}."
        )
    fig, ax = plt.subplots(figsize=(6, 4))
    for init in inits:
        runs = [
            r["meter_curve"]
            for r in rows
            if (r["model"], r["task"], r["init"], r["lr"]) == (model, task, init, lr) and r.get("meter_curve")
        ]
        if runs:
            steps = [step for step, _ in runs[0]]
            mean = [statistics.fmean(run[i][1] for run in runs) for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", label=f"{init} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    ax.set_xlabel("training step")
    ax.set_ylabel("forgetting/kl (nats per token)")
    ax.set_title(f"{model} × {task}, lr {lr:g}")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def _devices(rows: Sequence[dict[str, Any]]) -> str:
    return ", ".join(sorted({str(r.get("device")) for r in rows}))
