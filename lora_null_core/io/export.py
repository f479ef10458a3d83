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
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import StrPath, atomic_output_dir, check_output
from ..config import literal_choices
from ..errors import ExportError
from ..layout import (
    ADAPTER_DIR,
    CONFIG_FILE,
    EXPORT_MARKER,
    WEIGHTS_FILE,
)
from ..report import file_sha256, read_metadata, trains_on_residual

logger = logging.getLogger(__name__)

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


def read_adapter(folder: StrPath) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
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
    init_dir: StrPath, trained_adapter: StrPath, output_dir: StrPath, overwrite: bool = False
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
    b_zero = all(not tensor.any() for key, tensor in initial.items() if key.endswith(LORA_B))
    if trains_on_residual(metadata) == b_zero:
        raise ExportError(
            f"{init_dir / 'lora_null.json'} says init={metadata['init']!r}, train_base="
            f"{metadata.get('train_base', 'residual')!r} but its adapter's lora_B is "
            f"{'zero' if b_zero else 'not zero'}: the record was edited or belongs to another init."
        )


def check_same_scaling(initial: dict[str, Any], trained: dict[str, Any], trained_adapter: StrPath) -> None:
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
    keys = [k for k in initial if k.endswith(LORA_A) and k in trained and trained[k].shape == initial[k].shape]
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
    prefixes = sorted(key[: -len(LORA_A)] for key in initial if key.endswith(LORA_A))
    extra = sorted({key[: -len(LORA_A)] for key in trained if key.endswith(LORA_A)} - set(prefixes))
    if extra:
        raise ExportError(
            f"The trained adapter has {len(extra)} layer(s) the initialization never wrote, e.g. {extra[0]}; their "
            "factors would be dropped. --adapter must be a checkpoint of the adapter written by this --init-dir."
        )
    missing = [p for p in prefixes if p + LORA_A not in trained or p + LORA_B not in trained]
    if missing:
        raise ExportError(
            f"The trained adapter lacks {len(missing)} layer(s) of the initialization, e.g. {missing[0]}; "
            "--adapter must be a checkpoint of the adapter written by this --init-dir."
        )
    for p in prefixes:
        if (
            trained[p + LORA_A].shape != initial[p + LORA_A].shape
            or trained[p + LORA_B].shape != initial[p + LORA_B].shape
        ):
            raise ExportError(f"{p}: trained factors have other shapes than the initialization's (rank changed?).")
    if not trains_on_residual(metadata):  # base untouched: the trained adapter already is the LoRA for it
        return dict(trained), 1
    # Frozen means unchanged up to the dtype the trainer stored it in (a bf16 copy of A₀ still counts;
    # the rank-r form then differs from exact by s·B₀·(A − A₀), rounding of A₀ itself).
    frozen_a = all(
        torch.equal(trained[p + LORA_A], initial[p + LORA_A].to(trained[p + LORA_A].dtype)) for p in prefixes
    )
    out = {k: v for k, v in trained.items() if not (k.endswith(LORA_A) or k.endswith(LORA_B))}
    for p in prefixes:
        a, b, a0, b0 = trained[p + LORA_A], trained[p + LORA_B], initial[p + LORA_A], initial[p + LORA_B]
        dtype = b.dtype
        if frozen_a:
            out[p + LORA_A] = a.clone()
            out[p + LORA_B] = (b.double() - b0.double()).to(dtype)
        else:
            out[p + LORA_A] = torch.cat([a, a0.to(a.dtype)], dim=0).contiguous()
            out[p + LORA_B] = torch.cat([b, -b0.to(dtype)], dim=1).contiguous()
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
