"""Checks every framework's integration test makes on what the framework wrote, computed independently here."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer

from lora_null_core.io.saving import DTYPE_KEY, load_model


def factors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(Path(folder) / "adapter_model.safetensors")).items()}


def assert_in_null_space(
    model_dir: Path, texts: list[str], adapter_dir: Path, suffixes=("q_proj", "down_proj")
) -> None:
    """The initial A responds to the calibration activations (collected here from the original model) far
    less than a random A of the same shape."""
    model = load_model(str(model_dir), dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, []).append(args[0].detach()))
        for name, m in model.named_modules()
        if name.endswith(suffixes)
    ]
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    for hook in hooks:
        hook.remove()
    initial = factors(adapter_dir)
    assert inputs
    for name, chunks in inputs.items():
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks])
        a = initial[f"base_model.model.{name}.lora_A.weight"]
        random = torch.randn(a.shape, generator=torch.Generator().manual_seed(0))
        leak = lambda m, x=x: float((x @ m.T).norm() / (m.norm() * x.norm()))  # noqa: E731
        assert leak(a) < 0.5 * leak(random), name


def assert_v2_trained_b_only(initial_dir: Path, trained_dir: Path) -> None:
    initial, final = factors(initial_dir), factors(trained_dir)
    a_keys = [k for k in final if "lora_A" in k]
    assert a_keys and all(torch.equal(final[k], initial[k]) for k in a_keys)
    assert any(not torch.equal(final[k], initial[k]) for k in final if "lora_B" in k)


def assert_right_on_the_base_it_names(model_dir: Path, initial_dir: Path, out_dir: Path) -> None:
    """What the framework wrote as its adapter (a run's output folder or a checkpoint) names the original model,
    loads the standard way on it, and computes the model the framework trained. v2 trains on the original weights
    from B = 0, so that model is the original plus the trained adapter — provided the initial B is 0, A never
    moved and the folder is nothing but one adapter (a resumed run would load any adapter folder inside it)."""
    from peft import AutoPeftModelForCausalLM

    config = json.loads((Path(out_dir) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir)
    initial, trained = factors(initial_dir), factors(out_dir)
    assert all(not tensor.any() for key, tensor in initial.items() if "lora_B" in key)
    assert_v2_trained_b_only(initial_dir, out_dir)
    assert not [
        p
        for p in Path(out_dir).iterdir()
        if p.is_dir() and not p.name.startswith("checkpoint-") and (p / "adapter_model.safetensors").exists()
    ]
    on_original = PeftModel.from_pretrained(load_model(str(model_dir), dtype="float32"), str(out_dir))
    following_the_name = AutoPeftModelForCausalLM.from_pretrained(str(out_dir), **{DTYPE_KEY: torch.float32})
    ids = torch.tensor([[2, 5, 9, 13, 21, 34, 8, 7]])
    with torch.no_grad():
        expected = by_hand(model_dir, trained, config)(ids)
        for model in (on_original, following_the_name):
            assert (model(input_ids=ids).logits - expected).norm() / expected.norm() < 1e-5
        assert (
            load_model(str(model_dir), dtype="float32")(input_ids=ids).logits - expected
        ).norm() > 1e-4 * expected.norm()


def assert_merged_is_the_fine_tuned_model(merged_dir: Path, model_dir: Path, adapter_dir: Path) -> None:
    """A framework's own merge of the run's output equals the original model with that output loaded by PEFT."""
    merged = load_model(str(merged_dir), dtype="float32")
    expected = PeftModel.from_pretrained(load_model(str(model_dir), dtype="float32"), str(adapter_dir))
    ids = torch.tensor([[2, 5, 9, 13, 21, 34, 8, 7]])
    with torch.no_grad():
        want, got = expected(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (got - want).norm() / want.norm() < 1e-4


def by_hand(model_dir: Path, adapter: dict[str, torch.Tensor], config: dict):
    """The original model with W + s·B·A written into its weights, without PEFT: an independent reference."""
    model = load_model(str(model_dir), dtype="float32")
    scale = config["lora_alpha"] / config["r"]
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in adapter.items():
            if key.endswith("lora_A.weight"):
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                modules[name].weight += scale * adapter[key.replace("lora_A", "lora_B")] @ a
    return lambda ids: model(input_ids=ids).logits


def assert_export_reproduces(model_dir: Path, initial_dir: Path, residual_dir: Path, export_dir: Path) -> None:
    """v1 (trained on the residual base): the model as the framework ran it (W − s·B0·A0 plus the adapter as
    trained) equals the original model plus the export that took the output folder's place (rank 2r)."""
    initial = factors(initial_dir)
    trained = PeftModel.from_pretrained(load_model(str(model_dir), dtype="float32"), str(residual_dir))
    config = trained.peft_config["default"]
    scale = config.lora_alpha / config.r
    with torch.no_grad():
        for name, module in trained.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                key = f"{name}.lora_%s.weight"
                module.get_base_layer().weight -= scale * initial[key % "B"] @ initial[key % "A"]
    exported = PeftModel.from_pretrained(load_model(str(model_dir), dtype="float32"), str(export_dir))
    assert json.loads((Path(export_dir) / "adapter_config.json").read_text())["r"] == 2 * config.r
    assert json.loads((Path(export_dir) / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        model_dir
    )
    ids = torch.tensor([[2, 5, 9, 13, 21, 34, 8, 7]])
    with torch.no_grad():
        expected, actual = trained(input_ids=ids).logits, exported(input_ids=ids).logits
    assert (actual - expected).norm() / expected.norm() < 1e-5


def assert_task_aware_from_the_training_set(
    initial_dir: Path, plain_initial_dir: Path, rows: int, samples: int
) -> None:
    """The init read the whole training set as the trainer prepared it (`samples` of its `rows` drawn), kept the
    paper's factors (a_scale 1, its default with task data), and its lora_A differs from the plain null space's."""
    record = json.loads((initial_dir / "lora_null.json").read_text())
    task = record["calibration"]["task_data"]
    assert task["source"] == f"the training data as the trainer tokenized it ({rows} rows)", task
    assert task["num_samples"] == samples and record["config"]["a_scale"] == 1.0, record
    aware, plain = (factors(folder / "adapter") for folder in (initial_dir, plain_initial_dir))
    assert any(not torch.allclose(aware[k], plain[k]) for k in aware if "lora_A" in k)
