"""The framework matrix on GPUs: each framework × setup (bf16, QLoRA 4-bit, DDP, FSDP, ZeRO-3) fine-tunes
SmolLM2-135M-Instruct on the frontier's addition task with `adapter_init: lora_null` and with plain LoRA, the same
steps and learning rate (LoRA's own, 1e-3), then

- the saved output folder is loaded the standard way (the base its adapter_config.json names, quantized as it was
  trained, + PeftModel.from_pretrained) and its logits on a fixed probe are compared with those the model in memory
  gave at the end of training, in the same dtype (output_rel_err);
- knowledge_kept: of the qa_wikidata facts that base answers (the frontier's measure), the share still answered;
- task_score: exact match on the held-out addition questions.

    python run.py prepare --gguf SmolLM2-135M-Instruct.Q4_1.gguf --work W        # model folder, data, base scores
    python run.py train --framework trl --setup bf16 --init lora_null --work W     # or under accelerate launch
    python run.py evaluate --work W --run trl-bf16-lora_null                       # one process, one GPU
    python run.py collect --work W --output benchmarks/results/frameworks_gpu.json

`device.sh` runs the whole matrix on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

TASK, STEPS, GLOBAL_BATCH, LEARNING_RATE, RANK = "addition", 150, 32, 1e-3, 16
MAX_LENGTH, KNOWLEDGE_TOKENS, TASK_TOKENS = 256, 8, 24
SETUPS = {  # setup → (how the base is loaded, processes)
    "bf16": ("bf16", 1), "qlora4": ("nf4", 1), "ddp2": ("bf16", 2), "fsdp2": ("bf16", 2),
    "fsdp2_ram_efficient": ("bf16", 2), "zero3_2": ("bf16", 2),
}
HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"


# ---------------------------------------------------------------- loading, as every framework run does
def load_base(folder: str, kind: str, on_gpu: bool = False):
    """The base model in bf16, or in 4-bit nf4 (bf16 compute) as QLoRA loads it (always onto this process's GPU);
    bf16 stays on the CPU unless `on_gpu`, for the trainer (or FSDP, or ZeRO-3) to place."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    extra = {}
    if kind == "nf4":
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
        extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **extra)
    return model.cuda() if on_gpu and kind == "bf16" else model


def pad_with_eos(tokenizer):
    if tokenizer.pad_token is None:  # SmolLM2's GGUF tokenizer has none; the frontier pads with EOS too
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


def probe_logits(model, probe: dict, device) -> torch.Tensor:
    """The fixed probe's logits, eval mode, bf16 autocast (how the model ran in training); padding kept, masked later."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=probe["input_ids"].to(device), attention_mask=probe["attention_mask"].to(device))
    model.train(was_training)
    return out.logits.float().cpu()


def memory_logits_callback(probe_path: Path, out_path: Path):
    """A TrainerCallback: at the end of training every rank runs the probe (FSDP and ZeRO-3 forwards are
    collective), rank 0 keeps the logits of the model as it is in memory."""
    from transformers import TrainerCallback

    class MemoryLogits(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            logits = probe_logits(model, torch.load(probe_path), args.device)
            if state.is_world_process_zero:
                torch.save(logits, out_path)

    return MemoryLogits()


# ---------------------------------------------------------------- prepare
def prepare(args) -> None:
    sys.path.insert(0, str(HERE.parent / "forgetting"))
    from lora_null_bench.evaluate import accuracy
    from lora_null_bench.frontier import exact_match
    from lora_null_bench.suites import file_suite

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tasks = DATA / "tasks"
    suite = file_suite(args.gguf, DATA / "bigbench_qa_wikidata" / "task.json", tasks / f"{TASK}.train.jsonl",
                       tasks / f"{TASK}.eval.jsonl", "gpu", work / "cache", "cuda", name="smollm2-135m-instruct-q4_1")
    folder = next((work / "cache").glob("*-dequantized"))
    tokenizer = suite.tokenizer
    _jsonl(work / "calibration.jsonl", [{"text": e.text} for e in suite.calibration])
    _jsonl(work / "train.jsonl", [{"prompt": e.prompt, "completion": suite.separator + e.targets[0]}
                                  for e in suite.task_train])
    meta = {"model": str(folder), "model_name": suite.model, "task": TASK, "steps": STEPS, "batch": GLOBAL_BATCH,
            "learning_rate": LEARNING_RATE, "rank": RANK, "knowledge": {}, "task_base": {}}
    examples = {"knowledge": [[e.prompt, list(e.targets)] for e in suite.knowledge],
                "task": [[e.prompt, list(e.targets)] for e in suite.task_eval]}
    (work / "eval.json").write_text(json.dumps(examples))
    for kind in ("bf16", "nf4"):
        base = load_base(str(folder), kind, on_gpu=True)
        _, hits = accuracy(base, tokenizer, suite.knowledge, KNOWLEDGE_TOKENS, 128)
        meta["knowledge"][kind] = [i for i, hit in enumerate(hits) if hit]
        meta["task_base"][kind] = accuracy(base, tokenizer, suite.task_eval, TASK_TOKENS, 128, match=exact_match)[0]
        del base
    prompts = [e.prompt for e in suite.task_eval[:8]] + [e.prompt for e in suite.knowledge[:8]]
    torch.save(dict(tokenizer(prompts, return_tensors="pt", padding=True)), work / "probe.pt")
    (work / "meta.json").write_text(json.dumps(meta))
    print({kind: len(known) for kind, known in meta["knowledge"].items()}, "facts known of", len(suite.knowledge))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


# ---------------------------------------------------------------- train
def train(args) -> None:
    work, run = Path(args.work), run_dir(args)
    run.mkdir(parents=True, exist_ok=True)
    meta = json.loads((work / "meta.json").read_text())
    kind = SETUPS[args.setup][0]
    started = time.perf_counter()
    trainer_fn = {"trl": train_trl, "peft": train_peft}[args.framework]
    trainer_fn(args, work, run, meta, kind)
    if int(os.environ.get("RANK", "0")) == 0:
        command = " ".join(shlex.quote(a) for a in sys.argv)
        launcher = os.environ.get("LORA_NULL_LAUNCHER", "python")
        (run / "train.json").write_text(json.dumps({
            "framework": args.framework, "setup": args.setup, "init": args.init, "kind": kind,
            "gpus": int(os.environ.get("WORLD_SIZE", "1")), "seconds": time.perf_counter() - started,
            "command": f"{launcher} {command}"}))


def run_dir(args) -> Path:
    return Path(args.work) / "runs" / f"{args.framework}-{args.setup}-{args.init}"


def train_trl(args, work: Path, run: Path, meta: dict, kind: str) -> None:
    from datasets import load_dataset
    from lora_null_trl import LoraNullSFTConfig, LoraNullSFTTrainer
    from transformers import AutoTokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    keys = {"adapter_init": "lora_null", "lora_null_calibration": str(work / "calibration.jsonl")} \
        if args.init == "lora_null" else {}
    config = LoraNullSFTConfig(
        output_dir=str(run / "trainer"), max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps=max(1, STEPS // 20), weight_decay=0.0,
        max_grad_norm=1.0, bf16=True, max_length=MAX_LENGTH, completion_only_loss=True, seed=0, data_seed=0,
        save_strategy="no", report_to="none", logging_steps=10, disable_tqdm=True,
        deepspeed=str(HERE / "configs" / "zero3.json") if args.setup == "zero3_2" else None, **keys)
    # After the arguments: under ZeRO-3 they make from_pretrained partition the weights as they load.
    model = load_base(meta["model"], kind)
    tokenizer = AutoTokenizer.from_pretrained(meta["model"])
    trainer = LoraNullSFTTrainer(
        model=model, args=config, train_dataset=load_dataset("json", data_files=str(work / "train.jsonl"))["train"],
        processing_class=tokenizer, peft_config=lora_config(),
        callbacks=[memory_logits_callback(work / "probe.pt", run / "memory_logits.pt")])
    trainer.train()
    trainer.save_model(str(run / "adapter"))


def train_peft(args, work: Path, run: Path, meta: dict, kind: str) -> None:
    """A plain PEFT script: get_peft_model, the PEFT-native entry, the frontier harness's own loop."""
    sys.path.insert(0, str(HERE.parent / "forgetting"))
    from lora_null_bench.train import TrainSettings, fine_tune
    from lora_null_bench.world import Example
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from lora_null_core import LoraNullConfig, initialize_lora_null_weights

    tokenizer = pad_with_eos(AutoTokenizer.from_pretrained(meta["model"]))
    model = load_base(meta["model"], kind, on_gpu=True)
    config = lora_config()
    config.init_lora_weights = args.init != "lora_null"
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    if args.init == "lora_null":
        initialize_lora_null_weights(peft_model, str(work / "calibration.jsonl"), tokenizer, LoraNullConfig())
    rows = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    examples = [Example(row["prompt"], (row["completion"][1:],)) for row in rows]
    fine_tune(peft_model, tokenizer, examples, TrainSettings(STEPS, GLOBAL_BATCH, LEARNING_RATE, MAX_LENGTH), seed=0)
    torch.save(probe_logits(peft_model, torch.load(work / "probe.pt"), "cuda"), run / "memory_logits.pt")
    peft_model.save_pretrained(run / "adapter")


# ---------------------------------------------------------------- evaluate
def evaluate(args) -> None:
    sys.path.insert(0, str(HERE.parent / "forgetting"))
    from lora_null_bench.evaluate import accuracy
    from lora_null_bench.frontier import exact_match
    from lora_null_bench.world import Example
    from peft import PeftModel
    from transformers import AutoTokenizer

    work, run = Path(args.work), Path(args.work) / "runs" / args.run
    meta = json.loads((work / "meta.json").read_text())
    trained = json.loads((run / "train.json").read_text())
    base_name = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(load_base(base_name, trained["kind"], on_gpu=True), run / "adapter")
    if trained["setup"] == "zero3_2":  # DeepSpeed's bf16 mode held every parameter and buffer in bf16
        model = model.to(torch.bfloat16)
    tokenizer = pad_with_eos(AutoTokenizer.from_pretrained(base_name))
    probe = torch.load(work / "probe.pt")
    loaded, memory = probe_logits(model, probe, "cuda"), torch.load(run / "memory_logits.pt")
    mask = probe["attention_mask"].bool()
    rel_err = float((loaded[mask] - memory[mask]).norm() / memory[mask].norm())
    examples = json.loads((work / "eval.json").read_text())
    known = [Example(p, tuple(t)) for i, (p, t) in enumerate(examples["knowledge"])
             if i in set(meta["knowledge"][trained["kind"]])]
    task = [Example(p, tuple(t)) for p, t in examples["task"]]
    kept, _ = accuracy(model, tokenizer, known, KNOWLEDGE_TOKENS, 128)
    score, _ = accuracy(model, tokenizer, task, TASK_TOKENS, 128, match=exact_match)
    row = {**trained, "model": meta["model_name"], "lora_a_moved": lora_a_moved(run), "base_model_name_or_path": base_name, "output_rel_err": rel_err,
           "knowledge_kept": kept, "knowledge_base_known": len(known), "task_score": score,
           "task_score_base": meta["task_base"][trained["kind"]], "device": torch.cuda.get_device_name()}
    (run / "row.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row))


def lora_a_moved(run: Path):
    """For LoRA-Null: the saved lora_A against the one the init wrote (the plugin's lora_null_init folder), relative;
    0 for a frozen A saved whole. None for LoRA."""
    from safetensors.torch import load_file

    init = run / "trainer" / "lora_null_init" / "adapter" / "adapter_model.safetensors"
    if not init.is_file():
        return None
    before, after = load_file(init), load_file(run / "adapter" / "adapter_model.safetensors")
    keys = [k for k in before if "lora_A" in k]
    missing = [k for k in keys if k not in after]
    if missing:
        return f"missing {len(missing)} of {len(keys)}"
    change = sum(float((after[k].float() - before[k].float()).norm() ** 2) for k in keys)
    return (change / sum(float(before[k].float().norm() ** 2) for k in keys)) ** 0.5


# ---------------------------------------------------------------- collect
REQUIRED = {"trl": ["bf16", "qlora4", "ddp2", "fsdp2", "fsdp2_ram_efficient", "zero3_2"],
            "axolotl": ["bf16", "qlora4", "ddp2"], "llamafactory": ["bf16", "qlora4"], "peft": ["qlora4"]}


def collect(args) -> None:
    """The matrix: one row per framework × setup for the default init, LoRA's numbers beside it; status pass when
    the reload matches (≤ 1e-3) and LoRA-Null kept at least LoRA's knowledge; fail otherwise or when a run
    left no row (its log says why)."""
    work = Path(args.work)
    rows = []
    for framework, setups in REQUIRED.items():
        for setup in setups:
            ours, lora = (_row(work, f"{framework}-{setup}-{init}") for init in ("lora_null", "lora"))
            if ours is None and lora is None:
                continue
            row = {"framework": framework, "setup": setup, "model": (ours or lora or {}).get("model"),
                   "init": "lora_null", "gpus": SETUPS[setup][1], "device": (ours or lora or {}).get("device")}
            for key in ("output_rel_err", "task_score", "knowledge_kept", "seconds", "command", "lora_a_moved",
                        "knowledge_base_known", "task_score_base"):
                row[key] = (ours or {}).get(key)
            row["knowledge_kept_lora"] = (lora or {}).get("knowledge_kept")
            row["task_score_lora"] = (lora or {}).get("task_score")
            row["output_rel_err_lora"] = (lora or {}).get("output_rel_err")
            row["command_lora"] = (lora or {}).get("command")
            passed = ours is not None and lora is not None and ours["output_rel_err"] <= 1e-3 and \
                ours["knowledge_kept"] >= lora["knowledge_kept"]
            row["status"] = "pass" if passed else "fail"
            rows.append(row)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    for row in rows:
        print(f"{row['framework']:13} {row['setup']:20} {row['status']:5} err {row['output_rel_err']} "
              f"kept {row['knowledge_kept']} vs {row['knowledge_kept_lora']}  task {row['task_score']} vs "
              f"{row['task_score_lora']}")


def _row(work: Path, name: str):
    path = work / "runs" / name / "row.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="action", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("--gguf", required=True)
    p.add_argument("--work", required=True)
    t = commands.add_parser("train")
    t.add_argument("--framework", choices=("trl", "peft"), required=True)
    t.add_argument("--setup", choices=tuple(SETUPS), required=True)
    t.add_argument("--init", choices=("lora_null", "lora"), required=True)
    t.add_argument("--work", required=True)
    e = commands.add_parser("evaluate")
    e.add_argument("--work", required=True)
    e.add_argument("--run", required=True)
    c = commands.add_parser("collect")
    c.add_argument("--work", required=True)
    c.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    {"prepare": prepare, "train": train, "evaluate": evaluate, "collect": collect}[args.action](args)


if __name__ == "__main__":
    main()
