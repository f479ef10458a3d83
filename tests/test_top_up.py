"""Knowledge text short of the widest targeted input: more of it is read, then the model's own text makes up the
rest, instead of a refusal (lora_null_core/calibration/selection.py)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from lora_null_core import InsufficientCalibrationError, OwnTextUnavailableError, lora_null_init
from lora_null_core.calibration.batches import tokenize_batches
from lora_null_core.calibration.texts import choose_texts
from lora_null_core.frontends.toy_world import knowledge_texts, tiny_model, tiny_tokenizer
from lora_null_core.init.peft_layers import lora_layers

from .conftest import logits, relative_error
from .test_distributed import free_port

FIVE = dict(num_samples=256, holdout_samples=0, generated_length=24)


def test_five_short_knowledge_texts_are_topped_up_with_the_models_own_text(make_model, tokenizer, knowledge):
    texts = knowledge[:5]
    tokens = sum(batch.num_tokens for batch in tokenize_batches(texts, tokenizer, 512, 8))
    model = make_model()
    widest = max(
        m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    assert tokens < widest == 128  # down_proj's input: the old refusal's case
    ids = torch.arange(3, 27).view(2, 12)
    before = logits(model, ids)
    peft_model = lora_null_init(model, LoraConfig(r=4, target_modules="all-linear"), texts, tokenizer, **FIVE)
    calibration = peft_model.lora_null_report.calibration
    added = calibration["top_up"]
    assert added["samples"] > 0 and added["tokens"] > 0 and added["source"].startswith("the model's own text")
    assert calibration["used"] == (
        f"5 rows of {calibration['source']} ({tokens:,} tokens) + {added['samples']} "
        f"samples of the model's own text ({added['tokens']:,} tokens)"
    )
    assert calibration["num_samples"] == 5 + added["samples"] and calibration["tokens"] >= widest
    assert relative_error(logits(peft_model, ids), before) < 1e-5  # the same function
    with pytest.raises(InsufficientCalibrationError, match="need at least 128.*short_calibration"):
        lora_null_init(
            make_model(),
            LoraConfig(r=4, target_modules="all-linear"),
            texts,
            tokenizer,
            short_calibration="refuse",
            **FIVE,
        )


def test_more_of_the_knowledge_text_is_read_before_any_own_text(make_model, tokenizer, knowledge):
    """num_samples is the usual amount, not a cap: with 240 texts in the file and 3 asked for, rows are read on
    until the widest input has enough contexts; the held-out texts are the ones the usual amount gives."""
    peft_model = lora_null_init(
        make_model(), LoraConfig(r=4), knowledge, tokenizer, num_samples=3, holdout_samples=8, generated_length=24
    )
    calibration = peft_model.lora_null_report.calibration
    assert calibration["top_up"] is None and 3 < calibration["num_samples"] < 200
    assert calibration["tokens"] >= 128 and calibration["used"].startswith(f"{calibration['num_samples']} rows of")
    usual = choose_texts(knowledge, tokenizer, 3, 8, 0, "text")
    longer = choose_texts(knowledge, tokenizer, 3, 8, 0, "text", until=lambda text: False)
    assert longer.holdout == usual.holdout and longer.calibration[:3] == usual.calibration
    assert len(longer.calibration) == 240 - 8 and not set(longer.calibration) & set(longer.holdout)


def test_a_top_up_that_cannot_sample_names_the_short_text_and_its_fix(make_model, tokenizer, knowledge):
    """Own text that cannot be drawn (here: weights on the meta device; on a GPU: too little free memory) where it
    would top up a short file: the error says the file is short and how much text would do, not "pass calibration
    text", which the user did."""
    model = make_model()
    with torch.device("meta"):
        model.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(torch.empty(64, 160))
    with pytest.raises(OwnTextUnavailableError) as raised:
        lora_null_init(model, LoraConfig(r=4, target_modules="all-linear"), knowledge[:5], tokenizer, **FIVE)
    message = str(raised.value)
    assert "fewer than the 128 the widest targeted input takes" in message and "not all here" in message
    assert message.endswith("give calibration text with at least 128 distinct contexts (more rows, or longer ones)")
    assert "pass calibration text" not in message


def test_own_text_short_of_the_floor_is_topped_up_too(make_model, tokenizer):
    """The key alone with samples too few or too short for the widest input: more of them are drawn."""
    peft_model = lora_null_init(
        make_model(), LoraConfig(r=4), None, tokenizer, num_samples=6, holdout_samples=0, generated_length=8
    )
    calibration = peft_model.lora_null_report.calibration
    assert calibration["top_up"]["samples"] > 0 and calibration["tokens"] >= 128


def top_up_worker(rank, world, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        texts = knowledge_texts(5, seed=0)
        tokenizer = tiny_tokenizer(knowledge_texts(240, seed=0))
        peft_model = lora_null_init(
            tiny_model("llama", len(tokenizer), seed=4), LoraConfig(r=4), texts, tokenizer, **FIVE
        )
        state = {
            name: layer.lora_A["default"].weight.detach().contiguous()
            for name, layer in lora_layers(peft_model, "default").items()
        }
        state["top_up"] = torch.tensor([peft_model.lora_null_report.calibration["top_up"]["samples"]])
        save_file(state, os.path.join(folder, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_processes_top_up_alike(tmp_path):
    """Each process samples its share of the own text and all of them calibrate on the whole: identical inits."""
    mp.spawn(top_up_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert int(rank0["top_up"]) > 0 and rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
