import json

import pytest
import torch
from peft import LoraConfig, PeftModel

from lora_null_core import export_for_original_base, merge_to_full_model
from lora_null_core.calibration.batches import tokenize_batches
from lora_null_core.frontends.jobs import init_to_folder
from lora_null_core.io.saving import DTYPE_KEY, load_initialized, load_model

from .conftest import logits, relative_error


def train(model, tokenizer, texts, steps=6):
    batch = tokenize_batches(texts, tokenizer, 32, len(texts))[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(steps):
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return batch


@pytest.mark.parametrize(
    "variant,init,use_rslora,expected_rank",
    [
        ("v2", "projected", False, 4),
        ("v1", "projected", False, 8),
        ("v1", "projected", True, 8),
        ("v2", "basis", False, 4),
    ],
)
def test_export_reproduces_the_trained_model_on_the_original_base(
    tmp_path, saved_model, tokenizer, knowledge, task, variant, init, use_rslora, expected_rank
):
    from lora_null_core import LoraNullConfig

    init_to_folder(
        str(saved_model),
        knowledge,
        tmp_path / "init",
        LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora),
        LoraNullConfig(variant=variant, init=init, num_samples=160, holdout_samples=0, batch_size=32),
        dtype="float32",
    )
    trained = load_initialized(tmp_path / "init", dtype="float32")
    initial_a = {n: p.detach().clone() for n, p in trained.named_parameters() if "lora_A" in n}
    batch = train(trained, tokenizer, task[:16])
    trained.save_pretrained(str(tmp_path / "trained"))
    for name, param in trained.named_parameters():
        if "lora_A" in name:
            assert torch.equal(param, initial_a[name]) == (variant == "v2"), name

    export_for_original_base(tmp_path / "init", tmp_path / "trained", tmp_path / "export")
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["r"] == expected_rank
    exported = PeftModel.from_pretrained(load_model(str(saved_model), dtype="float32"), str(tmp_path / "export"))
    expected = logits(trained, batch.input_ids, batch.attention_mask)
    assert relative_error(logits(exported, batch.input_ids, batch.attention_mask), expected) < 1e-5
    original = load_model(str(saved_model), dtype="float32")
    assert relative_error(logits(original, batch.input_ids, batch.attention_mask), expected) > 1e-3  # it did learn

    merge_to_full_model(tmp_path / "init", tmp_path / "trained", tmp_path / "merged")
    merged = load_model(str(tmp_path / "merged"), dtype="float32")
    assert relative_error(logits(merged, batch.input_ids, batch.attention_mask), expected) < 1e-5
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_saved_init_folder_is_a_plain_base_plus_peft_adapter(tmp_path, saved_model, knowledge):
    from safetensors.torch import load_file

    report = init_to_folder(str(saved_model), knowledge, tmp_path / "init", LoraConfig(r=4), dtype="float32")
    base_keys = set(load_file(str(tmp_path / "init" / "base" / "model.safetensors")))
    assert not any("lora_" in k or "base_layer" in k for k in base_keys)
    assert "model.layers.0.self_attn.q_proj.weight" in base_keys
    metadata = json.loads((tmp_path / "init" / "lora_null.json").read_text())
    assert metadata["variant"] == "v2" and metadata["lora"]["r"] == 4
    # 240 texts and 256 asked for: all go to calibration, none are left for held-out leakage.
    assert (metadata["calibration"]["num_samples"], metadata["calibration"]["holdout_samples"]) == (240, 0)
    assert len(metadata["layers"]) == len(report.layers) == 14
    assert all(layer["leakage"] < layer["leakage_random"] for layer in metadata["layers"])
    # The residual base alone is not the original model; base + adapter is.
    reloaded = load_initialized(tmp_path / "init", dtype="float32", is_trainable=False)
    original = load_model(str(saved_model), dtype="float32")
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    assert relative_error(logits(reloaded, ids), logits(original, ids)) < 1e-5
    residual_only = load_model(str(tmp_path / "init" / "base"), dtype="float32")
    assert relative_error(logits(residual_only, ids), logits(original, ids)) > 1e-3


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_what_a_trainer_saves_is_right_on_the_base_it_names(tmp_path, saved_model, tokenizer, knowledge, task, variant):
    """What the framework plugins do: init in memory (default train_base), train, save like a trainer, then
    finish_saved_adapter. The folder loads the standard way on the base its config names and gives the
    fine-tuned model; a checkpoint still resumes; nothing right on the residual base names the original."""
    from peft import AutoPeftModelForCausalLM

    from lora_null_core import lora_null_init, save_initial_adapter
    from lora_null_core.io.trainer_saves import finish_saved_adapter
    from lora_null_core.layout import EXPORT_DIR, RESIDUAL_ADAPTER_DIR

    def initialized():
        model = lora_null_init(
            load_model(str(saved_model), dtype="float32"),
            LoraConfig(r=4, lora_alpha=8),
            knowledge,
            tokenizer,
            variant=variant,
            num_samples=160,
            holdout_samples=0,
            batch_size=32,
        )
        model.get_base_model().config.name_or_path = str(saved_model)  # what from_pretrained records
        return model

    model = initialized()
    save_initial_adapter(model, tmp_path / "run" / "lora_null_init")
    assert (
        finish_saved_adapter(tmp_path / "run", tmp_path / "run" / "lora_null_init", final=True) is None
    )  # no weights yet
    batch = train(model, tokenizer, task[:16])
    expected = logits(model, batch.input_ids, batch.attention_mask)
    for folder, final in ((tmp_path / "run" / "checkpoint-6", False), (tmp_path / "run", True)):
        model.save_pretrained(str(folder))
        finish_saved_adapter(folder, tmp_path / "run" / "lora_null_init", final=final)
    finish_saved_adapter(tmp_path / "run", tmp_path / "run" / "lora_null_init", final=True)  # twice: no change

    named = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == str(saved_model)
    standard = PeftModel.from_pretrained(load_model(named, dtype="float32"), str(tmp_path / "run"))
    assert relative_error(logits(standard, batch.input_ids, batch.attention_mask), expected) < 1e-5
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "run"), **{DTYPE_KEY: torch.float32})
    assert relative_error(logits(auto, batch.input_ids, batch.attention_mask), expected) < 1e-5
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["r"] == (8 if variant == "v1" else 4)
    assert (tmp_path / "run" / RESIDUAL_ADAPTER_DIR).is_dir() == (variant == "v1")

    # Resuming from the checkpoint: a fresh init, then the trainer loads the checkpoint's adapter into it.
    checkpoint = tmp_path / "run" / "checkpoint-6"
    resumed = initialized()
    resumed.load_adapter(str(checkpoint), adapter_name="default", is_trainable=True)
    assert relative_error(logits(resumed, batch.input_ids, batch.attention_mask), expected) < 1e-5
    checkpoint_base = json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"]
    # A trainer resuming from a checkpoint loads every adapter folder inside it as one more adapter: none added.
    assert not [p for p in checkpoint.iterdir() if p.is_dir()]
    if variant == "v1":  # trained on the residual: names it; `export` gives the LoRA for the original
        assert checkpoint_base.startswith("lora-null residual base of")
        with pytest.raises((OSError, ValueError)):  # the named residual base is no model anywhere
            AutoPeftModelForCausalLM.from_pretrained(str(checkpoint))
        export_for_original_base(tmp_path / "run" / "lora_null_init", checkpoint, tmp_path / "checkpoint-export")
        on_original = PeftModel.from_pretrained(
            load_model(str(saved_model), dtype="float32"), str(tmp_path / "checkpoint-export")
        )
        assert relative_error(logits(on_original, batch.input_ids, batch.attention_mask), expected) < 1e-5
    else:  # trained on the original weights: the checkpoint itself is the LoRA for the original
        assert checkpoint_base == str(saved_model) and not (checkpoint / EXPORT_DIR).exists()
        on_original = PeftModel.from_pretrained(load_model(str(saved_model), dtype="float32"), str(checkpoint))
        assert relative_error(logits(on_original, batch.input_ids, batch.attention_mask), expected) < 1e-5


@pytest.mark.parametrize("variant,left_out_as", [("v2", "absent"), ("v2", "empty"), ("v1", "absent")])
def test_a_save_without_the_frozen_lora_a_gets_it_back(
    tmp_path, saved_model, tokenizer, knowledge, variant, left_out_as
):
    """Under DeepSpeed ZeRO-3, Transformers' Trainer saves only a PEFT model's trainable parameters: v2's frozen
    lora_A never reaches the file (integration_tests/trl shows it with DeepSpeed), or, where a partitioned parameter
    was saved without gathering, arrives empty. Finishing the save puts the init's A back, in the dtype of the
    saved factors; a v1 save without A (trained, so not the init's) is refused."""
    from safetensors.torch import load_file, save_file

    from lora_null_core import lora_null_init, save_initial_adapter
    from lora_null_core.errors import ExportError
    from lora_null_core.io.trainer_saves import finish_saved_adapter

    model = lora_null_init(
        load_model(str(saved_model), dtype="float32"),
        LoraConfig(r=4, lora_alpha=8),
        knowledge,
        tokenizer,
        variant=variant,
        num_samples=160,
        holdout_samples=0,
        batch_size=32,
    )
    init_dir = tmp_path / "run" / "lora_null_init"
    save_initial_adapter(model, init_dir)
    model.save_pretrained(str(tmp_path / "run"))
    weights = tmp_path / "run" / "adapter_model.safetensors"
    whole = load_file(str(weights))
    left_out = {k: torch.empty(0, dtype=torch.bfloat16) for k in whole if "lora_A" in k and left_out_as == "empty"}
    save_file({**{k: v.to(torch.bfloat16) for k, v in whole.items() if "lora_A" not in k}, **left_out}, str(weights))
    if variant == "v1":
        with pytest.raises(ExportError, match="lacks .* lora_A .* v1 trains"):
            finish_saved_adapter(tmp_path / "run", init_dir, final=True)
        return
    finish_saved_adapter(tmp_path / "run", init_dir, final=True, export=False)
    restored = load_file(str(weights))
    assert restored.keys() == whole.keys()
    initial = load_file(str(init_dir / "adapter" / "adapter_model.safetensors"))
    for key in (k for k in whole if "lora_A" in k):
        assert restored[key].dtype == torch.bfloat16 and torch.equal(restored[key], initial[key].to(torch.bfloat16))
    assert not list((tmp_path / "run").glob(".*partial"))


def test_finishing_a_pickled_residual_adapter_is_a_clear_error(tmp_path, saved_model, knowledge):
    from lora_null_core import LoraNullConfig
    from lora_null_core.errors import ExportError
    from lora_null_core.io.trainer_saves import finish_saved_adapter

    init_to_folder(
        str(saved_model), knowledge, tmp_path / "init", LoraConfig(r=4), LoraNullConfig(variant="v1"), dtype="float32"
    )
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tmp_path / "init" / "adapter" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ExportError, match="pickled"):
        finish_saved_adapter(pickled, tmp_path / "init", final=True)


def test_the_init_adapter_names_its_residual_base(tmp_path, saved_model, knowledge):
    """A tool that loads the base an adapter names (AutoPeftModel, vLLM) gets OUT/base, and with it the original
    function; the original model is never named by an adapter that needs the residual."""
    from peft import AutoPeftModelForCausalLM

    from lora_null_core import LoraNullConfig

    init_to_folder(
        str(saved_model),
        knowledge,
        tmp_path / "init",
        LoraConfig(r=4, lora_alpha=8),
        LoraNullConfig(num_samples=160, holdout_samples=0, batch_size=32),
        dtype="float32",
    )
    config = json.loads((tmp_path / "init" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "init" / "base").resolve())
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "init" / "adapter"), **{DTYPE_KEY: torch.float32})
    ids = torch.tensor([[2, 5, 9, 14, 7, 3]])
    assert relative_error(logits(loaded, ids), logits(load_model(str(saved_model), dtype="float32"), ids)) < 1e-5
