"""From an adapter trained on the residual base to results that run on the untouched original model.

On the residual base the trained model computes W_res + s·B·A, and W_res = W − s·B₀·A₀, so on the original
weights it is W + s·(B·A − B₀·A₀):
- v2 (A frozen, A = A₀): s·(B − B₀)·A₀, a standard LoRA of rank r;
- v1: s·[B, −B₀]·[A; A₀], a standard LoRA of rank 2r (alpha scaled so s stays the same);
- basis init (B₀ = 0, base untouched): the trained adapter already is that LoRA.
Pure tensor work on the adapter files: no model is loaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_output_dir, check_output
from ..config import literal_choices
from ..console import quiet_libraries
from ..errors import ExportError
from ..layout import (
    ADAPTER_DIR,
    BASE_DIR,
    CONFIG_FILE,
    EXPORT_DIR,
    EXPORT_MARKER,
    MERGE_MARKER,
    RESIDUAL_ADAPTER_DIR,
    RESIDUAL_MARKER,
    WEIGHTS_FILE,
)
from ..report import file_sha256, read_metadata, trains_on_residual
from .saving import load_model, load_tokenizer, name_base

logger = logging.getLogger(__name__)

_A, _B = ".lora_A.weight", ".lora_B.weight"


def read_adapter(folder: os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and the safetensors weights of a PEFT adapter folder (never a pickle)."""
    folder = Path(folder)
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not config.is_file():
        raise ExportError(f"{folder} is not a PEFT adapter folder: {CONFIG_FILE} is missing.")
    if not weights.is_file():
        hint = (
            " It holds a pickled adapter_model.bin, which lora-null will not load;"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise ExportError(f"{weights} is missing.{hint} Save the adapter with safetensors (PEFT's default).")
    try:
        return json.loads(config.read_text()), load_file(str(weights))
    except (ValueError, UnicodeDecodeError, SafetensorError) as err:
        raise ExportError(f"{folder} is damaged ({err}); point at an adapter folder the trainer saved whole.") from err


def export_for_original_base(
    init_dir: os.PathLike, trained_adapter: os.PathLike, output_dir: os.PathLike, overwrite: bool = False
) -> Path:
    """Write a PEFT adapter that, on the original base model, reproduces the trained model exactly."""
    check_output(output_dir, [init_dir, trained_adapter], overwrite, may_nest_in=[trained_adapter])
    if (Path(trained_adapter) / EXPORT_MARKER).is_file():
        raise ExportError(
            f"{trained_adapter} is already an export for the original model (it holds {EXPORT_MARKER}); exporting it "
            "again would subtract the initial factors twice. --adapter must be the adapter trained on OUT/base."
        )
    metadata = read_metadata(Path(init_dir))
    initial_config, initial = read_adapter(Path(init_dir) / ADAPTER_DIR)
    check_init_consistent(metadata, initial, Path(init_dir))
    config, trained = read_adapter(trained_adapter)
    check_same_scaling(initial_config, config, trained_adapter)
    weights, rank_factor = convert_weights(initial, trained, metadata)  # checks the layers match first
    check_frozen_a_is_the_inits(initial, trained, metadata, Path(init_dir), Path(trained_adapter))
    config = scaled_config(config, rank_factor, metadata.get("model", ""))
    with atomic_output_dir(output_dir, overwrite) as staging:
        save_file(weights, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        provenance = {
            "init": str(Path(init_dir).resolve()),
            "adapter": str(Path(trained_adapter).resolve()),
            "rank_factor": rank_factor,
            "variant": metadata["variant"],
            "init_mode": metadata["init"],
        }
        (staging / EXPORT_MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
    logger.info("Exported a rank-%d adapter for the original base to %s.", config["r"], output_dir)
    return Path(output_dir)


def finish_saved_adapter(
    adapter_dir: os.PathLike, init_dir: os.PathLike, final: bool, export: bool = True
) -> Optional[Path]:
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
    missing = [key for key in initial if key.endswith(_A) and (key not in saved or saved[key].numel() == 0)]
    if not missing:
        return
    if metadata.get("variant") != "v2":
        raise ExportError(
            f"{weights} lacks {len(missing)} lora_A weight(s) (e.g. {missing[0]}) that variant "
            f"{metadata.get('variant')} trains: the trainer's save is incomplete. Save with the frozen "
            "parameters included, or train v2 (its lora_A is the init's and is restored from it)."
        )
    dtype = next((t.dtype for key, t in saved.items() if key.endswith(_B)), initial[missing[0]].dtype)
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


def check_init_consistent(metadata: dict[str, Any], initial: dict[str, torch.Tensor], init_dir: Path) -> None:
    """The init folder's record and its adapter must agree: an edited lora_null.json or a swapped adapter
    would give a wrong export with no other sign."""
    choices = literal_choices()
    if metadata.get("variant") not in choices["variant"] or metadata.get("init") not in choices["init"]:
        raise ExportError(
            f"{init_dir / 'lora_null.json'} records variant={metadata.get('variant')!r}, "
            f"init={metadata.get('init')!r}: not a LoRA-Null init (v1/v2, projected/basis). Re-run init."
        )
    recorded = metadata.get("adapter_sha256")
    if recorded and recorded != file_sha256(init_dir / ADAPTER_DIR / WEIGHTS_FILE):
        raise ExportError(
            f"{init_dir / ADAPTER_DIR / WEIGHTS_FILE} is not the adapter this init wrote (its checksum "
            "differs from lora_null.json's). Re-run init, or point --init-dir at the folder that wrote it."
        )
    b_zero = all(not tensor.any() for key, tensor in initial.items() if key.endswith(_B))
    if trains_on_residual(metadata) == b_zero:
        raise ExportError(
            f"{init_dir / 'lora_null.json'} says init={metadata['init']!r}, train_base="
            f"{metadata.get('train_base', 'residual')!r} but its adapter's lora_B is "
            f"{'zero' if b_zero else 'not zero'}: the record was edited or belongs to another init."
        )


def check_same_scaling(initial: dict[str, Any], trained: dict[str, Any], trained_adapter: os.PathLike) -> None:
    """The trained adapter must use the init's rank and scaling: B₀·A₀ is subtracted at the init's scale."""
    for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
        if (initial.get(key) or None) != (trained.get(key) or None):
            raise ExportError(
                f"{trained_adapter} has {key}={trained.get(key)!r} but the init used {initial.get(key)!r}: train the "
                "adapter that init wrote (OUT/adapter) without changing its rank or alpha."
            )


def check_frozen_a_is_the_inits(
    initial: dict[str, torch.Tensor],
    trained: dict[str, torch.Tensor],
    metadata: dict[str, Any],
    init_dir: Path,
    trained_adapter: Path,
) -> None:
    """v2 keeps lora_A frozen, so a v2 adapter trained on the residual base holds this init's A (up to the dtype the
    trainer stored it in). Another one is another init's adapter (same rank and targets, another seed or data):
    subtracting this init's B₀·A₀ from it would give a wrong model with no other sign."""
    if metadata.get("variant") != "v2" or not trains_on_residual(metadata):
        return
    keys = [k for k in initial if k.endswith(_A) and k in trained and trained[k].shape == initial[k].shape]
    moved = [k for k in keys if not torch.equal(trained[k], initial[k].to(trained[k].dtype))]
    if moved:
        change = float(
            torch.linalg.norm(trained[moved[0]].double() - initial[moved[0]].double())
            / torch.linalg.norm(initial[moved[0]].double())
        )
        raise ExportError(
            f"{trained_adapter} is not an adapter trained from the init in {init_dir}: its frozen lora_A differs from "
            f"the one that init wrote in {len(moved)} of {len(keys)} layers (e.g. {moved[0]}, relative difference "
            f"{change:.3g}). Point --init-dir at the folder whose adapter was trained; if lora_A was trained on "
            "purpose, the init should have been v1."
        )


def convert_weights(
    initial: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], metadata: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], int]:
    """Adapter tensors for the original base, and the rank multiplier (1 or 2) they use."""
    prefixes = sorted(key[: -len(_A)] for key in initial if key.endswith(_A))
    extra = sorted({key[: -len(_A)] for key in trained if key.endswith(_A)} - set(prefixes))
    if extra:
        raise ExportError(
            f"The trained adapter has {len(extra)} layer(s) the initialization never wrote, e.g. {extra[0]}; their "
            "factors would be dropped. --adapter must be a checkpoint of the adapter written by this --init-dir."
        )
    missing = [p for p in prefixes if p + _A not in trained or p + _B not in trained]
    if missing:
        raise ExportError(
            f"The trained adapter lacks {len(missing)} layer(s) of the initialization, e.g. {missing[0]}; "
            "--adapter must be a checkpoint of the adapter written by this --init-dir."
        )
    for p in prefixes:
        if trained[p + _A].shape != initial[p + _A].shape or trained[p + _B].shape != initial[p + _B].shape:
            raise ExportError(f"{p}: trained factors have other shapes than the initialization's (rank changed?).")
    if not trains_on_residual(metadata):  # base untouched: the trained adapter already is the LoRA for it
        return dict(trained), 1
    # Frozen means unchanged up to the dtype the trainer stored it in (a bf16 copy of A₀ still counts;
    # the rank-r form then differs from exact by s·B₀·(A − A₀), rounding of A₀ itself).
    frozen_a = all(torch.equal(trained[p + _A], initial[p + _A].to(trained[p + _A].dtype)) for p in prefixes)
    out = {k: v for k, v in trained.items() if not (k.endswith(_A) or k.endswith(_B))}
    for p in prefixes:
        a, b, a0, b0 = trained[p + _A], trained[p + _B], initial[p + _A], initial[p + _B]
        dtype = b.dtype
        if frozen_a:
            out[p + _A] = a.clone()
            out[p + _B] = (b.double() - b0.double()).to(dtype)
        else:
            out[p + _A] = torch.cat([a, a0.to(a.dtype)], dim=0).contiguous()
            out[p + _B] = torch.cat([b, -b0.to(dtype)], dim=1).contiguous()
    return out, 1 if frozen_a else 2


def scaled_config(config: dict[str, Any], rank_factor: int, base_model: str) -> dict[str, Any]:
    """The trained adapter's config with rank × factor and alpha raised so s = alpha / r (or / √r) is kept."""
    config = dict(config)
    alpha_factor = math.sqrt(rank_factor) if config.get("use_rslora") else rank_factor
    config["r"] = config["r"] * rank_factor
    config["lora_alpha"] = config["lora_alpha"] * alpha_factor
    config["rank_pattern"] = {k: v * rank_factor for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: v * alpha_factor for k, v in (config.get("alpha_pattern") or {}).items()}
    config["init_lora_weights"] = True
    if base_model:
        config["base_model_name_or_path"] = base_model
    return config


def merge_to_full_model(
    init_dir: os.PathLike,
    trained_adapter: os.PathLike,
    output_dir: os.PathLike,
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
