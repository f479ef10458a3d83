"""A covariance cache hit skips calibration and gives exactly the result of calibrating again."""

import json

import pytest
import torch
from peft import LoraConfig

import lora_null_core.init.loop as init_loop
from lora_null_core import lora_null_init
from lora_null_core.calibration.batches import tokenize_batches
from lora_null_core.calibration.cache import tokens_fingerprint, weights_fingerprint
from lora_null_core.init.peft_layers import lora_layers

SETTINGS = dict(num_samples=120, holdout_samples=20, batch_size=16)


class BlockCalls:
    """Counts the samples that go through the first decoder block: calibration ones, when it is skipped."""

    def __init__(self, model):
        self.samples = 0
        model.model.layers[0].register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.samples += hidden.shape[0]


def run(make_model, tokenizer, texts, cache, rank=4, **overrides):
    model = make_model("llama", layers=2)
    calls = BlockCalls(model)
    peft_model = lora_null_init(
        model,
        LoraConfig(r=rank, lora_alpha=2 * rank),
        texts,
        tokenizer,
        covariance_cache=str(cache) if cache else None,
        **SETTINGS,
        **overrides,
    )
    return peft_model, calls.samples


def factors(peft_model):
    return {
        name: (
            layer.lora_A["default"].weight.detach().clone(),
            layer.lora_B["default"].weight.detach().clone(),
            layer.get_base_layer().weight.detach().clone(),
        )
        for name, layer in lora_layers(peft_model, "default").items()
    }


@pytest.mark.parametrize("streaming", ["on", "off"])
def test_second_run_with_another_rank_and_variant_reads_the_cache(
    make_model, tokenizer, knowledge, tmp_path, streaming
):
    texts = knowledge[:140]
    _, first_samples = run(make_model, tokenizer, texts, tmp_path, streaming=streaming)
    entries = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "index.json").is_file()
    index = json.loads((entries[0] / "index.json").read_text())
    assert len(index["group_of"]) == 14 and len(index["groups"]) == 8  # q/k/v and gate/up share an input

    cached, cached_samples = run(make_model, tokenizer, texts, tmp_path, rank=6, variant="v1", streaming=streaming)
    fresh, _ = run(make_model, tokenizer, texts, None, rank=6, variant="v1", streaming=streaming)
    # Only the 20 held-out samples and the 4-sample probe went through block 0: no calibration forward.
    assert first_samples - cached_samples >= 120 and cached_samples < 60
    for name, (a, b, w) in factors(fresh).items():
        c_a, c_b, c_w = factors(cached)[name]
        assert torch.equal(a, c_a) and torch.equal(b, c_b) and torch.equal(w, c_w), name
    assert cached.lora_null_report.function_error < 1e-5
    assert [e.tokens for e in cached.lora_null_report.layers] == [e.tokens for e in fresh.lora_null_report.layers]


def test_other_data_or_weights_or_settings_miss(make_model, tokenizer, knowledge, task, tmp_path):
    run(make_model, tokenizer, knowledge[:140], tmp_path)
    run(make_model, tokenizer, task[:140], tmp_path)
    run(make_model, tokenizer, knowledge[:140], tmp_path, accumulate_dtype="float64")
    model = make_model("llama", layers=2, seed=1)
    lora_null_init(model, LoraConfig(r=4), knowledge[:140], tokenizer, covariance_cache=str(tmp_path), **SETTINGS)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 4


def test_more_targets_than_cached_recalibrates(make_model, tokenizer, knowledge, tmp_path):
    texts = knowledge[:140]
    model = make_model("llama", layers=2)
    lora_null_init(
        model, LoraConfig(r=4, target_modules=["q_proj"]), texts, tokenizer, covariance_cache=str(tmp_path), **SETTINGS
    )
    _, samples = run(make_model, tokenizer, texts, tmp_path)  # all-linear: the q_proj-only entry lacks the rest
    assert samples >= 120
    _, samples = run(make_model, tokenizer, texts, tmp_path)
    assert samples < 60


def test_a_failed_run_leaves_no_entry(make_model, tokenizer, knowledge, tmp_path, monkeypatch):
    real = init_loop.write_layers
    seen = []

    def fail_on_second_block(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(init_loop, "write_layers", fail_on_second_block)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(make_model, tokenizer, knowledge[:140], tmp_path, streaming="on")
    assert list(tmp_path.iterdir()) == []


def test_fingerprints(make_model, tokenizer, knowledge):
    texts = knowledge[:40]
    assert tokens_fingerprint(tokenize_batches(texts, tokenizer, 64, 8)) == tokens_fingerprint(
        tokenize_batches(texts, tokenizer, 64, 5)
    )
    assert tokens_fingerprint(tokenize_batches(texts, tokenizer, 64, 8)) != tokens_fingerprint(
        tokenize_batches(texts, tokenizer, 8, 8)
    )
    model = make_model("llama", layers=2)
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert weights_fingerprint(model) != before
    with torch.device("meta"):
        assert weights_fingerprint(torch.nn.Linear(4, 4)) is None


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_a_damaged_entry_is_recomputed_not_used(make_model, tokenizer, knowledge, tmp_path, damage):
    texts = knowledge[:140]
    fresh, _ = run(make_model, tokenizer, texts, tmp_path)
    entry = next(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    part = sorted(entry.glob("*.safetensors"))[0]
    data = bytearray(part.read_bytes())
    if damage == "zeroed":  # still parses: the header is intact, some covariance entries are now 0
        data[-4096:] = bytes(4096)
    else:
        data = data[: len(data) // 2]
    part.write_bytes(bytes(data))
    again, samples = run(make_model, tokenizer, texts, tmp_path)
    assert samples >= 120  # calibrated again
    for name, (a, _b, _w) in factors(fresh).items():
        assert torch.equal(a, factors(again)[name][0]), name
    # and the entry was written again, intact
    third, third_samples = run(make_model, tokenizer, texts, tmp_path)
    assert third_samples < 60


@pytest.mark.parametrize("streaming", ["on", "off"])
def test_task_aware_runs_read_the_knowledge_side_from_the_cache(
    make_model, tokenizer, knowledge, task, tmp_path, streaming
):
    """The cache holds the knowledge covariances; task data runs every time. A task-aware run after a plain one
    skips the calibration samples and writes the A that calibrating again gives."""
    texts, settings = knowledge[:140], dict(streaming=streaming, accumulate_dtype="float64", task_samples=48)
    _, first_samples = run(make_model, tokenizer, texts, tmp_path, **settings)
    cached, cached_samples = run(make_model, tokenizer, texts, tmp_path, task_data=task, **settings)
    fresh, _ = run(make_model, tokenizer, texts, None, task_data=task, **settings)
    assert first_samples - cached_samples >= 120 - 48, (first_samples, cached_samples)
    assert cached.lora_null_report.calibration["task_data"]["num_samples"] == 48
    for name, (c_a, _, _) in factors(cached).items():
        assert torch.allclose(c_a, factors(fresh)[name][0], atol=1e-6), name
