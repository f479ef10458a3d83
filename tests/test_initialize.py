import functools

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_null_core import LoraNullConfig, lora_null_init
from lora_null_core.calibration.texts import choose_texts
from lora_null_core.config import FROZEN_A_SCALE, TASK_A_SCALE
from lora_null_core.frontends.toy_world import ARCHITECTURES
from lora_null_core.init.peft_layers import lora_layers, weight_matrix

from .conftest import logits, relative_error
from .test_calibrate import independent_covariances

SMALL = dict(num_samples=160, holdout_samples=40, batch_size=16)


def init_and_compare(make_model, tokenizer, knowledge, architecture, **overrides):
    """Init a fresh model; return the PeftModel, its pre-init probe logits and independent fp64 covariances."""
    model = make_model(architecture)
    probe = tokenizer(knowledge[200:204], return_tensors="pt", padding=True)
    before = logits(model, **probe)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    chosen = choose_texts(knowledge[:200], tokenizer, 160, 40, seed=0, text_field="text").calibration
    covariances = independent_covariances(model, tokenizer, chosen)
    peft_model = lora_null_init(model, LoraConfig(r=4, lora_alpha=8), knowledge[:200], tokenizer, **SMALL, **overrides)
    assert relative_error(logits(peft_model, **probe), before) < 1e-3
    return peft_model, original, covariances


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_init_preserves_the_function_and_lands_in_the_null_space(make_model, tokenizer, knowledge, architecture):
    peft_model, original, covariances = init_and_compare(make_model, tokenizer, knowledge, architecture)
    report = peft_model.lora_null_report
    assert report.function_error < 1e-5
    layers = lora_layers(peft_model, "default")
    assert set(covariances) == set(layers)
    for name, layer in layers.items():
        a = layer.lora_A["default"].weight.detach().double()
        b = layer.lora_B["default"].weight.detach().double()
        w = weight_matrix(layer).detach().double()
        w0 = original[name].double().T if layer.fan_in_fan_out else original[name].double()
        # Residual plus adapter is the original weight.
        assert torch.allclose(w + layer.scaling["default"] * b @ a, w0, atol=1e-5), name
        # A's row space holds (nearly) the least calibration energy any 4-dim subspace can: within 1.1× of
        # the sum of the 4 smallest eigenvalues of an independently computed fp64 covariance.
        values = torch.linalg.eigvalsh(covariances[name])
        rows = torch.linalg.qr(a.T)[0]
        energy = torch.trace(rows.T @ covariances[name] @ rows)
        assert energy <= 1.1 * values[:4].sum() + 1e-9 * values[-1], name
    for entry in report.layers:
        assert entry.leakage < 0.5 * entry.leakage_random
        assert entry.leakage_holdout < 0.5 * entry.leakage_holdout_random


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_residual_written_in_row_chunks_is_exact(make_model, tokenizer, knowledge, architecture, monkeypatch):
    # One row per float64 chunk, so every row crosses a chunk border (gpt2: transposed Conv1D views).
    import lora_null_core.init.factors as factors
    import lora_null_core.null_space as null_space

    small = functools.partial(null_space.row_chunks, bytes_per_chunk=1)
    monkeypatch.setattr(factors, "row_chunks", small)
    monkeypatch.setattr(null_space, "row_chunks", small)
    peft_model, original, _ = init_and_compare(make_model, tokenizer, knowledge, architecture)
    for name, layer in lora_layers(peft_model, "default").items():
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        w0 = original[name].double().T if layer.fan_in_fan_out else original[name].double()
        assert torch.allclose(weight_matrix(layer).double() + layer.scaling["default"] * b @ a, w0, atol=1e-5), name


@pytest.mark.parametrize("architecture", ["llama", "gemma", "gpt2"])
def test_float64_sums_give_exactly_the_smallest_eigenvectors(make_model, tokenizer, knowledge, architecture):
    peft_model, _, covariances = init_and_compare(
        make_model, tokenizer, knowledge, architecture, accumulate_dtype="float64"
    )
    for name, layer in lora_layers(peft_model, "default").items():
        a = layer.lora_A["default"].weight.detach().double()
        values, vectors = torch.linalg.eigh(covariances[name])
        # Every eigenvector tied with the 4th counts: layer 0 sees few distinct tokens, so its covariance has
        # an exactly-zero eigenspace wider than 4, any basis of which is right.
        vectors = vectors[:, values <= values[3] + 1e-9 * values[-1]]
        assert torch.linalg.norm(a - a @ vectors @ vectors.T) / torch.linalg.norm(a) < 1e-4, name


def test_v2_freezes_lora_a_and_v1_does_not(make_model, tokenizer, knowledge):
    for variant, a_trainable in (("v1", True), ("v2", False)):
        peft_model = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, variant=variant, **SMALL)
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                assert param.requires_grad is a_trainable, name
            elif "lora_B" in name:
                assert param.requires_grad, name
            else:
                assert not param.requires_grad, name


def test_rslora_and_alpha_are_honoured(make_model, tokenizer, knowledge):
    model = make_model()
    probe = tokenizer(knowledge[:3], return_tensors="pt", padding=True)
    before = logits(model, **probe)
    config = LoraConfig(r=4, lora_alpha=32, use_rslora=True)
    peft_model = lora_null_init(model, config, knowledge, tokenizer, **SMALL)
    layer = next(iter(lora_layers(peft_model, "default").values()))
    assert layer.scaling["default"] == pytest.approx(32 / 2)  # alpha / sqrt(r)
    assert relative_error(logits(peft_model, **probe), before) < 1e-5


def test_basis_init_leaves_the_base_untouched(make_model, tokenizer, knowledge):
    model = make_model()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = lora_null_init(model, LoraConfig(r=4), knowledge, tokenizer, init="basis", **SMALL)
    for name, param in peft_model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, weights[name.replace(".base_layer", "")]), name
    for layer in lora_layers(peft_model, "default").values():
        a = layer.lora_A["default"].weight.detach()
        assert not layer.lora_B["default"].weight.any()
        # orthogonal null basis, each row of length a_scale (2 by default for a frozen A)
        assert torch.allclose(a @ a.T, FROZEN_A_SCALE**2 * torch.eye(4), atol=1e-4)
    assert all(entry.leakage < 0.5 for entry in peft_model.lora_null_report.layers)


def test_default_a_scale_speeds_up_only_a_frozen_a():
    """v2 (frozen A) gets FROZEN_A_SCALE by default, v1 (A trains) the paper's factors; a given value wins."""
    assert FROZEN_A_SCALE == 2.0
    assert LoraNullConfig().applied_a_scale() == FROZEN_A_SCALE
    assert LoraNullConfig(init="basis").applied_a_scale() == FROZEN_A_SCALE
    assert LoraNullConfig(variant="v1").applied_a_scale() == 1.0
    assert LoraNullConfig(a_scale=1).applied_a_scale() == 1.0
    assert LoraNullConfig(variant="v1", a_scale=3).applied_a_scale() == 3.0
    # With task data (a task-aware A) v2's default is TASK_A_SCALE; v1 and a given value are unchanged.
    assert LoraNullConfig().applied_a_scale(task_aware=True) == TASK_A_SCALE == 1.0
    assert LoraNullConfig(variant="v1").applied_a_scale(task_aware=True) == 1.0
    assert LoraNullConfig(a_scale=3).applied_a_scale(task_aware=True) == 3.0


def test_the_report_records_the_a_scale_applied(make_model, tokenizer, knowledge):
    """lora_null.json records the factor the init applied, not None, so `inspect` and a reload see it."""
    default = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, **SMALL)
    v1 = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, variant="v1", **SMALL)
    assert default.lora_null_report.config["a_scale"] == FROZEN_A_SCALE
    assert v1.lora_null_report.config["a_scale"] == 1.0


@pytest.mark.parametrize("init", ["projected", "basis"])
def test_a_scale_moves_magnitude_from_b_to_a_and_keeps_the_function(make_model, tokenizer, knowledge, init):
    """a_scale = c: A is c times the paper's, B 1/c times, the residual base the same, the output unchanged."""
    probe = tokenizer(knowledge[:3], return_tensors="pt", padding=True)
    plain = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, init=init, a_scale=1.0, **SMALL)
    model = make_model()
    before = logits(model, **probe)
    scaled = lora_null_init(model, LoraConfig(r=4), knowledge, tokenizer, init=init, a_scale=3.0, **SMALL)
    assert relative_error(logits(scaled, **probe), before) < 1e-5
    plain_layers, scaled_layers = lora_layers(plain, "default"), lora_layers(scaled, "default")
    for name, layer in scaled_layers.items():
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        torch.testing.assert_close(a, 3 * plain_layers[name].lora_A["default"].weight.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b, plain_layers[name].lora_B["default"].weight.detach() / 3, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(weight_matrix(layer), weight_matrix(plain_layers[name]), rtol=1e-4, atol=1e-6)
    assert scaled.lora_null_report.config["a_scale"] == 3.0
    # Leakage compares directions, not sizes: the same with any factor.
    for mine, theirs in zip(scaled.lora_null_report.layers, plain.lora_null_report.layers, strict=True):
        assert mine.leakage == pytest.approx(theirs.leakage, rel=1e-3, abs=1e-7)


def train_steps(model, ids, steps=4):
    """A few Adam steps of next-token loss on `ids`, then the logits."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return logits(model, input_ids=ids)


def test_v2_trains_on_the_original_weights_exactly_as_on_the_residual(make_model, tokenizer, knowledge):
    """Default (train_base auto, v2): base untouched, A = A₀, B = 0; training it gives the same model as the
    paper's residual form, and what it saves is a LoRA for the original model."""
    from lora_null_core.layout import RESIDUAL_MARKER

    model = make_model()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    original = lora_null_init(model, LoraConfig(r=4), knowledge, tokenizer, **SMALL)
    residual = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, train_base="residual", **SMALL)
    assert original.lora_null_report.train_base == "original" and residual.lora_null_report.train_base == "residual"
    assert not hasattr(original.get_base_model().config, RESIDUAL_MARKER)
    for name, param in original.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, weights[name.replace(".base_layer", "")]), name
    residual_layers = lora_layers(residual, "default")
    for name, layer in lora_layers(original, "default").items():
        assert not layer.lora_B["default"].weight.any()
        torch.testing.assert_close(layer.lora_A["default"].weight, residual_layers[name].lora_A["default"].weight)
    ids = tokenizer(knowledge[:4], return_tensors="pt", padding=True)["input_ids"]
    after_original, after_residual = train_steps(original, ids), train_steps(residual, ids)
    assert relative_error(after_original, after_residual) < 1e-4
    assert relative_error(after_original, logits(make_model(), input_ids=ids)) > 1e-3  # training did move it


def test_v1_cannot_train_on_the_original_weights():
    from lora_null_core.errors import ConfigError

    assert LoraNullConfig(variant="v1").residual and not LoraNullConfig().residual
    assert not LoraNullConfig(variant="v1", init="basis", train_base="original").residual
    with pytest.raises(ConfigError, match="train_base='original' needs variant v2"):
        LoraNullConfig(variant="v1", train_base="original")


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "3"])
def test_a_scale_must_be_a_positive_number(bad):
    from lora_null_core.errors import ConfigError

    with pytest.raises(ConfigError, match="a_scale"):
        LoraNullConfig(a_scale=bad)


def test_an_existing_peft_model_is_initialized_in_place(make_model, tokenizer, knowledge):
    """What framework plugins do: they hold a PeftModel with a randomly initialized adapter."""
    model = make_model()
    probe = tokenizer(knowledge[:3], return_tensors="pt", padding=True)
    before = logits(model, **probe)
    peft_model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=True, target_modules=["q_proj", "down_proj"]))
    same = lora_null_init(peft_model, None, knowledge, tokenizer, **SMALL)
    assert same is peft_model
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(same, "default")} == {"q_proj", "down_proj"}
    assert relative_error(logits(same, **probe), before) < 1e-5
    # PEFT's random A was replaced by null-space directions (B = 0: the default trains on the original weights).
    assert all(not layer.lora_B["default"].weight.any() for layer in lora_layers(same, "default").values())
    assert all(entry.leakage < 0.5 * entry.leakage_random for entry in same.lora_null_report.layers)


def test_config_overrides_and_defaults():
    config = LoraNullConfig().replace(variant="v1", num_samples=3)
    assert (config.variant, config.num_samples, config.init) == ("v1", 3, "projected")


def test_the_peft_native_entry_matches_lora_null_init(make_model, tokenizer, knowledge):
    """get_peft_model(..., init_lora_weights=False) then initialize_lora_null_weights, as with PEFT's EVA: the
    same factors as lora_null_init wrapping the model itself; a plain model is refused with the other entry."""
    from peft import get_peft_model

    from lora_null_core import ConfigError, initialize_lora_null_weights

    targets = ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    native = initialize_lora_null_weights(
        get_peft_model(make_model("llama"), config), knowledge[:200], tokenizer, **SMALL
    )
    direct = lora_null_init(
        make_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=targets), knowledge[:200], tokenizer, **SMALL
    )
    native_layers, direct_layers = lora_layers(native, "default"), lora_layers(direct, "default")
    assert native_layers.keys() == direct_layers.keys()
    for name, layer in native_layers.items():
        assert torch.allclose(layer.lora_A["default"].weight, direct_layers[name].lora_A["default"].weight, atol=1e-6)
    with pytest.raises(ConfigError, match="lora_null_init"):
        initialize_lora_null_weights(make_model("llama"), knowledge[:200], tokenizer)
