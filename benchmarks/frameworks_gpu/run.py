"""The framework matrix on GPUs: each framework (TRL, Axolotl, LLaMA-Factory, plain PEFT) × setup (bf16, QLoRA
4-bit, DDP, FSDP, ZeRO-3) fine-tunes SmolLM2-135M-Instruct on the frontier's addition task with `adapter_init:
lora_null` and with plain LoRA, the same steps and learning rate (LoRA's own, 1e-3), through the framework's own
entry (TRL's SFTTrainer, `axolotl train`, `lora-null-llamafactory train`), then

- the saved output folder is loaded the standard way (the base its adapter_config.json names, in bf16, quantized as
  it was trained, + PeftModel.from_pretrained) and its logits on a fixed probe are compared with those the model in
  memory gave at the end of training (output_rel_err);
- the same with every parameter in the dtype it had in memory (output_rel_err_as_trained: DeepSpeed's bf16 mode
  holds the LoRA factors in bf16, the standard load in float32), and the framework's own forward with the adapter
  off against the standard one (base_rel_err): a framework that computes differently (fused kernels, autocast over
  float32 weights) shows here, not as a fault of the save; `reload` says which of the two the row passes on;
- knowledge_kept: of the qa_wikidata facts that base answers (the frontier's measure), the share still answered;
- task_score: exact match on the held-out addition questions;
- the saved LoRA factors against those in memory (`adapter_max_rel_diff`), and for LoRA-Null the saved lora_A
  against the init's (`lora_a_moved`: 0 for a frozen A saved whole).

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
import re
import shlex
import sys
import time
from pathlib import Path

import torch

TASK, STEPS, GLOBAL_BATCH, LEARNING_RATE, RANK = "addition", 150, 32, 1e-3, 16
MAX_LENGTH, KNOWLEDGE_TOKENS, TASK_TOKENS = 256, 8, 24
SETUPS = {  # setup → (how the base is loaded, processes)
    "bf16": ("bf16", 1),
    "qlora4": ("nf4", 1),
    "ddp2": ("bf16", 2),
    "fsdp2": ("bf16", 2),
    "fsdp2_ram_efficient": ("bf16", 2),
    "zero3_1": ("bf16", 1),
    "zero3_2": ("bf16", 2),
    # `adapter_init: lora_null` and nothing else: the calibration text is the model's own (own_text.py)
    "bf16_onekey": ("bf16", 1),
    "qlora4_onekey": ("nf4", 1),
    "zero3_1_onekey": ("bf16", 1),
    # Axolotl with its fused LoRA kernels off (on by default on a GPU): do they make the bf16 reload gap?
    "bf16_nokernels": ("bf16", 1),
    "bf16_nokernels_onekey": ("bf16", 1),
    # the key alone with its own text drawn by the CUDA-graph decoder (`generated_decoding: graphed`, #50): what each
    # front end makes of it before it may become the default
    "bf16_graphed_onekey": ("bf16", 1),
    "qlora4_graphed_onekey": ("nf4", 1),
}
FRAMEWORKS = ("trl", "peft", "axolotl", "llamafactory")
# lora_null: the key and, beside the calibration file, nothing else (the default: task-aware where the trainer holds
# the training set, since 2026-12-05); lora_null_plain: that plus `lora_null_task_data: none` (the plain null space,
# the default before); lora: the framework's own LoRA
OURS = ("lora_null", "lora_null_plain")
INITS = (*OURS, "lora")
HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
ZERO3 = HERE / "configs" / "zero3.json"
sys.path.insert(0, str(HERE))
from memory_probe import BASE_LOGITS_FILE, DTYPES_FILE, FACTORS_FILE, LOGITS_FILE, MemoryProbe, probe_logits  # noqa: E402


# ---------------------------------------------------------------- loading, as every framework run does
def load_base(folder: str, kind: str, on_gpu: bool = False, dtype: torch.dtype = torch.bfloat16):
    """The base model in bf16, or in 4-bit nf4 (bf16 compute) as QLoRA loads it (always onto this process's GPU);
    bf16 stays on the CPU unless `on_gpu`, for the trainer (or FSDP, or ZeRO-3) to place. `dtype`: what the weights
    are cast to first, and for nf4 what is quantized (see quantized_from)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    extra = {}
    if kind == "nf4":
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    return model.cuda() if on_gpu and kind == "bf16" else model


def pad_with_eos(tokenizer):
    if tokenizer.pad_token is None:  # SmolLM2's GGUF tokenizer has none; the frontier pads with EOS too
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


# ---------------------------------------------------------------- prepare
def prepare(args) -> None:
    sys.path.insert(0, str(HERE.parent / "forgetting"))
    from lora_null_bench.evaluate import accuracy
    from lora_null_bench.frontier import exact_match
    from lora_null_bench.suites import file_suite

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tasks = DATA / "tasks"
    suite = file_suite(
        args.gguf,
        DATA / "bigbench_qa_wikidata" / "task.json",
        tasks / f"{TASK}.train.jsonl",
        tasks / f"{TASK}.eval.jsonl",
        "gpu",
        work / "cache",
        "cuda",
        name=args.name,
    )
    folder = next((work / "cache").glob("*-dequantized"))
    tokenizer = suite.tokenizer
    heldout = suite.heldout_text if args.calibration_with_heldout else []
    _jsonl(work / "calibration.jsonl", [{"text": e.text} for e in suite.calibration] + [{"text": t} for t in heldout])
    _jsonl(
        work / "train.jsonl",
        [{"prompt": e.prompt, "completion": suite.separator + e.targets[0]} for e in suite.task_train],
    )
    # LLaMA-Factory reads its data through dataset_info.json (alpaca columns), the same pairs
    (work / "lf_data").mkdir(exist_ok=True)
    # (the "empty" template adds no EOS after the response; TRL appends one to every completion)
    (work / "lf_data" / "addition.json").write_text(
        json.dumps(
            [
                {"instruction": e.prompt, "input": "", "output": suite.separator + e.targets[0] + tokenizer.eos_token}
                for e in suite.task_train
            ]
        )
    )
    (work / "lf_data" / "dataset_info.json").write_text(json.dumps({"addition": {"file_name": "addition.json"}}))
    meta = {
        "model": str(folder),
        "model_name": suite.model,
        "task": TASK,
        "steps": STEPS,
        "batch": GLOBAL_BATCH,
        "learning_rate": LEARNING_RATE,
        "rank": RANK,
        "knowledge": {},
        "task_base": {},
    }
    examples = {
        "knowledge": [[e.prompt, list(e.targets)] for e in suite.knowledge],
        "task": [[e.prompt, list(e.targets)] for e in suite.task_eval],
    }
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
    trainer_fn = {"trl": train_trl, "peft": train_peft, "axolotl": train_axolotl, "llamafactory": train_llamafactory}[
        args.framework
    ]
    command = trainer_fn(args, work, run, meta, kind)
    if int(os.environ.get("RANK", "0")) == 0:
        if command is None:  # this process is the run
            launcher = os.environ.get("LORA_NULL_LAUNCHER", "python")
            command = f"{launcher} {' '.join(shlex.quote(a) for a in sys.argv)}"
        (run / "train.json").write_text(
            json.dumps(
                {
                    "framework": args.framework,
                    "setup": args.setup,
                    "init": args.init,
                    "kind": kind,
                    "gpus": SETUPS[args.setup][1],
                    "seconds": time.perf_counter() - started,
                    "command": command,
                    "versions": versions(),
                }
            )
        )


def versions() -> dict[str, str]:
    """The stack this run imported (each framework has its own, staged by device.sh)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in (
        "torch",
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "datasets",
        "bitsandbytes",
        "deepspeed",
        "axolotl",
        "llamafactory",
    ):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def run_dir(args) -> Path:
    return Path(args.work) / "runs" / f"{args.framework}-{args.setup}-{args.init}"


def calibration_keys(args, work: Path) -> dict:
    """The LoRA-Null keys a run adds: the key, the calibration file unless the setup is the key alone, and for
    lora_null_plain the key that turns task data off."""
    if args.init not in OURS:
        return {}
    keys = {"adapter_init": "lora_null"}
    if args.init == "lora_null_plain":
        keys["lora_null_task_data"] = "none"
    if "_graphed" in args.setup:
        keys["lora_null_generated_decoding"] = "graphed"
    if not args.setup.endswith("_onekey"):
        keys["lora_null_calibration"] = str(work / "calibration.jsonl")
        # every question when prepare added the held-out probes (a wider model), less the default 32 held out
        rows = sum(1 for _ in (work / "calibration.jsonl").open())
        if rows > 256 + 32:
            keys["lora_null_num_samples"] = rows - 32
    return keys


def train_trl(args, work: Path, run: Path, meta: dict, kind: str) -> None:
    from datasets import load_dataset
    from lora_null_trl import LoraNullSFTConfig, LoraNullSFTTrainer
    from transformers import AutoTokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    keys = calibration_keys(args, work)
    config = LoraNullSFTConfig(
        output_dir=str(run / "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=max(1, STEPS // 20),
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=True,
        max_length=MAX_LENGTH,
        completion_only_loss=True,
        seed=0,
        data_seed=0,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        deepspeed=str(ZERO3) if args.setup.startswith("zero3") else None,
        **keys,
    )
    # After the arguments: under ZeRO-3 they make from_pretrained partition the weights as they load.
    model = load_base(meta["model"], kind)
    tokenizer = AutoTokenizer.from_pretrained(meta["model"])
    trainer = LoraNullSFTTrainer(
        model=model,
        args=config,
        train_dataset=load_dataset("json", data_files=str(work / "train.jsonl"))["train"],
        processing_class=tokenizer,
        peft_config=lora_config(),
        callbacks=[MemoryProbe(work / "probe.pt", run)],
    )
    record_weights_at_init(trainer.model, run)  # the adapter is built; FSDP has not wrapped (or broadcast) yet
    trainer.train()
    trainer.save_model(str(run / "adapter"))


def record_weights_at_init(model: torch.nn.Module, run: Path) -> None:
    """Whether this rank's base weights were meta tensors when the adapter was built: under FSDP's
    cpu_ram_efficient_loading every rank but 0 must hold them, so rank 0 initialized alone (collect puts the ranks'
    answers in the row, `meta_weights_at_init_by_rank`)."""
    rank = int(os.environ.get("RANK", "0"))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    meta = any(p.is_meta for p in base.parameters())
    (run / f"at_init_rank{rank}.json").write_text(json.dumps({"rank": rank, "meta_weights": meta}))


def weights_at_init(run: Path) -> list[bool] | None:
    """Each rank's record_weights_at_init answer, in rank order; None where the run wrote none."""
    answers = [json.loads(path.read_text()) for path in run.glob("at_init_rank*.json")]
    return [answer["meta_weights"] for answer in sorted(answers, key=lambda a: a["rank"])] or None


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
    config.init_lora_weights = args.init not in OURS
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    if args.init in OURS:  # PEFT's entry reads no task data: both are the plain null space
        keys = calibration_keys(args, work)  # no calibration: the model's own text
        settings = {"num_samples": keys["lora_null_num_samples"]} if "lora_null_num_samples" in keys else {}
        initialize_lora_null_weights(
            peft_model, keys.get("lora_null_calibration"), tokenizer, LoraNullConfig(**settings)
        )
    rows = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    examples = [Example(row["prompt"], (row["completion"][1:],)) for row in rows]
    fine_tune(peft_model, tokenizer, examples, TrainSettings(STEPS, GLOBAL_BATCH, LEARNING_RATE, MAX_LENGTH), seed=0)
    torch.save(probe_logits(peft_model, torch.load(work / "probe.pt"), "cuda"), run / LOGITS_FILE)
    from memory_probe import lora_factors

    torch.save(lora_factors(peft_model), run / FACTORS_FILE)
    peft_model.save_pretrained(run / "adapter")


def framework_env(work: Path, run: Path) -> dict[str, str]:
    """The environment a framework's own CLI runs in: the probe's paths, this folder importable, offline."""
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "LORA_NULL_PROBE": str(work / "probe.pt"),
        "LORA_NULL_RUN_DIR": str(run),
        "PYTHONPATH": path,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
        "DISABLE_VERSION_CHECK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_cli(command: list[str], config: dict, work: Path, run: Path, suffix: str, after: tuple = ()) -> str:
    """Write the run's config, run the framework's CLI on it (its output into the run's log), return the command."""
    import subprocess

    import yaml

    path = run / f"config.{suffix}"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [*command, str(path), *after]
    with open(run / "framework.log", "w") as log:
        result = subprocess.run(command, env=framework_env(work, run), stdout=log, stderr=subprocess.STDOUT, cwd=run)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}; see {run / 'framework.log'}")
    return " ".join(shlex.quote(c) for c in command)


def axolotl_setup_keys(setup: str) -> dict:
    """What a setup changes in Axolotl's config: ZeRO-3's DeepSpeed file, and Axolotl's fused LoRA kernels (on by
    default on a GPU) off under ZeRO-3, where they failed for plain LoRA too ("self and mat2 must have the same dtype,
    but got BFloat16 and Float"), and in the `_nokernels` setups, which ask whether they make the bf16 reload gap."""
    keys: dict = {}
    if setup.startswith("zero3") or "_nokernels" in setup:
        keys.update(lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False)
    if setup.startswith("zero3"):
        keys["deepspeed"] = str(ZERO3)
    return keys


def train_axolotl(args, work: Path, run: Path, meta: dict, kind: str) -> str:
    """The real `axolotl train config.yml`, with Axolotl's usual GPU settings on (bf16, gradient checkpointing,
    sdpa attention, sample packing); the probe enters as one more plugin."""
    from transformers import AutoTokenizer

    eos, world = AutoTokenizer.from_pretrained(meta["model"]).eos_token, SETUPS[args.setup][1]
    config = {
        "base_model": meta["model"],
        "output_dir": str(run / "adapter"),
        "dataset_prepared_path": str(run / "prepared"),
        "datasets": [
            {
                "path": str(work / "train.jsonl"),
                "ds_type": "json",
                "type": {
                    "field_instruction": "prompt",
                    "field_output": "completion",
                    "format": "{instruction}",
                    "no_input_format": "{instruction}",
                },
            }
        ],
        "train_on_inputs": False,
        "val_set_size": 0,
        "sequence_len": MAX_LENGTH,
        "sample_packing": True,
        "adapter": "qlora" if kind == "nf4" else "lora",
        "load_in_4bit": kind == "nf4",
        "lora_r": RANK,
        "lora_alpha": RANK,
        "lora_dropout": 0.0,
        "lora_target_linear": True,
        "micro_batch_size": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "max_steps": STEPS,
        "learning_rate": LEARNING_RATE,
        "lr_scheduler": "linear",
        "warmup_steps": max(1, STEPS // 20),
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optimizer": "adamw_torch",
        "bf16": True,
        "tf32": True,
        "gradient_checkpointing": True,
        "attn_implementation": "sdpa",
        "seed": 0,
        "logging_steps": 10,
        "save_strategy": "no",
        "save_safetensors": True,
        "special_tokens": {"pad_token": eos},
        "dataset_num_proc": 1,
        "plugins": ["lora_null_axolotl.LoraNullPlugin", "memory_probe.MemoryProbePlugin"],
    }
    config.update(axolotl_setup_keys(args.setup), **calibration_keys(args, work))
    port = os.environ.get("MASTER_PORT", "29500")  # runs side by side each need their own
    # Axolotl starts its own workers (accelerate launch, with what follows "--"); several GPUs are its usual DDP, or
    # ZeRO-3 over them
    workers = ("--multi_gpu", "--num_processes", str(world)) if world > 1 else ()
    return run_cli(
        ["axolotl", "train"],
        config,
        work,
        run,
        "yml",
        after=("--launcher", "accelerate", "--", "--main_process_port", port, *workers),
    )


def train_llamafactory(args, work: Path, run: Path, meta: dict, kind: str) -> str:
    """LLaMA-Factory's own SFT through the plugin's launcher (`lora-null-llamafactory train`, LLaMA-Factory's
    read_args + run_exp). The bf16 row's keys start from what LLaMA Board writes when LoRA-Null v2 is chosen
    (configs/llamaboard_lora_null.yaml); only the paths and the matrix's shared settings are put over them."""
    import yaml

    world = SETUPS[args.setup][1]
    config = yaml.safe_load((HERE / "configs" / "llamaboard_lora_null.yaml").read_text())
    config.update(
        {
            "model_name_or_path": meta["model"],
            "dataset_dir": str(work / "lf_data"),
            "dataset": "addition",
            "template": "empty",
            "output_dir": str(run / "adapter"),
            "cutoff_len": MAX_LENGTH,
            "lora_rank": RANK,
            "lora_alpha": RANK,
            "lora_dropout": 0.0,
            "lora_target": "all",
            "per_device_train_batch_size": GLOBAL_BATCH // world,
            "gradient_accumulation_steps": 1,
            "max_steps": STEPS,
            "learning_rate": LEARNING_RATE,
            "lr_scheduler_type": "linear",
            "warmup_steps": max(1, STEPS // 20),
            "max_grad_norm": 1.0,
            "bf16": True,
            "seed": 0,
            "logging_steps": 10,
            "report_to": "none",
            "plot_loss": False,
            "overwrite_output_dir": True,
            "preprocessing_num_workers": 1,
            "save_strategy": "no",
        }
    )
    for key in ("num_train_epochs", "max_samples", "warmup_ratio", "fp16", "pure_bf16"):
        config.pop(key, None)
    if kind == "nf4":
        config.update(quantization_bit=4, quantization_method="bnb", double_quantization=True)
    if args.setup.startswith("zero3"):
        config["deepspeed"] = str(ZERO3)
    if args.init in OURS:
        config.update(lora_null_variant="v2", **calibration_keys(args, work))
        if args.setup.endswith("_onekey"):
            config.pop("lora_null_calibration", None)  # LLaMA Board's YAML names one; the key alone has none
    else:
        config = {k: v for k, v in config.items() if not (k == "adapter_init" or k.startswith("lora_null_"))}
    launcher = [sys.executable, "-m", "memory_probe", "llamafactory"]
    if args.setup.startswith("zero3") or world > 1:
        # each a torchrun worker (LOCAL_RANK set): what FORCE_TORCHRUN=1 (or several GPUs) makes of the launcher
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(world),
            "--master_port",
            os.environ.get("MASTER_PORT", "29500"),
            "-m",
            "memory_probe",
            "llamafactory",
        ]
    return run_cli(launcher, config, work, run, "yaml")


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
    base = load_base(base_name, trained["kind"], on_gpu=True, dtype=quantized_from(run, trained["kind"]))
    model = PeftModel.from_pretrained(base, run / "adapter")
    tokenizer = pad_with_eos(AutoTokenizer.from_pretrained(base_name))
    probe = torch.load(work / "probe.pt")
    memory, mask = torch.load(run / LOGITS_FILE), probe["attention_mask"].bool()

    def error_against_memory(reference: torch.Tensor) -> float:
        loaded = probe_logits(model, probe, "cuda")
        return float((loaded[mask] - reference[mask]).norm() / reference[mask].norm())

    rel_err, extra = error_against_memory(memory), {}
    if (run / BASE_LOGITS_FILE).is_file():  # the framework's own forward, adapter off, against the standard one
        with model.disable_adapter():
            extra["base_rel_err"] = error_against_memory(torch.load(run / BASE_LOGITS_FILE))
    examples = json.loads((work / "eval.json").read_text())
    known = [
        Example(p, tuple(t))
        for i, (p, t) in enumerate(examples["knowledge"])
        if i in set(meta["knowledge"][trained["kind"]])
    ]
    task = [Example(p, tuple(t)) for p, t in examples["task"]]
    kept, _ = accuracy(model, tokenizer, known, KNOWLEDGE_TOKENS, 128)
    score, _ = accuracy(model, tokenizer, task, TASK_TOKENS, 128, match=exact_match)
    if (run / DTYPES_FILE).is_file():  # last: every parameter in the dtype it had in memory (floats only; nf4 stays)
        dtypes = json.loads((run / DTYPES_FILE).read_text())
        for name, param in model.named_parameters():
            if param.dtype.is_floating_point and name in dtypes:
                param.data = param.data.to(getattr(torch, dtypes[name]))
        extra["output_rel_err_as_trained"] = error_against_memory(memory)
    row = {
        **trained,
        "model": meta["model_name"],
        "base_model_name_or_path": base_name,
        "output_rel_err": rel_err,
        **extra,
        "adapter_max_rel_diff": saved_against_memory(run),
        "lora_a_moved": lora_a_moved(run),
        "knowledge_kept": kept,
        "knowledge_base_known": len(known),
        "task_score": score,
        "task_score_base": meta["task_base"][trained["kind"]],
        "device": torch.cuda.get_device_name(),
    }
    (run / "row.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row))


def quantized_from(run: Path, kind: str) -> torch.dtype:
    """The dtype a QLoRA run's framework quantized its base from, so the reload quantizes the same weights: 4-bit
    codes and scales drawn from float32 weights differ from those drawn from the same weights rounded to bf16 (0.4 %
    of SmolLM2's codes; its logits then differ by 0.05, as much as LLaMA-Factory's QLoRA base gap). LLaMA-Factory
    loads the checkpoint's float32 and quantizes that; its embeddings stay float32 in memory, which tells it. bf16
    otherwise, and for bf16 runs (their dtypes in memory are compared as trained)."""
    path = run / DTYPES_FILE
    if kind != "nf4" or not path.is_file():
        return torch.bfloat16
    dtypes = json.loads(path.read_text())
    embeddings = [dtype for name, dtype in dtypes.items() if name.endswith("embed_tokens.weight")]
    return torch.float32 if embeddings == ["float32"] else torch.bfloat16


def saved_against_memory(run: Path):
    """The largest relative difference between a saved LoRA factor and the same factor in memory at the end of
    training (0: the save holds exactly what trained); a string when the save lacks some."""
    from safetensors.torch import load_file

    saved, memory = load_file(run / "adapter" / "adapter_model.safetensors"), torch.load(run / FACTORS_FILE)
    missing = [k for k in memory if k not in saved]
    if missing:
        return f"missing {len(missing)} of {len(memory)}, e.g. {missing[0]}"
    return max(
        float((saved[k].float() - m.to(saved[k].dtype).float()).norm() / max(float(m.float().norm()), 1e-12))
        for k, m in memory.items()
    )


def lora_a_moved(run: Path):
    """For LoRA-Null: the saved lora_A against the one the init wrote (the plugin's lora_null_init folder: TRL's in
    its trainer folder, Axolotl's and LLaMA-Factory's in the output folder), in the saved dtype, relative; 0 for a
    frozen A saved whole. None for LoRA."""
    from safetensors.torch import load_file

    inits = [
        run / where / "lora_null_init" / "adapter" / "adapter_model.safetensors" for where in ("trainer", "adapter")
    ]
    init = next((path for path in inits if path.is_file()), None)
    if init is None:
        return None
    before, after = load_file(init), load_file(run / "adapter" / "adapter_model.safetensors")
    keys = [k for k in before if "lora_A" in k]
    missing = [k for k in keys if k not in after]
    if missing:
        return f"missing {len(missing)} of {len(keys)}"
    change = sum(float((after[k].float() - before[k].to(after[k].dtype).float()).norm() ** 2) for k in keys)
    return (change / sum(float(before[k].float().norm() ** 2) for k in keys)) ** 0.5


# ---------------------------------------------------------------- collect
REQUIRED = {
    "trl": [
        "bf16",
        "qlora4",
        "zero3_1",
        "ddp2",
        "fsdp2",
        "fsdp2_ram_efficient",
        "zero3_2",
        "bf16_onekey",
        "qlora4_onekey",
        "zero3_1_onekey",
        "bf16_graphed_onekey",
        "qlora4_graphed_onekey",
    ],
    "axolotl": [
        "bf16",
        "qlora4",
        "zero3_1",
        "ddp2",
        "zero3_2",
        "qlora4_onekey",
        "bf16_onekey",
        "zero3_1_onekey",
        "bf16_nokernels",
        "bf16_nokernels_onekey",
        "bf16_graphed_onekey",
        "qlora4_graphed_onekey",
    ],
    "llamafactory": [
        "bf16",
        "qlora4",
        "zero3_1",
        "ddp2",
        "bf16_onekey",
        "qlora4_onekey",
        "zero3_1_onekey",
        "bf16_graphed_onekey",
        "qlora4_graphed_onekey",
    ],
    "peft": ["qlora4"],
}


def collect(args) -> None:
    """The matrix: one row per framework × setup × LoRA-Null init that ran, LoRA's numbers beside it. Status pass when
    the reload reproduces the model (`reload`, see reload_match), a v2 lora_A was saved as the init wrote it, and
    LoRA-Null kept more knowledge than LoRA with at least 0.95× its task score; fail otherwise or when a run left
    no row (its log says why). Rows already in the output that this work folder did not run are kept."""
    work, output = Path(args.work), Path(args.output)
    rows = []
    for framework, setups in REQUIRED.items():
        for setup, init in ((setup, init) for setup in setups for init in OURS):
            ours, lora = (_row(work, f"{framework}-{setup}-{name}") for name in (init, "lora"))
            lora = lora or base_setups_lora(work, framework, setup)
            # a LoRA run alone is one failed row, unless ours never started: a `_onekey` row's LoRA trained alone
            if ours is None and (lora is None or init != "lora_null" or not started(work, framework, setup, init)):
                continue
            row = {
                "framework": framework,
                "setup": setup,
                "model": (ours or lora or {}).get("model"),
                "init": init,
                "gpus": SETUPS[setup][1],
                "device": (ours or lora or {}).get("device"),
            }
            for key in (
                "output_rel_err",
                "output_rel_err_as_trained",
                "base_rel_err",
                "adapter_max_rel_diff",
                "lora_a_moved",
                "task_score",
                "knowledge_kept",
                "seconds",
                "command",
                "knowledge_base_known",
                "task_score_base",
                "versions",
            ):
                row[key] = (ours or {}).get(key)
            for key in (
                "knowledge_kept",
                "task_score",
                "output_rel_err",
                "output_rel_err_as_trained",
                "base_rel_err",
                "adapter_max_rel_diff",
                "command",
            ):
                row[f"{key}_lora"] = (lora or {}).get(key)
            ours_dir = work / "runs" / f"{framework}-{setup}-{init}"
            row["meta_weights_at_init_by_rank"] = weights_at_init(ours_dir)
            row["init_task_data"] = init_task_data(ours_dir)
            row["reload"] = reload_match(ours, lora)
            row.update(meter_cost(work, f"{framework}-{setup}-{init}"))
            row["status"] = "pass" if passes(ours, lora) else "fail"
            rows.append({k: v for k, v in row.items() if v is not None})
    done = {_key(row) for row in rows}
    earlier = json.loads(output.read_text())["runs"] if output.is_file() else []
    rows = [row for row in earlier if _key(row) not in done] + rows
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    for row in rows:
        print(
            f"{row['framework']:13} {row['setup']:20} {row['status']:5} err {row.get('output_rel_err')} "
            f"kept {row.get('knowledge_kept')} vs {row.get('knowledge_kept_lora')}  task {row.get('task_score')} "
            f"vs {row.get('task_score_lora')}"
        )


def meter_cost(work: Path, name: str) -> dict[str, float | str]:
    """What the forgetting meter's readings took in a run (its last `forgetting/seconds`, the running total) and the
    trainer's `train_runtime`, from the log the trainer printed (TRL's run log; Axolotl's and LLaMA-Factory's
    framework.log): the meter's cost on a real model and step, in the framework's own run, at the default pace (which
    since 2026-12-07 budgets the whole run, the last reading included: `meter_pace`)."""
    found: dict[str, float | str] = {}
    for log in (work / "logs" / f"{name}.log", work / "runs" / name / "framework.log"):
        text = log.read_text(errors="replace") if log.is_file() else ""
        for key, field in (("forgetting/seconds", "meter_seconds"), ("train_runtime", "train_runtime")):
            values = re.findall(rf"'{key}': '?([0-9.]+)", text)
            if values:
                found[field] = float(values[-1])
    return {**found, "meter_pace": "default"} if len(found) == 2 else {}


def init_task_data(run: Path) -> dict | str | None:
    """What the run's init read as task data (its lora_null.json), "none" for the plain null space: the rows say
    which A they measured (beside a calibration file the default reads the training set since 2026-12-05)."""
    records = sorted(run.glob("**/lora_null_init/lora_null.json"))
    if not records:
        return None
    return json.loads(records[0].read_text())["calibration"].get("task_data") or "none"


def _key(row) -> tuple:
    """A row is one framework × setup × model × init: a second model's rows sit beside the first's, the plain null
    space's beside the default's."""
    return row["framework"], row["setup"], row.get("model"), row["init"]


def reload_match(ours, lora):
    """How the saved folder reproduces the model trained: "exact" when it does to 1e-3 (loaded the standard way or
    in the dtypes it trained in); "as plain LoRA" when the saved factors equal those in memory bit for bit and the
    reload is no further off than plain LoRA's through the same framework and setup: the framework then computes
    differently from a standard forward (fused kernels, autocast over float32 weights; base_rel_err shows it with the
    adapter off), which no save can carry; None otherwise. That gap moves with the weights trained (two trainings of
    one LLaMA-Factory setup: 0.0135 and 0.0146), so "no further off" allows 20% of LoRA's gap, plus 1e-3."""

    def closest(row):
        errors = [row.get(key) for key in ("output_rel_err", "output_rel_err_as_trained")]
        return min((e for e in errors if isinstance(e, (int, float))), default=float("inf"))

    if ours is None:
        return None
    if closest(ours) <= 1e-3:
        return "exact"
    if lora is not None and ours.get("adapter_max_rel_diff") == 0 and closest(ours) <= 1.2 * closest(lora) + 1e-3:
        return "as plain LoRA"
    return None


def passes(ours, lora) -> bool:
    if ours is None or lora is None:
        return False
    frozen_a_whole = ours.get("lora_a_moved") == 0
    return (
        reload_match(ours, lora) is not None
        and frozen_a_whole
        and ours["knowledge_kept"] > lora["knowledge_kept"]
        and ours["task_score"] >= 0.95 * lora["task_score"]
    )


def base_setups_lora(work: Path, framework: str, setup: str):
    """The key alone changes nothing for plain LoRA, so a `_onekey` setup with no LoRA run of its own compares with
    its base setup's (`bf16` for `bf16_onekey` and `bf16_graphed_onekey`): one LoRA training less (device.sh trains
    it once)."""
    base = setup.removesuffix("_onekey").removesuffix("_graphed")
    return _row(work, f"{framework}-{base}-lora") if setup.endswith("_onekey") else None


def started(work: Path, framework: str, setup: str, init: str) -> bool:
    """Whether device.sh started this run (its log), so a missing row is a failure, not a run never asked for."""
    return (work / "logs" / f"{framework}-{setup}-{init}.log").is_file()


def _row(work: Path, name: str):
    path = work / "runs" / name / "row.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="action", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("--gguf", required=True)
    p.add_argument("--name", default="smollm2-135m-instruct-q4_1", help="The model's name in the rows.")
    p.add_argument("--work", required=True)
    p.add_argument(
        "--calibration-with-heldout",
        action="store_true",
        help="Calibrate on the 500 held-out probes too (disjoint from the knowledge probes): 256 questions "
        "give fewer tokens than a wider model's down_proj has inputs (Qwen2.5-0.5B: 4,864).",
    )
    t = commands.add_parser("train")
    t.add_argument("--framework", choices=FRAMEWORKS, required=True)
    t.add_argument("--setup", choices=tuple(SETUPS), required=True)
    t.add_argument("--init", choices=INITS, required=True)
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
