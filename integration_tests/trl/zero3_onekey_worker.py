"""The key alone under DeepSpeed ZeRO-3 on the CPU (DeepSpeed's CPU accelerator, gloo; each process a worker): the
trainer initializes from the model's own text, sampled from the partitioned model. Each rank then samples again,
gathering the model whole and gathering it block by block (every rank stepping through generation together), and
rank 0 writes what both gave, then trains two steps."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_trl import ZERO3, trainer_for  # noqa: E402

from lora_null_core.calibration import own_text, whole_model  # noqa: E402

workspace, out = Path(sys.argv[1]), Path(sys.argv[2])
trainer = trainer_for(
    workspace,
    out / "run",
    "v2",
    max_steps=2,
    use_cpu=True,
    deepspeed=ZERO3,
    lora_null_calibration=None,
    lora_null_num_samples=24,
    lora_null_holdout_samples=5,
    lora_null_generated_length=12,
)
assert hasattr(trainer.model.get_input_embeddings().weight, "ds_id"), "the base is not partitioned: no ZeRO-3"
config, cpu = trainer.args.lora_null_config(), torch.device("cpu")
texts = {}
for mode, share in (("whole", whole_model.GATHER_WHOLE_SHARE), ("block_by_block", 0.0)):
    whole_model.GATHER_WHOLE_SHARE = share
    texts[mode] = own_text.own_text(trainer.model, trainer.processing_class, config, cpu).rows
trainer.train()
if trainer.is_world_process_zero():
    (out / "texts.json").write_text(json.dumps(texts))

# An orderly end: without it a rank can abort at exit ("terminate called without an active exception") while gloo's
# threads are torn down, after everything above has passed (seen under load on two cores).
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
