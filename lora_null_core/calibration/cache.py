"""Calibration covariances on disk, so a second run with another rank, variant or init skips calibration.

An entry is a folder named by a hash of everything the covariances depend on: the model's weights (a
fingerprint of every tensor: name, shape, dtype, float64 sum and strided samples), the calibration tokens,
and the settings that change the sums (accumulation dtype, weighting). It holds one safetensors file per
part (one per decoder block when streaming) and index.json; it appears only once complete, so an
interrupted run leaves nothing behind that a later run could mistake for a hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_output_dir
from ..config import LoraNullConfig
from ..distributed import all_reduce_sum_, rank_and_world
from ..peft_names import base_name, is_adapter_parameter
from .batches import TokenBatch
from .covariances import Covariances

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: the index records each file's size and CRC-32
_SAMPLES_PER_TENSOR = 1024


def weights_fingerprint(model: nn.Module) -> str | None:
    """Hash of the base model's weights, or None if any is not materialized (meta device).

    LoRA tensors are left out and PEFT's `.base_layer` unwrapped, so the same weights give the same hash
    whichever modules are targeted. The sum covers every element; the samples catch permutations."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if is_adapter_parameter(name):
            continue
        if param.is_meta:
            return None
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        samples = flat[::step][:_SAMPLES_PER_TENSOR].float().cpu()
        total = float(torch.sum(flat, dtype=torch.float64)) if flat.is_floating_point() else int(flat.sum())
        digest.update(f"{base_name(name)}|{tuple(param.shape)}|{param.dtype}|{total!r}|".encode())
        digest.update(samples.numpy().tobytes())
    return digest.hexdigest()


def tokens_fingerprint(batches: Sequence[TokenBatch]) -> str:
    """Hash of the real (non-padding) tokens of every sample: batch size and padding do not change it."""
    digest = hashlib.sha256()
    for batch in batches:
        for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
            digest.update(ids[mask.bool()].to(torch.int64).numpy().tobytes())
            digest.update(b"|")
    return digest.hexdigest()


def file_crc32(path: Path) -> int:
    """CRC-32 of a file (3 GB/s): catches zeroed or flipped bytes that a safetensors header would not."""
    crc = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


class CovarianceCache:
    """One cache entry: `has` and `load` for a hit, `writing` to fill it on a miss."""

    def __init__(self, root: Path, key: str, description: dict) -> None:
        self.folder = Path(root) / key
        self.description = description

    @classmethod
    def open(
        cls, root: str | None, model: nn.Module, batches: Sequence[TokenBatch], config: LoraNullConfig
    ) -> CovarianceCache | None:
        """The entry for this model, data and settings; None without a root or with unmaterialized weights."""
        if not root:
            return None
        weights = weights_fingerprint(model)
        if weights is None:
            logger.warning("Covariance cache not used: some weights are not materialized (meta device).")
            return None
        description = {
            "format": FORMAT,
            "weights": weights,
            "tokens": tokens_fingerprint(batches),
            "accumulate_dtype": config.accumulate_dtype,
            "covariance_weighting": config.covariance_weighting,
        }
        key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
        model_name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
        return cls(
            Path(root), key, {**description, "model": model_name, "samples": sum(len(b.input_ids) for b in batches)}
        )

    def has(self, module_names: Sequence[str], device: torch.device) -> bool:
        """True if the entry holds every module's covariance, intact, on every process (all must agree, or the
        ones that calibrate would wait forever for the others in the all-reduce). A damaged entry (a file whose
        size or CRC-32 differs from the index) counts as missing: it is recomputed and written again."""
        index = self._index()
        present = index is not None and set(module_names) <= set(index["group_of"]) and self._intact(index)
        if rank_and_world()[1] > 1:
            missing = torch.tensor([0.0 if present else 1.0], device=device)
            present = float(all_reduce_sum_(missing)) == 0
        if present:
            logger.info("Covariances read from the cache %s: calibration skipped.", self.folder)
        return present

    def load(self, modules: Mapping[str, nn.Module], device: torch.device | None = None) -> Covariances:
        """The covariances of `modules`, each on `device` or else on its module's device."""
        index = self._index()
        if index is None:
            raise FileNotFoundError(f"{self.folder} holds no covariance cache entry (see has() first)")
        result = Covariances()
        for name, module in modules.items():
            group = index["group_of"][name]
            result.group_of[name] = group
            if group in result.matrices:
                continue
            entry = index["groups"][group]
            target = device or next(module.parameters()).device
            with safe_open(self.folder / entry["file"], framework="pt", device=str(target)) as handle:
                result.matrices[group] = handle.get_tensor(group)
            result.tokens[group], result.samples[group] = entry["tokens"], entry["samples"]
        return result

    @contextlib.contextmanager
    def writing(self) -> Iterator[_Writer]:
        """A writer for the parts; the entry appears when the block ends without error (rank 0 only)."""
        if rank_and_world()[0] != 0:
            yield _Writer(None)
            return
        with atomic_output_dir(self.folder, overwrite=True) as staging:
            writer = _Writer(staging)
            yield writer
            index = {**self.description, "group_of": writer.group_of, "groups": writer.groups, "files": writer.files}
            (staging / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        logger.info("Covariances cached in %s.", self.folder)

    def _index(self) -> dict | None:
        path = self.folder / "index.json"
        if not path.is_file():
            return None
        try:
            index = json.loads(path.read_text())
        except ValueError:
            logger.warning("Covariance cache index %s is damaged: recomputing the covariances.", path)
            return None
        return index if isinstance(index, dict) and index.get("format") == FORMAT else None

    def _intact(self, index: dict) -> bool:
        for file, expected in index.get("files", {}).items():
            path = self.folder / file
            if not path.is_file() or path.stat().st_size != expected["bytes"] or file_crc32(path) != expected["crc32"]:
                logger.warning(
                    "Covariance cache file %s is damaged (size or checksum): recomputing the covariances.", path
                )
                return False
        return bool(index.get("files"))


class _Writer:
    def __init__(self, staging: Path | None) -> None:
        self.staging = staging
        self.group_of: dict[str, str] = {}
        self.groups: dict[str, dict] = {}
        self.files: dict[str, dict] = {}

    def add(self, part: str, covariances: Covariances) -> None:
        if self.staging is None:
            return
        file = f"{part}.safetensors"
        tensors = {group: matrix.detach().contiguous().cpu() for group, matrix in covariances.matrices.items()}
        save_file(tensors, str(self.staging / file), metadata={"format": str(FORMAT)})
        path = self.staging / file
        self.files[file] = {"bytes": path.stat().st_size, "crc32": file_crc32(path)}
        self.group_of.update(covariances.group_of)
        for group in covariances.matrices:
            self.groups[group] = {
                "file": file,
                "tokens": covariances.tokens[group],
                "samples": covariances.samples[group],
            }
