"""The command line on bad input, as a new user meets it: exit code 2, one `lora-null CMD: error:` line that names
the problem and the fix, no traceback, and no input destroyed or output half-written. Each case is one a fault
battery once found exiting 0 with wrong or destroyed output, or ending in a raw traceback."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from lora_null_core.frontends.cli import main
from lora_null_core.frontends.toy_world import write_jsonl
from lora_null_core.io.saving import load_initialized

from .test_export import train


def fails(capsys, *args):
    """Run the CLI in-process; return its error line, asserting it is a clean rc 2."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err, err
    return err


@pytest.fixture(scope="module")
def calibration(tmp_path_factory, knowledge):
    path = tmp_path_factory.mktemp("calibration") / "calib.jsonl"
    write_jsonl(path, knowledge)
    return path


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory, saved_model, calibration):
    out = tmp_path_factory.mktemp("inits") / "init"
    assert (
        main(
            [
                "-q",
                "init",
                "--model",
                str(saved_model),
                "--calibration",
                str(calibration),
                "--rank",
                "4",
                "--target-modules",
                "q_proj",
                "--num-samples",
                "160",
                "--holdout-samples",
                "0",
                "--device",
                "cpu",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, init_dir, tokenizer, task):
    model = load_initialized(init_dir, dtype="float32")
    train(model, tokenizer, task[:8], steps=2)
    out = tmp_path_factory.mktemp("trained") / "adapter"
    model.save_pretrained(str(out))
    return out


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_init_output_may_not_overlap_the_model(capsys, saved_model, calibration):
    before = snapshot(saved_model)
    for output in (saved_model, saved_model / "out"):
        err = fails(
            capsys,
            "init",
            "--model",
            saved_model,
            "--calibration",
            calibration,
            "--rank",
            4,
            "--output",
            output,
            "--overwrite",
        )
        assert "overlaps the input" in err
    assert snapshot(saved_model) == before


def test_export_output_may_not_overlap_its_inputs(capsys, init_dir, trained_adapter):
    before = snapshot(init_dir), snapshot(trained_adapter)
    for output in (init_dir, init_dir / "adapter", trained_adapter):
        err = fails(
            capsys, "export", "--init-dir", init_dir, "--adapter", trained_adapter, "--output", output, "--overwrite"
        )
        assert "overlaps the input" in err
    err = fails(
        capsys, "merge", "--init-dir", init_dir, "--adapter", trained_adapter, "--output", init_dir, "--overwrite"
    )
    assert "overlaps the input" in err
    assert (snapshot(init_dir), snapshot(trained_adapter)) == before


def test_an_export_is_never_exported_again(capsys, init_dir, trained_adapter, tmp_path):
    assert (
        main(
            [
                "export",
                "--init-dir",
                str(init_dir),
                "--adapter",
                str(trained_adapter),
                "--output",
                str(tmp_path / "export"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    err = fails(
        capsys, "export", "--init-dir", init_dir, "--adapter", tmp_path / "export", "--output", tmp_path / "again"
    )
    assert "already an export" in err


def test_export_refuses_an_adapter_with_layers_the_init_never_wrote(capsys, init_dir, saved_model, tmp_path):
    from lora_null_core.io.saving import load_model

    wider = get_peft_model(
        load_model(str(saved_model), "float32"), LoraConfig(r=4, lora_alpha=4, target_modules="all-linear")
    )
    wider.save_pretrained(str(tmp_path / "wider"))
    err = fails(capsys, "export", "--init-dir", init_dir, "--adapter", tmp_path / "wider", "--output", tmp_path / "out")
    assert "never wrote" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: {**m, "init": "basis"}, "lora_B is not zero"),
        (lambda m: {**m, "variant": "v9"}, "variant='v9'"),
        (None, "damaged"),
    ],
)
def test_export_checks_the_init_record(capsys, init_dir, trained_adapter, tmp_path, edit, match):
    copy = tmp_path / "init"
    shutil.copytree(init_dir, copy)
    record = copy / "lora_null.json"
    if edit is None:
        record.write_text(record.read_text()[:200])
    else:
        record.write_text(json.dumps(edit(json.loads(record.read_text()))))
    err = fails(capsys, "export", "--init-dir", copy, "--adapter", trained_adapter, "--output", tmp_path / "out")
    assert match in err


def test_export_refuses_a_swapped_init_adapter(capsys, init_dir, trained_adapter, tmp_path):
    copy = tmp_path / "init"
    shutil.copytree(init_dir, copy)
    weights = load_file(str(copy / "adapter" / "adapter_model.safetensors"))
    save_file({k: v * 1.01 for k, v in weights.items()}, str(copy / "adapter" / "adapter_model.safetensors"))
    err = fails(capsys, "export", "--init-dir", copy, "--adapter", trained_adapter, "--output", tmp_path / "out")
    assert "not the adapter this init wrote" in err


def test_export_refuses_another_inits_adapter(capsys, saved_model, calibration, init_dir, tmp_path):
    """Same model, rank and targets, another seed: its v2 lora_A is not this init's, so this init's B₀·A₀ would be
    subtracted from the wrong adapter (4 % off, with no sign). Refused, naming both folders."""
    other = tmp_path / "other"
    assert (
        main(
            [
                "-q",
                "init",
                "--model",
                str(saved_model),
                "--calibration",
                str(calibration),
                "--rank",
                "4",
                "--target-modules",
                "q_proj",
                "--num-samples",
                "160",
                "--holdout-samples",
                "0",
                "--seed",
                "7",
                "--device",
                "cpu",
                "--output",
                str(other),
            ]
        )
        == 0
    )
    capsys.readouterr()
    err = fails(capsys, "export", "--init-dir", init_dir, "--adapter", other / "adapter", "--output", tmp_path / "out")
    assert f"{other / 'adapter'} is not an adapter trained from the init in {init_dir}" in err
    assert "frozen lora_A differs" in err and not (tmp_path / "out").exists()


def test_export_refuses_an_adapter_trained_at_another_scale(capsys, init_dir, trained_adapter, tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(trained_adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 2 * config["lora_alpha"]}))
    assert "lora_alpha" in fails(
        capsys, "export", "--init-dir", init_dir, "--adapter", copy, "--output", tmp_path / "out"
    )


def test_overwrite_replaces_only_lora_null_outputs(capsys, saved_model, calibration, tmp_path):
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    err = fails(
        capsys,
        "init",
        "--model",
        saved_model,
        "--calibration",
        calibration,
        "--rank",
        4,
        "--output",
        mine,
        "--overwrite",
    )
    assert "did not write" in err and (mine / "thesis.tex").read_text() == "months of work"


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--rank", "0"], "at least 1"),
        (["--rank", "4", "--alpha", "-1"], "alpha must be a finite number above 0"),
        (["--rank", "4", "--alpha", "0"], "alpha must be a finite number above 0"),
        (["--rank", "4", "--alpha", "nan"], "alpha must be a finite number above 0"),
        (["--rank", "4", "--dropout", "1.5"], "below 1"),
        (["--rank", "4", "--max-length", "100000"], "exceeds the model's 256 positions"),
    ],
)
def test_bad_numbers_are_refused_before_the_model_loads(capsys, saved_model, calibration, tmp_path, flags, match):
    err = fails(
        capsys, "init", "--model", saved_model, "--calibration", calibration, "--output", tmp_path / "o", *flags
    )
    assert match in err and not (tmp_path / "o").exists()


def test_dtype_must_be_a_float(capsys, saved_model, calibration, tmp_path):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error, also rc 2
        main(
            [
                "init",
                "--model",
                str(saved_model),
                "--calibration",
                str(calibration),
                "--rank",
                "4",
                "--output",
                str(tmp_path / "o"),
                "--dtype",
                "int8",
            ]
        )
    assert exit_info.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err


def test_calibration_problems_are_named(capsys, saved_model, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me est d\xe9licieux.\n".encode("latin-1") * 50)
    assert "not UTF-8" in fails(
        capsys,
        "init",
        "--model",
        saved_model,
        "--calibration",
        tmp_path / "latin1.txt",
        "--rank",
        4,
        "--output",
        tmp_path / "o",
    )
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "data.jsonl", ["a text"] * 10)
    (tmp_path / "folder" / "state.json").write_text("{}")
    assert "saved `datasets` folder" in fails(
        capsys,
        "init",
        "--model",
        saved_model,
        "--calibration",
        tmp_path / "folder",
        "--rank",
        4,
        "--output",
        tmp_path / "o",
    )


def test_task_data_problems_say_they_are_the_task_datas(capsys, saved_model, calibration, tmp_path):
    err = fails(
        capsys,
        "init",
        "--model",
        saved_model,
        "--calibration",
        calibration,
        "--task-data",
        tmp_path / "missing.jsonl",
        "--rank",
        4,
        "--output",
        tmp_path / "o",
    )
    assert "Reading the task data" in err and "missing.jsonl does not exist" in err, err
    (tmp_path / "empty.jsonl").write_text('{"text": " "}\n')
    err = fails(
        capsys,
        "init",
        "--model",
        saved_model,
        "--calibration",
        calibration,
        "--task-data",
        tmp_path / "empty.jsonl",
        "--rank",
        4,
        "--output",
        tmp_path / "o",
    )
    assert "Reading the task data" in err and "only empty texts" in err, err
    assert not (tmp_path / "o").exists()


def test_model_problems_are_named(capsys, saved_model, calibration, tmp_path):
    common = ["--calibration", calibration, "--rank", 4, "--output", tmp_path / "o"]
    assert "does not exist" in fails(capsys, "init", "--model", tmp_path / "no" / "such-model", *common)
    broken = tmp_path / "broken"
    shutil.copytree(saved_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "Could not load model" in fails(capsys, "init", "--model", broken, *common)
    pickled = tmp_path / "pickled"
    shutil.copytree(saved_model, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({}, pickled / "pytorch_model.bin")
    assert "pickled weights" in fails(capsys, "init", "--model", pickled, *common)
    remote = tmp_path / "remote"
    shutil.copytree(saved_model, remote)
    config = json.loads((remote / "config.json").read_text())
    config.update(
        model_type="my-own-arch", auto_map={"AutoConfig": "my_code.MyConfig", "AutoModelForCausalLM": "my_code.MyModel"}
    )
    (remote / "config.json").write_text(json.dumps(config))
    assert "--trust-remote-code" in fails(capsys, "init", "--model", remote, *common)


def test_output_checks_come_before_the_calibration_pass(capsys, saved_model, calibration, tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.json").write_text("{}")
    err = fails(
        capsys, "inspect", "--model", saved_model, "--calibration", calibration, "--output", tmp_path / "report"
    )
    assert "already exists" in err
    (tmp_path / "a-file").write_text("")
    err = fails(
        capsys,
        "init",
        "--model",
        saved_model,
        "--calibration",
        calibration,
        "--rank",
        4,
        "--output",
        tmp_path / "a-file" / "out",
    )
    assert "Cannot write" in err


def test_a_killed_runs_staging_folder_is_swept(capsys, init_dir, trained_adapter, tmp_path):
    stale = tmp_path / ".export.tmp-999999999-abcd"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    assert (
        main(
            [
                "export",
                "--init-dir",
                str(init_dir),
                "--adapter",
                str(trained_adapter),
                "--output",
                str(tmp_path / "export"),
            ]
        )
        == 0
    )
    assert not stale.exists() and (tmp_path / "export" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--device", "gpu"], "not a device name"),
        (["--target-modules", ""], "target_modules is empty"),
    ],
)
def test_device_and_targets_are_named(capsys, saved_model, calibration, tmp_path, flags, match):
    err = fails(
        capsys,
        "init",
        "--model",
        saved_model,
        "--calibration",
        calibration,
        "--rank",
        4,
        "--output",
        tmp_path / "o",
        *flags,
    )
    assert match in err


def test_a_damaged_adapter_config_is_named(capsys, init_dir, trained_adapter, tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(trained_adapter, copy)
    (copy / "adapter_config.json").write_text("{not json")
    for command in ("export", "merge"):
        assert "is damaged" in fails(
            capsys, command, "--init-dir", init_dir, "--adapter", copy, "--output", tmp_path / "o"
        )
