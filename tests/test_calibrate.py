import itertools

import pytest
import torch

from lora_null_core.calibration.batches import tokenize_batches
from lora_null_core.calibration.covariances import collect_covariances
from lora_null_core.calibration.taps import LayerInput, batch_counts
from lora_null_core.frontends.inspection import linear_layers


def independent_covariances(model, tokenizer, texts):
    """Σ x xᵀ in float64, one unpadded sample at a time: no masking involved at all."""
    sums, handles = {}, []
    for name, module in linear_layers(model).items():

        def hook(_m, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x

        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    for h in handles:
        h.remove()
    return sums


def test_masked_input_is_the_input_itself_without_padding_and_zeroed_with_it():
    raw = torch.randn(2, 3, 4)
    full, padded = torch.ones(2, 3), torch.tensor([[1, 1, 1], [1, 0, 0]])
    unpadded = LayerInput(raw, full.bool(), *batch_counts(full), "layer").masked
    assert unpadded.data_ptr() == raw.data_ptr() and torch.equal(unpadded, raw.reshape(6, 4))  # no copy made
    zeroed = LayerInput(raw, padded.bool(), *batch_counts(padded), "layer").masked
    assert not zeroed[4:].any() and torch.equal(zeroed[:4], raw.reshape(6, 4)[:4])


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_padding_never_enters_the_covariance(make_model, tokenizer, knowledge, architecture):
    model = make_model(architecture)
    texts = knowledge[:10] + ["Ada Varga ."]  # one very short sample forces heavy padding in its batch
    batches = tokenize_batches(texts, tokenizer, max_length=64, batch_size=4)
    assert any((b.attention_mask == 0).any() for b in batches)
    got = collect_covariances(model, linear_layers(model), batches)
    expected = independent_covariances(model, tokenizer, texts)
    for name, matrix in expected.items():
        assert torch.allclose(got.of(name).double(), matrix, rtol=1e-4, atol=1e-4 * matrix.abs().max()), name
    key = got.group_of[next(iter(expected))]
    assert got.tokens[key] == sum(b.num_tokens for b in batches) and got.samples[key] == len(texts)


def test_layers_reading_one_tensor_share_one_covariance(make_model, tokenizer, knowledge):
    model = make_model("llama", layers=1)
    got = collect_covariances(model, linear_layers(model), tokenize_batches(knowledge[:8], tokenizer, 64, 4))
    g = got.group_of
    assert (
        g["model.layers.0.self_attn.k_proj"]
        == g["model.layers.0.self_attn.v_proj"]
        == g["model.layers.0.self_attn.q_proj"]
    )
    assert g["model.layers.0.mlp.up_proj"] == g["model.layers.0.mlp.gate_proj"]
    assert (
        len(
            {
                g["model.layers.0.self_attn.q_proj"],
                g["model.layers.0.self_attn.o_proj"],
                g["model.layers.0.mlp.gate_proj"],
                g["model.layers.0.mlp.down_proj"],
            }
        )
        == 4
    )
    assert len(got.matrices) == 4


def test_per_sample_max_weighting_matches_the_reference_formula(make_model, tokenizer, knowledge):
    model = make_model("llama", layers=1)
    texts = knowledge[:6]
    name = "model.layers.0.mlp.down_proj"
    module = dict(model.named_modules())[name]
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].double()))
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    handle.remove()
    expected = sum((x / x.max().abs()).T @ (x / x.max().abs()) for x in seen) / len(seen)
    got = collect_covariances(
        model, {name: module}, tokenize_batches(texts, tokenizer, 64, 3), torch.float64, "per_sample_max"
    )
    assert torch.allclose(got.of(name), expected, rtol=1e-4, atol=1e-6)


def test_gram_panels_cover_the_width_in_order():
    from lora_null_core.calibration.covariances import gram_panels

    assert gram_panels(1536) == [slice(0, 1536)]  # narrow: one panel, the plain product
    panels = gram_panels(11008)
    assert len(panels) == 8 and panels[0].start == 0 and panels[-1].stop == 11008
    assert all(a.stop == b.start for a, b in itertools.pairwise(panels))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_summing_by_panels_then_mirroring_gives_the_whole_gram(dtype):
    from lora_null_core.calibration.covariances import add_gram_, gram_panels, mirror_panels_

    x = torch.randn(300, 70, generator=torch.Generator().manual_seed(0), dtype=dtype)
    panels = gram_panels(70, min_rows=16)
    assert len(panels) == 4
    matrix = torch.zeros(70, 70, dtype=dtype)
    for chunk in x.split(100):
        add_gram_(matrix, chunk, panels)
    assert not matrix[60:, :10].any()  # only on and right of the diagonal blocks until mirrored
    mirror_panels_(matrix, panels)
    assert torch.equal(matrix[60:, :10], matrix[:10, 60:].T)
    expected, tolerance = x.T @ x, 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(matrix, expected, rtol=tolerance, atol=tolerance * expected.abs().max())


def test_collector_sums_wide_inputs_by_panels(make_model, tokenizer, knowledge, monkeypatch):
    """Every layer's input summed by panels (as wide layers are) gives the covariances of the plain product."""
    from lora_null_core.calibration import covariances as calibrate

    model = make_model("llama", layers=1)
    batches = tokenize_batches(knowledge[:40], tokenizer, max_length=64, batch_size=8)
    whole = collect_covariances(model, linear_layers(model), batches, torch.float64)
    monkeypatch.setattr(calibrate, "gram_panels", lambda d: [slice(0, d // 3), slice(d // 3, d // 2), slice(d // 2, d)])
    paneled = collect_covariances(model, linear_layers(model), batches, torch.float64)
    for key, matrix in whole.matrices.items():
        assert torch.allclose(paneled.matrices[key], matrix, rtol=1e-12, atol=1e-12 * matrix.abs().max()), key
