"""LLaMA-Factory's real SFT training from YAML on a tiny local Llama (CPU), through `lora-null-llamafactory
train`, in LLaMA-Factory's own environment (scripts/test.sh llamafactory)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from checks import (
    assert_export_reproduces,
    assert_in_null_space,
    assert_merged_is_the_fine_tuned_model,
    assert_right_on_the_base_it_names,
    assert_task_aware_from_the_training_set,
)

REPO = Path(__file__).resolve().parents[2]
SMALL = {  # what a tiny CPU run changes in the shipped example; the LoRA-Null keys stay as shipped
    "trust_remote_code": False,
    "lora_rank": 4,
    "template": "default",
    "cutoff_len": 64,
    "max_samples": None,
    "preprocessing_num_workers": None,
    "dataloader_num_workers": 0,
    "logging_steps": 1,
    "save_steps": 3,
    "plot_loss": False,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 0.01,
    "num_train_epochs": None,
    "max_steps": 6,
    "lr_scheduler_type": "constant",
    "warmup_ratio": 0.0,
    "bf16": False,
    "ddp_timeout": None,
    "seed": 0,
    "lora_null_num_samples": 128,
    "lora_null_max_length": 64,
}


def config(workspace, data_dir, out: Path, **changes) -> Path:
    cfg = yaml.safe_load((REPO / "examples/llamafactory/llama3_lora_null_sft.yaml").read_text())
    cfg.update(SMALL)
    cfg.update(
        model_name_or_path=str(workspace / "model"),
        dataset="task",
        dataset_dir=str(data_dir),
        lora_null_calibration="knowledge",
        output_dir=str(out),
    )
    cfg.update(changes)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if v is not None}))
    return path


def train(
    cfg: Path, cli: str = "lora-null-llamafactory", command: str = "train", **env_changes: str
) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "DISABLE_VERSION_CHECK": "1",
        "CUDA_VISIBLE_DEVICES": "",
        **env_changes,
    }
    return subprocess.run(
        [str(bin_dir / cli), command, str(cfg)], env=env, capture_output=True, text=True, timeout=900, cwd=cfg.parent
    )


@pytest.fixture(scope="module")
def trained(workspace, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("llamafactory") / "v2"
    result = train(config(workspace, data_dir, out, lora_null_covariance_cache=str(out.parent / "covariances")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_initial_a_is_in_the_calibration_null_space(workspace, trained):
    texts = [json.loads(line)["text"] for line in (workspace / "calibration.jsonl").read_text().splitlines()][:128]
    assert_in_null_space(workspace / "model", texts, trained / "lora_null_init" / "adapter")


def test_covariance_cache_key_reaches_the_core(trained):
    entries = list((trained.parent / "covariances").glob("*/index.json"))
    assert len(entries) == 1 and len(json.loads(entries[0].read_text())["group_of"]) > 0


def test_the_output_folder_and_its_checkpoints_are_right_on_the_base_they_name(workspace, trained):
    initial = trained / "lora_null_init" / "adapter"
    assert_right_on_the_base_it_names(workspace / "model", initial, trained)
    assert_right_on_the_base_it_names(workspace / "model", initial, trained / "checkpoint-3")


def test_llamafactory_cli_export_gives_the_fine_tuned_model(workspace, trained, tmp_path):
    """LLaMA-Factory's own merge: `llamafactory-cli export` with the run's output as adapter_name_or_path."""
    cfg = {
        "model_name_or_path": str(workspace / "model"),
        "adapter_name_or_path": str(trained),
        "template": "default",
        "finetuning_type": "lora",
        "export_dir": str(tmp_path / "merged"),
        "export_device": "cpu",
        "export_legacy_format": False,
        "trust_remote_code": False,
    }
    (tmp_path / "export.yaml").write_text(yaml.safe_dump(cfg))
    result = train(tmp_path / "export.yaml", cli="llamafactory-cli", command="export")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_merged_is_the_fine_tuned_model(tmp_path / "merged", workspace / "model", trained)


def test_v1_output_is_the_export_and_its_residual_adapter_is_set_aside(workspace, data_dir, tmp_path):
    out = tmp_path / "v1"
    result = train(config(workspace, data_dir, out, lora_null_variant="v1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_export_reproduces(
        workspace / "model", out / "lora_null_init" / "adapter", out / "lora_null_residual_adapter", out
    )
    checkpoint = json.loads((out / "checkpoint-3" / "adapter_config.json").read_text())
    assert checkpoint["base_model_name_or_path"].startswith("lora-null residual base of")


def test_bad_config_fails_before_training(workspace, data_dir, tmp_path):
    both = train(config(workspace, data_dir, tmp_path / "both", pissa_init=True))
    assert both.returncode != 0 and "pick one" in both.stderr
    assert not (tmp_path / "both" / "adapter_model.safetensors").exists()


def test_the_key_alone_samples_the_models_own_text(workspace, data_dir, tmp_path):
    out = tmp_path / "onekey"
    result = train(config(workspace, data_dir, out, lora_null_calibration=None, max_steps=2))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "lora_null_init" / "lora_null.json").read_text())
    assert record["calibration"]["source"].startswith("the model's own text")


def test_with_knowledge_text_the_training_set_is_the_task_data_by_default(workspace, data_dir, trained, tmp_path):
    """With lora_null_calibration and no lora_null_task_data the core gets the SFT training set as LLaMA-Factory
    tokenized it, every row of it; lora_null_task_data: none gives the plain null space."""
    out = tmp_path / "plain"
    result = train(config(workspace, data_dir, out, lora_null_task_data="none", max_steps=1))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / "lora_null_init" / "lora_null.json").read_text())["calibration"]["task_data"] is None
    rows = len((workspace / "task" / "train.jsonl").read_text().splitlines())
    assert_task_aware_from_the_training_set(trained / "lora_null_init", out / "lora_null_init", rows, samples=rows)


def test_without_the_key_it_is_plain_lora(workspace, data_dir, tmp_path):
    result = train(
        config(workspace, data_dir, tmp_path / "plain", adapter_init=None, lora_null_calibration=None, max_steps=1)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "plain" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "plain" / "lora_null_init").exists()


def test_the_forgetting_meter_logs_in_a_plain_lora_run_and_by_default_with_the_key(
    workspace, data_dir, trained, tmp_path
):
    """lora_null_forgetting: true on a run without adapter_init: LLaMA-Factory takes the key and its trainer logs
    forgetting/kl every 2 steps (trainer_state.json), and forgetting/ce_rise on the held-out rows of the knowledge
    dataset it names; with adapter_init: lora_null the meter is on by default."""
    out = tmp_path / "meter"
    cfg = config(
        workspace,
        data_dir,
        out,
        adapter_init=None,
        max_steps=4,
        lora_null_forgetting=True,
        lora_null_forgetting_steps=2,
    )
    result = train(cfg)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [row["step"] for row in history if "forgetting/kl" in row] == [2, 4]
    assert all("forgetting/ce_rise" in row for row in history if "forgetting/kl" in row)
    assert (out / "lora_null_forgetting.safetensors").is_file() and not (out / "lora_null_init").exists()
    assert (trained / "lora_null_forgetting.safetensors").is_file()


def test_torchrun_relaunch_patches_every_worker(workspace, data_dir, tmp_path):
    """LLaMA-Factory's multi-device path (FORCE_TORCHRUN / several GPUs): two gloo workers on CPU."""
    out = tmp_path / "ddp"
    result = train(config(workspace, data_dir, out), FORCE_TORCHRUN="1", NPROC_PER_NODE="2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "world size: 2" in result.stdout + result.stderr
    texts = [json.loads(line)["text"] for line in (workspace / "calibration.jsonl").read_text().splitlines()][:128]
    initial = out / "lora_null_init" / "adapter"
    assert_in_null_space(workspace / "model", texts, initial)
    assert_right_on_the_base_it_names(workspace / "model", initial, out)


def test_every_lora_null_setting_is_a_llamafactory_key():
    """Generated from LoraNullConfig: settings the old hand-written keys never reached (solver, text_field, seed)."""
    from lora_null_llamafactory.args import LoraNullFinetuningArguments

    args = LoraNullFinetuningArguments(
        finetuning_type="lora",
        adapter_init="lora_null",
        lora_null_calibration="k",
        lora_null_solver="eigh32",
        lora_null_text_field="question",
        lora_null_seed=4,
    )
    config = args.lora_null_config()
    assert (config.solver, config.text_field, config.seed, config.variant) == ("eigh32", "question", 4, "v2")
    with pytest.raises(ValueError, match="use_dora: false"):
        LoraNullFinetuningArguments(
            finetuning_type="lora", adapter_init="lora_null", lora_null_calibration="k", use_dora=True
        )
