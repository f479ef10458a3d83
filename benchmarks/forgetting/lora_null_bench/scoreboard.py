"""The open issues' bars at LoRA's own learning rate, one line per frontier pair, so a session reads where the default
and the key alone stand without walking every table: #47 asks task ≥ the bar and knowledge loss ≤ 0.5 × LoRA's of
the default beside the questions (`lora_null`) and the key alone (`lora_null_self`); #49 asks the key alone for
≤ 0.35 × LoRA's and ≤ 1.0 × the plain null space's (`lora_null_plain`) at the same rate. A pair counts where LoRA
lifts the task by at least MIN_LIFT over the base model."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

MIN_LIFT = 0.3  # "LoRA must lift each task by >= 0.3" (#47): below that the task is not learned, so not a pair
DEFAULT, KEY_ALONE, PLAIN = "lora_null", "lora_null_self", "lora_null_plain"


def scoreboard(pairs: Sequence[tuple[str, str, float, dict[str, Any]]]) -> list[str]:
    """Markdown lines for (model, task, base task score, frontier summary) of each panel at rank 16."""
    lines = [
        "## At LoRA's own learning rate, every pair",
        "",
        "Task / knowledge loss (loss as a multiple of LoRA's; for the key alone also of the plain null space's) at "
        f"LoRA's rate. #47: task ≥ the bar and ≤ 0.5× LoRA's loss, for the default and the key alone; #49: the key "
        f"alone ≤ 0.35× LoRA's and ≤ 1.0× the plain null space's. A task LoRA lifts by less than {MIN_LIFT} is not a "
        "pair. –: not measured at that rate.",
        "",
        "| pair | LoRA's rate: task / loss | bar | default | key alone | #47 | #49 |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for model, task, base, result in pairs:
        same = result.get("at_lora_lr", {})
        lora = same.get("inits", {}).get("lora")
        if lora is None:
            continue
        lift = result["lora_best_task"] - base
        head = f"| {model} × {task} | {same['lr']:g}: {lora['task']:.3f} / {lora['loss']:.3f} | {result['bar']:.3f}"
        if lift < MIN_LIFT:
            lines.append(f"{head} | not a pair: LoRA lifts the task by {lift:.2f} | | | |")
            continue
        default, alone, plain = (same["inits"].get(init) for init in (DEFAULT, KEY_ALONE, PLAIN))
        to_plain = alone["loss"] / plain["loss"] if alone and plain and plain["loss"] > 0 else None
        lines.append(
            f"{head} | {_cell(default)} | {_cell(alone, to_plain)} | {_verdict47(default, alone, result['bar'])} | "
            f"{_verdict49(alone, to_plain, result['bar'])} |"
        )
    return [*lines, ""]


def _cell(entry: dict[str, Any] | None, to_plain: float | None = None) -> str:
    if entry is None:
        return "–"
    ratio = f"{entry['ratio']:.2f}×" if entry["ratio"] is not None else "–"
    plain = f", {to_plain:.2f}× plain" if to_plain is not None else ""
    return f"{entry['task']:.3f} / {entry['loss']:.3f} ({ratio}{plain})"


def _meets(entry: dict[str, Any] | None, bar: float, most: float) -> bool | None:
    if entry is None or entry["ratio"] is None:
        return None
    return entry["task"] >= bar and entry["ratio"] <= most


def _verdict47(default: dict[str, Any] | None, alone: dict[str, Any] | None, bar: float) -> str:
    return _verdict([_meets(default, bar, 0.5), _meets(alone, bar, 0.5)])


def _verdict49(alone: dict[str, Any] | None, to_plain: float | None, bar: float) -> str:
    return _verdict([_meets(alone, bar, 0.35), None if to_plain is None else to_plain <= 1.0])


def _verdict(checks: list[bool | None]) -> str:
    """fails once a measured check fails; open while one is not measured; else passes."""
    if False in checks:
        return "fails"
    return "open" if None in checks else "passes"


def energy_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Why the inits stand where they do: each one's A right after init, its energy on the held-out facts (lower keeps
    more) and on the task's examples (higher learns faster at a given rate), the mean over its seeds at rank 16."""
    seeds: dict[tuple[str, str, str], dict[int, tuple[float, float]]] = {}
    for row in rows:
        if row.get("rank", 16) == 16 and row["init"] in (DEFAULT, PLAIN, KEY_ALONE) and "energy_task" in row:
            energies = (row["energy_knowledge"], row["energy_task"])
            seeds.setdefault((row["model"], row["task"], row["init"]), {})[row["seed"]] = energies
    pairs = sorted({(model, task) for model, task, _ in seeds})
    if not pairs:
        return []
    lines = [
        "Each init's A right after init: energy on the held-out facts / on the task's examples (a random A reads "
        "about 1; lower knowledge energy keeps more, higher task energy learns faster), the mean over its seeds (n).",
        "",
        "| pair | default | plain null space | key alone |",
        "| --- | ---: | ---: | ---: |",
    ]
    for model, task in pairs:
        cells = []
        for init in (DEFAULT, PLAIN, KEY_ALONE):
            values = list(seeds.get((model, task, init), {}).values())
            knowledge, learning = (statistics.fmean(kind) for kind in zip(*values, strict=True)) if values else (0, 0)
            cells.append(f"{knowledge:.3f} / {learning:.3f} ({len(values)})" if values else "–")
        lines.append(f"| {model} × {task} | {' | '.join(cells)} |")
    return [*lines, ""]
