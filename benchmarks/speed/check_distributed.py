"""Under torchrun on GPUs (NCCL): the overlapped init equals the sequential one, and every rank ends identical.

    torchrun --nproc-per-node 2 benchmarks/speed/check_distributed.py

A tiny Llama on each rank's GPU, streamed block by block with the subspace solver; `tests/test_distributed.py`
checks the same with gloo on the CPU.
"""

import os

import torch
import torch.distributed as dist
from peft import LoraConfig

from lora_null_core import lora_null_init
from lora_null_core.frontends.toy_world import arithmetic_texts, knowledge_texts, tiny_model, tiny_tokenizer


def main() -> None:
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    texts = knowledge_texts(160, seed=5) + arithmetic_texts(80, seed=6)
    tokenizer = tiny_tokenizer(texts)
    states = {}
    for overlap in ("on", "off"):
        model = tiny_model("llama", len(tokenizer), seed=11).to(f"cuda:{local}")
        peft_model = lora_null_init(
            model,
            LoraConfig(r=4, lora_alpha=8),
            texts,
            tokenizer,
            num_samples=200,
            holdout_samples=40,
            batch_size=8,
            streaming="on",
            overlap=overlap,
            solver="subspace",
        )
        states[overlap] = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    difference = max(float((states["on"][k].double() - states["off"][k].double()).abs().max()) for k in states["on"])
    flat = torch.cat([v.double().flatten() for v in states["on"].values()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    if dist.get_rank() == 0:
        print(f"overlap on against off: largest difference {difference:.2e}; ranks identical: {same}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
