"""A PeftModel holding a trained adapter and a second one to initialize: what a user who loads an adapter and adds
another gets. The init checks and writes the adapter it is asked for, leaves the other alone, and keeps v2's lora_A
frozen even when PEFT's set_adapter turns its gradient back on."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_null_core import FunctionNotPreservedError, LoraNullConfig, initialize_lora_null_weights
from lora_null_core.init.peft_layers import lora_layers

from .conftest import logits, relative_error

SETTINGS = LoraNullConfig(num_samples=160, holdout_samples=0, batch_size=32)


def with_trained_default(make_model, tokenizer):
    """A PeftModel whose `default` adapter has trained (non-zero B), plus an adapter `second` to initialize."""
    model = get_peft_model(make_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for layer in lora_layers(model, "default").values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    model.add_adapter(
        "second", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    )
    return model


def factors(model, name):
    return {
        k: (layer.lora_A[name].weight.detach().clone(), layer.lora_B[name].weight.detach().clone())
        for k, layer in lora_layers(model, name).items()
    }


def test_the_adapter_named_is_initialized_and_checked_not_the_active_one(make_model, tokenizer, knowledge):
    model = with_trained_default(make_model, tokenizer)
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    with model.disable_adapter():
        original = logits(model, ids)
    default_before = factors(model, "default")
    initialize_lora_null_weights(model, knowledge, tokenizer, SETTINGS, adapter_name="second")
    assert model.active_adapter == "default"  # the user's choice of active adapter is left as it was
    for key, (a, b) in factors(model, "default").items():
        assert torch.equal(a, default_before[key][0]) and torch.equal(b, default_before[key][1])
    model.set_adapter("second")
    assert relative_error(logits(model, ids), original) < 1e-5  # `second` starts as the base, as LoRA does


def test_without_a_name_the_active_adapter_is_initialized(make_model, tokenizer, knowledge):
    model = with_trained_default(make_model, tokenizer)
    model.set_adapter("second")
    default_before = factors(model, "default")
    initialize_lora_null_weights(model, knowledge, tokenizer, SETTINGS)
    assert model.lora_null_report.adapter_name == "second"
    for key, (a, b) in factors(model, "default").items():
        assert torch.equal(a, default_before[key][0]) and torch.equal(b, default_before[key][1])


def test_a_refused_init_leaves_the_adapter_as_it_was(make_model, tokenizer, knowledge):
    model = with_trained_default(make_model, tokenizer)
    before = factors(model, "second")
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {k: layer.get_base_layer().weight.detach().clone() for k, layer in lora_layers(model, "second").items()}
    with pytest.raises(FunctionNotPreservedError):  # a tolerance no init meets
        initialize_lora_null_weights(
            model, knowledge, tokenizer, SETTINGS.replace(max_function_error=0.0, variant="v1"), adapter_name="second"
        )
    for key, (a, b) in factors(model, "second").items():
        assert torch.equal(a, before[key][0]) and torch.equal(b, before[key][1]), key
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    for key, layer in lora_layers(model, "second").items():  # v1 had written residuals into the base: undone
        torch.testing.assert_close(layer.get_base_layer().weight, weights[key], rtol=0, atol=1e-6)


def test_set_adapter_unfreezes_a_and_training_starts_with_it_frozen_again(make_model, tokenizer, knowledge, tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from lora_null_core.frontends.callback import LoraNullCallback

    model = with_trained_default(make_model, tokenizer)
    initialize_lora_null_weights(model, knowledge, tokenizer, SETTINGS, adapter_name="second")
    model.set_adapter("second")  # what a user must call before training it: PEFT turns lora_A's gradient on again
    a_params = [layer.lora_A["second"].weight for layer in lora_layers(model, "second").values()]
    assert all(p.requires_grad for p in a_params)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    LoraNullCallback(save_init=False).on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    assert not any(p.requires_grad for p in a_params)
    assert all(layer.lora_B["second"].weight.requires_grad for layer in lora_layers(model, "second").values())
