"""The graphed own-text sampler (`generated_decoding: graphed`, lora_null_core/calibration/graphed_decoding.py) on
the CPU, where its loop runs eagerly: the static cache's positions across architectures, the draw's distribution, when
a capture would be unsafe, and how own_text uses it (the capture itself is a GPU fact, timed and checked on a GPU)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lora_null_core import LoraNullConfig
from lora_null_core.calibration import own_text

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("written against transformers 5's static cache", allow_module_level=True)

from lora_null_core.calibration import graphed_decoding  # noqa: E402

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def gemma3_config(window: int = 4):
    """Two local (sliding-window) layers and a global one, as Gemma 3 interleaves them."""
    return transformers.Gemma3TextConfig(
        **SIZES, num_hidden_layers=3, head_dim=8, sliding_window=window, eos_token_id=None,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], initializer_range=0.02,
    )  # fmt: skip


def model_of(architecture: str):
    torch.manual_seed(0)
    if architecture == "gemma3":
        return transformers.Gemma3ForCausalLM(gemma3_config()).eval()
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[architecture]
    return model_class(config_class(**SIZES, num_hidden_layers=2, initializer_range=0.5)).eval()


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gemma3"])
def test_with_the_nucleus_at_one_token_it_decodes_as_greedy_generate(architecture):
    """top_p near 0 keeps only the most likely token, so every position of the static cache must line up with
    generate's own cache for the two to agree on all 12 tokens of 3 rows (Gemma's local layers: 3 times their
    window of 4)."""
    model = model_of(architecture)
    tokens, graphed, _ = graphed_decoding.decode(model, 3, 12, 2, temperature=1.0, top_p=1e-9)
    start = torch.full((3, 1), 2)
    model.generation_config.eos_token_id = None  # run all 12 steps, as the sampler does (its caller cuts at EOS)
    greedy = model.generate(start, attention_mask=torch.ones_like(start), do_sample=False, max_new_tokens=12,
                            pad_token_id=0)  # fmt: skip
    assert torch.equal(tokens, greedy[:, 1:])
    assert len(set(tokens[0].tolist())) > 2  # a path that moves, not one token repeated
    assert graphed is False  # no GPU: the eager loop


def test_a_sliding_window_is_captured_only_while_the_samples_fit_in_it():
    """Gemma's local layers keep their fill on the host and branch on it; a replay would freeze that branch, so a
    cache is graph-safe only when no sample outgrows a window. Older transformers do not tell (5.17's window layers
    are never `is_croppable`: seen on an H100, 2026-12-07), so there Gemma always decodes step by step."""
    cache = transformers.StaticCache
    assert not graphed_decoding.graph_safe(cache(config=gemma3_config(window=4), max_cache_len=13))
    wide = cache(config=gemma3_config(window=16), max_cache_len=13)
    assert graphed_decoding.graph_safe(wide) == hasattr(wide.layers[0], "_is_croppable")
    assert graphed_decoding.graph_safe(cache(config=model_of("llama").config, max_cache_len=13))


def test_the_draw_follows_temperature_and_top_p():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    drawn = graphed_decoding.draw(logits, temperature=1.3, top_p=0.8)
    probs = (logits[0] / 1.3).softmax(-1)
    kept = probs.cumsum(-1) - probs < 0.8  # the smallest set reaching 0.8, as generate's top-p keeps
    expected = torch.where(kept, probs, 0) / probs[kept].sum()
    frequencies = torch.bincount(drawn, minlength=5).float() / len(drawn)
    assert kept.tolist() == [True, True, True, False, False]
    assert torch.allclose(frequencies, expected, atol=0.015), (frequencies, expected)


def test_a_zero_exponential_draw_picks_no_token_outside_the_nucleus(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *args, **kwargs: self.zero_())
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]])
    assert graphed_decoding.draw(logits, temperature=1.0, top_p=0.5).tolist() == [1]  # the only token in the nucleus


def test_off_a_gpu_the_setting_falls_back_to_generate_and_says_why(make_model, tokenizer, caplog):
    model, config = make_model(), LoraNullConfig(num_samples=12, holdout_samples=0, generated_length=10)
    cpu = torch.device("cpu")
    with caplog.at_level("INFO", logger="lora_null_core.calibration.graphed_decoding"):
        graphed = own_text.own_samples(model, tokenizer, config.replace(generated_decoding="graphed"), cpu)
    assert graphed == own_text.own_samples(model, tokenizer, config, cpu)
    assert "'graphed' is not used (the model is not on a GPU)" in caplog.text


def test_own_text_draws_through_the_graphed_decoder_where_it_may(make_model, tokenizer, monkeypatch):
    """Where the decoder is allowed (here: told so on the CPU, where it runs eagerly), own_text's samples come from
    it: seeded, batched, each cut after its first EOS, and not generate's."""
    monkeypatch.setattr(graphed_decoding, "why_not", lambda *args: None)
    model, cpu = make_model(), torch.device("cpu")
    config = LoraNullConfig(
        num_samples=40, holdout_samples=0, generated_length=12, batch_tokens=16 * 13, generated_decoding="graphed"
    )  # 16 rows a batch: three batches
    first = own_text.own_samples(model, tokenizer, config, cpu)
    assert first == own_text.own_samples(model, tokenizer, config, cpu)  # seeded
    assert first != own_text.own_samples(model, tokenizer, config.replace(seed=1), cpu)
    assert len(first) == 40 and len({tuple(g) for _, g in first}) > 30
    eos = tokenizer.eos_token_id
    assert all(0 < len(g) <= 12 and eos not in g[:-1] for _, g in first)  # cut after the first EOS
    assert first != own_text.own_samples(model, tokenizer, config.replace(generated_decoding="generate"), cpu)


def test_the_decoding_benchmark_times_both_decoders_in_one_call(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "speed" / "own_text_decoding.py"
    spec = importlib.util.spec_from_file_location("own_text_decoding", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "decoding.json"
    bench.main(["--samples", "8", "--lengths", "6", "--decoders", "generate,graphed", "--output", str(out)])
    rows = json.loads(out.read_text())["runs"]
    assert [(r["decoder"], r["length"], r["steps"]) for r in rows] == [("generate", 6, 6), ("graphed", 6, 6)]
    assert all(r["distinct_samples"] == 8 for r in rows)
    # on a GPU the replayed cache is compared with an eager one (equal); with none, nothing is replayed to check
    assert rows[1]["replay_vs_eager"] == (0.0 if torch.cuda.is_available() else None)


def test_at_top_p_one_no_token_is_cut_by_rounding(monkeypatch):
    """With top_p 1 generate samples the whole distribution. Here the first token's probability rounds to 1.0 in
    float32, so a nucleus test would cut the rest; a draw whose noise favours the last token must still pick it."""
    logits = torch.tensor([[0.0, -20.0, -20.0]])
    assert logits.softmax(-1)[0, 0] == 1.0
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *a, **k: self.copy_(torch.tensor([1.0, 1.0, 1e-30])))
    assert graphed_decoding.draw(logits, temperature=1.0, top_p=1.0).tolist() == [2]


def test_a_failed_capture_is_not_tried_again_and_gives_the_generator_back(make_model, tokenizer, monkeypatch):
    """After one batch could not be captured, own_text's later batches run step by step without trying again; and a
    failed capture's generator gets a fresh copy of its state (on a GPU the old one stays marked as capturing, and
    Axolotl's run stopped at its next draw: "Offset increment outside graph capture encountered unexpectedly")."""
    monkeypatch.setattr(graphed_decoding, "why_not", lambda *args: None)
    asked: list[bool] = []

    def decode(model, batch, length, start_id, temperature, top_p, graphed=True):
        asked.append(graphed)
        return torch.full((batch, length), start_id), False, None

    monkeypatch.setattr(graphed_decoding, "decode", decode)
    config = LoraNullConfig(generated_decoding="graphed", generated_length=4)
    draw = graphed_decoding.drawer(make_model(), [[2]] * 8, config, torch.device("cpu"), in_step=False)
    for _ in range(3):
        draw([[2]] * 4, torch.device("cpu"))
    assert asked == [True, False, False]

    class Generator:
        def __init__(self):
            self.state = "capturing"

        def clone_state(self):
            return "fresh copy"

        def graphsafe_set_state(self, state):
            self.state = state

    generator = Generator()
    graphed_decoding.release_generator(generator)
    assert generator.state == "fresh copy"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph capture needs a GPU")
def test_on_a_gpu_a_capture_that_fails_leaves_sampling_and_dropout_working():
    """A forward that synchronizes with the host (as Axolotl's patched SDPA did) cannot be captured: the samples
    are then drawn step by step, and the device's generator and stream are as before, so a later dropout draws."""
    model = model_of("llama").cuda()

    def synchronize(module, args, out):
        out[0].sum().item()

    model.model.layers[0].register_forward_hook(synchronize)
    torch.manual_seed(0)
    tokens, graphed, _ = graphed_decoding.decode(model, 3, 12, 2, temperature=1.0, top_p=1.0)
    assert not graphed and tokens.shape == (3, 12) and int(tokens.min()) >= 0
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    kept = torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5).count_nonzero()
    assert 300 < int(kept) < 700
