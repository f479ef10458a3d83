"""The default knowledge source: text the model samples itself, used when no calibration text is given.

The null space needs the activations of what the model knows, and the model's own samples exercise them with no
dataset on disk ("self-calibration", Williams, Chrysostomou and Aletras, NAACL 2025, for quantization and pruning).
Samples start from the BOS token alone (EOS where the tokenizer has none), or from a few neutral requests through
the chat template; they are drawn with the adapter off, batched with a KV cache on the device the model is on,
seeded (each process draws its own seeded share, and every process ends with all of them). Under DeepSpeed ZeRO-3
every process steps through generation together (whole_model.py gathers the weights).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn

from ..config import LoraNullConfig
from ..console import progress_bar, quiet_libraries
from ..distributed import least_on_any_rank, rank_and_world
from ..errors import CalibrationDataError, LoraNullError
from ..weights import is_zero3_partitioned, no_cpu_repacking
from . import graphed_decoding
from .graphed_decoding import DrawBatch
from .sources import CalibrationRows
from .whole_model import whole_on

logger = logging.getLogger(__name__)

# Requests that ask for nothing in particular, so the answers follow what the model itself finds likely.
NEUTRAL_REQUESTS = (
    "Tell me something you know.",
    "Write a short paragraph on any topic.",
    "Explain something interesting.",
    "Share a fact.",
    "Describe anything you like.",
    "Write about whatever comes to mind.",
)


def describe_own_text(config: LoraNullConfig) -> str:
    """How the text was drawn: what the report and `inspect` show as the calibration source."""
    start = "the BOS token" if config.generated_prompt == "bos" else "neutral requests through the chat template"
    return (
        f"the model's own text ({config.generated_length} tokens at most per sample, from {start}, "
        f"temperature {config.generated_temperature:g}, top-p {config.generated_top_p:g}, seed {config.seed})"
    )


def own_text(
    peft_model: nn.Module, tokenizer: Any, config: LoraNullConfig, device: torch.device, count: int | None = None
) -> CalibrationRows:
    """`count` texts (default num_samples + holdout_samples) sampled from the model (with a PeftModel, its adapter
    off)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    samples = own_samples(peft_model, tokenizer, config, device, count)
    texts = [_text(tokenizer, prompt, _before(generated, eos), config) for prompt, generated in samples]
    kept = [text for text in texts if text.strip()]
    if not kept:
        raise CalibrationDataError(
            f"Every sample the model generated was empty (it ended at once, {len(texts)} tries). Pass calibration "
            "text, or set generated_prompt to the other start ('bos' or 'chat')."
        )
    if len(kept) < len(texts):
        logger.info("%d of %d generated samples were empty and are left out.", len(texts) - len(kept), len(texts))
    return CalibrationRows(kept, describe_own_text(config))


def own_samples(
    peft_model: nn.Module,
    tokenizer: Any,
    config: LoraNullConfig,
    device: torch.device,
    count: int | None = None,
    what: str = "calibration text",
) -> list[tuple[list[int], list[int]]]:
    """(prompt, generated) token ids of `count` samples (default num_samples + holdout_samples) drawn from the model
    (with a PeftModel, its adapter off), each generated part ending at its first EOS, kept. Every process draws a
    seeded share and ends with all of them, in the same order."""
    if tokenizer is None:
        raise LoraNullError(
            "Generating calibration text needs the model's tokenizer; pass it (or pass calibration text)."
        )
    count = config.num_samples + config.holdout_samples if count is None else count
    rank, world = rank_and_world()
    share = len(range(rank, count, world))
    base = peft_model.get_base_model() if isinstance(peft_model, PeftModel) else peft_model
    # Under ZeRO-3 a forward may gather (a collective), so every rank calls generate as often, with as many rows and
    # decoding steps: the smaller shares are padded, then cut.
    in_step = world > 1 and is_zero3_partitioned(base.parameters())
    drawn = -(-count // world) if in_step else share
    adapter_off = peft_model.disable_adapter() if isinstance(peft_model, PeftModel) else contextlib.nullcontext()
    with (
        whole_on(base, device) as where,
        adapter_off,
        no_cpu_repacking(base),  # a sampler before a QLoRA run on the CPU must leave its backward intact
        _seeded(config.seed + rank, where),
        quiet_libraries(),
    ):
        prompts = _prompts(tokenizer, config, first=rank, count=drawn)
        generated = _generate(base, tokenizer, prompts, config, where, in_step, what)
    samples = list(zip(prompts, generated, strict=True))[:share]
    if world > 1:  # every process ends with every sample, so all choose the same calibration and held-out sets
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, samples)
        samples = [sample for share in shares for sample in share]
    return samples


def _before(generated: list[int], eos: int | None) -> list[int]:
    return generated[:-1] if eos is not None and generated and generated[-1] == eos else generated


def _prompts(tokenizer: Any, config: LoraNullConfig, first: int, count: int) -> list[list[int]]:
    """Token ids each sample starts from."""
    if config.generated_prompt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise LoraNullError(
                "generated_prompt 'chat' needs a tokenizer with a chat template, and this one has "
                "none; use generated_prompt 'bos', or pass calibration text."
            )
        prompts = []
        for i in range(first, first + count):
            request = [{"role": "user", "content": NEUTRAL_REQUESTS[i % len(NEUTRAL_REQUESTS)]}]
            text = tokenizer.apply_chat_template(request, add_generation_prompt=True, tokenize=False)
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        return prompts
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise LoraNullError(
            "The tokenizer has neither a BOS nor an EOS token to start generating from; pass "
            "calibration text, or set generated_prompt 'chat' if it has a chat template."
        )
    return [[start]] * count


def _generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    config: LoraNullConfig,
    device: torch.device,
    in_step: bool = False,
    what: str = "calibration text",
) -> list[list[int]]:
    """Batched sampling with a KV cache, left-padded prompts; each sample cut after its first EOS. `in_step`: every rank
    runs each forward together (ZeRO-3 may gather inside it), so all take the same batches and decoding steps."""
    eos = tokenizer.eos_token_id
    draw_batch = graphed_decoding.drawer(model, prompts, config, device, in_step) or _generate_drawer(
        model, tokenizer, config, in_step
    )
    row_tokens = config.generated_length + max((len(p) for p in prompts), default=1)
    rows = rows_per_batch(len(prompts), row_tokens, config.batch_tokens, _cache_budget(model, device, row_tokens))
    if in_step:
        rows = least_on_any_rank(rows)
    generated: list[list[int]] = []
    was_training = model.training
    model.eval()
    bar = progress_bar(len(prompts), f"generating {what}", "sample")
    try:
        while len(generated) < len(prompts):
            chunk = prompts[len(generated) : len(generated) + rows]
            try:
                with torch.no_grad():
                    drawn = draw_batch(chunk, device)
            except torch.cuda.OutOfMemoryError:
                # The budget is an estimate: halve and draw this batch again. Not in step: every rank would have to.
                if in_step or rows == 1:
                    raise
                torch.cuda.empty_cache()
                rows = max(1, rows // 2)
                logger.info("Sampling ran out of GPU memory: %d rows at a time from here.", rows)
                continue
            for row in drawn.tolist():
                generated.append(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
        if device.type == "cuda":  # hand the KV cache back: other runs on the GPU ran out of memory beside a
            torch.cuda.empty_cache()  # finished sampler's cached blocks (2026-12-06)
    return generated


def _generate_drawer(model: Any, tokenizer: Any, config: LoraNullConfig, in_step: bool) -> DrawBatch:
    """Draws a batch with transformers' generate (left-padded prompts): the generated token ids, padded after EOS."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    settings = GenerationConfig(
        do_sample=True,
        temperature=config.generated_temperature,
        top_p=config.generated_top_p,
        top_k=0,
        max_new_tokens=config.generated_length,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=True,  # the default dynamic cache: a static one with compiled decoding took 4.8x as long for 256
    )  # samples of 128 tokens on the Llama-2-7B shape, compilation included (H100, 2026-12-06)

    def draw_batch(chunk: list[list[int]], device: torch.device) -> torch.Tensor:
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        # synced_gpus said either way: transformers would turn it on under ZeRO-3 by itself
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings, synced_gpus=in_step)
        return out[:, width:]

    return draw_batch


def rows_per_batch(count: int, width: int, batch_tokens: int, budget: tuple[int, int] | None) -> int:
    """Samples drawn at once. Each decoding step costs about the same at 100 rows as at 1 (it reads every weight
    once), so on a GPU all samples go in one batch when their KV cache fits the budget (bytes per row, bytes),
    else in the fewest equal batches that fit; never fewer rows than batch_tokens gives (the CPU's rule)."""
    by_tokens = max(1, batch_tokens // width)
    if budget is None or count == 0:
        return by_tokens
    per_row, allowed = budget
    batches = -(-count // max(1, allowed // max(per_row, 1)))
    return max(by_tokens, -(-count // batches))


FREE_SHARE = 0.8  # of the GPU's free memory, for the samples' KV cache and sampling logits (the rest: activations)
LOGITS_BYTES = 24  # per vocabulary entry and row while sampling: float32 logits, their sorted copy and its indices


def _cache_budget(model: nn.Module, device: torch.device, width: int) -> tuple[int, int] | None:
    """(bytes one sample takes while drawn: its KV cache and its sampling logits, bytes they may take): most of
    what is free, as an estimate that _generate backs off from when it runs out. None on a CPU or when the
    model's config does not say its attention shape."""
    if device.type != "cuda":
        return None
    config: Any = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads if heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    dtype_bytes = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 2)
    per_row = width * layers * 2 * kv_heads * head_dim * dtype_bytes
    per_row += LOGITS_BYTES * int(getattr(config, "vocab_size", 0) or 0)
    free, _ = torch.cuda.mem_get_info(device)
    return per_row, int(FREE_SHARE * free)


def _text(tokenizer: Any, prompt: list[int], generated: list[int], config: LoraNullConfig) -> str:
    """From BOS: the generated text alone (tokenizing it adds the BOS back). From a chat request: the whole
    exchange as the template renders it, which the calibration reader takes as is."""
    if not generated:
        return ""
    if config.generated_prompt == "bos":
        return tokenizer.decode(generated, skip_special_tokens=True)
    return tokenizer.decode(prompt + generated, skip_special_tokens=False)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The sampling's own random state; the caller's is left as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
