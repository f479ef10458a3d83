"""What a trainer just saved, made right for the base its adapter_config.json names: v2's frozen lora_A put back
where the save left it out, and a v1 run's final folder exported for the original model."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ..atomic import StrPath, atomic_output_dir
from ..errors import ExportError
from ..layout import ADAPTER_DIR, CONFIG_FILE, EXPORT_DIR, EXPORT_MARKER, RESIDUAL_ADAPTER_DIR, WEIGHTS_FILE
from ..report import read_metadata, trains_on_residual
from .export import LORA_A, LORA_B, export_for_original_base, read_adapter
from .saving import name_base

logger = logging.getLogger(__name__)


def finish_saved_adapter(adapter_dir: StrPath, init_dir: StrPath, final: bool, export: bool = True) -> Path | None:
    """Make what a trainer just saved in `adapter_dir` right for the base its adapter_config.json names.

    First, always: a v2 lora_A the save left out is put back (see `restore_frozen_lora_a`). Trained on the
    original weights (v2, basis: the plugins' default) the folder then is a LoRA for the original model. Trained
    on the residual base (v1), unless `export` is off:
    - final folder: the export for the original model takes the top level, where merge, serving and hub tools
      look; the adapter as trained moves to `lora_null_residual_adapter/`, its config naming the residual base;
    - checkpoint: its adapter stays (resuming loads it), its config names the residual base so a loader that
      follows it cannot pick the original. Nothing is added to it: a trainer resuming from a checkpoint loads
      every adapter folder inside it as one more adapter. `lora-null export --init-dir <output_dir>/lora_null_init
      --adapter <checkpoint>` gives its LoRA for the original model.
    Returns the folder holding the LoRA for the original model; None while nothing is saved yet, and for a
    checkpoint trained on the residual.
    """
    adapter_dir, init_dir = Path(adapter_dir), Path(init_dir)
    if (adapter_dir / EXPORT_MARKER).is_file():
        return adapter_dir  # finished already (trainers may call twice)
    if not any((adapter_dir / name).exists() for name in (WEIGHTS_FILE, "adapter_model.bin")):
        return None
    metadata = read_metadata(init_dir)
    restore_frozen_lora_a(adapter_dir, init_dir, metadata)
    if not trains_on_residual(metadata) or not export:
        return adapter_dir
    residual_name = (
        f"lora-null residual base of {metadata.get('model') or 'the original model'} (rebuilt by the "
        "trainer's LoRA-Null init; not a model to load)"
    )
    if not final:
        read_adapter(adapter_dir)  # a pickled or damaged save is an error now, not when someone needs it
        name_base(adapter_dir, residual_name)
        return None
    exported = export_for_original_base(init_dir, adapter_dir, adapter_dir / EXPORT_DIR, overwrite=True)
    kept = adapter_dir / RESIDUAL_ADAPTER_DIR
    with atomic_output_dir(kept, overwrite=True) as staging:
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            os.replace(adapter_dir / name, staging / name)
        name_base(staging, residual_name)
    for item in exported.iterdir():
        os.replace(item, adapter_dir / item.name)
    exported.rmdir()
    logger.info(
        "LoRA-Null: %s now holds the adapter for the original model (rank %d); the adapter as trained on "
        "the residual base is in %s.",
        adapter_dir,
        json.loads((adapter_dir / CONFIG_FILE).read_text())["r"],
        kept,
    )
    return adapter_dir


def restore_frozen_lora_a(adapter_dir: Path, init_dir: Path, metadata: dict[str, Any]) -> None:
    """Put v2's frozen lora_A back into a saved adapter that lacks it.

    Under DeepSpeed ZeRO-3, Transformers' Trainer saves a PEFT model's trainable parameters only
    (`exclude_frozen_parameters=True`), so v2's lora_A never reaches the file, and PEFT would load it from its own
    random init: another model (TRL on GPUs: output rel. err 0.53). A save that did not gather a partitioned
    parameter holds an empty tensor instead, which counts as left out too. Frozen, it still equals the init's A,
    which is written in the dtype of the saved factors, as a whole save would hold it. A trainable lora_A (v1)
    missing is an error."""
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        return
    saved = load_file(str(weights))
    _, initial = read_adapter(init_dir / ADAPTER_DIR)
    missing = [key for key in initial if key.endswith(LORA_A) and (key not in saved or saved[key].numel() == 0)]
    if not missing:
        return
    if metadata.get("variant") != "v2":
        raise ExportError(
            f"{weights} lacks {len(missing)} lora_A weight(s) (e.g. {missing[0]}) that variant "
            f"{metadata.get('variant')} trains: the trainer's save is incomplete. Save with the frozen "
            "parameters included, or train v2 (its lora_A is the init's and is restored from it)."
        )
    dtype = next((t.dtype for key, t in saved.items() if key.endswith(LORA_B)), initial[missing[0]].dtype)
    saved.update({key: initial[key].to(dtype) for key in missing})
    staging = weights.with_name(f".{WEIGHTS_FILE}.partial")
    save_file(saved, str(staging), metadata={"format": "pt"})
    os.replace(staging, weights)
    logger.info(
        "LoRA-Null: %s held no lora_A (the trainer saved trainable parameters only, as under DeepSpeed "
        "ZeRO-3); v2's frozen lora_A restored from %s for %d layers.",
        adapter_dir,
        init_dir,
        len(missing),
    )
