"""The real `axolotl train` on a tiny local Llama (CPU), in Axolotl's own environment (scripts/test.sh axolotl)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from checks import (
    assert_export_reproduces,
    assert_in_null_space,
    assert_merged_is_the_fine_tuned_model,
    assert_right_on_the_base_it_names,
    assert_task_aware_from_the_training_set,
)
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SMALL = {  # the example's settings that a tiny CPU run must change; everything else is the example as shipped
    "sequence_len": 64,
    "sample_packing": False,
    "val_set_size": 0,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_steps": 6,
    "learning_rate": 0.01,
    "optimizer": "adamw_torch",
    "bf16": False,
    "tf32": False,
    "flash_attention": False,
    "gradient_checkpointing": False,
    "lora_mlp_kernel": False,
    "lora_qkv_kernel": False,
    "lora_o_kernel": False,
    "lora_dropout": 0.0,
    "special_tokens": {},
    "evals_per_epoch": None,
    "saves_per_epoch": None,
    "seed": 0,
    "save_safetensors": True,
    "lora_null_num_samples": 128,
    "lora_null_max_length": 64,
    "lora_null_text_field": "text",
}


def config(workspace, out: Path, **changes) -> Path:
    cfg = yaml.safe_load((REPO / "examples/axolotl/llama-3-lora-null.yml").read_text())
    cfg.update(SMALL)
    cfg.update(
        base_model=str(workspace / "model"),
        tokenizer_type="AutoTokenizer",
        output_dir=str(out),
        dataset_prepared_path=str(out.parent / f"{out.name}-prepared"),
        datasets=[{"path": str(workspace / "task" / "train.jsonl"), "ds_type": "json", "type": "completion"}],
        lora_null_calibration={"path": str(workspace / "calibration.jsonl"), "ds_type": "json", "type": "completion"},
    )
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def axolotl_train(cfg: Path, command: str = "train", *launcher: str) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ["PATH"],
        "AXOLOTL_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [os.path.join(bin_dir, "axolotl"), command, str(cfg), *launcher],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=cfg.parent,
    )


@pytest.fixture(scope="module")
def trained(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("axolotl") / "v2"
    result = axolotl_train(config(workspace, out, lora_null_covariance_cache=str(out.parent / "covariances")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def calibration_texts(workspace) -> list[str]:
    return [json.loads(line)["text"] for line in (workspace / "calibration.jsonl").read_text().splitlines()][:128]


def test_initial_a_is_in_the_calibration_null_space(workspace, trained):
    assert_in_null_space(workspace / "model", calibration_texts(workspace), trained / "lora_null_init" / "adapter")


def test_covariance_cache_key_reaches_the_core(trained):
    entries = list((trained.parent / "covariances").glob("*/index.json"))
    assert len(entries) == 1 and len(json.loads(entries[0].read_text())["group_of"]) > 0


def test_the_output_folder_is_right_on_the_base_it_names(workspace, trained):
    assert_right_on_the_base_it_names(workspace / "model", trained / "lora_null_init" / "adapter", trained)


@pytest.mark.parametrize("method", ["memory_efficient", "legacy"])
def test_axolotl_merge_lora_gives_the_fine_tuned_model(workspace, trained, method):
    """`axolotl merge-lora` on the run's output: both of Axolotl's merge paths (the legacy one loads the model
    through the plugins, which must then leave the saved adapter alone)."""
    out = trained.parent / f"merge-{method}"
    result = axolotl_train(config(workspace, out, lora_model_dir=str(trained), merge_method=method), "merge-lora")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_merged_is_the_fine_tuned_model(out / "merged", workspace / "model", trained)


def test_v1_output_is_the_export_and_its_residual_adapter_is_set_aside(workspace, tmp_path):
    out = tmp_path / "v1"
    result = axolotl_train(config(workspace, out, lora_null_variant="v1", max_steps=3))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_export_reproduces(
        workspace / "model", out / "lora_null_init" / "adapter", out / "lora_null_residual_adapter", out
    )


def test_entry_point_activates_without_plugins_line_and_stays_quiet_without_the_key(workspace, tmp_path):
    from importlib.metadata import entry_points

    assert "lora_null_axolotl:LoraNullPlugin" in [e.value for e in entry_points(group="axolotl.plugins")]
    with_key = axolotl_train(config(workspace, tmp_path / "entry", plugins=None, max_steps=1))
    assert with_key.returncode == 0, with_key.stderr[-3000:]
    assert (tmp_path / "entry" / "lora_null_init" / "adapter" / "adapter_model.safetensors").exists()
    plain = axolotl_train(
        config(workspace, tmp_path / "plain", plugins=None, adapter_init=None, max_steps=1, lora_null_calibration=None)
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert (tmp_path / "plain" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "plain" / "lora_null_init").exists()


def test_the_forgetting_meter_logs_in_a_plain_lora_run_and_by_default_with_the_key(workspace, trained, tmp_path):
    """lora_null_forgetting: true on a run without adapter_init: Axolotl's schema keeps the key and its trainer logs
    forgetting/kl every 2 steps, and forgetting/ce_rise on the held-out rows of the knowledge file it names; with
    adapter_init: lora_null the meter is on by default (its reference is saved)."""
    out = tmp_path / "meter"
    result = axolotl_train(
        config(
            workspace,
            out,
            adapter_init=None,
            max_steps=4,
            lora_null_forgetting=True,
            lora_null_forgetting_steps=2,
        )
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logged = result.stdout + result.stderr
    assert logged.count("'forgetting/kl'") >= 2 and logged.count("'forgetting/ce_rise'") >= 2, logged[-3000:]
    assert (out / "lora_null_forgetting.safetensors").is_file() and not (out / "lora_null_init").exists()
    assert (trained / "lora_null_forgetting.safetensors").is_file()


def test_the_key_alone_on_qlora_samples_the_models_own_text(workspace, tmp_path):
    """`adapter: qlora` with `adapter_init: lora_null` and no other LoRA-Null key: it validates, samples the
    calibration text from the 4-bit model, trains, and v2's lora_A stays as the init wrote it."""
    out = tmp_path / "onekey"
    result = axolotl_train(
        config(
            workspace,
            out,
            adapter="qlora",
            load_in_4bit=True,
            lora_null_calibration=None,
            lora_null_num_samples=None,
            lora_null_max_length=None,
            lora_null_text_field=None,
            max_steps=2,
        )
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "lora_null_init" / "lora_null.json").read_text())
    assert record["calibration"]["source"].startswith("the model's own text")
    assert "LoRA-Null init:" in result.stdout + result.stderr  # the summary shows in Axolotl's log
    init, trained = (
        load_file(folder / "adapter_model.safetensors") for folder in (out / "lora_null_init" / "adapter", out)
    )
    assert all(torch.equal(init[k], trained[k]) for k in init if "lora_A" in k)


def test_with_knowledge_text_the_training_set_is_the_task_data_by_default(workspace, trained, tmp_path):
    """With lora_null_calibration and no lora_null_task_data the core gets the training set as Axolotl prepared it
    (read back from its prepared-dataset cache), every row of it; lora_null_task_data: none gives the plain null
    space."""
    out = tmp_path / "plain"
    result = axolotl_train(config(workspace, out, lora_null_task_data="none", max_steps=1))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / "lora_null_init" / "lora_null.json").read_text())["calibration"]["task_data"] is None
    rows = len((workspace / "task" / "train.jsonl").read_text().splitlines())
    assert_task_aware_from_the_training_set(trained / "lora_null_init", out / "lora_null_init", rows, samples=rows)


def test_two_processes_through_axolotls_launcher_train_the_adapter_the_init_wrote(workspace, tmp_path):
    """Axolotl's multi-GPU path (its accelerate launcher, DDP): two gloo workers on the CPU. The calibration is
    sharded over both and the factors broadcast; rank 0 saves an adapter whose frozen lora_A is the init's, in the
    calibration's null space, right on the base it names."""
    out = tmp_path / "ddp"
    result = axolotl_train(
        config(workspace, out, micro_batch_size=2, max_steps=2),
        "train",
        "--launcher",
        "accelerate",
        "--",
        "--cpu",
        "--num_processes",
        "2",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    init = out / "lora_null_init" / "adapter"
    assert_in_null_space(workspace / "model", calibration_texts(workspace), init)
    assert_right_on_the_base_it_names(workspace / "model", init, out)
    initial, trained = (load_file(folder / "adapter_model.safetensors") for folder in (init, out))
    assert all(torch.equal(initial[k], trained[k]) for k in initial if "lora_A" in k)
    assert any(not torch.equal(initial[k], trained[k]) for k in initial if "lora_B" in k)


def test_every_setting_reaches_the_core_by_key_or_nested_block():
    """Axolotl's schema gains one lora_null_<field> per LoraNullConfig field and a `lora_null:` block; the plugin
    reads both through the core, with Axolotl's sequence_len and seed standing in for unset ones."""
    from axolotl.utils.dict import DictDefault
    from lora_null_axolotl.args import LoraNullArgs
    from lora_null_axolotl.plugin import lora_null_config

    raw = {
        "adapter": "lora",
        "adapter_init": "lora_null",
        "lora_null_calibration": "k.jsonl",
        "lora_null_solver": "eigh32",
        "lora_null": {"a_scale": 2.0, "train_base": "residual"},
        "sequence_len": 96,
        "seed": 3,
    }
    parsed = LoraNullArgs.model_validate(raw)
    assert parsed.lora_null_solver == "eigh32" and parsed.lora_null == {"a_scale": 2.0, "train_base": "residual"}
    config = lora_null_config(DictDefault(raw))
    assert (config.solver, config.a_scale, config.train_base, config.max_length, config.seed) == (
        "eigh32",
        2.0,
        "residual",
        96,
        3,
    )
    with pytest.raises(ValueError, match="did you mean lora_null_num_samples"):
        LoraNullArgs.model_validate({**raw, "lora_null_num_sample": 8})
    with pytest.raises(ValueError, match="peft_use_dora: false"):
        LoraNullArgs.model_validate({**raw, "peft_use_dora": True})


def test_a_model_axolotl_holds_on_the_cpu_is_initialized_on_the_gpu_it_trains_on(monkeypatch):
    """Axolotl can hold a bf16 model on the CPU in post_lora_load and move it only for training: the init goes to
    the rank's GPU (LOCAL_RANK), and leaves the core's default (where the model is) otherwise."""
    from lora_null_axolotl.plugin import training_device

    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device(model) is None  # no GPU: where the model is
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device(model) == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert training_device(model) == "cuda:1"
    model.to("meta")
    assert training_device(model) is None  # not on the CPU: already placed


def test_the_meter_samples_a_model_whose_attention_axolotl_rewrote_for_its_lora_kernels(workspace, monkeypatch):
    """lora_qkv_kernel and lora_o_kernel (on by default on a GPU) rewrite the attention class to call apply_qkv and
    apply_o, which Axolotl attaches to each layer only after post_lora_load: the meter's reference, drawn there on a
    plain LoRA run, must still sample the model (on an H100 it failed with "no attribute 'apply_qkv'")."""
    from axolotl.monkeypatch import lora_kernels
    from axolotl.utils.dict import DictDefault
    from lora_null_axolotl.plugin import LoraNullPlugin
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = DictDefault(
        base_model=str(workspace / "model"),
        model_config_type="llama",
        lora_qkv_kernel=True,
        lora_o_kernel=True,
        lora_null_forgetting=True,
    )
    monkeypatch.setattr(LlamaAttention, "forward", LlamaAttention.forward)  # put back after the test
    lora_kernels.patch_self_attn_lora(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(workspace / "model")
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
        tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
        monkeypatch.setattr("axolotl.loaders.load_tokenizer", lambda cfg: tokenizer)
        with pytest.raises(AttributeError, match="apply_qkv"):  # the rewritten class, as Axolotl leaves it here
            model(torch.tensor([[1, 2, 3]]))
        plugin = LoraNullPlugin()
        plugin.post_lora_load(cfg, model)
    finally:
        del LlamaAttention._original_forward
    assert plugin.meter is not None and plugin.meter.reference is not None
    assert plugin.meter.reference.tokens > 0
