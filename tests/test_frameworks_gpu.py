"""The GPU matrix's verdicts (benchmarks/frameworks_gpu/run.py): the rules its rows pass or fail by."""

import argparse
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "frameworks_gpu" / "run.py"


@pytest.fixture(scope="module")
def run():
    spec = importlib.util.spec_from_file_location("frameworks_gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(err, as_trained=None, saved_exact=True, moved=0.0, kept=0.9, task=0.9):
    return {
        "output_rel_err": err,
        "output_rel_err_as_trained": as_trained,
        "adapter_max_rel_diff": 0.0 if saved_exact else 0.2,
        "lora_a_moved": moved,
        "knowledge_kept": kept,
        "task_score": task,
    }


def test_a_reload_is_exact_or_as_plain_lora_or_neither(run):
    lora = row(0.033, 0.015, kept=0.6)
    assert run.reload_match(row(0.0), lora) == "exact"
    assert run.reload_match(row(0.02, 0.0005), lora) == "exact"  # in the dtypes it trained in
    assert run.reload_match(row(0.033, 0.014), lora) == "as plain LoRA"  # the framework's numerics, LoRA's too
    assert run.reload_match(row(0.033, 0.014, saved_exact=False), lora) is None  # a save that differs from memory
    assert run.reload_match(row(0.0156, 0.0156), row(0.0146)) == "as plain LoRA"  # within LoRA's gap's own spread
    assert run.reload_match(row(0.019, 0.019), row(0.0146)) is None  # 30% further off than plain LoRA
    assert run.reload_match(row(0.53, 0.53), lora) is None  # further off than plain LoRA: a fault of ours
    assert run.passes(row(0.033, 0.014), lora)
    assert not run.passes(row(0.0, moved=0.3), lora)  # v2's lora_A not saved as the init wrote it
    assert not run.passes(row(0.0, kept=0.5), lora) and not run.passes(row(0.0, task=0.8), lora)


def test_the_key_alone_setups_leave_the_calibration_out(run, tmp_path):
    def keys(setup, init="lora_null"):
        return run.calibration_keys(argparse.Namespace(setup=setup, init=init), tmp_path)

    (tmp_path / "calibration.jsonl").write_text('{"text": "a"}\n' * 256)
    assert keys("bf16") == {"adapter_init": "lora_null", "lora_null_calibration": str(tmp_path / "calibration.jsonl")}
    assert keys("qlora4_onekey") == {"adapter_init": "lora_null"} and keys("bf16", "lora") == {}
    assert keys("bf16", "lora_null_plain") == {**keys("bf16"), "lora_null_task_data": "none"}  # the default before
    graphed = {"adapter_init": "lora_null", "lora_null_generated_decoding": "graphed"}
    assert keys("bf16_graphed_onekey") == graphed == keys("qlora4_graphed_onekey")
    # Qwen2.5-0.5B's down_proj takes 4,864 inputs: its file adds the held-out probes (756 rows), and the runs read
    # them all, not the default 256 (a GPU run refused at 2,422 tokens); 32 stay held out, as by default.
    (tmp_path / "calibration.jsonl").write_text('{"text": "a"}\n' * 756)
    assert keys("bf16")["lora_null_num_samples"] == 724


def test_axolotl_setups_turn_its_kernels_off_only_where_asked(run, tmp_path):
    off = {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}
    assert run.axolotl_setup_keys("bf16") == {} == run.axolotl_setup_keys("bf16_onekey")
    assert run.axolotl_setup_keys("bf16_nokernels") == off == run.axolotl_setup_keys("bf16_nokernels_onekey")
    assert run.axolotl_setup_keys("zero3_1") == {**off, "deepspeed": str(run.ZERO3)}
    # the key alone without kernels compares with LoRA without kernels, not with the kernels' LoRA
    for setup, kept in (("bf16", 0.4), ("bf16_nokernels", 0.5)):
        (tmp_path / "runs" / f"axolotl-{setup}-lora").mkdir(parents=True)
        (tmp_path / "runs" / f"axolotl-{setup}-lora" / "row.json").write_text(f'{{"knowledge_kept": {kept}}}')
    assert run.base_setups_lora(tmp_path, "axolotl", "bf16_nokernels_onekey") == {"knowledge_kept": 0.5}
    assert run.base_setups_lora(tmp_path, "axolotl", "bf16_graphed_onekey") == {"knowledge_kept": 0.4}  # bf16's LoRA


def test_a_second_models_rows_sit_beside_the_firsts(run, tmp_path):
    import json

    output = tmp_path / "matrix.json"
    output.write_text(
        json.dumps(
            {"runs": [{"framework": "trl", "setup": "bf16", "model": "smollm2", "init": "lora_null", "status": "pass"}]}
        )
    )
    for init in ("lora_null", "lora"):
        folder = tmp_path / "work" / "runs" / f"trl-bf16-{init}"
        folder.mkdir(parents=True)
        (folder / "row.json").write_text(
            json.dumps({**row(0.0, kept=0.9 if init == "lora_null" else 0.6), "model": "qwen"})
        )
    run.collect(argparse.Namespace(work=str(tmp_path / "work"), output=str(output)))
    rows = json.loads(output.read_text())["runs"]
    assert sorted((r["model"], r["status"]) for r in rows) == [("qwen", "pass"), ("smollm2", "pass")]
    run.collect(argparse.Namespace(work=str(tmp_path / "work"), output=str(output)))  # the same model again: replaced
    assert len(json.loads(output.read_text())["runs"]) == 2


def test_the_plain_null_spaces_row_sits_beside_the_defaults_against_the_same_lora(run, tmp_path):
    import json

    output = tmp_path / "matrix.json"
    earlier = {"framework": "trl", "setup": "bf16", "model": "m", "init": "lora_null_plain", "status": "pass", "old": 1}
    output.write_text(json.dumps({"runs": [earlier]}))
    for init, kept in (("lora_null", 0.95), ("lora", 0.6)):
        folder = tmp_path / "work" / "runs" / f"trl-bf16-{init}"
        folder.mkdir(parents=True)
        (folder / "row.json").write_text(json.dumps({**row(0.0, kept=kept), "model": "m"}))
    run.collect(argparse.Namespace(work=str(tmp_path / "work"), output=str(output)))
    rows = {r["init"]: r for r in json.loads(output.read_text())["runs"]}
    assert rows["lora_null_plain"] == earlier  # a re-run of the default leaves the plain row alone
    assert rows["lora_null"]["knowledge_kept"] == 0.95 and rows["lora_null"]["knowledge_kept_lora"] == 0.6
    folder = tmp_path / "work" / "runs" / "trl-bf16-lora_null_plain"
    folder.mkdir()
    (folder / "row.json").write_text(json.dumps({**row(0.0, kept=0.9), "model": "m"}))
    run.collect(argparse.Namespace(work=str(tmp_path / "work"), output=str(output)))
    rows = {r["init"]: r for r in json.loads(output.read_text())["runs"]}
    assert len(rows) == 2 and rows["lora_null_plain"]["knowledge_kept"] == 0.9  # replaced by its own re-run
    assert rows["lora_null_plain"]["knowledge_kept_lora"] == 0.6 and rows["lora_null_plain"]["status"] == "pass"


def test_the_row_says_which_ranks_held_meta_weights_when_the_adapter_was_built(run, tmp_path, monkeypatch):
    import json

    import torch

    folder = tmp_path / "work" / "runs" / "trl-fsdp2_ram_efficient-lora_null"
    folder.mkdir(parents=True)
    monkeypatch.setenv("RANK", "1")
    with torch.device("meta"):  # FSDP's cpu_ram_efficient_loading: a rank other than 0 waits for rank 0's weights
        run.record_weights_at_init(torch.nn.Linear(4, 4), folder)
    monkeypatch.setenv("RANK", "0")
    run.record_weights_at_init(torch.nn.Linear(4, 4), folder)
    (folder / "row.json").write_text(json.dumps(row(0.0)))
    output = tmp_path / "matrix.json"
    run.collect(argparse.Namespace(work=str(tmp_path / "work"), output=str(output)))
    (ours,) = json.loads(output.read_text())["runs"]
    assert ours["setup"] == "fsdp2_ram_efficient" and ours["meta_weights_at_init_by_rank"] == [False, True]
    assert "init_task_data" not in ours  # no init record: nothing claimed


def test_the_row_says_whether_its_init_read_task_data(run, tmp_path):
    import json

    for setup, task_data in (("bf16", {"source": "the training data (64 rows)", "num_samples": 64}), ("qlora4", None)):
        record = tmp_path / "work" / "runs" / f"trl-{setup}-lora_null" / "trainer" / "lora_null_init" / "lora_null.json"
        record.parent.mkdir(parents=True)
        record.write_text(json.dumps({"calibration": {"source": "k.jsonl", "task_data": task_data}}))
        (record.parents[2] / "row.json").write_text(json.dumps(row(0.0)))
    output = tmp_path / "matrix.json"
    run.collect(argparse.Namespace(work=str(tmp_path / "work"), output=str(output)))
    found = {r["setup"]: r["init_task_data"] for r in json.loads(output.read_text())["runs"]}
    assert found == {"bf16": {"source": "the training data (64 rows)", "num_samples": 64}, "qlora4": "none"}


@pytest.mark.parametrize("framework", ["axolotl", "llamafactory"])
def test_two_gpu_setups_start_their_own_two_workers_with_half_the_batch_each(run, tmp_path, monkeypatch, framework):
    """Axolotl and LLaMA-Factory launch their workers themselves (device.sh starts them as one process): Axolotl
    through its accelerate launcher, LLaMA-Factory as the torchrun FORCE_TORCHRUN=1 starts; the global batch stays
    GLOBAL_BATCH."""
    from lora_null_core.frontends.toy_world import tiny_tokenizer

    tiny_tokenizer(["a b c"]).save_pretrained(tmp_path / "model")
    (tmp_path / "calibration.jsonl").write_text('{"text": "a"}\n' * 256)
    launched = {}
    monkeypatch.setattr(
        run,
        "run_cli",
        lambda command, config, work, folder, suffix, after=(): (
            launched.update(command=[*command, *after], config=config) or ""
        ),
    )
    train = {"axolotl": run.train_axolotl, "llamafactory": run.train_llamafactory}[framework]
    batch_key = {"axolotl": "micro_batch_size", "llamafactory": "per_device_train_batch_size"}[framework]
    for setup, workers in (("bf16", 1), ("ddp2", 2), ("zero3_2", 2)):
        args = argparse.Namespace(framework=framework, setup=setup, init="lora_null", work=str(tmp_path))
        train(args, tmp_path, tmp_path / "run", {"model": str(tmp_path / "model")}, "bf16")
        command = " ".join(launched["command"])
        assert launched["config"][batch_key] * workers == run.GLOBAL_BATCH, (setup, launched["config"][batch_key])
        if framework == "axolotl":
            assert command.startswith("axolotl train") and "--launcher accelerate --" in command
            assert ("--multi_gpu --num_processes 2" in command) == (workers == 2), command
        else:
            assert ("torch.distributed.run --nproc_per_node 2" in command) == (workers == 2), command


def test_a_key_alone_row_compares_with_its_base_setups_lora_unless_it_has_its_own(run, tmp_path):
    import json

    def write(name, kept):
        folder = tmp_path / "work" / "runs" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "row.json").write_text(json.dumps({**row(0.0, kept=kept), "model": "m"}))

    output = tmp_path / "matrix.json"
    write("trl-qlora4_onekey-lora_null", 0.9)
    write("trl-qlora4-lora", 0.6)
    write("trl-bf16-lora", 0.7)  # another base setup's LoRA: not qlora4_onekey's
    run.collect(argparse.Namespace(work=str(tmp_path / "work"), output=str(output)))
    rows = json.loads(output.read_text())["runs"]
    (onekey,) = [r for r in rows if r["setup"] == "qlora4_onekey"]
    assert onekey["knowledge_kept_lora"] == 0.6 and onekey["status"] == "pass"
    assert [r["setup"] for r in rows] == ["qlora4_onekey"]  # the LoRA runs it trained alone are not failed rows
    (tmp_path / "work" / "logs").mkdir()
    (tmp_path / "work" / "logs" / "trl-bf16-lora_null.log").write_text("out of memory")  # started, left no row
    run.collect(argparse.Namespace(work=str(tmp_path / "work"), output=str(output)))
    (failed,) = [r for r in json.loads(output.read_text())["runs"] if r["setup"] == "bf16"]
    assert failed["status"] == "fail" and failed["knowledge_kept_lora"] == 0.7
    write("trl-qlora4_onekey-lora", 0.95)  # a LoRA run of its own comes first
    run.collect(argparse.Namespace(work=str(tmp_path / "work"), output=str(output)))
    (onekey,) = [r for r in json.loads(output.read_text())["runs"] if r["setup"] == "qlora4_onekey"]
    assert onekey["knowledge_kept_lora"] == 0.95 and onekey["status"] == "fail"


def test_the_meters_cost_is_read_from_the_log_the_trainer_printed(run, tmp_path):
    """The running total of `forgetting/seconds` (the last one) and `train_runtime`, from TRL's run log or an
    Axolotl or LLaMA-Factory run's framework.log; nothing where either is missing."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "runs" / "llamafactory-bf16-lora_null").mkdir(parents=True)
    (tmp_path / "logs" / "trl-bf16-lora_null.log").write_text(
        "{'forgetting/kl': '0.09', 'forgetting/seconds': '1.193', 'epoch': '0.4'}\n"
        "{'train_runtime': '54.36', 'epoch': '1.2'}\n{'forgetting/kl': '0.12', 'forgetting/seconds': '2.122'}\n"
    )
    (tmp_path / "runs" / "llamafactory-bf16-lora_null" / "framework.log").write_text(
        "{'train_runtime': 42.7, 'epoch': 1.2}\n"
    )
    cost = run.meter_cost(tmp_path, "trl-bf16-lora_null")
    assert cost == {"meter_seconds": 2.122, "train_runtime": 54.36, "meter_pace": "default"}
    assert run.meter_cost(tmp_path, "llamafactory-bf16-lora_null") == {}  # no reading logged
    assert run.meter_cost(tmp_path, "axolotl-bf16-lora_null") == {}  # no log


def test_a_qlora_reload_quantizes_what_the_framework_quantized(run, tmp_path):
    """LLaMA-Factory quantizes the checkpoint's float32 weights (its embeddings stay float32 in memory), Axolotl and
    TRL bf16 ones: the reload casts to the same dtype before quantizing. bf16 runs and runs without the record: bf16."""
    import json

    import torch

    def dtypes(embeddings):
        (tmp_path / "memory_dtypes.json").write_text(
            json.dumps({"base_model.model.model.embed_tokens.weight": embeddings, "x.lora_A.weight": "float32"})
        )

    assert run.quantized_from(tmp_path, "nf4") is torch.bfloat16  # no record
    dtypes("float32")
    assert run.quantized_from(tmp_path, "nf4") is torch.float32
    assert run.quantized_from(tmp_path, "bf16") is torch.bfloat16
    dtypes("bfloat16")
    assert run.quantized_from(tmp_path, "nf4") is torch.bfloat16


def test_a_staged_part_leaves_room_for_the_whole_working_tree():
    """A call carries 64 MiB, the working tree included: the default part is 64 MiB less the whole checkout's tree
    (its data alone is several MiB) less the margin."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("stage_gpu", SCRIPT.with_name("stage.py"))
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    data = sum(f.stat().st_size for f in (SCRIPT.parents[1] / "data").rglob("*") if f.is_file()) / 2**20
    tree = 64 - stage.part_mib(margin=0)
    assert tree > data > 1 and stage.part_mib() == pytest.approx(64 - tree - 4)
