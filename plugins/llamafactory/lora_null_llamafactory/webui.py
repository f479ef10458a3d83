"""LLaMA Board: an "Adapter init" choice (LoRA / PiSSA / LoRA-Null v1 / v2) with a calibration-dataset picker, a
task-aware box (on: the training set as task data wherever a calibration dataset is picked) and a forgetting-meter
box (on: forgetting/kl logged while training, whichever init), wired into the training arguments, the previewed
command and the process that starts training."""

from __future__ import annotations

import sys
from typing import Any

import yaml

from .patches import SUPPORTED
from .patches import install as install_training

CHOICES = ("LoRA", "PiSSA", "LoRA-Null v1", "LoRA-Null v2")
LAUNCHER = "lora-null-llamafactory train"
LABELS = {  # every locale LLaMA Board has
    "lora_null_tab": {
        "en": "Adapter init (LoRA-Null)",
        "ru": "Инициализация адаптера (LoRA-Null)",
        "zh": "适配器初始化 (LoRA-Null)",
        "ko": "어댑터 초기화 (LoRA-Null)",
        "ja": "アダプター初期化 (LoRA-Null)",
    },
    "adapter_init": {
        "en": ("Adapter init", "LoRA-Null keeps lora_A out of the pre-trained activations' space (v2 freezes it)."),
        "ru": (
            "Инициализация адаптера",
            "LoRA-Null держит lora_A вне пространства активаций предобученной модели (v2 замораживает его).",
        ),
        "zh": ("适配器初始化", "LoRA-Null 使 lora_A 位于预训练激活空间之外（v2 冻结它）。"),
        "ko": ("어댑터 초기화", "LoRA-Null은 lora_A를 사전 학습 활성화 공간 밖에 둡니다 (v2는 고정)."),
        "ja": ("アダプター初期化", "LoRA-Null は lora_A を事前学習の活性化空間の外に置きます（v2 は固定）。"),
    },
    "lora_null_calibration": {
        "en": (
            "Calibration dataset",
            "Knowledge text from dataset_info.json whose activations the adapter avoids; "
            "empty: text the model generates itself.",
        ),
        "ru": (
            "Калибровочный датасет",
            "Тексты знаний из dataset_info.json, активаций которых адаптер избегает; "
            "пусто: текст, который генерирует сама модель.",
        ),
        "zh": ("校准数据集", "dataset_info.json 中的知识文本，适配器避开其激活；留空：使用模型自己生成的文本。"),
        "ko": (
            "보정 데이터셋",
            "어댑터가 피하는 활성화를 가진 dataset_info.json의 지식 텍스트. 비워 두면 모델이 직접 생성한 텍스트.",
        ),
        "ja": (
            "キャリブレーションデータセット",
            "アダプターが避ける活性化を持つ dataset_info.json の知識テキスト。空欄：モデル自身が生成したテキスト。",
        ),
    },
    "lora_null_num_samples": {
        "en": ("Calibration samples", "Number of calibration texts."),
        "ru": ("Калибровочные примеры", "Количество калибровочных текстов."),
        "zh": ("校准样本数", "校准文本的数量。"),
        "ko": ("보정 샘플 수", "보정 텍스트의 수."),
        "ja": ("キャリブレーションサンプル数", "キャリブレーションテキストの数。"),
    },
    "lora_null_task_data": {
        "en": (
            "Task-aware",
            "With a calibration dataset, also read the training set and put lora_A where knowledge "
            "inputs are weak relative to it (it forgot less on the frontier benchmark); off: the plain null space.",
        ),
        "ru": (
            "С учётом задачи",
            "При калибровочном датасете также читать обучающий набор и размещать lora_A там, где "
            "входы знаний слабы относительно него (на бенчмарке забывает меньше); выкл.: обычное нуль-пространство.",
        ),
        "zh": (
            "任务感知",
            "有校准数据集时，同时读取训练集，将 lora_A 放在知识输入相对其较弱的方向上（基准测试中遗忘更少）；"
            "关闭：普通零空间。",
        ),
        "ko": (
            "작업 인식",
            "보정 데이터셋이 있으면 학습 데이터셋도 읽어, 지식 입력이 그에 비해 약한 방향에 lora_A를 둡니다 "
            "(벤치마크에서 덜 잊음). 끄면: 일반 영공간.",
        ),
        "ja": (
            "タスク考慮",
            "キャリブレーションデータセットがあるとき、学習データセットも読み込み、知識入力がそれに比べて弱い"
            "方向に lora_A を置きます（ベンチマークで忘却が少ない）。オフ：通常のヌル空間。",
        ),
    },
    "lora_null_forgetting": {
        "en": ("Forgetting meter", "Log forgetting/kl while training: how far the model drifts from what it knew."),
        "ru": (
            "Измеритель забывания",
            "Записывать forgetting/kl при обучении: насколько модель уходит от своих знаний.",
        ),
        "zh": ("遗忘度量", "训练时记录 forgetting/kl：模型偏离其原有知识的程度。"),
        "ko": ("망각 측정", "학습 중 forgetting/kl 기록: 모델이 알던 것에서 얼마나 멀어지는지."),
        "ja": ("忘却メーター", "学習中に forgetting/kl を記録：モデルが元の知識からどれだけ離れたか。"),
    },
}
_installed = False


def install() -> None:
    """Training patches plus the web UI ones; idempotent."""
    global _installed
    install_training()
    if _installed:
        return
    try:
        from llamafactory.webui import interface, runner
        from llamafactory.webui.locales import LOCALES
    except ImportError as err:
        raise ImportError(f"lora-null's LLaMA Board patches need {SUPPORTED} with its web UI ({err}).") from err
    for name in ("create_train_tab",):
        if not hasattr(interface, name):
            raise ImportError(f"llamafactory.webui.interface has no {name}; supported: {SUPPORTED}.")
    for name in ("Popen", "gen_cmd", "Runner"):
        if not hasattr(runner, name):
            raise ImportError(f"llamafactory.webui.runner has no {name}; supported: {SUPPORTED}.")
    _add_locales(LOCALES)
    interface.create_train_tab = _wrap_create_train_tab(interface.create_train_tab)
    runner.Runner._parse_train_args = _wrap_parse_train_args(runner.Runner._parse_train_args)
    runner.gen_cmd = _wrap_gen_cmd(runner.gen_cmd)
    runner.Popen = _wrap_popen(runner.Popen)
    _installed = True


def _add_locales(locales: dict) -> None:
    for name, by_lang in LABELS.items():
        locales[name] = {
            lang: ({"label": text} if isinstance(text, str) else {"label": text[0], "info": text[1]})
            for lang, text in by_lang.items()
        }


def _wrap_create_train_tab(original):
    def create_train_tab(engine):
        import gradio as gr
        from llamafactory.webui.common import DEFAULT_DATA_DIR, load_dataset_info

        with gr.Accordion(open=True) as tab:  # first in the Train tab, where it is seen
            with gr.Row():
                adapter_init = gr.Dropdown(choices=list(CHOICES), value="LoRA")
                # value=None: empty until the user picks one (Gradio would otherwise select the first dataset,
                # often the training set itself); empty means the model's own text.
                calibration = gr.Dropdown(
                    choices=list(load_dataset_info(DEFAULT_DATA_DIR)), value=None, allow_custom_value=True
                )
                num_samples = gr.Slider(minimum=16, maximum=4096, value=256, step=16)
                task_data = gr.Checkbox(value=True)  # on: lora_null_task_data left to its default (auto)
                forgetting = gr.Checkbox(value=True)  # on: the meter, LoRA-Null's default, for any init
        ours = {adapter_init, calibration, num_samples, task_data, forgetting}
        manager = engine.manager
        base = manager.get_base_elems
        manager.get_base_elems = lambda: base() | ours  # so the tab's buttons send our values to the Runner
        try:
            elem_dict = original(engine)
        finally:
            manager.get_base_elems = base
        elem_dict["dataset_dir"].change(
            lambda d: gr.Dropdown(choices=list(load_dataset_info(d)), value=None),
            [elem_dict["dataset_dir"]],
            [calibration],
        )
        elem_dict.update(
            lora_null_tab=tab,
            adapter_init=adapter_init,
            lora_null_calibration=calibration,
            lora_null_num_samples=num_samples,
            lora_null_task_data=task_data,
            lora_null_forgetting=forgetting,
        )
        return elem_dict

    return create_train_tab


def _wrap_parse_train_args(original):
    def _parse_train_args(self, data):
        args = original(self, data)
        get = lambda elem_id: data[self.manager.get_elem_by_id(elem_id)]  # noqa: E731
        choice = get("train.adapter_init")
        meter = bool(get("train.lora_null_forgetting"))
        if meter and choice not in ("LoRA-Null v1", "LoRA-Null v2"):
            args.update(lora_null_forgetting=True)  # with LoRA-Null the meter is on by default
        if choice == "PiSSA" and args.get("finetuning_type") == "lora":
            args.update(pissa_init=True, pissa_convert=True)
        elif choice in ("LoRA-Null v1", "LoRA-Null v2"):
            args.update(
                adapter_init="lora_null",
                lora_null_variant=choice[-2:],
                lora_null_calibration=get("train.lora_null_calibration") or None,  # None: the model's own text
                lora_null_num_samples=int(get("train.lora_null_num_samples")),
                lora_null_task_data=None if get("train.lora_null_task_data") else "none",
                lora_null_forgetting=None if meter else "false",  # text: LLaMA Board drops a False value
                pissa_init=False,
                pissa_convert=False,
            )
        return args

    return _parse_train_args


def _wrap_gen_cmd(original):
    def gen_cmd(args: dict[str, Any]) -> str:
        text = original(args)
        return text.replace("llamafactory-cli train", LAUNCHER, 1) if _through_the_plugin(args) else text

    return gen_cmd


def _wrap_popen(original):
    def popen(command, *args: Any, **kwargs: Any):
        if list(command[:2]) == ["llamafactory-cli", "train"] and _uses_lora_null(command[2]):
            command = [sys.executable, "-m", "lora_null_llamafactory.cli", "train", *command[2:]]
        return original(command, *args, **kwargs)

    return popen


def _uses_lora_null(config_path: str) -> bool:
    with open(config_path, encoding="utf-8") as f:
        return _through_the_plugin(yaml.safe_load(f) or {})


def _through_the_plugin(args: dict[str, Any]) -> bool:
    """A run that needs the plugin's launcher: LoRA-Null, or the forgetting meter on another init."""
    return args.get("adapter_init") == "lora_null" or args.get("lora_null_forgetting") is True


def run() -> None:
    """`lora-null-llamafactory webui`: LLaMA Board with the choice added (binds GRADIO_SERVER_NAME, as upstream)."""
    install()
    from llamafactory.webui.interface import run_web_ui

    run_web_ui()
