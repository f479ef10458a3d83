"""The weight prior (experimental, #49): the bases are solved from C/tr + β·WᵀW/tr (init/weight_prior.py)."""

import pytest
import torch
from peft import LoraConfig

from lora_null_core import ConfigError, LoraNullConfig, lora_null_init
from lora_null_core.init.peft_layers import lora_layers, weight_matrix

from .conftest import logits, relative_error

SETTINGS = dict(num_samples=64, holdout_samples=0, init="basis", a_scale=1.0)


def bases(model, tokenizer, knowledge, beta):
    """Each layer's null basis (A's rows: the basis init writes A = Uᵀ), its weight, and the init's function error."""
    ids = torch.arange(3, 27).view(2, 12)
    before = logits(model, ids)
    peft_model = lora_null_init(
        model,
        LoraConfig(r=4, target_modules=["o_proj", "down_proj"]),
        knowledge,
        tokenizer,
        weight_prior=beta,
        **SETTINGS,
    )
    layers = lora_layers(peft_model, "default")
    found = {
        name: (layer.lora_A["default"].weight.detach().double(), weight_matrix(layer).double())
        for name, layer in layers.items()
    }
    return found, relative_error(logits(peft_model, ids), before), peft_model.lora_null_report


def test_a_large_prior_takes_the_weights_least_used_input_directions(make_model, tokenizer, knowledge):
    plain, _, _ = bases(make_model(), tokenizer, knowledge, 0.0)
    strong, error, report = bases(make_model(), tokenizer, knowledge, 1e8)
    assert error < 1e-5 and report.config["weight_prior"] == 1e8  # the same function, and the report says so
    for name, (basis, weight) in strong.items():
        # The least the weight can respond to r orthonormal directions: its r smallest eigenvalues of WᵀW (zero for
        # down_proj, wider than it is tall); o_proj and down_proj each read their own input.
        least = torch.linalg.eigvalsh(weight.T @ weight)[:4].clamp_min(0).sum()
        response = (weight @ basis.T).square().sum()
        assert response <= 1.01 * least + 1e-9 * weight.square().sum(), name
        assert response < (weight @ plain[name][0].T).square().sum(), name  # less than without the prior


def test_a_small_prior_moves_little_and_none_is_the_plain_null_space(make_model, tokenizer, knowledge):
    plain, _, _ = bases(make_model(), tokenizer, knowledge, 0.0)
    tiny, _, _ = bases(make_model(), tokenizer, knowledge, 1e-9)
    for name, (basis, _) in tiny.items():
        assert torch.linalg.svdvals(basis @ plain[name][0].T).min() > 0.99, name


def test_a_negative_prior_is_refused():
    with pytest.raises(ConfigError, match="weight_prior=-1.*positive"):
        LoraNullConfig(weight_prior=-1)
