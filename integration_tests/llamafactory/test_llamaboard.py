"""LLaMA Board with the LoRA-Null choice, started on 127.0.0.1 and driven in a real headless Chromium."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_board(workspace, root: Path):
    """`lora-null-llamafactory webui` in `root`, whose data/ holds the task and the knowledge text."""
    shutil.copytree(workspace / "lf_data", root / "data")
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "DISABLE_VERSION_CHECK": "1",
        "BROWSER": "true",
    }
    log = open(root / "webui.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "lora_null_llamafactory.cli", "webui"],
        env=env,
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert server.poll() is None, (root / "webui.log").read_text()[-3000:]
            time.sleep(0.5)
    _roots[url] = root
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def board(workspace, tmp_path_factory):
    with serve_board(workspace, tmp_path_factory.mktemp("board")) as url:
        yield url


@pytest.fixture
def fresh_board(workspace, tmp_path):
    """A board of its own: nothing an earlier test chose is restored into its fields."""
    with serve_board(workspace, tmp_path) as url:
        yield url


_roots: dict[str, Path] = {}


def board_root(url: str) -> Path:
    """The folder the board runs in (its saves/ and webui.log)."""
    return _roots[url]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,2600", "--lang=en-US"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def fill_board(browser, board, workspace, calibration, output):
    """Open the board and pick the tiny model, the task, LoRA-Null v2 (the calibration dataset only if given) and the
    output folder (the board would reuse the last one and resume it); return what 'Preview command' shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def field(label):
        return browser.find_element(
            By.XPATH, f"//span[normalize-space(text())='{label}']/following::*[self::input or self::textarea][1]"
        )

    def choose(label, value):
        box = field(label)
        box.click()
        time.sleep(0.3)
        options = browser.find_elements(By.XPATH, f"//li[@role='option' and normalize-space(@aria-label)='{value}']")
        if options:
            options[0].click()
        else:
            box.send_keys(value, Keys.ENTER)
        time.sleep(0.8)

    browser.get(board)
    for _ in range(240):  # LLaMA Board sets its labels after load
        if browser.find_elements(By.XPATH, "//span[normalize-space(text())='Calibration dataset']"):
            break
        time.sleep(0.5)
    choose("Model name", "Qwen2.5-0.5B")
    path = field("Model path")
    path.clear()
    path.send_keys(str(workspace / "model"), Keys.TAB)
    choose("Dataset", "task")
    choose("Adapter init", "LoRA-Null v2")
    if calibration:
        choose("Calibration dataset", calibration)
    choose("Compute type", "fp32")  # the board's default, bf16, needs a GPU
    folder = field("Output dir")
    folder.clear()
    folder.send_keys(output, Keys.TAB)
    time.sleep(0.5)
    browser.find_element(By.XPATH, "//button[normalize-space(.)='Preview command']").click()
    for _ in range(60):
        time.sleep(0.5)
        found = browser.find_elements(
            By.XPATH,
            "//*[contains(text(), 'llamafactory train') or contains(text(), "
            "'llamafactory-cli train')]/ancestor::*[contains(., '--stage')][1]",
        )
        if found:
            return found[0].text
    return ""


def start_and_wait(browser, board, output) -> Path:
    """Press Start: LLaMA Board writes its training_args.yaml and launches it; return the run's folder."""
    from selenium.webdriver.common.by import By

    saves, log = board_root(board) / "saves", board_root(board) / "webui.log"
    logged = len(log.read_text())
    browser.find_element(By.XPATH, "//button[normalize-space(.)='Start']").click()
    for _ in range(600):
        done = list(saves.glob(f"*/lora/{output}/adapter_model.safetensors"))
        if done or "Traceback" in log.read_text()[logged:]:  # this run's log only
            break
        time.sleep(0.5)
    assert done, "LLaMA Board's run left no adapter: " + log.read_text()[logged:][-3000:]
    return done[0].parent


def test_choosing_lora_null_produces_its_training_arguments(workspace, data_dir, board, browser):
    command = fill_board(browser, board, workspace, "knowledge", "with_calibration")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "llamaboard_lora_null.png"))
    assert command.startswith("lora-null-llamafactory train"), command
    for expected in (
        "--adapter_init lora_null",
        "--lora_null_variant v2",
        "--lora_null_calibration knowledge",
        "--lora_null_num_samples 256",
        f"--model_name_or_path {workspace / 'model'}",
    ):
        assert expected in command, command
    assert "--pissa_init True" not in command

    # The run goes through the plugin to the end.
    run = start_and_wait(browser, board, "with_calibration")
    written = yaml.safe_load((run / "training_args.yaml").read_text())
    assert written["adapter_init"] == "lora_null" and written["lora_null_variant"] == "v2", written
    assert written["lora_null_calibration"] == "knowledge" and written["finetuning_type"] == "lora", written
    # the box left on: with a calibration dataset the training set is the task data
    task = json.loads((run / "lora_null_init" / "lora_null.json").read_text())["calibration"]["task_data"]
    assert task and task["num_samples"] > 0, task
    shutil.copy(run / "training_args.yaml", ARTIFACTS / "llamaboard_training_args.yaml")


def test_the_calibration_field_left_empty_trains_on_the_models_own_text(workspace, data_dir, fresh_board, browser):
    """Left untouched, the field stays empty (Gradio's dropdown would pick the first dataset, here the training
    set) and the run calibrates on the model's own text."""
    command = fill_board(browser, fresh_board, workspace, None, "own_text")
    assert command.startswith("lora-null-llamafactory train") and "--adapter_init lora_null" in command, command
    assert "--lora_null_calibration" not in command and "--lora_null_task_data" not in command, command
    run = start_and_wait(browser, fresh_board, "own_text")
    written = yaml.safe_load((run / "training_args.yaml").read_text())
    assert written["adapter_init"] == "lora_null" and written.get("lora_null_calibration") is None, written
    recorded = json.loads((run / "lora_null_init" / "lora_null.json").read_text())["calibration"]
    assert recorded["source"].startswith("the model's own text"), recorded


def test_labels_in_every_locale_and_launch_goes_through_the_plugin(tmp_path):
    from llamafactory.webui.locales import LOCALES
    from lora_null_llamafactory import webui

    webui.install()
    for key in webui.LABELS:
        assert set(LOCALES[key]) == set(LOCALES["use_pissa"]), key
    launched = []
    popen = webui._wrap_popen(lambda command, *a, **k: launched.append(command))
    (tmp_path / "a.yaml").write_text("adapter_init: lora_null\n")
    (tmp_path / "b.yaml").write_text("finetuning_type: lora\n")
    popen(["llamafactory-cli", "train", str(tmp_path / "a.yaml")])
    popen(["llamafactory-cli", "train", str(tmp_path / "b.yaml")])
    assert launched[0][1:] == ["-m", "lora_null_llamafactory.cli", "train", str(tmp_path / "a.yaml")]
    assert launched[1] == ["llamafactory-cli", "train", str(tmp_path / "b.yaml")]


# What the board sends for the LoRA-Null boxes, by element id (the real form sends every element).
BOARD_DATA = {
    "train.adapter_init": "LoRA-Null v2",
    "train.lora_null_calibration": "",
    "train.lora_null_num_samples": 256,
    "train.lora_null_task_data": True,
    "train.lora_null_forgetting": True,
}


def board_parse(data):
    """The board's argument parsing with the plugin's wrapper, over a stand-in for LLaMA-Factory's own."""
    from lora_null_llamafactory import webui

    class Runner:
        class manager:  # noqa: N801 - the board's ElementManager, by id
            get_elem_by_id = staticmethod(lambda elem_id: elem_id)

    return webui._wrap_parse_train_args(lambda self, data: {"finetuning_type": "lora"})(Runner(), data)


def test_the_task_aware_box_is_on_by_default_and_turns_task_data_off():
    data = dict(BOARD_DATA)
    assert board_parse(data)["lora_null_task_data"] is None  # the default: the training set with calibration
    assert board_parse({**data, "train.lora_null_task_data": False})["lora_null_task_data"] == "none"


def test_the_forgetting_meter_box_is_the_keys_default_with_lora_null_and_asks_for_it_otherwise():
    data = dict(BOARD_DATA)
    assert board_parse(data)["lora_null_forgetting"] is None  # on: the default with the key
    assert board_parse({**data, "train.lora_null_forgetting": False})["lora_null_forgetting"] == "false"
    plain = board_parse({**data, "train.adapter_init": "LoRA"})
    assert plain["lora_null_forgetting"] is True and "adapter_init" not in plain
    assert "lora_null_forgetting" not in board_parse(
        {**data, "train.adapter_init": "LoRA", "train.lora_null_forgetting": False}
    )
    from lora_null_llamafactory import webui

    assert webui._through_the_plugin(plain) and not webui._through_the_plugin({"finetuning_type": "lora"})
