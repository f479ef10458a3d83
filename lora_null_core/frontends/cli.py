"""`lora-null` command line: init, export, merge, inspect, forgetting, demo, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import LoraNullConfig
from ..console import NORMAL, QUIET, VERBOSE, set_verbosity
from ..errors import ConfigError, LoraNullError
from ..io.saving import FLOAT_DTYPES
from ..layout import CONFIG_FILE
from . import meter_command
from .framework_config import config_fields

logger = logging.getLogger("lora_null_core")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-null", description="Knowledge-preserving LoRA initialization.")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument(
        "-q", "--quiet", action="store_true", help="No progress bars or info lines: errors and the result."
    )
    noise.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="Calibrate a model and write a LoRA-Null initialized base + adapter.")
    init.add_argument("--model", required=True, help="Local model folder or hub name.")
    init.add_argument(
        "--calibration",
        default=None,
        help="Knowledge text to keep: JSONL/JSON/parquet/CSV/TXT file, saved "
        "dataset or hub name (default: text the model generates itself, see --generated-*).",
    )
    init.add_argument(
        "--task-data",
        default=None,
        help="The fine-tuning inputs (same forms as --calibration): A "
        "goes where knowledge inputs are weak relative to them (see --task-mix). Default: plain null space.",
    )
    init.add_argument("--rank", type=int, required=True, help="LoRA rank r (= null-space dimension).")
    init.add_argument("--output", required=True, help="Folder to create: OUT/base, OUT/adapter, OUT/lora_null.json.")
    init.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: equal to --rank).")
    init.add_argument(
        "--target-modules",
        default="all-linear",
        help="Comma-separated names (default: every linear layer but the LM head).",
    )
    init.add_argument("--dropout", type=float, default=0.0, help="lora_dropout.")
    init.add_argument("--rslora", action="store_true", help="Scale by alpha / sqrt(r) (rsLoRA).")
    init.add_argument("--dtype", choices=FLOAT_DTYPES, default="auto", help="Weights' dtype (auto: the checkpoint's).")
    init.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available).")
    init.add_argument(
        "--offload",
        nargs="?",
        const="cpu",
        choices=("cpu", "disk"),
        default=None,
        help="Stream one block at a time to --device, keeping the weights in CPU memory (--offload, "
        "--offload cpu) or reading each block from the local safetensors checkpoint and writing its "
        "residual right after (--offload disk: for models larger than CPU memory).",
    )
    add_config_flags(init.add_argument_group("LoRA-Null settings (LoraNullConfig fields; YAML: lora_null_<field>)"))
    init.add_argument(
        "--trust-remote-code", action="store_true", help="Run the model repo's own code (only if you trust it)."
    )
    init.add_argument("--overwrite", action="store_true", help="Replace OUT if it exists.")

    export = commands.add_parser(
        "export", help="Turn an adapter trained on OUT/base into a LoRA for the original model."
    )
    export.add_argument(
        "--init-dir", "--init", dest="init_dir", required=True, help="The folder `lora-null init` wrote."
    )
    export.add_argument("--adapter", required=True, help="The trained PEFT adapter folder.")
    export.add_argument("--output", required=True)
    export.add_argument("--overwrite", action="store_true")

    merge = commands.add_parser("merge", help="Write full merged weights of the trained model.")
    merge.add_argument(
        "--init-dir", "--init", dest="init_dir", required=True, help="The folder `lora-null init` wrote."
    )
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output", required=True)
    merge.add_argument("--dtype", choices=FLOAT_DTYPES, default="auto")
    merge.add_argument("--overwrite", action="store_true")

    inspect = commands.add_parser("inspect", help="HTML report: effective ranks, spectra, and an init's leakage.")
    inspect.add_argument("--model", required=True, help="The ORIGINAL model (folder or hub name).")
    inspect.add_argument(
        "--calibration",
        default=None,
        help="Knowledge text (held-out text to check an init; default: the model's own text).",
    )
    inspect.add_argument("--output", required=True)
    inspect.add_argument(
        "--init-dir",
        "--init",
        dest="init_dir",
        default=None,
        help="A folder written by `lora-null init`, to measure its leakage.",
    )
    inspect.add_argument(
        "--task-data",
        default=None,
        help="The fine-tuning inputs (same forms as --calibration): "
        "with --init-dir, also the leakage of its lora_A on them (room to learn the task).",
    )
    add_config_flags(
        inspect,
        only=(
            "num_samples",
            "max_length",
            "batch_tokens",
            "batch_size",
            "text_field",
            "seed",
            "generated_length",
            "generated_temperature",
            "generated_top_p",
            "generated_prompt",
            "generated_decoding",
        ),
    )
    inspect.add_argument("--dtype", choices=FLOAT_DTYPES, default="auto")
    inspect.add_argument("--device", default=None)
    inspect.add_argument("--trust-remote-code", action="store_true")
    inspect.add_argument("--overwrite", action="store_true")

    meter_command.add_parser(commands)

    demo = commands.add_parser("demo", help="Run init → train → export on a tiny bundled model (CPU, ~1 min).")
    demo.add_argument("--output", default="lora-null-demo")
    demo.add_argument("--steps", type=int, default=40)
    demo.add_argument("--overwrite", action="store_true")

    for name in _extension_commands():
        commands.add_parser(name, add_help=False, help=f"`lora-null {name} --help` (an installed extension).")
    return parser


def _extension_commands() -> dict:
    """Sub-commands installed packages register under the `lora_null.commands` entry-point group."""
    from importlib.metadata import entry_points

    return {point.name: point for point in entry_points(group="lora_null.commands")}


def add_config_flags(parser, only: Sequence[str] | None = None) -> None:
    """One flag per LoraNullConfig field (--num-samples, --solver, …): type, choices, default and help come from
    the config, so a new field is a new flag with nothing restated here."""
    for spec in config_fields():
        if only is not None and spec.name not in only:
            continue
        kind = spec.type if spec.type in (int, float, str) else str
        default = f" (default: {spec.default})" if spec.default is not None else ""
        parser.add_argument(
            spec.flag,
            dest=spec.name,
            type=kind,
            choices=spec.choices,
            default=spec.default,
            help=spec.help.replace("%", "%%") + default,
            metavar=None if spec.choices else spec.name.upper(),
        )


def config_from_flags(args: argparse.Namespace) -> LoraNullConfig:
    return LoraNullConfig(
        **{spec.name: getattr(args, spec.name) for spec in config_fields() if hasattr(args, spec.name)}
    )


def _init(args: argparse.Namespace) -> dict:
    from peft import LoraConfig

    from .jobs import init_to_folder

    targets = (
        args.target_modules
        if args.target_modules == "all-linear"
        else [t.strip() for t in args.target_modules.split(",") if t.strip()]
    )
    lora_config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha if args.alpha is not None else args.rank,
        target_modules=targets,
        lora_dropout=args.dropout,
        use_rslora=args.rslora,
        task_type="CAUSAL_LM",
    )
    config = config_from_flags(args)
    if args.offload and args.streaming == "off":
        raise LoraNullError("--offload needs block streaming; drop --streaming off.")
    report = init_to_folder(
        args.model,
        args.calibration,
        Path(args.output),
        lora_config,
        config,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
        offload=args.offload or False,
        task_data=args.task_data,
    )
    return {"output": args.output, "layers": len(report.layers), **report.summary()}


def _export(args: argparse.Namespace) -> dict:
    from ..io.export import export_for_original_base

    out = export_for_original_base(args.init_dir, args.adapter, args.output, overwrite=args.overwrite)
    return {"output": str(out), "r": json.loads((out / CONFIG_FILE).read_text())["r"]}


def _merge(args: argparse.Namespace) -> dict:
    from ..io.merge import merge_to_full_model

    return {"output": str(merge_to_full_model(args.init_dir, args.adapter, args.output, args.dtype, args.overwrite))}


def _inspect(args: argparse.Namespace) -> dict:
    from ..atomic import check_output
    from ..io.saving import default_device, load_model, load_tokenizer
    from ..report import read_metadata
    from .inspection import analyze, write_report

    check_output(args.output, [args.model, args.calibration, args.init_dir, args.task_data], args.overwrite)
    if args.task_data is not None and args.init_dir is None:
        raise ConfigError("--task-data measures an init's lora_A on the fine-tuning inputs: give --init-dir too.")
    if args.init_dir is not None:
        read_metadata(Path(args.init_dir))  # a bad --init-dir fails now, not after the calibration pass
    model = load_model(args.model, args.dtype, args.device or default_device(), args.trust_remote_code)
    config = config_from_flags(args).replace(holdout_samples=0)
    data = analyze(
        model,
        load_tokenizer(args.model, args.trust_remote_code),
        args.calibration,
        config,
        args.init_dir,
        args.task_data,
    )
    out = write_report(data, args.output, args.overwrite)
    return {"report": str(out / "report.html"), "layers": len(data["layers"])}


def _demo(args: argparse.Namespace) -> dict:
    from .demo import run_demo

    return run_demo(Path(args.output), steps=args.steps, overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extension = _extension_commands().get(argv[0]) if argv else None
    if extension is not None:  # e.g. `lora-null bench …`, registered by the lora_null_bench package
        return extension.load()(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s" if args.verbose else "lora-null: %(message)s")
    set_verbosity(QUIET if args.quiet else VERBOSE if args.verbose else NORMAL)
    handler = {
        "init": _init,
        "export": _export,
        "merge": _merge,
        "inspect": _inspect,
        "forgetting": meter_command.run,
        "demo": _demo,
    }[args.command]
    try:
        result = handler(args)
    except LoraNullError as err:
        print(f"lora-null {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine's, not ours: disk full, permissions, a file that vanished
        print(f"lora-null {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lora-null {args.command}: interrupted; nothing was written.", file=sys.stderr)
        return 130
    for key, value in result.items():
        print(f"{key:<40} {value:.3g}" if isinstance(value, float) else f"{key:<40} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
