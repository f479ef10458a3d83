"""What an initialization did, in numbers: written as lora_null.json beside the adapter."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .layout import METADATA_FILE

FORMAT_VERSION = 1


@dataclass
class LayerReport:
    name: str
    d_in: int
    d_out: int
    rank: int
    covariance: str  # the module whose input this layer's covariance was taken at (shared by q/k/v, gate/up)
    tokens: int
    leakage: float  # on the calibration activations
    leakage_random: float  # a random A of the same norm, same activations
    leakage_holdout: float | None = None
    leakage_holdout_random: float | None = None


@dataclass
class InitReport:
    variant: str
    init: str
    adapter_name: str
    model: str
    lora: dict[str, Any]
    calibration: dict[str, Any]
    config: dict[str, Any]
    function_error: float  # relative change of the model's output on a calibration probe, after init
    layers: list[LayerReport] = field(default_factory=list)
    # "logits": of the whole model; "last_block_output": the last decoder block's output, the probe having gone
    # through every initialized block in turn (streaming: all targets lie inside the blocks).
    function_error_measure: str = "logits"
    # "residual": the base became W − s·B₀A₀ and the adapter starts at B₀ (export afterwards); "original": the base
    # is untouched and the adapter starts at B = 0, so what training saves is a LoRA for the original model.
    train_base: str = "residual"
    adapter_sha256: str | None = None  # of adapter/adapter_model.safetensors: export checks it is the same file
    format_version: int = FORMAT_VERSION

    def summary(self) -> dict[str, float | None]:
        """Means over layers (and the A scale used): the numbers a person reads first."""

        def mean(values: list[float | None]) -> float | None:
            kept = [v for v in values if v is not None]
            return sum(kept) / len(kept) if kept else None

        return {
            "function_error": self.function_error,
            "leakage_mean": mean([layer.leakage for layer in self.layers]),
            "leakage_random_mean": mean([layer.leakage_random for layer in self.layers]),
            "leakage_holdout_mean": mean([layer.leakage_holdout for layer in self.layers]),
            "leakage_holdout_random_mean": mean([layer.leakage_holdout_random for layer in self.layers]),
            "a_scale": recorded_a_scale(self.config),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}

    def write(self, folder: Path) -> Path:
        path = Path(folder) / METADATA_FILE
        path.write_text(json.dumps(json_safe(self.to_dict()), indent=2, allow_nan=False) + "\n")
        return path


def recorded_a_scale(config: dict[str, Any]) -> float:
    """The a_scale a record says was applied (every record since a_scale existed holds it; before, the paper's 1)."""
    return float(config.get("a_scale", 1.0))


def json_safe(value: Any) -> Any:
    """NaN and Inf become null: JSON has no such numbers, and other readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def trains_on_residual(metadata: dict[str, Any]) -> bool:
    """Whether an init's adapter was trained on the residual base (records from before train_base: projected)."""
    return metadata.get("init") == "projected" and metadata.get("train_base", "residual") == "residual"


def read_metadata(init_dir: Path) -> dict[str, Any]:
    from .errors import ExportError

    path = Path(init_dir) / METADATA_FILE
    if not path.is_file():
        raise ExportError(f"{path} not found: --init-dir must be the output folder of `lora-null init`.")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{path} is damaged ({err}); re-run `lora-null init` to write it again.") from err
    if not isinstance(metadata, dict) or "variant" not in metadata or "init" not in metadata:
        raise ExportError(f"{path} is not a LoRA-Null record (no variant/init); re-run `lora-null init`.")
    return metadata


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
