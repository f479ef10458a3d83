"""Time LoRA-Null initialization against PEFT's CorDA-kpm preprocessing on model shapes with random weights.

The cost of calibration and decomposition does not depend on the weights' values, so a Llama-2-7B or
-70B shape built from its config stands in for the real model. One run measures every method side by side:

    python benchmarks/speed/bench_speed.py --shape llama2-7b --methods lora_null,peft_corda_kpm
    python benchmarks/speed/bench_speed.py --shape llama2-70b --methods lora_null --solver subspace --max-blocks 8
    torchrun --nproc-per-node 2 benchmarks/speed/bench_speed.py --shape llama2-7b --methods lora_null

Prints a table, a ratio against CorDA when both ran, and appends rows to the results JSON
(benchmarks/results/speed.json by default). Peak GPU memory is torch's max_memory_allocated over the call.
`lora_null_offload` keeps the weights in CPU memory and streams one block at a time to the GPU;
`lora_null_self` gives no calibration text, so the model first samples its own (as many samples and tokens as
the given set: compare with `lora_null` at the same --seq-len; `lora_null_self_graphed` draws them with
`generated_decoding: graphed`); `lora_null_task` gives task data beside the calibration text (as many samples,
as long), so A is task-aware; `lora_null_cache` runs twice with a covariance
cache (the first run writes it, the second skips calibration);
`lora_null_disk` saves the model first and times `--offload disk` (blocks read from the shards);
`profile`/`profile_offload` split one run's time and peak GPU memory by phase; with
--max-blocks N only the first N blocks are processed (weights materialized per block on the GPU) and
the blocks' time is extrapolated to all blocks (the setup before the first block counted once), which the
row says. Under torchrun each process holds the model on its
own GPU and lora-null shards the calibration across them (NCCL); the time is rank 0's from a barrier before the
init to one after it, the peak the largest of any rank, and the row's `gpus` says how many.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig

from lora_null_core import LoraNullConfig, lora_null_init
from lora_null_core.null_space import null_basis

SHAPES = {
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama2-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "tiny": dict(  # widths multiples of 64: bitsandbytes' CPU repacking of 4-bit weights needs them
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose words are w0 … wN: random texts become random token ids, locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )


def random_texts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab_size, (count, length - 1), generator=generator)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def build_model(shape: str, device: str, dtype: torch.dtype, meta_blocks: bool = False):
    """Llama of the given shape with N(0, 0.02) weights. meta_blocks: decoder blocks stay on the meta device
    (materialized later, one at a time, by RandomBlocks) so a model larger than any memory can be streamed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    if meta_blocks:
        blocks = model.model.layers
        model.model.layers = torch.nn.ModuleList()
        model.to_empty(device=device)
        model.model.layers = blocks
        _randomize(model, device)
    else:
        # Weights for the CPU are drawn on a GPU where there is one and copied down: a 7B's draw on the CPU
        # takes minutes, the copy seconds. The values differ from a CPU draw; the timing does not depend on them.
        draw_on = "cuda" if device == "cpu" and torch.cuda.is_available() else device
        model.to_empty(device=draw_on)
        _randomize(model, draw_on)
        model.to(device)
    with torch.device(device):  # its inv_freq buffer is computed at construction, so not from meta
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def _randomize(module: torch.nn.Module, device) -> None:
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.device.type == "meta":
                continue
            if name.endswith("norm.weight") or "layernorm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)


class RandomBlocks:
    """Block loader for meta blocks: random weights appear on the GPU for the block's turn, then vanish."""

    def __init__(self, dtype: torch.dtype, max_blocks: int) -> None:
        self.dtype, self.max_blocks = dtype, max_blocks
        self.first_load: float | None = None  # when the first block came in: what comes before is paid once

    def load(self, index: int, block: torch.nn.Module, device: torch.device) -> None:
        if self.first_load is None:
            gpu_sync()
            self.first_load = time.perf_counter()
        if index >= self.max_blocks:
            raise _Done
        block.to_empty(device=device)
        _randomize(block, device)
        block.to(self.dtype)
        for name, param in block.named_parameters():  # LoRA factors stay fp32, as PEFT keeps them
            if "lora_" in name:
                param.data = param.data.float()

    def unload(self, index: int, block: torch.nn.Module) -> None:
        block.to_empty(device="meta")


class _Done(Exception):
    pass


def start_processes() -> int:
    """Under torchrun: one process per GPU in an NCCL group (gloo on a CPU); returns the number of processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def gpu_sync() -> None:
    """Wait for this GPU, then (several processes) for every process."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def peak_gib() -> float:
    """The largest peak of any process's GPU."""
    if not torch.cuda.is_available():
        return float("nan")
    peak = torch.tensor(float(torch.cuda.max_memory_allocated()), device="cuda")
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item() / 2**30


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def batching(args) -> dict:
    """Only the batching and overlap flags given: the rest is the config's default (the same script times older
    cores)."""
    given = (("batch_size", args.batch_size), ("batch_tokens", args.batch_tokens), ("overlap", args.overlap))
    return {k: v for k, v in given if v}


def time_lora_null(
    args,
    texts,
    tokenizer,
    solver: str,
    offload: bool,
    device: str,
    cache: str | None = None,
    method: str | None = None,
    own_text: bool = False,
    task: bool = False,
) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    blocks = SHAPES[args.shape]["num_hidden_layers"]
    limited = bool(args.max_blocks) and args.max_blocks <= blocks  # weights materialized block by block
    model = build_model(args.shape, "cpu" if offload and not limited else device, dtype, meta_blocks=bool(limited))
    loader = RandomBlocks(dtype, args.max_blocks) if limited else None
    config = LoraNullConfig(
        num_samples=args.num_samples,
        holdout_samples=0,
        max_length=args.seq_len,
        solver=solver,
        streaming="on",
        covariance_cache=cache,
        generated_length=args.generated_length or args.seq_len,
        **batching(args),
        **({"generated_decoding": "graphed"} if method == "lora_null_self_graphed" else {}),
    )
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
    # Task data as long as the calibration text, drawn apart from it: A is then task-aware.
    task_data = random_texts(args.num_samples, args.seq_len, SHAPES[args.shape]["vocab_size"], seed=1) if task else None
    reset_peak()
    gpu_sync()
    start = time.perf_counter()
    try:
        lora_null_init(
            model,
            lora,
            None if own_text else texts,
            tokenizer,
            config,
            execution_device=device,
            block_loader=loader,
            **({"task_data": task_data} if task else {}),
        )
        done = blocks
    except _Done:
        done = args.max_blocks
    gpu_sync()
    seconds = time.perf_counter() - start
    if done < blocks:  # the setup before the first block is paid once; the blocks' time scales with their number
        setup = loader.first_load - start
        total = setup + (seconds - setup) * blocks / done
    row = {
        "method": method or ("lora_null_offload" if offload or limited else "lora_null"),
        "solver": solver,
        "seconds": total if done < blocks else seconds,
        "peak_gpu_gib": peak_gib(),
        "blocks_timed": done,
        "seconds_timed": seconds,
    }
    if done < blocks:
        row["note"] = (
            f"{done} of {blocks} blocks timed ({seconds:.1f} s, of which {setup:.1f} s before the first "
            "block), the blocks' time extrapolated linearly"
        )
    del model
    return row


def time_lora_null_disk(args, texts, tokenizer, solver: str, device: str) -> dict:
    """`lora-null init --offload disk` on a checkpoint written first (not timed): blocks read from the shards in
    turn, the residual base and adapter written to a folder. Host memory: the peak RSS growth over the call."""
    from lora_null_core.frontends.jobs import init_to_folder

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory(dir=args.cache_root) as work:
        model = build_model(args.shape, device, dtype)
        model.save_pretrained(Path(work) / "model")
        tokenizer.save_pretrained(Path(work) / "model")
        del model
        reset_peak()
        config = LoraNullConfig(
            num_samples=args.num_samples, holdout_samples=0, max_length=args.seq_len, solver=solver, **batching(args)
        )
        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS)
        with HostPeak() as host:
            gpu_sync()
            start = time.perf_counter()
            init_to_folder(
                str(Path(work) / "model"),
                texts,
                Path(work) / "out",
                lora,
                config,
                dtype="auto",
                device=device,
                offload="disk",
            )
            gpu_sync()
            seconds = time.perf_counter() - start
    return {
        "method": "lora_null_disk",
        "solver": solver,
        "seconds": seconds,
        "peak_gpu_gib": peak_gib(),
        "blocks_timed": SHAPES[args.shape]["num_hidden_layers"],
        "note": f"reads the checkpoint and writes the init folder; host RSS grew by {host.gib:.1f} GiB at peak "
        "(sampled every 50 ms)",
    }


class HostPeak:
    """Peak growth of this process's resident memory while the block runs (sampled every 50 ms)."""

    def __enter__(self):
        import threading

        self.start, self.peak, self._stop = _rss(), 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss() - self.start)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.gib = max(self.peak, _rss() - self.start) / 2**30


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def profile_lora_null(args, texts, tokenizer, solver: str, offload: bool, device: str) -> list[dict]:
    """Seconds and peak GPU memory of each phase of one lora_null run, from the pipeline's phase events
    (lora_null_core.init.phases; the GPU is synchronized at each phase's start and end)."""
    from lora_null_core.init import phases

    totals = {name: {"seconds": 0.0, "peak_gpu_gib": float("nan"), "calls": 0} for name in phases.ALL}

    class Timer:
        def begin(self, name: str) -> None:
            gpu_sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

        def end(self, name: str) -> None:
            gpu_sync()
            entry = totals[name]
            entry["seconds"] += time.perf_counter() - self.start
            entry["peak_gpu_gib"] = (
                peak_gib() if math.isnan(entry["peak_gpu_gib"]) else max(entry["peak_gpu_gib"], peak_gib())
            )
            entry["calls"] += 1

    with phases.observing(Timer()):
        row = time_lora_null(args, texts, tokenizer, solver, offload, device)
    rows = [{"phase": name, **entry, "method": row["method"]} for name, entry in totals.items()]
    # The phases cover the blocks timed (--max-blocks), so the total is theirs, not the extrapolated one.
    timed = row["seconds_timed"]
    other = timed - sum(entry["seconds"] for entry in totals.values())
    # The phases reset the peak counter, so the run's peak is the largest phase peak.
    peak = max((entry["peak_gpu_gib"] for entry in totals.values()), default=float("nan"))
    return [
        {
            "phase": "total",
            "seconds": timed,
            "peak_gpu_gib": peak,
            "calls": 1,
            "method": row["method"],
            "blocks_timed": row["blocks_timed"],
        },
        *rows,
        {
            "phase": "other (block moves, the function check, the report)",
            "seconds": other,
            "peak_gpu_gib": float("nan"),
            "calls": 0,
            "method": row["method"],
        },
    ]


def time_corda(args, texts, tokenizer, device: str) -> dict:
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build_model(args.shape, device, dtype)
    ids = tokenizer(texts, return_tensors="pt", truncation=True, max_length=args.seq_len)["input_ids"].to(device)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=TARGETS,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method="kpm"),
    )

    def run_model():  # PEFT's CorDA hook needs batch size 1
        with torch.no_grad():
            for row in ids:
                model(input_ids=row.unsqueeze(0))

    reset_peak()
    gpu_sync()
    start = time.perf_counter()
    preprocess_corda(model, lora, run_model=run_model)
    gpu_sync()
    row = {
        "method": "peft_corda_kpm",
        "solver": "peft",
        "seconds": time.perf_counter() - start,
        "peak_gpu_gib": peak_gib(),
        "blocks_timed": SHAPES[args.shape]["num_hidden_layers"],
    }
    return row


def solver_check(args, texts, tokenizer, device: str) -> list[dict]:
    """Seconds and bottom-r energy (vs exact float64 eigh) of each solver on real covariances of block 0."""
    from lora_null_core.calibration.batches import tokenize_batches
    from lora_null_core.calibration.covariances import collect_covariances

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build_model(args.shape, device, dtype)
    block = model.model.layers[0]
    modules = {
        f"layer0.{n}": getattr(block.self_attn if n.endswith(("q_proj", "o_proj")) else block.mlp, n)
        for n in ("q_proj", "o_proj", "gate_proj", "down_proj")
    }
    batches = tokenize_batches(texts, tokenizer, args.seq_len, args.batch_size or 16)
    covariances = collect_covariances(model, modules, batches)
    rows = []
    for key, cov in covariances.matrices.items():
        exact_energy = None
        for solver in ("eigh64", "eigh32", "subspace"):
            gpu_sync()
            start = time.perf_counter()
            basis = null_basis(cov, args.rank, solver)
            gpu_sync()
            seconds = time.perf_counter() - start
            c = cov.double()
            energy = float(torch.trace(basis.T @ c @ basis))
            exact_energy = exact_energy if exact_energy is not None else energy
            rows.append(
                {
                    "covariance": key,
                    "d": cov.shape[0],
                    "solver": solver,
                    "seconds": seconds,
                    "energy_vs_eigh64": energy / exact_energy if exact_energy > 0 else float("nan"),
                }
            )
    del model
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument(
        "--methods",
        default="lora_null,peft_corda_kpm",
        help="Comma list of lora_null, lora_null_task, lora_null_self, lora_null_self_graphed, lora_null_offload, "
        "lora_null_disk, lora_null_cache, peft_corda_kpm, solvers, profile, profile_offload.",
    )
    parser.add_argument("--cache-root", default=None, help="Temporary folder for lora_null_cache and lora_null_disk.")
    parser.add_argument("--solver", default="auto", help="Comma list of solvers for the lora_null runs.")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--generated-length",
        type=int,
        default=None,
        help="Tokens of each own-text sample for lora_null_self (default: --seq-len; users' default is 128).",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="Rows per calibration pass (default: the config's)."
    )
    parser.add_argument(
        "--batch-tokens", type=int, default=None, help="Padded tokens per pass (default: the config's)."
    )
    parser.add_argument(
        "--overlap",
        choices=["auto", "on", "off"],
        default=None,
        help="Solve block i while block i+1 calibrates (default: the config's).",
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--max-blocks",
        type=int,
        default=0,
        help="Materialize random weights one block at a time on the GPU (for models larger than memory) and time "
        "the first N blocks.",
    )
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    parser.add_argument("--command", default=None, help="The command line to record (default: this one).")
    args = parser.parse_args(argv)

    args.gpus = start_processes()
    if args.gpus > 1 and set(args.methods.split(",")) - {"lora_null", "lora_null_offload"}:
        parser.error("under torchrun only lora_null and lora_null_offload are timed")
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    command = args.command or "python " + " ".join(sys.argv)
    vocab = SHAPES[args.shape]["vocab_size"]
    tokenizer = word_tokenizer(vocab)
    texts = random_texts(args.num_samples, args.seq_len, vocab)
    rows, solver_rows = [], []
    for method in args.methods.split(","):
        if method in ("lora_null_self", "lora_null_self_graphed"):  # no calibration text: the model samples
            rows.append(  # num_samples × seq-len tokens first (graphed: generated_decoding graphed)
                time_lora_null(
                    args, texts, tokenizer, args.solver.split(",")[0], False, device, method=method, own_text=True
                )
            )
            record(args, rows[-1:], [], device_name, command)
        elif method == "lora_null_task":  # beside the calibration text, task data: a task-aware A
            for solver in args.solver.split(","):
                rows.append(time_lora_null(args, texts, tokenizer, solver, False, device, method=method, task=True))
                record(args, rows[-1:], [], device_name, command)
        elif method in ("lora_null", "lora_null_offload"):
            for solver in args.solver.split(","):
                rows.append(time_lora_null(args, texts, tokenizer, solver, method == "lora_null_offload", device))
                record(args, rows[-1:], [], device_name, command)
        elif method in ("profile", "profile_offload"):
            profile_rows = profile_lora_null(
                args, texts, tokenizer, args.solver.split(",")[0], method == "profile_offload", device
            )
            record_profile(args, profile_rows, device_name, command)
        elif method == "lora_null_disk":
            rows.append(time_lora_null_disk(args, texts, tokenizer, args.solver.split(",")[0], device))
            record(args, rows[-1:], [], device_name, command)
        elif method == "lora_null_cache":
            # The same init twice with a covariance cache: the first run writes it, the second only reads it.
            with tempfile.TemporaryDirectory(dir=args.cache_root) as cache:
                for step in ("write", "hit"):
                    rows.append(
                        time_lora_null(
                            args,
                            texts,
                            tokenizer,
                            args.solver.split(",")[0],
                            False,
                            device,
                            cache,
                            f"lora_null_cache_{step}",
                        )
                    )
                    record(args, rows[-1:], [], device_name, command)
        elif method == "peft_corda_kpm":
            rows.append(time_corda(args, texts, tokenizer, device))
            record(args, rows[-1:], [], device_name, command)
        elif method == "solvers":
            solver_rows = solver_check(args, texts, tokenizer, device)
            record(args, [], solver_rows, device_name, command)
        else:
            parser.error(f"unknown method {method}")

    main_process = is_main()
    if dist.is_initialized():
        dist.destroy_process_group()
    if not main_process:
        return 0
    print(
        f"\n{args.shape}, {args.num_samples}x{args.seq_len} calibration, r={args.rank}, {args.gpus} x {device_name}\n"
    )
    print("| method | solver | seconds | peak GPU GiB | note |\n| --- | --- | ---: | ---: | --- |")
    for row in rows:
        print(
            f"| {row['method']} | {row['solver']} | {row['seconds']:.1f} | {row['peak_gpu_gib']:.1f} | "
            f"{row.get('note', '')} |"
        )
    corda = next((r for r in rows if r["method"] == "peft_corda_kpm"), None)
    for row in rows:
        if corda and row is not corda:
            print(
                f"speed-up of {row['method']} ({row['solver']}) over CorDA-kpm: "
                f"{corda['seconds'] / row['seconds']:.1f}x"
            )
    if solver_rows:
        print("\n| covariance | d | solver | seconds | bottom-r energy / eigh64 |\n| --- | ---: | --- | ---: | ---: |")
        for row in solver_rows:
            print(
                f"| {row['covariance']} | {row['d']} | {row['solver']} | {row['seconds']:.3f} | "
                f"{row['energy_vs_eigh64']:.4f} |"
            )
    return 0


def record_profile(args, rows: list[dict], device_name: str, command: str) -> None:
    print(
        f"\n| phase ({rows[0]['method']}) | calls | seconds | peak GPU GiB in the phase |\n| --- | ---: | ---: | ---: |"
    )
    for row in rows:
        print(f"| {row['phase']} | {row['calls']} | {row['seconds']:.2f} | {row['peak_gpu_gib']:.2f} |")
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {"runs": []}
    existing.setdefault("profiles", []).extend(
        {
            **r,
            "seconds": round(r["seconds"], 3),
            "peak_gpu_gib": None if math.isnan(r["peak_gpu_gib"]) else round(r["peak_gpu_gib"], 2),
            "shape": args.shape,
            "device": device_name,
            "calibration": f"{args.num_samples}x{args.seq_len}",
            "rank": args.rank,
            "command": command,
        }
        for r in rows
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(existing, indent=1) + "\n")


def calibration_length(args, method: str) -> int:
    """Tokens a calibration sample holds: own-text samples are as long as they are drawn."""
    return (args.generated_length or args.seq_len) if method.startswith("lora_null_self") else args.seq_len


def record(args, rows: list[dict], solver_rows: list[dict], device_name: str, command: str) -> None:
    """Append to the results JSON as each measurement finishes, so a cut-off run keeps what it measured."""
    if not is_main():
        return
    for row in [*rows, *solver_rows]:
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {"runs": []}
    for row in rows:
        existing["runs"].append(
            {
                "shape": args.shape,
                "method": row["method"],
                "solver": row["solver"],
                "gpus": args.gpus,
                "device": device_name,
                "seconds": round(row["seconds"], 2),
                "peak_gpu_gib": None if math.isnan(row["peak_gpu_gib"]) else round(row["peak_gpu_gib"], 2),
                "calibration": f"{args.num_samples}x{calibration_length(args, row['method'])}",
                "rank": args.rank,
                "command": command,
                **({"note": row["note"]} if "note" in row else {}),
            }
        )
    existing.setdefault("solvers", []).extend(
        {**r, "shape": args.shape, "device": device_name, "command": command} for r in solver_rows
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(existing, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
