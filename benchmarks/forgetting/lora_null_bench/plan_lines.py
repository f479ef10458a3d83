"""A plan's lines cut to the points no result file holds yet, so a GPU lease spends its minutes on new points only.

    python -m lora_null_bench.plan_lines PLAN MODEL NAME RESULTS... > missing.txt

PLAN lines are "model task inits lrs seeds [rank]" (benchmarks/forgetting/plans/*.txt); MODEL is the plan's short name
(qwen15), NAME the rows' model name (qwen2.5-coder-1.5b-instruct). Each (init, seed) of a line becomes one line with
the learning rates it still lacks (a process builds its init once and trains it at each rate); lines of other models,
sweeps and comments pass through unchanged. A point is (model, task, init, lr, seed, steps, rank), as the frontier
merges rows (`point_key`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

STEPS = 150  # what device.sh runs every line with
RANK = 16  # the frontier's default rank


def missing_lines(lines: Iterable[str], model: str, name: str, rows: Iterable[dict]) -> list[str]:
    """The plan's lines for `model` with only the points no row has, split by (init, seed)."""
    done = {point_key(row) for row in rows}
    out = []
    for line in lines:
        fields = line.split()
        if line.startswith("#") or len(fields) < 5 or fields[0] != model:
            out.append(line)
            continue
        task, inits, lrs, seeds = fields[1], fields[2].split(","), fields[3].split(","), fields[4].split(",")
        rank = int(fields[5]) if len(fields) > 5 else RANK
        for init in inits:
            for seed in seeds:
                point = {"model": name, "task": task, "init": init, "seed": int(seed), "steps": STEPS, "rank": rank}
                todo = [lr for lr in lrs if point_key({**point, "lr": lr}) not in done]
                if todo:
                    out.append(" ".join([model, task, init, ",".join(todo), seed, *fields[5:6]]))
    return out


def point_key(row: dict) -> tuple:
    """One frontier point: the frontier keeps one row for it (the latest), and a plan skips it once a row has it. The
    rate is read as a number ("3e-4" in a plan is 0.0003 in a row); the plans' own loop is the default trainer."""
    keys = ("model", "task", "init", "lr", "seed", "steps", "rank")
    return (*(float(row[k]) if k == "lr" else row[k] for k in keys), row.get("trainer", "loop"))


def main(argv: Sequence[str] | None = None) -> int:
    plan, model, name, *results = list(sys.argv[1:] if argv is None else argv)
    rows = [row for path in results if Path(path).is_file() for row in json.loads(Path(path).read_text())["runs"]]
    print("\n".join(missing_lines(Path(plan).read_text().splitlines(), model, name, rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
