"""Two gloo processes on the CPU stand in for a multi-GPU launch (torchrun / accelerate launch)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from lora_null_core import collect_covariances, lora_null_init
from lora_null_core.calibration.batches import tokenize_batches
from lora_null_core.distributed import assign_owners, shard
from lora_null_core.frontends.toy_world import arithmetic_texts, knowledge_texts, tiny_model, tiny_tokenizer
from lora_null_core.init.peft_layers import lora_layers

TEXTS = knowledge_texts(160, seed=5) + arithmetic_texts(80, seed=6)


def run_everything(texts, overlap="auto"):
    """Covariances (sharded when distributed) and a full init, as flat tensors."""
    tokenizer = tiny_tokenizer(texts)
    model = tiny_model("llama", len(tokenizer), seed=11)
    state = {}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    covariances = collect_covariances(model, linears, shard(tokenize_batches(texts, tokenizer, 64, 8)), torch.float64)
    for key, matrix in covariances.matrices.items():
        state["cov." + key] = matrix
    peft_model = lora_null_init(
        model,
        LoraConfig(r=4, lora_alpha=8),
        texts,
        tokenizer,
        num_samples=200,
        holdout_samples=40,
        batch_size=8,
        accumulate_dtype="float64",
        overlap=overlap,
    )
    for name, layer in lora_layers(peft_model, "default").items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        state["delta." + name] = (layer.scaling["default"] * b @ a).detach().contiguous()
        state["rows." + name] = torch.linalg.qr(a.detach().double().T)[0].contiguous()
        state["residual." + name] = layer.get_base_layer().weight.detach().contiguous()
    state["holdout"] = torch.tensor([entry.leakage_holdout for entry in peft_model.lora_null_report.layers])
    return state


def worker(rank, world, port, folder, overlap="auto"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        save_file(run_everything(TEXTS, overlap), os.path.join(folder, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("overlap", ["auto", "on"])
def test_two_processes_match_one_and_each_other(tmp_path, overlap):
    """overlap on: each rank solves its own bases on a worker thread while the next block calibrates, and the
    broadcasts come when the block finishes, interleaved with the next block's all-reduce in one order."""
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), overlap), nprocs=2, join=True)
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    single = run_everything(TEXTS)
    assert rank0.keys() == single.keys()
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key  # every rank ends with bitwise identical results
    for key in (k for k in single if k.startswith("cov.")):
        # The stated tolerance: sharded float64 sums equal one process's up to summation order, 1e-12 relative.
        assert (rank0[key] - single[key]).norm() <= 1e-12 * single[key].norm(), key
    for name in (k[len("rows.") :] for k in single if k.startswith("rows.")):
        cov = next(
            single[k]
            for k in single
            if k.startswith("cov.") and single[k].shape[0] == rank0["rows." + name].shape[0] and _same_input(name, k)
        )
        values = torch.linalg.eigvalsh(cov)
        gap = (values[4] - values[3]) / values[-1]
        if gap > 1e-6:  # a well-separated null space is the same subspace, so the same adapter
            assert (rank0["delta." + name] - single["delta." + name]).norm() <= 1e-6 * single["delta." + name].norm()
        # Whatever the gap, the distributed basis holds no more calibration energy than the single one.
        energy = lambda rows, cov=cov: torch.trace(rows.T @ cov @ rows)  # noqa: E731
        assert energy(rank0["rows." + name]) <= energy(single["rows." + name]) * (1 + 1e-6) + 1e-12 * values[-1]
    assert torch.allclose(rank0["holdout"], single["holdout"], rtol=1e-6)


def _same_input(module_name, cov_key):
    """The covariance key a module reads (q/k/v share q_proj's, gate/up share gate_proj's)."""
    prefix, _, leaf = module_name.rpartition(".")
    leader = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(leaf, leaf)
    return cov_key == f"cov.{prefix}.{leader}"


def test_owners_spread_the_eigh_work(monkeypatch):
    from lora_null_core import distributed

    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 3))
    owners = assign_owners({"down": 11008, "attn": 4096, "o": 4096, "mlp": 4096})
    assert owners["down"] == 0 and {owners["attn"], owners["o"], owners["mlp"]} == {1, 2}


def cache_worker(rank, world, port, folder, shared):
    """Two inits with a covariance cache; with shared=False each rank has its own cache folder, as on nodes
    without a shared disk: rank 1 never finds an entry, so no rank may skip calibration alone."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tokenizer = tiny_tokenizer(TEXTS)
        cache = os.path.join(folder, "cache" if shared else f"cache{rank}")
        state = {}
        for run, rank_r in enumerate((4, 6)):
            model = tiny_model("llama", len(tokenizer), seed=11)
            peft_model = lora_null_init(
                model,
                LoraConfig(r=rank_r),
                TEXTS,
                tokenizer,
                num_samples=200,
                holdout_samples=0,
                batch_size=8,
                covariance_cache=cache,
            )
            for name, layer in lora_layers(peft_model, "default").items():
                state[f"{run}.{name}"] = layer.lora_A["default"].weight.detach().contiguous()
        save_file(state, os.path.join(folder, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shared", [True, False])
def test_covariance_cache_under_two_processes(tmp_path, shared):
    mp.spawn(cache_worker, args=(2, free_port(), str(tmp_path), shared), nprocs=2, join=True)
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    entries = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("cache*/*/index.json"))
    assert len(entries) == 1 and entries[0].startswith("cache/" if shared else "cache0/")  # rank 0 writes, once


def meta_worker(rank, world, port, folder, key_alone=False):
    """FSDP's cpu_ram_efficient_loading: rank 0 holds the weights, rank 1 only meta tensors until FSDP broadcasts
    rank 0's when it wraps the model. Rank 0 must initialize alone (no collective rank 1 could not join), and
    rank 1 must come through with its flags set, waiting for that broadcast. With the key alone rank 0 samples
    the model's own text alone too."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tokenizer = tiny_tokenizer(TEXTS)
        if rank == 0:
            model = tiny_model("llama", len(tokenizer), seed=11)
        else:
            with torch.device("meta"):
                model = tiny_model("llama", len(tokenizer), seed=11)
        peft_model = lora_null_init(
            model,
            LoraConfig(r=4, lora_alpha=8),
            None if key_alone else TEXTS,
            tokenizer,
            num_samples=200,
            holdout_samples=40,
            batch_size=8,
            accumulate_dtype="float64",
            generated_length=16,
        )
        layers = lora_layers(peft_model, "default")
        assert all(not layer.lora_A["default"].weight.requires_grad for layer in layers.values())
        assert (getattr(peft_model, "lora_null_report", None) is not None) == (rank == 0)
        if rank == 0:
            save_file(
                {name: layer.lora_A["default"].weight.detach().contiguous() for name, layer in layers.items()},
                os.path.join(folder, "rank0.safetensors"),
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("key_alone", [False, True])
def test_rank_zero_initializes_alone_when_the_others_hold_meta_weights(tmp_path, key_alone):
    mp.spawn(meta_worker, args=(2, free_port(), str(tmp_path), key_alone), nprocs=2, join=True)
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    tokenizer = tiny_tokenizer(TEXTS)
    single = lora_null_init(
        tiny_model("llama", len(tokenizer), seed=11),
        LoraConfig(r=4, lora_alpha=8),
        None if key_alone else TEXTS,
        tokenizer,
        num_samples=200,
        holdout_samples=40,
        batch_size=8,
        accumulate_dtype="float64",
        generated_length=16,
    )
    for name, layer in lora_layers(single, "default").items():  # all samples on rank 0: one process's init
        assert torch.equal(rank0[name], layer.lora_A["default"].weight.detach()), name
