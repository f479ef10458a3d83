"""Real trl.SFTTrainer runs on a tiny local model: Python API, TRL-style YAML CLI, and two processes."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from lora_null_trl import EXPORT_DIR, INIT_DIR, LoraNullSFTConfig, LoraNullSFTTrainer
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_null_core import LoraNullConfig, lora_null_init
from lora_null_core.calibration.sources import TokenizedRows
from lora_null_core.init.peft_layers import lora_layers
from lora_null_core.layout import RESIDUAL_ADAPTER_DIR

LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")


# DeepSpeed ZeRO-3 on the CPU for the worker scripts (DeepSpeed derives the global batch). Kept here, not in a worker:
# importing a worker script runs it.
ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "bf16": {"enabled": False},
    "zero_allow_untested_optimizer": True,
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}


def trainer_for(workspace, output_dir, variant, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        max_steps=5,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        max_length=32,
        bf16=False,
        gradient_checkpointing=False,  # trl 0.24 turns it on; reentrant checkpointing and DDP clash on CPU
        adapter_init="lora_null",
        lora_null_calibration=str(workspace / "calibration.jsonl"),
        lora_null_num_samples=200,
        lora_null_holdout_samples=40,
        lora_null_variant=variant,
    )
    args = LoraNullSFTConfig(**{**settings, **overrides})
    return LoraNullSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(workspace / "model", dtype=torch.float32),
        args=args,
        train_dataset=load_dataset("json", data_files=str(workspace / "task" / "train.jsonl"), split="train"),
        processing_class=AutoTokenizer.from_pretrained(workspace / "model"),
        peft_config=LoraConfig(**LORA),
    )


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapter_state(model):
    return {
        f"{name}.{part}": getattr(layer, part)["default"].weight.detach().clone()
        for name, layer in lora_layers(model, "default").items()
        for part in ("lora_A", "lora_B")
    }


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_sft_trainer_trains_a_lora_null_adapter_and_exports_it(workspace, tmp_path, variant):
    trainer = trainer_for(workspace, tmp_path / "run", variant)
    at_step0 = adapter_state(trainer.model)

    # Step 0 is exactly what the core produces for the same model, data and settings: by default, beside the
    # calibration file, the training set as the trainer tokenized it is the task data.
    core = lora_null_init(
        AutoModelForCausalLM.from_pretrained(workspace / "model", dtype=torch.float32),
        LoraConfig(**LORA),
        str(workspace / "calibration.jsonl"),
        AutoTokenizer.from_pretrained(workspace / "model"),
        LoraNullConfig(variant=variant, num_samples=200, holdout_samples=40),
        task_data=TokenizedRows(trainer.train_dataset, trainer.processing_class),
    )
    for key, value in adapter_state(core).items():
        assert torch.allclose(at_step0[key], value, atol=1e-6), key

    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, param in trainer.model.named_parameters():
        assert (id(param) in optimized) == param.requires_grad, name  # the optimizer sees trainable params only
    after = adapter_state(trainer.model)
    for key in after:
        if key.endswith("lora_A"):
            assert torch.equal(after[key], at_step0[key]) == (variant == "v2"), key
        else:
            assert not torch.equal(after[key], at_step0[key]), key

    out = tmp_path / "run" / "final"
    trainer.save_model(str(out))
    # What TRL wrote as the adapter is right on the base it names (v1: the rank-2r export took its place).
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == (4 if variant == "v2" else 8)
    assert config["base_model_name_or_path"] == str(workspace / "model")
    original = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    on_original = PeftModel.from_pretrained(original, str(out))
    ids = torch.tensor([[2, 20, 21, 22, 23, 24, 25]])
    expected = logits(trainer.model, ids)
    assert (logits(on_original, ids) - expected).norm() / expected.norm() < 1e-5
    assert (out / RESIDUAL_ADAPTER_DIR).is_dir() == (variant == "v1") and not (out / EXPORT_DIR).exists()
    metadata = json.loads((tmp_path / "run" / INIT_DIR / "lora_null.json").read_text())
    assert metadata["summary"]["leakage_holdout_mean"] < 0.5 * metadata["summary"]["leakage_holdout_random_mean"]


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_a_run_resumed_from_a_checkpoint_ends_where_an_uninterrupted_one_does(workspace, tmp_path, variant):
    """Checkpoints keep what resuming needs: the resumed run's final adapter, loaded the standard way on the base
    it names, computes what the uninterrupted run's does."""
    steps = dict(max_steps=4, save_strategy="steps", save_steps=2)
    whole = trainer_for(workspace, tmp_path / "whole", variant, **steps)
    whole.train()
    whole.save_model(str(tmp_path / "whole"))
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    named = json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"]
    # v1's checkpoint adapter needs the residual base and says so; v2's is a LoRA for the original model.
    assert named.startswith("lora-null residual base of") if variant == "v1" else named == str(workspace / "model")
    assert not [p for p in checkpoint.iterdir() if p.is_dir()]  # resuming would load an adapter folder in it
    resumed = trainer_for(workspace, tmp_path / "whole", variant, **steps)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed.save_model(str(tmp_path / "resumed"))
    ids = torch.tensor([[2, 20, 21, 22, 23, 24, 25]])
    results = []
    for folder in ("whole", "resumed"):
        original = AutoModelForCausalLM.from_pretrained(workspace / "model", dtype=torch.float32)
        results.append(logits(PeftModel.from_pretrained(original, str(tmp_path / folder)), ids))
    assert (results[0] - results[1]).norm() / results[0].norm() < 1e-4


def test_trl_yaml_cli(workspace, tmp_path):
    config = {
        "model_name_or_path": str(workspace / "model"),
        "dataset_name": str(workspace / "task"),
        "output_dir": str(tmp_path / "cli-run"),
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": "all-linear",
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "max_length": 32,
        "dtype": "float32",
        "bf16": False,
        "adapter_init": "lora_null",
        "lora_null_calibration": str(workspace / "calibration.jsonl"),
        "lora_null_num_samples": 150,
        "lora_null_variant": "v2",
        "lora_null_covariance_cache": str(tmp_path / "cov"),
    }
    (tmp_path / "cfg.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()) + "\n")
    cli = Path(sys.executable).parent / "lora-null-trl"
    result = subprocess.run(
        [str(cli), "sft", "--config", str(tmp_path / "cfg.yaml")], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "cli-run"
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(workspace / "model")
    assert json.loads((run / INIT_DIR / "lora_null.json").read_text())["calibration"]["num_samples"] == 150
    assert len(list((tmp_path / "cov").glob("*/index.json"))) == 1  # the YAML key reached the core
    trained, initial = (
        load_file(str(run / "adapter_model.safetensors")),
        load_file(str(run / INIT_DIR / "adapter" / "adapter_model.safetensors")),
    )
    assert all(torch.equal(trained[k], initial[k]) for k in initial if "lora_A" in k)  # v2 kept A frozen
    assert any(not torch.equal(trained[k], initial[k]) for k in initial if "lora_B" in k)


def test_yaml_cli_with_the_key_alone_samples_the_models_own_text(workspace, tmp_path):
    """`adapter_init: lora_null` and TRL's own keys, nothing else: the calibration text is the model's own."""
    config = {
        "model_name_or_path": str(workspace / "model"),
        "dataset_name": str(workspace / "task"),
        "output_dir": str(tmp_path / "run"),
        "use_peft": True,
        "adapter_init": "lora_null",
        "use_cpu": True,
        "max_steps": 2,
        "report_to": "none",
    }
    (tmp_path / "cfg.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items()) + "\n")
    cli = Path(sys.executable).parent / "lora-null-trl"
    result = subprocess.run(
        [str(cli), "sft", "--config", str(tmp_path / "cfg.yaml")], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    record = json.loads((run / INIT_DIR / "lora_null.json").read_text())
    assert record["calibration"]["source"].startswith("the model's own text")
    trained, initial = (
        load_file(str(run / "adapter_model.safetensors")),
        load_file(str(run / INIT_DIR / "adapter" / "adapter_model.safetensors")),
    )
    assert all(torch.equal(trained[k], initial[k]) for k in initial if "lora_A" in k)


def test_two_processes_end_with_identical_adapters(workspace, tmp_path):
    script = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(script),
            str(workspace),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any("lora_B" in k for k in rank0)


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (scripts/test.sh installs it)"
)
@pytest.mark.parametrize("processes", [1, 2])
def test_zero3_save_holds_the_frozen_lora_a_and_reproduces_the_trained_model(workspace, tmp_path, processes):
    """Under ZeRO-3, Transformers' Trainer saves a PEFT model's trainable parameters only, so v2's frozen lora_A
    was missing from the saved adapter and PEFT loaded it from its own random init (GPU: output rel. err 0.53, over
    one rank and two). The plugin's save puts the init's A back; loaded the standard way, the adapter is the model
    that trained, with the parameters partitioned over one process or two."""
    script = Path(__file__).with_name("zero3_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(free_port()),
            str(script),
            str(workspace),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    initial = load_file(str(tmp_path / "run" / INIT_DIR / "adapter" / "adapter_model.safetensors"))
    memory = torch.load(tmp_path / "memory.pt")
    a_keys = [k for k in initial if "lora_A" in k]
    assert a_keys and all(torch.equal(saved[k], initial[k]) for k in a_keys)  # the init's A, as frozen in training
    for name, value in memory["factors"].items():  # and every factor as it was in memory
        assert torch.equal(saved[name.replace(".default", "")], value), name
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(workspace / "model", dtype=torch.float32), tmp_path / "adapter"
    )
    reloaded = logits(model, torch.arange(3, 19).view(2, 8))
    assert torch.allclose(reloaded, memory["logits"], atol=1e-5), float((reloaded - memory["logits"]).abs().max())


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (scripts/test.sh installs it)"
)
@pytest.mark.parametrize("processes", [1, 2])
def test_zero3_with_the_key_alone_samples_the_partitioned_models_own_text(workspace, tmp_path, processes):
    """The key alone used to be refused under ZeRO-3 (the weights are partitions). The own text is now sampled from
    the model gathered whole, or block by block where it does not fit (forced here): the same texts either way.
    In one process the init is the one the core makes from the same model unpartitioned."""
    script = Path(__file__).with_name("zero3_onekey_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(free_port()),
            str(script),
            str(workspace),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    texts = json.loads((tmp_path / "texts.json").read_text())
    assert len(texts["whole"]) == 29 and texts["block_by_block"] == texts["whole"]
    record = json.loads((tmp_path / "run" / INIT_DIR / "lora_null.json").read_text())
    assert (
        record["calibration"]["source"].startswith("the model's own text") and record["calibration"]["top_up"] is None
    )
    if processes == 1:
        core = lora_null_init(
            AutoModelForCausalLM.from_pretrained(workspace / "model", dtype=torch.float32),
            LoraConfig(**LORA),
            None,
            AutoTokenizer.from_pretrained(workspace / "model"),
            LoraNullConfig(num_samples=24, holdout_samples=5, generated_length=12),
        )
        initial = load_file(str(tmp_path / "run" / INIT_DIR / "adapter" / "adapter_model.safetensors"))
        for name, layer in lora_layers(core, "default").items():
            expected = layer.lora_A["default"].weight.detach()
            assert torch.allclose(initial[f"base_model.model.{name}.lora_A.weight"], expected, atol=1e-5), name


def test_the_forgetting_meter_logs_through_the_trainer(workspace, tmp_path):
    """On by default with adapter_init: lora_null: forgetting/kl (and forgetting/ce_rise on the knowledge file's
    held-out rows) in the log history every N steps and at the end, and the reference beside the init folder; a
    plain LoRA run takes the key too, and without it has no meter."""
    trainer = trainer_for(
        workspace, tmp_path / "run", "v2", max_steps=5, lora_null_forgetting_steps=2, learning_rate=5e-2
    )
    trainer.train()
    readings = [(row["step"], row["forgetting/kl"]) for row in trainer.state.log_history if "forgetting/kl" in row]
    assert [step for step, _ in readings] == [2, 4, 5] and readings[-1][1] > 0
    # With a knowledge file, the cross-entropy rise on the rows the init held out, logged beside it.
    rises = [row["forgetting/ce_rise"] for row in trainer.state.log_history if "forgetting/kl" in row]
    assert len(rises) == 3 and rises[-1] != 0
    assert (tmp_path / "run" / "lora_null_forgetting.safetensors").is_file()
    plain = trainer_for(
        workspace,
        tmp_path / "plain",
        "v2",
        max_steps=2,
        adapter_init="default",
        lora_null_forgetting=True,
        lora_null_forgetting_steps=1,
    )
    plain.train()
    assert [row["step"] for row in plain.state.log_history if "forgetting/kl" in row] == [1, 2]
    off = trainer_for(workspace, tmp_path / "off", "v2", max_steps=1, adapter_init="default")
    off.train()
    assert not any("forgetting/kl" in row for row in off.state.log_history)


def test_set_adapter_after_the_init_does_not_unfreeze_a_in_training(workspace, tmp_path):
    """PEFT's set_adapter, which a user calls to pick the adapter to train, turns lora_A's gradient back on; the
    plugin freezes it again when training starts, so v2's A is still the init's after training."""
    trainer = trainer_for(workspace, tmp_path / "run", "v2")
    trainer.model.set_adapter("default")
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_A" in n)
    before = adapter_state(trainer.model)
    trainer.train()
    after = adapter_state(trainer.model)
    assert all(torch.equal(after[k], before[k]) for k in before if "lora_A" in k)
    assert any(not torch.equal(after[k], before[k]) for k in before if "lora_B" in k)  # and B trained


def test_a_misspelled_key_in_the_yaml_names_the_closest_one(tmp_path):
    example = (Path(__file__).parents[2] / "examples" / "trl" / "sft_lora_null.yaml").read_text()
    (tmp_path / "x.yaml").write_text(example.replace("lora_null_variant:", "lora_null_varient:"))
    assert "lora_null_varient" in (tmp_path / "x.yaml").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "lora_null_trl.cli", "sft", "--config", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "lora-null-trl: error:" in result.stderr and "did you mean lora_null_variant?" in result.stderr
    assert "Traceback" not in result.stderr


def test_example_yaml_parses_into_trl_and_lora_null_arguments(tmp_path):
    from trl import ModelConfig, ScriptArguments, TrlParser

    example = Path(__file__).parents[2] / "examples" / "trl" / "sft_lora_null.yaml"
    (tmp_path / "questions.jsonl").write_text('{"text": "Where was Ada Varga born ?"}\n')
    script_args, config, model_args = TrlParser(
        [ScriptArguments, LoraNullSFTConfig, ModelConfig]
    ).parse_args_and_config(
        args=[
            "--config",
            str(example),
            "--lora_null_calibration",
            str(tmp_path / "questions.jsonl"),
            "--use_cpu",
            "true",
        ]
    )
    assert config.adapter_init == "lora_null" and config.lora_null_variant == "v2"
    assert model_args.use_peft and model_args.lora_r == 16
    assert script_args.dataset_name == "trl-lib/Capybara"


def test_bench_trains_a_frontier_point_through_the_plugin(workspace, tmp_path):
    """`lora-null bench frontier --trainer trl`: TRL's SFTTrainer with the plugin's one key trains the task
    (completion-only loss) with v2's A frozen at the init the plugin wrote, as the harness's loop would."""
    from lora_null_bench.suites import Suite
    from lora_null_bench.train import TrainSettings
    from lora_null_bench.trl_trainer import fine_tune_with_trl
    from lora_null_bench.world import Example

    texts = [json.loads(line)["text"] for line in (workspace / "calibration.jsonl").read_text().splitlines()]
    sums = [text.split(" Answer : ") for text in json.loads((workspace / "task.json").read_text())]
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    suite = Suite(
        model="tiny",
        load_base=lambda: AutoModelForCausalLM.from_pretrained(workspace / "model"),
        tokenizer=tokenizer,
        calibration=[Example(t, ("",)) for t in texts[:256]],
        knowledge=[],
        heldout_text=[],
        task_train=[Example(q + " Answer :", (a,)) for q, a in sums],
        task_eval=[],
        train=TrainSettings(steps=4, batch_size=8, learning_rate=5e-3, max_length=32),
        rank=4,
    )
    trained, loss = fine_tune_with_trl("lora_null", suite.load_base(), suite, suite.train, 0, tmp_path)
    assert 0 < loss < float("inf")  # the completion tokens carried a loss
    written = PeftModel.from_pretrained(suite.load_base(), str(tmp_path / "run" / INIT_DIR / "adapter"))
    init, now = adapter_state(written), adapter_state(trained)
    assert init.keys() == now.keys()
    assert all(torch.equal(init[k], now[k]) for k in init if k.endswith("lora_A"))  # v2: A frozen at the init
    assert not all(torch.equal(init[k], now[k]) for k in init if k.endswith("lora_B"))  # B trained
    recorded = lambda name: json.loads((tmp_path / name / INIT_DIR / "lora_null.json").read_text())  # noqa: E731
    assert recorded("run")["calibration"]["task_data"]["num_samples"] == len(sums)  # the training set, by default
    # lora_null_plain is the plugin with `lora_null_task_data: none`, lora_null_x1 that with `lora_null_a_scale: 1`:
    # the paper's A, half the plain default's (a_scale 2)
    fine_tune_with_trl("lora_null_plain", suite.load_base(), suite, suite.train, 0, tmp_path / "plain")
    fine_tune_with_trl("lora_null_x1", suite.load_base(), suite, suite.train, 0, tmp_path / "x1")
    assert recorded("plain/run")["calibration"]["task_data"] is None
    plain, paper = (
        adapter_state(PeftModel.from_pretrained(suite.load_base(), str(tmp_path / name / "run" / INIT_DIR / "adapter")))
        for name in ("plain", "x1")
    )
    for key in (k for k in init if k.endswith("lora_A")):
        torch.testing.assert_close(plain[key], 2 * paper[key])
    with pytest.raises(ValueError, match="runs lora, lora_null"):
        fine_tune_with_trl("pissa", suite.load_base(), suite, suite.train, 0, tmp_path / "x")


def test_every_lora_null_setting_is_a_trl_key(tmp_path):
    """The keys are generated from LoraNullConfig: settings no hand-written list reached (solver, a_scale,
    covariance_weighting) arrive, unset ones take the core's defaults and the trainer's seed."""
    args = LoraNullSFTConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        seed=5,
        adapter_init="lora_null",
        lora_null_calibration="k.jsonl",
        lora_null_solver="eigh32",
        lora_null_a_scale=2.0,
        lora_null_covariance_weighting="per_sample_max",
    )
    config = args.lora_null_config()
    assert (config.solver, config.a_scale, config.covariance_weighting, config.seed) == (
        "eigh32",
        2.0,
        "per_sample_max",
        5,
    )
    assert config.num_samples == LoraNullConfig().num_samples
    with pytest.raises(ValueError, match="solver='qr'"):
        LoraNullSFTConfig(
            output_dir=str(tmp_path),
            report_to=[],
            use_cpu=True,
            adapter_init="lora_null",
            lora_null_calibration="k.jsonl",
            lora_null_solver="qr",
        )


def test_with_knowledge_text_the_training_set_is_the_task_data_by_default(workspace, tmp_path):
    """With lora_null_calibration and no lora_null_task_data the core gets the training set as SFTTrainer tokenized
    it; the init records it, keeps the paper's factors (a_scale 1), and its A differs from the plain null space's,
    which lora_null_task_data: none gives."""
    aware = trainer_for(workspace, tmp_path / "aware", "v2", lora_null_task_samples=24)
    report = aware.model.lora_null_report
    task = report.calibration["task_data"]
    assert task["source"] == f"the training data as the trainer tokenized it ({len(aware.train_dataset)} rows)"
    assert task["num_samples"] == 24 and report.config["a_scale"] == 1.0
    plain = trainer_for(workspace, tmp_path / "plain", "v2", lora_null_task_data="none", lora_null_a_scale=1.0)
    assert plain.model.lora_null_report.calibration["task_data"] is None
    mine, theirs = adapter_state(aware.model), adapter_state(plain.model)
    assert any(not torch.allclose(mine[k], theirs[k]) for k in mine if "lora_A" in k)
    record = json.loads((tmp_path / "aware" / INIT_DIR / "lora_null.json").read_text())
    assert record["calibration"]["task_data"]["num_samples"] == 24
