"""A DeepSpeed ZeRO-3 SFTTrainer run on the CPU (DeepSpeed's CPU accelerator, gloo; each process a worker): trains v2,
saves the adapter through the plugin, and records (rank 0) the LoRA factors and logits as they are in memory at the
end."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_trl import ZERO3, trainer_for  # noqa: E402

from lora_null_core.frontends.callback import LoraNullCallback

workspace, out = Path(sys.argv[1]), Path(sys.argv[2])
trainer = trainer_for(workspace, out / "run", "v2", max_steps=3, use_cpu=True, deepspeed=ZERO3)
assert hasattr(trainer.model.get_input_embeddings().weight, "ds_id"), "the base is not partitioned: no ZeRO-3"
# As LLaMA-Factory's launcher does: the init folder written again when training begins, once DeepSpeed has
# partitioned the adapter (on an H200 this wrote empty tensors before the callback gathered them).
trainer.add_callback(LoraNullCallback())
trainer.train()

import deepspeed  # noqa: E402

model = trainer.model_wrapped.module
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    factors = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.arange(3, 19).view(2, 8)).logits
if trainer.is_world_process_zero():
    torch.save({"factors": factors, "logits": logits}, out / "memory.pt")
trainer.save_model(str(out / "adapter"))

# An orderly end: without it a rank can abort at exit ("terminate called without an active exception") while gloo's
# threads are torn down, after everything above has passed (seen under load on two cores).
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
