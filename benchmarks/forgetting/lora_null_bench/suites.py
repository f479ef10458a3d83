"""What one benchmark run needs: a base model, knowledge probes (calibration ∪ evaluation, disjoint), held-out
text, and a downstream task. Built either from the synthetic world (pretrained here, cached) or from files."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_null_core.errors import ConfigError
from lora_null_core.io.saving import atomic_output_dir

from . import world
from .evaluate import accuracy, contains_target, number_matches
from .train import TrainSettings, fine_tune
from .world import Example

logger = logging.getLogger(__name__)


@dataclass
class Suite:
    model: str
    load_base: Callable[[], torch.nn.Module]
    tokenizer: Any
    calibration: list[Example]
    knowledge: list[Example]
    heldout_text: list[str]
    task_train: list[Example]
    task_eval: list[Example]
    train: TrainSettings
    rank: int
    knowledge_tokens: int = 4
    task_tokens: int = 4
    task_match: Callable[[str, Sequence[str]], bool] = contains_target
    separator: str = " "
    eval_batch: int = 64
    setting: str = ""  # overrides of the size's defaults, e.g. "lr=0.01, r=64": rows differ from the default table
    heldout_answers: list[tuple[str, str]] = field(default_factory=list)  # the held-out rows as (question, answer)

    def task_texts(self) -> list[str]:
        """The training examples as fine-tuning reads them (prompt, separator, first answer)."""
        return [e.prompt + self.separator + e.targets[0] for e in self.task_train]


# ---------------------------------------------------------------- synthetic world
@dataclass(frozen=True)
class WorldSize:
    people: int
    hidden: int
    layers: int
    bios_per_person: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    calibration: int
    knowledge: int
    task_train: int
    task_eval: int
    finetune: TrainSettings
    rank: int


WORLD_SIZES = {
    "cpu": WorldSize(
        people=40,
        hidden=64,
        layers=2,
        bios_per_person=8,
        pretrain_steps=600,
        pretrain_batch=32,
        pretrain_lr=5e-3,
        calibration=64,
        knowledge=300,
        task_train=400,
        task_eval=100,
        finetune=TrainSettings(steps=60, batch_size=16, learning_rate=3e-3, max_length=64),
        rank=8,
    ),
    "gpu": WorldSize(
        people=1000,
        hidden=256,
        layers=4,
        bios_per_person=8,
        pretrain_steps=6000,
        pretrain_batch=256,
        pretrain_lr=2e-3,
        calibration=256,
        knowledge=2000,
        task_train=8000,
        task_eval=1000,
        finetune=TrainSettings(steps=400, batch_size=64, learning_rate=2e-3, max_length=64),
        rank=16,
    ),
}


def synthetic_suite(size: str, cache: Path, device: str, pretrain_seed: int = 0) -> Suite:
    """The embedded default: pretrain (once, cached) a small Llama on the synthetic world, then test on it."""
    from lora_null_core.frontends.toy_world import tiny_tokenizer

    spec = WORLD_SIZES[size]
    population = world.people(spec.people, seed=pretrain_seed)
    tokenizer = tiny_tokenizer([" ".join(world.vocabulary(population))])
    split = max(1, len(population) // 4)
    calibration_people, eval_people = population[:split], population[split:]
    calibration = [q for p in calibration_people for q in world.questions(p)]
    random.Random(pretrain_seed).shuffle(calibration)
    rng = random.Random(pretrain_seed + 7)
    task = world.word_problems(spec.task_train + spec.task_eval, seed=pretrain_seed + 1)
    folder = _pretrained_world_model(spec, population, tokenizer, cache, device, pretrain_seed)
    return Suite(
        model=f"synthetic-llama-{size}",
        load_base=lambda: _load(folder, device),
        tokenizer=tokenizer,
        calibration=calibration[: spec.calibration],
        knowledge=_sample([q for p in eval_people for q in world.questions(p)], spec.knowledge, pretrain_seed),
        heldout_text=[world.biography(p, rng) for p in eval_people],
        task_train=task[: spec.task_train],
        task_eval=task[spec.task_train :],
        train=spec.finetune,
        rank=spec.rank,
        eval_batch=256,
    )


def _pretrained_world_model(spec: WorldSize, population, tokenizer, cache: Path, device: str, seed: int) -> Path:
    key = hashlib.sha256(json.dumps([asdict(spec), seed], sort_keys=True, default=str).encode()).hexdigest()[:12]
    folder = Path(cache) / f"synthetic-world-{key}"
    if (folder / "config.json").exists():
        return folder
    from lora_null_core.frontends.toy_world import tiny_model

    model = tiny_model("llama", len(tokenizer), seed=seed, hidden=spec.hidden, layers=spec.layers).to(device)
    corpus = world.pretraining_corpus(population, spec.bios_per_person, seed)
    settings = TrainSettings(spec.pretrain_steps, spec.pretrain_batch, spec.pretrain_lr, max_length=96)
    loss = fine_tune(
        model,
        tokenizer,
        [Example("", (t,)) for t in corpus],
        settings,
        seed,
        separator="",
        desc="pretrain synthetic world",
    ).loss
    knowledge = [q for p in population for q in world.questions(p)][:2000]
    known, _ = accuracy(model, tokenizer, knowledge, 2, 256)
    logger.info("pretrained synthetic world model: loss %.3f, closed-book accuracy %.3f", loss, known)
    with atomic_output_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretraining.json").write_text(
            json.dumps({"loss": loss, "accuracy": known, "spec": asdict(spec)}, default=str, indent=1)
        )
    return folder


# ---------------------------------------------------------------- models and data from files
@dataclass(frozen=True)
class FileSize:
    calibration: int
    knowledge: int
    heldout: int
    task_train: int
    task_eval: int
    finetune: TrainSettings
    rank: int
    task_tokens: int
    eval_batch: int


FILE_SIZES = {
    "cpu": FileSize(
        calibration=200,
        knowledge=24,
        heldout=8,
        task_train=64,
        task_eval=4,
        finetune=TrainSettings(steps=2, batch_size=2, learning_rate=2e-4, max_length=256),
        rank=4,
        task_tokens=24,
        eval_batch=8,
    ),
    "gpu": FileSize(
        calibration=256,
        knowledge=2000,
        heldout=500,
        task_train=7473,
        task_eval=250,
        finetune=TrainSettings(steps=200, batch_size=32, learning_rate=5e-4, max_length=384),
        rank=16,
        task_tokens=200,
        eval_batch=256,
    ),
}


def file_suite(
    model: str,
    probes: Path,
    task_train: Path,
    task_eval: Path,
    size: str,
    cache: Path,
    device: str,
    name: str | None = None,
    split_seed: int = 1234,
) -> Suite:
    """Bring your own: a local HF folder or .gguf file, a QA probe file, and a task (train and eval files).

    Probes: JSONL rows {"prompt"|"input", "targets"|"target"} or a BIG-bench task.json. Task rows:
    {"prompt"|"question", "answer"|"target"}; answers in GSM8K form ('#### N') are scored by their final number.
    """
    spec = FILE_SIZES[size]
    folder = _local_model(model, cache)
    probe_rows = read_examples(probes, prompt_keys=("prompt", "input"), target_keys=("targets", "target"))
    random.Random(split_seed).shuffle(probe_rows)
    needed = spec.calibration + spec.knowledge + spec.heldout
    if len(probe_rows) < needed:
        raise ConfigError(f"{probes} has {len(probe_rows)} probes; size {size!r} needs {needed}.")
    train_rows = read_examples(
        task_train,
        prompt_keys=("prompt", "question"),
        target_keys=("answer", "target"),
        prompt_format="Question: {}\nAnswer:",
    )
    eval_rows = read_examples(
        task_eval,
        prompt_keys=("prompt", "question"),
        target_keys=("answer", "target"),
        prompt_format="Question: {}\nAnswer:",
    )
    gsm_style = all("####" in e.targets[0] for e in train_rows[:50])
    random.Random(split_seed).shuffle(train_rows)
    from lora_null_core.io.saving import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    calib_end, knowledge_end = spec.calibration, spec.calibration + spec.knowledge
    return Suite(
        model=name or Path(model).stem.lower(),
        load_base=lambda: _load(folder, device),
        tokenizer=tokenizer,
        calibration=probe_rows[:calib_end],
        knowledge=probe_rows[calib_end:knowledge_end],
        heldout_text=[e.text for e in probe_rows[knowledge_end:needed]],
        heldout_answers=[(e.prompt, e.targets[0]) for e in probe_rows[knowledge_end:needed]],
        task_train=train_rows[: spec.task_train],
        task_eval=eval_rows[: spec.task_eval],
        train=spec.finetune,
        rank=spec.rank,
        knowledge_tokens=8,
        task_tokens=spec.task_tokens,
        task_match=number_matches if gsm_style else contains_target,
        eval_batch=spec.eval_batch,
    )


def read_examples(
    path: Path, prompt_keys: Sequence[str], target_keys: Sequence[str], prompt_format: str = "{}"
) -> list[Example]:
    """Rows of a JSONL file, or the "examples" of a BIG-bench task.json, as Examples."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist.")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        rows = data["examples"] if isinstance(data, dict) else data
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, row in enumerate(rows):
        prompt = next((row[k] for k in prompt_keys if k in row), None)
        target = next((row[k] for k in target_keys if k in row), None)
        if prompt is None or target is None:
            raise ConfigError(f"{path} row {i} needs one of {list(prompt_keys)} and one of {list(target_keys)}.")
        targets = tuple(target) if isinstance(target, list) else (str(target),)
        if "input" in row or "prompt" in row:
            out.append(Example(str(prompt), targets))
        else:
            out.append(Example(prompt_format.format(prompt), targets))
    return out


def _local_model(model: str, cache: Path) -> Path:
    """A local folder as is; a .gguf file dequantized once into a cached safetensors folder."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.suffix != ".gguf" or not path.exists():
        raise ConfigError(f"--model {model!r}: give a local model folder or a .gguf file (no hub access here).")
    folder = Path(cache) / f"{path.stem}-dequantized"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s once into %s", path, folder)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # transformers refuses to save a model it marked as GGUF-quantized; its weights are already plain floats,
    # so copy them into an unmarked model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    with atomic_output_dir(folder, overwrite=True) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


def _load(folder: Path, device: str) -> torch.nn.Module:
    from lora_null_core.io.saving import load_model

    return load_model(str(folder), dtype="float32").to(device).eval()


def _sample(items: list, count: int, seed: int) -> list:
    return random.Random(seed).sample(items, min(count, len(items)))
