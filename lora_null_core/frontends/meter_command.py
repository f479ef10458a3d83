"""`lora-null forgetting`: what a saved adapter (LoRA-Null or not) costs its base model in knowledge, measured on
the base model's own samples (and held-out knowledge text when given); `--plot` draws a run's logged meter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import LoraNullError
from ..io.saving import FLOAT_DTYPES

METER_KEYS = ("forgetting/kl", "forgetting/ce_rise")  # what a trainer's log history holds


def add_parser(commands: Any) -> None:
    meter = commands.add_parser(
        "forgetting",
        help="KL(original ‖ tuned) per token of a saved adapter on its base's own samples; --plot draws a run's.",
    )
    meter.add_argument("--model", help="The base model the adapter was trained on (folder or hub name).")
    meter.add_argument("--adapter", help="The trained PEFT adapter folder.")
    meter.add_argument(
        "--texts",
        default=None,
        help="Held-out knowledge text (a .jsonl/.json/.txt/… file): also the cross-entropy rise on it.",
    )
    meter.add_argument(
        "--answers",
        action="store_true",
        help="With --texts of question/answer (or prompt/completion) rows: the share of the answers the base gives "
        "(greedily) that the tuned model still gives.",
    )
    meter.add_argument("--samples", type=int, default=64, help="Samples drawn from the base model (default: 64).")
    meter.add_argument("--length", type=int, default=128, help="Tokens per sample at most (default: 128).")
    meter.add_argument("--seed", type=int, default=0)
    meter.add_argument(
        "--reference",
        default=None,
        help="A reference saved before (a run's lora_null_forgetting.safetensors) instead of sampling anew.",
    )
    meter.add_argument("--save-reference", default=None, help="Write the reference drawn here to this file.")
    meter.add_argument("--plot", default=None, help="A run's trainer_state.json: draw its logged meter to --output.")
    meter.add_argument("--output", default=None, help="With --plot: the PNG to write.")
    meter.add_argument("--dtype", choices=FLOAT_DTYPES, default="auto")
    meter.add_argument("--device", default=None)
    meter.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.plot is not None:
        if args.output is None:
            raise LoraNullError("--plot draws the meter to --output: give the PNG's path.")
        return plot(Path(args.plot), Path(args.output))
    if args.model is None or args.adapter is None:
        raise LoraNullError("Give --model (the base) and --adapter (the trained adapter), or --plot with --output.")
    from peft import PeftModel

    from ..calibration.sources import load_rows
    from ..console import quiet_libraries
    from ..io.saving import default_device, load_model, load_tokenizer
    from ..meter.answers import qa_pairs
    from ..meter.measure import forgetting
    from ..meter.reference import ForgettingReference, forgetting_reference

    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise LoraNullError(f"--adapter {args.adapter} holds no adapter_config.json: point it at a PEFT adapter.")
    if args.answers and args.texts is None:
        raise LoraNullError("--answers asks the questions of --texts: give the question/answer file with --texts.")
    if args.answers and args.reference is not None:
        raise LoraNullError(
            "--answers draws the base's answers into a new reference; --reference reads one drawn before "
            "(with its answers, if it has any): give one of the two."
        )
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    rows = load_rows(args.texts) if args.texts is not None else None
    texts = [_text(row, tokenizer) for row in rows] if rows is not None else None
    pairs = qa_pairs(rows) if args.answers and rows is not None else None
    base = load_model(args.model, args.dtype, args.device or default_device(), args.trust_remote_code)
    if args.reference is not None:
        reference = ForgettingReference.load(args.reference)
    else:
        reference = forgetting_reference(base, tokenizer, args.samples, args.length, args.seed, texts, answers=pairs)
    if args.save_reference is not None:
        reference.save(args.save_reference)
    with quiet_libraries():
        tuned = PeftModel.from_pretrained(base, args.adapter)
    result = {**forgetting(tuned, reference), "samples": len(reference.ids)}
    if reference.answers() is not None:
        result.update({key: reference.settings[key] for key in ("answers", "answers_base_known")})
    return result


def _text(row: Any, tokenizer: Any) -> str:
    """A row's text for the cross-entropy rise: its text field or messages, or a question followed by its answer."""
    from collections.abc import Mapping

    from ..calibration.texts import row_to_text
    from ..meter.answers import QA_FIELDS

    for question, answer in QA_FIELDS:
        if isinstance(row, Mapping) and "text" not in row and isinstance(row.get(question), str):
            return f"{row[question]} {row.get(answer) or ''}".strip()
    return row_to_text(row, tokenizer, "text")


def plot(state_file: Path, output: Path) -> dict[str, Any]:
    """The meter's values over steps, from a trainer's log history, as a PNG."""
    if not state_file.is_file():
        raise LoraNullError(f"{state_file} does not exist: --plot takes a run's trainer_state.json.")
    history = json.loads(state_file.read_text()).get("log_history", [])
    series = {key: [(row["step"], row[key]) for row in history if key in row and "step" in row] for key in METER_KEYS}
    if not series["forgetting/kl"]:
        raise LoraNullError(
            f"{state_file} logged no forgetting/kl: the run had no forgetting meter (lora_null_forgetting: true)."
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for key, points in series.items():
        if points:
            axis.plot(*zip(*points, strict=True), marker="o", label=key)
    axis.set_xlabel("step")
    axis.set_ylabel("nats per token")
    axis.legend()
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return {"plot": str(output), "points": len(series["forgetting/kl"])}
