"""Write the frontier benchmark's tasks as JSONL, from reasoning-gym's procedural generators (Apache-2.0).

    pip install reasoning-gym==0.1.25
    python benchmarks/data/tasks/generate.py [--tasks a,b] [--output benchmarks/data/tasks]

Each task gets `<name>.train.jsonl` (4,000 rows) and `<name>.eval.jsonl` (300 rows), fields `question` and
`answer`; evaluation questions never appear in training. Fixed seeds: the files are reproducible.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# name → (reasoning-gym dataset, its settings): small enough for a 135M–500M model to learn in a few hundred steps.
TASKS = {
    "word_reversal": ("word_sequence_reversal", dict(min_words=3, max_words=5)),
    "spell_backward": ("spell_backward", dict(min_word_len=3, max_word_len=7)),
    "addition": (
        "basic_arithmetic",
        dict(
            min_terms=2,
            max_terms=2,
            min_digits=2,
            max_digits=3,
            operators=["+"],
            allow_parentheses=False,
            allow_negation=False,
        ),
    ),
    "letter_counting": ("letter_counting", dict(min_words=3, max_words=6)),
    "base_conversion": ("base_conversion", dict(min_base=2, max_base=10, min_value=0, max_value=255)),
}
TRAIN, EVAL = 4000, 300


def generate(name: str, output: Path) -> None:
    import reasoning_gym

    dataset, settings = TASKS[name]
    rows = reasoning_gym.create_dataset(dataset, size=3 * (TRAIN + EVAL), seed=2026, **settings)
    seen, unique = set(), []
    for entry in rows:
        question = entry["question"].strip()
        if question not in seen:
            seen.add(question)
            unique.append({"question": question, "answer": str(entry["answer"]).strip()})
        if len(unique) == TRAIN + EVAL:
            break
    if len(unique) < TRAIN + EVAL:
        raise SystemExit(f"{name}: only {len(unique)} distinct questions")
    for split, part in (("train", unique[:TRAIN]), ("eval", unique[TRAIN:])):
        path = output / f"{name}.{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in part))
        print(f"wrote {path} ({len(part)} rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    for name in args.tasks.split(","):
        generate(name, args.output)


if __name__ == "__main__":
    main()
