"""Initialization straight from a safetensors checkpoint on disk, for models larger than CPU memory.

The model is built on the meta device; only what runs outside the decoder blocks (embeddings, final norm,
LM head) is read into CPU memory. Each block is read from the shards when its turn comes (`DiskBlocks`, a
`BlockLoader`), initialized on the execution device, written out as one shard of the residual base, and
dropped. So memory holds one block at a time, on the GPU and on the host alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import LoraNullError
from ..peft_names import base_name
from .saving import DTYPE_KEY


class Checkpoint:
    """The tensors of a local safetensors checkpoint (one file or shards with an index), read one at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.file_of = dict(json.loads(index.read_text())["weight_map"])
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", framework="pt") as handle:
                self.file_of = {name: "model.safetensors" for name in handle.keys()}
        else:
            raise LoraNullError(
                f"{self.folder} holds no safetensors checkpoint (model.safetensors or model.safetensors.index.json). "
                "Reading from disk needs a local folder of safetensors: download it first "
                "(huggingface-cli download NAME --local-dir DIR), or drop --offload disk."
            )

    def read(self, name: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        if name not in self.file_of:
            raise LoraNullError(
                f"{name} is not in the checkpoint at {self.folder}; this architecture's weight names "
                "differ from its checkpoint's. Use --offload cpu instead."
            )
        with safe_open(self.folder / self.file_of[name], framework="pt", device=str(device)) as handle:
            return handle.get_tensor(name).to(dtype)


def checkpoint_name(parameter_name: str) -> str:
    """A base-model parameter's name in the checkpoint: PEFT's `.base_layer` unwrapped."""
    return base_name(parameter_name)


def empty_model(
    folder: Path, checkpoint: Checkpoint, dtype: torch.dtype | str = "auto", trust_remote_code: bool = False
) -> nn.Module:
    """The model with meta weights except those outside the decoder blocks, which are read into CPU memory.
    Buffers (rotary frequencies) are built for real, as the model's constructor computes them. dtype "auto":
    the checkpoint's own, as from_pretrained would choose."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..init.streaming import decoder_blocks

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype):
        raise LoraNullError(f"{dtype!r} is not a torch dtype.")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **{DTYPE_KEY: dtype})
    found = decoder_blocks(model)
    if found is None:
        raise LoraNullError(
            "--offload disk streams decoder blocks, and this model's blocks cannot be streamed "
            "(layers of several attention types); use --offload cpu."
        )
    prefix = found[0] + "."
    model.tie_weights()  # a tied LM head is the embedding: not read, and not in the checkpoint
    with torch.no_grad():
        for name, _param in model.named_parameters():
            if not name.startswith(prefix):
                _set(model, name, checkpoint.read(name, "cpu", dtype))
    model.tie_weights()
    model.config.name_or_path = str(folder)
    return model.eval()


class DiskBlocks:
    """BlockLoader: a block's weights come from the checkpoint for its turn; afterwards its residual base goes
    to one shard in `base_dir` and its LoRA factors are kept on the CPU, and the block returns to meta."""

    def __init__(self, checkpoint: Checkpoint, base_dir: Path, prefix: str) -> None:
        self.checkpoint, self.base_dir, self.prefix = checkpoint, Path(base_dir), prefix
        self.weight_map: dict[str, str] = {}
        self.lora: dict[str, torch.Tensor] = {}
        self.total_size = 0

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        block.to_empty(device=device)  # LoRA factors too: the init overwrites them whole
        with torch.no_grad():
            for name, param in block.named_parameters():
                if "lora_" not in name:
                    full = checkpoint_name(f"{self.prefix}.{index}.{name}")
                    param.copy_(self.checkpoint.read(full, device, param.dtype))

    def unload(self, index: int, block: nn.Module) -> None:
        tensors = {}
        for name, param in block.named_parameters():
            full = f"{self.prefix}.{index}.{name}"
            if "lora_" in name:
                self.lora[full] = param.detach().cpu().clone()
            else:
                tensors[checkpoint_name(full)] = param.detach().contiguous().cpu()
        file = f"model-block-{index:05d}.safetensors"
        save_file(tensors, str(self.base_dir / file), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, file))
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        block.to_empty(device="meta")

    def restore_lora(self, model: nn.Module) -> None:
        """Put the kept LoRA factors back into the (meta) model, so the adapter can be saved as usual."""
        for name, tensor in self.lora.items():
            _set(model, name, tensor, requires_grad=None)

    def finish(self, model: nn.Module, blocks_prefix: str) -> None:
        """Write the weights outside the blocks and the shard index that ties it all together."""
        outside = {
            checkpoint_name(name): param.detach().contiguous().cpu()
            for name, param in model.named_parameters()  # tied weights appear once
            if not name.startswith(blocks_prefix + ".") and "lora_" not in name
        }
        save_file(outside, str(self.base_dir / "model-outside-blocks.safetensors"), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(outside, "model-outside-blocks.safetensors"))
        self.total_size += sum(t.numel() * t.element_size() for t in outside.values())
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.base_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")


def _set(model: nn.Module, name: str, value: torch.Tensor, requires_grad: bool | None = False) -> None:
    """Replace parameter `name` of `model` by `value` (meta parameters cannot be filled in place)."""
    owner_name, _, attr = name.rpartition(".")
    owner: Any = model.get_submodule(owner_name) if owner_name else model
    old = owner._parameters[attr]
    grad = old.requires_grad if requires_grad is None else requires_grad
    owner._parameters[attr] = nn.Parameter(value, requires_grad=grad)
