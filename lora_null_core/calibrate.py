"""The pass over calibration data: hooks on the targeted layers' inputs, and the covariance they feed.

The pass knows nothing of the method; a *visitor* receives each layer's non-padding input tokens. The
covariance visitor is one; held-out leakage (leakage.py) is another.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .console import progress
from .data import TokenBatch
from .distributed import all_reduce_sum_, rank_and_world
from .errors import InsufficientCalibrationError, NonFiniteActivationsError, UnsupportedModelError

logger = logging.getLogger(__name__)


class LayerInput:
    """One layer's input for one batch, as visitors read it.

    `masked` holds every position with padding rows zeroed: sums over it (x xᵀ, ‖A x‖²) equal the sums over the
    real tokens, and it needs no host synchronisation, so the GPU never waits inside a hook. `tokens` and
    `sample_ids` hold the real tokens alone (boolean indexing: one host sync), for visitors that need rows.
    `num_tokens` and `num_samples` come from the batch on the host.
    """

    def __init__(self, raw: torch.Tensor, mask: torch.Tensor, num_tokens: int, num_samples: int, name: str) -> None:
        self.raw, self.mask, self.name = raw, mask, name
        self.num_tokens, self.num_samples = num_tokens, num_samples
        self._masked: Optional[torch.Tensor] = None
        self._rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def masked(self) -> torch.Tensor:
        if self._masked is None:
            flat = _rows_by_position(self.raw, self.mask, self.name)
            self._masked = flat * self.mask.reshape(-1, 1).to(flat.dtype)
        return self._masked

    @property
    def tokens(self) -> torch.Tensor:
        return self._real_rows()[0]

    @property
    def sample_ids(self) -> torch.Tensor:
        return self._real_rows()[1]

    def _real_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:
            self._rows = non_padding_tokens(self.raw, self.mask, self.name)
        return self._rows


# visit(module_name, inputs, same_as): same_as names the first module that read the very same input tensor in
# this forward pass (q/k/v, gate/up), so a visitor can reuse its work.
Visitor = Callable[[str, LayerInput, Optional[str]], None]


def model_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


class InputTaps:
    """Forward pre-hooks on `modules` that show `visit` each module's input (a LayerInput).

    Used as a context manager; call `set_batch(mask, counts)` before each forward so padding can be dropped.
    `visit` may be swapped between batches (calibration sums, then held-out leakage).
    """

    def __init__(self, modules: Mapping[str, nn.Module], visit: Visitor) -> None:
        self.modules, self.visit = modules, visit
        self._handles: list = []
        self._mask: Optional[torch.Tensor] = None
        self._counts = (0, 0)
        self._last: tuple = (None, None, None)  # raw input, leader name, its LayerInput

    def set_batch(self, mask: torch.Tensor, counts: Optional[tuple[int, int]] = None) -> None:
        """`counts`: (real tokens, samples) of the batch, known on the host; from `mask` otherwise."""
        self._mask, self._last = mask.bool(), (None, None, None)
        self._counts = counts if counts is not None else batch_counts(mask)

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            raw = args[0]
            last_raw, leader, inputs = self._last
            if raw is last_raw:
                self.visit(name, inputs, leader)
                return
            if self._mask.device != raw.device:
                self._mask = self._mask.to(raw.device)
            inputs = LayerInput(raw, self._mask, *self._counts, name)
            # Holding `raw` keeps its storage alive, so identity really means "the same tensor".
            self._last = (raw, name, inputs)
            self.visit(name, inputs, None)

        return hook

    def __enter__(self) -> InputTaps:
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._last = [], (None, None, None)


def batch_counts(mask: torch.Tensor) -> tuple[int, int]:
    """(real tokens, samples with a token) of a padding mask."""
    real = mask.bool()
    return int(real.sum()), int(real.any(dim=1).sum())


def input_device(model: nn.Module) -> torch.device:
    """Where token ids must go: the input embedding's device (which may differ from the blocks')."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings.weight.device if embeddings is not None else model_device(model)


def run_activation_pass(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[TokenBatch],
    visit: Visitor,
    desc: str = "calibration",
) -> None:
    """Run every batch through `model` (no grad, eval mode) and show `visit` each module's input tokens."""
    was_training = model.training
    device = input_device(model)
    model.eval()
    try:
        extra = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}  # a 16k-token batch × 128k vocab
        with torch.no_grad(), InputTaps(modules, visit) as taps:
            for batch in progress(list(batches), desc, "batch"):
                taps.set_batch(batch.attention_mask, batch_counts(batch.attention_mask))  # on the CPU: no sync
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                      use_cache=False, **extra)
    finally:
        model.train(was_training)


def _takes_logits_to_keep(model: nn.Module) -> bool:
    """The pass needs the layers' inputs, not the logits: transformers' causal LMs can skip all but one position."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _rows_by_position(raw: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """(batch·seq, d_in): a layer input laid out one row per mask position."""
    batch, seq = mask.shape
    if raw.dim() == 3 and raw.shape[:2] == mask.shape:
        return raw.reshape(batch * seq, raw.shape[-1])
    if raw.dim() == 2 and raw.shape[0] == batch * seq:
        return raw
    raise _misaligned(raw, mask, name)


def _misaligned(raw: torch.Tensor, mask: torch.Tensor, name: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"Input of {name} has shape {tuple(raw.shape)}, which does not line up with the batch {tuple(mask.shape)}, "
        "so padding cannot be masked. Layers that see packed or reshaped tokens cannot be calibrated; leave them "
        "out of target_modules."
    )


def non_padding_tokens(raw: torch.Tensor, mask: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d_in) rows of a layer input that belong to real tokens, and the sample each came from."""
    batch, seq = mask.shape
    sample_of = torch.arange(batch, device=mask.device).unsqueeze(1).expand(batch, seq)
    if raw.dim() == 3 and raw.shape[:2] == mask.shape:
        return raw[mask], sample_of[mask]
    if raw.dim() == 2 and raw.shape[0] == batch * seq:
        flat = mask.reshape(-1)
        return raw[flat], sample_of.reshape(-1)[flat]
    raise _misaligned(raw, mask, name)


@dataclass
class Covariances:
    """Σ w² x xᵀ per distinct layer input. Layers that read the same tensor share one entry."""

    matrices: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    group_of: dict[str, str] = field(default_factory=dict)  # module name → key in `matrices`

    def of(self, module_name: str) -> torch.Tensor:
        return self.matrices[self.group_of[module_name]]


def add_gram_(matrix: torch.Tensor, x: torch.Tensor) -> None:
    """matrix += xᵀx without a d×d temporary (462 MiB for a 7B down_proj) where the GPU can accumulate in
    place: bf16/fp16 inputs, fp32 sums, as `gram` does; elsewhere through `gram`."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and matrix.dtype == torch.float32:
        try:
            torch.addmm(matrix, x.T, x, out_dtype=torch.float32, out=matrix)
            return
        except (TypeError, RuntimeError, NotImplementedError):  # torch without the mixed-dtype addmm
            pass
    matrix += gram(x, matrix.dtype)


def gram(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """xᵀx summed in `dtype`. bf16/fp16 activations are exact in fp32, so on a GPU the product runs on
    half-precision inputs with fp32 accumulation (about 17× faster than upcasting first, same values up to
    summation order); everywhere else the inputs are upcast."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32:
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32)
        except TypeError:  # torch without out_dtype
            pass
    x = x.to(dtype)
    return x.T @ x


class CovarianceCollector:
    """Visitor accumulating plain fp32/fp64 sums (no running mean: it drifts) with token counts."""

    def __init__(self, dtype: torch.dtype = torch.float32, weighting: str = "token_sum") -> None:
        self.dtype = dtype
        self.weighting = weighting
        self.result = Covariances()

    def __call__(self, name: str, inputs: LayerInput, same_as: Optional[str]) -> None:
        groups = self.result.group_of
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
        matrix = self.result.matrices.get(name)
        if matrix is None:
            matrix = self.result.matrices[name] = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
            self.result.tokens[name] = self.result.samples[name] = 0
        add_gram_(matrix, x)
        self.result.tokens[name] += inputs.num_tokens
        self.result.samples[name] += inputs.num_samples


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
    counts = torch.tensor([[covariances.tokens[k], covariances.samples[k]] for k in keys], dtype=torch.float64, device=device)
    all_reduce_sum_(counts)
    for key, (tokens, samples) in zip(keys, counts.tolist()):
        covariances.tokens[key], covariances.samples[key] = int(tokens), int(samples)


def check_token_counts(covariances: Covariances, min_tokens_per_dim: float) -> None:
    """Refuse layers whose covariance cannot have full rank: their null space would be set by rounding."""
    for key, matrix in covariances.matrices.items():
        needed = int(min_tokens_per_dim * matrix.shape[0])
        if covariances.tokens[key] < needed:
            raise InsufficientCalibrationError(
                f"{key} has input width {matrix.shape[0]} but calibration gave only {covariances.tokens[key]} "
                f"tokens (need at least {needed}). Raise num_samples or max_length, or lower min_tokens_per_dim "
                "(0 disables the check) if a rank-deficient covariance is what you want."
            )
