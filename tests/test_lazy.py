"""--offload disk: blocks read from the checkpoint in turn give the same init folder as a model in memory."""

import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from lora_null_core import LoraNullConfig, LoraNullError, load_initialized
from lora_null_core.frontends.jobs import init_to_folder
from lora_null_core.frontends.toy_world import tiny_config

from .conftest import logits, relative_error

SETTINGS = dict(num_samples=160, holdout_samples=20, batch_size=16)


def base_tensors(folder):
    return {k: v for f in sorted((folder / "base").glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("architecture", ["llama", "gemma"])  # gemma ties the LM head to the embeddings
def test_disk_offload_writes_the_same_init_as_memory(make_model, tokenizer, knowledge, tmp_path, architecture):
    model_dir = tmp_path / "model"
    original = make_model(architecture, layers=3)
    original.save_pretrained(model_dir, max_shard_size="100KB")  # several shards, blocks split across them
    tokenizer.save_pretrained(model_dir)
    assert (model_dir / "model.safetensors.index.json").exists()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    config = LoraNullConfig(**SETTINGS)
    kwargs = dict(dtype="float32", device="cpu")
    disk = init_to_folder(str(model_dir), knowledge[:200], tmp_path / "disk", lora, config, offload="disk", **kwargs)
    memory = init_to_folder(str(model_dir), knowledge[:200], tmp_path / "memory", lora, config, **kwargs)

    assert disk.function_error < 1e-5
    assert [layer.leakage for layer in disk.layers] == pytest.approx(
        [layer.leakage for layer in memory.layers], abs=1e-6
    )
    on_disk, in_memory = base_tensors(tmp_path / "disk"), base_tensors(tmp_path / "memory")
    assert on_disk.keys() == in_memory.keys()
    for key, tensor in in_memory.items():
        assert torch.allclose(on_disk[key], tensor, atol=1e-6), key
    adapter = lambda run: load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors"))  # noqa: E731
    assert all(torch.allclose(adapter("disk")[k], v, atol=1e-6) for k, v in adapter("memory").items())
    assert json.loads((tmp_path / "disk" / "lora_null.json").read_text())["variant"] == "v2"

    # The folder loads anywhere and, with its adapter, computes the original model's function.
    reloaded = load_initialized(tmp_path / "disk", dtype="float32")
    probe = tokenizer(knowledge[210:214], return_tensors="pt", padding=True)
    assert relative_error(logits(reloaded, **probe), logits(original, **probe)) < 1e-5
    assert not any(p.requires_grad for n, p in reloaded.named_parameters() if "lora_A" in n)  # v2


def test_disk_offload_needs_a_local_safetensors_folder(tmp_path, tokenizer, knowledge):
    (tmp_path / "empty").mkdir()
    tokenizer.save_pretrained(tmp_path / "empty")
    tiny_config("llama", len(tokenizer)).save_pretrained(tmp_path / "empty")
    with pytest.raises(LoraNullError, match="no safetensors checkpoint"):
        init_to_folder(
            str(tmp_path / "empty"), knowledge, tmp_path / "out", LoraConfig(r=4), offload="disk", device="cpu"
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(LoraNullError, match="local checkpoint folder"):  # refused before any download
        init_to_folder("org/not-a-folder", knowledge, tmp_path / "out", LoraConfig(r=4), offload="disk")


def test_disk_offload_holds_one_block_at_a_time(make_model, tokenizer, knowledge, tmp_path, monkeypatch):
    import lora_null_core.frontends.jobs as workflow

    seen = []

    class Watching(workflow.DiskBlocks):
        def load(self, index, block, device):
            super().load(index, block, device)
            blocks = block_list[0]
            seen.append([i for i, b in enumerate(blocks) if not any(p.is_meta for p in b.parameters())])

    block_list = []
    real_empty = workflow.empty_model

    def empty(*args, **kwargs):
        model = real_empty(*args, **kwargs)
        block_list.append(model.model.layers)
        return model

    monkeypatch.setattr(workflow, "DiskBlocks", Watching)
    monkeypatch.setattr(workflow, "empty_model", empty)
    make_model("llama", layers=3).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    init_to_folder(
        str(tmp_path / "model"),
        knowledge[:200],
        tmp_path / "out",
        LoraConfig(r=4),
        offload="disk",
        dtype="float32",
        device="cpu",
    )
    assert seen == [[0], [1], [2]]
