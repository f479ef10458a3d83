import html
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
from peft import LoraConfig

from lora_null_core.frontends.jobs import init_to_folder
from lora_null_core.frontends.toy_world import write_jsonl

CLI = Path(sys.executable).parent / "lora-null"


def test_inspect_report_with_an_init(tmp_path, saved_model, knowledge):
    write_jsonl(tmp_path / "calib.jsonl", knowledge[:180])
    write_jsonl(tmp_path / "heldout.jsonl", knowledge[180:])
    init_to_folder(str(saved_model), str(tmp_path / "calib.jsonl"), tmp_path / "init", LoraConfig(r=4), dtype="float32")
    result = subprocess.run(
        [
            str(CLI),
            "inspect",
            "--model",
            str(saved_model),
            "--calibration",
            str(tmp_path / "heldout.jsonl"),
            "--output",
            str(tmp_path / "report"),
            "--init-dir",
            str(tmp_path / "init"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = tmp_path / "report"
    data = json.loads((report / "report.json").read_text())
    assert len(data["layers"]) == 14  # every linear layer of the 2-block llama but the head
    for png in ("effective_rank.png", "spectra.png", "leakage.png"):
        image = matplotlib.image.imread(report / png)  # a valid PNG with pixels in it
        assert image.shape[0] > 100 and image.shape[1] > 100
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "http" not in html.replace("charset", "")
    for layer in data["layers"]:
        # On held-out knowledge text the init's A responds far less than a random A, and no basis beats optimum.
        assert layer["leakage"] < 0.5 * layer["leakage_random"]
        assert layer["leakage_optimum"] <= layer["leakage"] * 1.0001 + 1e-9
        assert 0 < layer["effective_rank_activations"] <= layer["d_in"]
    assert not any("recommendation" in layer for layer in data["layers"])  # 956 tokens ≫ width 128
    assert data["init_settings"] == {"variant": "v2", "init": "projected", "train_base": "residual", "a_scale": 2.0}
    assert "trained on the residual weights, a_scale 2)" in html


def test_too_little_calibration_gets_a_recommendation(make_model, tokenizer, knowledge):
    from lora_null_core import LoraNullConfig
    from lora_null_core.frontends.inspection import analyze

    data = analyze(make_model(), tokenizer, knowledge[:3], LoraNullConfig(short_calibration="refuse"))
    down = next(layer for layer in data["layers"] if layer["type"] == "down_proj")
    assert down["tokens"] < down["d_in"] == 128 and "at least 128 tokens" in down["recommendation"]
    assert down["numerical_rank_activations"] <= down["tokens"]
    assert data["calibration"]["top_up"] is None


def test_inspect_tops_short_calibration_up_as_init_does(make_model, tokenizer, knowledge):
    """The default (short_calibration: top_up): the report analyzes what init would calibrate on, and says so."""
    from lora_null_core.frontends.inspection import _html, analyze

    data = analyze(make_model(), tokenizer, knowledge[:3])
    down = next(layer for layer in data["layers"] if layer["type"] == "down_proj")
    assert down["tokens"] >= down["d_in"] and "recommendation" not in down
    used = data["calibration"]["used"]
    assert (
        used.startswith("3 rows of")
        and f"+ {data['calibration']['top_up']['samples']} samples of the model's own text" in used
        and html.escape(used) in _html(data, {})
    )
