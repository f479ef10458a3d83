"""The own text's sampler with each decoding step replayed as one CUDA graph (`generated_decoding: graphed`).

Profiled on the Llama-2-7B shape (H100, 2026-12-05), transformers' `generate` spent 92 ms a decoding step, of which
the GPU worked about 16: each step launches some 1,350 kernels from Python. Here the step (the forward over a static
KV cache, then temperature, top-p and the draw) is captured once and replayed, so a step costs one launch: 256
samples took 3.99 s at 128 tokens against generate's 9.86 s, 22.3 s at 512 against 64.2 s (H100, 2026-12-07,
`benchmarks/speed/own_text_decoding.py`). Samples start from one token (BOS) and run their full length; the caller
cuts each at its first EOS, as it does with generate's output. Where the capture fails, or would freeze a
sliding window's host-side state (samples longer than the window), the same loop runs eagerly.

Written against transformers 5, whose static cache keeps its write position on the device (`cumulative_length`,
advanced in place by each forward, so a replayed graph advances it too); positions are passed explicitly.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

from ..config import LoraNullConfig

logger = logging.getLogger(__name__)

# Draws one batch of samples from their prompts: the generated token ids (the caller cuts each after its first EOS).
DrawBatch = Callable[[list[list[int]], torch.device], torch.Tensor]


def drawer(
    model: Any, prompts: list[list[int]], config: LoraNullConfig, device: torch.device, in_step: bool
) -> DrawBatch | None:
    """With `generated_decoding: graphed`, own_text's drawer of a batch; None (generate draws) where it cannot run:
    off a GPU, from chat prompts, under ZeRO-3 (a forward may gather) or with transformers older than 5."""
    if config.generated_decoding != "graphed" or not prompts:
        return None
    why = why_not(prompts, device, in_step)
    if why is not None:
        logger.info("generated_decoding 'graphed' is not used (%s): sampling with generate.", why)
        return None
    start_id, capturable = prompts[0][0], True

    def draw_batch(chunk: list[list[int]], device: torch.device) -> torch.Tensor:
        nonlocal capturable
        del device  # decode runs where the model is, which own_samples made the execution device (whole_on)
        tokens, graphed, _ = decode(
            model,
            len(chunk),
            config.generated_length,
            start_id,
            config.generated_temperature,
            config.generated_top_p,
            graphed=capturable,
        )
        if capturable and not graphed:  # told once; later batches would fail the same way
            capturable = False
            logger.info("The decoding step could not be captured as a CUDA graph: it runs step by step instead.")
        return tokens

    return draw_batch


def why_not(prompts: list[list[int]], device: torch.device, in_step: bool) -> str | None:
    """Why these samples cannot be drawn graphed here, or None when they can."""
    if device.type != "cuda":
        return "the model is not on a GPU"
    if len({tuple(p) for p in prompts}) != 1 or len(prompts[0]) != 1:
        return "the samples start from chat prompts"
    if in_step:
        return "every rank must step through generate together under ZeRO-3"
    if not supported():
        return "it needs transformers 5 and torch 2.5 or later"
    return None


def supported() -> bool:
    """Whether the installed transformers has the static cache this is written against (major version 5 or later),
    and torch can give a generator back after a failed capture (`graphsafe_set_state`, torch 2.5 and later)."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5 and hasattr(torch.Generator, "graphsafe_set_state")


def decode(
    model: Any, batch: int, length: int, start_id: int, temperature: float, top_p: float, graphed: bool = True
) -> tuple[torch.Tensor, bool, Any]:
    """(batch × length token ids drawn from `start_id`, whether the steps were replayed from a captured graph, the
    static cache they filled: benchmarks/speed/own_text_decoding.py compares a replayed cache with an eager one).
    Draws from torch's current random state: the caller seeds it. `graphed`: capture the step where the model is on
    a GPU."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=length + 1)
    # transformers 5.25 renamed the forward's past_key_values to cache (and warns on the old name)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.full((batch, 1), start_id, dtype=torch.long, device=device)
    position = torch.zeros(1, 1, dtype=torch.long, device=device)
    tokens = torch.empty(batch, length, dtype=torch.long, device=device)

    def step() -> torch.Tensor:
        logits = model(input_ids=ids, position_ids=position, use_cache=True, **{cache_arg: cache}).logits
        return draw(logits[:, -1, :], temperature, top_p)

    with torch.no_grad():
        tokens[:, 0] = step()  # position 0: the start token; this first forward also allocates the cache
        capture = graphed and device.type == "cuda" and graph_safe(cache)
        replay = _captured(step, position, cache) if capture else None
        for t in range(1, length):
            ids.copy_(tokens[:, t - 1 : t])
            position.fill_(t)
            tokens[:, t] = replay() if replay is not None else step()
    return tokens, replay is not None, cache


def draw(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row, as `generate` samples (temperature, then the smallest set of tokens whose probability
    reaches top_p, at least one), by the Gumbel-max trick: no host synchronization, so it can be captured."""
    scores, order = (logits.float() / temperature).sort(dim=-1, descending=True)
    if top_p < 1:  # at 1 every token stays (a cumulative sum rounded up to 1 would drop the tail)
        probs = scores.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before a token already reaches top_p
        scores = scores.masked_fill(outside, float("-inf"))
    # Gumbel(0, 1); an exponential draw of exactly 0 (about one in 2^24) would give +inf, and inf - inf a NaN that
    # argmax would pick, outside the nucleus too
    noise = -torch.empty_like(scores).exponential_().clamp_(min=torch.finfo(scores.dtype).tiny).log()
    return order.gather(-1, (scores + noise).argmax(dim=-1, keepdim=True)).squeeze(-1)


def graph_safe(cache: Any) -> bool:
    """Whether a replayed step stays right at every position: a sliding-window layer (Gemma's local attention)
    keeps its fill on the host (`cumulative_length_int`) and branches on it, which a capture would freeze, so it
    is safe only while the samples stay within its window (`is_croppable`)."""
    return all(
        not hasattr(layer, "cumulative_length_int") or getattr(layer, "is_croppable", False) for layer in cache.layers
    )


def _captured(step: Any, position: torch.Tensor, cache: Any) -> Any:
    """`step` captured as a CUDA graph, returned as a function that replays it (and returns its output buffer); None
    when capturing fails (an op that synchronizes with the host, say: Axolotl's patched SDPA under a 1.5B on an
    H100, 2026-12-07), so the caller runs eagerly, on the stream and with the random state it had."""
    stream = torch.cuda.current_stream()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires; what it writes at
            position.fill_(1)  # position 1 the first real step writes again
            for _ in range(2):
                step()
                _rewind(cache, 1)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    except RuntimeError as error:
        torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture's stream current
        release_generator(torch.cuda.default_generators[stream.device.index or 0])
        cause = error.__context__ or error  # the capture's own error, before the graph's exit raised its own
        logger.info("Capturing the decoding step failed: %s", (str(cause).strip().splitlines() or ["?"])[0])
        return None

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def release_generator(generator: torch.Generator) -> None:
    """Give a generator a fresh copy of its state (same seed and offset). A capture that fails never ends its
    generators' capture, so the next eager draw (the sampler's, or the training's dropout) would stop on "Offset
    increment outside graph capture encountered unexpectedly"."""
    generator.graphsafe_set_state(generator.clone_state())


def _rewind(cache: Any, length: int) -> None:
    """Set the static cache's write position back to `length` (after the warm-up's steps), on the device and, for
    sliding-window layers, on the host."""
    for layer in cache.layers:
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(length)
        if isinstance(getattr(layer, "cumulative_length_int", None), int):
            layer.cumulative_length_int = length
