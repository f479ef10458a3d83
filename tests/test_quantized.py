"""QLoRA: the default init and `basis` on real bitsandbytes 4-bit (nf4, fp4) and 8-bit bases, on the CPU backend
of bitsandbytes (the GPU runs are benchmarks/frameworks_gpu). The factors come from each layer's dequantized
weight; the base stays quantized and untouched; a residual init is refused."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lora_null_core import LoraNullConfig, initialize_lora_null_weights, lora_null_init
from lora_null_core.errors import UnsupportedModelError
from lora_null_core.init.peft_layers import lora_layers
from lora_null_core.null_space import projected_factors
from lora_null_core.weights import float_weight, is_quantized

from .conftest import logits, relative_error

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (scripts/test.sh installs it)")
SMALL = {"num_samples": 200, "holdout_samples": 16, "max_length": 24}
QUANTIZATIONS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": torch.float32},
    "int8": {"load_in_8bit": True},
}


def load_quantized(folder, kind):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=BitsAndBytesConfig(**QUANTIZATIONS[kind]), device_map="cpu"
    )


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("init", ["projected", "basis"])
def test_default_and_basis_on_a_quantized_base(saved_model, tokenizer, knowledge, kind, init):
    model = load_quantized(saved_model, kind)
    quantized = {name: m for name, m in model.named_modules() if is_quantized(getattr(m, "weight", torch.empty(0)))}
    assert quantized, "the loader did not quantize"
    ids = tokenizer(knowledge[-8:], return_tensors="pt", padding=True)
    before = logits(model, ids["input_ids"], ids["attention_mask"])  # (bitsandbytes repacks for the CPU on first use)
    weights = {name: float_weight(m).clone() for name, m in quantized.items()}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    initialize_lora_null_weights(peft_model, knowledge, tokenizer, LoraNullConfig(init=init, **SMALL))

    report = peft_model.lora_null_report
    assert report.train_base == "original" and report.function_error < 1e-6
    assert relative_error(logits(peft_model, ids["input_ids"], ids["attention_mask"]), before) < 1e-6
    for name, module in quantized.items():  # still quantized, and the same weights
        assert is_quantized(module.weight) and torch.equal(float_weight(module), weights[name]), name
    leakage = sum(layer.leakage for layer in report.layers) / len(report.layers)
    random = sum(layer.leakage_random for layer in report.layers) / len(report.layers)
    assert leakage < 0.5 * random, (leakage, random)
    for name, layer in lora_layers(peft_model, "default").items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.shape == (4, layer.in_features) and b.shape == (layer.out_features, 4), name
        assert not a.requires_grad and b.requires_grad and torch.all(b == 0)
        if init == "projected":  # A is the projected factor of this layer's dequantized weight (up to row signs)
            basis = torch.linalg.qr(a.double().T).Q
            expected = projected_factors(
                float_weight(layer.get_base_layer()).double(), basis, layer.scaling["default"]
            )[0]
            scaled = a.double() / report.config["a_scale"]
            signs = torch.sign((expected * scaled).sum(1, keepdim=True))
            assert relative_error(expected * signs, scaled) < 1e-4, name


def test_a_quantized_base_trains_and_reloads_the_standard_way(saved_model, tokenizer, knowledge, task, tmp_path):
    peft_model = get_peft_model(load_quantized(saved_model, "nf4"), LoraConfig(r=4, init_lora_weights=False))
    initialize_lora_null_weights(peft_model, knowledge, tokenizer, LoraNullConfig(**SMALL))
    frozen_a = {
        n: layer.lora_A["default"].weight.detach().clone() for n, layer in lora_layers(peft_model, "default").items()
    }
    batch = tokenizer(task[:8], return_tensors="pt", padding=True)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        peft_model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, layer in lora_layers(peft_model, "default").items():
        assert torch.equal(layer.lora_A["default"].weight, frozen_a[name])
    trained = logits(peft_model, batch["input_ids"], batch["attention_mask"])
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_quantized(saved_model, "nf4"), tmp_path / "adapter")
    assert relative_error(logits(reloaded, batch["input_ids"], batch["attention_mask"]), trained) < 1e-5


@pytest.mark.parametrize("settings", [{"variant": "v1"}, {"train_base": "residual"}])
def test_a_residual_on_a_quantized_base_is_refused(saved_model, tokenizer, knowledge, settings):
    model = load_quantized(saved_model, "nf4")
    with pytest.raises(UnsupportedModelError, match="quantized base weight.*Keep the default"):
        lora_null_init(model, LoraConfig(r=4), knowledge, tokenizer, LoraNullConfig(**SMALL, **settings))


def test_the_models_own_text_is_sampled_from_the_4bit_model(saved_model, tokenizer, knowledge):
    """QLoRA with the key alone: the samples come from the quantized model (with its adapter off), and the init on
    them equals an init given those same samples as calibration text."""
    from lora_null_core.calibration.own_text import own_text

    model = load_quantized(saved_model, "nf4")
    samples = own_text(model, tokenizer, LoraNullConfig(**SMALL), torch.device("cpu")).rows
    assert 200 <= len(samples) <= 216 and len(set(samples)) > 150  # a sample that ends at once is left out
    results = []
    for calibration in (None, samples):
        peft_model = get_peft_model(load_quantized(saved_model, "nf4"), LoraConfig(r=4, init_lora_weights=False))
        initialize_lora_null_weights(peft_model, calibration, tokenizer, LoraNullConfig(**SMALL))
        results.append({k: v for k, v in peft_model.state_dict().items() if "lora_" in k})
    assert results[0].keys() == results[1].keys() and all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_4bit_weight_repacked_for_the_cpu_reads_as_the_weight_it_computes_with(saved_model, double_quant):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first inference forward (codes
    interleaved, absmax in bfloat16); its own dequantize_4bit then reads the codes in the old order. The init must
    read the weight the layer now computes with: the same as before, up to absmax rounded to bfloat16."""
    from bitsandbytes import functional

    repack = getattr(functional, "_convert_weight_packed_for_cpu", None)
    if repack is None:
        pytest.skip("this bitsandbytes has no CPU repacking")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    settings = {**QUANTIZATIONS["nf4"], "bnb_4bit_use_double_quant": double_quant}
    model = AutoModelForCausalLM.from_pretrained(
        saved_model, quantization_config=BitsAndBytesConfig(**settings), device_map="cpu"
    )
    layer = model.model.layers[0].mlp.down_proj
    before = float_weight(layer).clone()
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):  # this CPU did not repack it yet
        layer.weight.data, layer.weight.quant_state = repack(layer.weight.data, layer.weight.quant_state)
    assert relative_error(float_weight(layer), before) < 5e-3
    misread = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert relative_error(misread.reshape(before.shape).float(), before) > 0.1  # what the fix avoids
    if functional.has_avx512bf16():  # the repacked forward runs only where bitsandbytes would repack
        x = torch.randn(5, layer.in_features)
        with torch.no_grad():  # the weight read is the one the layer's forward uses
            assert relative_error(x @ float_weight(layer).T, layer(x).float()) < 1e-2


def test_the_init_and_the_meter_leave_4bit_layers_trainable_on_the_cpu(saved_model, tokenizer, knowledge):
    """bitsandbytes repacks a 4-bit weight at its first inference forward on an AVX512-BF16 CPU, and the repacked
    forward passes no gradient to its input: QLoRA trained after an init or a meter reading would train wrong. The
    repacking is asked for on every layer here (as such a CPU would), whatever this CPU is."""
    from lora_null_core import forgetting, forgetting_reference

    model = load_quantized(saved_model, "nf4")
    four_bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    for layer in four_bit:
        layer.support_avx512bf16_for_cpu = 1
    peft_model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False))
    initialize_lora_null_weights(peft_model, knowledge, tokenizer, LoraNullConfig(**SMALL))
    reference = forgetting_reference(peft_model, tokenizer, samples=4, length=8)
    forgetting(peft_model, reference)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit)
    assert all(m.support_avx512bf16_for_cpu == 1 for m in four_bit)  # the user's setting is back
    layer = four_bit[0]
    layer.train()
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.norm() > 0
