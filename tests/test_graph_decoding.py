"""The CUDA-graph sampler prototype (benchmarks/speed/graph_decoding.py) on the CPU, where it runs its loop eagerly:
the static cache's positions and the draw's distribution (the capture itself is a GPU fact, timed on a GPU)."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "speed" / "graph_decoding.py"


@pytest.fixture(scope="module")
def decoding():
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the prototype is written against transformers 5's static cache")
    spec = importlib.util.spec_from_file_location("graph_decoding", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_with_the_nucleus_at_one_token_it_decodes_as_greedy_generate(decoding, model):
    """top_p near 0 keeps only the most likely token, so every position of the static cache must line up with
    generate's own cache for the two to agree on all 12 tokens of 3 rows."""
    tokens, timings = decoding.sample(model, batch=3, length=12, start_id=1, top_p=1e-9, graphed=True)
    start = torch.full((3, 1), 1)
    greedy = model.generate(start, attention_mask=torch.ones_like(start), do_sample=False, max_new_tokens=12,
                            min_new_tokens=12, pad_token_id=0)  # fmt: skip
    assert torch.equal(tokens, greedy[:, 1:])
    assert timings["graphed"] is False and timings["seconds"] > 0  # no GPU: the eager loop


def test_the_draw_follows_temperature_and_top_p(decoding):
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    drawn = decoding.draw(logits, temperature=1.3, top_p=0.8)
    probs = (logits[0] / 1.3).softmax(-1)
    kept = probs.cumsum(-1) - probs < 0.8  # the smallest set reaching 0.8, as generate's top-p keeps
    expected = torch.where(kept, probs, 0) / probs[kept].sum()
    frequencies = torch.bincount(drawn, minlength=5).float() / len(drawn)
    assert kept.tolist() == [True, True, True, False, False]
    assert torch.allclose(frequencies, expected, atol=0.015), (frequencies, expected)


def test_the_decoding_benchmark_times_both_decoders_in_one_call(decoding, tmp_path):
    import json

    spec = importlib.util.spec_from_file_location("own_text_decoding", SCRIPT.with_name("own_text_decoding.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "decoding.json"
    args = ["--samples", "8", "--lengths", "6", "--decoders", "generate,graphed", "--graph-batch", "4"]
    bench.main([*args, "--output", str(out)])
    rows = json.loads(out.read_text())["runs"]
    assert [(r["decoder"], r["length"], r["steps"]) for r in rows] == [("generate", 6, 6), ("graphed", 6, 6)]
    assert rows[1]["draws"] == 2 and rows[1]["graphed"] is False  # 8 samples 4 at a time; no GPU to capture on
    assert rows[1]["replay_vs_eager"] is None  # nothing replayed to check


def test_a_zero_exponential_draw_picks_no_token_outside_the_nucleus(decoding, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *args, **kwargs: self.zero_())
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]])
    assert decoding.draw(logits, temperature=1.0, top_p=0.5).tolist() == [1]  # the only token in the nucleus
