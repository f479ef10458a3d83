"""Checks every framework's integration test makes on what the framework wrote, computed independently here."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer

from lora_null_core.saving import load_model


def factors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(Path(folder) / "adapter_model.safetensors")).items()}


def assert_in_null_space(model_dir: Path, texts: list[str], adapter_dir: Path, suffixes=("q_proj", "down_proj")) -> None:
    """The initial A responds to the calibration activations (collected here from the original model) far
    less than a random A of the same shape."""
    model = load_model(str(model_dir), dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, []).append(args[0].detach()))
             for name, m in model.named_modules() if name.endswith(suffixes)]
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
        leak = lambda m: float((x @ m.T).norm() / (m.norm() * x.norm()))  # noqa: E731
        assert leak(a) < 0.5 * leak(random), name


def assert_v2_trained_b_only(initial_dir: Path, trained_dir: Path) -> None:
    initial, final = factors(initial_dir), factors(trained_dir)
    a_keys = [k for k in final if "lora_A" in k]
    assert a_keys and all(torch.equal(final[k], initial[k]) for k in a_keys)
    assert any(not torch.equal(final[k], initial[k]) for k in final if "lora_B" in k)


def assert_export_reproduces(model_dir: Path, initial_dir: Path, trained_dir: Path, export_dir: Path) -> None:
    """The trained model as the framework ran it (residual base W − s·B0·A0 plus the trained adapter) equals the
    original model plus the exported adapter, and v2's export keeps rank r."""
    initial = factors(initial_dir)
    trained = PeftModel.from_pretrained(load_model(str(model_dir), dtype="float32"), str(trained_dir))
    config = trained.peft_config["default"]
    scale = config.lora_alpha / config.r
    with torch.no_grad():
        for name, module in trained.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                key = f"{name}.lora_%s.weight"
                module.get_base_layer().weight -= scale * initial[key % "B"] @ initial[key % "A"]
    exported = PeftModel.from_pretrained(load_model(str(model_dir), dtype="float32"), str(export_dir))
    assert json.loads((Path(export_dir) / "adapter_config.json").read_text())["r"] == config.r
    ids = torch.tensor([[2, 5, 9, 13, 21, 34, 8, 7]])
    with torch.no_grad():
        expected, actual = trained(input_ids=ids).logits, exported(input_ids=ids).logits
    assert (actual - expected).norm() / expected.norm() < 1e-5
