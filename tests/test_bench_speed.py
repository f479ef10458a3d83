"""The speed benchmark's pipeline on the tiny shape (its numbers are GPU facts, recorded in benchmarks/results)."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "speed" / "bench_speed.py"


def test_speed_benchmark_writes_rows_for_every_method(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "speed.json"
    common = ["--shape", "tiny", "--num-samples", "24", "--seq-len", "32", "--out", str(out)]
    bench.main([*common, "--methods", "lora_null,lora_null_task,peft_corda_kpm,solvers", "--solver", "eigh64,subspace"])
    bench.main([*common, "--methods", "lora_null_offload", "--max-blocks", "1"])
    methods = "lora_null_cache,lora_null_disk,lora_null_self,lora_null_self_graphed"
    bench.main([*common, "--methods", methods, "--cache-root", str(tmp_path)])
    bench.main([*common, "--methods", "profile"])
    results = json.loads(out.read_text())
    methods = [(r["method"], r["solver"]) for r in results["runs"]]
    assert methods == [
        ("lora_null", "eigh64"),
        ("lora_null", "subspace"),
        ("lora_null_task", "eigh64"),  # beside task data: A task-aware
        ("lora_null_task", "subspace"),
        ("peft_corda_kpm", "peft"),
        ("lora_null_offload", "auto"),
        ("lora_null_cache_write", "auto"),
        ("lora_null_cache_hit", "auto"),
        ("lora_null_disk", "auto"),
        ("lora_null_self", "auto"),
        ("lora_null_self_graphed", "auto"),  # on the CPU generate draws (the setting's fallback)
    ]
    assert "host RSS grew" in results["runs"][-3]["note"]
    assert all(r["seconds"] > 0 and r["calibration"] == "24x32" and r["command"] for r in results["runs"])
    assert "1 of 2 blocks" in results["runs"][5]["note"]
    assert {s["solver"] for s in results["solvers"]} == {"eigh64", "eigh32", "subspace"}
    assert all(s["energy_vs_eigh64"] <= 1.1 for s in results["solvers"])
    profile = {p["phase"]: p for p in results["profiles"]}
    assert profile["null bases (decompositions)"]["calls"] == 2  # one call per block of the tiny shape
    assert profile["block forward passes (with input taps)"]["calls"] > 2
    # The wrapped phases must not nest (a phase timed inside another would be counted twice): together they fit
    # inside the total, and each ran.
    timed = [p for name, p in profile.items() if name != "total" and not name.startswith("other")]
    assert all(p["seconds"] >= 0 and p["calls"] > 0 for p in timed), timed  # a tiny phase may round to 0.000 s
    assert sum(p["seconds"] for p in timed) <= profile["total"]["seconds"] + 0.01


def _bench_rank(rank, port, out):
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--shape", "tiny", "--num-samples", "24", "--seq-len", "32", "--out", out, "--methods", "lora_null"])


def test_speed_benchmark_under_two_processes_writes_one_row(tmp_path, capfd):
    """As under torchrun (gloo on the CPU): both processes time one init together, rank 0 records and prints it."""
    import torch.multiprocessing as mp

    from tests.test_distributed import free_port

    out = tmp_path / "speed.json"
    mp.spawn(_bench_rank, args=(free_port(), str(out)), nprocs=2, join=True)
    assert capfd.readouterr().out.count("calibration, r=16, 2 x cpu") == 1
    runs = json.loads(out.read_text())["runs"]
    assert [(r["method"], r["gpus"]) for r in runs] == [("lora_null", 2)]
    assert runs[0]["seconds"] > 0


def test_qlora_with_the_key_alone_runs_end_to_end_on_layer_by_layer_nf4_weights(tmp_path):
    """#50's 70B row on the tiny shape: the nf4 model is built a layer at a time, the key alone samples, calibrates
    and writes the adapter with every block run, and the row says so (bitsandbytes' CPU backend here)."""
    import pytest

    pytest.importorskip("bitsandbytes")
    spec = importlib.util.spec_from_file_location("qlora_key_alone", SCRIPT.with_name("qlora_key_alone.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = bench.build_nf4_model("tiny", "cpu", torch.float32)
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(quantized) == 7 * 2 and all(m.weight.dtype == torch.uint8 for m in quantized)
    assert not any(p.is_meta for p in model.parameters()) and model.is_loaded_in_4bit
    out = tmp_path / "speed.json"
    bench.main(["--shape", "tiny", "--samples", "24", "--length", "16", "--out", str(out)])
    row = json.loads(out.read_text())["runs"][-1]
    assert row["method"] == "lora_null_self_nf4" and row["blocks_timed"] == 2 and row["calibration"] == "24x16 own text"
    assert row["function_error"] < 1e-5 and row["adapter_mib"] > 0 and "own text" in row["calibration_used"]
    assert 0 < sum(row["phases"].values()) <= row["seconds"] and row["seconds_before_first_block"] > 0


def test_the_init_trace_lists_the_ops_that_take_the_most_time(tmp_path):
    """trace_init.py: a warm-up init, then one under the profiler; its row ranks ops by time (on the CPU, host time)."""
    script = SCRIPT.with_name("trace_init.py")
    spec = importlib.util.spec_from_file_location("trace_init", script)
    trace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trace)
    out = tmp_path / "trace.json"
    trace.main(["--shape", "tiny", "--num-samples", "16", "--seq-len", "32", "--top", "3", "--output", str(out)])
    (row,) = json.loads(out.read_text())["runs"]
    assert row["kernel_seconds"] > 0 and row["seconds_traced"] > 0 and len(row["top_kernels"]) == 3
    assert row["top_kernels"][0]["ms"] >= row["top_kernels"][-1]["ms"] > 0
