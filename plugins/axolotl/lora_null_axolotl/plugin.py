"""Axolotl plugin: LoRA-Null initialization for `adapter: lora` when the config says `adapter_init: lora_null`.

Axolotl builds the PeftModel as usual. The plugin asks for `init_lora_weights: False` (so Axolotl's seeded
re-draw of lora_A leaves it alone), rewrites the adapter in `post_lora_load` through the core library, and
at the end of training makes the output folder right for the base it names (see export.finish_saved_adapter).
`post_lora_load` comes before Axolotl patches its fused LoRA kernels into attention and MLP (on by default on a
GPU): those compute q/k/v, o and the MLP without calling the projection modules, whose inputs the calibration
reads.
Loaded from the `axolotl.plugins` entry point it is active in every run, and does nothing without the key.
"""

from __future__ import annotations

import logging
import os
from types import MethodType
from typing import Any

from axolotl.integrations.base import BasePlugin

from lora_null_core import LoraNullConfig
from lora_null_core.frontends import (
    ForgettingCallback,
    finish_training,
    initialize_for_training,
    lora_null_request,
    meter_wanted,
    task_data_for,
    training_callback,
)

from .args import fallbacks

LOG = logging.getLogger("axolotl.integrations.lora_null")  # Axolotl shows INFO lines of axolotl.* loggers only


def is_active(cfg: Any) -> bool:
    return getattr(cfg, "adapter_init", None) == "lora_null"


class LoraNullPlugin(BasePlugin):
    meter: ForgettingCallback | None = None  # drawn before any init rewrites the model, added to the trainer

    def get_input_args(self) -> str:
        return "lora_null_axolotl.args.LoraNullArgs"

    def get_lora_config_kwargs(self, cfg: Any) -> dict:
        # init_lora_weights=False: PEFT skips its random draw and Axolotl's _reinit_lora_from_seed skips too.
        return {"init_lora_weights": False} if is_active(cfg) else {}

    def post_lora_load(self, cfg: Any, model: Any) -> None:
        attach_unfused_attention(cfg, model)  # the meter's sampling and the init's calibration run the model
        self.draw_meter(cfg, model)  # the original model's samples: before the init below
        if not is_active(cfg):
            return
        if cfg.lora_model_dir:  # a saved adapter was loaded (merge-lora, inference, training on): keep its weights
            LOG.info("LoRA-Null: lora_model_dir %s is loaded as saved; no initialization.", cfg.lora_model_dir)
            return
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise ValueError("adapter_init: lora_null found no LoRA adapter on the model; set `adapter: lora`.")
        from axolotl.loaders import load_tokenizer

        tokenizer = load_tokenizer(cfg)
        texts = dataset_source(cfg.lora_null_calibration)
        initialize_for_training(
            model,
            texts,
            tokenizer,
            lora_null_config(cfg),
            cfg.output_dir,
            task_data=task_data_source(cfg, tokenizer),
            execution_device=training_device(model),
            log=LOG,
        )

    def post_model_load(self, cfg: Any, model: Any) -> None:
        self.draw_meter(cfg, model)  # a run without an adapter: post_lora_load never came

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        if self.meter is not None:
            trainer.add_callback(self.meter.attach(trainer))

    def draw_meter(self, cfg: Any, model: Any) -> None:
        """The forgetting meter's reference, once, where lora_null_forgetting (or adapter_init: lora_null) asks."""
        wanted, every = meter_wanted(cfg, getattr(cfg, "adapter_init", None))
        if wanted and self.meter is None:
            from axolotl.loaders import load_tokenizer

            knowledge = dataset_source(cfg.lora_null_calibration)  # its held-out rows: forgetting/ce_rise
            self.meter = ForgettingCallback(every).draw(
                model,
                load_tokenizer(cfg),
                knowledge,
                lora_null_config(cfg) if knowledge is not None else None,
                device=training_device(model),
            )

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list:
        # Checkpoints made right for the base they name; the initial factors are saved in post_lora_load.
        return [training_callback()] if is_active(cfg) else []

    def post_train(self, cfg: Any, model: Any) -> None:
        if is_active(cfg):  # Axolotl calls this before its final save and after; only the second finds weights
            finish_training(cfg.output_dir)


def training_device(model: Any) -> str | None:
    """The GPU this rank will train on, where the model is still on the CPU in post_lora_load (Axolotl moves a bf16
    model later: on an H200, Qwen2.5-Coder-0.5B sampled its own text on the CPU at 280 s a batch); None otherwise,
    for the core's default (where the model is)."""
    import torch

    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cpu":
        return None
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def attach_unfused_attention(cfg: Any, model: Any) -> None:
    """With lora_qkv_kernel or lora_o_kernel (on by default on a GPU), Axolotl rewrites the attention class's forward
    before the model loads, to call `self.apply_qkv` and `self.apply_o`, but attaches those to each layer only after
    post_lora_load: in between the model cannot run. An H200 run failed with "'LlamaAttention' object has no attribute
    'apply_qkv'" in the init, an H100 run on Qwen2.5-Coder-1.5B with 'Qwen2Attention' in the meter's sampling. Attach
    Axolotl's own unfused versions, as Axolotl itself does first before choosing its fused ones, so the meter's
    sampling and the calibration's forward passes run and see each projection's input."""
    if not (cfg.lora_qkv_kernel or cfg.lora_o_kernel):
        return
    from axolotl.monkeypatch import lora_kernels as kernels

    for layer in kernels.get_layers(model):
        for attention in kernels.find_self_attn_in_layer(layer):
            if not hasattr(attention, "apply_qkv"):
                with_v = getattr(attention, "v_proj", None) is not None
                qkv = kernels.original_apply_qkv if with_v else kernels.original_apply_qkv_optional_v
                attention.apply_qkv = MethodType(qkv, attention)
            if not hasattr(attention, "apply_o"):
                attention.apply_o = MethodType(kernels.original_apply_o, attention)


def lora_null_config(cfg: Any) -> LoraNullConfig:
    return lora_null_request(cfg, fallbacks=fallbacks(cfg))


def task_data_source(cfg: Any, tokenizer: Any):
    """lora_null_task_data (task_data_for): by default the training set as Axolotl prepared it (templated and
    tokenized: what the adapter will see, read back from its prepared-dataset cache) whenever lora_null_calibration
    is given; a path or a dataset entry is read like the calibration."""

    def training_set():
        from axolotl.utils.data import prepare_datasets

        return prepare_datasets(cfg, tokenizer)[0]

    return task_data_for(
        cfg.lora_null_task_data, cfg.lora_null_calibration, training_set, tokenizer, read=dataset_source
    )


def dataset_source(entry: Any):
    """A path goes to the core's loader; a dataset entry goes through Axolotl's own dataset loading; None stays
    None (for the calibration: the core samples the model's own text)."""
    if entry is None or isinstance(entry, str):
        return entry
    from axolotl.utils.data.shared import load_dataset_with_config
    from axolotl.utils.dict import DictDefault

    return load_dataset_with_config(DictDefault(dict(entry)), use_auth_token=False)
