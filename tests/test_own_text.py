"""No calibration text: the model's own samples are the knowledge source (lora_null_core/calibration/own_text.py)."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model

from lora_null_core import LoraNullConfig, LoraNullError, initialize_lora_null_weights, lora_null_init
from lora_null_core.calibration.own_text import own_text
from lora_null_core.calibration.whole_model import whole_on
from lora_null_core.errors import CalibrationDataError, OwnTextUnavailableError
from lora_null_core.frontends.toy_world import knowledge_texts, tiny_model, tiny_tokenizer
from lora_null_core.init.peft_layers import lora_layers

from .test_distributed import free_port

SMALL = dict(num_samples=160, holdout_samples=16, generated_length=24)
CPU = torch.device("cpu")


def texts(model, tokenizer, **settings):
    return own_text(model, tokenizer, LoraNullConfig(**{**SMALL, **settings}), CPU).rows


def test_the_key_alone_initializes_from_the_models_own_text(make_model, tokenizer):
    peft_model = lora_null_init(make_model(), LoraConfig(r=4), None, tokenizer, **SMALL)
    report = peft_model.lora_null_report
    assert report.calibration["source"].startswith("the model's own text")
    assert report.calibration["num_samples"] == 160 and report.calibration["holdout_samples"] == 16
    assert report.function_error < 1e-5
    # The same init as one given those texts: the model's own samples are the calibration, nothing else.
    given = lora_null_init(make_model(), LoraConfig(r=4), texts(make_model(), tokenizer), tokenizer, **SMALL)
    mine, theirs = peft_model.state_dict(), given.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert [layer.leakage for layer in report.layers] == [layer.leakage for layer in given.lora_null_report.layers]


def test_samples_are_seeded_and_leave_the_callers_random_state_alone(make_model, tokenizer):
    model = make_model()
    state = torch.random.get_rng_state()
    first = texts(model, tokenizer)
    assert torch.equal(state, torch.random.get_rng_state())
    assert first == texts(model, tokenizer) and first != texts(model, tokenizer, seed=1)
    assert len(first) == 176 and len(set(first)) > 150  # sampled, not one text repeated
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= 24 for t in first)


def test_samples_are_drawn_with_the_adapter_off(make_model, tokenizer):
    """PEFT's random A and B (init_lora_weights=False, as the plugins ask) would change what the model says."""
    model = make_model()
    plain = texts(model, tokenizer)
    peft_model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False))
    for layer in lora_layers(peft_model, "default").values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=1.0)
    assert texts(peft_model, tokenizer) == plain


def test_peft_native_entry_takes_no_texts(make_model, tokenizer):
    peft_model = get_peft_model(make_model(), LoraConfig(r=4, init_lora_weights=False))
    initialize_lora_null_weights(peft_model, tokenizer=tokenizer, **SMALL)
    assert peft_model.lora_null_report.calibration["source"].startswith("the model's own text")
    with pytest.raises(LoraNullError, match="needs the model's tokenizer"):
        initialize_lora_null_weights(get_peft_model(make_model(), LoraConfig(r=4)), **SMALL)


def test_from_chat_requests_and_without_a_bos_token(make_model, tokenizer):
    model = make_model()
    chat = texts(model, tokenizer, generated_prompt="chat")
    assert all(t.startswith(tokenizer.bos_token) and "user" in t for t in chat)  # the template's rendering
    no_bos = tiny_tokenizer(knowledge_texts(240, seed=0))
    no_bos.bos_token = None
    assert texts(tiny_model("llama", len(no_bos)), no_bos)  # started from EOS
    no_template = tiny_tokenizer(knowledge_texts(240, seed=0))
    no_template.chat_template = None
    with pytest.raises(LoraNullError, match="needs a tokenizer with a chat template.*use generated_prompt 'bos'"):
        texts(tiny_model("llama", len(no_template)), no_template, generated_prompt="chat")
    neither = tiny_tokenizer(knowledge_texts(240, seed=0))
    neither.bos_token = neither.eos_token = None
    with pytest.raises(LoraNullError, match="neither a BOS nor an EOS"):
        texts(tiny_model("llama", len(neither)), neither)


def test_a_model_that_ends_at_once_gets_a_clear_error(make_model, tokenizer, monkeypatch):
    model = make_model()

    def ends_at_once(input_ids, **_):
        return torch.cat([input_ids, torch.full_like(input_ids[:, :1], tokenizer.eos_token_id)], dim=1)

    monkeypatch.setattr(model, "generate", ends_at_once)
    with pytest.raises(CalibrationDataError, match="generated was empty.*Pass calibration text"):
        lora_null_init(model, LoraConfig(r=4), None, tokenizer, **SMALL)


def test_weights_that_are_not_all_here_are_refused_by_name(make_model, tokenizer):
    model = make_model()
    with torch.device("meta"):
        model.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(torch.empty(64, 160))
    with pytest.raises(LoraNullError, match="not all here .* pass calibration text"):
        texts(model, tokenizer)


def test_a_model_in_cpu_memory_too_large_for_the_free_gpu_memory_is_refused_with_what_is_free(make_model, monkeypatch):
    """Sampling moves a model held in CPU memory to the GPU when it fits: the refusal says how much is free of how
    much (a training run refused this beside other processes that held the GPU)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**10, 80 * 2**30))
    model = make_model()
    with pytest.raises(OwnTextUnavailableError, match=r"do not fit the 0\.0 GiB free on cuda:0 \(of 80\.0 GiB"):
        with whole_on(model, torch.device("cuda:0")):
            pass
    assert next(model.parameters()).device == CPU


def test_cli_init_and_inspect_without_calibration(saved_model, tmp_path, capsys):
    from lora_null_core.frontends.cli import main

    assert (
        main(
            [
                "init",
                "--model",
                str(saved_model),
                "--rank",
                "4",
                "--output",
                str(tmp_path / "init"),
                "--num-samples",
                "160",
                "--generated-length",
                "24",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "init" / "lora_null.json").read_text())
    assert record["calibration"]["source"].startswith("the model's own text (24 tokens")
    assert (
        main(
            [
                "init",
                "--model",
                str(saved_model),
                "--rank",
                "4",
                "--output",
                str(tmp_path / "disk"),
                "--offload",
                "disk",
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "--offload disk never holds the whole model" in capsys.readouterr().err
    assert (
        main(
            [
                "inspect",
                "--model",
                str(saved_model),
                "--output",
                str(tmp_path / "report"),
                "--num-samples",
                "160",
                "--generated-length",
                "24",
                "--init-dir",
                str(tmp_path / "init"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "the model&#x27;s own text" in (tmp_path / "report" / "report.html").read_text()


def _worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tokenizer = tiny_tokenizer(knowledge_texts(240, seed=0))
        rows = own_text(tiny_model("llama", len(tokenizer), seed=0), tokenizer, LoraNullConfig(**SMALL), CPU).rows
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as file:
            json.dump(rows, file)
    finally:
        dist.destroy_process_group()


def test_two_processes_draw_seeded_shares_and_all_hold_every_text(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and len(rank0) == 176 and len(set(rank0)) > 150


def test_a_partly_offloaded_model_is_named_as_the_reason_sampling_is_slow(make_model, tokenizer, caplog):
    """device_map="auto" offloads layers when the GPU is short of free memory; every decoding step then moves them
    back, which looks like a hang. The warning says why and what to do."""
    model = make_model()
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "lm_head": "disk"}
    with caplog.at_level("WARNING", logger="lora_null_core.calibration.whole_model"):
        texts(model, tokenizer)
    assert "partly offloaded (device_map puts layers on cpu and disk)" in caplog.text
    caplog.clear()
    model.hf_device_map = {"": 0}
    with caplog.at_level("WARNING", logger="lora_null_core.calibration.whole_model"):
        texts(model, tokenizer)
    assert "offloaded" not in caplog.text


def test_a_gpu_draws_every_sample_at_once_when_their_cache_fits():
    """Decoding steps cost the same at 1 row as at 300, so the batch is sized by the KV cache's memory on a GPU;
    a CPU keeps batch_tokens' rule. 7B shape: 320 samples of 129 tokens at 64 MiB of cache each."""
    from lora_null_core.calibration.own_text import rows_per_batch

    per_row = 129 * 32 * 2 * 32 * 128 * 2
    assert rows_per_batch(320, 129, 16384, None) == 127  # CPU: three batches, as before
    assert rows_per_batch(320, 129, 16384, (per_row, 28 * 2**30)) == 320  # 28 GiB allowed: one batch
    assert rows_per_batch(320, 129, 16384, (per_row, 13 * 2**30)) == 160  # two equal batches, not 208 + 112
    assert rows_per_batch(320, 129, 16384, (per_row, 2**30)) == 127  # never fewer rows than batch_tokens gives
    assert rows_per_batch(0, 129, 16384, (per_row, 2**30)) == 127


def test_sampling_out_of_gpu_memory_halves_the_batch_and_draws_it_again(make_model, tokenizer):
    """The batch is sized from an estimate of the KV cache against most of the free memory; where it runs out, the
    batch is drawn again at half the rows, down to one, and every sample still comes back. Under ZeRO-3's lockstep
    it is raised: every rank would have to halve together."""
    from lora_null_core.calibration.own_text import _generate

    model = make_model()
    real = model.generate
    sizes = []

    def generate(*args, input_ids, **kwargs):
        sizes.append(len(input_ids))
        if len(input_ids) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, input_ids=input_ids, **kwargs)

    model.generate = generate
    config = LoraNullConfig(generated_length=8, batch_tokens=16 * 9)  # 16 rows of 1 + 8 tokens a batch
    drawn = _generate(model, tokenizer, [[tokenizer.bos_token_id]] * 10, config, torch.device("cpu"))
    assert len(drawn) == 10 and all(0 < len(row) <= 8 for row in drawn)
    assert sizes == [10, 8, 4, 4, 2]  # 16 rows (all 10) fail, 8 fail, then 4 at a time
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _generate(model, tokenizer, [[tokenizer.bos_token_id]] * 10, config, torch.device("cpu"), in_step=True)
