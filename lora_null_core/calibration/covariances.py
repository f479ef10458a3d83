"""The covariance of each targeted layer's input, summed by a visitor of the calibration pass (taps.py)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..distributed import all_reduce_sum_, rank_and_world
from ..errors import InsufficientCalibrationError, NonFiniteActivationsError, UnsupportedModelError
from .batches import TokenBatch
from .taps import LayerInput, run_activation_pass

logger = logging.getLogger(__name__)


@dataclass
class Covariances:
    """Σ w² x xᵀ per distinct layer input. Layers that read the same tensor share one entry."""

    matrices: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    group_of: dict[str, str] = field(default_factory=dict)  # module name → key in `matrices`

    def of(self, module_name: str) -> torch.Tensor:
        return self.matrices[self.group_of[module_name]]


def gram_panels(d: int, min_rows: int = 1024, most: int = 8) -> list[slice]:
    """Row panels for summing xᵀx by halves: it is symmetric, so only each panel's block on and right of the
    diagonal is summed, (k + 1) / 2k of the flops for k panels (56 % for 8; the sums cost as much as the
    block's own forward on a Llama). One panel, the whole matrix, below 2·min_rows."""
    count = min(most, d // min_rows)
    if count < 2:
        return [slice(0, d)]
    bounds = [round(i * d / count) for i in range(count + 1)]
    return [slice(start, stop) for start, stop in itertools.pairwise(bounds)]


def add_gram_(matrix: torch.Tensor, x: torch.Tensor, panels: list[slice] | None = None) -> None:
    """matrix += xᵀx, on and right of the diagonal blocks of `panels` (default: one panel, all of it; with
    several, `mirror_panels_` completes the matrix). No d×d temporary (462 MiB for a 7B down_proj) where the GPU
    accumulates in place: bf16/fp16 inputs (exact in fp32) multiplied with fp32 accumulation, about 17× faster
    than upcasting first; elsewhere the inputs are upcast."""
    mixed = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and matrix.dtype == torch.float32
    if not mixed:
        x = x.to(matrix.dtype)
    for rows in panels or [slice(0, matrix.shape[0])]:
        left, right, target = x[:, rows].T, x[:, rows.start :], matrix[rows, rows.start :]
        if mixed:
            try:
                torch.addmm(target, left, right, out_dtype=torch.float32, out=target)
                continue
            except (TypeError, RuntimeError, NotImplementedError):  # torch without the mixed-dtype addmm
                mixed, x = False, x.to(matrix.dtype)
                left, right = x[:, rows].T, x[:, rows.start :]
        target.addmm_(left, right)


def mirror_panels_(matrix: torch.Tensor, panels: list[slice]) -> None:
    """Fill the blocks left of the diagonal from those right of it, after `add_gram_` with these panels."""
    for rows in panels[:-1]:
        matrix[rows.stop :, rows].copy_(matrix[rows, rows.stop :].T)


class CovarianceCollector:
    """Visitor accumulating plain fp32/fp64 sums (no running mean: it drifts) with token counts. Wide inputs are
    summed by panels, on and right of the diagonal; `result` mirrors the rest in when read."""

    def __init__(self, dtype: torch.dtype = torch.float32, weighting: str = "token_sum") -> None:
        self.dtype = dtype
        self.weighting = weighting
        self._result = Covariances()
        self._panels: dict[str, list[slice]] = {}
        self._unmirrored: set[str] = set()

    @property
    def result(self) -> Covariances:
        """The sums so far, every matrix complete."""
        for name in self._unmirrored:
            mirror_panels_(self._result.matrices[name], self._panels[name])
        self._unmirrored.clear()
        return self._result

    def __call__(self, name: str, inputs: LayerInput, same_as: str | None) -> None:
        result = self._result
        groups = result.group_of
        if same_as is not None:
            if groups.setdefault(name, groups[same_as]) != groups[same_as]:
                raise UnsupportedModelError(f"{name} changed which input it shares between batches.")
            return
        if groups.setdefault(name, name) != name:
            raise UnsupportedModelError(f"{name} shared its input in one batch but not in another.")
        if self.weighting == "per_sample_max":
            x, sample_ids = inputs.tokens.to(self.dtype), inputs.sample_ids
            # The authors' reference scales each sample by 1 / |max(x)| before the outer product.
            peak = torch.full((inputs.mask.shape[0],), float("-inf"), dtype=x.dtype, device=x.device)
            peak = peak.scatter_reduce(0, sample_ids, x.amax(dim=1), reduce="amax")
            x = x / peak.abs().clamp_min(torch.finfo(x.dtype).tiny)[sample_ids].unsqueeze(1)
        else:
            x = inputs.masked  # padding rows are zero and add nothing to xᵀx
        matrix = result.matrices.get(name)
        if matrix is None:
            matrix = result.matrices[name] = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
            result.tokens[name] = result.samples[name] = 0
            self._panels[name] = gram_panels(x.shape[1])
        add_gram_(matrix, x, self._panels[name])
        if len(self._panels[name]) > 1:
            self._unmirrored.add(name)
        result.tokens[name] += inputs.num_tokens
        result.samples[name] += inputs.num_samples


def collect_covariances(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[TokenBatch],
    dtype: torch.dtype = torch.float32,
    weighting: str = "token_sum",
) -> Covariances:
    """Input covariance of every module in `modules`, one shared entry per distinct input tensor."""
    collector = CovarianceCollector(dtype, weighting)
    run_activation_pass(model, modules, batches, collector)
    return finalize_covariances(collector.result, modules, weighting)


def finalize_covariances(result: Covariances, modules: Mapping[str, nn.Module], weighting: str) -> Covariances:
    """Sum over processes, then refuse missing or non-finite entries."""
    _all_reduce(result)
    missing = sorted(set(modules) - set(result.group_of))
    if missing:
        raise UnsupportedModelError(f"These target modules were never called during calibration: {', '.join(missing)}.")
    for key, matrix in result.matrices.items():
        if not torch.isfinite(matrix).all():
            raise NonFiniteActivationsError(
                f"Inputs of {key} contain NaN or Inf during calibration. Load the model in float32 or bfloat16 "
                "(float16 overflows in many models) and check the calibration text."
            )
        if weighting == "per_sample_max":
            matrix /= result.samples[key]
    logger.debug("Collected %d distinct covariances for %d modules.", len(result.matrices), len(modules))
    return result


def _all_reduce(covariances: Covariances) -> None:
    """Sum every process's share of the calibration data (no-op in a single process)."""
    if rank_and_world()[1] == 1:
        return
    keys = sorted(covariances.matrices)
    for key in keys:
        all_reduce_sum_(covariances.matrices[key])
    device = covariances.matrices[keys[0]].device
    counts = torch.tensor(
        [[covariances.tokens[k], covariances.samples[k]] for k in keys], dtype=torch.float64, device=device
    )
    all_reduce_sum_(counts)
    for key, (tokens, samples) in zip(keys, counts.tolist(), strict=True):
        covariances.tokens[key], covariances.samples[key] = int(tokens), int(samples)


def check_token_counts(covariances: Covariances, min_tokens_per_dim: float) -> None:
    """Refuse layers whose covariance cannot have full rank: their null space would be set by rounding."""
    for key, matrix in covariances.matrices.items():
        needed = int(min_tokens_per_dim * matrix.shape[0])
        if covariances.tokens[key] < needed:
            raise InsufficientCalibrationError(
                f"{key} has input width {matrix.shape[0]} but calibration gave only {covariances.tokens[key]} "
                f"tokens (need at least {needed}). Give more knowledge text, leave short_calibration at top_up (the "
                "model's own text makes up the rest), or lower min_tokens_per_dim (0 disables the check) if a "
                "rank-deficient covariance is what you want."
            )
