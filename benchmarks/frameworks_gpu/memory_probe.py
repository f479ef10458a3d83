"""What the model in memory computes at the end of training, recorded from inside each framework's own run, so the
saved output folder can be checked against it (run.py evaluate):

- `probe_logits`: the fixed probe's logits (every rank runs the forward: FSDP and ZeRO-3 forwards are collective;
  rank 0 keeps them);
- the LoRA factors as they are in memory (gathered under ZeRO-3), to tell a save that drops or changes a tensor from
  a reload that only computes differently;
- the probe's logits with the adapter disabled, to tell a framework whose own forward differs from the standard
  one (fused kernels, patched attention, other dtypes) from an adapter that differs;
- the dtype of every parameter in memory (LLaMA-Factory loads the checkpoint's own dtype, Axolotl's QLoRA keeps
  norms in float32, DeepSpeed's bf16 mode holds everything in bf16), so the reload can also be compared as trained.

Where it enters: TRL and plain PEFT runs add `MemoryProbe` themselves; Axolotl through its own plugin registry
(`plugins: [memory_probe.MemoryProbePlugin]` in the run's YAML); LLaMA-Factory through `python -m memory_probe
llamafactory CONFIG`, which runs `lora-null-llamafactory train` with the callback appended to the ones it passes.
The paths come from LORA_NULL_PROBE (the probe batch) and LORA_NULL_RUN_DIR (where the two files go).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

LOGITS_FILE, FACTORS_FILE, BASE_LOGITS_FILE = "memory_logits.pt", "memory_lora.pt", "memory_base_logits.pt"
DTYPES_FILE = "memory_dtypes.json"


def probe_logits(model, probe: dict, device) -> torch.Tensor:
    """The probe's logits in eval mode under bf16 autocast (how the model ran in training); padding kept."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=probe["input_ids"].to(device), attention_mask=probe["attention_mask"].to(device))
    model.train(was_training)
    return out.logits.float().cpu()


def lora_factors(model) -> dict[str, torch.Tensor]:
    """Every lora_A / lora_B tensor, named as PEFT saves it (adapter name dropped), gathered where ZeRO-3 splits it."""
    named = [(name, p) for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            return {_saved_name(n): p.detach().cpu().clone() for n, p in named}
    return {_saved_name(n): p.detach().cpu().clone() for n, p in named}


def _saved_name(name: str) -> str:
    for part in (".lora_A.", ".lora_B."):
        if part in name:
            head, tail = name.split(part)
            return head + part + tail.split(".", 1)[1]
    return name


class MemoryProbe(TrainerCallback):
    def __init__(self, probe_path: Path, run_dir: Path) -> None:
        self.probe_path, self.run_dir = Path(probe_path), Path(run_dir)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        probe = torch.load(self.probe_path)
        logits = probe_logits(model, probe, args.device)
        with model.disable_adapter():
            base_logits = probe_logits(model, probe, args.device)
        factors = lora_factors(model)
        if state.is_world_process_zero:
            dtypes = {name: str(p.dtype).removeprefix("torch.") for name, p in model.named_parameters()}
            (self.run_dir / DTYPES_FILE).write_text(json.dumps(dtypes))
            torch.save(logits, self.run_dir / LOGITS_FILE)
            torch.save(base_logits, self.run_dir / BASE_LOGITS_FILE)
            torch.save(factors, self.run_dir / FACTORS_FILE)


def from_environment() -> MemoryProbe:
    return MemoryProbe(Path(os.environ["LORA_NULL_PROBE"]), Path(os.environ["LORA_NULL_RUN_DIR"]))


try:  # Axolotl's plugin registry; absent in the other frameworks' environments
    from axolotl.integrations.base import BasePlugin

    class MemoryProbePlugin(BasePlugin):
        def add_callbacks_post_trainer(self, cfg, trainer) -> list:
            return [from_environment()]
except ImportError:
    pass


def run_llamafactory(argv: list[str]) -> int:
    """`lora-null-llamafactory train CONFIG` with the probe appended to the callbacks the launcher passes."""
    from llamafactory.train import tuner
    from lora_null_llamafactory import cli

    original = tuner.run_exp
    tuner.run_exp = lambda args=None, callbacks=None: original(args, [*(callbacks or []), from_environment()])
    return cli.main(["train", *argv])


if __name__ == "__main__":
    if sys.argv[1:2] != ["llamafactory"]:
        raise SystemExit("usage: python -m memory_probe llamafactory CONFIG.yaml")
    raise SystemExit(run_llamafactory(sys.argv[2:]))
