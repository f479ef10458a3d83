"""Each bad input gets its own error, naming the problem and the fix, and nothing is half-written."""

import json

import pytest
import torch
from peft import LoraConfig
from torch import nn

from lora_null_core import (
    CalibrationDataError,
    ConfigError,
    ExportError,
    InsufficientCalibrationError,
    InvalidRankError,
    LoraNullConfig,
    NonFiniteActivationsError,
    NoTargetModulesError,
    OutputExistsError,
    UnsupportedModelError,
    export_for_original_base,
    lora_null_init,
)
from lora_null_core.frontends.jobs import init_to_folder
from lora_null_core.frontends.toy_world import write_jsonl

SMALL = dict(num_samples=160, holdout_samples=0, batch_size=32)


def test_empty_calibration(make_model, tokenizer, tmp_path):
    with pytest.raises(CalibrationDataError, match="empty"):
        lora_null_init(make_model(), LoraConfig(r=4), [], tokenizer)
    with pytest.raises(CalibrationDataError, match="only empty texts"):
        lora_null_init(make_model(), LoraConfig(r=4), ["", "   "], tokenizer)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CalibrationDataError):
        lora_null_init(make_model(), LoraConfig(r=4), str(tmp_path / "empty.jsonl"), tokenizer)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        lora_null_init(make_model(), LoraConfig(r=4), str(tmp_path / "missing.jsonl"), tokenizer)


def test_too_few_tokens_for_the_layer_width(make_model, tokenizer, knowledge):
    with pytest.raises(InsufficientCalibrationError, match=r"input width 64 .* only \d+ tokens"):
        lora_null_init(
            make_model(),
            LoraConfig(r=4),
            knowledge,
            tokenizer,
            num_samples=2,
            holdout_samples=0,
            short_calibration="refuse",
        )
    # By default more of the text is read instead (tests/test_top_up.py); the check can be turned off on purpose.
    lora_null_init(
        make_model(), LoraConfig(r=4), knowledge, tokenizer, num_samples=2, holdout_samples=0, min_tokens_per_dim=0
    )


def test_rank_too_large(make_model, tokenizer, knowledge):
    with pytest.raises(InvalidRankError, match="d_in=64"):
        lora_null_init(make_model(), LoraConfig(r=64), knowledge, tokenizer, **SMALL)
    with pytest.raises(InvalidRankError, match="d_out=32"):  # k_proj: 2 kv heads × 16
        lora_null_init(make_model(), LoraConfig(r=40, target_modules=["k_proj"]), knowledge, tokenizer, **SMALL)


def test_no_module_matches_targets(make_model, tokenizer, knowledge):
    with pytest.raises(NoTargetModulesError, match="q_proj"):  # the message lists what does exist
        lora_null_init(make_model(), LoraConfig(r=4, target_modules=["query_key_value"]), knowledge, tokenizer)


def test_non_finite_activations(make_model, tokenizer, knowledge):
    model = make_model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationsError, match="down_proj"):  # up_proj is not targeted: its output is
        lora_null_init(model, LoraConfig(r=4, target_modules=["down_proj"]), knowledge, tokenizer, **SMALL)
    for streaming in ("on", "off"):  # targeted: refused by name before it is computed with (block by block: on arrival)
        with pytest.raises(UnsupportedModelError, match="layers.0.mlp.up_proj's weight contains NaN"):
            lora_null_init(model, LoraConfig(r=4), knowledge, tokenizer, **{**SMALL, "streaming": streaming})


def test_quantized_base_refuses_a_residual(make_model, tokenizer, knowledge):
    """v1 (and train_base residual) would write W − s·B·A into a weight stored in 8 bits; the default leaves it
    untouched (tests/test_quantized.py runs it on bitsandbytes bases)."""
    model = make_model()
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight = nn.Parameter(q_proj.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match="q_proj has a quantized base weight.*Keep the default"):
        lora_null_init(model, LoraConfig(r=4), knowledge, tokenizer, variant="v1", **SMALL)


def test_embeddings_alone_are_named_as_unsupported(make_model, tokenizer, knowledge):
    with pytest.raises(NoTargetModulesError, match="only embeddings .*embed_tokens.*not supported.*all-linear"):
        lora_null_init(make_model(), LoraConfig(r=4, target_modules=["embed_tokens"]), knowledge, tokenizer, **SMALL)


def test_dora_and_foreign_inits_are_refused(make_model, tokenizer, knowledge):
    with pytest.raises(UnsupportedModelError, match="DoRA"):
        lora_null_init(make_model(), LoraConfig(r=4, use_dora=True), knowledge, tokenizer)


def test_missing_text_field_and_chat_template(make_model, tokenizer):
    with pytest.raises(CalibrationDataError, match="--text-field"):
        lora_null_init(make_model(), LoraConfig(r=4), [{"question": "x"}], tokenizer)
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>")
    with pytest.raises(CalibrationDataError, match="chat template"):
        lora_null_init(make_model(), LoraConfig(r=4), [{"messages": [{"role": "user", "content": "hi"}]}], plain)


def test_bad_config_values():
    with pytest.raises(ConfigError, match="variant='v3'"):
        LoraNullConfig(variant="v3")
    with pytest.raises(ConfigError, match="Unknown"):
        LoraNullConfig().replace(rank=3)


def test_existing_output_is_not_touched(tmp_path, saved_model, knowledge):
    out = tmp_path / "init"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        init_to_folder(str(saved_model), knowledge, out, LoraConfig(r=4))
    assert (out / "keep.txt").read_text() == "mine"


def test_a_failure_while_writing_leaves_nothing_behind(tmp_path, saved_model, knowledge, monkeypatch):
    from lora_null_core import report

    def broken_write(self, folder):
        raise OSError("disk full")

    monkeypatch.setattr(report.InitReport, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        init_to_folder(str(saved_model), knowledge, tmp_path / "init", LoraConfig(r=4), dtype="float32")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging folder


def test_export_refuses_pickles_and_foreign_adapters(tmp_path, saved_model, knowledge):
    init_to_folder(str(saved_model), knowledge, tmp_path / "init", LoraConfig(r=4), dtype="float32")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tmp_path / "init" / "adapter" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ExportError, match="pickled"):
        export_for_original_base(tmp_path / "init", pickled, tmp_path / "out")
    with pytest.raises(ExportError, match="lora-null init"):
        export_for_original_base(tmp_path / "pickled", tmp_path / "init" / "adapter", tmp_path / "out")
    other = tmp_path / "other"
    init_to_folder(str(saved_model), knowledge, other, LoraConfig(r=4, target_modules=["q_proj"]), dtype="float32")
    with pytest.raises(ExportError, match="lacks"):
        export_for_original_base(tmp_path / "init", other / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    json.loads((tmp_path / "init" / "lora_null.json").read_text())  # the init folder is intact


# ---------------------------------------------------------------- inputs that once gave wrong output with exit 0
@pytest.mark.parametrize(
    "lora_kwargs, match",
    [
        (dict(r=4, lora_alpha=0), "alpha must be a finite number above 0"),
        (dict(r=4, lora_alpha=float("nan")), "alpha must be a finite number above 0"),
        (dict(r=4, lora_alpha=-8), "alpha must be a finite number above 0"),
        (dict(r=4, lora_dropout=1.5), "lora_dropout=1.5 must be at least 0 and below 1"),
        (dict(r=4, alpha_pattern={"q_proj": 0.0}), r"alpha_pattern\['q_proj'\]"),
    ],
)
def test_lora_numbers_are_checked_before_any_compute(make_model, tokenizer, knowledge, lora_kwargs, match):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        lora_null_init(model, LoraConfig(**lora_kwargs), knowledge, tokenizer, **SMALL)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "architecture, targets, match",
    [
        ("llama", ["q_proj", "lm_head"], "output layer"),  # untied: PEFT would save the head's weight
        ("gemma", ["q_proj", "lm_head"], "output layer"),  # tied: its residual would rewrite the embedding
        ("llama", ["q_proj", "embed_tokens"], "is an embedding"),  # would keep PEFT's random embedding factors
    ],
)
def test_targets_that_cannot_be_initialized_exactly_are_refused(
    make_model, tokenizer, knowledge, architecture, targets, match
):
    with pytest.raises(UnsupportedModelError, match=match):
        lora_null_init(make_model(architecture), LoraConfig(r=4, target_modules=targets), knowledge, tokenizer, **SMALL)


@pytest.mark.parametrize(
    "texts, max_length",
    [
        (["The capital of France is Paris ."] * 200, 512),  # one text, repeated
        (None, 1),  # one token per text: always <s>
        (["<pad> " * 20] * 200, 512),  # padding only
    ],
)
def test_calibration_without_enough_distinct_contexts_is_refused(make_model, tokenizer, knowledge, texts, max_length):
    with pytest.raises(InsufficientCalibrationError, match="distinct contexts"):
        lora_null_init(
            make_model(),
            LoraConfig(r=4),
            texts or knowledge,
            tokenizer,
            max_length=max_length,
            short_calibration="refuse",
            **SMALL,
        )


def test_a_repeated_text_is_topped_up_with_a_warning(make_model, tokenizer, caplog):
    """By default the model's own text makes up what one repeated text lacks; since it is then nearly all of the
    calibration, the log says so as a warning (a plain top-up is an info line)."""
    with caplog.at_level("INFO", logger="lora_null_core.calibration.selection"):
        peft_model = lora_null_init(
            make_model(), LoraConfig(r=4), ["The capital of France is Paris ."] * 200, tokenizer, **SMALL
        )
    assert peft_model.lora_null_report.calibration["top_up"]["samples"] > 0
    top_up = [r for r in caplog.records if r.name == "lora_null_core.calibration.selection"]
    assert [r.levelname for r in top_up] == ["WARNING"] and "200 rows of" in top_up[0].getMessage()


def test_an_initialized_model_is_never_initialized_again(make_model, tokenizer, knowledge, tmp_path):
    from lora_null_core import load_initialized, save_initialized

    peft_model = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, train_base="residual", **SMALL)
    with pytest.raises(UnsupportedModelError, match="already initialized.*base weights are already residuals"):
        lora_null_init(peft_model, None, knowledge, tokenizer, **SMALL)
    original = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, **SMALL)  # default: base untouched
    with pytest.raises(UnsupportedModelError, match="already initialized.*null basis .the base weights are untouched"):
        lora_null_init(original, None, knowledge, tokenizer, **SMALL)
    save_initialized(peft_model, tmp_path / "init", tokenizer)
    residual = load_initialized(tmp_path / "init").get_base_model()
    with pytest.raises(UnsupportedModelError, match="residual base"):
        lora_null_init(residual, LoraConfig(r=4), knowledge, tokenizer, **SMALL)


def test_nothing_is_kept_when_the_function_is_not_preserved(make_model, tokenizer, knowledge, tmp_path, saved_model):
    from lora_null_core import FunctionNotPreservedError

    write_jsonl(tmp_path / "calib.jsonl", knowledge)
    with pytest.raises(FunctionNotPreservedError, match="Nothing was saved"):
        init_to_folder(
            str(saved_model),
            str(tmp_path / "calib.jsonl"),
            tmp_path / "out",
            LoraConfig(r=4),
            LoraNullConfig(max_function_error=0.0, **SMALL),
            device="cpu",
        )
    assert not (tmp_path / "out").exists()
