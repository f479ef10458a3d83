"""One rank of a 2-process CPU (gloo) SFTTrainer run; saves its adapter after init and after training."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_trl import adapter_state, trainer_for  # noqa: E402

workspace, out = Path(sys.argv[1]), Path(sys.argv[2])
trainer = trainer_for(workspace, out / "run", "v2", max_steps=2, per_device_train_batch_size=4)
rank = trainer.args.process_index
assert trainer.args.world_size == 2, trainer.args.world_size
state = {f"init.{k}": v for k, v in adapter_state(trainer.model).items()}
trainer.train()
state.update({f"trained.{k}": v for k, v in adapter_state(trainer.model).items()})
state.update({f"base.{n}": p.detach().clone() for n, p in trainer.model.named_parameters() if "base_layer" in n})
save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"rank{rank}.safetensors"))

# An orderly end: without it a rank can abort at exit ("terminate called without an active exception") while gloo's
# threads are torn down, after everything above has passed (seen under load on two cores).
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
