"""The TrainerCallback the plugins share: the initial factors are written once, at step 0, never from a
resumed run's (already trained) weights."""

from types import SimpleNamespace

import pytest
from peft import LoraConfig

from lora_null_core import lora_null_init
from lora_null_core.errors import LoraNullError
from lora_null_core.frontends.callback import LoraNullCallback
from lora_null_core.init.peft_layers import lora_layers
from lora_null_core.layout import INIT_DIR

SMALL = dict(num_samples=160, holdout_samples=0, batch_size=32)


def test_initial_factors_are_written_at_step_0_and_kept_on_resume(make_model, tokenizer, knowledge, tmp_path):
    model = lora_null_init(make_model(), LoraConfig(r=4), knowledge, tokenizer, **SMALL)
    args, callback = SimpleNamespace(output_dir=str(tmp_path)), LoraNullCallback()
    callback.on_train_begin(args, SimpleNamespace(global_step=0), None, model=model)
    written = (tmp_path / INIT_DIR / "adapter" / "adapter_model.safetensors").read_bytes()
    for layer in lora_layers(model, "default").values():  # what a resumed run holds: trained weights
        layer.lora_B["default"].weight.data += 1.0
    callback.on_train_begin(args, SimpleNamespace(global_step=3), None, model=model)
    assert (tmp_path / INIT_DIR / "adapter" / "adapter_model.safetensors").read_bytes() == written
    with pytest.raises(LoraNullError, match="Resuming a LoRA-Null run needs"):
        callback.on_train_begin(
            SimpleNamespace(output_dir=str(tmp_path / "other")), SimpleNamespace(global_step=3), None, model=model
        )
