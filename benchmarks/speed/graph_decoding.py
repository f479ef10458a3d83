"""A prototype of the key alone's sampler that replays each decoding step as one CUDA graph (#50).

Profiled on the Llama-2-7B shape (H100, `own_text_decoding.py --profile 32`), transformers' `generate` spent 92 ms a
step, of which the GPU worked about 16: each step launches some 1,350 kernels from Python. Here the step (the
forward over a static KV cache, then temperature, top-p and the draw) is captured once and replayed, so a step
costs one launch. Samples start from one token (BOS, the key alone's default) and run their full length; cutting
each at its first EOS is left to the caller, as own_text does with `generate`'s output. Without a GPU, or where the
capture fails, the same loop runs eagerly (`graphed` in the result says which).

Written against transformers 5, whose static cache keeps its write position on the device (`cumulative_length`,
advanced in place by each forward, so a replayed graph advances it too); positions are passed explicitly.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch


def sample(
    model: Any,
    batch: int,
    length: int,
    start_id: int,
    temperature: float = 1.3,
    top_p: float = 0.95,
    seed: int = 0,
    graphed: bool = True,
) -> tuple[torch.Tensor, dict]:
    """(batch × length sampled token ids, timings). `graphed`: capture the decoding step where the model is on a
    GPU."""
    tokens, timings, _ = _decode(model, batch, length, start_id, temperature, top_p, seed, graphed)
    return tokens, timings


def replay_vs_eager(model: Any, start_id: int, batch: int = 2, length: int = 16) -> float | None:
    """How far a replayed decoding differs from the eager one, greedy (top-p near 0) from the same start: the
    largest relative difference over every layer's cached keys and values (written at each step's position, from
    hidden states that went through each step's attention mask), so a position or mask the capture fixed shows even
    where the greedy tokens agree. None when the step could not be captured."""
    graphed, timings, graph_cache = _decode(model, batch, length, start_id, 1.0, 1e-9, 0, True)
    if not timings["graphed"]:
        return None
    eager, _, eager_cache = _decode(model, batch, length, start_id, 1.0, 1e-9, 0, False)
    if not torch.equal(graphed, eager):
        return float("inf")
    worst = 0.0
    for ours, theirs in zip(graph_cache.layers, eager_cache.layers, strict=True):
        for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            worst = max(worst, float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)))
    return worst


def _decode(
    model: Any,
    batch: int,
    length: int,
    start_id: int,
    temperature: float,
    top_p: float,
    seed: int,
    graphed: bool,
) -> tuple[torch.Tensor, dict, Any]:
    """sample(), and the static cache it filled."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=length + 1)
    # transformers renamed the forward's past_key_values to cache (5.25 warns on the old name)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.full((batch, 1), start_id, dtype=torch.long, device=device)
    position = torch.zeros(1, 1, dtype=torch.long, device=device)
    tokens = torch.empty(batch, length, dtype=torch.long, device=device)

    def step() -> torch.Tensor:
        logits = model(input_ids=ids, position_ids=position, use_cache=True, **{cache_arg: cache}).logits
        return draw(logits[:, -1, :], temperature, top_p)

    timings: dict = {"graphed": False}
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        start = time.perf_counter()
        tokens[:, 0] = step()  # position 0: the start token; this first forward also allocates the cache
        replay = _captured(step, position, cache) if graphed and device.type == "cuda" else None
        if replay is not None:
            timings.update(graphed=True, prefill_and_capture_seconds=round(time.perf_counter() - start, 3))
        for t in range(1, length):
            ids.copy_(tokens[:, t - 1 : t])
            position.fill_(t)
            tokens[:, t] = replay() if replay is not None else step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["seconds"] = round(time.perf_counter() - start, 3)
    return tokens, timings, cache


def draw(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row, as `generate` samples (temperature, then the smallest set of tokens whose probability
    reaches top_p, at least one), by the Gumbel-max trick: no host synchronization, so it can be captured."""
    scores, order = (logits.float() / temperature).sort(dim=-1, descending=True)
    probs = scores.softmax(dim=-1)
    outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before a token already reaches top_p
    scores = scores.masked_fill(outside, float("-inf"))
    # Gumbel(0, 1); an exponential draw of exactly 0 (about one in 2^24) would give +inf, and inf - inf a NaN that
    # argmax would pick, outside the nucleus too
    noise = -torch.empty_like(scores).exponential_().clamp_(min=torch.finfo(scores.dtype).tiny).log()
    return order.gather(-1, (scores + noise).argmax(dim=-1, keepdim=True)).squeeze(-1)


def _captured(step: Any, position: torch.Tensor, cache: Any) -> Any:
    """`step` captured as a CUDA graph, returned as a function that replays it (and returns its output buffer); None
    when capturing fails (an op that synchronizes with the host, say), so the caller runs eagerly."""
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
    except RuntimeError:
        return None

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def _rewind(cache: Any, length: int) -> None:
    """Set the static cache's write position back to `length` (after the warm-up's steps)."""
    for layer in cache.layers:
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(length)
