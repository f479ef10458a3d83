"""The trained model as full weights: the residual base and the trained adapter, merged, with the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import StrPath, atomic_output_dir, check_output
from ..console import quiet_libraries
from ..errors import ExportError
from ..layout import BASE_DIR, MERGE_MARKER, RESIDUAL_MARKER
from .export import read_adapter
from .saving import load_model, load_tokenizer


def merge_to_full_model(
    init_dir: StrPath,
    trained_adapter: StrPath,
    output_dir: StrPath,
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Full weights of the trained model (residual base + trained adapter, merged), with the tokenizer."""
    from peft import PeftModel

    check_output(output_dir, [init_dir, trained_adapter], overwrite)
    base_dir = Path(init_dir) / BASE_DIR
    if not (base_dir / "config.json").is_file():
        raise ExportError(f"{base_dir} holds no model: --init-dir must be a folder written by `lora-null init`.")
    read_adapter(trained_adapter)  # a missing, pickled or damaged adapter fails here, before the model loads
    with quiet_libraries():
        model = PeftModel.from_pretrained(load_model(str(base_dir), dtype=dtype), str(trained_adapter))
    merged = model.merge_and_unload()
    if hasattr(merged.config, RESIDUAL_MARKER):  # the merged weights are a whole model, no longer a residual
        delattr(merged.config, RESIDUAL_MARKER)
    with atomic_output_dir(output_dir, overwrite) as staging, quiet_libraries():
        merged.save_pretrained(staging)
        (staging / MERGE_MARKER).write_text(
            json.dumps({"init": str(Path(init_dir).resolve()), "adapter": str(Path(trained_adapter).resolve())}) + "\n"
        )
        if (base_dir / "tokenizer_config.json").exists():
            load_tokenizer(str(base_dir)).save_pretrained(staging)
    return Path(output_dir)
