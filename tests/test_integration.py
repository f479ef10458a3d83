"""One translation from a framework's config to LoraNullConfig, and one validation of a LoRA-Null request."""

import dataclasses

import pytest

from lora_null_core import ConfigError, LoraNullConfig
from lora_null_core.calibration.sources import TokenizedRows
from lora_null_core.frontends.framework_config import (
    config_fields,
    config_from_mapping,
    lora_null_request,
    prefixed_dataclass_fields,
    task_data_for,
)


def test_every_field_is_reachable_by_prefix_or_nested_block():
    values = {
        "lora_null_solver": "eigh32",
        "lora_null_a_scale": 3,
        "lora_null_covariance_weighting": "per_sample_max",
        "lora_null": {"accumulate_dtype": "float64", "min_tokens_per_dim": 0.5},
        "learning_rate": 1e-4,
    }
    config = config_from_mapping(values)
    assert (
        config.solver,
        config.a_scale,
        config.covariance_weighting,
        config.accumulate_dtype,
        config.min_tokens_per_dim,
    ) == ("eigh32", 3, "per_sample_max", "float64", 0.5)
    assert {f.name for f in config_fields()} == {f.name for f in dataclasses.fields(LoraNullConfig)}


def test_unset_keys_take_the_frameworks_fallback_then_the_configs_default():
    config = config_from_mapping(
        {"lora_null_max_length": None, "lora_null_seed": 7}, fallbacks={"max_length": 2048, "seed": 1}
    )
    assert config.max_length == 2048 and config.seed == 7 and config.num_samples == LoraNullConfig().num_samples


def test_a_typo_is_refused_with_the_closest_key_not_trained_with_the_default():
    with pytest.raises(ConfigError, match="lora_null_num_sample .*did you mean lora_null_num_samples"):
        config_from_mapping({"lora_null_num_sample": 64})
    with pytest.raises(ConfigError, match="lora_null.variantt"):
        config_from_mapping({"lora_null": {"variantt": "v1"}})
    with pytest.raises(ConfigError, match="disagree"):
        config_from_mapping({"lora_null_variant": "v1", "lora_null": {"variant": "v2"}})
    with pytest.raises(ConfigError, match="solver='qr' is not one of auto, eigh64, eigh32, subspace"):
        config_from_mapping({"lora_null_solver": "qr"})


def test_the_front_ends_own_keys_pass_and_a_misspelling_of_one_is_named():
    """Every plugin reads lora_null_calibration, lora_null_task_data and (TRL) lora_null_export itself; they are not
    LoraNullConfig fields, and a typo of one gets the closest key, as a field's typo does."""
    keys = {"lora_null_calibration": "facts.jsonl", "lora_null_task_data": "train", "lora_null_export": False}
    assert config_from_mapping(keys) == LoraNullConfig()
    with pytest.raises(ConfigError, match="lora_null_task_dta .did you mean lora_null_task_data.."):
        config_from_mapping({"lora_null_task_dta": "train"})


class Tokenized(list):
    """A trainer's tokenized training set: rows with input_ids."""

    column_names = ["input_ids"]


def test_the_training_set_is_the_task_data_by_default_wherever_knowledge_text_is_given():
    training = Tokenized([{"input_ids": [1, 2]}] * 3)
    read = lambda source: ("read", source)  # noqa: E731
    choose = lambda setting, calibration="k.jsonl", dataset=training: task_data_for(  # noqa: E731
        setting, calibration, lambda: dataset, tokenizer=None, read=read
    )
    for unset in (None, "auto"):
        chosen = choose(unset)
        assert isinstance(chosen, TokenizedRows) and chosen.dataset is training and len(chosen) == 3
        assert choose(unset, calibration=None) is None  # the key alone: own text, where task data lost on addition
        assert choose(unset, dataset=iter(training)) is None  # streamed: the plain null space, quietly
        assert choose(unset, dataset=None) is None
    for asked in ("train", True):  # asked for: with own text too
        assert isinstance(choose(asked, calibration=None), TokenizedRows)
    for off in ("none", "None", "off", "false", False):
        assert choose(off) is None
    assert choose("task.jsonl") == ("read", "task.jsonl") and choose({"path": "t"}) == ("read", {"path": "t"})
    with pytest.raises(ConfigError, match="streamed or iterable.*lora_null_task_data: none"):
        choose("train", dataset=iter(training))


def test_request_validation_is_the_same_for_every_front_end():
    assert lora_null_request({"adapter_init": "default"}) is None and lora_null_request({}) is None
    config = lora_null_request({"adapter_init": "lora_null", "lora_null_calibration": "k.jsonl", "lora_null_export": 1})
    assert config == LoraNullConfig()
    assert lora_null_request({"adapter_init": "lora_null"}) == LoraNullConfig()  # the key alone: the model's own text
    with pytest.raises(ConfigError, match="'pissa' is not an init"):
        lora_null_request({"adapter_init": "pissa"})
    with pytest.raises(ConfigError, match="set peft_use_dora: false"):
        lora_null_request(
            {"adapter_init": "lora_null", "lora_null_calibration": "k"}, dora=True, dora_key="peft_use_dora"
        )
    assert (
        lora_null_request({"adapter_init": "lora_null", "lora_null_calibration": "k"}, quantized=True)
        == LoraNullConfig()
    )  # QLoRA: the default trains on the untouched (quantized) original weights
    for residual in ({"lora_null_variant": "v1"}, {"lora_null_train_base": "residual"}):
        with pytest.raises(ConfigError, match="a quantized base cannot hold"):
            lora_null_request({"adapter_init": "lora_null", "lora_null_calibration": "k", **residual}, quantized=True)
    basis = lora_null_request(
        {"adapter_init": "lora_null", "lora_null_calibration": "k", "lora_null_init": "basis"}, quantized=True
    )
    assert basis.init == "basis"


def test_choices_and_plugin_fields_come_from_the_config_types():
    from lora_null_core.config import literal_choices

    choices = literal_choices()
    assert choices["variant"] == ("v1", "v2") and choices["solver"] == ("auto", "eigh64", "eigh32", "subspace")
    assert {f.name: f.choices for f in config_fields() if f.choices} == choices
    generated = dataclasses.make_dataclass("Args", prefixed_dataclass_fields())
    assert all(getattr(generated(), f.key) is None for f in config_fields())  # None = the core's default
    assert config_from_mapping(vars(generated(lora_null_variant="v1"))).variant == "v1"
