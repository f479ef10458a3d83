"""The TrainerCallback the framework plugins share: keep the initial factors, and make every checkpoint right for
the base its adapter_config.json names (see export.finish_saved_adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..distributed import rank_and_world
from ..errors import LoraNullError
from ..init.adapter_scope import refreeze_frozen_a
from ..io.saving import save_initial_adapter
from ..io.trainer_saves import finish_saved_adapter
from ..layout import INIT_DIR, METADATA_FILE
from ..weights import gathered


def is_initialized(model: Any) -> bool:
    return getattr(model, "lora_null_report", None) is not None


class LoraNullCallback(TrainerCallback):
    """on_train_begin: keep v2's lora_A frozen, and write `<output_dir>/lora_null_init` unless the plugin already did
    (a resumed run has loaded trained weights by then, so it keeps the folder its first run wrote). on_save: finish
    the checkpoint (`export` off: only restore what the save left out, see export.finish_saved_adapter)."""

    def __init__(self, save_init: bool = True, export: bool = True) -> None:
        self.save_init, self.export = save_init, export

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        init_dir = Path(args.output_dir) / INIT_DIR
        refreeze_frozen_a(model)  # every rank, before the first step: PEFT's set_adapter turns lora_A's gradient on
        if not self.save_init or not is_initialized(model):
            return
        # By now DeepSpeed ZeRO-3 has partitioned the adapter (each rank holds a slice, the module an empty
        # tensor): every rank takes part in gathering it, rank 0 writes it whole.
        with gathered([param for name, param in model.named_parameters() if ".lora_" in name]):
            if rank_and_world()[0] != 0:
                return
            if state.global_step == 0:
                save_initial_adapter(model, init_dir, overwrite=True)
            elif not (init_dir / METADATA_FILE).is_file():
                raise LoraNullError(
                    f"Resuming a LoRA-Null run needs {init_dir}, written when the run started; it "
                    "is gone. Start the run again from step 0."
                )

    def on_save(self, args, state, control, model=None, **kwargs):
        if not is_initialized(model) or rank_and_world()[0] != 0:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        finish_saved_adapter(checkpoint, Path(args.output_dir) / INIT_DIR, final=False, export=self.export)
