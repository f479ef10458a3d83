"""Every adapter init the benchmark compares, at the same rank, alpha and target modules.

LoRA, PiSSA and CorDA-kpm come from PEFT; LoRA-Null from lora_null_core. MiLoRA (minor singular components
of W) is not in PEFT: it is LoRA-Null's projected init with the weight's own minor right singular vectors
as the basis instead of the activations' null space, so it reuses the core's `write_adapter`.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lora_null_core import LoraNullConfig, lora_null_init
from lora_null_core.init.factors import write_adapter
from lora_null_core.init.peft_layers import lora_layers, weight_matrix

from .suites import Suite

INITS = (
    "lora",
    "pissa",
    "milora",
    "corda_kpm",
    "lora_null_v1",
    "lora_null_v2",
    "lora_null_basis",
    "lora_null",
    "lora_null_plain",
    "lora_null_plain_with_heldout",
)
DEFAULT_INITS = INITS[:6]
# lora_null: `adapter_init: lora_null` with a calibration file and no other key, where the trainer holds the
# training set (every plugin: lora_null_task_data unset), so the training examples are the task data too; the same
# init as lora_null_task. lora_null_plain: the plain null space (lora_null_task_data: none; the CLI without
# --task-data), the default until 2026-12-05, whose rows carry this name since.
# lora_null_plain_with_heldout: the same, reading the held-out texts (perplexity's) beside the calibration questions,
# so that a model whose widest input outgrows the questions' contexts (Qwen2.5's down_proj) is calibrated on more
# questions instead of being topped up with its own text: the top-up's comparison.
# `adapter_init: lora_null` with no calibration text: the model samples its own (from BOS, or from neutral chat
# requests); the frontier's knowledge questions are never seen, so its knowledge figure is the honest test.
# _t1: at temperature 1, the default before the frontier chose 1.3 (rows measured then carry these names).
SELF_INITS = {
    "lora_null_self": {},
    "lora_null_self_chat": {"generated_prompt": "chat"},
    "lora_null_self_t1": {"generated_temperature": 1.0},
    "lora_null_self_chat_t1": {"generated_prompt": "chat", "generated_temperature": 1.0},
    # #49's coverage: more, shorter samples for about the same sampling time (1,024 or 4,096 × 64 tokens)
    "lora_null_self_1k64": {"num_samples": 1024, "generated_length": 64},
    "lora_null_self_4k64": {"num_samples": 4096, "generated_length": 64},
    # and 4x the tokens at the default length, for a wide input: Qwen2.5-1.5B's down_proj takes 8,960, which 256 x 128
    # tokens cover 3.7 times (SmolLM2's 1,536: 21 times); its key alone's knowledge loss varies 2x between seeds
    "lora_null_self_1k128": {"num_samples": 1024, "generated_length": 128},
    # and far shorter ones (2,048 x 16 and 4,096 x 8 tokens): knowledge is read from short questions, whose tokens
    # all sit near a text's start; on SmolLM2 their held-out energy fell from 0.102 to 0.085 and 0.084
    # (own_text_sweep.py, CPU)
    "lora_null_self_2k16": {"num_samples": 2048, "generated_length": 16},
    "lora_null_self_4k8": {"num_samples": 4096, "generated_length": 8},
    # #50: the same distribution drawn by the CUDA-graph decoder; its rows must match lora_null_self's within seed
    # noise before it becomes the default
    "lora_null_self_graphed": {"generated_decoding": "graphed"},
}
# The task-aware null space: the calibration and the training examples as task data; lora_null_task uses the
# default task_mix (and a_scale, 1 with task data), lora_null_task<μ> another (lora_null_task0.1).
TASK_PREFIX = "lora_null_task"
# The key alone with lora_null_task_data: train (unset, the key alone stays plain): the model's own text as
# knowledge, the training examples as task data; lora_null_self_task<μ> with another task_mix.
SELF_TASK = "lora_null_self_task"
# Any of these with "_x<c>" appended runs with a_scale c (lora_null_task_x2: task-aware at the frozen-A scale).
SCALED = re.compile(r"^(lora_null_.+)_x([0-9.]+)$")
# lora_null, lora_null_plain, the task-aware, own-text and scaled inits with "_w<β>" appended last run with the
# weight prior β (#49: lora_null_self_w0.1 solves from C_own/tr + 0.1·WᵀW/tr).
PRIOR = re.compile(r"^(lora_null(?:_.+)?)_w([0-9.]+)$")


def lora_config(suite: Suite, model: torch.nn.Module) -> LoraConfig:
    """Every linear layer but the LM head, named explicitly (PEFT's CorDA preprocessing cannot expand 'all-linear')."""
    head = model.get_output_embeddings()
    targets = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )
    return LoraConfig(r=suite.rank, lora_alpha=suite.rank, target_modules=targets, lora_dropout=0.0)


def build_adapter(init: str, model: torch.nn.Module, suite: Suite, seed: int) -> PeftModel:
    """Wrap `model` (modified in place) with the named init; trainable parameters are set as the init intends."""
    torch.manual_seed(seed)
    config = lora_config(suite, model)
    prior = PRIOR.match(init)
    init, weighted = (prior[1], {"weight_prior": float(prior[2])}) if prior else (init, {})
    if init == "lora":
        return get_peft_model(model, config)
    if init == "lora_null_plain_with_heldout":
        return lora_null_init(
            model,
            config,
            [e.text for e in suite.calibration] + suite.heldout_text,
            suite.tokenizer,
            LoraNullConfig(seed=seed),
        )
    if init == "pissa":
        return get_peft_model(model, dataclasses.replace(config, init_lora_weights="pissa"))
    if init == "milora":
        return _milora(get_peft_model(model, config))
    if init == "corda_kpm":
        return _corda_kpm(model, config, suite)
    if init == "lora_null_plain":  # every LoraNullConfig default, no task data
        return lora_null_init(
            model, config, [e.text for e in suite.calibration], suite.tokenizer, LoraNullConfig(seed=seed, **weighted)
        )
    if init == "lora_null":
        init = TASK_PREFIX
    scaled = SCALED.match(init)
    init, scale = (scaled[1], {"a_scale": float(scaled[2])}) if scaled else (init, {})
    scale.update(weighted)
    if init.startswith(TASK_PREFIX):
        mix = {"task_mix": task_mix_of(init)} if init != TASK_PREFIX else {}
        return lora_null_init(
            model,
            config,
            [e.text for e in suite.calibration],
            suite.tokenizer,
            LoraNullConfig(seed=seed, **mix, **scale),
            task_data=suite.task_texts(),
        )
    if init in SELF_INITS:
        return lora_null_init(
            model, config, None, suite.tokenizer, LoraNullConfig(seed=seed, **SELF_INITS[init], **scale)
        )
    if init.startswith(SELF_TASK):
        mix = {"task_mix": task_mix_of(init, SELF_TASK)} if init != SELF_TASK else {}
        return lora_null_init(
            model,
            config,
            None,
            suite.tokenizer,
            LoraNullConfig(seed=seed, **mix, **scale),
            task_data=suite.task_texts(),
        )
    if init.startswith("lora_null_x"):  # the plain null space with another a_scale: lora_null_x3 = A × 3, B / 3
        return lora_null_init(
            model,
            config,
            [e.text for e in suite.calibration],
            suite.tokenizer,
            LoraNullConfig(seed=seed, a_scale=a_scale_of(init), **weighted),
        )
    if init.startswith("lora_null_"):
        kind = init.removeprefix("lora_null_")
        null_config = LoraNullConfig(
            variant="v2" if kind in ("v2", "basis") else "v1",
            init="basis" if kind == "basis" else "projected",
            num_samples=len(suite.calibration),
            holdout_samples=0,
            max_length=suite.train.max_length,
            batch_size=32,
            seed=seed,
            a_scale=1.0,
        )  # the paper's factors
        return lora_null_init(model, config, [e.text for e in suite.calibration], suite.tokenizer, null_config)
    raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")


def is_known_init(init: str) -> bool:
    prior = PRIOR.match(init)
    if prior:
        rest = prior[1]
        weighable = rest in ("lora_null", "lora_null_plain") or rest.startswith(("lora_null_x", "lora_null_self"))
        weighable = weighable or rest.startswith(TASK_PREFIX) or bool(SCALED.match(rest))
        return _positive(prior[2]) and weighable and is_known_init(rest)
    scaled = SCALED.match(init)
    if scaled:
        return (
            _positive(scaled[2])
            and (scaled[1] in SELF_INITS or scaled[1].startswith((TASK_PREFIX, SELF_TASK)))
            and is_known_init(scaled[1])
        )
    if init in INITS or init in SELF_INITS or init in (TASK_PREFIX, SELF_TASK):
        return True
    for prefix in (TASK_PREFIX, SELF_TASK):
        if init.startswith(prefix):
            try:
                return task_mix_of(init, prefix) > 0
            except ValueError:
                return False
    try:
        return init.startswith("lora_null_x") and a_scale_of(init) > 0
    except ValueError:
        return False


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def task_mix_of(init: str, prefix: str = TASK_PREFIX) -> float:
    try:
        return float(init.removeprefix(prefix))
    except ValueError:
        raise ValueError(f"unknown init {init!r}: {prefix}<task_mix>, e.g. {prefix}0.1") from None


def a_scale_of(init: str) -> float:
    try:
        return float(init.removeprefix("lora_null_x"))
    except ValueError:
        raise ValueError(f"unknown init {init!r}: lora_null_x<factor>, e.g. lora_null_x3") from None


def _milora(peft_model: PeftModel) -> PeftModel:
    for layer in lora_layers(peft_model, "default").values():
        weight = weight_matrix(layer).detach().to(torch.float64)
        rank = layer.r["default"]
        _, _, right_t = torch.linalg.svd(weight, full_matrices=False)
        write_adapter(layer, "default", right_t[-rank:].T.contiguous(), "projected")
    return peft_model


def _corda_kpm(model: torch.nn.Module, config: LoraConfig, suite: Suite) -> PeftModel:
    """PEFT's CorDA in knowledge-preserving mode, calibrated on the same texts as LoRA-Null (batch size 1,
    which PEFT's hook requires)."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = dataclasses.replace(config, init_lora_weights="corda", corda_config=CordaConfig(corda_method="kpm"))
    device = next(model.parameters()).device
    texts = [e.text for e in suite.calibration]

    @torch.no_grad()
    def run_model() -> None:
        for text in texts:
            ids = suite.tokenizer(text, return_tensors="pt", truncation=True, max_length=suite.train.max_length)
            model(**ids.to(device))

    preprocess_corda(model, config, run_model=run_model)
    return get_peft_model(model, config)
