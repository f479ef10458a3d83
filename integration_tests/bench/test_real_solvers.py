"""The null-space solvers on a real model's covariances: SmolLM2-135M-Instruct (GGUF from PyPI, dequantized),
calibrated on 256 BIG-bench qa_wikidata questions (shipped in benchmarks/data). Its down_proj inputs are
rank-deficient and, summed in float32, slightly indefinite: the subspace solver (what `solver="auto"` picks on
GPUs) once failed its Cholesky on them."""

import json
import random
from pathlib import Path

import pytest
from lora_null_bench.cli import _smollm2_gguf
from lora_null_bench.suites import _local_model
from peft import LoraConfig

from lora_null_core import LoraNullConfig, lora_null_init
from lora_null_core.io.saving import load_model, load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    folder = _local_model(str(_smollm2_gguf()), tmp_path_factory.mktemp("cache"))
    tokenizer = load_tokenizer(str(folder))
    rows = json.loads((DATA / "bigbench_qa_wikidata" / "task.json").read_text())["examples"]
    random.Random(0).shuffle(rows)
    return folder, tokenizer, [row["input"] for row in rows[:288]]


@pytest.fixture(scope="module")
def covariance_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("covariances"))


def init(smollm2, solver, cache):
    folder, tokenizer, questions = smollm2
    lora = LoraConfig(r=16, lora_alpha=16, target_modules=["down_proj"], layers_to_transform=[0, 1, 15, 29])
    config = LoraNullConfig(num_samples=256, holdout_samples=32, solver=solver, covariance_cache=cache)
    return lora_null_init(load_model(str(folder), "float32"), lora, questions, tokenizer, config).lora_null_report


def test_subspace_solver_matches_eigh64_on_real_rank_deficient_covariances(smollm2, covariance_cache):
    exact = init(smollm2, "eigh64", covariance_cache)
    fast = init(smollm2, "subspace", covariance_cache)  # the same covariances, read from the cache
    assert fast.function_error < 1e-5 and exact.function_error < 1e-5
    for ours, reference in zip(fast.layers, exact.layers, strict=True):
        assert ours.name == reference.name
        # Held-out leakage: what the basis is for. Within 1.1× of the exact solver, far below a random A.
        assert ours.leakage_holdout <= 1.1 * reference.leakage_holdout + 1e-3, ours.name
        assert ours.leakage_holdout < 0.5 * ours.leakage_holdout_random, ours.name
